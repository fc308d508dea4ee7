"""Token buckets on Redis (``limits.backend: redis://...``), against a real redis-server.

The Lua scripts are checked against bucket.py's arithmetic on the same sequences;
then the limit is enforced over real sockets by one sidecar and by two sidecar
processes sharing one Redis; then Redis is killed and started again mid-test.
"""

from __future__ import annotations

import asyncio
import itertools
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import Stack
from e2e_helpers import (
    ClientConn,
    Response,
    assert_openai_error,
    chat_body,
    concurrent_posts,
    meter_rows,
    request_bytes,
    stream_body,
    token_limited,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.config import Config
from sidecar.ratelimit.bucket import Grant
from sidecar.ratelimit.memory import MemoryBackend
from sidecar.ratelimit.policy import Limits

REDIS_SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None,
    reason="redis-server is not installed (CI installs it: apt-get install redis-server)")

import redis  # noqa: E402

from sidecar.ratelimit.redis_backend import (  # noqa: E402
    ARGV_CLOCK,
    KEY_PREFIX,
    RedisBackend,
    grant_of,
    reserve_source,
    script_args,
    settle_source,
)

PATH = "/v1/chat/completions"
PY = sys.executable


# -- a real redis-server -----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """redis-server on a free loopback port, no persistence; can be killed and restarted
    on the same port."""

    def __init__(self, workdir: pathlib.Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        assert REDIS_SERVER is not None
        log = open(self.dir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError("redis-server did not start:\n"
                             + (self.dir / "redis.log").read_text(errors="replace"))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: pathlib.Path) -> Iterator[RedisServer]:
    """A server of the test's own, for tests that kill it."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def sync_redis(shared_redis: RedisServer) -> Iterator[Any]:
    client = redis.Redis.from_url(shared_redis.url)
    client.flushall()
    yield client
    client.close()


# -- unit: the Lua arithmetic is bucket.py's ---------------------------------------------
_keys = itertools.count()


class LuaBuckets:
    """One bucket driven through the backend's scripts, on a clock the test names."""

    def __init__(self, client: Any) -> None:
        self.key = f"{KEY_PREFIX}unit:{next(_keys)}"
        self._reserve = client.register_script(reserve_source(ARGV_CLOCK))
        self._settle = client.register_script(settle_source(ARGV_CLOCK))

    def reserve(self, limits: Limits, cost: int, now: float) -> Grant:
        reply = self._reserve(keys=[self.key], args=[*script_args(limits, cost), repr(now)])
        return grant_of(reply, limits)

    def settle(self, limits: Limits, delta: int, now: float) -> None:
        self._settle(keys=[self.key], args=[*script_args(limits, delta), repr(now)])


Op = tuple[str, int, float]  # ("reserve", cost, t) | ("settle", delta, t)


def _run_both(client: Any, limits: Limits, ops: list[Op]) -> None:
    """The same operations on the in-process backend and on the scripts: equal Grants."""
    memory, lua = MemoryBackend(), LuaBuckets(client)
    for i, (op, amount, now) in enumerate(ops):
        if op == "reserve":
            want = memory.reserve("b", limits, amount, now)
            got = lua.reserve(limits, amount, now)
            assert got == want, (i, ops[: i + 1])
        else:
            memory.settle("b", limits, amount, now)
            lua.settle(limits, amount, now)


# Rates and clock steps are binary fractions, so both sides compute exactly.
T = Limits(1000, 8.0)  # 125 tokens a second


def test_lua_reserve_and_refill_match_bucket_py(sync_redis: Any) -> None:
    _run_both(sync_redis, T, [
        ("reserve", 300, 0.0), ("reserve", 300, 0.0), ("reserve", 300, 0.0),
        ("reserve", 300, 0.0),  # refused: 100 left, 1.6 s to wait
        ("reserve", 300, 1.0),  # refused: 225
        ("reserve", 300, 1.625),  # 303.125: granted
        ("settle", -200, 2.0), ("reserve", 1000, 3.0), ("reserve", 1, 3.0),
        ("reserve", 0, 3.0), ("reserve", 1000, 20.0),
    ])


