"""The crash journal: which requests are in flight, kept in a file so kill -9 cannot lose them.

Each serving process appends one line per request to a journal file of its own when the
request's first attempt starts (before a byte goes to the provider), and one short close
line once the request's meter row is committed (or spilled). A process that dies by
kill -9, OOM or a crash leaves a journal whose open lines are the requests it had in
flight or had not committed yet (plus, closes being batched, some it had committed);
the next meter start (of any worker sharing the directory) records each of the first
kind once as ``outcome='interrupted'`` (see ``recovery.py``).

Cost and durability: a line is one ``os.write`` to a file opened ``O_APPEND``, without
fsync. The write lands in the kernel's page cache before the request is sent upstream,
so it survives the death of the process (kill -9, OOM kill, a segfault) but not a power
loss or a kernel crash, which may drop the last seconds of lines (as SQLite's
``synchronous = NORMAL`` WAL may drop the last commits). Closes are lazy: collected once
the row is committed and written CLOSE_BATCH at a time in one ``os.write`` (or dropped
by a compaction, which keeps only open lines). Recovery looks every open entry up in the
table before inserting, so a close not yet written costs one lookup after a crash,
never a second row. In memory the journal keeps each open request's line (for
compaction): about 250 bytes per request in flight.

Liveness: a process holds an ``flock`` on its journal for as long as it lives; the
kernel drops it when the process dies, however it dies. A file nobody holds is an
orphan. Journals are compacted (``rotate_bytes``): the still-open lines are written to a
new file (created under a temporary name, locked, then renamed into place) and the old
file is removed, so a journal holds about what is in flight, not the whole history.

Line format (one line each, ``\\n``-terminated):

* admission: a JSON array ``[seq, ts_ms, request_id, route, upstream, model, key_id,
  bytes_in, stream, api_format, path, tier, upstream_model]``;
* close: ``-<seq>``.

``seq`` numbers the process's requests; it is unique within one process's files, whose
names share the ``<pid>-<start ns>`` prefix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import orjson

from sidecar.meter.record import MeterRecord

if TYPE_CHECKING:
    from sidecar.context import RequestContext

log = logging.getLogger("sidecar.meter")

SUFFIX: Final = ".journal"
TMP_SUFFIX: Final = ".journal-tmp"  # a compaction in progress; never read by recovery
# Longest model name kept in a journal line (the one field a client writes freely):
# the row of an interrupted request needs the name, not a megabyte put in "model".
MAX_FIELD_CHARS: Final = 256
# Closes written per os.write (see the module docstring: a close may be late, never wrong).
CLOSE_BATCH: Final = 128
# The prompt estimate of an interrupted request: the request body's bytes over this
# (the tokenizer's own no-tiktoken fallback ratio). The body itself is not journalled.
BYTES_PER_TOKEN: Final = 4


# --- the pure core: lines in, entries out ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One journalled request (an admission line)."""

    seq: int
    ts_ms: int
    request_id: str
    route: str
    upstream: str
    model: str | None
    key_id: str | None
    bytes_in: int
    stream: bool
    api_format: str
    path: str
    tier: str | None
    upstream_model: str | None


def prompt_estimate(bytes_in: int) -> int:
    """Tokens an interrupted request's prompt is counted at: ceil(body bytes / 4)."""
    return math.ceil(bytes_in / BYTES_PER_TOKEN)


def admission_line(seq: int, ctx: RequestContext, request_id: str) -> bytes:
    """The request's line. Called once per request: one tuple, one orjson call.

    The newline is added by a concatenation, not orjson's OPT_APPEND_NEWLINE, on
    purpose: the copy is right-sized, while the bytes orjson returns keep its whole
    4 KiB output buffer allocated (measured with tracemalloc, orjson 3.13), and the
    line is kept for every request in flight (for compaction).
    """
    model = ctx.model
    if model is not None and len(model) > MAX_FIELD_CHARS:
        model = model[:MAX_FIELD_CHARS]
    return orjson.dumps((seq, ctx.ts_ms, request_id, ctx.route, ctx.upstream, model,
                         ctx.key_id, ctx.bytes_in, ctx.stream, ctx.api_format, ctx.path,
                         ctx.tier, ctx.upstream_model)) + b"\n"


def close_lines(seqs: Iterable[int]) -> bytes:
    return b"".join([b"-%d\n" % s for s in seqs])


def _entry(obj: Any) -> Entry | None:
    if not isinstance(obj, list) or len(obj) != 13:
        return None
    try:
        e = Entry(*obj)
    except TypeError:
        return None
    # Every field checked: a line that would not bind as a row must not reach the
    # INSERT, where it would fail the whole recovery again at every retry.
    ok = (type(e.seq) is int and type(e.ts_ms) is int and type(e.bytes_in) is int
          and e.bytes_in >= 0 and type(e.stream) is bool
          and all(type(v) is str for v in (e.request_id, e.route, e.upstream, e.api_format,
                                            e.path))
          and all(v is None or type(v) is str for v in (e.model, e.key_id, e.tier,
                                                         e.upstream_model)))
    return e if ok else None


