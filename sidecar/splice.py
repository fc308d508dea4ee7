"""The relay between one client request and one provider response.

An ``Exchange`` owns an upstream connection for the length of one response. It
is driven entirely by callbacks from the two protocols, so forwarding a body
chunk costs no task switch and no await:

* ``upstream_data`` -> parse the head once, then write each read downstream as
  it arrives (verbatim when the framing allows) and feed the payload to the tap;
* ``pause`` / ``resume`` (from the client's ``pause_writing``/``resume_writing``)
  -> stop and restart reading the provider, so a slow client never makes us
  buffer a whole response;
* ``client_gone`` -> abort the provider connection at once so it stops generating.

The response head goes downstream only when the provider's head has arrived:
until then nothing is committed, which is what later failover builds on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from enum import IntEnum
from time import perf_counter
from typing import TYPE_CHECKING, Final, Protocol

import httptools

from sidecar.config import TimeoutsConfig
from sidecar.errors import SidecarError, UpstreamError, UpstreamProtocolError, UpstreamTimeout
from sidecar.http1 import (
    HOP_BY_HOP,
    LAST_CHUNK,
    Feeding,
    ResponseHead,
    ResponseParser,
    feeding,
    frame_chunk,
)

if TYPE_CHECKING:
    from sidecar.sse import Tap, UsageChunkStripper
    from sidecar.upstream import UpstreamConnection, UpstreamPool

    # Given the provider's response head, the usage tap and (when the stream must be
    # changed) the stripper for this body: an error answer to a streaming request is
    # plain JSON, so neither can be chosen before the head arrives.
    BodyFilters = Callable[[ResponseHead], tuple[Tap | None, UsageChunkStripper | None]]


class RawWriter(Protocol):
    def write(self, data: bytes) -> object: ...


class ClientSide(Protocol):
    """What the exchange needs from the downstream connection."""

    def write(self, data: bytes | memoryview) -> None: ...

    # The transport itself, for the verbatim fast path: its write is called with no
    # Python frame between. The exchange uses it only while it is live, which the
    # client connection outlives.
    @property
    def raw_transport(self) -> RawWriter: ...

    def abort(self) -> None: ...


class BodyMode(IntEnum):
    """How provider body bytes become client body bytes."""

    NONE = 0  # no body (1xx, 204, 304; HEAD never reaches a provider: API routes are POST)
    VERBATIM_CHUNKED = 1  # chunk frames forwarded untouched (the fast path)
    VERBATIM_LENGTH = 2  # content-length body forwarded untouched
    REFRAME_CHUNKED = 3  # payload changed (usage chunk hidden) or unframed: re-chunk
    RAW_UNTIL_CLOSE = 4  # HTTP/1.0 client: payload bytes, then close


# The members as module constants, which the per-request code uses: Python 3.11's
# EnumType defines __getattr__, so every `BodyMode.X` or `Phase.X` went through a
# Python-level hook (~800 instructions a lookup, against ~50 for a global; 17 lookups
# per request were ~3% of the sidecar's instructions in `python -m bench instructions`).
_MODE_NONE: Final = BodyMode.NONE
_MODE_VERBATIM_CHUNKED: Final = BodyMode.VERBATIM_CHUNKED
_MODE_VERBATIM_LENGTH: Final = BodyMode.VERBATIM_LENGTH
_MODE_REFRAME_CHUNKED: Final = BodyMode.REFRAME_CHUNKED
_MODE_RAW_UNTIL_CLOSE: Final = BodyMode.RAW_UNTIL_CLOSE


class Phase(IntEnum):
    WAIT_HEAD = 0
    BODY = 1
    DONE = 2


_PHASE_WAIT_HEAD: Final = Phase.WAIT_HEAD
_PHASE_BODY: Final = Phase.BODY
_PHASE_DONE: Final = Phase.DONE


# Coarsest resolution of the upstream timeouts (the Sweeper's period).
SWEEP_MAX_INTERVAL = 1.0
# Payload pieces (about one SSE event each) held before they go to the tap in one
# call. Bounds what a stream holds outside the tap to a few tens of KiB.
TAP_BATCH = 64

# Response headers we never pass back: hop-by-hop plus framing we set ourselves.
_DROP_RESPONSE = HOP_BY_HOP | {b"content-length", b"x-request-id"}


class HasDeadlines(Protocol):
    def check_deadlines(self, now: float) -> None: ...


class Sweeper:
    """Checks the deadlines of everything in ``live`` on one periodic timer.

    A timer per exchange cost a TimerHandle (~0.5 KiB) per open stream plus a
    schedule and a cancel per request; one sweep does the same work with a
    resolution of ``interval`` seconds. ``live`` is the owner's own collection of
    what is in flight (the proxy's requests, each asking its exchange), not a set of
    the sweeper's: a second entry per open stream was ~50 bytes at 10,000 streams.
    """

    __slots__ = ("_handle", "interval", "live", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float,
                 live: Collection[HasDeadlines] = ()) -> None:
        self.loop = loop
        self.interval = interval
        self.live = live
        self._handle: asyncio.TimerHandle | None = None

    @classmethod
    def for_timeouts(cls, loop: asyncio.AbstractEventLoop, t: TimeoutsConfig,
                     live: Collection[HasDeadlines]) -> Sweeper:
        # Fine enough that no timeout fires later than a quarter of itself past due.
        shortest = min(t.first_byte, t.idle, t.total)
        return cls(loop, min(SWEEP_MAX_INTERVAL, shortest / 4), live)

    def arm(self) -> None:
        """Make sure a sweep is coming (an exchange started); sweeps stop when
        ``live`` is empty."""
        if self._handle is None:
            self._handle = self.loop.call_later(self.interval, self._sweep)

    def _sweep(self) -> None:
        self._handle = None
        now = self.loop.time()
        for item in list(self.live):
            item.check_deadlines(now)
        if self.live:
            self._handle = self.loop.call_later(self.interval, self._sweep)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class Exchange:
    __slots__ = (
        "_fast",
        "_feeding",
        "_llhttp",
        "_out",
        "_parser",
        "_raw",
        "_remaining",
        "bytes_out",
        "client",
        "client_http11",
        "client_keep_alive",
        "conn",
        "error",
        "extra_after_body",
        "filters",
        "head",
        "head_sent",
        "last_read",
        "mode",
        "on_end",
        "outcome",
        "phase",
        "pool",
        "reads",
        "reads_seen",
        "request_id",
        "stale",
        "started",
        "stripper",
        "sweeper",
        "t_first_byte",
        "tap",
    )

    def __init__(
        self,
        *,
        pool: UpstreamPool,
        conn: UpstreamConnection,
        client: ClientSide,
        client_http11: bool,
        client_keep_alive: bool,
        request_id: bytes,
        filters: BodyFilters,
        max_head: int,
        sweeper: Sweeper,
    ) -> None:
        self.pool = pool
        self.conn = conn
        self.client = client
        self.client_http11 = client_http11
        self.client_keep_alive = client_keep_alive
        self.request_id = request_id
        self.filters: BodyFilters | None = filters
        self.tap: Tap | None = None
        self.stripper: UsageChunkStripper | None = None
        self.sweeper = sweeper
        self.phase = _PHASE_WAIT_HEAD
        self.mode = _MODE_NONE
        self.head: ResponseHead | None = None
        self.head_sent = False
        parser = conn.parser
        if parser is None:
            parser = conn.parser = ResponseParser(max_head)
        else:
            parser.reset(max_head)  # a kept-alive connection: its last response ended clean
        self._parser = parser
        # Set while the body is relayed verbatim chunked: upstream_data's inline path,
        # which writes with the client transport's own write.
        self._fast = False
        # The objects the fast path calls, not their bound methods: a method called
        # straight off its object allocates nothing, while a stored bound method is
        # ~64 bytes on every open stream.
        self._raw: RawWriter | None = None
        self._llhttp: httptools.HttpResponseParser | None = None
        self._feeding: Feeding | None = None
        self._remaining = 0  # content-length bytes still to come (-1: until close)
        # Bytes for the client from the current provider read, written at once.
        # Made when something is queued and dropped when flushed: a verbatim stream
        # queues only its head, and an empty list on every open stream is 56 bytes.
        self._out: list[bytes | memoryview] | None = None
        self.bytes_out = 0
        self.t_first_byte: float | None = None
        self.started = 0.0
        # Reads so far, and as the last sweep saw them: progress is noticed by the
        # sweeper (last_read = when it saw the count move), not stamped per read.
        self.last_read = 0.0
        self.reads = 0
        self.reads_seen = 0
        self.outcome = "ok"
        self.error: SidecarError | None = None
        self.stale = False  # a reused connection died before any byte: safe to retry
        self.extra_after_body = False
        # Called once, on the next loop turn, when the exchange has ended; a plain
        # callback rather than a Future (one allocation and one hop less per request).
        self.on_end: Callable[[Exchange], None] | None = None

    # -- start --------------------------------------------------------------
    def start(self, request: bytes) -> None:
        conn = self.conn
        conn.sink = self
        # The sweeper's loop: asyncio.get_running_loop() costs a getpid() system call.
        self.started = self.last_read = self.sweeper.loop.time()
        conn.write(request)
        self.sweeper.arm()

    # -- deadlines: checked by the shared Sweeper, so a chunk only stores a timestamp
    def check_deadlines(self, now: float) -> None:
        if self.phase is _PHASE_DONE:
            return
        t = self.pool.timeouts
        if now - self.started >= t.total:
            what = "total"
        elif self.phase is _PHASE_WAIT_HEAD:
            if now - self.started < t.first_byte:
                return
            what = "first byte"
        elif self.reads != self.reads_seen:
            self.reads_seen = self.reads
            self.last_read = now
            return
        elif now - self.last_read >= t.idle:
            what = "idle"
        else:
            return
        self._fail(UpstreamTimeout(f"upstream {what} timeout"), "upstream_timeout")

    # -- upstream callbacks ---------------------------------------------------
    def upstream_data(self, data: bytes) -> None:
        self.reads += 1
        if self._fast:
            # Most reads of a stream: written to the client as they are, then llhttp
            # walks the frames (C code, appending payload to the parser's list).
            self.bytes_out += len(data)
            self._raw.write(data)  # type: ignore[union-attr]  # set with _fast
            # Left set after the read (one store per read less): every feed on this
            # thread sets it first, and llhttp calls back only inside a feed.
            parser = self._feeding.parser = self._parser  # type: ignore[union-attr]
            try:
                self._llhttp.feed_data(data)  # type: ignore[union-attr]  # set with _fast
            except httptools.HttpParserError as exc:
                error = parser.body_error(exc)
                if error is not None:
                    self._fail(error, "upstream_error")
                    return
            if parser.done or len(parser.pieces) >= TAP_BATCH:
                self._chunked_read_done()
            return
        try:
            if self.phase is _PHASE_BODY:
                self._body(data)
            elif self.phase is _PHASE_WAIT_HEAD:
                self._head_data(data)
            else:
                # Bytes after the end of a response: the connection is not reusable.
                self.extra_after_body = True
        except UpstreamProtocolError as exc:
            self._fail(exc, "upstream_error")

    def upstream_lost(self, exc: Exception | None) -> None:
        if self.phase is _PHASE_DONE:
            return
        if self.phase is _PHASE_BODY and self.mode is _MODE_RAW_UNTIL_CLOSE \
                and self.head is not None and not self.head.chunked \
                and self.head.content_length is None:
            # Read-until-close body: the close *is* the end of the response.
            self._finish_body()
            self._flush_out()
            return
        if self.phase is _PHASE_WAIT_HEAD and not self._parser.seen and self.conn.reused:
            self.stale = True
        self._fail(UpstreamError("upstream closed the connection mid-response"), "upstream_error")

    # -- client callbacks -----------------------------------------------------
    @property
    def ended(self) -> bool:
        return self.phase is _PHASE_DONE

    def client_gone(self) -> None:
        if self.phase is _PHASE_DONE:
            return
        self.outcome = "client_disconnect"
        self._end(reusable=False)

    def pause(self) -> None:
        self.conn.pause_reading()

    def resume(self) -> None:
        self.conn.resume_reading()

    # -- head -------------------------------------------------------------------
    def _head_data(self, data: bytes) -> None:
        parser = self._parser
        parser.feed(data)
        head = parser.head
        if head is None:
            return
        self.head = head
        self.phase = _PHASE_BODY
        self._choose_mode(head)
        self._write_head_and(data[parser.body_start:])

    def _choose_mode(self, head: ResponseHead) -> None:
        if not head.has_body:
            self.mode = _MODE_NONE
            return
        filters, self.filters = self.filters, None  # used once; let it go
        assert filters is not None
        self.tap, self.stripper = filters(head)
        if not head.chunked:
            self._remaining = head.content_length if head.content_length is not None else -1
        if not self.client_http11:
            self.mode = _MODE_RAW_UNTIL_CLOSE
            self.client_keep_alive = False
        elif self.stripper is not None or (not head.chunked and head.content_length is None):
            self.mode = _MODE_REFRAME_CHUNKED
        elif head.chunked:
            self.mode = _MODE_VERBATIM_CHUNKED
        else:
            self.mode = _MODE_VERBATIM_LENGTH

    def _client_head(self, head: ResponseHead) -> bytes:
        parts = [b"HTTP/1.1 %d %b\r\n" % (head.status, head.reason)]
        for name, value in head.headers:
            if name in _DROP_RESPONSE:
                if name == b"x-request-id":
                    parts += (b"x-upstream-request-id: ", value, b"\r\n")
                continue
            parts += (name, b": ", value, b"\r\n")
        mode = self.mode
        if mode is _MODE_VERBATIM_CHUNKED or mode is _MODE_REFRAME_CHUNKED:
            parts.append(b"transfer-encoding: chunked\r\n")
        elif mode is _MODE_VERBATIM_LENGTH or (
            mode is _MODE_NONE and head.content_length is not None
        ):
            parts.append(b"content-length: %d\r\n" % (head.content_length or 0))
        elif mode is _MODE_NONE and head.has_body:
            parts.append(b"content-length: 0\r\n")
        if not self.client_keep_alive:
            parts.append(b"connection: close\r\n")
        parts += (b"x-request-id: ", self.request_id, b"\r\n\r\n")
        return b"".join(parts)

    def _write_head_and(self, rest: bytes) -> None:
        """The head just completed, with ``rest`` the body bytes of the same read.

        For a chunked body the parser has already taken that read's payload apart.
        """
        head = self.head
        assert head is not None
        self.head_sent = True
        # Queued, not written: it shares one write with the first body bytes.
        self._queue(self._client_head(head))
        # Relayed: the headers are not needed for the rest of the stream (~0.4 KiB).
        head.headers = ()
        if self.mode is _MODE_NONE:
            self._finish_body(reusable_hint=not rest and not self._parser.extra
                              and head.content_length in (None, 0))
            self._flush_out()
            return
        if head.chunked:
            if self.mode is _MODE_VERBATIM_CHUNKED:
                if rest:
                    self._queue(rest)
                self._flush_out()
                self._raw = self.client.raw_transport
                self._llhttp = self._parser.llhttp
                self._feeding = feeding()
                self._fast = True
                self._chunked_read_done()
            else:
                self._reframe_pieces()
        else:
            self._parser.pieces.clear()  # a length-framed body is counted here, not there
            if rest:
                self._body(rest)
            else:
                self._flush_out()

    # -- body -------------------------------------------------------------------
    def _body(self, data: bytes) -> None:
        """One provider read: relay it, write once, and only then let the tap look at it."""
        if self.head is not None and self.head.chunked:
            self._parser.feed(data)
            self._reframe_pieces()
            return
        # content-length or read-until-close body: the read is all payload
        remaining = self._remaining
        if 0 <= remaining < len(data):
            self.extra_after_body = True
            data = data[:remaining]
        if self.mode is _MODE_VERBATIM_LENGTH:
            self._queue(data)
        else:
            self._emit_payload([data])
        done = False
        if remaining >= 0:
            self._remaining = remaining - len(data)
            done = self._remaining == 0
        if done:
            self._finish_body()
        self._flush_out()
        tap = self.tap
        if tap is not None:
            tap.feed(data)

    def _chunked_read_done(self) -> None:
        """After a verbatim chunked read: end at the last chunk; feed the tap in batches.

        The payload pieces stay in the parser's list (llhttp appends them without any
        Python code) and go to the tap as one join every TAP_BATCH pieces and at the
        end, so a read costs no tap call at all.
        """
        parser = self._parser
        if parser.done:
            self._tap_pieces()
            if parser.extra:
                # Bytes after the last chunk already went to the client: it must not
                # read them as the start of its next response.
                self.extra_after_body = True
                self.client_keep_alive = False
            self._finish_body()
        elif len(parser.pieces) >= TAP_BATCH:
            self._tap_pieces()

    def _tap_pieces(self) -> None:
        pieces = self._parser.pieces
        if not pieces:
            return
        tap = self.tap
        if tap is not None:
            tap.feed(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        pieces.clear()

    def _reframe_pieces(self) -> None:
        """A chunked body whose framing or content changes on the way: one frame per read."""
        parser = self._parser
        pieces = parser.take()
        self._emit_payload(pieces)
        if parser.done:
            if parser.extra:
                self.extra_after_body = True
            self._finish_body()
        self._flush_out()
        tap = self.tap
        if tap is not None:
            for piece in pieces:
                tap.feed(piece)

    def _emit_payload(self, pieces: list[bytes]) -> None:
        """Queue payload for the modes that change framing or content: one frame per read."""
        stripper = self.stripper
        payload: bytes | memoryview
        if stripper is not None:
            payload = b"".join([stripper.feed(piece) for piece in pieces])
        elif len(pieces) == 1:
            payload = pieces[0]
        else:
            payload = b"".join(pieces)
        if not payload:
            return
        if self.mode is _MODE_REFRAME_CHUNKED:
            self._queue(frame_chunk(payload))
        else:
            self._queue(bytes(payload))

    def _queue(self, data: bytes | memoryview) -> None:
        out = self._out
        if out is None:
            self._out = [data]
        else:
            out.append(data)

    def _flush_out(self) -> None:
        """Write everything queued for the client in one transport write."""
        out = self._out
        if out is None:
            return
        self._out = None
        data = out[0] if len(out) == 1 else b"".join(out)
        if not data:
            return
        if self.t_first_byte is None:
            self.t_first_byte = perf_counter()  # the row's clock (see RequestContext)
        self.bytes_out += len(data)
        self.client.write(data)

    def _finish_body(self, reusable_hint: bool = True) -> None:
        if self.phase is _PHASE_DONE:
            return
        tail = b""
        if self.stripper is not None:
            rest = self.stripper.flush()
            if rest:
                tail = frame_chunk(rest) if self.mode is _MODE_REFRAME_CHUNKED else rest
        if self.mode is _MODE_REFRAME_CHUNKED:
            tail += LAST_CHUNK
        if tail:
            self._queue(tail)
        head = self.head
        reusable = (
            reusable_hint
            and head is not None
            and head.keep_alive
            and not self.extra_after_body
        )
        self._end(reusable=reusable)

    # -- endings ------------------------------------------------------------------
    def _fail(self, error: SidecarError, outcome: str) -> None:
        if self.phase is _PHASE_DONE:
            return
        self.error = error
        self.outcome = outcome
        if self.head_sent:
            # The client already has a head: the only honest signal left is to cut
            # the connection so it sees a truncated body, not a complete one.
            self._flush_out()
            self.client_keep_alive = False
            self.client.abort()
        self._end(reusable=False)

    def _end(self, reusable: bool) -> None:
        self.phase = _PHASE_DONE
        self._fast = False
        self._raw = self._llhttp = self._feeding = None
        if self.mode is _MODE_VERBATIM_CHUNKED:
            self._tap_pieces()  # cut short: the tap must see every byte the client got
        conn = self.conn
        if conn.sink is self:
            conn.sink = None
        if reusable:
            self.pool.release(conn, True)
        else:
            conn.close()
        on_end = self.on_end
        if on_end is not None:
            self.on_end = None
            # Not called inline: _end can run mid-callback (inside a read, before that
            # read's last bytes are flushed), and what it starts next must come after.
            self.sweeper.loop.call_soon(on_end, self)
