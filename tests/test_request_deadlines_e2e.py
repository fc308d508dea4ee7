"""End to end: requests read too slowly, heads too many, request lines too old
(issue 14, items 2 and 7), over raw loopback sockets against the mock provider.

Once a request has begun, its head must be complete within ``timeouts.request_head``
and, once the head is in, its body within ``timeouts.request_body``; past either the
client gets a 408 (OpenAI-style body, ``connection: close``) and its connection slot
is freed, so slow or stalled clients cannot lock real ones out.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from e2e_helpers import (
    ClientConn,
    assert_openai_error,
    chat_body,
    edit_limits,
    edit_timeouts,
    recv_until,
    request_bytes,
    roundtrip,
)

from sidecar.config import Config

PATH = "/v1/chat/completions"
DEADLINE = 1.0  # request_head and request_body in these tests
# How long a test waits for a deadline to fire: the deadline, plus the sweep's
# period (a quarter of it), plus room for a loaded 2-core box.
FIRES_WITHIN = DEADLINE + 4.0


def _deadlines(**limits: Any) -> Callable[[Config], Config]:
    t = edit_timeouts(request_head=DEADLINE, request_body=DEADLINE)
    lim = edit_limits(**limits) if limits else (lambda c: c)
    return lambda c: lim(t(c))


def _head(extra: bytes) -> bytes:
    return b"POST " + PATH.encode() + b" HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n" \
        + extra + b"\r\n"


def _assert_408(c: ClientConn, started: float) -> None:
    r = c.read_response()
    waited = time.monotonic() - started
    err = assert_openai_error(r, 408, "request_timeout")
    assert "within 1s" in err["message"], err
    assert r.header("connection") == "close"
    assert c.closed_by_peer(2.0), "the connection must close after the 408"
    # A deadline, not an immediate refusal, and not the 75 s idle timeout either.
    assert DEADLINE * 0.9 <= waited <= FIRES_WITHIN, waited


BODIES = {
    # content-length announced, nothing sent
    "length-nothing": (_head(b"content-length: 200\r\n"), b"", 0),
    # chunked, not one chunk
    "chunked-nothing": (_head(b"transfer-encoding: chunked\r\n"), b"", 0),
    # a body trickling in, one byte every 0.25 s: never complete within the deadline
    "slow-body": (_head(b"content-length: 200\r\n"), b"{", 12),
}


@pytest.mark.parametrize("case", sorted(BODIES))
def test_a_body_that_does_not_come_in_time_gets_408_and_a_rejected_row(
        stack_factory: Any, case: str) -> None:
    stack = stack_factory(_deadlines())
    head, first, trickle = BODIES[case]
    with ClientConn(stack.port, timeout=FIRES_WITHIN + 2) as c:
        c.send(head + first)
        started = time.monotonic()
        for _ in range(trickle):
            time.sleep(0.25)
            try:
                c.send(b" ")
            except OSError:
                break  # answered and closed already
        _assert_408(c, started)
    stack.stop()
    rows = stack.rows()
    # Like every other refusal of a request on a route: one row, outcome 'rejected'.
    assert len(rows) == 1, rows
    row = rows[0]
    assert (row["status"], row["outcome"], row["usage_source"]) == (408, "rejected", "none")
    assert "request body not received within 1s" in row["error"]
    assert stack.mock.requests_total == 0  # nothing reached the provider


def test_a_head_that_does_not_complete_in_time_gets_408(stack_factory: Any) -> None:
    stack = stack_factory(_deadlines())
    with ClientConn(stack.port, timeout=FIRES_WITHIN + 2) as c:
        c.send(b"POST " + PATH.encode() + b" HTTP/1.1\r\nhost: x\r\nx-slow: ")
        started = time.monotonic()
        for _ in range(8):  # a header trickling in, a byte every 0.25 s
            time.sleep(0.25)
            try:
                c.send(b"a")
            except OSError:
                break
        _assert_408(c, started)
    stack.stop()
    assert stack.rows() == []  # no head, no route: nothing to meter (as for a 400 head)


def test_fifty_slow_bodies_lock_real_clients_out_no_longer_than_the_deadline(
        stack_factory: Any) -> None:
    stack = stack_factory(_deadlines(max_connections=50))
    slow = [socket.create_connection(("127.0.0.1", stack.port), timeout=FIRES_WITHIN + 5)
            for _ in range(50)]
    try:
        for s in slow:
            s.sendall(_head(b"content-length: 200\r\n") + b"{")
        time.sleep(0.2)
        # Every slot is held: a real client is refused now (the reason for the deadline).
        r = roundtrip(stack.port, request_bytes("POST", PATH, chat_body()))
        assert_openai_error(r, 503, "overloaded")
        started = time.monotonic()
        served_at = None
        while time.monotonic() - started < FIRES_WITHIN + 2:
            r = roundtrip(stack.port, request_bytes("POST", PATH, chat_body()))
            if r.status == 200:
                served_at = time.monotonic() - started
                break
            assert r.status == 503, r
            time.sleep(0.1)
        assert served_at is not None, "real clients still locked out"
        assert served_at <= FIRES_WITHIN, served_at
        # Each slow socket got its 408 and was closed.
        for s in slow:
            data = recv_until(s, b"\r\n\r\n")
            assert data.startswith(b"HTTP/1.1 408 "), data[:60]
    finally:
        for s in slow:
            s.close()
    stack.stop()
    timed_out = stack.rows("status = 408")
    assert len(timed_out) == 50 and {r["outcome"] for r in timed_out} == {"rejected"}


def test_a_request_in_time_is_not_affected_by_the_deadlines(stack_factory: Any) -> None:
    """A body sent in pieces that completes within the deadline is served."""
    stack = stack_factory(_deadlines())
    payload = orjson.dumps(chat_body())
    with ClientConn(stack.port) as c:
        c.send(_head(b"content-length: %d\r\n" % len(payload)) + payload[:5])
        time.sleep(0.3)
        c.send(payload[5:])
        assert c.read_response().status == 200
        # The next request on the same (idle, then reading) connection is fine too.
        time.sleep(DEADLINE * 1.5)  # idle time does not count against a request
        c.send(request_bytes("POST", PATH, chat_body()))
        assert c.read_response().status == 200


def test_header_count_limit_answers_431(stack_factory: Any) -> None:
    stack = stack_factory(edit_limits(max_headers=20))
    body = orjson.dumps(chat_body())
    base = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]

    def head(n_extra: int) -> bytes:  # host + base + extras header lines
        lines = [b"POST " + PATH.encode() + b" HTTP/1.1", b"host: x"]
        lines += [n + b": " + v for n, v in base]
        lines += [b"x-h%d: v" % i for i in range(n_extra)]
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    assert roundtrip(stack.port, head(17)).status == 200  # 20 header lines: the limit
    r = roundtrip(stack.port, head(18))  # 21
    assert_openai_error(r, 431, "request_header_fields_too_large")
    assert r.header("connection") == "close"


def test_thousands_of_tiny_headers_are_refused_by_default(stack_factory: Any) -> None:
    stack = stack_factory()
    body = orjson.dumps(chat_body())
    raw = (b"POST " + PATH.encode() + b" HTTP/1.1\r\nhost: x\r\n" + b"a: b\r\n" * 8000
           + b"content-length: %d\r\n\r\n" % len(body) + body)
    assert len(raw) < 64 * 1024  # under max_header_bytes: only the count stops it
    assert_openai_error(roundtrip(stack.port, raw), 431, "request_header_fields_too_large")
    stack.stop()
    assert stack.rows() == []
    assert stack.mock.requests_total == 0  # before this change all 8,000 went upstream


@pytest.mark.parametrize("line", [b"GET /healthz", b"GET /healthz HTTP/0.9",
                                  b"POST /v1/chat/completions"])
def test_a_request_line_without_http_1x_is_refused(stack_factory: Any, line: bytes) -> None:
    stack = stack_factory()
    with ClientConn(stack.port) as c:
        c.send(line + b"\r\n\r\n")
        r = c.read_response()
        err = assert_openai_error(r, 400, "invalid_request")
        assert "HTTP version" in err["message"], err
        assert c.closed_by_peer(2.0)


def test_expect_continue_for_an_unknown_path_gets_404_and_never_100(stack_factory: Any) -> None:
    stack = stack_factory()
    with ClientConn(stack.port) as c:
        c.send(b"POST /v1/nope HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
               b"content-length: 10\r\n\r\n")
        assert c._fill()
        assert bytes(c.buf).startswith(b"HTTP/1.1 404 "), bytes(c.buf[:40])
        assert_openai_error(c.read_response(), 404, "not_found")
        assert c.closed_by_peer(2.0)  # the body it announced is not read: the connection ends


def test_expect_continue_for_a_route_gets_100_then_the_answer(stack_factory: Any) -> None:
    stack = stack_factory()
    body = orjson.dumps(chat_body())
    with ClientConn(stack.port) as c:
        c.send(b"POST " + PATH.encode() + b" HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
               b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body))
        assert c._fill()
        assert bytes(c.buf).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        c.send(body)
        assert c.read_response().status == 200


def test_the_metrics_listener_has_the_same_deadlines(stack_factory: Any) -> None:
    from e2e_helpers import closed_port

    port = closed_port()

    def edit(c: Config) -> Config:
        import dataclasses

        c = _deadlines()(c)
        return dataclasses.replace(c, metrics=dataclasses.replace(
            c.metrics, enabled=True, listen_host="127.0.0.1", listen_port=port))

    stack = stack_factory(edit)
    assert stack.server.metrics_port == port
    with ClientConn(port, timeout=FIRES_WITHIN + 2) as c:
        c.send(b"GET /metrics HTTP/1.1\r\nhost: x\r\nx-slow: ")
        started = time.monotonic()
        _assert_408(c, started)
