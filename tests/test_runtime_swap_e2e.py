"""A runtime snapshot swapped while a stream is in flight (the seam a reload uses).

Real loopback sockets: the mock provider, the sidecar, raw clients and the meter DB.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from typing import Any

from e2e_helpers import ClientConn, chat_body, edit_upstreams, request_bytes
from test_streaming_e2e import RawStream

from sidecar.config import Config, UpstreamConfig


def _renamed(up: UpstreamConfig) -> UpstreamConfig:
    return dataclasses.replace(up, name=up.name + "-b")


def test_swap_serves_new_requests_from_the_new_snapshot_and_lets_the_old_stream_finish(
        stack_factory: Any) -> None:
    stack = stack_factory(chunks=20, delay_ms=20)
    proxy = stack.server.proxy
    old_pool = proxy.runtime.upstreams.pools["mock-openai"]

    sock = socket.create_connection(("127.0.0.1", stack.port), timeout=10)
    sock.sendall(request_bytes("POST", "/v1/chat/completions", chat_body(stream=True)))
    rs = RawStream(sock)
    rs.read_events(3)  # streaming on the old snapshot

    new_config: Config = edit_upstreams(_renamed)(proxy.config)
    stack.call(lambda: proxy.swap(new_config))
    assert old_pool.retired
    assert proxy.runtime.upstreams.pools["mock-openai-b"] is not old_pool

    with ClientConn(stack.port) as c:
        c.send(request_bytes("POST", "/v1/chat/completions", chat_body()))
        resp = c.read_response()
    assert resp.status == 200 and resp.complete

    rs.read_events(10_000)  # the old stream runs to its end
    assert rs.parser.done
    sock.close()
    # The old pool is retired: the connection its stream used is closed, not pooled.
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and stack.mock.requests[0].connection.closed_at is None:
        time.sleep(0.01)
    assert stack.mock.requests[0].connection.closed_at is not None
    stack.stop()
    rows = stack.rows()
    assert [r["upstream"] for r in rows] == ["mock-openai-b", "mock-openai"]
    assert [r["outcome"] for r in rows] == ["ok", "ok"]
    assert all(r["usage_source"] == "reported" for r in rows)


def _ask(port: int) -> None:
    with ClientConn(port) as c:
        c.send(request_bytes("POST", "/v1/chat/completions", chat_body()))
        resp = c.read_response()
    assert resp.status == 200 and resp.complete


def test_swap_keeps_the_warm_pool_of_an_unchanged_upstream(stack_factory: Any) -> None:
    stack = stack_factory()
    proxy = stack.server.proxy
    _ask(stack.port)
    pool = proxy.runtime.upstreams.pools["mock-openai"]
    connects = pool.connects
    stack.call(lambda: proxy.swap(dataclasses.replace(proxy.config)))
    assert proxy.runtime.upstreams.pools["mock-openai"] is pool and not pool.retired
    _ask(stack.port)
    assert pool.connects == connects  # the kept-alive provider connection was reused
