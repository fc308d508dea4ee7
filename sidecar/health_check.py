"""Active health checks: one task per upstream with ``health_check``, off the hot path.

Every ``interval`` seconds the task opens a fresh connection to the upstream (the
pool's own host, port and TLS context, never one of its kept-alive connections),
sends ``GET {base_path}{path}`` with ``connection: close`` and reads the status line;
a 2xx within ``timeout`` seconds (connect and TLS included) passes, anything else
(another status, a timeout, a refused or reset connection, a TLS failure) fails.
The check carries no credential: no api key, no client header.

The verdict goes to the pool's :class:`~sidecar.health.UpstreamHealth` as one flag
(``check_failed`` / ``check_passed``), which routing reads in ``available``; the
first check runs as soon as the task starts. A change of verdict is logged once
(up → down as a warning, down → up as info), naming the upstream and the check's
path, never a key or a header.

:class:`HealthCheckers` owns the tasks. ``sync(pools)`` starts a task for each pool
that has a check and none yet, and cancels those of pools no longer given (a reload
that dropped or changed an upstream: its pool is a new object, so its check starts
anew with it); ``close()`` cancels every task and awaits them all.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterable, Mapping

from sidecar.config import HealthCheckConfig, UpstreamConfig
from sidecar.upstream import UpstreamPool, host_header

log = logging.getLogger("sidecar.health_check")

# The longest status line read: "HTTP/1.1 200 " and a reason phrase.
MAX_STATUS_LINE = 1024
TASK_PREFIX = "health-check:"


def check_request(cfg: UpstreamConfig, check: HealthCheckConfig) -> bytes:
    """The whole request of one check (no body, no credential)."""
    return (b"GET " + cfg.base_path.encode() + check.path.encode() + b" HTTP/1.1\r\n"
            b"host: " + host_header(cfg) + b"\r\n"
            b"user-agent: llm-sidecar-health-check\r\n"
            b"accept: */*\r\n"
            b"connection: close\r\n\r\n")


def parse_status(line: bytes) -> int | None:
    """The status code of an HTTP/1.x status line, or None when it is not one."""
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3 \
            or not parts[1].isdigit():
        return None
    return int(parts[1])


async def probe(cfg: UpstreamConfig, check: HealthCheckConfig,
                ssl_context: ssl.SSLContext | None) -> str | None:
    """Run one check: None when it passed, else why it failed (no secret in it)."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(check.timeout):
            reader, writer = await asyncio.open_connection(
                cfg.host, cfg.port, ssl=ssl_context,
                server_hostname=cfg.host if ssl_context is not None else None,
                limit=MAX_STATUS_LINE)
            writer.write(check_request(cfg, check))
            line = await reader.readline()
    except TimeoutError:
        return f"no answer within {check.timeout:g}s"
    except ssl.SSLError as exc:
        return f"TLS handshake failed: {exc.reason or type(exc).__name__}"
    except OSError as exc:
        return f"cannot connect: {exc.strerror or type(exc).__name__}"
    except ValueError:  # the line ran past the reader's limit
        return "the status line is too long"
    finally:
        if writer is not None:
            writer.close()  # nothing more is read; the close is not waited for
    if not line:
        return "closed the connection without an answer"
    status = parse_status(line)
    if status is None:
        return "did not answer HTTP/1.x"
    return None if 200 <= status < 300 else f"answered {status}"


class HealthCheckers:
    """The active-check tasks of one proxy, one per pool with ``health_check``."""

    def __init__(self) -> None:
        self._tasks: dict[UpstreamPool, asyncio.Task[None]] = {}
        # Cancelled by a sync and not finished yet: close() awaits them too.
        self._stopping: set[asyncio.Task[None]] = set()

    @property
    def tasks(self) -> Mapping[UpstreamPool, asyncio.Task[None]]:
        """The running check of each pool (read by tests and readiness reports)."""
        return self._tasks

    def sync(self, pools: Iterable[UpstreamPool]) -> None:
        """Check exactly these pools: start what is new, cancel what is gone."""
        wanted = [pool for pool in pools if pool.cfg.health_check is not None]
        keep = set(wanted)
        for pool in [p for p in self._tasks if p not in keep]:
            task = self._tasks.pop(pool)
            task.cancel()
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)
        loop = asyncio.get_running_loop()
        for pool in wanted:
            if pool not in self._tasks:
                task = loop.create_task(self._run(pool), name=TASK_PREFIX + pool.cfg.name)
                task.add_done_callback(_report_crash)
                self._tasks[pool] = task

    async def close(self) -> None:
        """Cancel every check and wait for all of them to end."""
        tasks = [*self._tasks.values(), *self._stopping]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            # A cancel of close() itself propagates to the checks and is re-raised.
            await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    async def _run(pool: UpstreamPool) -> None:
        cfg, check, health = pool.cfg, pool.cfg.health_check, pool.health
        assert check is not None
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                reason = await probe(cfg, check, pool.ssl_context)
            except Exception as exc:  # a bug here must not end the checks
                log.debug("health check of upstream '%s' raised", cfg.name, exc_info=True)
                reason = f"check error: {type(exc).__name__}"
            now = loop.time()
            if reason is None:
                if health.check_passed(now):
                    log.info("upstream '%s' passes its health check (GET %s) again",
                             cfg.name, check.path)
            elif health.check_failed(now):
                log.warning("upstream '%s' fails its health check (GET %s: %s): "
                            "out of rotation until it passes", cfg.name, check.path, reason)
            await asyncio.sleep(max(0.0, check.interval - (now - started)))


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("health check task %s crashed", task.get_name(), exc_info=task.exception())
