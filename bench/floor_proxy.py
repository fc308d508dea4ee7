"""The floor for a Python proxy: a uvloop byte pump with no HTTP at all.

Each client connection gets its own provider connection, and bytes are copied
both ways as they arrive: no parsing, no metering, no pool. That is only valid
because the bench client and the mock both keep connections alive, which is why
this lives in bench/ as a reference and not in the sidecar. It answers "what
does uvloop itself cost per streamed request on this box", so the sidecar's
figures can be read as floor + our own work.

    python -m bench.floor_proxy LISTEN_PORT UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class Client(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.pending: list[bytes] = []
        self.up: Upstream | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        self.task = loop.create_task(self._connect(loop))  # kept: a dropped task may be collected

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            _, up = await loop.create_connection(
                lambda: Upstream(self), "127.0.0.1", self.upstream_port
            )
        except OSError:
            self.transport.close()
            return
        self.up = up
        if self.pending:
            assert up.transport is not None
            up.transport.write(b"".join(self.pending))
            self.pending.clear()

    def data_received(self, data: bytes) -> None:
        up = self.up
        if up is None or up.transport is None:
            self.pending.append(data)
        else:
            up.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.close()


async def serve(listen_port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Client(upstream_port), "127.0.0.1", listen_port, backlog=4096
    )
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    loop.add_signal_handler(signal.SIGINT, stop.set_result, None)
    await stop
    server.close()


def main() -> None:
    uvloop.run(serve(int(sys.argv[1]), int(sys.argv[2])))


if __name__ == "__main__":
    main()
