"""Raw-socket HTTP/1.x client helpers for the end-to-end batteries.

The response parser here is written independently of ``sidecar.http1`` on
purpose: the sidecar's bytes are checked by code that does not share its bugs.
It keeps one buffer per connection, so pipelined responses are read in order,
and it records how a body ended (terminating zero chunk, content-length
reached, or the connection simply closing).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sqlite3
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from sidecar.config import Config, UpstreamConfig

Header = tuple[bytes, bytes]


def request_bytes(
    method: str,
    path: str,
    body: Any = None,
    *,
    headers: Iterable[Header] = (),
    version: str = "1.1",
    host: bytes = b"client.example",
    chunked: bool = False,
    content_length: bool = True,
) -> bytes:
    """One request as bytes. ``body`` may be a dict/list (JSON-encoded), bytes, or None."""
    if body is None:
        payload = b""
    elif isinstance(body, bytes | bytearray):
        payload = bytes(body)
    else:
        payload = orjson.dumps(body)
    lines = [f"{method} {path} HTTP/{version}".encode()]
    if host:
        lines.append(b"host: " + host)
    has_ctype = any(n.lower() == b"content-type" for n, _ in headers)
    if body is not None and not has_ctype:
        lines.append(b"content-type: application/json")
    for name, value in headers:
        lines.append(name + b": " + value)
    if chunked:
        lines.append(b"transfer-encoding: chunked")
        framed = b""
        step = 4096
        for i in range(0, len(payload), step):
            piece = payload[i : i + step]
            framed += b"%x\r\n%b\r\n" % (len(piece), piece)
        framed += b"0\r\n\r\n"
        return b"\r\n".join(lines) + b"\r\n\r\n" + framed
    if body is not None and content_length:
        lines.append(b"content-length: %d" % len(payload))
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


@dataclasses.dataclass
class Response:
    version: bytes
    status: int
    reason: bytes
    headers: list[Header]
    body: bytes  # payload, de-chunked
    framing: str  # "chunked" | "length" | "close" | "none"
    complete: bool  # the body ended as its framing says it must (not cut short)
    raw_body: bytes  # body bytes as they came on the wire (chunk framing included)

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        for n, v in self.headers:
            if n == key:
                return v.decode("latin-1")
        return None

    def header_all(self, name: str) -> list[str]:
        key = name.lower().encode()
        return [v.decode("latin-1") for n, v in self.headers if n == key]

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)

    def sse_data(self) -> list[bytes]:
        """The ``data:`` payloads of an event-stream body, in order."""
        out = []
        for event in self.body.split(b"\n\n"):
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    out.append(line[5:].strip())
        return out


class ClientConn:
    """One client connection to the sidecar; reads responses strictly in order."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = bytearray()
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ClientConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- low-level reads
    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _read_line(self) -> bytes | None:
        while (i := self.buf.find(b"\r\n")) < 0:
            if not self._fill():
                return None
        line = bytes(self.buf[:i])
        del self.buf[: i + 2]
        return line

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                break
        out = bytes(self.buf[:n])
        del self.buf[: len(out)]
        return out

    def closed_by_peer(self, timeout: float = 2.0) -> bool:
        """True when the server closes the connection (EOF or reset) within ``timeout``."""
        if self.eof:
            return True
        self.sock.settimeout(timeout)
        try:
            while self._fill():
                pass
        except TimeoutError:
            return False
        except OSError:
            self.eof = True
        return True

    # -- responses
    def read_response(self, head_request: bool = False) -> Response:
        status_line = self._read_line()
        while status_line == b"":  # tolerate stray CRLF
            status_line = self._read_line()
        assert status_line is not None, "connection closed before a response head"
        version, _, rest = status_line.partition(b" ")
        code, _, reason = rest.partition(b" ")
        assert version in (b"HTTP/1.1", b"HTTP/1.0"), status_line
        headers: list[Header] = []
        while True:
            line = self._read_line()
            assert line is not None, "connection closed inside a response head"
            if line == b"":
                break
            name, sep, value = line.partition(b":")
            assert sep and name == name.strip(), f"bad header line {line!r}"
            headers.append((name.lower(), value.strip()))
        status = int(code)
        names = {n: v for n, v in headers}
        if status == 100:  # interim: the real response follows
            return self.read_response(head_request)
        te = names.get(b"transfer-encoding", b"").lower()
        cl = names.get(b"content-length")
        if head_request or status in (204, 304) or 100 <= status < 200:
            return Response(version, status, reason, headers, b"", "none", True, b"")
        if b"chunked" in te:
            return self._chunked(version, status, reason, headers)
        if cl is not None:
            n = int(cl)
            body = self._read_exact(n)
            return Response(version, status, reason, headers, body, "length", len(body) == n, body)
        while self._fill():
            pass
        body = bytes(self.buf)
        self.buf.clear()
        return Response(version, status, reason, headers, body, "close", True, body)

    def _chunked(self, version: bytes, status: int, reason: bytes,
                 headers: list[Header]) -> Response:
        payload = bytearray()
        raw = bytearray()
        while True:
            line = self._read_line()
            if line is None:
                return Response(version, status, reason, headers, bytes(payload), "chunked",
                                False, bytes(raw))
            raw += line + b"\r\n"
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                # trailers (none expected) then the final CRLF
                while True:
                    t = self._read_line()
                    if t is None:
                        return Response(version, status, reason, headers, bytes(payload),
                                        "chunked", False, bytes(raw))
                    raw += t + b"\r\n"
                    if t == b"":
                        return Response(version, status, reason, headers, bytes(payload),
                                        "chunked", True, bytes(raw))
            data = self._read_exact(size + 2)
            raw += data
            if len(data) < size + 2:
                payload += data[:size]
                return Response(version, status, reason, headers, bytes(payload), "chunked",
                                False, bytes(raw))
            assert data[size:] == b"\r\n", f"bad chunk terminator {data[size:]!r}"
            payload += data[:size]


