"""``metrics.listen``: ``/metrics`` on an address of its own (and nothing else there).

The same HTTP/1.1 connection code as the main listener (``DownstreamProtocol``), with
this handler in place of the proxy: ``GET /metrics`` is answered by the proxy's
exporter, every other path is a 404. Any peer that can reach the address may scrape
it: choose the address (a private interface, loopback) accordingly.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from sidecar.errors import NotFound, SidecarError
from sidecar.handler import ClientConnection, ClientSide
from sidecar.responses import error_for

if TYPE_CHECKING:
    from sidecar.config import LimitsConfig, TimeoutsConfig
    from sidecar.proxy import Proxy
    from sidecar.request_reader import ParsedRequest

# Scrapers keep few connections; more than this are refused at accept.
MAX_METRICS_CONNECTIONS = 64


class MetricsEndpoint:
    """A RequestHandler that only serves ``/metrics``."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.loop: asyncio.AbstractEventLoop = proxy.loop
        self.draining = False
        self.connections: set[ClientConnection] = set()
        # Swept with the proxy's own: an idle scraper connection is closed, a request
        # read too slowly gets its 408 (a slow client must not hold the 64 slots).
        proxy.swept.append(self.connections)

    @property
    def limits(self) -> LimitsConfig:
        return self.proxy.limits

    @property
    def timeouts(self) -> TimeoutsConfig:
        return self.proxy.timeouts

    def precheck(self, req: ParsedRequest) -> SidecarError | None:
        path = req.target.split(b"?", 1)[0].decode("latin-1")
        return None if path == "/metrics" else NotFound(f"no route for {path}")

    def connection_opened(self, conn: ClientConnection) -> bool:
        self.connections.add(conn)
        return len(self.connections) <= MAX_METRICS_CONNECTIONS

    def connection_closed(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)

    def trusts(self, transport: asyncio.BaseTransport) -> bool:
        return False

    def handle(self, req: ParsedRequest, client: ClientSide) -> None:
        if req.path == "/metrics":
            self.proxy.serve_metrics(req, client)
        else:
            status, body = error_for(NotFound(f"no route for {req.path} (this listener "
                                              f"serves /metrics only)"))
            client.reply(status, body)
        client.cycle_done(True)

    def rejected(self, req: ParsedRequest | None, request_id: bytes, status: int,
                 exc: SidecarError) -> None:
        pass  # not a proxied request: no meter row

    def close(self) -> None:
        self.draining = True
        for conn in list(self.connections):
            conn.abort()
