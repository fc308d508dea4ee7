"""The relay between one client request and one provider response (one *attempt*).

An ``Exchange`` owns an upstream connection for the length of one response. It
is driven entirely by callbacks from the two protocols, so forwarding a body
chunk costs no task switch and no await:

* ``upstream_data`` -> parse the head once, ask the handler what to do with it,
  then write each read downstream as it arrives (verbatim when the framing allows)
  and feed the payload to the tap;
* ``pause`` / ``resume`` (the client's write-buffer pressure) -> stop and restart
  reading the provider, so a slow client never makes us buffer a whole response;
* ``client_gone`` -> abort the provider connection at once so it stops generating;
  or, under ``on_client_disconnect: drain``, ``drain`` -> keep reading the provider
  into a writer that discards, so the tap still sees the usage frame (up to a deadline).

The decision point: when the provider's head is complete and before a byte goes
downstream, the handler's ``on_head`` returns :class:`~sidecar.lifecycle.Proceed`
(relay it, with these body filters) or :class:`~sidecar.lifecycle.Retry` (end this
attempt, commit nothing). A failure before that point (timeout, broken connection,
garbage) also leaves the client untouched; after it, the only honest signal left is
to cut the client connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from enum import IntEnum
from time import perf_counter
from typing import TYPE_CHECKING, Final, Protocol

from sidecar.config import TimeoutsConfig
from sidecar.errors import SidecarError, UpstreamError, UpstreamProtocolError, UpstreamTimeout
from sidecar.handler import (
    FRAMING_CHUNKED,
    FRAMING_LENGTH,
    FRAMING_NONE,
    FRAMING_PAYLOAD,
    RawWriter,
    ResponseWriter,
)
from sidecar.heartbeat import PING, PING_CHUNK, due, frame_at_boundary, payload_at_boundary
from sidecar.http1 import (
    LAST_CHUNK,
    LLHTTP_ERROR,
    Feeding,
    LLHttpParser,
    ResponseHead,
    ResponseParser,
    feeding,
    frame_chunk,
)
from sidecar.lifecycle import BodyFilter, Decision, Outcome, Retry
from sidecar.retry import RetryReason

if TYPE_CHECKING:
    from sidecar.sse import Tap
    from sidecar.upstream import UpstreamConnection, UpstreamPool


class AttemptHandler(Protocol):
    """What an exchange asks of the request it serves."""

    # The committed response is an event stream (set by on_head): heartbeats may go to it.
    sse: bool

    def on_head(self, head: ResponseHead) -> Decision:
        """The provider's head is complete and nothing is committed: proceed or retry."""
        ...

    def on_end(self, ex: Exchange) -> None:
        """The attempt is over (called on the next loop turn, exactly once)."""
        ...

    def stream_error(self, error: SidecarError) -> bytes | None:
        """The event that tells an event-stream client its stream failed after the
        head (None: not an event stream, cut the connection instead)."""
        ...


class BodyMode(IntEnum):
    """How provider body bytes become client body bytes."""

    NONE = 0  # no body (1xx, 204, 304; HEAD never reaches a provider: API routes are POST)
    VERBATIM_CHUNKED = 1  # chunk frames forwarded untouched (the fast path)
    VERBATIM_LENGTH = 2  # content-length body forwarded untouched
    PAYLOAD = 3  # payload (usage chunk hidden, or an HTTP/1.0 client): the writer frames it


class Stage(IntEnum):
    """Where one attempt is; the request's own phases are in ``lifecycle``."""

    WAIT_HEAD = 0
    BODY = 1  # the head was accepted and committed to the client
    DONE = 2