def test_lua_cost_above_capacity_and_settled_debt_match_bucket_py(sync_redis: Any) -> None:
    small = Limits(100, 4.0)  # 25 a second
    _run_both(sync_redis, small, [
        ("reserve", 250, 0.0),  # capped at 100: granted on a full bucket
        ("reserve", 250, 1.0),  # needs the whole (capped) 100: 3 s
        ("reserve", 250, 4.0),
        ("settle", 150, 4.0),  # used 150 more than held: a debt (-150)
        ("reserve", 10, 5.0),  # -125: 5.4 s
        ("reserve", 10, 10.5), ("settle", -10, 10.5), ("reserve", 100, 20.0),
    ])


def test_lua_refund_is_capped_at_capacity(sync_redis: Any) -> None:
    _run_both(sync_redis, T, [
        ("reserve", 100, 0.0), ("settle", -5000, 0.5), ("reserve", 1000, 0.5),
        ("reserve", 1, 0.5), ("settle", -400, 0.75), ("reserve", 400, 0.75),
        ("reserve", 1, 0.75),
    ])
    lua = LuaBuckets(sync_redis)
    lua.reserve(T, 100, 0.0)
    lua.settle(T, -5000, 0.5)
    assert float(sync_redis.hget(lua.key, "tokens")) == 1000.0


def test_lua_both_or_neither_with_a_request_bucket(sync_redis: Any) -> None:
    two = Limits(1000, 8.0, requests=2)  # a request back every 4 s
    _run_both(sync_redis, two, [
        ("reserve", 100, 0.0), ("reserve", 100, 0.0),
        ("reserve", 100, 0.0),  # refused by the request bucket: no tokens taken either
        ("reserve", 900, 4.0),
        ("reserve", 200, 4.0),  # refused by both: waits for the later (4 s)
        ("settle", -300, 5.0), ("reserve", 50, 8.0),
    ])
    lua = LuaBuckets(sync_redis)
    for _ in range(2):
        assert lua.reserve(two, 100, 0.0).ok
    refused = lua.reserve(two, 100, 0.0)
    assert not refused.ok and refused.remaining_tokens == 800
    assert refused.remaining_requests == 0 and refused.retry_after == 4.0
    tight = Limits(100, 4.0, requests=10)  # the token bucket refuses, the request one fits
    lua = LuaBuckets(sync_redis)
    assert lua.reserve(tight, 100, 0.0).ok
    refused = lua.reserve(tight, 50, 0.0)
    assert not refused.ok and refused.remaining_requests == 9


def test_lua_settlement_on_an_expired_bucket(sync_redis: Any) -> None:
    """An expired hash is a full bucket: a refund leaves nothing behind, an over-use
    is charged to it (a stream that outlived its bucket's TTL still pays)."""
    lua = LuaBuckets(sync_redis)
    lua.settle(T, -50, 0.0)
    assert not sync_redis.exists(lua.key)
    lua.settle(T, 300, 0.0)
    assert lua.reserve(T, 0, 0.0).remaining_tokens == 700


_limits = st.builds(Limits, tokens=st.sampled_from([64, 100, 1000]),
                    period=st.sampled_from([1.0, 2.0, 4.0, 8.0]),
                    requests=st.sampled_from([None, 1, 2, 3, 5]))
_ops = st.lists(st.tuples(st.sampled_from(["reserve", "reserve", "settle"]),
                          st.integers(-1500, 1500), st.integers(0, 24)),
                min_size=1, max_size=12)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limits=_limits, steps=_ops)
