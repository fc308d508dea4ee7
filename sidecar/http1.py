"""Sans-IO HTTP/1.1 response framing for the upstream side.

The proxy parses only what it must of a provider's response: the head, and the
body framing (content-length, chunked, or read-until-close) so it knows where
the response ends and which bytes are payload for the usage tap. The raw bytes
themselves are forwarded untouched; this module never copies the body, it hands
out ``memoryview`` slices of what it was fed.

Like h11, nothing here touches a socket: feed bytes in, read results out, and
every malformed input raises :class:`UpstreamProtocolError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from sidecar.errors import UpstreamProtocolError

# A chunk-size line is a hex number plus optional extensions. Real providers send
# a few bytes; anything longer is an attack or a broken peer, not a big chunk.
MAX_CHUNK_LINE = 1024
# Trailers after the last chunk are legal but rare; cap what we will skip.
MAX_TRAILER_BYTES = 16 * 1024
# A chunk size needing more than 16 hex digits cannot be real and would make
# int() do unbounded work.
MAX_CHUNK_SIZE_DIGITS = 16

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


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    reason: bytes
    http11: bool
    headers: tuple[tuple[bytes, bytes], ...]  # names lower-cased, values stripped
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


def parse_response_head(buf: bytes | bytearray, max_head: int) -> tuple[ResponseHead, int] | None:
    """Parse a response head from the start of ``buf``.

    Returns ``(head, head_length)`` or ``None`` when more bytes are needed.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > max_head:
            raise UpstreamProtocolError(f"response head exceeds {max_head} bytes")
        return None
    if end > max_head:
        raise UpstreamProtocolError(f"response head exceeds {max_head} bytes")
    lines = bytes(buf[:end]).split(b"\r\n")
    status_line = lines[0]
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise UpstreamProtocolError("malformed response status line")
    try:
        status = int(parts[1])
    except ValueError:
        raise UpstreamProtocolError("malformed response status code") from None
    if not 100 <= status <= 999 or len(parts[1]) != 3:
        raise UpstreamProtocolError("malformed response status code")
    http11 = parts[0] == b"HTTP/1.1"
    headers: list[tuple[bytes, bytes]] = []
    content_length: int | None = None
    chunked = False
    conn_close = not http11
    for line in lines[1:]:
        colon = line.find(b":")
        if colon <= 0 or line[0] in b" \t":
            # Obsolete line folding and nameless headers are both refused (RFC 9112 5.2).
            raise UpstreamProtocolError("malformed response header line")
        name = line[:colon].strip().lower()
        value = line[colon + 1 :].strip()
        if name == b"content-length":
            if not value.isdigit() or (content_length is not None and int(value) != content_length):
                raise UpstreamProtocolError("invalid content-length")
            content_length = int(value)
        elif name == b"transfer-encoding":
            codings = [c.strip() for c in value.lower().split(b",")]
            if codings[-1] != b"chunked" or len(codings) > 1:
                # gzip-then-chunked would need decoding to tap usage; we ask for identity.
                raise UpstreamProtocolError("unsupported transfer-encoding")
            chunked = True
        elif name == b"connection":
            tokens = {t.strip() for t in value.lower().split(b",")}
            if b"close" in tokens:
                conn_close = True
            elif b"keep-alive" in tokens:
                conn_close = False
        headers.append((name, value))
    if chunked:
        # RFC 9112 6.3: chunked wins and the length must be ignored (and is a smuggling sign).
        content_length = None
    head = ResponseHead(
        status=status,
        reason=parts[2] if len(parts) > 2 else b"",
        http11=http11,
        headers=tuple(headers),
        content_length=content_length,
        chunked=chunked,
        keep_alive=not conn_close and (chunked or content_length is not None),
    )
    return head, end + 4


_HEX_DIGITS = b"0123456789abcdefABCDEF"


class ChunkState(IntEnum):
    SIZE = 0  # reading a chunk-size line
    DATA = 1  # inside chunk payload
    DATA_CRLF = 2  # the CRLF after a payload
    TRAILER = 3  # after the zero chunk: trailer lines up to an empty line
    DONE = 4


