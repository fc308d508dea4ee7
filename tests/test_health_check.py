"""Active health checks (sidecar.health_check) against a tiny loopback HTTP server:
what a check sends, what passes and fails, the flag it sets, and the tasks it owns."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop
from e2e_helpers import closed_port

from sidecar.config import HealthCheckConfig, TimeoutsConfig, UpstreamConfig
from sidecar.health import State
from sidecar.health_check import TASK_PREFIX, HealthCheckers, parse_status, probe
from sidecar.upstream import UpstreamPool

SECRET = "sk-never-on-the-check-0123456789"


class CheckServer:
    """Answers every request with ``status`` (or never, when None); keeps the heads."""

    def __init__(self, status: int | None = 200) -> None:
        self.status = status
        self.heads: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> CheckServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.heads.append(await reader.readuntil(b"\r\n\r\n"))
            if self.status is None:
                await reader.read()  # hang until the checker gives up and closes
            else:
                writer.write(b"HTTP/1.1 %d X\r\ncontent-length: 0\r\n\r\n" % self.status)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _cfg(port: int, *, name: str = "u", path: str = "/health", interval: float = 0.05,
         timeout: float = 0.5, base_path: str = "") -> UpstreamConfig:
    return UpstreamConfig(name=name, url=f"http://127.0.0.1:{port}{base_path}", scheme="http",
                          host="127.0.0.1", port=port, base_path=base_path, api_key=SECRET,
                          health_check=HealthCheckConfig(path, interval, timeout))


def _run(main: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(asyncio.wait_for(main(), 10))


async def _until(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def _check_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith(TASK_PREFIX)]


def test_parse_status() -> None:
    assert parse_status(b"HTTP/1.1 204 No Content\r\n") == 204
    assert parse_status(b"HTTP/1.0 503\r\n") == 503
    assert parse_status(b"ICY 200 OK\r\n") is None
    assert parse_status(b"HTTP/1.1 2000 OK\r\n") is None
    assert parse_status(b"") is None


def test_a_check_sends_a_plain_get_without_credentials() -> None:
    async def main() -> None:
        async with CheckServer(204) as srv:
            cfg = _cfg(srv.port, path="/healthz", base_path="/openai")
            assert cfg.health_check is not None
            assert await probe(cfg, cfg.health_check, None) is None
        (head,) = srv.heads
        lines = head.decode().split("\r\n")
        assert lines[0] == "GET /openai/healthz HTTP/1.1"
        assert f"host: 127.0.0.1:{srv.port}" in lines and "connection: close" in lines
        assert SECRET.encode() not in head and b"authorization" not in head.lower()

    _run(main)


@pytest.mark.parametrize("status", [404, 500, 301])
def test_a_status_other_than_2xx_fails(status: int) -> None:
    async def main() -> None:
        async with CheckServer(status) as srv:
            cfg = _cfg(srv.port)
            assert cfg.health_check is not None
            assert await probe(cfg, cfg.health_check, None) == f"answered {status}"

    _run(main)


def test_no_answer_within_the_timeout_and_a_refused_connection_fail() -> None:
    async def main() -> None:
        async with CheckServer(None) as srv:
            cfg = _cfg(srv.port, timeout=0.2)
            assert cfg.health_check is not None
            t0 = asyncio.get_running_loop().time()
            assert await probe(cfg, cfg.health_check, None) == "no answer within 0.2s"
            assert asyncio.get_running_loop().time() - t0 < 1.0
        cfg = _cfg(closed_port())
        assert cfg.health_check is not None
        reason = await probe(cfg, cfg.health_check, None)
        assert reason is not None and reason.startswith("cannot connect")

    _run(main)


def test_the_flag_follows_the_check_and_transitions_are_logged_once_without_secrets(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.health_check")

    async def main() -> None:
        async with CheckServer(200) as srv:
            pool = UpstreamPool(_cfg(srv.port), TimeoutsConfig())
            checks = HealthCheckers()
            checks.sync([pool])
            try:
                await _until(lambda: len(srv.heads) >= 2)
                assert pool.health.available(0.0) and not pool.health.active_down
                srv.status = 503
                await _until(lambda: pool.health.active_down)
                now = asyncio.get_running_loop().time()
                assert not pool.health.available(now)
                assert pool.health.state(now) is State.CHECK_FAILING
                n = len(srv.heads)
                await _until(lambda: len(srv.heads) >= n + 3)  # it keeps checking
                srv.status = 200
                await _until(lambda: not pool.health.active_down)
                assert pool.health.available(asyncio.get_running_loop().time())
            finally:
                await checks.close()
            assert _check_tasks() == []

    _run(main)
    msgs = [r for r in caplog.records if r.name == "sidecar.health_check"]
    assert [(r.levelno, "again" in r.getMessage()) for r in msgs] == [
        (logging.WARNING, False), (logging.INFO, True)]
    assert "answered 503" in msgs[0].getMessage()
    assert all(SECRET not in r.getMessage() for r in caplog.records)


def test_sync_starts_new_checks_cancels_gone_ones_and_close_leaves_no_task() -> None:
    async def main() -> None:
        async with CheckServer(200) as srv:
            a = UpstreamPool(_cfg(srv.port, name="a"), TimeoutsConfig())
            b = UpstreamPool(_cfg(srv.port, name="b"), TimeoutsConfig())
            plain = UpstreamPool(
                UpstreamConfig(name="c", url="http://127.0.0.1:1", scheme="http",
                               host="127.0.0.1", port=1), TimeoutsConfig())
            checks = HealthCheckers()
            checks.sync([a, b, plain])
            assert set(checks.tasks) == {a, b}  # no health_check: no task
            task_a, task_b = checks.tasks[a], checks.tasks[b]
            checks.sync([b, plain])  # a reload dropped a
            assert set(checks.tasks) == {b} and checks.tasks[b] is task_b  # b kept its task
            await asyncio.sleep(0)
            assert task_a.cancelled()
            assert sorted(t.get_name() for t in _check_tasks()) == [TASK_PREFIX + "b"]
            checks.sync([a, b])  # a back (a new task), then close cancels both
            await checks.close()
            assert checks.tasks == {} and _check_tasks() == []
            assert task_b.cancelled()

    _run(main)