def test_lua_matches_bucket_py_on_random_sequences(
        sync_redis: Any, limits: Limits, steps: list[tuple[str, int, int]]) -> None:
    # A settlement follows its reservation. (On a bucket that is not there at all the
    # two differ on purpose: the in-process store drops it, the script charges an
    # over-use to the full bucket an expired hash stands for.)
    now, ops = 0.0, [("reserve", 100, 0.0)]
    for op, amount, dt in steps:  # the clock moves forward in 1/8 s steps
        now += dt / 8
        ops.append((op, abs(amount) if op == "reserve" else amount, now))
    _run_both(sync_redis, limits, ops)


def test_the_server_clock_the_ttl_and_an_opaque_key(sync_redis: Any,
                                                    shared_redis: RedisServer) -> None:
    import uvloop

    # A bucket name made of a header value: Lua-looking text, quotes, braces, newlines.
    name = "r:/v1/chat|h:']]..redis.call('FLUSHALL')--\n{x}\"\x00é"
    sync_redis.set("keep-me", b"1")

    async def main() -> Grant:
        backend = RedisBackend(shared_redis.url)
        try:
            return await backend.reserve(name, Limits(1000, 60.0), 400, 0.0)  # type: ignore[misc]
        finally:
            await backend.aclose()

    grant = uvloop.run(main())
    assert grant.ok and grant.remaining_tokens == 600 and grant.held
    assert sync_redis.get("keep-me") == b"1"
    key = (KEY_PREFIX + name).encode()
    assert sync_redis.exists(key)
    stamp = float(sync_redis.hget(key, "stamp"))
    seconds, micros = sync_redis.time()
    server_now = seconds + micros / 1e6
    assert abs(stamp - server_now) < 5  # the server's TIME, not the caller's 0.0
    # It expires once full again: 400 tokens at 1000/60 a second = 24 s (+1 s margin).
    assert 23_000 < sync_redis.pttl(key) <= 25_000


