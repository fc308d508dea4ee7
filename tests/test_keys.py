"""API keys (sidecar.auth): the store, the index the request path reads, the watcher
that keeps a running sidecar current, and the credential a request presents."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import pathlib
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator

import pytest

from sidecar.auth import (
    ApiKey,
    KeyIndex,
    KeyNotFound,
    KeyRevoked,
    KeyStore,
    KeyStoreError,
    KeyWatcher,
    credential,
)
from sidecar.auth.keys import SECRET_PREFIX


@pytest.fixture
def db(tmp_path: pathlib.Path) -> str:
    return str(tmp_path / "keys.db")


@pytest.fixture
def store(db: str) -> Iterator[KeyStore]:
    s = KeyStore.open(db)
    yield s
    s.close()


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- store and index --------------------------------------------------------------


def test_create_then_lookup_finds_the_key_by_its_secret(store: KeyStore, db: str) -> None:
    key, secret = store.create("alice", tier="pro", tpm=10_000, rpm=60,
                               budget_usd=25.0, budget_period="month")
    assert key.id.startswith("key_") and len(key.id) == len("key_") + 12
    assert secret.startswith(SECRET_PREFIX) and len(secret) == len(SECRET_PREFIX) + 43
    assert key.id not in secret and key.name == "alice" and key.revoked_ms is None
    index = KeyIndex.load(db)
    found = index.lookup(secret.encode())
    assert found == key
    assert (found.tier, found.tpm, found.rpm, found.budget_usd, found.budget_period) == (
        "pro", 10_000, 60, 25.0, "month")
    assert index.by_id(key.id) == key and len(index) == 1
    assert index.lookup(b"sk-sc-not-a-key") is None
    assert index.lookup(secret.encode()[:-1]) is None
    assert index.lookup(b"") is None
    index.close()


def test_secrets_and_ids_are_random_and_distinct(store: KeyStore) -> None:
    made = [store.create(f"k{i}") for i in range(20)]
    assert len({k.id for k, _ in made}) == 20
    assert len({s for _, s in made}) == 20
    assert [k.id for k in store.list()] == [k.id for k, _ in made]  # oldest first


def test_revoked_key_lookup_returns_the_revoked_record(store: KeyStore, db: str) -> None:
    key, secret = store.create("bob")
    before = time.time_ns() // 1_000_000
    revoked = store.revoke(key.id)
    assert revoked.id == key.id and revoked.revoked and revoked.revoked_ms is not None
    assert revoked.revoked_ms >= before
    found = KeyIndex.load(db).lookup(secret.encode())
    assert found is not None and found.id == key.id and found.revoked_ms == revoked.revoked_ms
    # Revoking again keeps the first revocation time.
    assert store.revoke(key.id).revoked_ms == revoked.revoked_ms
    assert [k.id for k in store.list(include_revoked=False)] == []
    assert [k.id for k in store.list()] == [key.id]


def test_unknown_id_raises_key_not_found(store: KeyStore) -> None:
    with pytest.raises(KeyNotFound, match="key_000000000000"):
        store.revoke("key_000000000000")
    with pytest.raises(KeyNotFound):
        store.rotate("key_000000000000")
    with pytest.raises(KeyNotFound):
        store.get("key_000000000000")


def test_rotate_old_secret_unknown_new_one_works_same_id_and_settings(
    store: KeyStore, db: str
) -> None:
    key, old = store.create("carol", tier="free", tpm=500, budget_usd=1.5, budget_period="day")
    rotated, new = store.rotate(key.id)
    assert new != old and new.startswith(SECRET_PREFIX)
    assert rotated.id == key.id and rotated.rotated_ms is not None
    index = KeyIndex.load(db)
    assert index.lookup(old.encode()) is None
    found = index.lookup(new.encode())
    assert found is not None and found.id == key.id
    assert (found.name, found.tier, found.tpm, found.budget_usd, found.budget_period,
            found.created_ms) == ("carol", "free", 500, 1.5, "day", key.created_ms)
    assert found == rotated


def test_a_revoked_key_cannot_be_rotated(store: KeyStore, db: str) -> None:
    key, secret = store.create("dave")
    store.revoke(key.id)
    with pytest.raises(KeyRevoked):
        store.rotate(key.id)
    found = KeyIndex.load(db).lookup(secret.encode())  # unchanged: still "revoked"
    assert found is not None and found.revoked


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"name": ""}, "name"),
        ({"name": "  "}, "name"),
        ({"name": "a\nb"}, "control"),
        ({"name": "x", "tpm": -1}, "tpm"),
        ({"name": "x", "tpm": 0}, "tpm"),
        ({"name": "x", "rpm": -5}, "rpm"),
        ({"name": "x", "budget_usd": -1.0, "budget_period": "day"}, "budget_usd"),
        ({"name": "x", "budget_usd": float("nan"), "budget_period": "day"}, "budget_usd"),
        ({"name": "x", "budget_usd": float("inf"), "budget_period": "day"}, "budget_usd"),
        ({"name": "x", "budget_usd": 5.0}, "budget_period"),
        ({"name": "x", "budget_period": "day"}, "budget_usd"),
        ({"name": "x", "budget_usd": 5.0, "budget_period": "week"}, "budget_period"),
    ],
)
def test_invalid_settings_are_refused(store: KeyStore, kwargs: dict[str, object],
                                      problem: str) -> None:
    name = kwargs.pop("name")
    assert isinstance(name, str)
    with pytest.raises(ValueError, match=problem):
        store.create(name, **kwargs)  # type: ignore[arg-type]
    assert store.list() == []


def test_a_secret_passed_as_an_id_is_not_echoed(store: KeyStore) -> None:
    _, secret = store.create("eve")
    for op in (store.revoke, store.rotate, store.get):
        with pytest.raises(KeyNotFound) as info:
            op(secret)
        assert secret not in str(info.value)
        assert secret[len(SECRET_PREFIX):] not in str(info.value)


def test_index_of_a_missing_file_is_empty_and_creates_nothing(db: str) -> None:
    index = KeyIndex.load(db)
    assert len(index) == 0 and index.lookup(b"sk-sc-x") is None
    assert not os.path.exists(db)
    assert not index.changed()
    KeyStore.open(db).close()
    assert index.changed()  # the file appeared
    assert len(index.reload()) == 0


def test_changed_after_a_write_from_another_connection_and_reload_picks_it_up(
    store: KeyStore, db: str
) -> None:
    first, s1 = store.create("first")
    index = KeyIndex.load(db)
    assert not index.changed()
    # Opening the store, listing and reading change nothing a reader would reload for.
    other = KeyStore.open(db)
    assert [k.id for k in other.list()] == [first.id]
    assert not index.changed()
    second, s2 = other.create("second")  # "another process": its own connection
    assert index.changed()
    assert index.lookup(s2.encode()) is None  # the old index is unchanged
    fresh = index.reload()
    assert not fresh.changed()
    got = fresh.lookup(s2.encode())
    assert got is not None and got.id == second.id
    assert fresh.lookup(s1.encode()) == first
    other.revoke(first.id)
    assert fresh.changed()
    after = fresh.reload()
    revoked = after.lookup(s1.encode())
    assert revoked is not None and revoked.revoked
    other.close()
    for i in (index, fresh, after):
        i.close()


def test_changed_when_the_file_is_replaced_or_removed(tmp_path: pathlib.Path, db: str) -> None:
    with KeyStore.open(db) as s:
        s.create("a")
    index = KeyIndex.load(db)
    elsewhere = str(tmp_path / "new.db")
    with KeyStore.open(elsewhere) as s:
        _, secret = s.create("b")
    os.replace(elsewhere, db)  # same size and maybe same mtime tick: a new inode
    assert index.changed()
    fresh = index.reload()
    assert fresh.lookup(secret.encode()) is not None
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.unlink(db + suffix)
    assert fresh.changed()
    assert len(fresh.reload()) == 0
    index.close()
    fresh.close()


def test_a_file_that_is_not_a_keys_database_is_refused(tmp_path: pathlib.Path) -> None:
    meter_like = str(tmp_path / "meter.db")
    conn = sqlite3.connect(meter_like)
    conn.execute("CREATE TABLE requests (id INTEGER PRIMARY KEY)")
    conn.commit()
    conn.close()
    with pytest.raises(KeyStoreError, match="not a sidecar keys database"):
        KeyStore.open(meter_like)
    with pytest.raises(KeyStoreError, match="not a sidecar keys database"):
        KeyIndex.load(meter_like)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(KeyStoreError, match=r"garbage\.db"):
        KeyIndex.load(str(garbage))


# --- the file on disk ---------------------------------------------------------------


def test_file_and_its_wal_and_shm_are_mode_0600_whatever_the_umask(db: str) -> None:
    old = os.umask(0)
    try:
        s = KeyStore.open(db)
        s.create("a")
        reader = KeyIndex.load(db)  # keeps -wal and -shm in place
        s.close()
    finally:
        os.umask(old)
    for suffix in ("", "-wal", "-shm"):
        assert os.path.exists(db + suffix), suffix
        assert _mode(db + suffix) == 0o600, suffix
    reader.close()


def test_an_existing_file_readable_by_others_is_tightened(
    db: str, caplog: pytest.LogCaptureFixture
) -> None:
    with KeyStore.open(db) as s:
        s.create("a")
    os.chmod(db, 0o644)
    with caplog.at_level(logging.WARNING, logger="sidecar.auth"), KeyStore.open(db) as s:
        assert len(s.list()) == 1
    assert _mode(db) == 0o600
    assert any("644" in r.getMessage() for r in caplog.records)


def test_secrets_never_reach_the_database_files(db: str) -> None:
    s = KeyStore.open(db)
    reader = KeyIndex.load(db)  # an open reader keeps the WAL from being checkpointed away
    key, created = s.create("a", tier="pro")
    _, rotated = s.rotate(key.id)
    _, other = s.create("b")
    files = [db + suffix for suffix in ("", "-wal", "-shm") if os.path.exists(db + suffix)]
    assert db + "-wal" in files
    raw = b"".join(pathlib.Path(f).read_bytes() for f in files)
    for secret in (created, rotated, other):
        assert secret.encode() not in raw
        assert secret[len(SECRET_PREFIX):].encode() not in raw  # nor its random part
        assert hashlib.sha256(secret.encode()).hexdigest().encode() not in raw
    # What is stored is the digest (so the grep above looked in the right place).
    assert hashlib.sha256(rotated.encode()).digest() in raw
    s.close()
    reader.close()


# --- credential() ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"authorization", b"Bearer sk-sc-abc")], b"sk-sc-abc"),
        ([(b"authorization", b"bearer sk-sc-abc")], b"sk-sc-abc"),
        ([(b"authorization", b"BEARER   sk-sc-abc  ")], b"sk-sc-abc"),
        ([(b"x-api-key", b"sk-sc-abc")], b"sk-sc-abc"),
        ([(b"x-api-key", b" sk-sc-abc ")], b"sk-sc-abc"),
        ([], None),
        ([(b"content-type", b"application/json")], None),
        ([(b"authorization", b"Bearer")], None),
        ([(b"authorization", b"Bearer ")], None),
        ([(b"authorization", b"")], None),
        ([(b"x-api-key", b"")], None),
        ([(b"x-api-key", b"   ")], None),
        ([(b"authorization", b"Basic dXNlcjpwYXNz")], None),
        ([(b"authorization", b"Bearersk-sc-abc")], None),
        # Bearer wins over x-api-key, whatever the order; a non-Bearer
        # authorization leaves x-api-key to speak.
        ([(b"x-api-key", b"sk-sc-b"), (b"authorization", b"Bearer sk-sc-a")], b"sk-sc-a"),
        ([(b"authorization", b"Basic dXNlcjpwYXNz"), (b"x-api-key", b"sk-sc-b")], b"sk-sc-b"),
        ([(b"x-api-key", b"sk-sc-b"), (b"x-api-key", b"sk-sc-c")], b"sk-sc-b"),
    ],
)
def test_credential(headers: list[tuple[bytes, bytes]], expected: bytes | None) -> None:
    assert credential(headers) == expected


# --- KeyWatcher -----------------------------------------------------------------------

INTERVAL = 0.05


async def _until(predicate: Callable[[], bool], timeout: float) -> float:
    """Seconds until predicate() holds; fails the test after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s")
        await asyncio.sleep(INTERVAL / 10)
    return time.monotonic() - start


