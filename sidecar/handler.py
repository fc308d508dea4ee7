"""The narrow interfaces between the client side and the proxy.

The client connection (``downstream.py``, HTTP/1.1 today, HTTP/2 beside it later)
and the proxy (``proxy.py``) know each other only through these protocols, so
neither reads or writes the other's fields:

* :class:`RequestHandler` is what a client connection sees of the proxy: hand over
  a complete request, report one refused before it was complete, and ask whether a
  new connection may stay;
* :class:`ClientSide` is what the proxy and the relay see of a client connection: a
  :class:`ResponseWriter` plus the end of the request cycle;
* :class:`ClientEvents` is what the client connection tells the request in flight
  (its client went away, or its socket wants the provider paused).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from enum import IntEnum
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from sidecar.config import LimitsConfig, TimeoutsConfig
    from sidecar.errors import SidecarError
    from sidecar.request_reader import ParsedRequest


class Framing(IntEnum):
    """How the body of a relayed response reaches the client."""

    NONE = 0  # no body (1xx, 204, 304); a declared content-length is passed on
    LENGTH = 1  # a content-length body whose bytes pass as they are
    CHUNKED = 2  # HTTP/1.1 chunk frames from the provider, passed as they are
    PAYLOAD = 3  # payload bytes the writer frames itself (re-chunked, or raw to close)


# The members as module constants for per-request code (see lifecycle.py's).
FRAMING_NONE: Final = Framing.NONE
FRAMING_LENGTH: Final = Framing.LENGTH
FRAMING_CHUNKED: Final = Framing.CHUNKED
FRAMING_PAYLOAD: Final = Framing.PAYLOAD


class RawWriter(Protocol):
    def write(self, data: bytes) -> object: ...


class ResponseWriter(Protocol):
    """One response, written to the client. Everything is queued until :meth:`flush`,
    so a provider read becomes one client write (head and first bytes together)."""

    @property
    def keep_alive(self) -> bool:
        """Will the connection take another request after this response?"""
        ...

    @property
    def verbatim_ok(self) -> bool:
        """Can provider HTTP/1.1 framing (chunk frames, a length body) pass untouched?"""
        ...

    def send_head(self, status: int, reason: bytes, headers: Sequence[tuple[bytes, bytes]],
                  framing: Framing, length: int | None,
                  extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """The response head: the provider's ``headers`` (the writer drops hop-by-hop
        and framing ones), then the sidecar's own ``extra``; ``length`` is the
        content-length for LENGTH and NONE framing."""
        ...

    def send_data(self, data: bytes) -> None:
        """Body bytes: as they are for LENGTH and CHUNKED, payload to frame for PAYLOAD."""
        ...

    def end(self) -> None:
        """The body is complete (a terminal chunk where the framing needs one)."""
        ...

    def flush(self) -> int:
        """Write what is queued in one write; the number of bytes written."""
        ...

    def verbatim_transport(self) -> RawWriter:
        """The fast path's writer: provider reads go to it with no Python frame between.
        Only for CHUNKED and LENGTH framing, with nothing queued."""
        ...

    def end_connection(self) -> None:
        """This response ends the connection (its framing cannot be trusted to end it)."""
        ...

    def abort(self) -> None:
        """Cut the connection: a client that has a head must see a truncated body."""
        ...


class ClientEvents(Protocol):
    """What a client connection reports to the request it is waiting on."""

    def client_gone(self) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...


class ClientSide(ResponseWriter, Protocol):
    """What the proxy sees of one client connection."""

    @property
    def closed(self) -> bool: ...

    @property
    def paused_writing(self) -> bool: ...

    @property
    def peer_ip(self) -> str | None: ...

    @property
    def peer_trusted(self) -> bool:
        """The peer may set x-sidecar-* identity headers (it is a trusted_peers address)."""
        ...

    def follow(self, events: ClientEvents | None) -> None:
        """Send this connection's events (gone, pause, resume) to ``events``."""
        ...

    def reply(self, status: int, body: bytes,
              extra: tuple[tuple[bytes, bytes], ...] = (),
              content_type: bytes = b"application/json") -> int:
        """A whole response the sidecar writes itself (an error, /healthz, /metrics);
        bytes written."""
        ...

    def cycle_done(self, keep_alive: bool) -> None:
        """The response is complete: the connection may read its next request."""
        ...


class ClientConnection(Protocol):
    """What the proxy keeps of each open client connection, for idle sweeps and drain."""

    def sweep(self, now: float, idle_cutoff: float) -> None:
        """Close when idle since before ``idle_cutoff``; 408 a request being read past
        its deadline (timeouts.request_head / request_body)."""
        ...

    def close_if_idle(self) -> None: ...

    def abort(self) -> None: ...


class RequestHandler(Protocol):
    """What a client connection sees of the proxy."""

    loop: asyncio.AbstractEventLoop

    @property
    def limits(self) -> LimitsConfig:
        """The limits a new connection keeps for its whole life."""
        ...

    @property
    def timeouts(self) -> TimeoutsConfig:
        """The current timeouts (a request being read asks for its deadlines)."""
        ...

    draining: bool

    def connection_opened(self, conn: ClientConnection) -> bool:
        """Track a new connection; False when it is one too many."""
        ...

    def connection_closed(self, conn: ClientConnection) -> None: ...

    def trusts(self, transport: asyncio.BaseTransport) -> bool:
        """Is this connection's peer a trusted one (may it set identity headers)?"""
        ...

    def precheck(self, req: ParsedRequest) -> SidecarError | None:
        """Before a body is invited (``100 Continue``): the refusal the request will get
        whatever its body (no route for its path), else None."""
        ...

    def handle(self, req: ParsedRequest, client: ClientSide) -> None:
        """Answer one complete request; ``client.cycle_done`` says when it is over."""
        ...

    def rejected(self, req: ParsedRequest | None, request_id: bytes, status: int,
                 exc: SidecarError) -> None:
        """A request refused before it was complete (too large, malformed)."""
        ...