# -- unit: the backend's failure mode, settlement queue and close --------------------------
class Silent:
    """A TCP port that accepts connections and never answers (a hung Redis)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"redis://:hunter2@127.0.0.1:{self.sock.getsockname()[1]}/0"

    def close(self) -> None:
        self.sock.close()


def test_a_hung_redis_costs_one_timeout_then_the_breaker_answers_at_once(
        caplog: pytest.LogCaptureFixture) -> None:
    import uvloop

    silent = Silent()

    async def main() -> tuple[float, float, list[bool], RedisBackend]:
        backend = RedisBackend(silent.url, fail_open=True)
        t0 = time.perf_counter()
        first = backend.reserve("k", Limits(1000, 60.0), 10, 0.0)
        assert not isinstance(first, Grant)
        g = await first
        slow = time.perf_counter() - t0
        t0 = time.perf_counter()
        quick = [backend.reserve("k", Limits(1000, 60.0), 10, 0.0) for _ in range(50)]
        fast = time.perf_counter() - t0
        assert all(isinstance(q, Grant) for q in quick)
        held = [g.held, *(q.held for q in quick)]  # type: ignore[union-attr]
        await backend.aclose()
        return slow, fast, held, backend

    try:
        with caplog.at_level("INFO", logger="sidecar.ratelimit"):
            slow, fast, held, backend = uvloop.run(main())
    finally:
        silent.close()
    assert 0.2 <= slow < 1.5, slow  # the socket timeout, not redis-py's retries
    assert fast < 0.05, fast  # the breaker: no round trip, synchronous grants
    assert held == [False] * 51
    assert backend.errors == 1 and backend.fallbacks == 51
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1  # logged once, not per request
    assert "hunter2" not in caplog.text


def test_fail_closed_refuses_with_503_and_recovers(own_redis: RedisServer) -> None:
    import uvloop

    from sidecar.errors import Overloaded

    async def main() -> None:
        backend = RedisBackend(own_redis.url, fail_open=False)
        limits = Limits(1000, 60.0)
        assert (await backend.reserve("k", limits, 10, 0.0)).ok  # type: ignore[misc]
        own_redis.kill()
        with pytest.raises(Overloaded, match="unreachable"):
            await backend.reserve("k", limits, 10, 0.0)  # type: ignore[misc]
        with pytest.raises(Overloaded) as info:  # the breaker: raised synchronously
            backend.reserve("k", limits, 10, 0.0)
        assert dict(info.value.headers)[b"retry-after"] == b"1"
        own_redis.start()
        await asyncio.sleep(1.1)  # past the breaker: the next request probes
        grant = await backend.reserve("k", limits, 10, 0.0)  # type: ignore[misc]
        assert grant.ok and grant.held and grant.remaining_tokens == 990  # a new server
        await backend.aclose()

    uvloop.run(main())


def test_settlements_are_queued_bounded_and_flushed_by_close(
        shared_redis: RedisServer, sync_redis: Any) -> None:
    import uvloop

    limits = Limits(1000, 60.0)

    async def main() -> tuple[int, int]:
        backend = RedisBackend(shared_redis.url, max_pending_settlements=8)
        await backend.reserve("s", limits, 500, 0.0)  # type: ignore[misc]
        for _ in range(20):  # 20 refunds of 10 without awaiting: 8 queued, 12 dropped
            assert backend.settle("s", limits, -10, 0.0) is None  # type: ignore[func-returns-value]
        queued, dropped = backend.pending_settlements, backend.dropped
        backend.close()  # from sync code: flushes the queue, then the pool closes
        for _ in range(100):
            if not backend.pending_settlements:
                break
            await asyncio.sleep(0.01)
        assert backend.pending_settlements == 0
        return queued, dropped

    queued, dropped = uvloop.run(main())
    assert (queued, dropped) == (8, 12)
    level = float(sync_redis.hget(KEY_PREFIX + "s", "tokens"))
    assert 580 <= level < 590  # 500 + 8 * 10, plus a few tokens of refill


def test_close_without_a_loop_is_harmless(shared_redis: RedisServer) -> None:
    RedisBackend(shared_redis.url).close()


# -- end to end over real sockets ---------------------------------------------------------
def limited(limit: int, period: float, url: str, failure: str = "open",
            **extra: Any) -> Callable[[Config], Config]:
    """The chat route with the seed's token_limiter entry, buckets in Redis at ``url``."""
    return token_limited(limit, period, url, failure, **extra)


def _reservation(refused: list[Response]) -> int:
    """What one request holds, from a 429's message ("this request needs ~N")."""
    m = re.search(r"needs ~(\d+)", refused[0].json["error"]["message"])
    assert m, refused[0].body
    return int(m.group(1))


def _check_refused(refused: list[Response]) -> None:
    for r in refused:
        err = assert_openai_error(r, 429, "rate_limit_exceeded")
        assert "1000 tokens per 60s" in err["message"]
        assert int(r.header("retry-after") or 0) >= 1
        assert r.header("x-ratelimit-limit-tokens") == "1000"


def test_concurrent_streams_cannot_overdraw_a_1000_token_minute_on_redis(
        stack_factory: Callable[..., Stack], shared_redis: RedisServer,
        sync_redis: Any) -> None:
    stack = stack_factory(limited(1000, 60.0, shared_redis.url), chunks=20, delay_ms=20)
    # 30 streams in flight at once, ~100 tokens each
    responses = concurrent_posts([stack.port] * 30, PATH, stream_body(90))
    ok = [r for r in responses if r.status == 200]
    refused = [r for r in responses if r.status == 429]
    assert ok and refused and len(ok) + len(refused) == 30, [r.status for r in responses]
    _check_refused(refused)
    assert all(r.header("x-ratelimit-remaining-tokens") for r in ok)
    reservation = _reservation(refused)
    stack.stop()
    rows = stack.rows()
    served = [row for row in rows if row["outcome"] == "ok"]
    assert len(served) == len(ok)
    used = sum(row["total_tokens"] for row in served)
    assert used <= 1000 + reservation, (used, reservation)
    assert all(row["attempts"] == 0 for row in rows if row["status"] == 429)
    # Every settlement landed: the bucket holds what the served requests used.
    level = float(sync_redis.hget(KEY_PREFIX + "r:" + PATH, "tokens"))
    assert 1000 - used - 5 <= level <= 1000 - used + 60, (level, used)


