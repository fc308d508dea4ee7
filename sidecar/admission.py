"""Admission and settlement: the one place a request is let in and later charged.

``admit`` runs after the request body is parsed and before an upstream is chosen;
``settle`` runs once per request when its usage is final (reported by the provider,
or estimated), just before its meter row is queued, whatever happened in between
(failover, client disconnect, shutdown). Identity, token buckets, money budgets
and metrics plug in here.

``admit`` has a synchronous fast path: it returns None to let the request go on at
once, inside the client's read callback, or an awaitable (a Redis round trip) that
the proxy awaits in a task first. Either refuses by raising a ``SidecarError``.
``settle`` never awaits: a remote backend queues its write.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from sidecar.context import RequestContext
    from sidecar.handler import ClientSide
    from sidecar.request_reader import ParsedRequest
    from sidecar.runtime import Route


class Admission(Protocol):
    def admit(self, req: ParsedRequest, body: dict[str, Any], ctx: RequestContext,
              route: Route, client: ClientSide) -> Awaitable[None] | None: ...

    def settle(self, ctx: RequestContext) -> None: ...

    def close(self) -> None: ...


class OpenAdmission:
    """Lets every request in and charges nothing: the default until limits land."""

    __slots__ = ()

    def admit(self, req: ParsedRequest, body: dict[str, Any], ctx: RequestContext,
              route: Route, client: ClientSide) -> Awaitable[None] | None:
        return None

    def settle(self, ctx: RequestContext) -> None:
        return None

    def close(self) -> None:
        return None
