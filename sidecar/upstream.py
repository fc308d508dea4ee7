"""Provider side: keep-alive connection pool, TLS, and the upstream protocol.

The protocol does no parsing of its own: every read goes straight to the
``ResponseSink`` of the exchange that currently owns the connection (see
``splice.py``), so a body chunk costs one method call here.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from enum import IntEnum
from typing import Any, Final, Protocol, cast

from sidecar.addresses import is_ip_literal
from sidecar.config import TimeoutsConfig, UpstreamConfig
from sidecar.errors import UpstreamError, UpstreamTimeout
from sidecar.fdlimit import OUT_OF_FILES, BurstLog
from sidecar.gate import Gate
from sidecar.health import UpstreamHealth
from sidecar.http1 import HOP_BY_HOP, ResponseParser

log = logging.getLogger("sidecar.upstream")
# EMFILE/ENFILE on a provider connect: one line per burst (sidecar.fdlimit).
_OUT_OF_FILES: Final = BurstLog(log, "out of file descriptors")


class ConnState(IntEnum):
    """Lifecycle of one pooled connection; transitions only move forward or IDLE<->ACTIVE."""

    CONNECTING = 0
    IDLE = 1  # in the pool, no request on it
    ACTIVE = 2  # owned by one exchange
    CLOSED = 3


# The members as module constants for the per-request code (see splice.py's: Python
# 3.11's EnumType makes every `ConnState.X` lookup a call into a Python-level hook).
_CONN_CONNECTING: Final = ConnState.CONNECTING
_CONN_IDLE: Final = ConnState.IDLE
_CONN_ACTIVE: Final = ConnState.ACTIVE
_CONN_CLOSED: Final = ConnState.CLOSED


class ResponseSink(Protocol):
    """What an upstream connection reports to the exchange that owns it."""

    def upstream_data(self, data: bytes) -> None: ...

    def upstream_lost(self, exc: Exception | None) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = ("idle_since", "parser", "pool", "reused", "sink", "state", "transport")

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        # Made by the first exchange and reset by the next ones (see ResponseParser.reset).
        self.parser: ResponseParser | None = None
        self.state = _CONN_CONNECTING
        self.transport: asyncio.Transport | None = None
        self.sink: ResponseSink | None = None
        self.idle_since = 0.0
        self.reused = False  # set once a second request runs on this connection

    # -- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None:
            sink.upstream_data(data)
        else:
            # Bytes on an idle connection mean the provider broke framing; never reuse it.
            self.close()

    def eof_received(self) -> bool:
        return False  # close; a half-closed provider connection is useless to us

    def connection_lost(self, exc: Exception | None) -> None:
        was_idle = self.state is _CONN_IDLE
        self.state = _CONN_CLOSED
        self.pool.forget(self, was_idle)
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.upstream_lost(exc)
        self.parser = None  # freed now (llhttp holds nothing back to it), not at a GC

    # -- used by the exchange --------------------------------------------
    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None and self.state is _CONN_ACTIVE:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self.state is _CONN_ACTIVE:
            self.transport.resume_reading()

    def close(self) -> None:
        """Abort at once: used on cancel, so the provider stops generating now."""
        if self.state is not _CONN_CLOSED:
            was_idle = self.state is _CONN_IDLE
            self.state = _CONN_CLOSED
            self.pool.forget(self, was_idle)
            if self.transport is not None:
                self.transport.abort()


def make_ssl_context(cfg: UpstreamConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cfg.ca_bundle)
    if not cfg.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class UpstreamPool:
    """Keep-alive connections to one upstream, most recently used first."""

    def __init__(self, cfg: UpstreamConfig, timeouts: TimeoutsConfig) -> None:
        self.cfg = cfg
        self.head = HeadTemplate(cfg)
        self.timeouts = timeouts
        self._idle: list[UpstreamConnection] = []
        self._ssl = make_ssl_context(cfg) if cfg.scheme == "https" else None
        self.connects = 0  # new connections opened (keep-alive reuse is visible as few of these)
        # Set when a reload dropped or changed this upstream: connections still
        # streaming finish, then close instead of coming back to the pool.
        self.retired = False
        # What routing knows of this upstream (kept across a reload with the pool).
        self.health = UpstreamHealth(cfg.name)
        # Its max_concurrent slots and their wait queue; None: no limit (no cost).
        self.gate: Gate[Any] | None = None if cfg.max_concurrent is None else Gate(
            cfg.max_concurrent, cfg.max_queue, cfg.queue_timeout)
        # The response headers naming it, encoded once (for a first attempt, the
        # whole pair: most responses need nothing else).
        self._name = cfg.name.encode("ascii", "replace")
        self._first = ((b"x-sidecar-upstream", self._name), (b"x-sidecar-attempts", b"1"))

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of this upstream's connections (None for http)."""
        return self._ssl

    def response_headers(self, attempts: int) -> tuple[tuple[bytes, bytes], ...]:
        """What a client response served (or refused) here says about routing."""
        if attempts == 1:
            return self._first
        return ((b"x-sidecar-upstream", self._name), (b"x-sidecar-attempts", b"%d" % attempts))

    def take_idle(self) -> UpstreamConnection | None:
        """A kept-alive connection, most recently used first, or None (never waits)."""
        now = time.monotonic()
        ttl = self.cfg.pool_idle_ttl
        while self._idle:
            conn = self._idle.pop()
            if conn.state is _CONN_IDLE and now - conn.idle_since < ttl:
                conn.state = _CONN_ACTIVE
                conn.reused = True
                return conn
            conn.close()
        return None

    async def connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(
                    lambda: UpstreamConnection(self),
                    cfg.host,
                    cfg.port,
                    ssl=self._ssl,
                    server_hostname=cfg.host if self._ssl is not None else None,
                ),
                self.timeouts.connect,
            )
        except TimeoutError:
            raise UpstreamTimeout(f"connect to upstream '{cfg.name}' timed out") from None
        except ssl.SSLError as exc:
            raise UpstreamError(
                f"TLS handshake with upstream '{cfg.name}' failed: {exc.reason}"
            ) from None
        except OSError as exc:
            if exc.errno in OUT_OF_FILES:
                _OUT_OF_FILES.hit(time.monotonic(), f"connecting to upstream '{cfg.name}': "
                                  f"{exc.strerror} (raise LimitNOFILE / ulimit -n)")
            raise UpstreamError(
                f"cannot connect to upstream '{cfg.name}': {exc.strerror or type(exc).__name__}"
            ) from None
        self.connects += 1
        if _OUT_OF_FILES.count:
            _OUT_OF_FILES.end_if_quiet(time.monotonic())
        proto.state = _CONN_ACTIVE
        return proto

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        conn.sink = None
        if (
            reusable
            and not self.retired
            and conn.state is _CONN_ACTIVE
            and len(self._idle) < self.cfg.pool_max_idle
        ):
            conn.state = _CONN_IDLE
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()

    def forget(self, conn: UpstreamConnection, was_idle: bool) -> None:
        """A connection closed. Only an idle one can be in the idle list, so the list
        is searched only then (an active one closing, as on every client disconnect,
        would otherwise scan up to pool_max_idle entries for nothing)."""
        if was_idle:
            try:
                self._idle.remove(conn)
            except ValueError:
                pass  # taken off the list already (take_idle closes expired ones)

    def retire(self) -> None:
        """No new request will come here (a reload replaced it): close the idle
        connections now, and each active one when its exchange ends."""
        self.retired = True
        self.close()

    def close(self) -> None:
        """Close the idle connections.

        An active one belongs to its exchange, which closes it when it ends or is cut
        (the proxy's drain cuts every exchange before this). The pool keeps no set of
        all its connections for this: one more entry per open stream, ~50 bytes each
        at 10,000 streams.
        """
        for conn in list(self._idle):
            conn.close()
        self._idle.clear()


