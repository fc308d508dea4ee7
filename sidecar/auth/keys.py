"""API keys: the SQLite store the CLI writes, the index the request path reads.

* ``KeyStore`` is the file, written by ``sidecar keys create|revoke|rotate`` with
  plain (synchronous) sqlite3: the CLI is the only writer and has no event loop.
* ``KeyIndex`` is every key read once into a dict keyed by the SHA-256 of the
  secret, so the hot path does one hash and one dict get per request and never
  touches the database.
* ``KeyWatcher`` keeps a running sidecar current: it checks the file cheaply every
  interval and rebuilds the index in a worker thread when it changed.

Secrets exist in clear only in ``create``/``rotate``'s return value (printed once by
the CLI) and in the request that presents them. The file holds their hashes only;
nothing here logs, prints or puts a secret in an exception message.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import secrets
import sqlite3
import stat
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sidecar.errors import SidecarError

try:
    # CPython's own SHA-256: the same digest as hashlib's OpenSSL one, without the
    # EVP method fetch OpenSSL 3 does on every constructor call (~1.6k instructions of
    # a ~6k lookup, on every authenticated request). Named _sha2 from Python 3.12.
    from _sha256 import sha256 as _sha256  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - other interpreters
    try:
        from _sha2 import sha256 as _sha256  # type: ignore[import-not-found]
    except ImportError:
        _sha256 = hashlib.sha256

log = logging.getLogger("sidecar.auth")

DEFAULT_KEYS_DB: Final = "./keys.db"
KEYS_DB_ENV: Final = "SIDECAR_KEYS_DB"

# Secrets: a recognisable prefix (secret scanners and humans can tell what leaked)
# and 32 random bytes, URL-safe base64 (43 characters, 256 bits of entropy).
SECRET_PREFIX: Final = "sk-sc-"
SECRET_BYTES: Final = 32
# Public ids: "key_" and 12 hex digits (48 random bits, unrelated to the secret).
# Safe for logs, the meter's key_id and the CLI; a collision is retried on insert.
KEY_ID_PREFIX: Final = "key_"
KEY_ID_BYTES: Final = 6
_ID_ATTEMPTS: Final = 8

BUDGET_PERIODS: Final = ("day", "month")
MAX_NAME_CHARS: Final = 200

TABLE: Final = "api_keys"
# PRAGMA application_id of a keys database ("SCKY"): a file that carries another id,
# or carries none but already has tables (a meter DB named by mistake), is refused
# rather than written into.
APPLICATION_ID: Final = 0x53434B59
BUSY_TIMEOUT_S: Final = 5.0
FILE_MODE: Final = 0o600

# MIGRATIONS[i] takes the file from user_version i to i + 1. Append only (files in
# the field have run the released steps); only add columns, never rename them.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        f"""CREATE TABLE IF NOT EXISTS {TABLE} (
            id TEXT PRIMARY KEY,
            secret_sha256 BLOB NOT NULL UNIQUE,
            name TEXT NOT NULL,
            tier TEXT,
            tpm INTEGER,
            rpm INTEGER,
            budget_usd REAL,
            budget_period TEXT,
            created_ms INTEGER NOT NULL,
            revoked_ms INTEGER,
            rotated_ms INTEGER
        )""",
    ),
)

# ApiKey's fields in order, as selected from the table.
_COLUMNS: Final = (
    "id, name, tier, tpm, rpm, budget_usd, budget_period, created_ms, revoked_ms, rotated_ms"
)


class KeyStoreError(SidecarError):
    """The keys database cannot be opened, read or written (messages name the path,
    never a secret)."""


class KeyNotFound(KeyStoreError):
    """No key has that id."""


class KeyRevoked(KeyStoreError):
    """The key is revoked, so it cannot be rotated."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One key's public record: safe to log and print (it holds no secret)."""

    id: str  # public id, e.g. "key_9f2c4e1a7b3d": the meter's key_id
    name: str
    tier: str | None
    tpm: int | None  # tokens per minute override
    rpm: int | None  # requests per minute override
    budget_usd: float | None
    budget_period: str | None  # "day" | "month" (None when no budget)
    created_ms: int
    revoked_ms: int | None
    rotated_ms: int | None = None  # when the secret was last replaced

    @property
    def revoked(self) -> bool:
        return self.revoked_ms is not None


