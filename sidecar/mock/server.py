"""A fake LLM provider: OpenAI and Anthropic wire formats, exact usage, pacing and faults.

Used by `sidecar demo`, the test suite and the benchmark, so it must never be the bottleneck:
it is a raw `asyncio.Protocol` (uvloop in the CLI) with its own minimal HTTP/1.1 parsing, and
it answers from responses pre-encoded once per shape (`sidecar.mock.shapes`), filling in only
the response id and creation time per request.

Knobs are set at construction (or on the CLI) and can be overridden per request with headers,
so one instance serves many tests:

    x-mock-chunks: N            content deltas per stream (default 20)
    x-mock-chunk-tokens: N      words (= tokens) per delta (default 4; 128 in big mode)
    x-mock-delay-ms: D          pause between deltas; 0 = burst, the whole stream in one write
    x-mock-first-byte-ms: F     pause before the response head
    x-mock-bytes: 50MB          big mode: stream until the response is at least this long
    x-mock-always-usage: 1      OpenAI: send the usage chunk even without include_usage
    x-mock-fault: F[,F...]      status:NNN | disconnect-after:N | no-usage | hang | malformed
    x-mock-retry-after: S       retry-after value on 429/503 (default 1)
    x-mock-cache-read-tokens / x-mock-cache-write-tokens: N   cached prompt tokens to report
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Final, cast

import click
import orjson

from sidecar.mock import shapes
from sidecar.mock.shapes import (
    DEFAULT_BIG_CHUNK_TOKENS,
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_CHUNKS,
    WORDS,
    big_chunk_text,
    big_completion_tokens,
    chunk_texts,
    count_tokens,
    embedding_vector,
    encoding_name_for_model,
    expected_completion_tokens,
    expected_text,
    prompt_tokens,
)

__all__ = [
    "DEFAULT_BIG_CHUNK_TOKENS",
    "DEFAULT_CHUNKS",
    "DEFAULT_CHUNK_TOKENS",
    "WORDS",
    "MockConnection",
    "MockRequest",
    "MockUpstream",
    "big_chunk_text",
    "big_completion_tokens",
    "chunk_texts",
    "count_tokens",
    "embedding_vector",
    "encoding_name_for_model",
    "expected_completion_tokens",
    "expected_text",
    "expected_usage",
    "kind_for_path",
    "mock_upstream",
    "parse_size",
    "prompt_tokens",
]

MAX_HEAD: Final = 64 * 1024
MAX_BODY: Final = 64 * 1024 * 1024
# Big mode writes this much per transport.write and then yields, so a fast reader cannot make
# one 50 MB stream monopolise the loop, and a slow one is held back by pause_writing.
BIG_BLOCK: Final = 64 * 1024
# Bounded caches: the bench repeats a handful of bodies; a fuzzing test must not grow memory.
_CACHE_MAX: Final = 4096
# Pacer resolution (seconds): paced deltas due within the same half millisecond go out
# together from one timer callback.
_PACE_GRID: Final = 0.0005

_MALFORMED: Final = (
    b"HTTP/1.1 2x0 NOT A STATUS\r\nthis line is not a header\r\n\x00\x01\xff\r\n\r\n"
)
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


# --------------------------------------------------------------------------- records


@dataclass(slots=True, eq=False)
class MockConnection:
    """One accepted TCP connection. `closed_at` is the loop-independent monotonic time of
    connection_lost; `closed_by_peer` is False when the mock closed it (fault, stop, close)."""

    id: int
    opened_at: float
    closed_at: float | None = None
    closed_by_peer: bool = False
    requests: int = 0


@dataclass(slots=True, eq=False)
class MockRequest:
    """What the mock received and what it did about it (times are time.monotonic())."""

    method: str
    path: str
    head: bytes  # the raw request head; headers are parsed from it only when asked for
    body: bytes
    received_at: float
    connection: MockConnection
    kind: str = ""  # chat | completions | responses | embeddings | messages | "" (GET etc.)
    model: str = ""
    stream: bool = False
    status: int = 0  # status sent; 0 = nothing sent (hang) or garbage (malformed)
    response_id: str = ""  # e.g. "chatcmpl-mock00000000000000000007"
    prompt_tokens: int = 0
    completion_tokens: int = 0  # what the response's usage says (or would say with no-usage)
    usage_sent: bool = False
    chunks_sent: int = 0  # content deltas written
    bytes_sent: int = 0  # response bytes written, head and chunk framing included
    first_byte_at: float | None = None
    completed: bool = False  # the whole response, terminator included, was written
    _json: Any = field(default=None, repr=False)

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """(lower-cased name, value as sent) in order."""
        out: list[tuple[bytes, bytes]] = []
        for line in self.head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            out.append((name.strip().lower(), value.strip()))
        return out

    @property
    def headers(self) -> dict[str, str]:
        """Lower-cased name -> value; repeated headers joined with ", "."""
        out: dict[str, str] = {}
        for name, value in self.raw_headers:
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            out[key] = f"{out[key]}, {text}" if key in out else text
        return out

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def json(self) -> Any:
        """The body parsed as JSON (parsed lazily: the bench path never needs it)."""
        if self._json is None and self.body:
            self._json = orjson.loads(self.body)
        return self._json

    @property
    def closed_at(self) -> float | None:
        return self.connection.closed_at

    @property
    def connection_id(self) -> int:
        return self.connection.id

    async def wait_closed(self, timeout: float = 2.0) -> float:
        """Wait until the request's connection is gone; return the monotonic close time."""
        deadline = time.monotonic() + timeout
        while self.connection.closed_at is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"connection {self.connection.id} still open after {timeout}s")
            await asyncio.sleep(0.001)
        return self.connection.closed_at


