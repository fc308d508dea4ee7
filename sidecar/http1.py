"""Sans-IO HTTP/1.1 response framing for the upstream side.

The proxy parses only what it must of a provider's response: the head, and the
body framing (content-length, chunked, or read-until-close) so it knows where
the response ends and which bytes are payload for the usage tap. The raw bytes
themselves are forwarded untouched by the relay.

The byte-level work is llhttp's (through httptools, already the request parser):
walking chunk frames in Python cost ~2 µs a frame, llhttp ~0.3 µs, and it sees
every read, so no read needs a second look. Like h11, nothing here touches a
socket: feed bytes in, read results out, and every malformed input raises
:class:`UpstreamProtocolError`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, cast

import httptools

from sidecar.errors import UpstreamProtocolError

# llhttp's response parser and its error, for the relay's per-read fast path: it calls
# llhttp directly (a Python frame per read less), so it catches llhttp's error itself
# and hands it to ResponseParser.body_error, which maps it to ours.
LLHttpParser = httptools.HttpResponseParser
LLHTTP_ERROR = httptools.HttpParserError

# Trailers after the last chunk are legal but rare; cap what we will accept.
# (Chunk sizes and extensions are bounded by llhttp itself, which never buffers them.)
MAX_TRAILER_BYTES = 16 * 1024

# Headers that describe one hop, never the message (RFC 9110 section 7.6.1),
# plus the framing headers the proxy recomputes itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


@dataclass(slots=True)  # not frozen: a frozen init pays object.__setattr__ per field
class ResponseHead:
    status: int
    reason: bytes
    http11: bool
    # Names lower-cased, values stripped; emptied once the head has been relayed.
    headers: Sequence[tuple[bytes, bytes]]
    content_length: int | None
    chunked: bool
    keep_alive: bool  # the upstream connection may be reused after this body

    def get(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def has_body(self) -> bool:
        return not (self.status < 200 or self.status in (204, 304))


class ResponseParser:
    """One provider response, parsed by llhttp (through httptools): bytes in, state out.

    After each ``feed``:

    * ``head`` is the final response head once it is complete (interim 1xx heads are
      skipped), and ``body_start`` is where, in the read that completed it, the body
      begins, so the caller can forward the rest of that read verbatim;
    * ``pieces`` holds the payload found so far (chunk framing removed), for the
      caller to take and clear: llhttp appends to it directly, with no Python frame
      per chunk;
    * ``done`` is set at the end of the message, and ``extra`` when bytes followed it.

    The framing of every read is checked in C, so the relay can forward reads
    untouched and still know exactly where a response ends. A body that runs until
    the connection closes never sets ``done``: the close is its end, and the caller
    sees the close. Every malformed input raises :class:`UpstreamProtocolError`.
    """

    __slots__ = (
        "_buf",
        "_headers",
        "_heads",
        "_max_head",
        "_parser",
        "_reason",
        "_trailer_bytes",
        "body_start",
        "done",
        "extra",
        "head",
        "on_body",
        "pieces",
    )

    def __init__(self, max_head: int) -> None:
        self.pieces: list[bytes] = []
        # httptools looks its callbacks up once, at construction: this one is the
        # list's own append, so a chunk's payload reaches the list without Python code.
        self.on_body = self.pieces.append
        self._parser = httptools.HttpResponseParser(self)
        self._clear(max_head)

    def reset(self, max_head: int) -> None:
        """Ready for the next response on the same (kept-alive) connection.

        llhttp itself carries on from one message to the next, so one parser serves
        a provider connection for its whole life: making one per response was a
        measurable part of the per-request cost.
        """
        if not self.done or self.extra:
            # llhttp did not walk the last message to its end (a length-framed body is
            # counted by the relay, not fed here): do not trust its state, start anew.
            self._parser = httptools.HttpResponseParser(self)
        self._clear(max_head)

    def _clear(self, max_head: int) -> None:
        self._max_head = max_head
        self.head: ResponseHead | None = None
        self.body_start = 0
        self.done = False
        self.extra = False
        self.pieces.clear()
        # The head's bytes so far, while it is incomplete; made only when a head spans
        # reads (rare), as an empty one on every open stream costs 56 bytes.
        self._buf: bytearray | None = None
        self._heads = 0  # heads completed (1xx ones included), to find where the last ends
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._trailer_bytes = 0

    def feed(self, data: bytes) -> None:
        if self.done:
            if data:
                self.extra = True
            return
        waiting = self.head is None
        f = feeding()
        f.parser = self
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise UpstreamProtocolError("provider switched protocols (101/upgrade)") from None
        except httptools.HttpParserError as exc:
            error = self.body_error(exc)
            if error is not None:
                raise error from None
            # Our response ended and bytes after it stopped llhttp: where ours began
            # still matters when its head came in this very read.
        finally:
            f.parser = None
        if waiting:
            self._locate_body(data)

    @property
    def llhttp(self) -> httptools.HttpResponseParser:
        """llhttp itself, for the relay's per-read fast path once the head is in.

        Set ``feeding().parser`` to this parser around each ``feed_data`` call.

        Its ``feed_data`` is equivalent to :meth:`feed` after the head (minus a Python
        frame per read); an ``httptools.HttpParserError`` it raises goes to
        :meth:`body_error`.
        """
        return self._parser

    def body_error(self, exc: httptools.HttpParserError) -> UpstreamProtocolError | None:
        """What an error from ``llhttp.feed_data`` means: None when the message had ended
        and only bytes after it were bad (``extra`` is then set)."""
        if self.done:
            self.extra = True
            return None
        cause = exc.__context__
        if isinstance(cause, UpstreamProtocolError):
            return cause
        if isinstance(cause, Exception) and not isinstance(cause, httptools.HttpParserError):
            raise cause from exc  # a bug in a callback, not the provider's fault
        return UpstreamProtocolError(f"malformed response: {exc}")

    def ends_cleanly_here(self) -> bool:
        """Would the chunked body end cleanly if its last chunk came now, i.e. did the
        provider's bytes stop between two chunk frames? Asked once, when a stream is
        cut, to know whether the sidecar may add frames of its own. It feeds llhttp a
        last chunk, so the parser is spent afterwards (the connection is closing)."""
        if self.done:
            return True
        if self.head is None or not self.head.chunked:
            return False
        f = feeding()
        f.parser = self
        try:
            self._parser.feed_data(LAST_CHUNK)
        except httptools.HttpParserError:
            return False
        finally:
            f.parser = None
            self.pieces.clear()  # what the probe fed is not payload
        return self.done

    def _locate_body(self, data: bytes) -> None:
        buf = self._buf
        if self.head is None:
            if buf is None:
                buf = self._buf = bytearray()
            buf += data
            if len(buf) > self._max_head:
                raise UpstreamProtocolError(f"response head exceeds {self._max_head} bytes")
            return
        # The head ended in this read. llhttp insists on CRLF line ends, so the first
        # CRLF CRLF after a head's start ends it (no head contains one). llhttp skips
        # any CR and LF bytes before a message: they are no head's, and a CRLF CRLF
        # among them must not be taken for the end of one (it was: the provider's head
        # was then relayed as body; found by tests/test_fuzz.py).
        base = len(buf) if buf else 0
        whole = bytes(buf) + data if buf else data
        end = 0
        for _ in range(self._heads):
            while whole[end:end + 1] in (b"\r", b"\n"):
                end += 1
            end = whole.find(b"\r\n\r\n", end) + 4
        if end > self._max_head:
            raise UpstreamProtocolError(f"response head exceeds {self._max_head} bytes")
        self.body_start = end - base
        self._buf = None

    @property
    def seen(self) -> bool:
        """Has any byte of the response arrived?"""
        return self.head is not None or bool(self._buf)

    def take(self) -> list[bytes]:
        """The payload found since the last call."""
        out = self.pieces[:]
        self.pieces.clear()  # cleared, not replaced: llhttp holds its append
        return out

    # -- httptools callbacks ---------------------------------------------------------
    # httptools looks each callback up on the object it is given, once per parser, and
    # keeps what it finds: bound methods would be five objects (~320 bytes) on every
    # open stream. These are plain functions that every parser shares; each finds
    # the parser llhttp is working for in this thread's Feeding, which whoever calls
    # llhttp's feed_data sets just before (feed() here, the relay's fast path). on_body is
    # per parser: the list's own append, which costs no Python frame per chunk.
    @staticmethod
    def on_message_begin() -> None:
        self: ResponseParser | None = _THREAD.feeding.parser
        assert self is not None, "llhttp called back outside a feed"
        if self.done:
            # A second response behind the one we asked for (a desynced or hostile
            # provider): stop llhttp here, so nothing of it is parsed (its head must not
            # replace ours, its payload must not reach the pieces, the tap or the client).
            self.extra = True
            raise _SecondMessage
        self._headers = []
        self._reason = b""

    @staticmethod
    def on_status(reason: bytes) -> None:
        self: ResponseParser | None = _THREAD.feeding.parser
        assert self is not None, "llhttp called back outside a feed"
        self._reason += reason

    @staticmethod
    def on_header(name: bytes, value: bytes) -> None:
        self: ResponseParser | None = _THREAD.feeding.parser
        assert self is not None, "llhttp called back outside a feed"
        if self.head is not None:  # a trailer after the last chunk
            self._trailer_bytes += len(name) + len(value) + 4
            if self._trailer_bytes > MAX_TRAILER_BYTES:
                raise UpstreamProtocolError("chunked trailer too long")
            return
        stripped = value.rstrip(b" \t")
        name = name.lower()
        if len(stripped) != len(value) and name == b"transfer-encoding" \
                and b"\t" in value[len(stripped):]:
            # llhttp does not take "chunked" followed by a tab as chunked (it reads such
            # a body until the close), while the stripped value says chunked: the relay
            # and llhttp would frame the body differently. Refused, as llhttp refuses it
            # in a request (found by tests/test_fuzz.py).
            raise UpstreamProtocolError("unsupported transfer-encoding")
        self._headers.append((name, stripped))

    @staticmethod
    def on_headers_complete() -> None:
        self: ResponseParser | None = _THREAD.feeding.parser
        assert self is not None, "llhttp called back outside a feed"
        self._heads += 1
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:
            return  # interim (100 Continue, 103 Early Hints): the real head follows
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise UpstreamProtocolError(f"unsupported response version HTTP/{version}")
        reason = self._reason
        self.head = _make_head(status, _REASONS.get(reason, reason), version == "1.1",
                               self._headers)
        self._reason = b""
        self._headers = NO_HEADERS  # the head has them now; trailers are only counted

    @staticmethod
    def on_message_complete() -> None:
        self: ResponseParser | None = _THREAD.feeding.parser
        assert self is not None, "llhttp called back outside a feed"
        if self.head is not None:
            self.done = True


class _SecondMessage(Exception):
    """Raised in on_message_begin to stop llhttp at a message after ours (``extra``)."""


class Feeding:
    """Which ResponseParser's llhttp this thread is feeding right now.

    Set ``parser`` just before calling llhttp's ``feed_data``: the shared callbacks
    read it. ``ResponseParser.feed`` clears it after, so that a callback outside a feed
    fails loudly; the relay's per-read path leaves it set (a store per read less), which
    at worst keeps its last parser alive until the next feed.

    There is one per thread (see :func:`feeding`): the sidecar parses on its event loop
    thread only, but a test or an embedding may parse on two threads at once, and a
    callback must never reach another thread's parser.
    """

    __slots__ = ("parser",)

    def __init__(self) -> None:
        self.parser: ResponseParser | None = None


_THREAD: Final = threading.local()


def feeding() -> Feeding:
    """This thread's Feeding. A thread-local lookup: callers on a per-read path keep
    what it returns (a plain object, cheap to set) instead of calling it per read."""
    try:
        f: Feeding = _THREAD.feeding
    except AttributeError:
        f = _THREAD.feeding = Feeding()
    return f


def _make_head(status: int, reason: bytes, http11: bool,
               headers: list[tuple[bytes, bytes]]) -> ResponseHead:
    # llhttp has checked the syntax (and refused duplicate lengths, or a length with
    # chunked); what is left is what the relay needs to know about framing and reuse.
    content_length: int | None = None
    chunked = False
    conn_close = not http11
    for name, value in headers:
        if name == b"content-length":
            content_length = int(value)
        elif name == b"transfer-encoding":
            if value.lower() != b"chunked":
                # gzip-then-chunked would need decoding to tap usage; we ask for identity.
                raise UpstreamProtocolError("unsupported transfer-encoding")
            chunked = True
        elif name == b"connection":
            tokens = {t.strip() for t in value.lower().split(b",")}
            if b"close" in tokens:
                conn_close = True
            elif b"keep-alive" in tokens:
                conn_close = False
    return ResponseHead(
        status=status,
        reason=reason,
        http11=http11,
        headers=headers,
        content_length=content_length,
        chunked=chunked,
        keep_alive=not conn_close and (chunked or content_length is not None),
    )


def frame_chunk(payload: bytes | bytearray | memoryview) -> bytes:
    """Frame one piece of payload as an HTTP/1.1 chunk (used only when re-framing)."""
    return b"%x\r\n%b\r\n" % (len(payload), bytes(payload))


LAST_CHUNK = b"0\r\n\r\n"

# What a header list becomes once it has been used (a parser's once its head is
# built, a request's once the provider answered): immutable, so a stray append fails
# loudly instead of filling a list they all share. A fresh empty list in its place
# cost 56 bytes on every open stream.
NO_HEADERS: Final = cast("list[tuple[bytes, bytes]]", ())

# The reason phrases providers send, kept once: llhttp hands over a new bytes object
# per response, which every open stream would otherwise hold for its whole life.
_REASONS: Final = {
    r: r
    for r in (
        b"OK", b"Created", b"Accepted", b"No Content", b"Bad Request", b"Unauthorized",
        b"Forbidden", b"Not Found", b"Request Timeout", b"Payload Too Large",
        b"Too Many Requests", b"Internal Server Error", b"Bad Gateway",
        b"Service Unavailable", b"Gateway Timeout",
    )
}