# Client headers never passed to a provider: hop-by-hop, framing we recompute,
# and content codings (we ask for identity so the tap can read usage).
_DROP_REQUEST = HOP_BY_HOP | {b"host", b"content-length", b"accept-encoding", b"expect"}
# Client credentials: removed unless the upstream is configured to forward them,
# so a client's key is never leaked to a provider it was not meant for.
_CLIENT_AUTH = frozenset({b"authorization", b"x-api-key", b"api-key"})
# Headers that say who the client is. Believed (passed on) only from trusted_peers (the
# Nginx in front); from anyone else they are dropped, as a client may write anything
# there. x-forwarded-for is then rebuilt as Nginx does: what the trusted peer sent,
# plus the address of the peer we accepted the connection from.
_FORWARDING = frozenset({b"x-forwarded-for", b"forwarded", b"x-real-ip"})
_XFF = b"x-forwarded-for"


def host_header(cfg: UpstreamConfig) -> bytes:
    """The ``host`` header value for requests to this upstream (IDNA, [IPv6], :port)."""
    host = cfg.host.encode("idna") if not is_ip_literal(cfg.host) else cfg.host.encode()
    default_port = 443 if cfg.scheme == "https" else 80
    if ":" in cfg.host:
        host = b"[" + host + b"]"
    return host if cfg.port == default_port else b"%b:%d" % (host, cfg.port)