# --------------------------------------------------------------------------- knobs


@dataclass(frozen=True, slots=True)
class _Faults:
    status: int | None = None
    disconnect_after: int | None = None
    no_usage: bool = False
    hang: bool = False
    malformed: bool = False


def _parse_faults(spec: str | None) -> _Faults:
    faults = _Faults()
    if not spec:
        return faults
    for raw in spec.split(","):
        item = raw.strip().lower()
        name, _, arg = item.partition(":")
        if not item or name == "none":
            continue
        if name == "status":
            code = int(arg)
            if not 100 <= code <= 599:
                raise ValueError(f"status fault wants an HTTP status, got {arg!r}")
            faults = replace(faults, status=code)
        elif name == "disconnect-after":
            faults = replace(faults, disconnect_after=max(0, int(arg)))
        elif name == "no-usage":
            faults = replace(faults, no_usage=True)
        elif name == "hang":
            faults = replace(faults, hang=True)
        elif name == "malformed":
            faults = replace(faults, malformed=True)
        else:
            raise ValueError(f"unknown mock fault {item!r}")
    return faults


def parse_size(text: str) -> int:
    """Size text -> bytes: "52428800", "50MB", "50M", "64k", "1GiB" (K/M/G are 1024-based)."""
    s = text.strip().lower().replace(" ", "")
    if s.endswith("ib"):
        s = s[:-2]
    elif s.endswith("b"):
        s = s[:-1]
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(s[-1:], 1)
    if scale != 1:
        s = s[:-1]
    return int(float(s) * scale)


@dataclass(frozen=True, slots=True)
class _Knobs:
    chunks: int
    chunk_tokens: int | None  # None: DEFAULT_CHUNK_TOKENS, or DEFAULT_BIG_CHUNK_TOKENS in big mode
    delay_ms: float
    first_byte_ms: float
    bytes_total: int
    always_usage: bool
    faults: _Faults
    retry_after: str
    cache_read: int
    cache_write: int

    def with_headers(self, items: Sequence[tuple[bytes, bytes]]) -> _Knobs:
        changes: dict[str, Any] = {}
        for name, raw in items:
            value = raw.decode("latin-1").strip()
            key = name[7:]  # after b"x-mock-"
            if key == b"chunks":
                changes["chunks"] = max(0, int(value))
            elif key == b"chunk-tokens":
                changes["chunk_tokens"] = max(1, int(value))
            elif key == b"delay-ms":
                changes["delay_ms"] = max(0.0, float(value))
            elif key == b"first-byte-ms":
                changes["first_byte_ms"] = max(0.0, float(value))
            elif key == b"bytes":
                changes["bytes_total"] = parse_size(value)
            elif key == b"always-usage":
                changes["always_usage"] = value.lower() in ("1", "true", "yes", "on")
            elif key == b"fault":
                changes["faults"] = _parse_faults(value)
            elif key == b"retry-after":
                changes["retry_after"] = value
            elif key == b"cache-read-tokens":
                changes["cache_read"] = max(0, int(value))
            elif key == b"cache-write-tokens":
                changes["cache_write"] = max(0, int(value))
            # Unknown x-mock-* headers are ignored so newer tests can run against older mocks.
        return replace(self, **changes) if changes else self


class _BadRequest(Exception):
    pass


def kind_for_path(path: str, api_format: str = "openai") -> str:
    """Endpoint kind from the request path (suffix match, so /openai/v1/... prefixes work);
    unknown paths answer in the instance's api_format."""
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/completions"):
        return "completions"
    if path.endswith("/responses"):
        return "responses"
    if path.endswith("/embeddings"):
        return "embeddings"
    if path.endswith("/messages"):
        return "messages"
    return "messages" if api_format == "anthropic" else "chat"


def expected_usage(
    kind: str,
    body: dict[str, Any],
    *,
    chunks: int = DEFAULT_CHUNKS,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    model: str | None = None,
) -> dict[str, int]:
    """prompt/completion/total tokens the mock reports for `body` sent to `kind`."""
    m = model or str(body.get("model") or "gpt-4o-mini")
    p = prompt_tokens(kind, body, m)
    c = 0 if kind == "embeddings" else expected_completion_tokens(chunks, chunk_tokens, m)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


# --------------------------------------------------------------------------- errors


