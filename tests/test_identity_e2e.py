"""Identity over real loopback sockets: sidecar API keys (401s, the key id on the row,
keys changed by the CLI picked up without a restart, the secret nowhere it should not
be) and the trusted identity header."""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable

import pytest
from conftest import Stack
from e2e_helpers import ClientConn, Response, assert_openai_error, chat_body, request_bytes

from sidecar.auth import KeyStore
from sidecar.config import AuthConfig, Config, MiddlewareConfig

PATH = "/v1/chat/completions"


def _keyed(db: str, limiter: dict[str, object] | None = None,
           identity: str = "api_key", peers: tuple[str, ...] = ()) -> Callable[[Config], Config]:
    mw = () if limiter is None else (MiddlewareConfig("token_limiter", {
        "requests": None, "key": None, "reserve": 256, "tiers": {}, **limiter}),)

    def edit(config: Config) -> Config:
        routes = tuple(dataclasses.replace(r, identity=identity, middleware=mw)
                       if r.path == PATH else r for r in config.routes)
        return dataclasses.replace(config, routes=routes, trusted_peers=peers,
                                   auth=AuthConfig(keys_db=db, refresh=0.1))

    return edit


def _post(port: int, headers: list[tuple[bytes, bytes]]) -> Response:
    with ClientConn(port) as c:
        c.send(request_bytes("POST", PATH, chat_body(), headers=headers))
        return c.read_response()