class ChunkedDecoder:
    """Incremental chunked-transfer decoder that never copies payload.

    ``feed`` returns the payload slices found in ``data`` and how many bytes of
    ``data`` belong to this message (bytes after the terminating chunk are not
    ours: a provider must not send them, and the caller treats them as an error).
    """

    __slots__ = ("_line", "_remaining", "_trailer_bytes", "state")

    def __init__(self) -> None:
        self.state = ChunkState.SIZE
        self._remaining = 0
        self._line = bytearray()  # partial size/trailer line split across reads
        self._trailer_bytes = 0

    @property
    def done(self) -> bool:
        return self.state is ChunkState.DONE

    def feed(self, data: bytes | memoryview) -> tuple[list[memoryview], int]:
        if self.state is ChunkState.SIZE and not self._line and type(data) is bytes:
            return self._feed_whole_frames(data)
        return self._feed(data if isinstance(data, memoryview) else memoryview(data))

    def _feed_whole_frames(self, data: bytes) -> tuple[list[memoryview], int]:
        """The common case, one read holding whole frames: a find and a slice per frame.

        Anything unusual (extensions, the last chunk, a frame split across reads,
        malformed input) is handed to the general state machine from that point.
        """
        n = len(data)
        pos = 0
        out: list[memoryview] = []
        view = memoryview(data)
        while pos < n:
            i = data.find(b"\r\n", pos)
            if i < 0 or i - pos > MAX_CHUNK_SIZE_DIGITS:
                break
            size_text = data[pos:i]
            if not size_text or size_text.translate(None, _HEX_DIGITS):
                break
            size = int(size_text, 16)
            end = i + 2 + size
            if size == 0 or end + 2 > n or data[end : end + 2] != b"\r\n":
                break
            out.append(view[i + 2 : end])
            pos = end + 2
        if pos < n:
            more, used = self._feed(view[pos:])
            out += more
            pos += used
        return out, pos

    def _feed(self, view: memoryview) -> tuple[list[memoryview], int]:
        n = len(view)
        pos = 0
        out: list[memoryview] = []
        while pos < n:
            state = self.state
            if state is ChunkState.DATA:
                take = min(self._remaining, n - pos)
                out.append(view[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self.state = ChunkState.DATA_CRLF
                    self._line.clear()
            elif state is ChunkState.SIZE or state is ChunkState.TRAILER:
                if self._line[-1:] == b"\r" and view[pos] == 0x0A:
                    # The CR ended the previous read; this LF completes the line.
                    line = bytes(self._line[:-1])
                    self._line.clear()
                    pos += 1
                else:
                    line_end = _find_crlf(view, pos)
                    if line_end < 0:
                        self._line += view[pos:]
                        if len(self._line) > MAX_CHUNK_LINE:
                            raise UpstreamProtocolError("chunk header line too long")
                        pos = n
                        break
                    if self._line:
                        self._line += view[pos:line_end]
                        line = bytes(self._line)
                        self._line.clear()
                    else:
                        line = bytes(view[pos:line_end])
                    pos = line_end + 2
                if state is ChunkState.SIZE:
                    self._start_chunk(line)
                else:
                    self._trailer_bytes += len(line) + 2
                    if self._trailer_bytes > MAX_TRAILER_BYTES:
                        raise UpstreamProtocolError("chunked trailer too long")
                    if not line:
                        self.state = ChunkState.DONE
                        return out, pos
            elif state is ChunkState.DATA_CRLF:
                # Usually both bytes are here; tolerate a split between reads.
                need = 2 - len(self._line)
                got = bytes(view[pos : pos + need])
                self._line += got
                pos += len(got)
                if len(self._line) == 2:
                    if self._line != b"\r\n":
                        raise UpstreamProtocolError("missing CRLF after chunk data")
                    self._line.clear()
                    self.state = ChunkState.SIZE
            else:  # DONE
                return out, pos
        return out, pos

    def _start_chunk(self, line: bytes) -> None:
        size_part = line.split(b";", 1)[0].strip()
        if not size_part or len(size_part) > MAX_CHUNK_SIZE_DIGITS:
            raise UpstreamProtocolError("invalid chunk size")
        try:
            size = int(size_part, 16)
        except ValueError:
            raise UpstreamProtocolError("invalid chunk size") from None
        if size_part[0] in b"+-_" or b"_" in size_part:
            raise UpstreamProtocolError("invalid chunk size")
        if size == 0:
            self.state = ChunkState.TRAILER
            self._trailer_bytes = 0
        else:
            self._remaining = size
            self.state = ChunkState.DATA


def _find_crlf(view: memoryview, start: int) -> int:
    """Index of the next CRLF in ``view`` at or after ``start``, or -1."""
    obj = view.obj
    if isinstance(obj, bytes) and len(view) == len(obj):
        # The common case: a whole read; search it in place, no copy.
        return obj.find(b"\r\n", start)
    idx = bytes(view[start:]).find(b"\r\n")
    return idx + start if idx >= 0 else -1


def frame_chunk(payload: bytes | bytearray | memoryview) -> bytes:
    """Frame one piece of payload as an HTTP/1.1 chunk (used only when re-framing)."""
    return b"%x\r\n%b\r\n" % (len(payload), bytes(payload))


LAST_CHUNK = b"0\r\n\r\n"