class HeadTemplate:
    """What a provider request head takes from the upstream's config, encoded once.

    Building these per request (the IDNA host encoding above all) was a measurable
    part of the per-request cost; the pool keeps one template per upstream.
    """

    __slots__ = ("_anthropic", "_auth", "_forward_auth", "_host", "_prefix", "_version")

    def __init__(self, cfg: UpstreamConfig) -> None:
        self._prefix = cfg.base_path.encode()
        self._host = b" HTTP/1.1\r\nhost: " + host_header(cfg) + b"\r\ncontent-length: "
        self._forward_auth = cfg.forward_client_auth
        self._anthropic = cfg.format == "anthropic"
        self._auth = b""
        if cfg.api_key:
            key = cfg.api_key.encode()
            self._auth = (b"x-api-key: " if self._anthropic else b"authorization: Bearer ") \
                + key + b"\r\n"
        self._version = b"anthropic-version: " + cfg.anthropic_version.encode() + b"\r\n"

    def build(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
              body_len: int, request_id: bytes, peer: bytes = b"",
              trusted: bool = False) -> bytes:
        """The provider request head. ``peer``: the client connection's address, appended
        to x-forwarded-for; ``trusted``: that peer is one of trusted_peers, whose own
        x-forwarded-for / forwarded / x-real-ip are kept (dropped otherwise)."""
        parts = [method, b" ", self._prefix, target, self._host,
                 b"%d\r\naccept-encoding: identity\r\n" % body_len]
        # Headers the client named in `connection` are hop-by-hop too (RFC 9110 7.6.1).
        named = {t.strip().lower() for n, v in headers if n == b"connection"
                 for t in v.split(b",")}
        has_version = False
        forward_auth = self._forward_auth
        forwarded_for = b""
        for name, value in headers:
            if name in _DROP_REQUEST or name == b"x-request-id" or name in named:
                continue
            if name in _CLIENT_AUTH and not forward_auth:
                continue
            if name in _FORWARDING:
                if not trusted:
                    continue
                if name == _XFF:
                    forwarded_for += value + b", "
                    continue
            if name == b"anthropic-version":
                has_version = True
            parts += (name, b": ", value, b"\r\n")
        if peer:
            parts += (b"x-forwarded-for: ", forwarded_for, peer, b"\r\n")
        elif forwarded_for:
            parts += (b"x-forwarded-for: ", forwarded_for[:-2], b"\r\n")
        if self._auth:
            parts.append(self._auth)
        if self._anthropic and not has_version:
            parts.append(self._version)
        parts += (b"x-request-id: ", request_id, b"\r\n\r\n")
        return b"".join(parts)

