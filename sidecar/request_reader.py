"""Sans-IO request reader: one httptools (llhttp) parser per client connection.

Feed it bytes in any split; complete requests come out in order. The parser reads
everything it is fed, so requests pipelined behind the one in flight are parsed as
they arrive and queue here, complete and in order, until the connection takes them.
Library errors (httptools') become :class:`RequestError` at this boundary; nothing
here touches a socket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import httptools

from sidecar.config import LimitsConfig
from sidecar.errors import BodyTooLarge, RequestError, TooManyHeaders
from sidecar.http1 import NO_HEADERS

# Headers the reader itself looks at (names lower-cased); all others are only kept.
_FRAMING = frozenset((b"host", b"content-length", b"transfer-encoding", b"connection", b"expect"))
# What a head costs beyond the target and header lines: the method's separator,
# " HTTP/1.1\r\n" and the blank line (the method itself is added once known).
_REQUEST_LINE_OVERHEAD = 1 + 11 + 2
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_MAX_HEADERS: Final = LimitsConfig().max_headers  # the config's default (sidecar.config.model)


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

    def forget_head(self) -> None:
        """The provider has answered: no attempt needs the head again, and an open
        stream should not keep the client's headers, target and path alive."""
        self.headers = NO_HEADERS
        self.target = b""
        self.path = ""


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
    ``max_headers`` the number of header lines (431); ``max_body`` the body, whether
    announced by content-length (refused at once) or chunked (refused once the
    decoded body passes it). A request line without an HTTP version (HTTP/0.9) or
    with another version than 1.0 or 1.1 is refused.
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
        "max_headers",
        "ready",
    )

    def __init__(self, max_head: int, max_body: int,
                 max_headers: int = _MAX_HEADERS) -> None:
        self.max_head = max_head
        self.max_body = max_body
        self.max_headers = max_headers
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
    def reading_head(self) -> bool:
        """Bytes of a request head have arrived and the head is not complete yet."""
        return self._in_head

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
            upgrade_at = up.args[0]
        except httptools.HttpParserError as exc:
            if self.done:  # stopped on purpose (a limit, a last request): already recorded
                return
            cause = exc.__context__
            if isinstance(cause, Exception) and not isinstance(cause, httptools.HttpParserError):
                raise cause from exc  # a bug in a callback, not the client's fault
            self._fail(RequestError(f"malformed HTTP request: {exc}"), self._msg)
            return
        else:
            upgrade_at = -1
        if upgrade_at >= 0:
            # Outside the except clause: the bytes after the upgrade are fed from here,
            # and a parse error among them must not carry the upgrade as its context
            # (it was then re-raised as "a bug in a callback", out of data_received).
            self._after_upgrade(data[upgrade_at:])
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
        version = parser.get_http_version()
        http11 = version == "1.1"
        if not http11 and version != "1.0":
            # llhttp reads "GET /path" with no version as HTTP/0.9: a request line that
            # proxies and caches may frame differently than we do. Refused, as is any
            # other version this HTTP/1.x reader cannot speak.
            problem = "request line has no HTTP version" if version == "0.9" \
                else f"unsupported HTTP version {version}"
            self._fail(RequestError(f"malformed HTTP request: {problem}"), None)
            raise _Stop
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
        if len(self._headers) > self.max_headers:
            # Counted once the head is in (its bytes are bounded by max_head already):
            # thousands of tiny headers would each be copied to the provider otherwise.
            self._fail(TooManyHeaders(f"request has more than {self.max_headers} headers"), None)
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
