"""The provider connection pool's bookkeeping, with fake transports (no sockets)."""

from __future__ import annotations

from sidecar.config import TimeoutsConfig, UpstreamConfig
from sidecar.upstream import ConnState, UpstreamConnection, UpstreamPool


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


def _pool() -> UpstreamPool:
    cfg = UpstreamConfig(name="p", url="http://p", scheme="http", host="p", port=80)
    return UpstreamPool(cfg, TimeoutsConfig())


def _active(pool: UpstreamPool) -> UpstreamConnection:
    conn = UpstreamConnection(pool)
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    conn.state = ConnState.ACTIVE
    return conn


def test_idle_connections_leave_the_pool_however_they_close() -> None:
    pool = _pool()
    a, b, c = _active(pool), _active(pool), _active(pool)
    for conn in (a, b, c):
        pool.release(conn, True)
    assert [conn.state for conn in (a, b, c)] == [ConnState.IDLE] * 3
    a.connection_lost(None)  # the provider closed an idle one
    b.close()  # we closed an idle one
    assert a.state is b.state is ConnState.CLOSED
    assert pool._idle == [c]  # closed ones are not kept until a take_idle skips them
    assert pool.take_idle() is c and c.state is ConnState.ACTIVE
    assert pool.take_idle() is None


def test_an_active_connection_closing_leaves_the_idle_ones_alone() -> None:
    pool = _pool()
    idle, busy = _active(pool), _active(pool)
    pool.release(idle, True)
    busy.close()  # as on a client disconnect
    busy.connection_lost(None)
    assert pool._idle == [idle]
    assert busy.state is ConnState.CLOSED and busy.transport.aborted  # type: ignore[union-attr]
    assert pool.take_idle() is idle


def test_expired_idle_connections_are_closed_when_taken() -> None:
    pool = _pool()
    old = _active(pool)
    pool.release(old, True)
    old.idle_since -= pool.cfg.pool_idle_ttl + 1
    assert pool.take_idle() is None
    assert old.state is ConnState.CLOSED and old.transport.aborted  # type: ignore[union-attr]