def test_two_sidecar_processes_share_one_budget(
        tmp_path: pathlib.Path, shared_redis: RedisServer, sync_redis: Any) -> None:
    from test_process_e2e import Proc, start_mock

    procs: list[Proc] = []
    try:
        mock_port = start_mock(procs, tmp_path, "--chunks", "20", "--delay-ms", "20")
        ports = []
        for name in ("a", "b"):
            d = tmp_path / name
            d.mkdir()
            cfg = d / "sidecar.yaml"
            cfg.write_text(
                "listen: 127.0.0.1:0\n"
                "routes:\n"
                f"  - path: {PATH}\n"
                f"    upstreams: [{{ target: http://127.0.0.1:{mock_port} }}]\n"
                "    middleware:\n"
                "      - type: token_limiter\n"
                "        config: { limit: 1000, period: 1m }\n"
                "limits:\n"
                f"  backend: {shared_redis.url}\n"
                "  redis_failure: closed\n"
                # Two fresh processes open ~30 Redis connections at once on a shared
                # 2-core box: one connect past 0.5 s would trip the breaker and turn the
                # rest of this burst into 503s, which is the failure mode, not the bound
                # under test.
                "  redis_timeout: 3s\n"
                "meter:\n"
                "  db: ./meter.db\n")
            proc = Proc([PY, "-m", "sidecar", "run", "-c", str(cfg)], d / "sidecar.log")
            procs.append(proc)
            line = proc.wait_for_log("listening on http://")
            ports.append(int(line.split("http://127.0.0.1:", 1)[1].split()[0]))
        # 15 streams at each sidecar, all in flight at once
        responses = concurrent_posts([p for p in ports for _ in range(15)], PATH,
                                     stream_body(90))
        for p in procs[1:]:
            assert p.stop() == 0
    finally:
        for p in procs:
            p.stop(signal.SIGKILL)
    ok = [r for r in responses if r.status == 200]
    refused = [r for r in responses if r.status == 429]
    assert ok and refused and len(ok) + len(refused) == 30, [r.status for r in responses]
    _check_refused(refused)
    reservation = _reservation(refused)
    rows = meter_rows(tmp_path / "a" / "meter.db") + meter_rows(tmp_path / "b" / "meter.db")
    assert len(rows) == 30
    served = [row for row in rows if row["outcome"] == "ok"]
    assert len(served) == len(ok)
    used = sum(row["total_tokens"] for row in served)
    # Each process alone would let ~1000 through: together they stay within one budget.
    assert used <= 1000 + reservation, (used, reservation)


def _one(conn: ClientConn, max_tokens: int = 90) -> Response:
    conn.send(request_bytes("POST", PATH, {**chat_body(), "max_tokens": max_tokens}))
    return conn.read_response()


