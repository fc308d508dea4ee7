"""Client side: an asyncio.Protocol that reads requests and relays responses.

Requests are read by :class:`RequestReader`, a sans-IO wrapper around one
httptools (llhttp) parser per connection, reused across keep-alive requests.
The parser reads everything it is fed, so requests pipelined behind the one in
flight are parsed as they arrive and queue up in the reader, complete and in
order; the protocol answers them one at a time after each ``cycle_done``.
Responses are written by the exchange itself (verbatim provider bytes are the
whole point), never by the reader.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, cast

import httptools

from sidecar.errors import BodyTooLarge, Overloaded, RequestError, SidecarError
from sidecar.responses import error_for, render

if TYPE_CHECKING:
    from sidecar.proxy import Proxy
    from sidecar.splice import Exchange

# A client-supplied x-request-id is kept (Nginx's $request_id ties logs together)
# only when it is short and plain; anything else is replaced with our own.
MAX_REQUEST_ID = 128
_ID_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


def _request_id(headers: list[tuple[bytes, bytes]]) -> bytes:
    for name, value in headers:
        if name == b"x-request-id":
            if 0 < len(value) <= MAX_REQUEST_ID and _ID_CHARS.issuperset(value):
                return value
            break
    return _new_id()


# Request ids: a random per-process prefix and a counter. Unique without a
# getrandom() system call per request, and distinct across processes.
_ID_PREFIX = b""
_id_counter = itertools.count(1)


def _reseed_ids() -> None:
    global _ID_PREFIX, _id_counter
    _ID_PREFIX = os.urandom(8).hex().encode()
    _id_counter = itertools.count(1)


_reseed_ids()
os.register_at_fork(after_in_child=_reseed_ids)  # a forked child must not repeat ids


def _new_id() -> bytes:
    return b"%b%08x" % (_ID_PREFIX, next(_id_counter))


# ------------------------------------------------------------------------------ reader

# Headers the reader itself looks at (names lower-cased); all others are only kept.
_FRAMING = frozenset((b"host", b"content-length", b"transfer-encoding", b"connection", b"expect"))
# What a head costs beyond the target and header lines: the method's separator,
# " HTTP/1.1\r\n" and the blank line (the method itself is added once known).
_REQUEST_LINE_OVERHEAD = 1 + 11 + 2
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass(slots=True, eq=False)
class ParsedRequest:
    """One request as the reader saw it: the head as soon as it is read, the body at the end."""

    method: bytes
    target: bytes  # path + query, as received
    headers: list[tuple[bytes, bytes]]  # names lower-cased, values without surrounding blanks
    http11: bool
    keep_alive: bool  # what the request itself allows: HTTP/1.1 and no "close"
    expect_continue: bool  # HTTP/1.1 with "expect: 100-continue"
    body: bytes = b""
    size: int = 0  # head and body bytes held while queued, for the pipelining bound
    continued: bool = False  # the protocol has written "100 Continue" for it
    # Set when its turn comes and it is handed to the proxy (one object per request,
    # not a second one for the proxy's view):
    path: str = ""  # the target without the query
    request_id: bytes = b""  # the client's sane x-request-id, or ours
    t_received: float = 0.0  # time.perf_counter() when the request was complete
    ts_ms: int = 0  # wall clock, for the meter


# One shared object per common method: llhttp hands over a new bytes object per
# request, which every open stream would otherwise keep for its whole life.
_METHODS: Final = {m: m for m in (b"POST", b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS")}


class _Stop(Exception):
    """Raised in a parser callback to stop llhttp; the reason is already on the reader."""


class RequestReader:
    """Sans-IO request reader: feed bytes in any split, take complete requests out.

    Complete requests queue in ``ready`` in arrival order. The first protocol
    error stops reading: it is kept in ``error`` behind every request completed
    before it (so pipelined garbage never costs the requests ahead of it), with
    the head of the request it belongs to in ``error_head`` when that head was
    read. Nothing after a request that ends the connection (HTTP/1.0, a
    ``connection: close``) is read. Library errors become ``RequestError`` here.

    Limits: ``max_head`` bounds a request head (request line and header lines);
    ``max_body`` the body, whether announced by content-length (refused at once)
    or chunked (refused once the decoded body passes it).
    """

    __slots__ = (
        "_body",
        "_body_len",
        "_head_bytes",
        "_head_whole",
        "_headers",
        "_in_head",
        "_msg",
        "_msgs",
        "_parser",
        "_special",
        "_synthetic",
        "_upgrade_framing",
        "_url",
        "done",
        "error",
        "error_head",
        "max_body",
        "max_head",
        "ready",
    )

    def __init__(self, max_head: int, max_body: int) -> None:
        self.max_head = max_head
        self.max_body = max_body
        # A list, not a deque: an empty deque costs ~600 bytes per connection, and
        # more than one queued (pipelined) request is rare.
        self.ready: list[ParsedRequest] = []
        self.error: RequestError | None = None
        self.error_head: ParsedRequest | None = None
        self.done = False  # an error or a last request: nothing more is read
        # Made when bytes arrive and dropped between requests: an idle keep-alive
        # connection, or one whose response is streaming, holds no parser (~0.9 KiB).
        self._parser: httptools.HttpRequestParser | None = None
        self._msg: ParsedRequest | None = None  # head read, body not complete yet
        self._msgs = 0  # messages begun, to tell one head from the next
        self._in_head = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._special: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0  # counted from the parser's callbacks
        self._head_whole = 0  # whole reads that fell inside the (unfinished) head
        self._body: list[bytes] = []
        self._body_len = 0
        self._upgrade_framing: bytes | None = None
        self._synthetic = False

    @property
    def current(self) -> ParsedRequest | None:
        """The request whose head is read and whose body is still arriving."""
        return self._msg

    @property
    def idle(self) -> bool:
        """Holding nothing (no request queued or half-read, no error) and open to more:
        the connection may drop this reader and make a fresh one for the next bytes."""
        return self._parser is None and not self.ready and self.error is None and not self.done

    @property
    def pending_bytes(self) -> int:
        """Bytes held for requests not taken yet (queued ones and the one being read)."""
        n = sum(r.size for r in self.ready)
        if self._in_head:
            n += max(self._head_bytes, self._head_whole)
        elif self._msg is not None:
            n += self._head_bytes + self._body_len
        return n

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        msgs, in_head, idle = self._msgs, self._in_head, self._msg is None and not self._in_head
        parser = self._parser
        if parser is None:
            parser = self._parser = httptools.HttpRequestParser(self)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as up:
            self._after_upgrade(data[up.args[0]:])
            return
        except httptools.HttpParserError as exc:
            if self.done:  # stopped on purpose (a limit, a last request): already recorded
                return
            cause = exc.__context__
            if isinstance(cause, Exception) and not isinstance(cause, httptools.HttpParserError):
                raise cause from exc  # a bug in a callback, not the client's fault
            self._fail(RequestError(f"malformed HTTP request: {exc}"), self._msg)
            return
        if self._msg is None and not self._in_head and self._upgrade_framing is None:
            # Between requests, with every byte taken: nothing the next request needs is
            # in the parser, so let it go (and what the last message's parse left).
            self._parser = None
            self._headers = []
            self._special = []
            self._body = []
            return
        if self._in_head:
            # A head still open: the parser keeps its unfinished header line to itself, so
            # count every read that held nothing but this head (one that began or went on
            # with it and saw no other message); the callbacks count the rest.
            begun = self._msgs - msgs
            if (in_head and begun == 0) or (idle and begun == 1):
                self._head_whole += len(data)
            if max(self._head_bytes, self._head_whole) > self.max_head:
                self._fail(RequestError(f"request head exceeds {self.max_head} bytes"), None)

    def _fail(self, exc: RequestError, head: ParsedRequest | None) -> None:
        self.error = exc
        self.error_head = head
        self.done = True
        self._msg = None
        self._in_head = False

    def _after_upgrade(self, rest: bytes) -> None:
        # llhttp stops at an upgrade (CONNECT, "connection: upgrade") without reading a
        # body. We never switch protocols: the request is answered like any other, so a
        # body it announced is read by a fresh parser primed with a head that frames it
        # the same way, and what follows is the next request.
        framing = self._upgrade_framing
        if framing is not None:
            self._upgrade_framing = None
            self._parser = httptools.HttpRequestParser(self)
            self._synthetic = True
            self._parser.feed_data(b"POST / HTTP/1.1\r\nhost: -\r\n" + framing + b"\r\n\r\n")
        if rest:
            self.feed(rest)

    # -- httptools callbacks -------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._synthetic:
            return
        self._msgs += 1
        self._in_head = True
        self._url = b""
        self._headers = []
        self._special = []
        self._head_bytes = _REQUEST_LINE_OVERHEAD
        self._head_whole = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:  # chunked trailers (and the primer head after an upgrade)
            return
        name = name.lower()
        value = value.rstrip(b" \t")
        self._headers.append((name, value))
        self._head_bytes += len(name) + len(value) + 4
        if name in _FRAMING:
            self._special.append((name, value))

    def on_headers_complete(self) -> None:
        if self._synthetic:
            self._synthetic = False
            return
        self._in_head = False
        parser = self._parser
        assert parser is not None  # a callback runs inside feed, which made it
        http11 = parser.get_http_version() == "1.1"
        hosts = 0
        length = -1
        chunked = close = expect = False
        for name, value in self._special:
            if name == b"host":
                hosts += 1
            elif name == b"content-length":
                length = int(value)  # digits only: llhttp has checked it
            elif name == b"transfer-encoding":
                # llhttp takes "gzip, chunked"; we decode no codings, so only "chunked".
                if chunked or value.lower() != b"chunked":
                    self._fail(RequestError(
                        "malformed HTTP request: only transfer-encoding: chunked is supported"
                    ), None)
                    raise _Stop
                chunked = True
            elif name == b"connection":
                close = close or b"close" in value.lower()
            else:  # expect
                expect = expect or b"100-continue" in [
                    t.strip().lower() for t in value.split(b",")
                ]
        # RFC 9112 section 3.2: exactly one Host in HTTP/1.1, never more than one.
        if hosts > 1 or (hosts == 0 and http11):
            problem = "more than one host header" if hosts else "missing host header"
            self._fail(RequestError(f"malformed HTTP request: {problem}"), None)
            raise _Stop
        method = parser.get_method()
        method = _METHODS.get(method, method)
        self._head_bytes += len(method)
        if self._head_bytes > self.max_head:
            self._fail(RequestError(f"request head exceeds {self.max_head} bytes"), None)
            raise _Stop
        msg = ParsedRequest(method, self._url, self._headers, http11, http11 and not close,
                            expect and http11)
        self._msg = msg
        self._body = []
        self._body_len = 0
        if length > self.max_body:
            msg.expect_continue = False  # refused before its body was invited
            self._fail(BodyTooLarge(f"request body exceeds {self.max_body} bytes"), msg)
            raise _Stop
        if (length > 0 or chunked) and parser.should_upgrade():
            self._upgrade_framing = (b"transfer-encoding: chunked" if chunked
                                     else b"content-length: %d" % length)

    def on_body(self, body: bytes) -> None:
        self._body_len += len(body)
        if self._body_len > self.max_body:
            self._fail(BodyTooLarge(f"request body exceeds {self.max_body} bytes"), self._msg)
            raise _Stop
        self._body.append(body)

    def on_message_complete(self) -> None:
        msg = self._msg
        if msg is None or self._upgrade_framing is not None:
            return  # the body comes after the upgrade pause (see _after_upgrade)
        msg.body = b"".join(self._body)
        msg.size = self._head_bytes + self._body_len
        self._msg = None
        self.ready.append(msg)
        if not msg.keep_alive:
            self.done = True  # the connection ends with this one: read no further
            raise _Stop


# ---------------------------------------------------------------------------- protocol

class DownstreamProtocol(asyncio.Protocol):
    # Slots: one of these lives per open client connection (thousands of idle streams).
    __slots__ = (
        "_driving",
        "busy",
        "closed",
        "exchange",
        "idle_since",
        "limits",
        "paused_reading",
        "paused_writing",
        "proxy",
        "reader",
        "request",
        "task",
        "transport",
    )

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.limits = proxy.config.limits
        self.transport: asyncio.Transport | None = None
        # Made when bytes arrive and dropped while it holds nothing: a connection whose
        # response is streaming, or an idle keep-alive one, keeps no reader (~0.4 KiB).
        self.reader: RequestReader | None = None
        self.request: ParsedRequest | None = None  # the one being read or answered
        self.busy = False  # a request is being answered; later ones wait in the reader
        self.exchange: Exchange | None = None
        self.task: asyncio.Task[None] | None = None
        # Inside _drive: a response completed synchronously (an error, /healthz) must
        # not recurse into _drive once per pipelined request.
        self._driving = False
        self.paused_writing = False
        self.paused_reading = False
        self.closed = False
        # loop.time() when the connection last became idle, -1 while a request is
        # being read or answered; the proxy's idle sweep closes the long-idle ones.
        self.idle_since = -1.0

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
        reader = self.reader
        if reader is None:
            limits = self.limits
            reader = self.reader = RequestReader(limits.max_header_bytes, limits.max_body_bytes)
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

    @property
    def raw_transport(self) -> asyncio.Transport:
        assert self.transport is not None
        return self.transport

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
                self._begin(req)
                self._dispatch(req)
            elif reader.error is not None:
                # Behind every request that came before it: now it is this one's turn.
                if reader.error_head is not None:
                    self._begin(reader.error_head)
                else:
                    self.request = None  # its head was never read
                self._fail_request(reader.error, close=True)
                return
            else:
                head = reader.current
                if head is not None and head is not self.request:
                    self._begin(head)  # its body is still coming
                break
        if reader.idle and self.reader is reader:
            self.reader = None

    def _begin(self, req: ParsedRequest) -> None:
        """The request's turn has come (its head is read; its body may still be arriving)."""
        self._cancel_idle()
        self.request = req
        if req.expect_continue and not req.continued:
            req.continued = True
            self.write(CONTINUE)

    def _dispatch(self, req: ParsedRequest) -> None:
        target = req.target
        q = target.find(b"?")
        req.path = (target if q < 0 else target[:q]).decode("latin-1")
        req.keep_alive = req.keep_alive and not self.proxy.draining
        req.size = 0  # counted only while queued; an int per open stream otherwise
        req.request_id = _request_id(req.headers)
        req.t_received = time.perf_counter()  # the row's clock (see RequestContext)
        req.ts_ms = int(time.time() * 1000)
        self.busy = True
        self.proxy.dispatch(req, self)

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
        if self.paused_reading and self.transport is not None:
            self.paused_reading = False
            self.transport.resume_reading()
        self._arm_idle()
        self._drive()

    # -- helpers ----------------------------------------------------------------------
    def _fail_request(self, exc: SidecarError, close: bool) -> None:
        status, body = error_for(exc)
        # One id for the answer and the row; the client's own when its head was readable.
        head = self.request
        rid = _request_id(head.headers) if head is not None else _new_id()
        self.write(render(status, body, request_id=rid, keep_alive=not close))
        # note_rejected reads only .target and .headers, which a ParsedRequest has.
        self.proxy.note_rejected(head, rid, status, exc)
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
        # A timestamp, not a timer: a TimerHandle per request cost an allocation, a
        # heap push and a cancel; the proxy sweeps all connections once a period.
        self.idle_since = self.proxy.loop.time()

    def _cancel_idle(self) -> None:
        self.idle_since = -1.0

    def close_if_idle_since(self, deadline: float) -> None:
        """The idle sweep: close when idle since before ``deadline``."""
        if 0.0 <= self.idle_since < deadline:
            self._close()

    def close_if_idle(self) -> None:
        """Drain: an idle keep-alive connection is closed; a busy one closes after its response."""
        if not self.busy:
            self._close()

    def _close(self) -> None:
        self._cancel_idle()
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