def parse(data: bytes) -> tuple[dict[int, Entry], set[int], int]:
    """One process's journal bytes -> (admitted by seq, closed seqs, unreadable lines).

    A torn last line (power loss) or any other line that is not one of the two forms
    is counted and skipped: it cannot name a request.
    """
    admitted: dict[int, Entry] = {}
    closed: set[int] = set()
    bad = 0
    for line in data.split(b"\n"):
        if not line:
            continue
        if line[:1] == b"-":
            try:
                closed.add(int(line[1:]))
            except ValueError:
                bad += 1
            continue
        try:
            entry = _entry(orjson.loads(line))
        except orjson.JSONDecodeError:
            entry = None
        if entry is None:
            bad += 1
        else:
            admitted[entry.seq] = entry
    return admitted, closed, bad


def open_entries(admitted: dict[int, Entry], closed: set[int]) -> list[Entry]:
    """The requests a dead process never closed, oldest first."""
    return sorted((e for seq, e in admitted.items() if seq not in closed),
                  key=lambda e: (e.ts_ms, e.seq))


INTERRUPTED_ERROR: Final = "the sidecar process died with the request in flight (journal)"


def interrupted_record(e: Entry) -> MeterRecord:
    """The row of a request its process died with: the prompt estimated from its size,
    no completion known (what streamed before the crash is not journalled)."""
    prompt = prompt_estimate(e.bytes_in)
    return MeterRecord(
        ts_ms=e.ts_ms, request_id=e.request_id, key_id=e.key_id, route=e.route,
        upstream=e.upstream, model=e.model, status=0, stream=e.stream,
        prompt_tokens=prompt, completion_tokens=0, total_tokens=prompt,
        usage_source="estimated", usage_approx=True, outcome="interrupted",
        duration_ms=0.0, bytes_in=e.bytes_in, attempts=1, api_format=e.api_format,
        path=e.path, error=INTERRUPTED_ERROR, upstream_model=e.upstream_model, tier=e.tier,
    )


def owner_of(name: str) -> str:
    """The process key of a journal file name: ``<pid>-<start ns>`` (a compacted file of
    the same process adds ``-<generation>``)."""
    base = os.path.basename(name)
    base = base[: -len(SUFFIX)] if base.endswith(SUFFIX) else base
    parts = base.split("-")
    return "-".join(parts[:2])


# --- the I/O shell ------------------------------------------------------------------------