def roundtrip(port: int, data: bytes, head_request: bool = False) -> Response:
    """One request on a fresh connection; the response read in full."""
    with ClientConn(port) as c:
        c.send(data)
        return c.read_response(head_request)


def recv_until(sock: socket.socket, marker: bytes) -> bytes:
    """Read from ``sock`` until ``marker`` has arrived; return all that was read. The peer
    closing first fails the test (with what had arrived)."""
    got = b""
    while marker not in got:
        data = sock.recv(65536)
        assert data, got
        got += data
    return got


def chat_body(model: str = "gpt-4o-mini", stream: bool = False, text: str = "hello there",
              **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}]}
    if stream:
        body["stream"] = True
    body.update(extra)
    return body


def chat_text(resp: Response) -> str:
    """Concatenated delta content of an OpenAI chat stream."""
    out = []
    for data in resp.sse_data():
        if not data.startswith(b"{"):
            continue
        for ch in orjson.loads(data).get("choices") or ():
            out.append((ch.get("delta") or {}).get("content") or "")
    return "".join(out)


def assert_ends_with_stream_error(resp: Response, api_format: str = "openai") -> None:
    """A stream the provider broke after its head: the body ends cleanly (terminating
    chunk) with an error event as its last event, and never with a success marker."""
    assert resp.complete, "the stream should end cleanly, with an error event"
    data = resp.sse_data()
    assert data and b"[DONE]" not in data
    last = orjson.loads(data[-1])
    if api_format == "anthropic":
        assert last["type"] == "error" and last["error"]["message"], last
        assert b"event: error\n" in resp.body
    else:
        assert last["error"]["type"] == "upstream_error" and last["error"]["message"], last


