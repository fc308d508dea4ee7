"""A fake LLM provider: OpenAI and Anthropic wire formats, exact usage, pacing and faults.

Used by `sidecar demo`, the test suite and the benchmark, so it must never be the bottleneck:
it is a raw `asyncio.Protocol` (uvloop in the CLI) with its own minimal HTTP/1.1 parsing, and
it answers from responses pre-encoded once per shape (`sidecar.mock_shapes`), filling in only
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
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Final, cast

import click
import orjson

from sidecar import mock_shapes as shapes
from sidecar.mock_shapes import (
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
    raw_headers: list[tuple[bytes, bytes]]  # lower-cased names, values as sent
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


@dataclass(frozen=True, slots=True)
class _Parsed:
    model: str
    stream: bool
    include_usage: bool
    prompt_tokens: int
    inputs: int
    base64: bool


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


class _MockProtocol(asyncio.Protocol):
    """One connection: parse requests in order, answer each before looking at the next."""

    def __init__(self, up: MockUpstream) -> None:
        self._up = up
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._busy = False  # a response is in flight (task, or hang): later requests wait
        self._paused = False
        self._resume: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False  # the mock itself closed / is closing this connection
        self._continued = False  # "100 Continue" already sent for the current request
        self._req: MockRequest | None = None
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
        self._buf += data
        if not self._busy:
            self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        self.info.closed_at = time.monotonic()
        self.info.closed_by_peer = not self._closing
        self._closing = True
        self._up._live.discard(self)
        if self._task is not None:
            self._task.cancel()
        if self._resume is not None and not self._resume.done():
            self._resume.cancel()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)

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
        buf = self._buf
        while buf and not self._busy and not self._closing:
            if buf.startswith(b"\r\n"):  # stray CRLF between pipelined requests (RFC 9112 2.2)
                del buf[:2]
                continue
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._reject(431, "request head too large")
                return
            try:
                request = self._parse_head(bytes(buf[:end]))
            except (ValueError, UnicodeDecodeError) as exc:
                self._reject(400, f"bad request head: {exc}")
                return
            method, target, headers, length, chunked, close, expect, mock = request
            start = end + 4
            if chunked:
                got = _dechunk(buf, start)
                if got is None:
                    if expect and not self._continued:
                        self._send_continue()
                    return
                body, consumed = got
            else:
                if length > MAX_BODY:
                    self._reject(413, "request body too large")
                    return
                consumed = start + length
                if len(buf) < consumed:
                    if expect and not self._continued:
                        self._send_continue()
                    return
                body = bytes(buf[start:consumed])
            if consumed == len(buf):
                buf.clear()
            else:
                del buf[:consumed]
            self._continued = False
            if not self._handle(method, target, headers, body, close, mock):
                self._busy = True

    def _send_continue(self) -> None:
        self._continued = True
        assert self._transport is not None
        self._transport.write(_CONTINUE)

    @staticmethod
    def _parse_head(
        head: bytes,
    ) -> tuple[
        bytes, bytes, list[tuple[bytes, bytes]], int, bool, bool, bool, list[tuple[bytes, bytes]]
    ]:
        line, _, rest = head.partition(b"\r\n")
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            raise ValueError("request line")
        method, target, version = parts
        close = version == b"HTTP/1.0"
        headers: list[tuple[bytes, bytes]] = []
        mock: list[tuple[bytes, bytes]] = []
        length = 0
        chunked = False
        expect = False
        if rest:
            for hline in rest.split(b"\r\n"):
                name, sep, value = hline.partition(b":")
                if not sep:
                    raise ValueError("header line without a colon")
                name = name.strip().lower()
                value = value.strip()
                headers.append((name, value))
                if name == b"content-length":
                    length = int(value)
                    if length < 0:
                        raise ValueError("negative content-length")
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                elif name == b"connection":
                    v = value.lower()
                    if b"close" in v:
                        close = True
                    elif b"keep-alive" in v:
                        close = False
                elif name == b"expect":
                    expect = value.lower() == b"100-continue"
                elif name.startswith(b"x-mock-"):
                    mock.append((name, value))
        return method, target, headers, length, chunked, close, expect, mock

    def _reject(self, status: int, message: str) -> None:
        """Answer a request we could not parse, then close: the stream position is lost."""
        req = MockRequest("", "", [], b"", time.monotonic(), self.info, status=status)
        self._write(req, _error_response(status, "chat", "1", message))
        self.close()

    # -- dispatch

    def _handle(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        close: bool,
        mock: list[tuple[bytes, bytes]],
    ) -> bool:
        """Answer one request. True if the answer is complete (next request may be parsed)."""
        up = self._up
        path = target.split(b"?", 1)[0].decode("latin-1")
        req = MockRequest(
            method.decode("latin-1"), path, headers, body, time.monotonic(), self.info
        )
        self.info.requests += 1
        up.requests_total += 1
        if up.record:
            up.requests.append(req)
        self._req = req
        try:
            knobs = up._knobs.with_headers(mock) if mock else up._knobs
        except ValueError as exc:
            return self._simple(
                req, _error_response(400, "chat", "1", f"bad x-mock header: {exc}"), close
            )

        if method == b"GET" or method == b"HEAD":
            return self._get(req, path, close)
        if method != b"POST":
            return self._simple(req, _error_response(405, "chat", "1", "use POST"), close)

        kind = kind_for_path(path, up.api_format)
        req.kind = kind
        faults = knobs.faults
        if faults.hang:
            return False  # busy forever: this connection answers nothing more
        if faults.malformed:
            self._write(req, _MALFORMED)
            self.close()
            return True
        if faults.status is not None:
            req.status = faults.status
            return self._simple(req, _error_response(faults.status, kind, knobs.retry_after), close)

        try:
            parsed = up._parse(kind, body)
        except _BadRequest as exc:
            return self._simple(req, _error_response(400, kind, "1", str(exc)), close)
        req.model = parsed.model
        req.stream = parsed.stream and kind != "embeddings"
        req.prompt_tokens = parsed.prompt_tokens

        big = req.stream and knobs.bytes_total > 0
        tokens = knobs.chunk_tokens or (DEFAULT_BIG_CHUNK_TOKENS if big else DEFAULT_CHUNK_TOKENS)
        openai_stream = req.stream and kind in ("chat", "completions")
        shape = shapes.Shape(
            kind=kind,
            model=parsed.model,
            stream=req.stream,
            chunks=knobs.chunks,
            chunk_tokens=tokens,
            usage=not faults.no_usage,
            usage_nulls=openai_stream and (parsed.include_usage or knobs.always_usage),
            prompt_tokens=parsed.prompt_tokens,
            cache_read=knobs.cache_read,
            cache_write=knobs.cache_write,
            inputs=parsed.inputs,
            base64=parsed.base64,
        )
        tmpl = up._big_template(shape, knobs.bytes_total) if big else up._template(shape)
        req.status = 200
        req.completion_tokens = tmpl.completion_tokens
        req.usage_sent = shape.usage and (shape.usage_nulls or not openai_stream)

        rid = shapes.make_id(up._next_id())
        created = b"%d" % int(time.time())
        req.response_id = _ID_PREFIX[kind] + rid.decode()
        limit = faults.disconnect_after

        if knobs.first_byte_ms > 0 or (req.stream and (knobs.delay_ms > 0 or big)):
            self._task = asyncio.get_running_loop().create_task(
                self._respond_later(req, tmpl, knobs, rid, created, close)
            )
            return False

        # Fast path: the whole response in one write.
        data = shapes.fill(tmpl.burst, rid, created)
        if close:
            data = data.replace(b"connection: keep-alive", b"connection: close", 1)
        if limit is not None:
            if req.stream:
                n = min(limit, len(tmpl.deltas))
                partial = tmpl.head + tmpl.pre + b"".join(tmpl.deltas[:n])
                self._write(req, shapes.fill(partial, rid, created))
                req.chunks_sent = n
            else:
                self._write(req, data[: len(tmpl.head) + (len(data) - len(tmpl.head)) // 2])
            self.close()
            return True
        self._write(req, data)
        req.chunks_sent = len(tmpl.deltas)
        req.completed = True
        if close:
            self.close()
        return True

    def _simple(self, req: MockRequest, data: bytes, close: bool) -> bool:
        if req.status == 0:
            req.status = int(data[9:12])
        if close:
            data = data.replace(b"connection: keep-alive", b"connection: close", 1)
        self._write(req, data)
        req.completed = True
        if close:
            self.close()
        return True

    def _get(self, req: MockRequest, path: str, close: bool) -> bool:
        if path in ("/healthz", "/readyz", "/health"):
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
            data = _error_response(404, "chat", "1", f"no route for GET {path}")
        if req.method == "HEAD":
            data = data[: data.index(b"\r\n\r\n") + 4]
        return self._simple(req, data, close)

    async def _respond_later(
        self,
        req: MockRequest,
        tmpl: shapes.Template,
        knobs: _Knobs,
        rid: bytes,
        created: bytes,
        close: bool,
    ) -> None:
        """Paced, delayed or big responses: written from a task that honours flow control."""
        loop = asyncio.get_running_loop()
        limit = knobs.faults.disconnect_after
        if knobs.first_byte_ms > 0:
            await asyncio.sleep(knobs.first_byte_ms / 1000.0)
        if self._closing:
            return
        head = tmpl.head
        if close:
            head = head.replace(b"connection: keep-alive", b"connection: close", 1)
        if not req.stream:
            data = head + shapes.fill(tmpl.burst[len(tmpl.head) :], rid, created)
            if limit is not None:
                self._write(req, data[: len(head) + (len(data) - len(head)) // 2])
                self.close()
                return
            self._write(req, data)
        else:
            self._write(req, head + shapes.fill(tmpl.pre, rid, created))
            if tmpl.repeat:
                await self._write_big(
                    req, shapes.fill(tmpl.deltas[0], rid, created), tmpl.repeat, limit
                )
            else:
                delay = knobs.delay_ms / 1000.0
                t0 = loop.time()
                for i, frame in enumerate(tmpl.deltas):
                    if limit is not None and i >= limit:
                        break
                    if delay > 0 and i:
                        # Against absolute deadlines, so sleep overshoot does not accumulate.
                        wait = t0 + i * delay - loop.time()
                        if wait > 0:
                            await asyncio.sleep(wait)
                    if self._paused:
                        await self._drained()
                    if self._closing:
                        return
                    self._write(req, shapes.fill(frame, rid, created))
                    req.chunks_sent += 1
            if self._closing:
                return
            if limit is not None:
                self.close()
                return
            self._write(req, shapes.fill(tmpl.post, rid, created))
        req.completed = True
        self._task = None
        if close:
            self.close()
            return
        self._busy = False
        if self._buf:
            self._process()

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


_ID_PREFIX: Final = {
    "chat": "chatcmpl-",
    "completions": "cmpl-",
    "responses": "resp_",
    "messages": "msg_",
    "embeddings": "",
}


def _dechunk(buf: bytearray, start: int) -> tuple[bytes, int] | None:
    """A chunked request body starting at `start`: (body, end offset), or None if incomplete.
    Trailers are skipped. Raises ValueError on a bad size line."""
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
        self._parsed: dict[tuple[str, bytes], _Parsed] = {}
        self._templates: dict[shapes.Shape, shapes.Template] = {}
        self._big: dict[tuple[shapes.Shape, int], shapes.Template] = {}

    # -- lifecycle

    async def start(self) -> None:
        # Load the default model's encoding off the loop: the first load takes ~0.5 s, and
        # paying it inside the first request would skew its latency.
        await asyncio.to_thread(shapes._encoding, encoding_name_for_model(self.model))
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

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    def _parse(self, kind: str, body: bytes) -> _Parsed:
        """Facts about a request body, memoised on the exact bytes: the bench sends the same
        body thousands of times and must not pay for JSON parsing or tiktoken each time."""
        key = (kind, body)
        hit = self._parsed.get(key)
        if hit is not None:
            return hit
        try:
            obj = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError as exc:
            raise _BadRequest(f"body is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise _BadRequest("body must be a JSON object")
        model = obj.get("model")
        if not isinstance(model, str) or not model:
            model = self.model
        options = obj.get("stream_options")
        parsed = _Parsed(
            model=model,
            stream=obj.get("stream") is True,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
            prompt_tokens=prompt_tokens(kind, obj, model),
            inputs=shapes.input_count(obj) if kind == "embeddings" else 1,
            base64=obj.get("encoding_format") == "base64",
        )
        if len(self._parsed) >= _CACHE_MAX:
            self._parsed.clear()
        self._parsed[key] = parsed
        return parsed

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
    await mock.start()
    print(mock.url, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # add_signal_handler is POSIX-only
            loop.add_signal_handler(sig, stop.set)
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


if __name__ == "__main__":
    mock_upstream()
