"""Raw-socket asyncio/uvloop load generator for streamed (SSE) HTTP/1.1 responses.

Run as its own process (``python -m bench.loadgen``) so it can be pinned apart
from the proxy under test; the spec is one JSON object on stdin (or ``--spec``),
the result one JSON object on stdout.

Modes
-----
``closed``  ``concurrency`` workers, each on its own keep-alive connection,
            send the next request as soon as the last one ends, for ``duration``
            seconds; then in-flight requests are drained (bounded). ``stagger``
            spreads the workers' first requests over that many seconds, so
            equal-length streams do not move in lock-step waves.
``open``    requests start on a fixed schedule (``rate`` per second) whatever
            the server does; latency is measured from the *scheduled* start
            (no coordinated omission); idle keep-alive connections are reused,
            new ones opened when none is idle; ``max_inflight`` caps the backlog
            (anything over it is counted as ``dropped``).
``hold``    opens ``levels[i]`` slow streams, waits until each has its response
            head, prints ``{"level": ...}`` and waits for a line on stdin before
            the next level (the harness samples the proxy's memory meanwhile).

Per request: TTFT = first body bytes of the response (the first SSE event;
events are written whole), TTLB = end of the chunked body. Errors are counted
by kind. Usage frames seen by the client are tallied (``prompt,completion`` ->
count) so the harness can check a meter against what the client received.

When ``cpu_root`` is given, CPU and memory of that process tree are sampled at
the start and end of the measured window (see :mod:`bench.procstat`).
"""

from __future__ import annotations

import asyncio
import errno
import json
import math
import re
import sys
import time
from typing import Any

from bench import procstat

perf = time.perf_counter
_USAGE_RE = re.compile(rb'"prompt_tokens"\s*:\s*(\d+).*?"completion_tokens"\s*:\s*(\d+)', re.S)

HEAD, CHUNKED, LENGTH, UNTIL_CLOSE = 0, 1, 2, 3