# The members as module constants, which the per-request code uses: Python 3.11's
# EnumType defines __getattr__, so every `BodyMode.X` or `Stage.X` went through a
# Python-level hook (~800 instructions a lookup, against ~50 for a global; 17 lookups
# per request were ~3% of the sidecar's instructions in `python -m bench instructions`).
_MODE_NONE: Final = BodyMode.NONE
_MODE_VERBATIM_CHUNKED: Final = BodyMode.VERBATIM_CHUNKED
_MODE_VERBATIM_LENGTH: Final = BodyMode.VERBATIM_LENGTH
_MODE_PAYLOAD: Final = BodyMode.PAYLOAD
_WAIT_HEAD: Final = Stage.WAIT_HEAD
_BODY: Final = Stage.BODY
_DONE: Final = Stage.DONE
_OK: Final = Outcome.OK
_CLIENT_DISCONNECT: Final = Outcome.CLIENT_DISCONNECT
_UPSTREAM_ERROR: Final = Outcome.UPSTREAM_ERROR
_UPSTREAM_TIMEOUT: Final = Outcome.UPSTREAM_TIMEOUT
_CAUSE_RESET: Final = RetryReason.RESET
_CAUSE_FIRST_BYTE: Final = RetryReason.FIRST_BYTE_TIMEOUT


# Coarsest resolution of the upstream timeouts (the Sweeper's period).
SWEEP_MAX_INTERVAL = 1.0
# A kept-alive connection whose close comes this soon after our write (seconds of the
# loop's clock) closed before the provider could have read the request: the close was
# already on its way (the provider's idle timeout), so the request may go again. Any
# later close may follow a read, and the POST is not replayed.
STALE_CLOSE_WINDOW = 0.002
# Payload pieces (about one SSE event each) held before they go to the tap in one
# call. Bounds what a stream holds outside the tap to a few tens of KiB.
TAP_BATCH = 64


class _Discard:
    """The client of a drained response: it left, so every byte goes nowhere."""

    keep_alive = False
    verbatim_ok = False  # payload framing: the slow path, where the tap sees each read

    def send_head(self, status: int, reason: bytes, headers: object, framing: object,
                  length: int | None, extra: object = ()) -> None:
        pass

    def send_data(self, data: bytes) -> None:
        pass

    def end(self) -> None:
        pass

    def flush(self) -> int:
        return 0  # nothing reached a client: bytes_out stays what it got

    def verbatim_transport(self) -> RawWriter:
        raise AssertionError("a drained response has no verbatim path")

    def end_connection(self) -> None:
        pass

    def abort(self) -> None:
        pass


