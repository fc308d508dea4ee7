"""The meter: one SQLite row per proxied request, written off the hot path.

The hot path calls :meth:`Meter.submit`, which only appends to a bounded
queue; one writer task per process drains the queue into SQLite (WAL) in
batches, as multi-row INSERTs. Nothing is dropped silently: a record that finds the queue full, or
a batch the database refuses, is appended as one JSON line to a spill file, which
the writer replays into the table as soon as a write succeeds again (retried about
once a second while idle), as does every :meth:`Meter.start`.

Requests in flight are journalled (``journal``: one line per request, per process,
closed, in batches, once its row is committed or spilled); what a dead process left open is
recorded once as ``outcome='interrupted'`` by the next start (``recovery``).

Several worker processes write the same database, each through its own Meter,
and by default share the same spill file. That sharing is made safe by:

* schema creation/migration inside ``BEGIN IMMEDIATE`` keyed on
  ``PRAGMA user_version``, so exactly one process migrates;
* spill appends under ``flock`` on the spill file, re-checking after the lock
  that the path still names the open file (a replayer may have renamed it);
* replay claimed by an ``flock`` on ``<spill>.lock`` and done by renaming the
  spill file away first, so appenders start a fresh file meanwhile.

Delivery is at-least-once only across a crash between a replay's COMMIT and the
removal of the replayed file (those rows would be replayed twice); everywhere
else a record is written exactly once.

This package only re-exports; each part lives in the module named for it.
"""

from sidecar.meter.record import MeterRecord, Outcome, UsageSource
from sidecar.meter.schema import (
    COLUMNS,
    MIGRATIONS,
    ROWS_PER_INSERT,
    SMALL_INSERT_ROWS,
    TABLE,
    migrate,
    schema_version,
)
from sidecar.meter.schema import _record_row as _record_row
from sidecar.meter.spill import CLAIM_SUFFIX, LOCK_SUFFIX, REJECTED_SUFFIX, REPLAY_CHUNK_ROWS
from sidecar.meter.spill import _claim_spill_files as _claim_spill_files
from sidecar.meter.spill import _encode as _encode
from sidecar.meter.spill import _SpillFile as _SpillFile
from sidecar.meter.writer import (
    BUSY_TIMEOUT_MS,
    OVERFLOW_LOG_INTERVAL_S,
    PAGE_CACHE_KIB,
    WAL_RETRY_S,
    Meter,
    MeterError,
    MeterStats,
    enable_wal,
)

# The `_name as _name` imports above are private names the tests use, re-exported
# explicitly; __all__ is the public surface.
__all__ = [
    "BUSY_TIMEOUT_MS",
    "CLAIM_SUFFIX",
    "COLUMNS",
    "LOCK_SUFFIX",
    "MIGRATIONS",
    "OVERFLOW_LOG_INTERVAL_S",
    "PAGE_CACHE_KIB",
    "REJECTED_SUFFIX",
    "REPLAY_CHUNK_ROWS",
    "ROWS_PER_INSERT",
    "SMALL_INSERT_ROWS",
    "TABLE",
    "WAL_RETRY_S",
    "Meter",
    "MeterError",
    "MeterRecord",
    "MeterStats",
    "Outcome",
    "UsageSource",
    "enable_wal",
    "migrate",
    "schema_version",
]
