"""Throw-away stand-in for ``sidecar.mock`` while it is being written.

Used by the harness only when ``sidecar.mock`` cannot be imported. Same shape:
raw uvloop protocol, OpenAI-format SSE, ``chunks`` content events then a usage
event and ``[DONE]``, events ``delay_ms`` apart (0 = burst, all in one write),
per-request override with the ``x-mock-delay-ms`` header, HTTP/1.1 keep-alive.
"""

from __future__ import annotations

import argparse
import asyncio
import re

_DELAY_RE = re.compile(rb"\r\nx-mock-delay-ms:\s*([0-9.]+)", re.I)
_CL_RE = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)
_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
)


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def build_events(chunks: int, prompt_tokens: int = 12) -> list[bytes]:
    head = (
        b'data: {"id":"chatcmpl-mock","object":"chat.completion.chunk","created":0,"model":"mock",'
    )
    evs = []
    for i in range(chunks):
        evs.append(
            head
            + b'"choices":[{"index":0,"delta":{"content":"tok%03d word "},"finish_reason":null}]}\n\n'
            % i
        )
    evs.append(
        head
        + b'"choices":[],"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}}\n\n'
        % (prompt_tokens, chunks, prompt_tokens + chunks)
    )
    evs.append(b"data: [DONE]\n\n")
    return [_chunk(e) for e in evs] + [b"0\r\n\r\n"]


class MockProto(asyncio.Protocol):
    def __init__(self, server: Mock) -> None:
        self.s = server
        self.buf = b""
        self.t = None
        self.busy = False

    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.t = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._try()

    def _try(self) -> None:
        if self.busy:
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[: end + 2]
        m = _CL_RE.search(head)
        n = int(m.group(1)) if m else 0
        if len(self.buf) < end + 4 + n:
            return
        self.buf = self.buf[end + 4 + n :]
        d = _DELAY_RE.search(head)
        delay = float(d.group(1)) if d else self.s.delay_ms
        self.busy = True
        evs = self.s.events
        if delay <= 0:
            self.t.write(_HEAD + b"".join(evs))
            self._done()
        else:
            self.t.write(_HEAD)
            loop = asyncio.get_running_loop()
            self._send(loop, evs, 0, delay / 1000.0)

    def _send(self, loop, evs, i, delay) -> None:  # type: ignore[no-untyped-def]
        if self.t.is_closing():
            return
        if i == len(evs) - 1:  # DONE + terminator go together
            self.t.write(evs[i])
            self._done()
            return
        self.t.write(evs[i])
        loop.call_later(delay, self._send, loop, evs, i + 1, delay)

    def _done(self) -> None:
        self.busy = False
        if self.buf:
            self._try()

    def connection_lost(self, exc) -> None:  # type: ignore[no-untyped-def]
        self.t = None


class Mock:
    def __init__(self, chunks: int, delay_ms: float) -> None:
        self.delay_ms = delay_ms
        self.events = build_events(chunks)
        # [DONE] and the terminating 0-chunk leave in one write
        self.events = self.events[:-2] + [self.events[-2] + self.events[-1]]


async def _main(host: str, port: int, chunks: int, delay_ms: float) -> None:
    m = Mock(chunks, delay_ms)
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(
        lambda: MockProto(m), host, port, backlog=4096, reuse_address=True
    )
    async with srv:
        await srv.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--delay-ms", type=float, default=1.0)
    ap.add_argument("--always-usage", action="store_true")
    a = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_main(a.host, a.port, a.chunks, a.delay_ms))


if __name__ == "__main__":
    main()