def build_request(host: str, port: int, path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"host: {host}:{port}",
        "content-type: application/json",
        "accept: text/event-stream",
        f"content-length: {len(body)}",
    ]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Stats:
    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.ttlb: list[float] = []
        self.ok = 0
        self.done_seen = 0
        self.errors: dict[str, int] = {}
        self.usage: dict[str, int] = {}
        self.bytes = 0
        self.first_start = 0.0
        self.last_end = 0.0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class Client(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.fut: asyncio.Future[bool] | None = None
        self.head_fut: asyncio.Future[bool] | None = None
        self.t0 = 0.0

    # --- request lifecycle -------------------------------------------------
    def start(self, req: bytes, t0: float, fut: asyncio.Future[bool]) -> None:
        self.t0 = t0
        self.fut = fut
        self.tfirst = 0.0
        self.state = HEAD
        self.buf = b""
        self.line = b""
        self.need = 0
        self.skip = 0
        self.trailer = False
        self.status = 0
        self.keep = True
        self.usage: tuple[int, int] | None = None
        self.prev = b""
        self.done = False
        self.nbytes = 0
        assert self.transport is not None
        self.transport.write(req)

    def _finish(self, now: float, ok: bool, err: str | None = None) -> None:
        st = self.stats
        fut, self.fut = self.fut, None
        if fut is None:
            return
        if ok and self.status == 200:
            st.ok += 1
            st.ttft.append(self.tfirst - self.t0)
            st.ttlb.append(now - self.t0)
            st.bytes += self.nbytes
            if self.done:
                st.done_seen += 1
            if self.usage is not None:
                k = f"{self.usage[0]},{self.usage[1]}"
                st.usage[k] = st.usage.get(k, 0) + 1
            else:
                st.usage["none"] = st.usage.get("none", 0) + 1
        elif ok:
            st.error(f"status_{self.status}")
        else:
            st.error(err or "error")
        st.last_end = now
        if not fut.done():
            fut.set_result(ok and self.status == 200)
        if not self.keep and self.transport is not None:
            self.transport.close()

    # --- protocol callbacks ------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        now = perf()
        if self.fut is not None:
            if self.state == UNTIL_CLOSE:
                self._finish(now, True)
            else:
                self._finish(now, False, "reset" if self.state != HEAD else "closed_before_head")
        if self.head_fut is not None and not self.head_fut.done():
            self.head_fut.set_result(False)

    def data_received(self, data: bytes) -> None:
        now = perf()
        if self.fut is None:
            return  # unsolicited bytes (e.g. after a hold was abandoned)
        if self.state == HEAD:
            self.buf += data
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                if len(self.buf) > 65536:
                    self._finish(now, False, "head_too_big")
                return
            head = self.buf[:i].lower()
            data = self.buf[i + 4 :]
            self.buf = b""
            try:
                self.status = int(head[9:12])
            except ValueError:
                self._finish(now, False, "bad_status")
                return
            if b"\r\nconnection: close" in head:
                self.keep = False
            if b"\r\ntransfer-encoding: chunked" in head:
                self.state = CHUNKED
            else:
                m = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
                if m:
                    self.state = LENGTH
                    self.need = int(m.group(1))
                else:
                    self.state = UNTIL_CLOSE
                    self.keep = False
            if self.head_fut is not None and not self.head_fut.done():
                self.head_fut.set_result(self.status == 200)
            if self.state == LENGTH and self.need == 0:
                self.tfirst = now
                self._finish(now, True)
                return
            if not data:
                return
        if not self.tfirst:
            self.tfirst = now
        self.nbytes += len(data)
        if self.state == CHUNKED:
            payload, end = self._chunked(data)
        else:
            payload, end = data, False
            if self.state == LENGTH:
                self.need -= len(data)
                end = self.need <= 0
        if payload:
            self._scan(payload)
        if end:
            self._finish(now, True)

    def _scan(self, payload: bytes) -> None:
        """Usage and [DONE] in the de-chunked body (a proxy may re-chunk mid-event)."""
        win = self.prev + payload if self.prev else payload
        if self.usage is None and b"_tokens" in win:
            m = _USAGE_RE.search(win)
            if m:
                self.usage = (int(m.group(1)), int(m.group(2)))
        if not self.done and b"[DONE]" in win:
            self.done = True
        self.prev = payload[-256:]

    def _chunked(self, data: bytes) -> tuple[bytes, bool]:
        """Consume one read of a chunked body: (payload bytes in it, whether the body ended)."""
        pos, n = 0, len(data)
        out: list[bytes] = []
        while pos < n:
            if self.need:
                take = n - pos if n - pos < self.need else self.need
                out.append(data[pos : pos + take])
                self.need -= take
                pos += take
                if not self.need:
                    self.skip = 2  # the CRLF after the chunk data
                continue
            if self.skip:
                take = n - pos if n - pos < self.skip else self.skip
                self.skip -= take
                pos += take
                continue
            if self.line.endswith(b"\r") and data[pos : pos + 1] == b"\n":
                line, self.line = self.line[:-1], b""
                pos += 1
            else:
                j = data.find(b"\r\n", pos)
                if j < 0:
                    self.line += data[pos:]
                    break
                line, self.line = self.line + data[pos:j], b""
                pos = j + 2
            if self.trailer:
                if not line:
                    return b"".join(out), True
                continue
            try:
                size = int(line.split(b";", 1)[0], 16)
            except ValueError:
                self._finish(perf(), False, "bad_chunk")
                if self.transport is not None:
                    self.transport.close()
                return b"", False
            if size == 0:
                self.trailer = True
            else:
                self.need = size
        return (out[0] if len(out) == 1 else b"".join(out)), False


def pct(values: list[float], qs: tuple[float, ...] = (50, 90, 99)) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)
    out = {
        f"p{q:g}": v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))] * 1e3  # nearest rank
        for q in qs
    }
    out["max"] = v[-1] * 1e3
    out["mean"] = sum(v) / len(v) * 1e3
    return out


