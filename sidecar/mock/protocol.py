"""One mock connection as an `asyncio.Protocol`: parse pipelined requests in order, answer
each from its cached Plan (one write in the common case), and write paced, delayed, big and
faulty responses from pacer callbacks or a writer task.

Used by `sidecar demo`, the test suite and the benchmark, so it must never be the bottleneck:
it does its own minimal HTTP/1.1 parsing (`parsing`) and serves pre-encoded bytes.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Final, cast

from sidecar.mock.parsing import MAX_BODY, MAX_HEAD, dechunk, parse_head
from sidecar.mock.plan import Plan
from sidecar.mock.records import MockConnection, MockRequest
from sidecar.mock.shapes import Template
from sidecar.mock.wire import error_response, fill, json_response, make_id

if TYPE_CHECKING:
    from sidecar.mock.server import MockUpstream

# Big mode writes this much per transport.write and then yields, so a fast reader cannot make
# one 50 MB stream monopolise the loop, and a slow one is held back by pause_writing.
BIG_BLOCK: Final = 64 * 1024

_MALFORMED: Final = (
    b"HTTP/1.1 2x0 NOT A STATUS\r\nthis line is not a header\r\n\x00\x01\xff\r\n\r\n"
)
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


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

    def __init__(self, req: MockRequest, plan: Plan, rid: bytes, close: bool) -> None:
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


class MockProtocol(asyncio.Protocol):
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

    def close(self, *, abort: bool = False) -> None:
        """Close the connection; abort drops it at once, unwritten data and all (stop())."""
        self._closing = True
        transport = self._transport
        if transport is not None:
            if abort:
                transport.abort()
            else:
                transport.close()

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
                method, target, length, chunked, close, expect, mock = parse_head(head)
                start = end + 4
                if chunked:
                    got = dechunk(buf, start)
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
        self._write(req, error_response(status, "chat", "1", message))
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
        plan = up._planner.plans.get(key)
        if plan is None:
            plan = up._planner.plan(key)
        req.kind = plan.kind
        faults = plan.faults
        if plan.reply is not None:
            req.status = plan.status
            return self._simple(req, plan.reply, close)
        if faults.hang:
            return False  # busy for good: this connection answers nothing more
        if faults.close_after_read is not None:
            # The provider read the request (it may be generating, and billing) and then
            # drops the connection without a byte back.
            asyncio.get_running_loop().call_later(faults.close_after_read, self.close)
            return False
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
        rid = make_id(up._next_id())
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
    def _truncated(req: MockRequest, tmpl: Template, data: bytes, limit: int) -> bytes:
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
            data = error_response(405, "chat", "1", f"{req.method} not allowed")
        elif path in ("/healthz", "/readyz", "/health"):
            data = json_response(200, {"status": "ok"})
        elif path.endswith("/models"):
            model = self._up.model
            data = json_response(
                200,
                {
                    "object": "list",
                    "data": [{"id": model, "object": "model", "created": 0, "owned_by": "mock"}],
                },
            )
        else:
            data = error_response(404, "chat", "1", f"no route for {req.method} {path}")
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

    async def _big(self, req: MockRequest, plan: Plan, rid: bytes, close: bool) -> None:
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
        self._write(req, head + fill(tmpl.pre, rid, created))
        frame = fill(tmpl.deltas[0], rid, created)
        await self._write_big(req, frame, tmpl.repeat, limit)
        if self._closing:
            return
        if limit is not None:
            self.close()
            return
        self._write(req, fill(tmpl.post, rid, created))
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
