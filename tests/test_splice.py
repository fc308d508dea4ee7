"""The relay driven directly with byte strings: fakes for the two sockets, no network."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.config import LimitsConfig, TimeoutsConfig
from sidecar.downstream import DownstreamProtocol, ParsedRequest
from sidecar.errors import UpstreamError
from sidecar.http1 import LAST_CHUNK, ResponseHead, feeding, frame_chunk
from sidecar.lifecycle import (
    TRANSITIONS,
    Decision,
    Lifecycle,
    LifecycleError,
    Outcome,
    Phase,
    Retry,
)
from sidecar.splice import Exchange, Sweeper
from sidecar.sse import make_tap

EVENTS = [
    b'data: {"choices":[{"index":0,"delta":{"content":"w%d "}}],"usage":null}\n\n' % i
    for i in range(12)
] + [
    b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":12,'
    b'"total_tokens":17}}\n\n',
    b"data: [DONE]\n\n",
]
HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\n\r\n")
BODY = b"".join(frame_chunk(e) for e in EVENTS) + LAST_CHUNK


class FakePool:
    timeouts = TimeoutsConfig()

    def __init__(self) -> None:
        self.released: list[bool] = []

    def release(self, conn: Any, reusable: bool) -> None:
        self.released.append(reusable)

    def forget(self, conn: Any, was_idle: bool) -> None:
        pass


class FakeConn:
    reused = False
    parser = None

    def __init__(self, pool: FakePool) -> None:
        self.pool = pool
        self.sink: Any = None
        self.sent = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.sent += data

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class FakeTransport:
    """The client socket: what the real HTTP/1.1 writer (DownstreamProtocol) wrote."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class FakeProxy:
    """The request handler side of a client connection: takes the request it is given."""

    limits = LimitsConfig()
    draining = False

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.requests: list[tuple[ParsedRequest, Any]] = []

    def connection_opened(self, conn: Any) -> bool:
        return True

    def trusts(self, transport: Any) -> bool:
        return False

    def connection_closed(self, conn: Any) -> None:
        pass

    def handle(self, req: ParsedRequest, client: Any) -> None:
        self.requests.append((req, client))

    def rejected(self, *args: Any) -> None:
        raise AssertionError("the test's request was refused")


class FakeClient:
    """A real client connection over a fake socket, after one request has arrived."""

    def __init__(self, http11: bool = True) -> None:
        self.proxy = FakeProxy()
        self.transport = FakeTransport()
        self.conn = DownstreamProtocol(self.proxy)  # type: ignore[arg-type]
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]
        version = b"1.1" if http11 else b"1.0"
        self.conn.data_received(b"POST /v1/chat/completions HTTP/" + version
                                + b"\r\nhost: x\r\nx-request-id: rid\r\n"
                                b"content-length: 2\r\n\r\n{}")
        assert len(self.proxy.requests) == 1

    @property
    def writes(self) -> list[bytes]:
        return self.transport.writes

    @property
    def aborted(self) -> bool:
        return self.transport.aborted

    @property
    def keep_alive(self) -> bool:
        return self.conn.keep_alive


class Attempt:
    """The request side of an exchange: decides at the head, records the end."""

    def __init__(self, decide: Callable[[ResponseHead], Decision] | None = None,
                 client: FakeClient | None = None) -> None:
        self.decide = decide
        self.client = client
        self.heads: list[ResponseHead] = []
        self.written_at_head: list[int] = []
        self.ended: list[Exchange] = []

    def on_head(self, head: ResponseHead) -> Decision:
        self.heads.append(head)
        if self.client is not None:
            self.written_at_head.append(len(self.client.writes))
        if self.decide is not None:
            return self.decide(head)
        return make_tap("openai", "/v1/chat/completions", True), None, ()

    def on_end(self, ex: Exchange) -> None:
        self.ended.append(ex)

    def stream_error(self, error: Any) -> bytes | None:
        return None  # cut, as a client of a non-event stream is


def _exchange(client: FakeClient, attempt: Attempt, pool: FakePool,
              conn: FakeConn | None = None) -> Exchange:
    return Exchange(pool=pool, conn=conn or FakeConn(pool),  # type: ignore[arg-type]
                    client=client.conn, handler=attempt, max_head=65536,
                    sweeper=Sweeper(asyncio.get_running_loop(), 1.0))