@pytest.mark.parametrize("failure", ["open", "closed"])
def test_redis_killed_mid_test_then_started_again(
        stack_factory: Callable[..., Stack], own_redis: RedisServer, failure: str) -> None:
    stack = stack_factory(limited(1000, 60.0, own_redis.url, failure))
    sent = 0
    with ClientConn(stack.port) as c:
        for _ in range(2):
            r = _one(c)
            sent += 1
            assert r.status == 200 and r.header("x-ratelimit-remaining-tokens"), r.status
        own_redis.kill()
        during = []
        for _ in range(12):  # more than the budget: ~100 tokens each
            during.append(_one(c))
            sent += 1
        if failure == "open":
            assert [r.status for r in during] == [200] * 12
            assert not any(r.header("x-ratelimit-remaining-tokens") for r in during)
        else:
            for r in during:
                err = assert_openai_error(r, 503, "overloaded")
                assert "limits.redis_failure is closed" in err["message"]
                assert r.header("retry-after") == "1"
        own_redis.start()  # the same port, an empty server: the bucket starts full
        statuses = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(statuses) < 200:
            r = _one(c)
            sent += 1
            statuses.append(r.status)
            if r.status == 429:
                _check_refused([r])
                break
            time.sleep(0.05)  # the backend skips Redis for a second after a failure
    assert statuses[-1] == 429, statuses  # limits are enforced again
    assert 200 in statuses
    backend = stack.call(lambda: stack.server.proxy.admission.backend)  # type: ignore[attr-defined]
    assert backend.errors >= 1 and backend.fallbacks >= 12
    stack.stop()
    rows = stack.rows()
    assert len(rows) == sent  # every request has its meter row, whatever Redis did
    if failure == "closed":
        # The twelve, and those answered while the backend still skipped Redis.
        assert sum(1 for row in rows if row["status"] == 503) == 12 + statuses.count(503)


def test_two_workers_on_the_memory_backend_are_refused_by_check(
        tmp_path: pathlib.Path) -> None:
    def check(limits: str) -> subprocess.CompletedProcess[str]:
        cfg = tmp_path / "sidecar.yaml"
        cfg.write_text(
            "listen: 127.0.0.1:8080\n"
            "workers: 2\n"
            "routes:\n"
            f"  - path: {PATH}\n"
            "    upstreams: [{ target: http://127.0.0.1:9000 }]\n"
            "    middleware:\n"
            "      - type: token_limiter\n"
            "        config: { limit: 1000, period: 1m }\n" + limits)
        return subprocess.run([PY, "-m", "sidecar", "check", "-c", str(cfg)],
                              capture_output=True, text=True, timeout=30)

    res = check("")
    assert res.returncode == 2, res.stderr
    assert "workers: 2 workers with a token_limiter need a shared backend" in res.stderr
    assert "limits.backend: redis://HOST:PORT" in res.stderr
    res = check("limits:\n  backend: redis://127.0.0.1:6379/0\n")
    assert res.returncode == 0, res.stderr


def test_a_reload_keeps_the_running_bucket_store(
        tmp_path: pathlib.Path, shared_redis: RedisServer,
        caplog: pytest.LogCaptureFixture) -> None:
    import uvloop

    from sidecar.config import load_config
    from sidecar.server import Server

    cfg = tmp_path / "sidecar.yaml"

    def write(limits: str) -> None:
        cfg.write_text("listen: 127.0.0.1:0\nroutes:\n"
                       f"  - path: {PATH}\n"
                       "    upstreams: [{ target: http://127.0.0.1:9 }]\n"
                       "    middleware:\n"
                       "      - type: token_limiter\n"
                       "        config: { limit: 1000, period: 1m }\n"
                       "meter:\n  db: ./meter.db\n" + limits)

    async def main() -> tuple[bool, Any]:
        write("limits:\n  max_connections: 100\n")
        server = Server(load_config(str(cfg)), str(cfg))
        await server.start(port=0)
        try:
            write(f"limits:\n  max_connections: 200\n  backend: {shared_redis.url}\n"
                  "  redis_failure: closed\n  redis_timeout: 2s\n")
            return server.reload(), server.config.limits
        finally:
            await server.stop()

    with caplog.at_level("WARNING", logger="sidecar.server"):
        reloaded, limits = uvloop.run(main())
    assert reloaded
    assert limits.max_connections == 200  # the rest of the section reloads
    assert (limits.backend, limits.redis_failure, limits.redis_timeout) == (
        "memory", "open", 0.5)
    assert ("limits.backend, limits.redis_failure and limits.redis_timeout change only on "
            "restart") in caplog.text