def test_watcher_swaps_current_within_a_couple_of_intervals(db: str) -> None:
    async def main() -> None:
        watcher = KeyWatcher(db, interval=INTERVAL)  # no file yet: an empty index
        assert len(watcher.current) == 0
        task = asyncio.create_task(watcher.run())
        try:
            with KeyStore.open(db) as s:
                key, secret = s.create("live")
            # Two intervals, plus room for the reload in a worker thread on a busy box.
            await _until(lambda: watcher.current.lookup(secret.encode()) is not None,
                         2 * INTERVAL + 0.5)
            with KeyStore.open(db) as s:
                s.revoke(key.id)

            def revoked() -> bool:
                found = watcher.current.lookup(secret.encode())
                return found is not None and found.revoked

            await _until(revoked, 2 * INTERVAL + 0.5)
            reloads = watcher.reloads
            await asyncio.sleep(5 * INTERVAL)  # nothing changed: nothing reloaded
            assert watcher.reloads == reloads
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            watcher.close()

    asyncio.run(main())


def test_watcher_keeps_the_old_index_when_the_file_is_corrupt(
    db: str, caplog: pytest.LogCaptureFixture
) -> None:
    with KeyStore.open(db) as s:
        key, secret = s.create("steady")

    async def main() -> None:
        watcher = KeyWatcher(db, interval=INTERVAL)
        before = watcher.current
        task = asyncio.create_task(watcher.run())
        try:
            pathlib.Path(db).write_bytes(b"\x00garbage, not sqlite\x00" * 400)
            await _until(lambda: watcher.failures >= 3, 20 * INTERVAL + 1.0)
            assert watcher.current is before
            assert watcher.current.lookup(secret.encode()) == key
            assert not task.done()
            # A fresh file at the same path: the watcher recovers by itself.
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(db + suffix):
                    os.unlink(db + suffix)
            with KeyStore.open(db) as s:
                _, new_secret = s.create("fresh")
            await _until(lambda: watcher.current.lookup(new_secret.encode()) is not None,
                         2 * INTERVAL + 0.5)
            assert watcher.current.lookup(secret.encode()) is None
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            watcher.close()

    with caplog.at_level(logging.INFO, logger="sidecar.auth"):
        asyncio.run(main())
    logged = [r for r in caplog.records if r.name == "sidecar.auth"]
    failed = [r for r in logged if r.levelno == logging.WARNING]
    assert len(failed) == 1  # one line per distinct failure, not one per interval
    assert "reload failed, keeping the 1 keys" in failed[0].getMessage()
    assert any("after failures" in r.getMessage() for r in logged)
    for r in logged:
        assert secret not in r.getMessage()


def test_watcher_refuses_to_start_on_an_unreadable_file(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "keys.db"
    bad.write_bytes(b"garbage" * 1000)
    with pytest.raises(KeyStoreError):
        KeyWatcher(str(bad))


def test_api_key_record_has_no_secret_field() -> None:
    fields = set(ApiKey.__dataclass_fields__)
    assert not {f for f in fields if "secret" in f or "hash" in f}