def _run(pieces: list[bytes], client_http11: bool = True) -> tuple[Exchange, FakeClient, FakePool]:
    async def main() -> tuple[Exchange, FakeClient, FakePool]:
        pool = FakePool()
        client = FakeClient(client_http11)
        ex = _exchange(client, Attempt(), pool)
        ex.start(b"REQUEST")
        for p in pieces:
            if not ex.ended:
                ex.upstream_data(p)
                # the parser callbacks' pointer never names another exchange's parser
                assert feeding().parser in (None, ex._parser)
        return ex, client, pool

    return asyncio.run(main())


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [p for p in (data[a:b] for a, b in zip([0, *points], [*points, len(data)],
                                                  strict=True)) if p]


@settings(max_examples=500, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=60))
def test_verbatim_relay_ends_exactly_at_the_last_chunk_for_any_split(cuts: list[int]) -> None:
    ex, client, pool = _run(_split(HEAD + BODY, cuts))
    assert ex.ended and ex.outcome == "ok"
    out = b"".join(client.writes)
    head_end = out.index(b"\r\n\r\n") + 4
    assert out[head_end:] == BODY  # chunk frames forwarded untouched
    assert b"x-request-id: rid\r\n" in out[:head_end]
    assert pool.released == [True]  # the provider connection is reused
    assert ex.tap is not None
    usage = ex.tap.usage()
    assert usage is not None and usage.total_tokens == 17


def test_one_client_write_per_provider_read() -> None:
    reads = [HEAD + frame_chunk(EVENTS[0])] + [frame_chunk(e) for e in EVENTS[1:]] + [LAST_CHUNK]
    _ex, client, _ = _run(reads)
    assert len(client.writes) == len(reads)
    assert client.writes[0].endswith(frame_chunk(EVENTS[0]))


def test_stream_cut_mid_way_leaves_tap_with_everything_forwarded() -> None:
    reads = [HEAD + frame_chunk(EVENTS[0]), frame_chunk(EVENTS[1]), frame_chunk(EVENTS[2])[:10]]

    async def main() -> tuple[Exchange, FakeClient]:
        pool = FakePool()
        client = FakeClient()
        ex = _exchange(client, Attempt(), pool)
        ex.start(b"REQUEST")
        for r in reads:
            ex.upstream_data(r)
        ex.upstream_lost(None)
        return ex, client

    ex, client = asyncio.run(main())
    assert ex.outcome == "upstream_error" and client.aborted
    assert ex.tap is not None
    result = ex.tap.result()
    assert result.usage is None and result.completion_text == "w0 w1 "


def test_bytes_after_the_last_chunk_end_client_keep_alive() -> None:
    ex, client, pool = _run([HEAD + BODY + b"GARBAGE"])
    assert ex.ended and ex._parser.extra
    assert not client.keep_alive and pool.released == []  # closed, not pooled


def test_http10_client_gets_payload_without_chunk_framing() -> None:
    _ex, client, _ = _run([HEAD, BODY], client_http11=False)
    out = b"".join(client.writes)
    assert out.split(b"\r\n\r\n", 1)[1] == b"".join(EVENTS)
    assert b"connection: close" in out and b"transfer-encoding" not in out


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
def test_trailers_after_the_last_chunk_are_found_for_any_split(cuts: list[int]) -> None:
    body = b"".join(frame_chunk(e) for e in EVENTS) + b"0\r\nx-trailer: 1\r\n\r\n"
    ex, client, pool = _run(_split(HEAD + body, cuts))
    assert ex.ended and ex.outcome == "ok" and pool.released == [True]
    out = b"".join(client.writes)
    assert out[out.index(b"\r\n\r\n") + 4 :] == body


def test_empty_chunked_body_ends_at_once() -> None:
    ex, _client, pool = _run([HEAD + LAST_CHUNK])
    assert ex.ended and pool.released == [True]