DISCARD: Final = _Discard()


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

    @staticmethod
    def interval_for(t: TimeoutsConfig) -> float:
        # Fine enough that no timeout (or heartbeat) fires later than a quarter of
        # itself past due.
        shortest = min(t.first_byte, t.idle, t.total)
        if t.heartbeat:
            shortest = min(shortest, t.heartbeat)
        return min(SWEEP_MAX_INTERVAL, shortest / 4)

    @classmethod
    def for_timeouts(cls, loop: asyncio.AbstractEventLoop, t: TimeoutsConfig,
                     live: Collection[HasDeadlines]) -> Sweeper:
        return cls(loop, cls.interval_for(t), live)

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
        "_parser",
        "_raw",
        "_remaining",
        "_t_read",
        "_t_seen",
        "_tail",
        "bytes_out",
        "client",
        "committed",
        "conn",
        "drain_until",
        "error",
        "gap",
        "handler",
        "head",
        "last_ping",
        "last_read",
        "mode",
        "outcome",
        "pool",
        "retry",
        "stage",
        "started",
        "stripper",
        "sweeper",
        "t_first_byte",
        "tap",
        "tap_bytes",
    )

    def __init__(
        self,
        *,
        pool: UpstreamPool,
        conn: UpstreamConnection,
        client: ResponseWriter,
        handler: AttemptHandler,
        max_head: int,
        sweeper: Sweeper,
    ) -> None:
        self.pool = pool
        self.conn = conn
        self.client = client
        self.handler = handler
        self.tap: Tap | None = None
        # Payload bytes fed to the tap: an estimate that could read none of them as
        # text (compressed, binary) says how many it had to leave out.
        self.tap_bytes = 0
        # The body filter (include_usage stripper or format translator), if any.
        self.stripper: BodyFilter | None = None
        self.sweeper = sweeper
        self.stage = _WAIT_HEAD
        self.mode = _MODE_NONE
        self.head: ResponseHead | None = None
        # Set where the head is accepted and never cleared: after the end, whether the
        # client has bytes of this attempt (then no retry and no clean error answer).
        self.committed = False
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
        self._llhttp: LLHttpParser | None = None
        self._feeding: Feeding | None = None
        self._remaining = 0  # content-length bytes still to come (-1: until close)
        self.bytes_out = 0
        self.t_first_byte: float | None = None
        self.started = 0.0
        # The time of the last read after the head (perf_counter), and as the last sweep
        # saw it: progress is noticed by the sweeper (last_read = the loop time when it
        # saw the mark move). The same clock read gives ``gap``, the longest pause between
        # two reads (seconds; -1: fewer than two), for the gap histogram of /metrics; it
        # replaced a read counter, so the gap costs ~7 bytecodes per read more than it.
        self.last_read = 0.0
        self._t_read = 0.0
        self._t_seen = 0.0
        self.gap = -1.0
        # SSE heartbeats (sidecar.heartbeat): when the last ": ping" went out, and the
        # last bytes relayed (a provider read on the verbatim path, else payload), which
        # tell the sweep whether the client's stream stands between two events.
        self.last_ping = 0.0
        self._tail = b""
        self.outcome: Outcome = _OK
        self.error: SidecarError | None = None
        # Set when the attempt ended with nothing committed and another may be made:
        # the head decision said so, or a reused connection was found dead.
        self.retry: Retry | None = None
        # Loop time by which a drain (client gone, provider still read) must end; 0: none.
        self.drain_until = 0.0

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
        if self.stage is _DONE:
            return
        if self.drain_until and now >= self.drain_until:
            # The drain ran out of time: cut it, as an abort would have at once.
            self.error = UpstreamTimeout("drained past timeouts.drain after the client left")
            self._end(reusable=False)
            return
        t = self.pool.timeouts
        if now - self.started >= t.total:
            what = "total"
        elif self.stage is _WAIT_HEAD:
            if now - self.started < t.first_byte:
                return
            what = "first byte"
        elif self._t_read != self._t_seen:
            self._t_seen = self._t_read
            self.last_read = now
            return
        elif now - self.last_read >= t.idle:
            what = "idle"
        else:
            if self.stage is _BODY and due(now, max(self.last_read, self.last_ping), t.heartbeat):
                self._heartbeat(now)
            return
        error = UpstreamTimeout(f"upstream {what} timeout")
        if what == "first byte":
            self.retry = Retry(_UPSTREAM_TIMEOUT, error, cause=_CAUSE_FIRST_BYTE)
        self._fail(error, _UPSTREAM_TIMEOUT)

    # -- upstream callbacks ---------------------------------------------------
    def upstream_data(self, data: bytes) -> None:
        if self._fast:
            # Most reads of a stream: llhttp walks the frames (C code, appending payload
            # to the parser's list), then the read goes to the client as it is. Parsed
            # first: a read that holds the end of our response and the start of another
            # (a desynced provider) must not reach the client whole.
            t = perf_counter()
            if t - self._t_read > self.gap:  # rarely true: the subtraction is redone then
                self.gap = t - self._t_read
            self._t_read = t
            # Left set after the read (one store per read less): every feed on this
            # thread sets it first, and llhttp calls back only inside a feed.
            parser = self._feeding.parser = self._parser  # type: ignore[union-attr]
            held = len(parser.pieces)
            try:
                self._llhttp.feed_data(data)  # type: ignore[union-attr]  # set with _fast
            except LLHTTP_ERROR as exc:
                error = parser.body_error(exc)
                if error is not None:
                    self._fail(error, _UPSTREAM_ERROR)
                    return
            if parser.extra:
                self._last_read_reframed(held)
            else:
                self.bytes_out += len(data)
                self._raw.write(data)  # type: ignore[union-attr]  # set with _fast
                self._tail = data  # a reference, no copy: read only by a heartbeat sweep
            if parser.done or len(parser.pieces) >= TAP_BATCH:
                self._chunked_read_done()
            return
        try:
            if self.stage is _BODY:
                t = perf_counter()
                if t - self._t_read > self.gap:
                    self.gap = t - self._t_read
                self._t_read = t
                self._body(data)
            elif self.stage is _WAIT_HEAD:
                self._head_data(data)
            # else: bytes after the end of a response; the connection is already
            # closed or back in the pool's hands and reports them there.
        except UpstreamProtocolError as exc:
            if not self.committed:
                # Bytes came back, so the provider read the request: not replay-safe.
                self.retry = Retry(_UPSTREAM_ERROR, exc, cause=_CAUSE_RESET)
            self._fail(exc, _UPSTREAM_ERROR)

    def upstream_lost(self, exc: Exception | None) -> None:
        if self.stage is _DONE:
            return
        head = self.head
        if self.stage is _BODY and self.mode is _MODE_PAYLOAD and head is not None \
                and not head.chunked and head.content_length is None:
            # Read-until-close body: the close *is* the end of the response.
            self._finish_body()
            self._flush_out()
            return
        error = UpstreamError("upstream closed the connection mid-response")
        if self.stage is _WAIT_HEAD and not self._parser.seen:
            # No byte came back. Only a kept-alive connection that failed on our write
            # (EPIPE: the peer had closed it before the request went out) or closed
            # before the provider could have read the request proves the request was
            # not processed. A reset while reading (ECONNRESET) or any later close may
            # come after the provider started generating, so replaying the POST is a
            # failover decision (cause RESET), never an invisible retry.
            safe = self.conn.reused and (
                isinstance(exc, BrokenPipeError)
                or self.sweeper.loop.time() - self.started <= STALE_CLOSE_WINDOW)
            self.retry = Retry(_UPSTREAM_ERROR, error, cause=_CAUSE_RESET, replay_safe=safe)
        self._fail(error, _UPSTREAM_ERROR)

    # -- client callbacks -----------------------------------------------------
    @property
    def ended(self) -> bool:
        return self.stage is _DONE

    def client_gone(self) -> None:
        if self.stage is _DONE:
            return
        self.outcome = _CLIENT_DISCONNECT
        self._end(reusable=False)

    def drain(self, until: float) -> None:
        """The client left: read the rest of the response anyway, discarding it, so the
        tap sees the provider's usage; cut at loop time ``until`` (check_deadlines).
        From here on the exchange never touches the client connection again."""
        if self.stage is _DONE:
            return
        self.outcome = _CLIENT_DISCONNECT
        self.drain_until = until
        if self._fast:
            # Leave the verbatim path: reads now go through _body, whose parser feed
            # and tap see each read; what the fast path held goes to the tap first.
            self._fast = False
            self._raw = self._llhttp = self._feeding = None
            self._tap_pieces()
        self.client = DISCARD
        self.conn.resume_reading()  # it may have been paused by the client's backpressure

    def pause(self) -> None:
        self.conn.pause_reading()

    def resume(self) -> None:
        self.conn.resume_reading()

    # -- head: the decision point -----------------------------------------------
    def _head_data(self, data: bytes) -> None:
        parser = self._parser
        parser.feed(data)
        head = parser.head
        if head is None:
            return
        self.head = head
        decision = self.handler.on_head(head)
        if isinstance(decision, Retry):
            # Nothing was written: the client never learns of this attempt.
            self.retry = decision
            self.error = decision.error
            self.outcome = decision.reason
            self._end(reusable=False)
            return
        self.stage = _BODY
        self.committed = True
        self._t_read = perf_counter()
        self.tap, self.stripper, extra = decision
        self._choose_mode(head)
        self._write_head_and(data[parser.body_start:], extra)

    def _choose_mode(self, head: ResponseHead) -> None:
        if not head.has_body:
            self.mode = _MODE_NONE
            return
        if not head.chunked:
            self._remaining = head.content_length if head.content_length is not None else -1
        # A head read that already holds the whole chunked body and more (a second
        # response in the same read) is re-framed: only our payload reaches the client.
        if self.stripper is not None or not self.client.verbatim_ok \
                or (not head.chunked and head.content_length is None) \
                or (head.chunked and self._parser.extra):
            self.mode = _MODE_PAYLOAD
        elif head.chunked:
            self.mode = _MODE_VERBATIM_CHUNKED
        else:
            self.mode = _MODE_VERBATIM_LENGTH

    def _write_head_and(self, rest: bytes, extra: tuple[tuple[bytes, bytes], ...]) -> None:
        """The head was accepted, with ``rest`` the body bytes of the same read.

        For a chunked body the parser has already taken that read's payload apart.
        """
        head = self.head
        assert head is not None
        mode = self.mode
        # Queued, not written: it shares one write with the first body bytes.
        self.client.send_head(
            head.status, head.reason, head.headers,
            FRAMING_CHUNKED if mode is _MODE_VERBATIM_CHUNKED
            else FRAMING_LENGTH if mode is _MODE_VERBATIM_LENGTH
            else FRAMING_PAYLOAD if mode is _MODE_PAYLOAD
            else FRAMING_NONE,
            head.content_length,
            extra,
        )
        # Relayed: the headers are not needed for the rest of the stream (~0.4 KiB).
        head.headers = ()
        if mode is _MODE_NONE:
            self._finish_body(out_of_step=bool(rest) or self._parser.extra,
                              reusable_hint=not rest and not self._parser.extra
                              and head.content_length in (None, 0))
            self._flush_out()
            return
        if head.chunked:
            if mode is _MODE_VERBATIM_CHUNKED:
                if rest:
                    self.client.send_data(rest)
                    self._tail = rest
                self._flush_out()
                self._raw = self.client.verbatim_transport()
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
        extra = 0 <= remaining < len(data)
        if extra:
            data = data[:remaining]
        self._emit_payload([data])
        done = False
        if remaining >= 0:
            self._remaining = remaining - len(data)
            done = self._remaining == 0
        if done:
            self._finish_body(reusable_hint=not extra, out_of_step=extra)
        self._flush_out()
        tap = self.tap
        if tap is not None:
            self.tap_bytes += len(data)
            tap.feed(data)

    def _last_read_reframed(self, held: int) -> None:
        """A verbatim chunked read that ended our response and went on with bytes
        that are not ours: the client gets this read's payload in frames of our own and
        the last chunk (trailers, if any, are dropped), never the provider's bytes."""
        payload = b"".join(self._parser.pieces[held:])
        data = (frame_chunk(payload) if payload else b"") + LAST_CHUNK
        self.bytes_out += len(data)
        self._raw.write(data)  # type: ignore[union-attr]  # set with _fast

    def _chunked_read_done(self) -> None:
        """After a verbatim chunked read: end at the last chunk; feed the tap in batches.

        The payload pieces stay in the parser's list (llhttp appends them without any
        Python code) and go to the tap as one join every TAP_BATCH pieces and at the
        end, so a read costs no tap call at all.
        """
        parser = self._parser
        if parser.done:
            self._tap_pieces()
            self._finish_body(reusable_hint=not parser.extra, out_of_step=parser.extra)
        elif len(parser.pieces) >= TAP_BATCH:
            self._tap_pieces()

    def _tap_pieces(self) -> None:
        pieces = self._parser.pieces
        if not pieces:
            return
        tap = self.tap
        if tap is not None:
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            self.tap_bytes += len(data)
            tap.feed(data)
        pieces.clear()

    def _reframe_pieces(self) -> None:
        """A chunked body whose framing or content changes on the way: one frame per read."""
        parser = self._parser
        pieces = parser.take()
        self._emit_payload(pieces)
        if parser.done:
            self._finish_body(reusable_hint=not parser.extra, out_of_step=parser.extra)
        self._flush_out()
        tap = self.tap
        if tap is not None:
            for piece in pieces:
                self.tap_bytes += len(piece)
                tap.feed(piece)

    def _emit_payload(self, pieces: list[bytes]) -> None:
        """Queue one read's body: as it is (length framing), or as payload to frame."""
        stripper = self.stripper
        if stripper is not None:
            out = b"".join([stripper.feed(piece) for piece in pieces])
        elif len(pieces) == 1:
            out = pieces[0]
        else:
            out = b"".join(pieces)
        if out:
            self.client.send_data(out)
            self._tail = out

    def _heartbeat(self, now: float) -> None:
        """The provider has been silent for timeouts.heartbeat: give an event-stream
        client an SSE comment, where one can stand. Written downstream only: the tap
        never sees it, so the meter's usage is the provider's alone."""
        if not self.handler.sse or self.drain_until:
            return  # not an event stream, or its client has left (a drain)
        mode = self.mode
        if mode is _MODE_VERBATIM_CHUNKED:
            if not frame_at_boundary(self._tail):
                return
            self.client.send_data(PING_CHUNK)  # the provider's framing: a frame of our own
        elif mode is _MODE_PAYLOAD:
            # What a body filter (usage stripper, translator) returned so far: a filter
            # holding part of an event has returned only whole ones, so the tail tells.
            if not payload_at_boundary(self._tail):
                return
            self.client.send_data(PING)  # the writer frames it
        else:
            return  # a content-length body has no room for bytes of ours
        self._flush_out()
        self.last_ping = now

    def _flush_out(self) -> None:
        """Write everything queued for the client in one transport write."""
        n = self.client.flush()
        if n:
            if self.t_first_byte is None:
                self.t_first_byte = perf_counter()  # the row's clock (see RequestContext)
            self.bytes_out += n

    def _finish_body(self, reusable_hint: bool = True, out_of_step: bool = False) -> None:
        if self.stage is _DONE:
            return
        if out_of_step:
            # Bytes came after the end of the response (never relayed): the provider is
            # out of step, so its connection is closed, never reused, and the client's
            # ends after this response, as a precaution.
            self.client.end_connection()
        if self.stripper is not None:
            self.client.send_data(self.stripper.flush())
        self.client.end()
        head = self.head
        reusable = reusable_hint and head is not None and head.keep_alive
        self._end(reusable=reusable)

    # -- endings ------------------------------------------------------------------
    def _fail(self, error: SidecarError, outcome: Outcome) -> None:
        if self.stage is _DONE:
            return
        self.error = error
        self.outcome = outcome
        if self.committed:
            self._tell_client(error)
        self._end(reusable=False)

    def _tell_client(self, error: SidecarError) -> None:
        """The client already has a head. An event stream that stopped between two
        frames ends cleanly, with an error event as its last event (what SDKs read as
        a stream error); anything else is cut, so the client sees a truncated body
        rather than a complete one."""
        mode = self.mode
        if mode is _MODE_VERBATIM_CHUNKED:
            self._tap_pieces()  # before the probe: the tap must see what was forwarded
        event = self.handler.stream_error(error) \
            if mode is _MODE_PAYLOAD or mode is _MODE_VERBATIM_CHUNKED else None
        if event is not None and mode is _MODE_VERBATIM_CHUNKED \
                and self._parser.ends_cleanly_here():
            self.client.send_data(frame_chunk(event) + LAST_CHUNK)  # frames of our own
        elif event is not None and mode is _MODE_PAYLOAD:
            self.client.send_data(event)  # the writer frames it
            self.client.end()
        else:
            self._flush_out()
            self.client.abort()
            return
        self._flush_out()
        self.client.end_connection()  # what the provider left unsaid: start afresh

    def _end(self, reusable: bool) -> None:
        self.stage = _DONE
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
        # Not called inline: _end can run mid-callback (inside a read, before that
        # read's last bytes are flushed), and what it starts next must come after.
        self.sweeper.loop.call_soon(self.handler.on_end, self)
