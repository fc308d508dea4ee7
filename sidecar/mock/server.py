"""The fake provider, `MockUpstream`: OpenAI and Anthropic wire formats, exact usage, pacing
and faults, on a real loopback socket. It owns the listener, the records of what it received,
the shared pacer and the per-request ids; `protocol` answers each connection, `plan` works out
each answer once.

Knobs are set at construction (or on the CLI) and can be overridden per request with x-mock-*
headers (see `faults`), so one instance serves many tests.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import replace
from types import TracebackType
from typing import Final

from sidecar.mock.expected import DEFAULT_CHUNKS, count_tokens, encoding_name_for_model
from sidecar.mock.faults import Knobs, parse_faults
from sidecar.mock.plan import Planner
from sidecar.mock.protocol import MockProtocol
from sidecar.mock.records import MockConnection, MockRequest

# Pacer resolution (seconds): paced deltas due within the same half millisecond go out
# together from one timer callback.
_PACE_GRID: Final = 0.0005


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
        # Positional, in Knobs' field order.
        self._knobs = Knobs(
            chunks,
            chunk_tokens,
            delay_ms,
            first_byte_ms,
            bytes_total,
            always_usage,
            parse_faults(fault),
            retry,
            cache_read_tokens,
            cache_write_tokens,
        )
        self.requests: list[MockRequest] = []
        self.connections: list[MockConnection] = []
        self.connections_accepted = 0
        self.requests_total = 0
        self._live: set[MockProtocol] = set()
        self._server: asyncio.AbstractServer | None = None
        self._ids = 0
        self._due: dict[int, list[MockProtocol]] = {}  # pacer slot -> streams due then
        self._planner = Planner(self._knobs, api_format, model)

    def set_fault(self, spec: str | None) -> None:
        """From now on, answer with these faults (``--fault`` syntax) unless a request's
        x-mock-fault says otherwise: a test can make one mock of several misbehave
        after it has served normally. Call on the mock's loop."""
        self._knobs = replace(self._knobs, faults=parse_faults(spec))
        self._planner = Planner(self._knobs, self._planner.api_format, self._planner.model)

    # -- lifecycle

    async def start(self) -> None:
        # Load the default model's encoding off the loop: the first load takes ~0.5 s, and
        # paying it inside the first request would skew its latency.
        await asyncio.to_thread(count_tokens, "warm up", encoding_name_for_model(self.model))
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: MockProtocol(self),
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
            proto.close(abort=True)
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

    def _pace(self, proto: MockProtocol, when: float) -> None:
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