def test_malformed_chunk_mid_stream_cuts_the_client_after_what_was_valid() -> None:
    good = frame_chunk(EVENTS[0])
    ex, client, pool = _run([HEAD, good, b"zz\r\nnot a chunk size\r\n"])
    assert ex.ended and ex.outcome == "upstream_error" and ex.error is not None
    assert client.aborted and not client.keep_alive  # a cut body, never a complete one
    assert pool.released == []  # the provider connection is closed, never pooled
    # What was valid went out; the bad read itself went out too (reads are forwarded
    # before llhttp walks them), and the abort tells the client the body is broken.
    out = b"".join(client.writes)
    assert out[out.index(b"\r\n\r\n") + 4 :].startswith(good)
    # The tap saw the event that reached the client (an estimate counts it).
    assert ex.tap is not None and ex.tap.result().completion_text == "w0 "


def test_malformed_chunk_in_the_head_read_sends_nothing() -> None:
    # Nothing is committed yet: the proxy can still answer with a clean 502.
    ex, client, pool = _run([HEAD + frame_chunk(EVENTS[0]) + b"zz\r\nnot a chunk size\r\n"])
    assert ex.ended and ex.outcome == "upstream_error" and not ex.committed
    assert client.writes == [] and not client.aborted and pool.released == []


def test_sweeper_walks_its_owners_collection_until_it_is_empty() -> None:
    class Item:
        def __init__(self) -> None:
            self.seen: list[float] = []

        def check_deadlines(self, now: float) -> None:
            self.seen.append(now)
            if len(self.seen) == 2:
                live.discard(self)  # the owner lets go of it, as the proxy does

    live: set[Item] = set()

    async def main() -> tuple[int, bool]:
        sweeper = Sweeper(asyncio.get_running_loop(), 0.01, live)
        item = Item()
        live.add(item)
        sweeper.arm()
        sweeper.arm()  # arming twice schedules one sweep
        await asyncio.sleep(0.1)
        stopped = sweeper._handle is None  # nothing left to sweep: no timer kept
        sweeper.close()
        return len(item.seen), stopped

    seen, stopped = asyncio.run(main())
    assert seen == 2 and stopped


# -- the decision point at the provider's head ------------------------------------------

def _retry_on_429(head: ResponseHead) -> Decision:
    if head.status == 429:
        return Retry(Outcome.RATE_LIMITED, UpstreamError("upstream answered 429"), 7.0)
    return make_tap("openai", "/v1/chat/completions", True), None, ()


def _attempt_run(reads: list[bytes], decide: Callable[[ResponseHead], Decision] | None,
                 reused: bool = False, lose: bool = False
                 ) -> tuple[Exchange, FakeClient, FakePool, FakeConn, Attempt]:
    async def main() -> tuple[Exchange, FakeClient, FakePool, FakeConn, Attempt]:
        pool = FakePool()
        conn = FakeConn(pool)
        conn.reused = reused
        client = FakeClient()
        attempt = Attempt(decide, client)
        ex = _exchange(client, attempt, pool, conn)
        ex.start(b"REQUEST")
        for r in reads:
            if not ex.ended:
                ex.upstream_data(r)
        if lose and not ex.ended:
            ex.upstream_lost(None)
        await asyncio.sleep(0)  # on_end comes on the next loop turn
        return ex, client, pool, conn, attempt

    return asyncio.run(main())


def test_head_decision_is_asked_before_any_byte_reaches_the_client() -> None:
    ex, client, pool, _conn, attempt = _attempt_run([HEAD + BODY], _retry_on_429)
    assert [h.status for h in attempt.heads] == [200]
    assert attempt.written_at_head == [0]  # nothing written when the question was asked
    assert ex.committed and ex.retry is None and ex.outcome == "ok"
    out = b"".join(client.writes)
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(BODY)
    assert attempt.ended == [ex] and pool.released == [True]


def test_retry_at_the_head_leaves_the_client_untouched() -> None:
    head = (b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
            b"retry-after: 7\r\ncontent-length: 20\r\n\r\n")
    ex, client, pool, conn, attempt = _attempt_run([head + b'{"error":"slow down"}'[:20]],
                                                   _retry_on_429)
    assert client.writes == [] and not client.aborted and client.keep_alive
    assert not ex.committed and ex.ended
    assert ex.retry is not None and ex.retry.reason == "rate_limited"
    assert ex.retry.retry_after == 7.0 and ex.outcome == "rate_limited"
    assert conn.closed and pool.released == []  # its body was never read: not reusable
    assert attempt.ended == [ex]  # the end is reported exactly once
    assert ex.bytes_out == 0 and ex.t_first_byte is None


