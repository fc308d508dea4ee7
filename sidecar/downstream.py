"""Client side, HTTP/1.1: an asyncio.Protocol that reads requests and writes responses.

Requests are read by the sans-IO :class:`~sidecar.request_reader.RequestReader` and
handed, one at a time, to the :class:`~sidecar.handler.RequestHandler` (the proxy).
The connection is the proxy's :class:`~sidecar.handler.ClientSide`: it writes the
response through the :class:`~sidecar.handler.ResponseWriter` methods (HTTP/1.1
framing lives here, nowhere else) and reports the client's going away and its
write-buffer pressure to the request in flight through ``ClientEvents``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, cast

from sidecar.errors import Overloaded, RequestTimeout, SidecarError
from sidecar.handler import (
    FRAMING_CHUNKED,
    FRAMING_LENGTH,
    FRAMING_NONE,
    FRAMING_PAYLOAD,
    ClientEvents,
    Framing,
    RequestHandler,
)
from sidecar.http1 import HOP_BY_HOP, LAST_CHUNK, frame_chunk
from sidecar.request_ids import _ID_CHARS, MAX_REQUEST_ID, new_id, request_id_from
from sidecar.request_reader import CONTINUE, ParsedRequest, RequestReader
from sidecar.responses import error_for, render

if TYPE_CHECKING:
    from sidecar.handler import RawWriter

# The names tests and older callers import from here.
_new_id = new_id
__all__ = ["MAX_REQUEST_ID", "_ID_CHARS", "DownstreamProtocol", "ParsedRequest",
           "RequestReader", "_new_id"]

# Response headers never passed to the client: hop-by-hop, the framing this writer
# sets itself, and x-request-id (ours goes on every response; the provider's is
# kept as x-upstream-request-id).
# x-accel-buffering is the sidecar's to set (on event streams), not the provider's.
_DROP_RESPONSE: Final = HOP_BY_HOP | {b"content-length", b"x-request-id", b"x-accel-buffering"}


class DownstreamProtocol(asyncio.Protocol):
    # Slots: one of these lives per open client connection (thousands of idle streams).
    __slots__ = (
        "_driving",
        "_events",
        "_keep_alive",
        "_out",
        "_reframe",
        "busy",
        "closed",
        "handler",
        "idle_since",
        "limits",
        "paused_reading",
        "paused_writing",
        "peer_trusted",
        "read_deadline",
        "reader",
        "request",
        "transport",
    )

    def __init__(self, handler: RequestHandler) -> None:
        self.handler = handler
        self.limits = handler.limits
        self.transport: asyncio.Transport | None = None
        # Made when bytes arrive and dropped while it holds nothing: a connection whose
        # response is streaming, or an idle keep-alive one, keeps no reader (~0.4 KiB).
        self.reader: RequestReader | None = None
        self.request: ParsedRequest | None = None  # the one being read or answered
        self.busy = False  # a request is being answered; later ones wait in the reader
        # The request in flight's ear for this connection's events (the proxy's flight).
        self._events: ClientEvents | None = None
        # Inside _drive: a response completed synchronously (an error, /healthz) must
        # not recurse into _drive once per pipelined request.
        self._driving = False
        self.paused_writing = False
        self.paused_reading = False
        self.closed = False
        # The peer is one of the configured trusted_peers (the Nginx in front), whose
        # x-sidecar-* identity headers are believed; decided once, at connect.
        self.peer_trusted = False
        # loop.time() when the connection last became idle, -1 while a request is
        # being read or answered; the proxy's idle sweep closes the long-idle ones.
        self.idle_since = -1.0
        # loop.time() by which the request being read must be complete (its head, then
        # its body: timeouts.request_head / request_body), -1 when none is being read.
        # Set only when a read leaves a request incomplete; the same sweep checks it.
        self.read_deadline = -1.0
        # The response being written: may the connection take another request after
        # it (the one place that is decided), is its payload re-chunked, and what is
        # queued for the next write (made when something is queued: an empty list on
        # every open stream is 56 bytes).
        self._keep_alive = False
        self._reframe = False
        self._out: list[bytes] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(
            high=self.limits.write_high_water, low=self.limits.write_low_water
        )
        if not self.handler.connection_opened(self):
            self._fail_request(Overloaded("too many open connections"), close=True)
            return
        self.peer_trusted = self.handler.trusts(self.transport)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        if reader is None:
            limits = self.limits
            reader = self.reader = RequestReader(limits.max_header_bytes, limits.max_body_bytes,
                                                 limits.max_headers)
        reader.feed(data)
        if self.busy:
            # Pipelined requests wait for the current response; bound how much we hold.
            if reader.pending_bytes > self.limits.max_pipelined_bytes:
                self._pause_reading()
            elif reader.idle:
                self.reader = None
            return
        self._drive()

    def eof_received(self) -> bool:
        # An LLM client that closes its side mid-response has gone (as Nginx treats it):
        # stop the provider now rather than on our next failed write.
        if self.busy or self.request is not None:
            self._client_gone()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.handler.connection_closed(self)
        self._cancel_idle()
        self._client_gone()

    def pause_writing(self) -> None:
        self.paused_writing = True
        if self._events is not None:
            self._events.pause()

    def resume_writing(self) -> None:
        self.paused_writing = False
        if self._events is not None:
            self._events.resume()

    @property
    def peer_ip(self) -> str | None:
        """The client's address (asked of the transport when needed: a limit keyed by
        client address is the only reader)."""
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else None

    # -- ResponseWriter: HTTP/1.1 framing of the response in flight ------------------
    @property
    def keep_alive(self) -> bool:
        return self._keep_alive

    @property
    def verbatim_ok(self) -> bool:
        req = self.request
        return req is not None and req.http11

    def send_head(self, status: int, reason: bytes, headers: Sequence[tuple[bytes, bytes]],
                  framing: Framing, length: int | None,
                  extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
        req = self.request
        assert req is not None, "a response head with no request"
        http11 = req.http11
        parts = [b"HTTP/1.1 %d %b\r\n" % (status, reason)]
        for name, value in headers:
            if name in _DROP_RESPONSE:
                if name == b"x-request-id":
                    parts += (b"x-upstream-request-id: ", value, b"\r\n")
                continue
            parts += (name, b": ", value, b"\r\n")
        for name, value in extra:
            parts += (name, b": ", value, b"\r\n")
        self._reframe = reframe = framing is FRAMING_PAYLOAD and http11
        if framing is FRAMING_CHUNKED or reframe:
            parts.append(b"transfer-encoding: chunked\r\n")
        elif framing is FRAMING_LENGTH or (framing is FRAMING_NONE and length is not None):
            parts.append(b"content-length: %d\r\n" % (length or 0))
        elif framing is FRAMING_PAYLOAD:
            self._keep_alive = False  # an HTTP/1.0 client: the close ends the body
        # Decided when the head goes out: a drain that began while the provider was
        # thinking still gets "connection: close" on this response.
        if self.handler.draining:
            self._keep_alive = False
        if not self._keep_alive:
            parts.append(b"connection: close\r\n")
        parts += (b"x-request-id: ", req.request_id, b"\r\n\r\n")
        self._queue(b"".join(parts))

    def send_data(self, data: bytes) -> None:
        if not data:
            return  # an empty chunk frame would end the body
        self._queue(frame_chunk(data) if self._reframe else data)

    def end(self) -> None:
        if self._reframe:
            self._queue(LAST_CHUNK)

    def flush(self) -> int:
        out = self._out
        if out is None:
            return 0
        self._out = None
        data = out[0] if len(out) == 1 else b"".join(out)
        if self.transport is not None and not self.closed:
            self.transport.write(data)
        return len(data)

    def verbatim_transport(self) -> RawWriter:
        # Used only while the exchange is live, which the connection outlives.
        assert self.transport is not None
        return self.transport

    def end_connection(self) -> None:
        self._keep_alive = False

    def abort(self) -> None:
        self._keep_alive = False
        if self.transport is not None:
            self.transport.abort()

    def _queue(self, data: bytes) -> None:
        out = self._out
        if out is None:
            self._out = [data]
        else:
            out.append(data)

    # -- ClientSide: the rest of the proxy's view -----------------------------------
    def follow(self, events: ClientEvents | None) -> None:
        self._events = events

    def reply(self, status: int, body: bytes,
              extra: tuple[tuple[bytes, bytes], ...] = (),
              content_type: bytes = b"application/json") -> int:
        req = self.request
        assert req is not None, "a reply with no request"
        if self.handler.draining:
            self._keep_alive = False
        data = render(status, body, request_id=req.request_id,
                      keep_alive=self._keep_alive, content_type=content_type, extra=extra,
                      head_only=req.method == b"HEAD")
        self._queue(data)
        return self.flush()

    def cycle_done(self, keep_alive: bool) -> None:
        """Called by the proxy when the response to the current request is complete."""
        self.busy = False
        self.request = None
        self._events = None
        self._out = None
        if self.closed:
            return
        if not (keep_alive and self._keep_alive) or self.handler.draining:
            self._close()
            return
        if self.paused_reading and self.transport is not None:
            self.paused_reading = False
            self.transport.resume_reading()
        self._arm_idle()
        self._drive()

    # -- request cycle --------------------------------------------------------------
    def _drive(self) -> None:
        if self._driving:
            return  # a request answered synchronously: the loop below takes the next one
        self._driving = True
        try:
            self._drive_loop()
        finally:
            self._driving = False

    def _drive_loop(self) -> None:
        reader = self.reader
        if reader is None:
            return  # no bytes since the last request: nothing to take
        while not self.busy and not self.closed:
            if reader.ready:
                req = reader.ready.pop(0)
                self._begin(req, body_pending=False)
                if self.closed:
                    return
                self._dispatch(req)
            elif reader.error is not None:
                # Behind every request that came before it: now it is this one's turn.
                if reader.error_head is not None:
                    self._begin(reader.error_head, body_pending=False)
                else:
                    self.request = None  # its head was never read
                self._fail_request(reader.error, close=True)
                return
            else:
                head = reader.current
                if head is not None:
                    if head is not self.request:
                        self._begin(head, body_pending=True)  # its body is still coming
                        if self.closed:
                            return
                        self.read_deadline = self.handler.loop.time() \
                            + self.handler.timeouts.request_body
                elif self.read_deadline < 0.0 and reader.reading_head:
                    # A head has begun: from now on it has request_head to be complete
                    # (the idle timeout no longer applies: this is a request, not idling).
                    self._cancel_idle()
                    self.read_deadline = self.handler.loop.time() \
                        + self.handler.timeouts.request_head
                break
        if reader.idle and self.reader is reader:
            self.reader = None

    def _begin(self, req: ParsedRequest, body_pending: bool) -> None:
        """The request's turn has come (its head is read; its body may still be arriving)."""
        self._cancel_idle()
        self.request = req
        if req.expect_continue and not req.continued:
            req.continued = True
            if not body_pending:
                return  # the body came anyway: nothing to invite
            # The body is invited only when something will take it: a request for an
            # unknown path gets its 404 now, never a "100 Continue" first.
            refusal = self.handler.precheck(req)
            if refusal is not None:
                self._fail_request(refusal, close=True)
            elif self.transport is not None and not self.closed:
                self.transport.write(CONTINUE)

    def _dispatch(self, req: ParsedRequest) -> None:
        target = req.target
        q = target.find(b"?")
        req.path = (target if q < 0 else target[:q]).decode("latin-1")
        req.size = 0  # counted only while queued; an int per open stream otherwise
        req.request_id = request_id_from(req.headers)
        req.t_received = time.perf_counter()  # the row's clock (see RequestContext)
        req.ts_ms = int(time.time() * 1000)
        self.read_deadline = -1.0
        self._keep_alive = req.keep_alive
        self.busy = True
        self.handler.handle(req, self)

    # -- helpers ----------------------------------------------------------------------
    def _fail_request(self, exc: SidecarError, close: bool) -> None:
        status, body = error_for(exc)
        # One id for the answer and the row; the client's own when its head was readable.
        head = self.request
        rid = request_id_from(head.headers) if head is not None else new_id()
        if self.transport is not None and not self.closed:
            self.transport.write(render(status, body, request_id=rid, keep_alive=not close))
        self.handler.rejected(head, rid, status, exc)
        if close:
            self._close()

    def _client_gone(self) -> None:
        events = self._events
        if events is not None:
            events.client_gone()

    def _pause_reading(self) -> None:
        if not self.paused_reading and self.transport is not None:
            self.paused_reading = True
            self.transport.pause_reading()

    def _arm_idle(self) -> None:
        # A timestamp, not a timer: a TimerHandle per request cost an allocation, a
        # heap push and a cancel; the proxy sweeps all connections once a period.
        self.idle_since = self.handler.loop.time()

    def _cancel_idle(self) -> None:
        self.idle_since = -1.0

    def sweep(self, now: float, idle_cutoff: float) -> None:
        """The proxy's periodic sweep: close when idle since before ``idle_cutoff``;
        answer 408 and close when the request being read is past its deadline."""
        if 0.0 <= self.idle_since < idle_cutoff:
            self._close()
        elif 0.0 <= self.read_deadline <= now and not self.busy and not self.closed:
            self._request_timed_out()

    def _request_timed_out(self) -> None:
        self.read_deadline = -1.0
        t = self.handler.timeouts
        if self.request is None:
            what, limit = "head", t.request_head
        else:
            what, limit = "body", t.request_body
        self.reader = None  # nothing more is read: the connection closes
        self._fail_request(RequestTimeout(
            f"request {what} not received within {limit:g}s"), close=True)

    def close_if_idle(self) -> None:
        """Drain: an idle keep-alive connection is closed; a busy one closes after its response."""
        if not self.busy:
            self._close()

    def _close(self) -> None:
        self._cancel_idle()
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
