"""What the mock records: each accepted connection and each request it received, with what
it did about it (status, usage, bytes, timing), for tests to inspect."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson


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
