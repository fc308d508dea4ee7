"""Load for ``python -m bench avalanche``: the slow-route clients, or the prober.

Run as its own process (``python -m bench.avalanche_load``), one per role, so the
prober's latencies are not those of a loop busy with 200 clients. The spec is one
JSON object on stdin; the result one JSON object on stdout. Both roles start at the
wall-clock time ``start_at`` (so the two processes line up) and stop at
``start_at + seconds``; event times are reported relative to ``start_at``.

``slow``   ``clients`` closed-loop clients, each on its own keep-alive connection,
           POST a streamed chat request to ``path`` and send the next one when the
           answer is complete. After a 503 or 429 a client waits as ``backoff`` says
           (``"retry-after"``: the header's seconds, 1 s without one, at most
           ``max_backoff``; a number: that many seconds, 0 = at once); after a
           connection error or another status, ``error_pause`` s. At the end, a
           request without its answer is *pending*; its connection is cut then.
           Events: ``[t_sent, outcome, seconds to the response head, retry-after]``
           with outcome the status (``200`` only once the body is complete) or an
           error kind.

``probe``  an open-loop schedule of ``rate`` per second for each probe
           (``GET /healthz`` and one streamed request on the fast route), each on a
           fresh connection, from ``baseline`` s before ``start_at`` (the figures
           before the avalanche) until the end. Each probe starts on schedule whatever
           the others do (no coordinated omission: a slow answer delays no later
           probe); its latency runs from its start (connect included) to the end of
           the answer, and how late the prober's own loop started it is kept apart.
           A probe without a complete answer within ``timeout`` s is a ``timeout``.
           Events: ``[t_scheduled, probe, outcome, seconds to the response head,
           seconds to the end, start lag]``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

_IO_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)


def post(host: str, port: int, path: str, body: bytes, close: bool = False) -> bytes:
    head = [
        f"POST {path} HTTP/1.1",
        f"host: {host}:{port}",
        "content-type: application/json",
        "accept: text/event-stream",
        f"content-length: {len(body)}",
    ]
    if close:
        head.append("connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw[:-4].split(b"\r\n")
    status = int(lines[0][9:12])
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip()
    return status, headers


async def read_body(reader: asyncio.StreamReader, headers: dict[bytes, bytes]) -> int:
    """Consume the body (chunked, content-length or until close); its byte count."""
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        n = 0
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return n
            n += len(await reader.readexactly(size + 2)) - 2
    if b"content-length" in headers:
        return len(await reader.readexactly(int(headers[b"content-length"])))
    return len(await reader.read())


def keeps_alive(headers: dict[bytes, bytes]) -> bool:
    return headers.get(b"connection", b"").lower() != b"close"


def _kind(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError)):
        return "reset"
    return type(exc).__name__


class Clock:
    """Seconds relative to the shared wall-clock ``start_at``, on perf_counter (uvloop's
    ``loop.time()`` moves in whole milliseconds, too coarse for a 1 ms answer)."""

    def __init__(self, start_at: float) -> None:
        self.zero = time.perf_counter() + (start_at - time.time())

    def now(self) -> float:
        return time.perf_counter() - self.zero

    async def until(self, t: float) -> None:
        d = t - self.now()
        if d > 0:
            await asyncio.sleep(d)


# --------------------------------------------------------------------------- slow clients
async def slow(spec: dict[str, Any]) -> dict[str, Any]:
    clock = Clock(float(spec["start_at"]))
    host, port = spec.get("host", "127.0.0.1"), int(spec["port"])
    req = post(host, port, spec["path"], spec["body"].encode())
    seconds = float(spec["seconds"])
    backoff = spec.get("backoff", "retry-after")
    max_backoff = float(spec.get("max_backoff", 30.0))
    error_pause = float(spec.get("error_pause", 0.5))
    events: list[list[Any]] = []
    pending = {"no_head": 0, "streaming": 0}
    connects = 0

    def pause_after(status: int, headers: dict[bytes, bytes]) -> float:
        if backoff != "retry-after":
            return float(backoff)
        try:
            return min(max_backoff, float(headers.get(b"retry-after", b"1")))
        except ValueError:
            return 1.0

    async def client() -> None:
        nonlocal connects
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            while clock.now() < seconds:
                if writer is None:
                    try:
                        reader, writer = await asyncio.wait_for(
                            asyncio.open_connection(host, port), seconds - clock.now()
                        )
                        connects += 1
                    except TimeoutError:
                        break
                    except OSError as e:
                        events.append([clock.now(), f"connect:{_kind(e)}", None, None])
                        await clock.until(min(seconds, clock.now() + error_pause))
                        continue
                assert reader is not None and writer is not None
                t0 = clock.now()
                head_at: float | None = None
                try:
                    writer.write(req)
                    status, headers = await asyncio.wait_for(read_head(reader), seconds - t0)
                    head_at = clock.now()
                    await asyncio.wait_for(read_body(reader, headers), seconds - head_at)
                except TimeoutError:  # the run ended first
                    pending["no_head" if head_at is None else "streaming"] += 1
                    break
                except _IO_ERRORS as e:
                    events.append([t0, _kind(e), None if head_at is None else head_at - t0, None])
                    writer.close()
                    reader = writer = None
                    await clock.until(min(seconds, clock.now() + error_pause))
                    continue
                ra = headers.get(b"retry-after")
                events.append([t0, status, head_at - t0, ra.decode("latin-1") if ra else None])
                if not keeps_alive(headers):
                    writer.close()
                    reader = writer = None
                if status in (429, 503):
                    wait = pause_after(status, headers)
                elif status == 200:
                    wait = 0.0
                else:
                    wait = error_pause
                if wait:
                    await clock.until(min(seconds, clock.now() + wait))
        finally:
            if writer is not None:
                writer.transport.abort()  # cut whatever is still in flight

    await clock.until(0.0)
    await asyncio.gather(*(client() for _ in range(int(spec["clients"]))))
    return {"events": events, "pending": pending, "connections": connects}


# --------------------------------------------------------------------------- prober
async def probe(spec: dict[str, Any]) -> dict[str, Any]:
    clock = Clock(float(spec["start_at"]))
    host, port = spec.get("host", "127.0.0.1"), int(spec["port"])
    seconds = float(spec["seconds"])
    baseline = float(spec.get("baseline", 0.0))
    rate = float(spec["rate"])
    timeout = float(spec.get("timeout", 10.0))
    max_inflight = int(spec.get("max_inflight", 500))
    requests = {
        "healthz": f"GET /healthz HTTP/1.1\r\nhost: {host}:{port}\r\nconnection: close\r\n\r\n"
        .encode(),
        "fast": post(host, port, spec["fast_path"], spec["fast_body"].encode(), close=True),
    }
    events: list[list[Any]] = []
    inflight = 0
    tasks: set[asyncio.Task[None]] = set()

    async def one(name: str, t_sched: float) -> None:
        nonlocal inflight
        inflight += 1
        t0 = clock.now()
        writer: asyncio.StreamWriter | None = None
        head_at: float | None = None
        try:
            async def exchange() -> int:
                nonlocal writer, head_at
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(requests[name])
                status, headers = await read_head(reader)
                head_at = clock.now()
                await read_body(reader, headers)
                return status

            outcome: int | str = await asyncio.wait_for(exchange(), timeout)
        except TimeoutError:
            outcome = "timeout"
        except _IO_ERRORS as e:
            outcome = _kind(e)
        finally:
            inflight -= 1
            if writer is not None:
                writer.transport.abort()
        end = clock.now()
        events.append([t_sched, name, outcome, None if head_at is None else head_at - t0,
                       end - t0, t0 - t_sched])

    names = list(requests)
    step = 1.0 / (rate * len(names))  # the probes interleaved, each at `rate`
    i = 0
    t = -baseline
    while t < seconds:
        await clock.until(t)
        name = names[i % len(names)]
        if inflight >= max_inflight:
            events.append([t, name, "dropped", None, None, None])
        else:
            task = asyncio.ensure_future(one(name, t))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        i += 1
        t = -baseline + i * step
    if tasks:
        await asyncio.wait(set(tasks), timeout=timeout + 1)
    return {"events": events}


def main() -> None:
    spec = json.loads(sys.stdin.readline())
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    role = spec["role"]
    fn = {"slow": slow, "probe": probe}[role]
    res = asyncio.run(fn(spec))
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
