"""File descriptors: the process limit, the client connections it can carry, and one
log line per burst when they run out.

uvloop (libuv) never reports EMFILE on accept to Python: libuv's "EMFILE trick"
accepts and closes the waiting connections itself, so a sidecar out of descriptors
silently drops clients. The sidecar therefore stays below the limit: at start the
soft RLIMIT_NOFILE is raised to the hard one (as Nginx's worker_rlimit_nofile does),
and client connections past what the limit can carry (each may hold one provider
connection, beside the idle pools and a reserve) are answered 503 and closed, with
one error line when such a burst starts and one when it ends. A provider connect
that still fails with EMFILE/ENFILE is logged the same way.
"""

from __future__ import annotations

import errno
import logging
import resource
from typing import Final

# Descriptors kept for everything that is not a client or provider connection: the
# listeners, the meter database, its journal and spill, log files, Redis, the keys
# database, health checks.
FD_RESERVE: Final = 64
# A burst ends when no new event came for this long (seconds).
BURST_QUIET_S: Final = 5.0
OUT_OF_FILES: Final = frozenset({errno.EMFILE, errno.ENFILE})


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else soft
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return soft if soft != resource.RLIM_INFINITY else 1 << 30
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    except (ValueError, OSError):
        return soft


def nofile_limit() -> int:
    """The soft RLIMIT_NOFILE in force (a large number when unlimited)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 30 if soft == resource.RLIM_INFINITY else soft


def client_budget(nofile: int, pool_idle: int, reserve: int = FD_RESERVE) -> int:
    """Client connections ``nofile`` descriptors carry: each client may hold one
    provider connection at a time, beside ``pool_idle`` idle provider connections and
    the reserve. At least 1."""
    return max(1, (nofile - reserve - pool_idle) // 2)


class BurstLog:
    """One line when a burst of like events starts, one with the count when it ends."""

    __slots__ = ("count", "last", "log", "what")

    def __init__(self, log: logging.Logger, what: str) -> None:
        self.log = log
        self.what = what
        self.count = 0
        self.last = 0.0

    def hit(self, now: float, detail: str) -> None:
        if self.count == 0:
            self.log.error("%s: %s (logged once per burst)", self.what, detail)
        self.count += 1
        self.last = now

    def end_if_quiet(self, now: float) -> None:
        if self.count and now - self.last >= BURST_QUIET_S:
            self.log.warning("%s: burst over, %d in it", self.what, self.count)
            self.count = 0
