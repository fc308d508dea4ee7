"""The JSON access log: one line per finished request, written off the event loop.

``access_log: off`` (the default), ``stdout``, or a file path. Each line is an orjson
object built from the request's meter row: request id, key id (the key's public id,
never its secret), route, upstream, model, status, outcome, timings, tokens, cost.

The hot path only encodes the line and appends it to a list. Every
``ACCESS_LOG_FLUSH_S`` (or sooner once ``ACCESS_LOG_FLUSH_BYTES`` wait) the list is
joined and put on a queue that a thread of the log's own writes out, so a slow disk or
a stalled stdout pipe never blocks a stream, and a flush costs the loop one C call
(no future, no wake-up back to the loop). While writes are stuck at most
``ACCESS_LOG_MAX_PENDING_BYTES`` wait; lines beyond are dropped and counted
(``sidecar_access_log_dropped_total``). A file is opened ``O_APPEND``: the workers of
``workers: N`` share it, and each write (whole lines) lands in one piece.

SIGUSR1 reopens the file (after logrotate renamed it); the reopen goes through the same
queue, in order with the writes, so no line goes to a closed descriptor.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from typing import TYPE_CHECKING, Final

import orjson

if TYPE_CHECKING:
    from sidecar.meter import MeterRecord

log = logging.getLogger("sidecar.access_log")

STDOUT: Final = "stdout"
# Lines reach the log at most this long after their request ended (seconds) ...
ACCESS_LOG_FLUSH_S: Final = 1.0
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


_REOPEN: Final = (b"", -1)  # on the queue: reopen the file
# How long shutdown waits for the writer thread to write what is queued (seconds).
ACCESS_LOG_CLOSE_TIMEOUT_S: Final = 10.0


class AccessLog:
    def __init__(self, target: str, loop: asyncio.AbstractEventLoop) -> None:
        self.target = target
        self.loop = loop
        # Opened here, so a path that cannot be written stops the start with its reason.
        self._fd = 1 if target == STDOUT else _open(target)
        # (joined lines, how many) to write; _REOPEN; None: stop.
        self._queue: queue.SimpleQueue[tuple[bytes, int] | None] = queue.SimpleQueue()
        self._lines: list[bytes] = []
        self._size = 0  # bytes in _lines
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        # Pending bytes without a lock: the loop only adds to `queued`, the thread only
        # to `done` (lines written or dropped); each int is replaced whole.
        self._queued_bytes = 0
        self._done_bytes = 0
        self._done_lines = 0  # the thread's: lines written or failed
        self._failed_lines = 0  # the thread's: lines of writes that failed
        self._dropped_here = 0  # the loop's: lines past the pending bound, or after close
        self._last_error_log = -ACCESS_LOG_ERROR_INTERVAL_S
        self._thread = threading.Thread(target=self._run, name="sidecar-access-log",
                                        daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        return self._dropped_here + self._failed_lines

    @property
    def written(self) -> int:
        return self._done_lines - self._failed_lines

    # -- the hot path ---------------------------------------------------------------------
    def write(self, row: MeterRecord) -> None:
        """Queue the row's line. Never blocks, never raises, never awaits."""
        if self._queued_bytes - self._done_bytes + self._size >= ACCESS_LOG_MAX_PENDING_BYTES:
            self._dropped_here += 1
            return
        line = line_of(row)
        self._lines.append(line)
        self._size += len(line)
        if self._size >= ACCESS_LOG_FLUSH_BYTES:
            self._flush()
        elif self._timer is None:
            self._timer = self.loop.call_later(ACCESS_LOG_FLUSH_S, self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lines = self._lines
        if not lines:
            return
        self._lines = []
        n, size = len(lines), self._size
        self._size = 0
        if self._closed:  # a row settled after shutdown closed the log
            self._dropped_here += n
            return
        self._queued_bytes += size
        self._queue.put((b"".join(lines), n))

    # -- the writer thread ----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if item is _REOPEN:
                self._reopen()
                continue
            data, n = item
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError as exc:
                self._failed_lines += n
                now = time.monotonic()
                if now - self._last_error_log >= ACCESS_LOG_ERROR_INTERVAL_S:
                    self._last_error_log = now
                    log.error("access log %s: write failed (%s); %d lines dropped so far",
                              self.target, exc, self._failed_lines)
            self._done_lines += n
            self._done_bytes += len(data)

    # -- SIGUSR1 and shutdown -------------------------------------------------------------
    def reopen(self) -> None:
        """Open the path again (logrotate moved the file away), after the writes queued."""
        if self.target != STDOUT and not self._closed:
            self._flush()
            self._queue.put(_REOPEN)

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
        """Write everything queued (up to ACCESS_LOG_CLOSE_TIMEOUT_S), then close the file."""
        if self._closed:
            return
        self._flush()
        self._closed = True
        self._queue.put(None)
        await self.loop.run_in_executor(None, self._thread.join, ACCESS_LOG_CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            log.error("access log %s: writes still stuck after %.0fs; closing anyway",
                      self.target, ACCESS_LOG_CLOSE_TIMEOUT_S)
        elif self.target != STDOUT:
            os.close(self._fd)