def _lock_nb(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    return True


class Journal:
    """This process's journal file: admissions, closes, compaction.

    Used from the event loop only (admit from the proxy, closed from the meter writer).
    A failed write is logged once and turns the journal off for the rest of the process:
    the journal must never fail a request.
    """

    def __init__(self, directory: str, rotate_bytes: int) -> None:
        self.directory = directory
        self.rotate_bytes = rotate_bytes
        self._key = f"{os.getpid()}-{time.time_ns()}"
        self._generation = 0
        self._fd: int | None = None
        self.path = ""
        self._size = 0
        self._seq = 0
        # seq -> admission line of every request not closed yet (what compaction keeps).
        self._open: dict[int, bytes] = {}
        self._closes: list[int] = []  # closed, not written yet (CLOSE_BATCH at a time)
        self.closed = 0
        self.compactions = 0

    @property
    def active(self) -> bool:
        return self._fd is not None

    @property
    def open_count(self) -> int:
        return len(self._open)

    def open(self) -> None:
        """Create this process's file (locked for its whole life)."""
        os.makedirs(self.directory, exist_ok=True)
        self._fd, self.path = self._create(b"")
        self._size = 0

    def _create(self, data: bytes) -> tuple[int, str]:
        """A new locked file holding ``data``, put in place by a rename so that recovery,
        which only reads ``*.journal`` files it can lock, never sees it half-made."""
        name = f"{self._key}-{self._generation}"
        self._generation += 1
        tmp = os.path.join(self.directory, name + TMP_SUFFIX)
        final = os.path.join(self.directory, name + SUFFIX)
        fd = os.open(tmp, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if data:
                _write_all(fd, data)
            os.rename(tmp, final)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return fd, final

    def admit(self, ctx: RequestContext, request_id: str) -> int:
        """Journal one request before it goes upstream; its seq (0: not journalled)."""
        fd = self._fd
        if fd is None:
            return 0
        self._seq = seq = self._seq + 1
        # admission_line, inlined: a Python call is ~1,500 instructions, once per request.
        model = ctx.model
        if model is not None and len(model) > MAX_FIELD_CHARS:
            model = model[:MAX_FIELD_CHARS]
        line = orjson.dumps((seq, ctx.ts_ms, request_id, ctx.route, ctx.upstream, model,
                             ctx.key_id, ctx.bytes_in, ctx.stream, ctx.api_format, ctx.path,
                             ctx.tier, ctx.upstream_model)) + b"\n"
        try:
            os.write(fd, line)  # O_APPEND, a few hundred bytes: one whole write
        except OSError as exc:
            self._fail(exc)
            return 0
        self._open[seq] = line
        self._size += len(line)
        return seq

    @property
    def admitted(self) -> int:
        return self._seq

    def closed_records(self, records: Sequence[MeterRecord]) -> None:
        """Close the journalled requests of a committed (or spilled) batch of rows."""
        if self._fd is None:
            return
        # One loop, no helper calls: this runs for every committed meter batch.
        pop = self._open.pop
        closes = self._closes
        n = len(closes)
        for r in records:
            # A plain MeterRecord (not a request's context) has no journal line.
            seq = getattr(r, "journal_seq", 0)
            if seq and pop(seq, None) is not None:
                closes.append(seq)
        self.closed += len(closes) - n
        if len(closes) >= CLOSE_BATCH:
            self.write_closes()

    def close_seqs(self, seqs: Iterable[int]) -> None:
        """Close these requests (each once: a seq not open is ignored); the lines are
        written once CLOSE_BATCH are waiting."""
        if self._fd is None:
            return
        pop = self._open.pop
        closes = self._closes
        n = len(closes)
        closes.extend([s for s in seqs if pop(s, None) is not None])
        self.closed += len(closes) - n
        if len(closes) >= CLOSE_BATCH:
            self.write_closes()

    def write_closes(self) -> None:
        """Write the closes collected so far (one os.write); compact when due."""
        fd = self._fd
        if fd is None or not self._closes:
            return
        data = close_lines(self._closes)
        self._closes = []
        try:
            _write_all(fd, data)
        except OSError as exc:
            self._fail(exc)
            return
        self._size += len(data)
        if self._size >= self.rotate_bytes:
            self.compact()

    def compact(self) -> None:
        """Start a new file with only the open lines, then remove the old one."""
        old_fd, old_path = self._fd, self.path
        if old_fd is None:
            return
        data = b"".join(self._open.values())
        try:
            self._fd, self.path = self._create(data)
        except OSError as exc:
            log.error("meter journal: compaction failed (%s); keeping %s", exc, old_path)
            self._size = 0  # retried after another rotate_bytes, not on every batch
            return
        self._size = len(data)
        self._closes = []  # the new file has no line of theirs to close
        self.compactions += 1
        # Both files exist for a moment: a crash here leaves two orphans whose open
        # lines are the same requests, which recovery merges by seq.
        with contextlib.suppress(OSError):
            os.unlink(old_path)
        os.close(old_fd)

    def shutdown(self) -> None:
        """A clean stop: remove the file when nothing is open, else leave it for recovery
        (a row that could neither be written nor spilled is then recorded as interrupted)."""
        if self._open:
            self.write_closes()  # fewer lookups for the next start's recovery
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if not self._open:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        else:
            log.warning("meter journal: %d requests still open at shutdown; %s kept for the "
                        "next start to record them as interrupted", len(self._open), self.path)
        os.close(fd)

    def _fail(self, exc: OSError) -> None:
        log.error("meter journal: cannot write %s (%s); crash journal off for this process",
                  self.path, exc)
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # the file stays: its open lines are recovered after we exit


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


@dataclass(slots=True)
class Orphans:
    """Journal files no live process holds, locked by us while we recover them."""

    fds: list[int]
    paths: list[str]
    entries: list[Entry]
    bad_lines: int

    def release(self, remove: bool) -> None:
        """Unlock (after removing the files, when recovered: removed while still locked,
        so no other recoverer reads them in between)."""
        if remove:
            for p in self.paths:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def orphan_files_exist(directory: str, own: str) -> bool:
    """Cheap look (no locking): are there journal files besides our own?"""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return False
    own_name = os.path.basename(own)
    return any((n.endswith(SUFFIX) and n != own_name) or n.endswith(TMP_SUFFIX) for n in names)


def claim_orphans(directory: str) -> Orphans:
    """Lock every journal file no live process holds and read its open entries.

    A process's files (a compaction may leave two) are merged by seq. Half-made
    compaction files (``*.journal-tmp``) of dead processes are removed: the file they
    were copied from is still in place.
    """
    fds: list[int] = []
    paths: list[str] = []
    by_owner: dict[str, tuple[dict[int, Entry], set[int]]] = {}
    bad = 0
    for p in sorted(glob.glob(os.path.join(glob.escape(directory), "*" + TMP_SUFFIX))):
        with contextlib.suppress(OSError):
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _lock_nb(fd):
                    os.unlink(p)
            finally:
                os.close(fd)
    for p in sorted(glob.glob(os.path.join(glob.escape(directory), "*" + SUFFIX))):
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        if not _lock_nb(fd):
            os.close(fd)  # its process is alive
            continue
        if not os.path.exists(p):  # recovered and removed between our glob and our lock
            os.close(fd)
            continue
        fds.append(fd)
        paths.append(p)
        with open(fd, "rb", closefd=False) as f:
            data = f.read()
        admitted, closed, n_bad = parse(data)
        bad += n_bad
        adm, clo = by_owner.setdefault(owner_of(p), ({}, set()))
        adm.update(admitted)
        clo.update(closed)
    entries: list[Entry] = []
    for adm, clo in by_owner.values():
        entries.extend(open_entries(adm, clo))
    return Orphans(fds, paths, entries, bad)
