"""The JSON access log: one line per finished request, written off the event loop.

``access_log: off`` (the default), ``stdout``, or a file path. Each line is an orjson
object built from the request's meter row: request id, key id (the key's public id,
never its secret), route, upstream, model, status, outcome, timings, tokens, cost.

The hot path only encodes the line and appends it to a list. The lines go out in
one ``write`` every ``ACCESS_LOG_FLUSH_S`` (or sooner once ``ACCESS_LOG_FLUSH_BYTES``
are waiting) from a thread of the log's own, so a slow disk or a stalled stdout
pipe never blocks a stream; while a write is stuck, at most
``ACCESS_LOG_MAX_PENDING_BYTES`` wait, and lines beyond are dropped and counted
(``sidecar_access_log_dropped_total``). A file is opened ``O_APPEND``: the workers of
``workers: N`` share it, and each write (whole lines) lands in one piece.

SIGUSR1 reopens the file (after logrotate renamed it); the reopen runs on the same
thread, in order with the writes, so no line goes to a closed descriptor.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Final

import orjson

if TYPE_CHECKING:
    from sidecar.meter import MeterRecord

log = logging.getLogger("sidecar.access_log")

STDOUT: Final = "stdout"
# Lines reach the log at most this long after their request ended (seconds) ...
ACCESS_LOG_FLUSH_S: Final = 0.5
# ... or as soon as this many bytes wait.
ACCESS_LOG_FLUSH_BYTES: Final = 64 * 1024
# Bytes held while a write is stuck (a full disk, a stalled pipe); later lines drop.
ACCESS_LOG_MAX_PENDING_BYTES: Final = 16 * 1024 * 1024
# Write failures are logged at most this often.
ACCESS_LOG_ERROR_INTERVAL_S: Final = 10.0
FILE_MODE: Final = 0o640
_APPEND_NEWLINE: Final = orjson.OPT_APPEND_NEWLINE


def line_of(row: MeterRecord) -> bytes:
    """One access-log line (with its newline) for a finished request's row.

    The fields the issue names and no more: each costs ~500 instructions per request
    (an attribute read and a dict entry, then orjson), and the meter row has the rest
    by request_id. ``error`` is added only when there is one.
    """
    line = {
        "ts_ms": row.ts_ms,
        "request_id": row.request_id,
        "key_id": row.key_id,
        "route": row.route,
        "upstream": row.upstream,
        "model": row.model,
        "status": row.status,
        "outcome": row.outcome,
        "ttft_ms": row.ttft_ms,
        "duration_ms": row.duration_ms,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "cost_usd": row.cost_usd,
    }
    if row.error is not None:
        line["error"] = row.error
    return orjson.dumps(line, option=_APPEND_NEWLINE)


def _open(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)


class AccessLog:
    def __init__(self, target: str, loop: asyncio.AbstractEventLoop) -> None:
        self.target = target
        self.loop = loop
        # Opened here, so a path that cannot be written stops the start with its reason.
        self._fd = 1 if target == STDOUT else _open(target)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sidecar-access-log")
        self._lines: list[bytes] = []
        self._size = 0
        self._writing: Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_error_log = -ACCESS_LOG_ERROR_INTERVAL_S
        self._closed = False
        self.written = 0  # lines written
        self.dropped = 0  # lines dropped (pending bound, or a failed write)

    # -- the hot path ---------------------------------------------------------------------
    def write(self, row: MeterRecord) -> None:
        """Queue the row's line. Never blocks, never raises, never awaits."""
        if self._size >= ACCESS_LOG_MAX_PENDING_BYTES:
            self.dropped += 1
            return
        line = line_of(row)
        self._lines.append(line)
        self._size += len(line)
        if self._size >= ACCESS_LOG_FLUSH_BYTES:
            self._flush()
        elif self._timer is None and self._writing is None:
            self._timer = self.loop.call_later(ACCESS_LOG_FLUSH_S, self._flush)

    # -- the writer -----------------------------------------------------------------------
    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writing is not None or not self._lines:
            return  # the write in flight flushes again when it is done
        if self._closed:  # a row settled after shutdown closed the log
            self.dropped += len(self._lines)
            self._lines = []
            self._size = 0
            return
        data = b"".join(self._lines)
        n = len(self._lines)
        self._lines = []
        self._size = 0
        fut = self._writing = self._executor.submit(self._write_out, data)
        fut.add_done_callback(
            lambda f: self.loop.call_soon_threadsafe(self._written, f, n))

    def _write_out(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def _written(self, fut: Future[None], n: int) -> None:
        self._writing = None
        exc = fut.exception()
        if exc is None:
            self.written += n
        else:
            self.dropped += n
            now = time.monotonic()
            if now - self._last_error_log >= ACCESS_LOG_ERROR_INTERVAL_S:
                self._last_error_log = now
                log.error("access log %s: write failed (%s); %d lines dropped so far",
                          self.target, exc, self.dropped)
        if self._lines:
            if self._size >= ACCESS_LOG_FLUSH_BYTES:
                self._flush()
            elif self._timer is None:
                self._timer = self.loop.call_later(ACCESS_LOG_FLUSH_S, self._flush)

    # -- SIGUSR1 and shutdown -------------------------------------------------------------
    def reopen(self) -> None:
        """Open the path again (logrotate moved the file away), after the writes queued."""
        if self.target != STDOUT:
            self._executor.submit(self._reopen)

    def _reopen(self) -> None:
        try:
            fd = _open(self.target)
        except OSError as exc:
            log.error("access log %s: reopen failed (%s); still writing the old file",
                      self.target, exc)
            return
        old, self._fd = self._fd, fd
        os.close(old)
        log.info("access log %s reopened", self.target)

    async def close(self) -> None:
        """Write everything queued, then close the file."""
        while self._lines or self._writing is not None:
            if self._writing is None:
                self._flush()
            writing = self._writing
            if writing is not None:
                await asyncio.wait([asyncio.wrap_future(writing)])  # its error: _written's
                await asyncio.sleep(0)  # let _written run (it is scheduled, not inline)
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._executor.shutdown(wait=True)
        if self.target != STDOUT:
            os.close(self._fd)