def _bearer(secret: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", b"Bearer " + secret.encode())]


def test_api_keys_401s_key_id_on_the_row_and_changes_without_restart(
        stack_factory: Callable[..., Stack], tmp_path: pathlib.Path,
        caplog: pytest.LogCaptureFixture) -> None:
    db = str(tmp_path / "keys.db")
    with KeyStore.open(db) as store:
        key, secret = store.create("team-a", tier="pro")
    stack = stack_factory(_keyed(db))
    assert_openai_error(_post(stack.port, []), 401, "invalid_api_key")
    assert_openai_error(_post(stack.port, _bearer("sk-sc-nope")), 401, "invalid_api_key")
    ok = _post(stack.port, _bearer(secret))
    assert ok.status == 200
    assert _post(stack.port, [(b"x-api-key", secret.encode())]).status == 200
    # The provider never sees the sidecar's key.
    assert all(secret.encode() not in r.head for r in stack.mock.requests)

    # A key made by the CLI while the sidecar runs works within a few refreshes;
    # a revoked one stops.
    with KeyStore.open(db) as store:
        _, second = store.create("team-b")
        store.revoke(key.id)
    deadline = time.monotonic() + 5
    while _post(stack.port, _bearer(second)).status != 200:
        assert time.monotonic() < deadline, "the new key was not picked up"
        time.sleep(0.05)
    revoked = _post(stack.port, _bearer(secret))
    err = assert_openai_error(revoked, 401, "invalid_api_key")
    assert key.id in err["message"] and secret not in err["message"]

    stack.stop()
    rows = stack.rows()
    served = [r for r in rows if r["status"] == 200]
    assert [r["key_id"] for r in served[:2]] == [key.id, key.id]
    assert served[0]["tier"] == "pro"
    assert [r["status"] for r in rows[:2]] == [401, 401]
    # The secret is in no SQLite file, no log record, no response.
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
            assert second.encode() not in f.read_bytes(), f
    assert secret not in caplog.text
    assert secret.encode() not in revoked.body and secret.encode() not in ok.body


def test_a_keys_own_tpm_is_its_bucket(stack_factory: Callable[..., Stack],
                                      tmp_path: pathlib.Path) -> None:
    db = str(tmp_path / "keys.db")
    with KeyStore.open(db) as store:
        _, small = store.create("small", tpm=300)
        _, big = store.create("big")
    stack = stack_factory(_keyed(db, {"limit": 100_000, "period": 60.0}))
    body = {**chat_body(), "max_tokens": 100}
    with ClientConn(stack.port) as c:
        statuses = []
        for _ in range(4):
            c.send(request_bytes("POST", PATH, body, headers=_bearer(small)))
            resp = c.read_response()
            statuses.append(resp.status)
        assert resp.header("x-ratelimit-limit-tokens") == "300"
    assert statuses[:2] == [200, 200] and statuses[-1] == 429
    # Another key on the same route draws from the route's own, larger bucket.
    other = _post(stack.port, _bearer(big))
    assert other.status == 200 and other.header("x-ratelimit-limit-tokens") == "100000"


@pytest.mark.parametrize("trusted", [True, False])
def test_the_identity_header_only_from_trusted_peers(
        stack_factory: Callable[..., Stack], tmp_path: pathlib.Path, trusted: bool) -> None:
    peers = ("127.0.0.1/32",) if trusted else ("10.0.0.0/8",)
    stack = stack_factory(_keyed(str(tmp_path / "none.db"), identity="header", peers=peers))
    resp = _post(stack.port, [(b"x-sidecar-user", b"alice"), (b"x-sidecar-tier", b"pro")])
    if trusted:
        assert resp.status == 200
        assert_openai_error(_post(stack.port, []), 401, "invalid_api_key")
    else:
        assert_openai_error(resp, 401, "invalid_api_key")
    stack.stop()
    rows = stack.rows()
    if trusted:
        assert (rows[0]["key_id"], rows[0]["tier"]) == ("alice", "pro")
    else:
        assert rows[0]["key_id"] is None and rows[0]["status"] == 401


def test_a_key_over_its_money_budget_gets_429_insufficient_quota_until_the_next_period(
        stack_factory: Callable[..., Stack], tmp_path: pathlib.Path) -> None:
    """The spend ledger reads each served row's cost_usd from the meter; once a key's
    day budget is spent, its next requests are refused before any provider call, with
    retry-after at the next UTC midnight. A key without a budget is untouched."""
    import calendar

    db = str(tmp_path / "keys.db")
    with KeyStore.open(db) as store:
        capped, capped_secret = store.create("capped", budget_usd=1e-9, budget_period="day")
        _, free_secret = store.create("unbudgeted")
    stack = stack_factory(_keyed(db))
    first = _post(stack.port, _bearer(capped_secret))
    assert first.status == 200  # nothing spent yet: admitted, and it costs > $1e-9
    # The row is flushed (<= 50 ms) and read by the ledger (refresh 0.1 s) within moments.
    deadline = time.monotonic() + 5
    while (refused := _post(stack.port, _bearer(capped_secret))).status == 200:
        assert time.monotonic() < deadline, "the budget was never enforced"
        time.sleep(0.05)
    now = time.time()
    err = assert_openai_error(refused, 429, "insufficient_quota")
    assert capped.id in err["message"] and "daily budget" in err["message"]
    t = time.gmtime(now)
    midnight = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0)) + 86_400
    retry = int(refused.header("retry-after") or 0)
    assert midnight - now - 5 <= retry <= midnight - now + 5, (retry, midnight - now)
    assert _post(stack.port, _bearer(free_secret)).status == 200
    calls_before = len(stack.mock.requests)
    assert _post(stack.port, _bearer(capped_secret)).status == 429
    assert len(stack.mock.requests) == calls_before  # refused before the provider

    stack.stop()
    rows = stack.rows()
    capped_rows = [r for r in rows if r["key_id"] == capped.id]
    assert capped_rows[0]["status"] == 200 and capped_rows[0]["cost_usd"] > 1e-9
    # Rows served before the ledger's look may be 200s; every refused one is a 429.
    assert {r["status"] for r in capped_rows[1:]} <= {200, 429}
    assert sum(r["status"] == 429 for r in capped_rows) == 2
    assert capped_rows[-1]["status"] == 429 and capped_rows[-1]["cost_usd"] in (None, 0)
