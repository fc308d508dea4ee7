"""End to end: a provider that echoes credentials in its error answer (issue 14, item 7).

A hand-written provider on loopback answers 401 with a body (and a header) that
repeats the credentials it was sent, the way some APIs do ("Incorrect API key
provided: sk-..."). The client must never get those bytes back: the upstream's key
and the client's own key are masked, byte for byte, in what is relayed.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from e2e_helpers import ClientConn, chat_body, edit_upstreams, request_bytes
from fake_provider import FakeProvider, Script, Seen, chunk

PROVIDER_KEY = "sk-provider-ECHOED-0123456789abcdef"
CLIENT_KEY = "sk-client-ECHOED-fedcba9876543210"


def _echo_401(seen: Seen, chunked: bool) -> Script:
    got = (seen.header(b"authorization") or b"").removeprefix(b"Bearer ")
    body = orjson.dumps({"error": {"message": f"Incorrect API key provided: {got.decode()}. "
                                              f"You can find your API key at ...",
                                   "type": "invalid_request_error",
                                   "code": "invalid_api_key"}})
    head = b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\n" \
        b"www-authenticate: Bearer error=\"invalid_token\", key=\"" + got + b"\"\r\n"
    if chunked:
        # The key split between two chunks, and the two in separate writes.
        cut = body.index(got) + len(got) // 2
        return [head + b"transfer-encoding: chunked\r\n\r\n" + chunk(body[:cut]), 0.05,
                chunk(body[cut:]) + b"0\r\n\r\n"], False
    return [head + b"content-length: %d\r\n\r\n" % len(body) + body], False


@pytest.fixture
def echo_stack(stack_factory: Any) -> Iterator[Callable[..., Any]]:
    fakes: list[FakeProvider] = []

    def make(chunked: bool, **upstream: Any) -> Any:
        fake = FakeProvider(lambda seen: _echo_401(seen, chunked))
        fakes.append(fake)
        stack = stack_factory(edit_upstreams(lambda u: dataclasses.replace(
            u, port=fake.port, url=f"http://127.0.0.1:{fake.port}", **upstream)))
        stack.fake = fake
        return stack

    yield make
    for f in fakes:
        f.stop()


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
@pytest.mark.parametrize("whose", ["provider", "client"])
def test_a_key_echoed_in_a_provider_401_never_reaches_the_client(
        echo_stack: Any, tmp_path: pathlib.Path, chunked: bool, whose: str) -> None:
    if whose == "provider":
        stack = echo_stack(chunked, api_key=PROVIDER_KEY)
        secret = PROVIDER_KEY
    else:  # the client's own key, passed through to the provider
        stack = echo_stack(chunked, forward_client_auth=True)
        secret = CLIENT_KEY
    with ClientConn(stack.port, timeout=5) as c:
        c.send(request_bytes("POST", "/v1/chat/completions", chat_body(),
                             headers=[(b"authorization", b"Bearer " + CLIENT_KEY.encode())]))
        r = c.read_response()
    # The provider did get (and echo) it: the test exercises a real echo.
    assert stack.fake.seen[0].header(b"authorization") == b"Bearer " + secret.encode()
    assert r.status == 401 and r.complete, r
    raw = r.raw_body + b"".join(v for _, v in r.headers)
    assert secret.encode() not in raw
    assert secret[-12:].encode() not in raw
    # Masked in place: the body is still the provider's JSON, the same length.
    err = orjson.loads(r.body)["error"]
    assert err["code"] == "invalid_api_key"
    assert "Incorrect API key provided: " + "*" * len(secret) + "." in err["message"], err
    assert r.header("www-authenticate") == f'Bearer error="invalid_token", key="{"*" * len(secret)}"'
    stack.stop()
    row = stack.rows()[0]
    assert (row["status"], row["outcome"]) == (401, "rejected"), row
    for p in tmp_path.iterdir():
        if p.is_file():
            assert secret.encode() not in p.read_bytes(), p


# ------------------------------------------------- who the client is, as told upstream


def _ok(seen: Seen) -> Script:
    body = b'{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
    return [b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
            % len(body) + body], False


@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted", "trusted-peer"])
def test_forwarding_headers_are_believed_only_from_trusted_peers(
        stack_factory: Any, trusted: bool) -> None:
    """x-forwarded-for gets the peer's address appended (as Nginx does); what a client
    claims there, and its forwarded / x-real-ip, reach the provider only from a peer in
    trusted_peers."""
    fake = FakeProvider(_ok)
    try:
        edit = edit_upstreams(lambda u: dataclasses.replace(
            u, port=fake.port, url=f"http://127.0.0.1:{fake.port}"))
        peers = ("127.0.0.1",) if trusted else ("10.9.9.9",)
        stack = stack_factory(lambda c: dataclasses.replace(edit(c), trusted_peers=peers))
        claims = [(b"x-forwarded-for", b"6.6.6.6"), (b"x-forwarded-for", b"7.7.7.7, 8.8.8.8"),
                  (b"forwarded", b"for=6.6.6.6;proto=https"), (b"x-real-ip", b"6.6.6.6")]
        with ClientConn(stack.port, timeout=5) as c:
            c.send(request_bytes("POST", "/v1/chat/completions", chat_body(), headers=claims))
            assert c.read_response().status == 200
        seen = fake.seen[0]
        xff = [v for line in seen.head.split(b"\r\n")[1:]
               for k, _, v in [line.partition(b":")] if k.lower() == b"x-forwarded-for"]
        assert len(xff) == 1, seen.head  # one line, rebuilt
        if trusted:
            assert xff[0].strip() == b"6.6.6.6, 7.7.7.7, 8.8.8.8, 127.0.0.1"
            assert seen.header(b"forwarded") == b"for=6.6.6.6;proto=https"
            assert seen.header(b"x-real-ip") == b"6.6.6.6"
        else:
            assert xff[0].strip() == b"127.0.0.1"
            assert seen.header(b"forwarded") is None and seen.header(b"x-real-ip") is None
    finally:
        fake.stop()