class Gen:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.host = spec.get("host", "127.0.0.1")
        self.port = int(spec["port"])
        body = spec.get("body", "").encode()
        self.req = build_request(
            self.host,
            self.port,
            spec.get("path", "/v1/chat/completions"),
            spec.get("headers", {}),
            body,
        )
        self.stats = Stats()
        self.loop = asyncio.get_running_loop()
        self.cpu_root = spec.get("cpu_root")
        self.cpu_pids: list[int] = []

    async def connect(self) -> Client:
        _, proto = await self.loop.create_connection(
            lambda: Client(self.stats), self.host, self.port
        )
        return proto  # type: ignore[return-value]

    def _cpu_start(self) -> None:
        if self.cpu_root:
            self.cpu_pids = procstat.tree(int(self.cpu_root))
            self.cpu0 = procstat.cpu_sample(self.cpu_pids)

    def _cpu_end(self) -> dict[str, Any] | None:
        if not self.cpu_root:
            return None
        d: dict[str, Any] = procstat.cpu_sample(self.cpu_pids).minus(self.cpu0)
        d.update(procstat.mem_sample(self.cpu_pids))
        return d

    # --- closed loop ---------------------------------------------------------
    async def closed(self) -> dict[str, Any]:
        c = int(self.spec["concurrency"])
        duration = float(self.spec["duration"])
        conns: list[Client | None] = [None] * c
        # connections first, so connect cost is outside the window
        for i in range(0, c, 200):
            res = await asyncio.gather(
                *(self.connect() for _ in range(min(200, c - i))), return_exceptions=True
            )
            for j, r in enumerate(res):
                if isinstance(r, BaseException):
                    self.stats.error("connect")
                else:
                    conns[i + j] = r
        self._cpu_start()
        t_start = perf()
        self.stats.first_start = t_start
        t_end = t_start + duration

        stagger = float(self.spec.get("stagger", 0.0))

        async def worker(i: int) -> None:
            cl = conns[i]
            if stagger:  # spread the first requests over one stream length: no lock-step waves
                await asyncio.sleep(stagger * i / c)
            while perf() < t_end:
                if cl is None or cl.closed:
                    try:
                        cl = await self.connect()
                    except OSError as e:
                        self.stats.error(f"connect:{errno.errorcode.get(e.errno or 0, e.errno)}")
                        await asyncio.sleep(0.01)
                        continue
                fut = self.loop.create_future()
                cl.start(self.req, perf(), fut)
                await fut
            conns[i] = cl

        tasks = [asyncio.ensure_future(worker(i)) for i in range(c)]
        drain = float(self.spec.get("drain_timeout", 10.0))
        _, pending = await asyncio.wait(tasks, timeout=duration + drain)
        for t in pending:
            t.cancel()
            self.stats.error("timeout")
        wall = (self.stats.last_end or perf()) - t_start
        cpu = self._cpu_end()
        for cl in conns:
            if cl is not None and cl.transport is not None:
                cl.transport.close()
        return self._summary(wall, cpu)

    # --- open loop -----------------------------------------------------------
    async def open(self) -> dict[str, Any]:
        rate = float(self.spec["rate"])
        duration = float(self.spec["duration"])
        max_inflight = int(self.spec.get("max_inflight", 2000))
        idle: list[Client] = []
        # pre-open a pool sized for the expected concurrency
        pre = int(self.spec.get("preopen", min(max_inflight, 64)))
        for r in await asyncio.gather(
            *(self.connect() for _ in range(pre)), return_exceptions=True
        ):
            if isinstance(r, Client):
                idle.append(r)
        inflight = 0
        tasks: set[asyncio.Task[None]] = set()

        async def one(t_sched: float) -> None:
            nonlocal inflight
            inflight += 1
            try:
                cl = None
                while idle:
                    cand = idle.pop()
                    if not cand.closed:
                        cl = cand
                        break
                if cl is None:
                    try:
                        cl = await self.connect()
                    except OSError as e:
                        self.stats.error(f"connect:{errno.errorcode.get(e.errno or 0, e.errno)}")
                        return
                fut = self.loop.create_future()
                cl.start(self.req, t_sched, fut)
                await fut
                if not cl.closed and cl.keep:
                    idle.append(cl)
            finally:
                inflight -= 1

        self._cpu_start()
        t_start = perf()
        self.stats.first_start = t_start
        n_total = int(rate * duration)
        i = 0
        while i < n_total:
            now = perf()
            due = min(n_total, int((now - t_start) * rate) + 1)
            while i < due:
                if inflight >= max_inflight:
                    self.stats.error("dropped")
                else:
                    t = asyncio.ensure_future(one(t_start + i / rate))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                i += 1
            await asyncio.sleep(max(0.0, t_start + i / rate - perf()))
        drain = float(self.spec.get("drain_timeout", 10.0))
        if tasks:
            _, pending = await asyncio.wait(set(tasks), timeout=drain)
            for t in pending:
                t.cancel()
                self.stats.error("timeout")
        wall = max(duration, (self.stats.last_end or perf()) - t_start)
        cpu = self._cpu_end()
        for cl in idle:
            if cl.transport is not None:
                cl.transport.close()
        out = self._summary(wall, cpu)
        out["offered_rps"] = rate
        return out

    # --- hold ------------------------------------------------------------------
    async def hold(self) -> dict[str, Any]:
        levels = [int(x) for x in self.spec["levels"]]
        timeout = float(self.spec.get("level_timeout", 60.0))
        batch = int(self.spec.get("connect_batch", 250))
        held: list[Client] = []
        reports = []

        async def open_one() -> bool:
            try:
                cl = await self.connect()
            except OSError as e:
                self.stats.error(f"connect:{errno.errorcode.get(e.errno or 0, e.errno)}")
                return False
            cl.head_fut = self.loop.create_future()
            cl.start(self.req, perf(), self.loop.create_future())
            held.append(cl)
            try:
                return await asyncio.wait_for(cl.head_fut, timeout)
            except TimeoutError:
                self.stats.error("head_timeout")
                return False

        stdin_reader = self.loop.run_in_executor
        for level in levels:
            t0 = perf()
            while len(held) < level and perf() - t0 < timeout:
                n = min(batch, level - len(held))
                res = await asyncio.gather(*(open_one() for _ in range(n)))
                if not any(res) and n > 0:
                    break
            live = sum(1 for c in held if not c.closed and c.status == 200)
            rep = {
                "level": level,
                "established": live,
                "opened": len(held),
                "elapsed_s": perf() - t0,
                "errors": dict(self.stats.errors),
            }
            reports.append(rep)
            sys.stdout.write(json.dumps(rep) + "\n")
            sys.stdout.flush()
            line = await stdin_reader(None, sys.stdin.readline)
            if not line or line.strip() == "stop":
                break
        for cl in held:
            cl.fut = None
            if cl.transport is not None:
                cl.transport.abort()
        return {"levels": reports, "errors": self.stats.errors}

    def _summary(self, wall: float, cpu: dict[str, Any] | None) -> dict[str, Any]:
        st = self.stats
        out: dict[str, Any] = {
            "ok": st.ok,
            "errors": st.errors,
            "n_errors": sum(st.errors.values()),
            "wall_s": wall,
            "rps": st.ok / wall if wall > 0 else 0.0,
            "ttft_ms": pct(st.ttft),
            "ttlb_ms": pct(st.ttlb),
            "done_seen": st.done_seen,
            "usage": st.usage,
            "mean_body_bytes": st.bytes / st.ok if st.ok else 0,
        }
        if cpu is not None:
            out["proxy"] = cpu
            if st.ok:
                out["cpu_s_per_1k"] = cpu["cpu_s"] * 1e3 / st.ok
                out["cpu_us_per_req"] = cpu["cpu_s"] * 1e6 / st.ok
        return out


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    g = Gen(spec)
    mode = spec["mode"]
    if mode == "closed":
        return await g.closed()
    if mode == "open":
        return await g.open()
    if mode == "hold":
        return await g.hold()
    raise SystemExit(f"unknown mode {mode!r}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    spec = (
        json.loads(argv[argv.index("--spec") + 1])
        if "--spec" in argv
        else json.loads(sys.stdin.readline())
    )
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    res = asyncio.run(run(spec))
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
