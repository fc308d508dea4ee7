"""Client side: an asyncio.Protocol that reads requests with h11 and relays responses.

h11 parses the request head and body; the response is written by the exchange
itself (verbatim provider bytes are the whole point), so each request cycle
uses a fresh ``h11.Connection`` seeded with whatever pipelined bytes the
previous one still held (``trailing_data``). Pipelined requests therefore wait
in h11's buffer and are answered strictly in order.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import h11

from sidecar.errors import BodyTooLarge, Overloaded, RequestError, SidecarError
from sidecar.responses import error_for, render

if TYPE_CHECKING:
    from sidecar.proxy import Proxy
    from sidecar.splice import Exchange

# A client-supplied x-request-id is kept (Nginx's $request_id ties logs together)
# only when it is short and plain; anything else is replaced with our own.
MAX_REQUEST_ID = 128
_ID_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


@dataclass(slots=True)
class IncomingRequest:
    method: bytes
    target: bytes  # path + query, as received
    path: str  # without the query
    headers: list[tuple[bytes, bytes]]  # names lower-cased by h11
    body: bytes
    http11: bool
    keep_alive: bool
    request_id: bytes
    t_received: float  # loop.time() when the request was complete
    ts_ms: int  # wall clock, for the meter


def _request_id(headers: list[tuple[bytes, bytes]]) -> bytes:
    for name, value in headers:
        if name == b"x-request-id":
            if 0 < len(value) <= MAX_REQUEST_ID and _ID_CHARS.issuperset(value):
                return value
            break
    return _new_id()


def _new_id() -> bytes:
    return os.urandom(12).hex().encode()


class DownstreamProtocol(asyncio.Protocol):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.limits = proxy.config.limits
        self.transport: asyncio.Transport | None = None
        self.h11 = self._new_h11()
        self.request: h11.Request | None = None
        self.body = bytearray()
        self.busy = False  # a request is being answered; later ones wait in h11's buffer
        self.exchange: Exchange | None = None
        self.task: asyncio.Task[None] | None = None
        self.paused_writing = False
        self.paused_reading = False
        self.closed = False
        self._idle_timer: asyncio.TimerHandle | None = None

    def _new_h11(self) -> h11.Connection:
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)

    # -- asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(
            high=self.limits.write_high_water, low=self.limits.write_low_water
        )
        self.proxy.connections.add(self)
        if len(self.proxy.connections) > self.limits.max_connections:
            self._fail_request(Overloaded("too many open connections"), close=True)
            return
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        self.h11.receive_data(data)
        if self.busy:
            # Pipelined bytes wait for the current response; bound how much we hold.
            if len(self.h11.trailing_data[0]) > self.limits.max_pipelined_bytes:
                self._pause_reading()
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
        self.proxy.connections.discard(self)
        self._cancel_idle()
        self._client_gone()

    def pause_writing(self) -> None:
        self.paused_writing = True
        if self.exchange is not None:
            self.exchange.pause()

    def resume_writing(self) -> None:
        self.paused_writing = False
        if self.exchange is not None:
            self.exchange.resume()

    # -- the exchange's view of us (splice.ClientSide) -----------------------------
    def write(self, data: bytes | memoryview) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- request cycle --------------------------------------------------------------
    def _drive(self) -> None:
        try:
            while not self.busy and not self.closed:
                event = self.h11.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    return
                if isinstance(event, h11.Request):
                    self._on_request(event)
                elif isinstance(event, h11.Data):
                    self.body += event.data
                    if len(self.body) > self.limits.max_body_bytes:
                        raise BodyTooLarge(
                            f"request body exceeds {self.limits.max_body_bytes} bytes"
                        )
                elif isinstance(event, h11.EndOfMessage):
                    self._dispatch()
                elif isinstance(event, h11.ConnectionClosed):
                    self._close()
                    return
        except h11.RemoteProtocolError as exc:
            # Map the library's error to ours at the boundary.
            self._fail_request(RequestError(f"malformed HTTP request: {exc}"), close=True)
        except SidecarError as exc:
            self._fail_request(exc, close=True)

    def _on_request(self, event: h11.Request) -> None:
        self._cancel_idle()
        self.request = event
        self.body.clear()
        for name, value in event.headers:
            if name == b"content-length" and int(value) > self.limits.max_body_bytes:
                raise BodyTooLarge(f"request body exceeds {self.limits.max_body_bytes} bytes")
        if self.h11.they_are_waiting_for_100_continue:
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _dispatch(self) -> None:
        event = self.request
        assert event is not None
        headers = list(event.headers)
        target = event.target
        q = target.find(b"?")
        http11 = event.http_version == b"1.1"
        keep_alive = http11 and not any(
            n == b"connection" and b"close" in v.lower() for n, v in headers
        )
        req = IncomingRequest(
            method=event.method,
            target=target,
            path=(target if q < 0 else target[:q]).decode("latin-1"),
            headers=headers,
            body=bytes(self.body),
            http11=http11,
            keep_alive=keep_alive and not self.proxy.draining,
            request_id=_request_id(headers),
            t_received=self.proxy.loop.time(),
            ts_ms=int(time.time() * 1000),
        )
        self.body.clear()
        self.busy = True
        self.task = self.proxy.spawn(self.proxy.handle(req, self))

    def cycle_done(self, keep_alive: bool) -> None:
        """Called by the proxy when the response to the current request is complete."""
        self.busy = False
        self.request = None
        self.exchange = None
        self.task = None
        if self.closed:
            return
        if not keep_alive or self.proxy.draining:
            self._close()
            return
        leftover, eof = self.h11.trailing_data
        self.h11 = self._new_h11()
        if leftover:
            self.h11.receive_data(leftover)
        if eof:
            self.h11.receive_data(b"")
        if self.paused_reading and self.transport is not None:
            self.paused_reading = False
            self.transport.resume_reading()
        self._arm_idle()
        self._drive()

    # -- helpers ----------------------------------------------------------------------
    def _fail_request(self, exc: SidecarError, close: bool) -> None:
        status, body = error_for(exc)
        # One id for the answer and the row; the client's own when its head was readable.
        rid = _request_id(list(self.request.headers)) if self.request is not None else _new_id()
        self.write(render(status, body, request_id=rid, keep_alive=not close))
        self.proxy.note_rejected(self.request, rid, status, exc)
        if close:
            self._close()

    def _client_gone(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.client_gone()
        elif self.task is not None and not self.task.done():
            # Still connecting or queued: nothing upstream to abort yet, so stop the task.
            self.task.cancel()

    def _pause_reading(self) -> None:
        if not self.paused_reading and self.transport is not None:
            self.paused_reading = True
            self.transport.pause_reading()

    def _arm_idle(self) -> None:
        self._cancel_idle()
        self._idle_timer = self.proxy.loop.call_later(
            self.proxy.config.timeouts.client_idle, self._close
        )

    def _cancel_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def close_if_idle(self) -> None:
        """Drain: an idle keep-alive connection is closed; a busy one closes after its response."""
        if not self.busy:
            self._close()

    def _close(self) -> None:
        self._cancel_idle()
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