def test_a_first_byte_timeout_leaves_the_client_untouched() -> None:
    async def main() -> tuple[Exchange, FakeClient, Attempt]:
        pool = FakePool()
        client = FakeClient()
        attempt = Attempt(_retry_on_429, client)
        ex = _exchange(client, attempt, pool)
        ex.start(b"REQUEST")
        ex.check_deadlines(ex.started + TimeoutsConfig().first_byte + 1)
        await asyncio.sleep(0)
        return ex, client, attempt

    ex, client, attempt = asyncio.run(main())
    assert ex.outcome == "upstream_timeout" and not ex.committed
    assert client.writes == [] and not client.aborted
    assert attempt.heads == [] and attempt.ended == [ex]


def test_a_dead_reused_connection_before_any_byte_asks_for_a_retry() -> None:
    ex, client, _pool, _conn, _attempt = _attempt_run([], None, reused=True, lose=True)
    assert ex.retry is not None and ex.retry.reason == "upstream_error"
    assert not ex.committed and client.writes == [] and not client.aborted


def test_an_exchange_that_has_sent_bytes_is_never_retried() -> None:
    # The same loss as above, on a reused connection, once the head went out.
    ex, client, _pool, _conn, _attempt = _attempt_run(
        [HEAD + frame_chunk(EVENTS[0])], None, reused=True, lose=True)
    assert ex.committed and ex.retry is None and ex.outcome == "upstream_error"
    assert client.aborted and b"".join(client.writes).startswith(b"HTTP/1.1 200")
    # ... and the request's lifecycle refuses any way back from STREAMING.
    life = Lifecycle()
    life.advance(Phase.AWAITING_HEAD)
    life.advance(Phase.STREAMING)
    for back in (Phase.CONNECTING, Phase.AWAITING_HEAD, Phase.ADMITTED):
        with pytest.raises(LifecycleError):
            life.advance(back)
    assert life.phase is Phase.STREAMING and life.committed


# -- the lifecycle table ----------------------------------------------------------------

def test_every_phase_can_reach_settled_and_settled_is_final() -> None:
    for start in Phase:
        seen, todo = {start}, [start]
        while todo:
            for nxt in TRANSITIONS[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert Phase.SETTLED in seen or start is Phase.SETTLED
    assert TRANSITIONS[Phase.SETTLED] == frozenset()
    assert TRANSITIONS[Phase.STREAMING] == {Phase.DRAINING}


def test_the_moves_a_failover_needs_are_legal_and_others_raise() -> None:
    life = Lifecycle()
    for phase in (Phase.AWAITING_HEAD, Phase.CONNECTING, Phase.AWAITING_HEAD,
                  Phase.AWAITING_HEAD, Phase.STREAMING, Phase.DRAINING, Phase.SETTLED):
        life.advance(phase)
    assert life.phase is Phase.SETTLED
    fresh = Lifecycle()
    with pytest.raises(LifecycleError, match="ADMITTED to SETTLED"):
        fresh.advance(Phase.SETTLED)  # a row is never queued before it is drained
    with pytest.raises(LifecycleError):
        fresh.advance(Phase.STREAMING)  # nothing streams without an attempt


@pytest.mark.parametrize(("lost", "safe"), [
    (None, False),  # a plain close 1.5 s after the write: the provider may have read it
    (BrokenPipeError(32, "Broken pipe"), True),  # the write failed: it never got there
    # A reset while reading: the provider may have read the request first.
    (ConnectionResetError(104, "Connection reset by peer"), False),
], ids=["late-close", "write-error", "read-reset"])
def test_replay_safety_of_a_reused_connection_lost_before_any_byte(
        lost: Exception | None, safe: bool) -> None:
    async def main() -> Exchange:
        pool = FakePool()
        conn = FakeConn(pool)
        conn.reused = True
        client = FakeClient()
        ex = _exchange(client, Attempt(None, client), pool, conn)
        ex.start(b"REQUEST")
        ex.started -= 1.5
        ex.upstream_lost(lost)
        await asyncio.sleep(0)
        return ex

    ex = asyncio.run(main())
    assert ex.retry is not None and ex.retry.replay_safe is safe
    assert ex.retry.cause == "reset" and not ex.committed
