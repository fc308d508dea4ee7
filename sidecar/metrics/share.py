"""Workers' figures in one scrape: each worker publishes its samples to a file.

With ``workers: N`` the supervisor makes a private directory (``SIDECAR_METRICS_DIR``)
and gives each worker a slot (``SIDECAR_WORKER_SLOT``, 0..N-1). Every
``SHARE_INTERVAL_S`` a worker writes ``slot-<i>.json`` (atomically: a temporary file
renamed over it), from a timer, never from a request. A scrape is answered by
whichever worker the kernel hands the connection to: its own live figures plus the
other slots' files, so the other workers' part is at most ``SHARE_INTERVAL_S`` old.

A worker that crashed and was restarted in the same slot reads its predecessor's
file at start and carries its counters and histograms on (the process's counters
never go backwards); its gauges are not carried (they described a dead process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Final

from sidecar.metrics.samples import Samples, from_json, merge, to_json

log = logging.getLogger("sidecar.metrics")

ENV_METRICS_DIR: Final = "SIDECAR_METRICS_DIR"
ENV_WORKER_SLOT: Final = "SIDECAR_WORKER_SLOT"
ENV_WORKERS: Final = "SIDECAR_WORKERS"
# How often a worker publishes its figures for the others' scrapes (seconds).
SHARE_INTERVAL_S: Final = 1.0


def slot_file(directory: str, slot: int) -> str:
    return os.path.join(directory, f"slot-{slot}.json")


def read_samples(path: str) -> Samples | None:
    try:
        with open(path, "rb") as f:
            return from_json(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("metrics: cannot read %s: %s", path, exc)
        return None


class Share:
    """One worker's side: publish its samples, read the other slots'."""

    def __init__(self, directory: str, slot: int, workers: int) -> None:
        self.directory = directory
        self.slot = slot
        self.workers = workers
        self.path = slot_file(directory, slot)
        # The predecessor's counters and histograms (a restarted worker), else empty.
        self.baseline: Samples = {}
        self._handle: asyncio.TimerHandle | None = None
        self._source: Callable[[], Samples] | None = None

    @classmethod
    def from_env(cls) -> Share | None:
        directory = os.environ.get(ENV_METRICS_DIR)
        slot = os.environ.get(ENV_WORKER_SLOT)
        workers = os.environ.get(ENV_WORKERS)
        if not directory or slot is None or workers is None:
            return None
        return cls(directory, int(slot), int(workers))

    def load_baseline(self) -> None:
        previous = read_samples(self.path)
        if previous:
            merge(self.baseline, previous, gauges=False)

    def start(self, loop: asyncio.AbstractEventLoop, source: Callable[[], Samples]) -> None:
        """Publish ``source()`` now and every SHARE_INTERVAL_S from now on."""
        self._source = source
        self._publish(loop)

    def _publish(self, loop: asyncio.AbstractEventLoop) -> None:
        self.write()
        self._handle = loop.call_later(SHARE_INTERVAL_S, self._publish, loop)

    def write(self) -> None:
        if self._source is None:
            return
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(to_json(self._source()))
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("metrics: cannot publish %s: %s", self.path, exc)
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def others(self) -> list[Samples]:
        """The other workers' last published samples."""
        out = []
        for slot in range(self.workers):
            if slot != self.slot:
                s = read_samples(slot_file(self.directory, slot))
                if s is not None:
                    out.append(s)
        return out

    def close(self) -> None:
        """Stop publishing, after a last write (the final counts after the drain)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.write()