def closed_port() -> int:
    """A loopback port with nothing listening on it (bound, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def assert_openai_error(resp: Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status == status, (resp.status, resp.body)
    assert (resp.header("content-type") or "").startswith("application/json")
    obj = resp.json
    assert set(obj) == {"error"}, obj
    err = obj["error"]
    assert {"message", "type", "code"} <= set(err), err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if code is not None:
        assert err["code"] == code, err
    assert resp.header("x-request-id"), resp.headers
    return err  # type: ignore[no-any-return]


def edit_upstreams(fn: Callable[[UpstreamConfig], UpstreamConfig]) -> Callable[[Config], Config]:
    """A config_edit that rewrites every upstream (in the registry and in each route)."""

    def edit(config: Config) -> Config:
        routes = tuple(
            dataclasses.replace(
                r,
                upstreams=tuple(
                    dataclasses.replace(ru, upstream=fn(ru.upstream)) for ru in r.upstreams
                ),
            )
            for r in config.routes
        )
        return dataclasses.replace(
            config, routes=routes, upstreams={k: fn(v) for k, v in config.upstreams.items()}
        )

    return edit


def edit_limits(**changes: Any) -> Callable[[Config], Config]:
    """A config_edit that sets fields of ``limits`` (e.g. max_body_bytes=2048)."""
    return lambda config: dataclasses.replace(
        config, limits=dataclasses.replace(config.limits, **changes))


def edit_timeouts(**changes: Any) -> Callable[[Config], Config]:
    """A config_edit that sets fields of ``timeouts`` (e.g. first_byte=0.3)."""
    return lambda config: dataclasses.replace(
        config, timeouts=dataclasses.replace(config.timeouts, **changes))


def only_row(stack: Any) -> dict[str, Any]:
    """Stop the stack (flushing its meter) and return its one and only row."""
    stack.stop()
    rows = stack.rows()
    assert len(rows) == 1, rows
    row: dict[str, Any] = rows[0]
    return row


def read_cut_response(port: int, path: str, body: Any, after: int) -> Response:
    """POST with the mock told to drop its connection after ``after`` events/pieces;
    return what the client got, having checked the sidecar passed the cut on by
    closing the client connection too."""
    with ClientConn(port) as c:
        c.send(request_bytes("POST", path, body,
                             headers=[(b"x-mock-fault", b"disconnect-after:%d" % after)]))
        r = c.read_response()
        assert c.closed_by_peer(2.0)
    return r


def meter_rows(db: str | os.PathLike[str], where: str = "1=1") -> list[dict[str, Any]]:
    """The meter DB's request rows (those matching ``where``) in insertion order."""
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(f"SELECT * FROM requests WHERE {where} ORDER BY id")]
    finally:
        con.close()


def rows_by_id(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Meter rows keyed by request_id. Row order is not a contract (estimated rows are
    queued after their token count runs off the loop), so tests match rows by id."""
    out = {row["request_id"]: row for row in rows}
    assert len(out) == len(rows), [row["request_id"] for row in rows]
    return out


def token_limited(limit: int, period: float, backend: str | None = None,
                  failure: str = "open", path: str = "/v1/chat/completions",
                  **extra: Any) -> Callable[[Config], Config]:
    """A config_edit giving ``path`` the seed's token_limiter entry (plus any extra
    keys), its buckets in ``backend`` (a Redis URL) when given, else in process."""
    from sidecar.config import MiddlewareConfig

    entry = MiddlewareConfig("token_limiter", {"limit": limit, "period": period,
                                               "requests": None, "key": None,
                                               "reserve": 256, "tiers": {}, **extra})

    def edit(config: Config) -> Config:
        routes = tuple(dataclasses.replace(r, middleware=(entry,)) if r.path == path else r
                       for r in config.routes)
        config = dataclasses.replace(config, routes=routes)
        if backend is not None:
            config = dataclasses.replace(config, limits=dataclasses.replace(
                config.limits, backend=backend, redis_failure=failure))
        return config

    return edit


def stream_body(max_tokens: int) -> dict[str, Any]:
    """A streamed chat request capped at ``max_tokens``."""
    return {**chat_body(stream=True), "max_tokens": max_tokens}


def concurrent_posts(ports: Iterable[int], path: str, body: Any) -> list[Response]:
    """One connection per port given, all requests sent before any answer is read."""
    conns = [ClientConn(port) for port in ports]
    try:
        for c in conns:
            c.send(request_bytes("POST", path, body))
        return [c.read_response() for c in conns]
    finally:
        for c in conns:
            c.close()
