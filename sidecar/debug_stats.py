"""A periodic one-line health report for soak runs: ``SIDECAR_DEBUG_STATS=SECONDS``.

Memory and fds can be read from /proc by anyone, but the number of live asyncio tasks,
client connections and meter counters can only be seen from inside the process. With the
variable set (to a period in seconds, e.g. ``5``) the server logs, at that period, one
line of ``key=value`` pairs to stderr (``bench soak`` parses them):

    sidecar-stats t=12.0 tasks=31 conns=24 meter_written=1820 meter_spilled=0 ...

Unset (the default) it costs nothing: no task is started. Off the hot path: one timer
per period, a walk over the loop's tasks (a set of weak references) and a few counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Callable

ENV_DEBUG_STATS = "SIDECAR_DEBUG_STATS"
# A shorter period would make the report itself a load on a busy loop.
MIN_PERIOD_S = 0.2
STATS_PREFIX = "sidecar-stats"


def period_from_env(environ: dict[str, str] | None = None) -> float | None:
    """The report period in seconds, or None when unset, empty, not a number or <= 0."""
    raw = (os.environ if environ is None else environ).get(ENV_DEBUG_STATS, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    if value != value or value <= 0:  # NaN or not positive: off
        return None
    return max(MIN_PERIOD_S, value)


def format_line(elapsed: float, counters: dict[str, int]) -> str:
    parts = " ".join(f"{k}={v}" for k, v in counters.items())
    return f"{STATS_PREFIX} t={elapsed:.1f} {parts}"


def parse_line(line: str) -> dict[str, float] | None:
    """A report line back into numbers (what ``format_line`` wrote), else None."""
    line = line.strip()
    if not line.startswith(STATS_PREFIX + " "):
        return None
    out: dict[str, float] = {}
    for item in line[len(STATS_PREFIX) + 1 :].split():
        key, sep, value = item.partition("=")
        if not sep:
            return None
        try:
            out[key] = float(value)
        except ValueError:
            return None
    return out


async def report_forever(period: float, counters: Callable[[], dict[str, int]]) -> None:
    """Log ``counters()`` with the live task count every ``period`` seconds until cancelled."""
    start = time.monotonic()
    while True:
        await asyncio.sleep(period)
        values = {"tasks": len(asyncio.all_tasks())}
        values.update(counters())
        with contextlib.suppress(OSError, ValueError):  # stderr closed: nothing to report to
            print(format_line(time.monotonic() - start, values), file=sys.stderr, flush=True)