def hash_secret(secret: bytes) -> bytes:
    """The stored form of a secret: its SHA-256 digest.

    A plain hash is right here, with no salt and no slow KDF (bcrypt, scrypt, argon2):
    those exist because human passwords are guessable, so an attacker holding the
    hashes can try likely candidates. Our secrets are 256 random bits from
    ``secrets``; there is nothing to guess, and a salt would only stop the O(1)
    lookup (hash the presented secret, one dict get) that the request path needs.
    Looking a digest up in a dict does not leak anything usable through timing
    either: an attacker cannot choose inputs whose digests share a prefix with one.
    """
    return hashlib.sha256(secret).digest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def _new_id() -> str:
    return KEY_ID_PREFIX + secrets.token_hex(KEY_ID_BYTES)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _row_key(row: Sequence[Any]) -> ApiKey:
    return ApiKey(*row)


def check_settings(
    name: str,
    tier: str | None,
    tpm: int | None,
    rpm: int | None,
    budget_usd: float | None,
    budget_period: str | None,
) -> None:
    """ValueError (naming the setting) unless these make a valid key."""
    if not name.strip():
        raise ValueError("name must not be empty")
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"name must be at most {MAX_NAME_CHARS} characters")
    if any(not c.isprintable() for c in name):
        raise ValueError("name must not contain control characters")
    if tier is not None and (not tier.strip() or any(not c.isprintable() for c in tier)):
        raise ValueError("tier must be a non-empty name without control characters")
    for label, value in (("tpm", tpm), ("rpm", rpm)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{label} must be a whole number")
        if value < 1:
            raise ValueError(f"{label} must be at least 1 (revoke the key to stop it)")
    if budget_usd is None:
        if budget_period is not None:
            raise ValueError("budget_period needs budget_usd")
        return
    if isinstance(budget_usd, bool) or not isinstance(budget_usd, int | float):
        raise ValueError("budget_usd must be a number")
    if not math.isfinite(budget_usd) or budget_usd <= 0:
        raise ValueError("budget_usd must be a finite number above 0")
    if budget_period is None:
        raise ValueError("budget_usd needs budget_period (day or month)")
    if budget_period not in BUDGET_PERIODS:
        raise ValueError(f"budget_period must be one of {', '.join(BUDGET_PERIODS)}")


def _check_id(key_id: str) -> None:
    # A secret pasted where an id belongs must not end up in an error message.
    if key_id.startswith(SECRET_PREFIX):
        raise KeyNotFound(
            "that is a key's secret, not its id; ids look like key_9f2c4e1a7b3d "
            "(see `sidecar keys list`)"
        )


def _create_private(path: str) -> None:
    """Create ``path`` 0600 if missing; tighten an existing file that others can read.

    SQLite creates the -wal and -shm files with the database file's own mode, so
    they are 0600 too whatever the umask (tests/test_keys.py checks it).
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        raise KeyStoreError(f"cannot open keys database {path}: {exc.strerror}") from exc
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            os.fchmod(fd, FILE_MODE)
            log.warning("keys database %s was mode %o; set to %o", path, mode, FILE_MODE)
    except OSError as exc:
        raise KeyStoreError(
            f"keys database {path} is readable by others and cannot be made 0600: "
            f"{exc.strerror}"
        ) from exc
    finally:
        os.close(fd)


def _tighten_companions(path: str) -> None:
    """Make a -wal/-shm left by another tool 0600 (SQLite's own are already)."""
    for companion in (path + "-wal", path + "-shm"):
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(os.stat(companion).st_mode) & 0o077:
                os.chmod(companion, FILE_MODE)


def _application_state(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """(application_id, user_version, number of tables) of an open database."""
    app = int(conn.execute("PRAGMA application_id").fetchone()[0])
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    tables = int(
        conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
    )
    return app, version, tables


def _foreign(path: str, app: int, tables: int) -> KeyStoreError | None:
    if app == APPLICATION_ID or (app == 0 and tables == 0):
        return None
    return KeyStoreError(f"{path} is not a sidecar keys database")


def _migrate(conn: sqlite3.Connection, path: str) -> None:
    """Bring the schema up to date; safe when two CLI processes race to do it
    (BEGIN IMMEDIATE takes the write lock before the version is read again).
    An up-to-date file is not written at all, so opening it changes nothing a
    KeyIndex.changed() would see."""
    app, version, tables = _application_state(conn)
    if app == APPLICATION_ID and version >= len(MIGRATIONS):
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        app, version, tables = _application_state(conn)
        foreign = _foreign(path, app, tables)
        if foreign is not None:
            raise foreign
        if app != APPLICATION_ID:
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")  # our own int
        for step in range(version, len(MIGRATIONS)):
            for stmt in MIGRATIONS[step]:
                conn.execute(stmt)
        if version < len(MIGRATIONS):
            conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    if version < len(MIGRATIONS):
        log.debug("keys database %s migrated v%d -> v%d", path, version, len(MIGRATIONS))


class KeyStore:
    """The keys file, for the CLI. Not for the request path (it blocks)."""

    def __init__(self, path: str, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn

    @classmethod
    def open(cls, path: str) -> KeyStore:
        """Open ``path``, creating it (mode 0600) and its schema when missing."""
        _create_private(path)
        try:
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as exc:
            raise KeyStoreError(f"cannot open keys database {path}: {exc}") from exc
        try:
            app, _, tables = _application_state(conn)
            foreign = _foreign(path, app, tables)
            if foreign is not None:
                raise foreign
            # WAL: the sidecar's reader never blocks a CLI write, nor the other way.
            conn.execute("PRAGMA journal_mode = WAL")
            _migrate(conn, path)
            _tighten_companions(path)
        except sqlite3.Error as exc:
            conn.close()
            raise KeyStoreError(f"cannot open keys database {path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return cls(path, conn)

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._conn.close()

    def _error(self, exc: sqlite3.Error) -> KeyStoreError:
        return KeyStoreError(f"keys database {self.path}: {exc}")

    def create(
        self,
        name: str,
        *,
        tier: str | None = None,
        tpm: int | None = None,
        rpm: int | None = None,
        budget_usd: float | None = None,
        budget_period: str | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key: its record and its secret (the only time the secret exists in
        clear; the file keeps its hash). ValueError for invalid settings."""
        check_settings(name, tier, tpm, rpm, budget_usd, budget_period)
        budget = None if budget_usd is None else float(budget_usd)
        for _ in range(_ID_ATTEMPTS):
            secret = new_secret()
            key = ApiKey(
                id=_new_id(),
                name=name,
                tier=tier,
                tpm=tpm,
                rpm=rpm,
                budget_usd=budget,
                budget_period=budget_period,
                created_ms=_now_ms(),
                revoked_ms=None,
            )
            try:
                self._conn.execute(
                    f"INSERT INTO {TABLE} (id, secret_sha256, name, tier, tpm, rpm, budget_usd,"
                    " budget_period, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (key.id, hash_secret(secret.encode()), key.name, key.tier, key.tpm,
                     key.rpm, key.budget_usd, key.budget_period, key.created_ms),
                )
            except sqlite3.IntegrityError:
                continue  # the random id is taken: draw another
            except sqlite3.Error as exc:
                raise self._error(exc) from exc
            return key, secret
        raise KeyStoreError(f"keys database {self.path}: no free key id after {_ID_ATTEMPTS} tries")

    def list(self, include_revoked: bool = True) -> list[ApiKey]:
        """Every key, oldest first (in creation order)."""
        where = "" if include_revoked else "WHERE revoked_ms IS NULL"
        try:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM {TABLE} {where} ORDER BY created_ms, rowid"
            ).fetchall()
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        return [_row_key(r) for r in rows]

    def get(self, key_id: str) -> ApiKey:
        """The key with this id; KeyNotFound if none."""
        _check_id(key_id)
        try:
            row = self._conn.execute(
                f"SELECT {_COLUMNS} FROM {TABLE} WHERE id = ?", (key_id,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        if row is None:
            raise KeyNotFound(f"no key with id {key_id!r} in {self.path}")
        return _row_key(row)

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key (its secret is then refused as revoked); the record, with
        revoked_ms set. Revoking a revoked key changes nothing. KeyNotFound if unknown."""
        _check_id(key_id)
        try:
            self._conn.execute(
                f"UPDATE {TABLE} SET revoked_ms = ? WHERE id = ? AND revoked_ms IS NULL",
                (_now_ms(), key_id),
            )
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        return self.get(key_id)

    def rotate(self, key_id: str) -> tuple[ApiKey, str]:
        """A new secret for the key (same id and settings); the old one stops working
        at once. KeyNotFound if unknown, KeyRevoked if revoked."""
        _check_id(key_id)
        secret = new_secret()
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                key = self.get(key_id)
                if key.revoked:
                    raise KeyRevoked(f"key {key_id} is revoked; create a new key instead")
                now = _now_ms()
                self._conn.execute(
                    f"UPDATE {TABLE} SET secret_sha256 = ?, rotated_ms = ? WHERE id = ?",
                    (hash_secret(secret.encode()), now, key_id),
                )
                self._conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        return ApiKey(
            id=key.id,
            name=key.name,
            tier=key.tier,
            tpm=key.tpm,
            rpm=key.rpm,
            budget_usd=key.budget_usd,
            budget_period=key.budget_period,
            created_ms=key.created_ms,
            revoked_ms=None,
            rotated_ms=now,
        ), secret


# (st_dev, st_ino, st_size, st_mtime_ns) of the database file.
_Signature = tuple[int, int, int, int]


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class KeyIndex:
    """Every key of one file, read once: what the request path looks secrets up in.

    Build it with ``load`` (blocking: call it off the event loop once serving).
    ``lookup`` and ``changed`` are cheap enough for the loop.
    """

    __slots__ = ("_by_hash", "_by_id", "_conn", "_signature", "_version", "has_budgets",
                 "path")

    def __init__(
        self,
        path: str,
        entries: Iterable[tuple[bytes, ApiKey]] = (),
        *,
        conn: sqlite3.Connection | None = None,
        signature: _Signature | None = None,
        version: int | None = None,
    ) -> None:
        self.path = path
        self._by_hash: dict[bytes, ApiKey] = dict(entries)
        self._by_id: dict[str, ApiKey] = {k.id: k for k in self._by_hash.values()}
        # Whether any live key has a money budget: only then must the spend per key be
        # read from the meter (sidecar.ratelimit.spend).
        self.has_budgets = any(k.budget_usd is not None and k.revoked_ms is None
                               for k in self._by_id.values())
        # Kept read-only connection whose PRAGMA data_version tells whether another
        # connection committed since the load; None when the file was missing.
        self._conn = conn
        self._signature = signature
        self._version = version

    @classmethod
    def load(cls, path: str) -> KeyIndex:
        """Read every key of ``path`` (a missing file: an empty index). KeyStoreError
        when the file exists but cannot be read as a keys database."""
        try:
            st = os.stat(path)  # before reading: a write after it shows in changed()
        except FileNotFoundError:
            return cls(path)
        except OSError as exc:
            raise KeyStoreError(f"cannot read keys database {path}: {exc.strerror}") from exc
        uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
        try:
            conn = sqlite3.connect(
                uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                check_same_thread=False,  # loaded in a worker thread, checked on the loop
            )
        except sqlite3.Error as exc:
            raise KeyStoreError(f"cannot read keys database {path}: {exc}") from exc
        try:
            conn.execute("BEGIN")  # one snapshot for the keys and data_version
            app, _, tables = _application_state(conn)
            foreign = _foreign(path, app, tables)
            if foreign is not None:
                raise foreign
            has_table = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)
            ).fetchone()
            rows = []
            if has_table is not None:  # a file the CLI is still creating has none yet
                rows = conn.execute(f"SELECT secret_sha256, {_COLUMNS} FROM {TABLE}").fetchall()
            version = int(conn.execute("PRAGMA data_version").fetchone()[0])
            conn.execute("COMMIT")
            # changed() runs on the event loop: never wait there for a lock (a busy
            # database reads as "changed", and the reload waits in a worker thread).
            conn.execute("PRAGMA busy_timeout = 0")
        except sqlite3.Error as exc:
            conn.close()
            raise KeyStoreError(f"cannot read keys database {path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        entries = ((bytes(r[0]), _row_key(r[1:])) for r in rows)
        return cls(path, entries, conn=conn, signature=_signature(st), version=version)

    def lookup(self, secret: bytes) -> ApiKey | None:
        """The key whose secret this is: a revoked key's record (revoked_ms set) for a
        revoked key, None for an unknown secret. One SHA-256 and one dict get."""
        return self._by_hash.get(_sha256(secret).digest())

    def by_id(self, key_id: str) -> ApiKey | None:
        return self._by_id.get(key_id)

    @property
    def records(self) -> tuple[ApiKey, ...]:
        return tuple(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_hash)

    def changed(self) -> bool:
        """Whether the file may differ from what was loaded: one stat() and, when the
        file is the same one, PRAGMA data_version on the kept connection (shared
        memory in WAL mode; no waiting for locks). Errors count as changed."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self._signature is not None
        except OSError:
            return True
        # A new file, a replaced one (inode), or one written outside SQLite (size,
        # mtime; a WAL checkpoint also moves these, which costs one needless reload).
        if self._conn is None or _signature(st) != self._signature:
            return True
        try:
            row = self._conn.execute("PRAGMA data_version").fetchone()
        except sqlite3.Error:
            return True
        return row is None or int(row[0]) != self._version

    def reload(self) -> KeyIndex:
        """A fresh index of the same file (blocking). This one stays usable until
        closed."""
        return KeyIndex.load(self.path)

    def close(self) -> None:
        """Release the kept connection; lookups keep working, changed() says True."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class KeyWatcher:
    """Keeps ``current`` in step with the keys file, so `sidecar keys create|revoke|
    rotate` take effect in a running sidecar without a restart.

    The constructor loads the file (blocking; KeyStoreError when it exists but is
    unreadable: a sidecar should not start without its keys). The caller owns the
    ``run()`` task: it creates and cancels it.
    """

    def __init__(self, path: str, interval: float = 1.0, *,
                 index: KeyIndex | None = None) -> None:
        if not interval > 0:
            raise ValueError("interval must be above 0")
        self.path = path
        self.interval = interval
        self.current: KeyIndex = index if index is not None else KeyIndex.load(path)
        self.reloads = 0  # successful swaps
        self.failures = 0  # reloads that failed (the old index was kept)

    async def run(self) -> None:
        """Every interval, if the file changed, rebuild the index in a worker thread
        and swap it in. Never raises except CancelledError; a failed reload is logged
        (once per distinct error) and the previous index kept."""
        loop = asyncio.get_running_loop()
        failing: str | None = None  # the error of the last reload, while it fails
        while True:
            await asyncio.sleep(self.interval)
            old = self.current
            try:
                if failing is None and not old.changed():
                    continue
                new = await loop.run_in_executor(None, old.reload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                problem = str(exc) or type(exc).__name__
                if problem != failing:
                    log.warning(
                        "keys database %s: reload failed, keeping the %d keys loaded before: %s",
                        self.path, len(old), problem,
                    )
                failing = problem
                continue
            self.current = new
            self.reloads += 1
            revoked = sum(1 for k in new.records if k.revoked)
            log.info(
                "keys database %s reloaded%s: %d keys (%d revoked)",
                self.path, " after failures" if failing else "", len(new), revoked,
            )
            failing = None
            try:
                await loop.run_in_executor(None, old.close)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # closing a read-only connection; nothing to lose
                log.debug("keys database %s: closing the old index: %s", self.path, exc)

    def close(self) -> None:
        """Release the current index's connection (after the run() task ended)."""
        self.current.close()


def credential(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The API key a request presents: ``authorization: Bearer <secret>`` (scheme
    in any case), else ``x-api-key: <secret>``; None when neither carries one.
    Header names arrive lower-cased. Another authorization scheme (Basic ...) is
    not a key."""
    api_key: bytes | None = None
    for name, value in headers:
        if name == b"authorization":
            # "Bearer", any case, then whitespace: what value.split(None, 1) would find,
            # without building the list.
            if value[:6].lower() == b"bearer" and value[6:7].isspace():
                token = value[6:].strip()
                if token:
                    return token
        elif name == b"x-api-key" and api_key is None:
            token = value.strip()
            if token:
                api_key = token
    return api_key