_OPENAI_ERRORS: Final[dict[int, tuple[str, str | None, str]]] = {
    400: ("invalid_request_error", None, "Invalid request (mock)."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided (mock)."),
    404: ("invalid_request_error", "not_found", "Not found (mock)."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests (mock)."),
    500: ("server_error", None, "The server had an error while processing your request (mock)."),
    503: ("server_error", "service_unavailable", "The engine is currently overloaded (mock)."),
}
_ANTHROPIC_ERRORS: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def _error_response(status: int, kind: str, retry_after: str, message: str | None = None) -> bytes:
    extra: list[tuple[str, str]] = []
    if status in (429, 503, 529):
        extra.append(("retry-after", retry_after))
    if kind == "messages":
        etype = _ANTHROPIC_ERRORS.get(status, "api_error")
        text = message or f"{etype} (mock)"
        body: Any = {"type": "error", "error": {"type": etype, "message": text}}
    else:
        etype, code, default = _OPENAI_ERRORS.get(status, ("mock_error", None, "Mock error."))
        if status == 429:
            extra.append(("x-ratelimit-remaining-requests", "0"))
        body = {
            "error": {"message": message or default, "type": etype, "param": None, "code": code}
        }
    return shapes.json_response(status, body, extra)


# --------------------------------------------------------------------------- protocol


class _Plan:
    """How to answer one (path, body, x-mock-* headers) combination: everything that does not
    change from one identical request to the next, worked out once and cached. The bench sends
    the same body thousands of times; per request only the id and the clock are new."""

    __slots__ = (
        "_parts",
        "_second",
        "completion_tokens",
        "cuts",
        "direct",
        "faults",
        "id_prefix",
        "kind",
        "knobs",
        "model",
        "prompt_tokens",
        "reply",
        "status",
        "stream",
        "tmpl",
        "usage_sent",
    )

    def __init__(self, kind: str, knobs: _Knobs) -> None:
        self.kind = kind
        self.knobs = knobs
        self.faults = knobs.faults
        self.reply: bytes | None = None  # a fixed answer (status fault, bad request)
        self.status = 200
        self.tmpl: shapes.Template | None = None
        self.model = ""
        self.stream = False
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.usage_sent = False
        self.direct = True  # answer in one write from data_received (no pacing, no big mode)
        self.id_prefix = _ID_PREFIX[kind]
        # Offsets in the burst bytes where a paced writer may stop: after head+preamble,
        # then after each content delta (what follows the last cut is the trailer).
        self.cuts: list[int] = []
        self._second = -1
        self._parts: list[bytes] = []

    def burst(self, rid: bytes) -> bytes:
        """The whole response with this request's id. The clock is filled in once a second
        and the template pre-split at the id, so a request costs one join."""
        assert self.tmpl is not None
        now = int(time.time())
        if now != self._second:
            filled = self.tmpl.burst.replace(shapes.CREATED_PH, b"%d" % now)
            self._parts = filled.split(shapes.ID_PH)
            self._second = now
        return rid.join(self._parts)


_ID_PREFIX: Final = {
    "chat": "chatcmpl-",
    "completions": "cmpl-",
    "responses": "resp_",
    "messages": "msg_",
    "embeddings": "",
}

_Head = tuple[bytes, bytes, int, bool, bool, bool, tuple[tuple[bytes, bytes], ...]]


def _header_value(low: bytes, name: bytes) -> bytes | None:
    """Value of header `name` (given as b"\\r\\nname:") in a lower-cased head, or None."""
    i = low.find(name)
    if i < 0:
        return None
    start = i + len(name)
    j = low.find(b"\r\n", start)
    return low[start : j if j >= 0 else len(low)].strip()


def _parse_head(head: bytes) -> _Head:
    """Request line and the few headers the mock acts on. The full header list is parsed
    later, and only if a test asks for it (MockRequest.raw_headers)."""
    eol = head.find(b"\r\n")
    parts = (head if eol < 0 else head[:eol]).split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise ValueError("bad request line")
    method, target, version = parts
    close = version == b"HTTP/1.0"
    length = 0
    chunked = expect = False
    mock: tuple[tuple[bytes, bytes], ...] = ()
    if eol >= 0:
        # Header names are case-insensitive: search a lower-cased copy, anchored at line starts.
        low = head.lower()
        value = _header_value(low, b"\r\ncontent-length:")
        if value is not None:
            length = int(value)
            if length < 0:
                raise ValueError("negative content-length")
        value = _header_value(low, b"\r\ntransfer-encoding:")
        chunked = value is not None and b"chunked" in value
        value = _header_value(low, b"\r\nconnection:")
        if value is not None:
            if b"close" in value:
                close = True
            elif b"keep-alive" in value:
                close = False
        expect = _header_value(low, b"\r\nexpect:") == b"100-continue"
        if b"\r\nx-mock-" in low:
            items: list[tuple[bytes, bytes]] = []
            for line in low[eol + 2 :].split(b"\r\n"):
                if line.startswith(b"x-mock-"):
                    name, _, val = line.partition(b":")
                    items.append((name.strip(), val.strip()))
            mock = tuple(items)
    return method, target, length, chunked, close, expect, mock


class _Paced:
    """A response being written by timer callbacks (delay and/or first-byte delay)."""

    __slots__ = (
        "close",
        "cuts",
        "data",
        "delay",
        "end",
        "index",
        "plan",
        "req",
        "rid",
        "stalled",
        "t0",
    )

    def __init__(self, req: MockRequest, plan: _Plan, rid: bytes, close: bool) -> None:
        self.req = req
        self.plan = plan
        self.rid = rid
        self.close = close
        self.data = b""
        self.cuts: list[int] = []
        self.end = 0  # deltas to write before the trailer (fewer with disconnect-after)
        self.index = 0
        self.delay = 0.0
        self.t0 = 0.0
        self.stalled = False  # waiting for resume_writing


class _MockProtocol(asyncio.Protocol):
    """One connection: parse requests in order, answer each before looking at the next."""

    def __init__(self, up: MockUpstream) -> None:
        self._up = up
        self._transport: asyncio.Transport | None = None
        # Unparsed input. Usually empty between requests, so a request that arrives in one
        # packet is parsed straight from the bytes object data_received was given.
        self._pending: bytes | bytearray = b""
        self._busy = False  # a response is in flight (task, or hang): later requests wait
        self._paused = False
        self._resume: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None  # big mode writer
        self._paced: _Paced | None = None  # paced / delayed response in progress
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False  # the mock itself closed / is closing this connection
        self._continued = False  # "100 Continue" already sent for the current request
        self.info = MockConnection(0, 0.0)

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        up = self._up
        up.connections_accepted += 1
        self.info = MockConnection(up.connections_accepted, time.monotonic())
        if up.record:
            up.connections.append(self.info)
        up._live.add(self)

    def data_received(self, data: bytes) -> None:
        pending = self._pending
        if pending:
            if isinstance(pending, bytes):
                pending = self._pending = bytearray(pending)
            pending += data
        else:
            self._pending = data
        if not self._busy:
            self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        self.info.closed_at = time.monotonic()
        self.info.closed_by_peer = not self._closing
        self._closing = True
        self._up._live.discard(self)
        if self._task is not None:
            self._task.cancel()
        if self._timer is not None:
            self._timer.cancel()
        self._paced = None
        if self._resume is not None and not self._resume.done():
            self._resume.cancel()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)
        paced = self._paced
        if paced is not None and paced.stalled:
            paced.stalled = False
            self._tick()

    # -- helpers

    def close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    def _write(self, req: MockRequest, data: bytes) -> None:
        assert self._transport is not None
        if req.first_byte_at is None:
            req.first_byte_at = time.monotonic()
        req.bytes_sent += len(data)
        self._transport.write(data)

    async def _drained(self) -> None:
        while self._paused and not self._closing:
            self._resume = asyncio.get_running_loop().create_future()
            await self._resume

    # -- request parsing

    def _process(self) -> None:
        buf = self._pending
        size = len(buf)
        pos = 0
        while pos < size and not self._busy and not self._closing:
            if buf.startswith(b"\r\n", pos):  # stray CRLF between requests (RFC 9112 2.2)
                pos += 2
                continue
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0:
                if size - pos > MAX_HEAD:
                    self._reject(431, "request head too large")
                break
            head = bytes(buf[pos:end])
            try:
                method, target, length, chunked, close, expect, mock = _parse_head(head)
                start = end + 4
                if chunked:
                    got = _dechunk(buf, start)
                elif length > MAX_BODY:
                    self._reject(413, "request body too large")
                    break
                elif size >= start + length:
                    got = bytes(buf[start : start + length]), start + length
                else:
                    got = None
            except ValueError as exc:
                self._reject(400, f"bad request: {exc}")
                break
            if got is None:  # body incomplete: keep it, maybe tell the client to go on
                if expect and not self._continued:
                    self._continued = True
                    assert self._transport is not None
                    self._transport.write(_CONTINUE)
                break
            body, pos = got
            self._continued = False
            if not self._handle(method, target, head, body, close, mock):
                self._busy = True
        if pos >= size:
            self._pending = b""
        elif pos:
            self._pending = buf[pos:]

    def _reject(self, status: int, message: str) -> None:
        """Answer a request we could not parse, then close: the stream position is lost."""
        req = MockRequest("", "", b"", b"", time.monotonic(), self.info, status=status)
        self._write(req, _error_response(status, "chat", "1", message))
        self.close()

    # -- dispatch

    def _handle(
        self,
        method: bytes,
        target: bytes,
        head: bytes,
        body: bytes,
        close: bool,
        mock: tuple[tuple[bytes, bytes], ...],
    ) -> bool:
        """Answer one request. True if the answer is complete (next request may be parsed)."""
        up = self._up
        q = target.find(b"?")
        path = (target if q < 0 else target[:q]).decode("latin-1")
        req = MockRequest(method.decode("latin-1"), path, head, body, time.monotonic(), self.info)
        self.info.requests += 1
        up.requests_total += 1
        if up.record:
            up.requests.append(req)
        if method != b"POST":
            return self._not_post(req, close)

        key = (path, body, mock)
        plan = up._plans.get(key)
        if plan is None:
            plan = up._plan(key)
        req.kind = plan.kind
        faults = plan.faults
        if plan.reply is not None:
            req.status = plan.status
            return self._simple(req, plan.reply, close)
        if faults.hang:
            return False  # busy for good: this connection answers nothing more
        if faults.malformed:
            self._write(req, _MALFORMED)
            self.close()
            return True

        tmpl = plan.tmpl
        assert tmpl is not None
        req.model = plan.model
        req.stream = plan.stream
        req.prompt_tokens = plan.prompt_tokens
        req.completion_tokens = plan.completion_tokens
        req.usage_sent = plan.usage_sent
        req.status = 200
        rid = shapes.make_id(up._next_id())
        req.response_id = plan.id_prefix + rid.decode()

        if not plan.direct:
            if tmpl.repeat:
                self._task = asyncio.get_running_loop().create_task(
                    self._big(req, plan, rid, close)
                )
            else:
                self._paced = _Paced(req, plan, rid, close)
                first = plan.knobs.first_byte_ms
                if first > 0:
                    loop = asyncio.get_running_loop()
                    self._timer = loop.call_later(first / 1000.0, self._begin)
                else:
                    self._begin()
            return False

        # The common case: the whole response in one write.
        data = plan.burst(rid)
        if close:
            data = data.replace(b"connection: keep-alive", b"connection: close", 1)
        limit = faults.disconnect_after
        if limit is not None:
            self._write(req, self._truncated(req, tmpl, data, limit))
            self.close()
            return True
        self._write(req, data)
        req.chunks_sent = len(tmpl.deltas)
        req.completed = True
        if close:
            self.close()
        return True

    @staticmethod
    def _truncated(req: MockRequest, tmpl: shapes.Template, data: bytes, limit: int) -> bytes:
        """disconnect-after:N cut: a stream loses everything after its N-th content delta
        (finish, usage and terminator included); a JSON body is cut in half."""
        if not req.stream:
            return data[: len(tmpl.head) + (len(data) - len(tmpl.head)) // 2]
        n = min(limit, len(tmpl.deltas))
        req.chunks_sent = n
        cut = len(tmpl.head) + len(tmpl.pre) + sum(len(d) for d in tmpl.deltas[:n])
        return data[: cut + len(data) - len(tmpl.burst)]  # "connection: close" shortens the head

    def _simple(self, req: MockRequest, data: bytes, close: bool) -> bool:
        if close:
            data = data.replace(b"connection: keep-alive", b"connection: close", 1)
        self._write(req, data)
        req.completed = True
        if close:
            self.close()
        return True

    def _not_post(self, req: MockRequest, close: bool) -> bool:
        path = req.path
        if req.method not in ("GET", "HEAD"):
            data = _error_response(405, "chat", "1", f"{req.method} not allowed")
        elif path in ("/healthz", "/readyz", "/health"):
            data = shapes.json_response(200, {"status": "ok"})
        elif path.endswith("/models"):
            model = self._up.model
            data = shapes.json_response(
                200,
                {
                    "object": "list",
                    "data": [{"id": model, "object": "model", "created": 0, "owned_by": "mock"}],
                },
            )
        else:
            data = _error_response(404, "chat", "1", f"no route for {req.method} {path}")
        req.status = int(data[9:12])
        if req.method == "HEAD":
            data = data[: data.index(b"\r\n\r\n") + 4]
        return self._simple(req, data, close)

    # -- paced and delayed responses: callbacks from a shared pacer (MockUpstream._pace), no
    # task per stream. The bench paces hundreds of streams at 1 ms; a coroutine with a sleep
    # per delta, or even a timer per delta, cost several times more CPU per event than this.

    def _begin(self) -> None:
        """First byte time: write the head (and preamble), then pace the deltas."""
        self._timer = None
        p = self._paced
        if p is None or self._closing:
            return
        req, plan = p.req, p.plan
        data = plan.burst(p.rid)
        if p.close:
            data = data.replace(b"connection: keep-alive", b"connection: close", 1)
        p.data = data
        # "connection: close" is shorter than "connection: keep-alive": shift the cuts.
        shift = len(data) - len(plan.tmpl.burst) if plan.tmpl is not None else 0
        p.cuts = [c + shift for c in plan.cuts] if shift else plan.cuts
        limit = plan.faults.disconnect_after
        if not req.stream or not p.cuts:
            if limit is not None:
                assert plan.tmpl is not None
                self._write(req, self._truncated(req, plan.tmpl, data, limit))
                self.close()
                return
            self._write(req, data)
            req.completed = True
            self._response_done(p.close)
            return
        n_deltas = len(p.cuts) - 1
        p.end = n_deltas if limit is None else min(limit, n_deltas)
        p.delay = plan.knobs.delay_ms / 1000.0
        if p.delay <= 0 and limit is None:  # only the first byte was delayed
            self._write(req, data)
            req.chunks_sent = n_deltas
            req.completed = True
            self._response_done(p.close)
            return
        self._write(req, data[: p.cuts[0]])
        p.t0 = asyncio.get_running_loop().time()
        self._tick()

    def _tick(self) -> None:
        """Write the next delta; schedule the one after against t0 + i * delay, so timer
        lateness does not accumulate over a long stream."""
        self._timer = None
        p = self._paced
        if p is None or self._closing:
            return
        if self._paused:
            p.stalled = True  # resume_writing calls us again
            return
        req = p.req
        i = p.index
        if i < p.end:
            self._write(req, p.data[p.cuts[i] : p.cuts[i + 1]])
            req.chunks_sent = i = p.index = i + 1
        if i < p.end:
            self._up._pace(self, p.t0 + i * p.delay)
            return
        if p.plan.faults.disconnect_after is not None:
            self.close()
            return
        self._write(req, p.data[p.cuts[-1] :])
        req.completed = True
        self._response_done(p.close)

    def _response_done(self, close: bool) -> None:
        """A slow-path response is complete: go on with pipelined requests, or close."""
        self._paced = None
        self._task = None
        if close:
            self.close()
            return
        self._busy = False
        if self._pending:
            self._process()

    async def _big(self, req: MockRequest, plan: _Plan, rid: bytes, close: bool) -> None:
        """Big mode: one delta frame repeated to the requested size, written in blocks from a
        task that waits on resume_writing, so what the mock holds for a slow reader stays
        near the transport's high-water mark plus one block, whatever the size."""
        tmpl = plan.tmpl
        assert tmpl is not None
        knobs = plan.knobs
        if knobs.first_byte_ms > 0:
            await asyncio.sleep(knobs.first_byte_ms / 1000.0)
        if self._closing:
            return
        created = b"%d" % int(time.time())
        head = tmpl.head
        if close:
            head = head.replace(b"connection: keep-alive", b"connection: close", 1)
        limit = plan.faults.disconnect_after
        self._write(req, head + shapes.fill(tmpl.pre, rid, created))
        frame = shapes.fill(tmpl.deltas[0], rid, created)
        await self._write_big(req, frame, tmpl.repeat, limit)
        if self._closing:
            return
        if limit is not None:
            self.close()
            return
        self._write(req, shapes.fill(tmpl.post, rid, created))
        req.completed = True
        self._response_done(close)

    async def _write_big(
        self, req: MockRequest, frame: bytes, repeat: int, limit: int | None
    ) -> None:
        total = repeat if limit is None else min(repeat, limit)
        per = max(1, BIG_BLOCK // len(frame))
        block = frame * per
        sent = 0
        while sent < total:
            if self._paused:
                await self._drained()
            if self._closing:
                return
            k = min(per, total - sent)
            self._write(req, block if k == per else frame * k)
            sent += k
            req.chunks_sent = sent
            # Let other connections run even when this reader keeps up with us.
            await asyncio.sleep(0)


def _dechunk(buf: bytes | bytearray, start: int) -> tuple[bytes, int] | None:
    """A chunked request body starting at `start`: (body, end offset), or None if incomplete.
    Trailers are skipped. Raises ValueError on a bad size line or an oversized body."""
    out = bytearray()
    pos = start
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", pos - 2)
            if end < 0:
                return None
            return bytes(out), end + 4
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos : pos + size]
        pos += size + 2
        if len(out) > MAX_BODY:
            raise ValueError("chunked body too large")


# --------------------------------------------------------------------------- server


class MockUpstream:
    """The fake provider. `async with MockUpstream(...) as mock:` then point a client at
    `mock.url`; inspect `mock.requests` / `mock.connections` afterwards."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_format: str = "openai",
        chunks: int = DEFAULT_CHUNKS,
        chunk_tokens: int | None = None,
        delay_ms: float = 0,
        first_byte_ms: float = 0,
        always_usage: bool = False,
        model: str = "gpt-4o-mini",
        fault: str | None = None,
        bytes_total: int = 0,
        retry_after: float = 1,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        record: bool = True,
        backlog: int = 4096,
    ) -> None:
        if api_format not in ("openai", "anthropic"):
            raise ValueError(f"api_format must be openai or anthropic, not {api_format!r}")
        self.host = host
        self._port = port
        self.api_format = api_format
        self.model = model
        # record=False keeps memory flat under a long benchmark; counters still work.
        self.record = record
        self._backlog = backlog
        retry = str(int(retry_after)) if float(retry_after).is_integer() else str(retry_after)
        self._knobs = _Knobs(
            chunks=chunks,
            chunk_tokens=chunk_tokens,
            delay_ms=delay_ms,
            first_byte_ms=first_byte_ms,
            bytes_total=bytes_total,
            always_usage=always_usage,
            faults=_parse_faults(fault),
            retry_after=retry,
            cache_read=cache_read_tokens,
            cache_write=cache_write_tokens,
        )
        self.requests: list[MockRequest] = []
        self.connections: list[MockConnection] = []
        self.connections_accepted = 0
        self.requests_total = 0
        self._live: set[_MockProtocol] = set()
        self._server: asyncio.AbstractServer | None = None
        self._ids = 0
        self._due: dict[int, list[_MockProtocol]] = {}  # pacer slot -> streams due then
        self._plans: dict[tuple[str, bytes, tuple[tuple[bytes, bytes], ...]], _Plan] = {}
        self._templates: dict[shapes.Shape, shapes.Template] = {}
        self._big: dict[tuple[shapes.Shape, int], shapes.Template] = {}

    # -- lifecycle

    async def start(self) -> None:
        # Load the default model's encoding off the loop: the first load takes ~0.5 s, and
        # paying it inside the first request would skew its latency.
        await asyncio.to_thread(shapes.count_tokens, "warm up", encoding_name_for_model(self.model))
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _MockProtocol(self),
            self.host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
        )
        sock = self._server.sockets[0]
        self._port = int(sock.getsockname()[1])

    async def stop(self) -> None:
        """Close the listener and every connection (in-flight responses are cut short)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for proto in list(self._live):
            proto.abort()
        if server is not None:
            await server.wait_closed()
        # Let connection_lost callbacks run so records show the close.
        await asyncio.sleep(0)

    async def __aenter__(self) -> MockUpstream:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    @property
    def last(self) -> MockRequest:
        return self.requests[-1]

    @property
    def open_connections(self) -> int:
        return len(self._live)

    def reset(self) -> None:
        """Forget recorded requests and connections (counters restart too)."""
        self.requests.clear()
        self.connections.clear()
        self.connections_accepted = 0
        self.requests_total = 0

    async def wait_for_requests(self, n: int = 1, timeout: float = 2.0) -> list[MockRequest]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.requests)} of {n} requests after {timeout}s")
            await asyncio.sleep(0.001)
        return self.requests

    # -- internals used by the protocol

    def _pace(self, proto: _MockProtocol, when: float) -> None:
        """Call proto._tick() at loop time `when`, rounded up to the pacer's grid. Streams due
        in the same slot share one timer and one loop wake-up: libuv timers have 1 ms
        resolution anyway, and deadlines are absolute, so rounding never accumulates."""
        slot = math.ceil(when / _PACE_GRID)
        due = self._due.get(slot)
        if due is None:
            due = self._due[slot] = []
            asyncio.get_running_loop().call_at(slot * _PACE_GRID, self._fire, slot)
        due.append(proto)

    def _fire(self, slot: int) -> None:
        for proto in self._due.pop(slot, ()):
            proto._tick()

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    def _plan(self, key: tuple[str, bytes, tuple[tuple[bytes, bytes], ...]]) -> _Plan:
        """Work out (slowly, once) how to answer this path + body + x-mock-* headers."""
        path, body, mock = key
        kind = kind_for_path(path, self.api_format)
        try:
            knobs = self._knobs.with_headers(mock) if mock else self._knobs
        except ValueError as exc:
            plan = _Plan(kind, self._knobs)
            plan.status = 400
            plan.reply = _error_response(400, kind, "1", f"bad x-mock header: {exc}")
            return plan  # not cached: a broken test header is not worth remembering
        plan = _Plan(kind, knobs)
        faults = knobs.faults
        if faults.status is not None:
            plan.status = faults.status
            plan.reply = _error_response(faults.status, kind, knobs.retry_after)
        elif not (faults.hang or faults.malformed):
            try:
                self._plan_response(plan, kind, body)
            except _BadRequest as exc:
                plan.status = 400
                plan.reply = _error_response(400, kind, "1", str(exc))
        if len(self._plans) >= _CACHE_MAX:
            self._plans.clear()
        self._plans[key] = plan
        return plan

    def _plan_response(self, plan: _Plan, kind: str, body: bytes) -> None:
        try:
            obj = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError as exc:
            raise _BadRequest(f"body is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise _BadRequest("body must be a JSON object")
        model = obj.get("model")
        if not isinstance(model, str) or not model:
            model = self.model
        knobs = plan.knobs
        options = obj.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        stream = obj.get("stream") is True and kind != "embeddings"
        big = stream and knobs.bytes_total > 0
        openai_stream = stream and kind in ("chat", "completions")
        shape = shapes.Shape(
            kind=kind,
            model=model,
            stream=stream,
            chunks=knobs.chunks,
            chunk_tokens=knobs.chunk_tokens
            or (DEFAULT_BIG_CHUNK_TOKENS if big else DEFAULT_CHUNK_TOKENS),
            usage=not knobs.faults.no_usage,
            usage_nulls=openai_stream and (include_usage or knobs.always_usage),
            prompt_tokens=prompt_tokens(kind, obj, model),
            cache_read=knobs.cache_read,
            cache_write=knobs.cache_write,
            inputs=shapes.input_count(obj) if kind == "embeddings" else 1,
            base64=obj.get("encoding_format") == "base64",
        )
        tmpl = self._big_template(shape, knobs.bytes_total) if big else self._template(shape)
        plan.tmpl = tmpl
        if stream and not big:
            cut = len(tmpl.head) + len(tmpl.pre)
            plan.cuts = [cut]
            for delta in tmpl.deltas:
                cut += len(delta)
                plan.cuts.append(cut)
        plan.model = model
        plan.stream = stream
        plan.prompt_tokens = shape.prompt_tokens
        plan.completion_tokens = tmpl.completion_tokens
        # An OpenAI stream only carries usage when asked (include_usage / always_usage).
        plan.usage_sent = shape.usage and (shape.usage_nulls or not openai_stream)
        plan.direct = not (knobs.first_byte_ms > 0 or (stream and (knobs.delay_ms > 0 or big)))

    def _template(self, shape: shapes.Shape) -> shapes.Template:
        tmpl = self._templates.get(shape)
        if tmpl is None:
            if len(self._templates) >= _CACHE_MAX:
                self._templates.clear()
            tmpl = self._templates[shape] = shapes.build(shape)
        return tmpl

    def _big_template(self, shape: shapes.Shape, nbytes: int) -> shapes.Template:
        """Big mode: the number of repeats is chosen so the whole response (head and framing
        included) is at least `nbytes` and overshoots by less than one delta frame."""
        key = (shape, nbytes)
        tmpl = self._big.get(key)
        if tmpl is not None:
            return tmpl
        probe = shapes.build(replace(shape, big=True, chunks=1))
        fixed = probe.total_bytes - len(probe.deltas[0])
        repeats = shapes.big_repeats(nbytes, fixed, len(probe.deltas[0]))
        tmpl = shapes.build(replace(shape, big=True, chunks=repeats))
        # The trailer grows by a few digits with the counts; top up if that tipped us under.
        while tmpl.total_bytes < nbytes:
            repeats += 1
            tmpl = shapes.build(replace(shape, big=True, chunks=repeats))
        if len(self._big) >= 64:
            self._big.clear()
        self._big[key] = tmpl
        return tmpl


# --------------------------------------------------------------------------- CLI


async def _serve(mock: MockUpstream) -> None:
    # Handlers first: a supervisor may signal us while the tokenizer is still loading, and
    # a background process started by a shell ignores SIGINT until we take it over.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # add_signal_handler is POSIX-only
            loop.add_signal_handler(sig, stop.set)
    await mock.start()
    print(mock.url, flush=True)
    try:
        await stop.wait()
    finally:
        await mock.stop()
        print(
            f"mock-upstream: {mock.requests_total} requests on "
            f"{mock.connections_accepted} connections",
            file=sys.stderr,
            flush=True,
        )


@click.command("mock-upstream")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=0, show_default=True, help="0 picks a free port.")
@click.option(
    "--format",
    "api_format",
    type=click.Choice(["openai", "anthropic"]),
    default="openai",
    show_default=True,
    help="Answer format for paths that do not name an endpoint.",
)
@click.option(
    "--chunks", default=DEFAULT_CHUNKS, show_default=True, help="Content deltas per stream."
)
@click.option(
    "--chunk-tokens", type=int, default=None, help="Tokens per delta [4; 128 in big mode]."
)
@click.option("--delay-ms", default=0.0, show_default=True, help="Between deltas; 0 = burst.")
@click.option("--first-byte-ms", default=0.0, show_default=True, help="Before the response head.")
@click.option(
    "--always-usage", is_flag=True, help="Send the usage chunk even without include_usage."
)
@click.option("--bytes", "bytes_total", default="0", help="Big mode: stream size, e.g. 50MB.")
@click.option("--model", default="gpt-4o-mini", show_default=True, help="When the body has none.")
@click.option("--fault", default=None, help="status:NNN|disconnect-after:N|no-usage|hang|malformed")
@click.option("--retry-after", default=1.0, show_default=True, help="retry-after on 429/503.")
def mock_upstream(
    host: str,
    port: int,
    api_format: str,
    chunks: int,
    chunk_tokens: int | None,
    delay_ms: float,
    first_byte_ms: float,
    always_usage: bool,
    bytes_total: str,
    model: str,
    fault: str | None,
    retry_after: float,
) -> None:
    """Run the fake LLM provider until SIGINT/SIGTERM; prints the URL it listens on."""
    import uvloop

    try:
        mock = MockUpstream(
            host=host,
            port=port,
            api_format=api_format,
            chunks=chunks,
            chunk_tokens=chunk_tokens,
            delay_ms=delay_ms,
            first_byte_ms=first_byte_ms,
            always_usage=always_usage,
            model=model,
            fault=fault,
            bytes_total=parse_size(bytes_total),
            retry_after=retry_after,
            # A long benchmark would otherwise keep every request in memory.
            record=False,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    uvloop.run(_serve(mock))
