"""/metrics and the access log over real loopback sockets: known traffic through the
sidecar and the mock provider, then a scrape whose counters and histogram counts must
equal what was sent (and what the meter DB holds), parsed with prometheus-client."""

from __future__ import annotations

import dataclasses
import pathlib
import signal
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from conftest import Stack
from e2e_helpers import ClientConn, chat_body, closed_port, request_bytes, roundtrip
from prometheus_client.parser import text_string_to_metric_families
from test_failover_e2e import TwoMocks, two_mocks  # noqa: F401  (the fixture)
from test_process_e2e import (  # noqa: F401  (procs: the fixture)
    START_TIMEOUT,
    Proc,
    _children,
    _one_request,
    kill_a_worker_and_await_its_replacement,
    procs,
    start_mock,
    start_sidecar,
)

from sidecar.config import Config, MetricsConfig

PATH = "/v1/chat/completions"
LOG_WAIT_S = 5.0  # the access log flushes every 0.5 s


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of one GET /metrics."""
    resp = roundtrip(port, request_bytes("GET", "/metrics"))
    assert resp.status == 200, resp.body
    assert resp.header("content-type") == "text/plain; version=0.0.4; charset=utf-8"
    out = {}
    for fam in text_string_to_metric_families(resp.body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict[Any, float], name: str, **match: str) -> float:
    return sum(v for (n, labels), v in samples.items()
               if n == name and all(dict(labels).get(k) == w for k, w in match.items()))


def with_metrics(**changes: Any) -> Callable[[Config], Config]:
    def edit(config: Config) -> Config:
        access = changes.pop("access_log", None)
        return dataclasses.replace(config, metrics=MetricsConfig(**changes),
                                   access_log=access)
    return edit


def read_log(path: pathlib.Path, n: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + LOG_WAIT_S
    while True:
        lines = path.read_bytes().splitlines() if path.exists() else []
        if len(lines) >= n or time.monotonic() > deadline:
            return [orjson.loads(line) for line in lines]
        time.sleep(0.05)


def wait_rows(stack: Stack, n: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        rows = stack.rows()
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_a_scrape_after_known_traffic_counts_exactly_what_was_sent(
        stack_factory: Callable[..., Stack], tmp_path: pathlib.Path) -> None:
    log_path = tmp_path / "access.jsonl"
    stack = stack_factory(with_metrics(access_log=str(log_path)), always_usage=True)
    paced = ((b"x-mock-delay-ms", b"3"),)
    sent = []
    with ClientConn(stack.port) as c:
        for _ in range(4):  # streamed, events 3 ms apart: one gap sample each
            c.send(request_bytes("POST", PATH, chat_body(stream=True), headers=paced))
            sent.append(c.read_response().status)
        for _ in range(3):  # not streamed
            c.send(request_bytes("POST", PATH, chat_body()))
            sent.append(c.read_response().status)
        c.send(request_bytes("POST", PATH, chat_body(),
                             headers=((b"x-mock-fault", b"status:429"),)))
        sent.append(c.read_response().status)
        c.send(request_bytes("POST", PATH, b"{not json"))
        sent.append(c.read_response().status)
    assert sent == [200] * 7 + [429, 400]
    rows = wait_rows(stack, 9)
    assert len(rows) == 9
    m = scrape(stack.port)

    up = "mock-openai"
    assert total(m, "sidecar_requests_total") == 9
    assert total(m, "sidecar_requests_total", status="200", outcome="ok", upstream=up) == 7
    assert total(m, "sidecar_requests_total", status="429", outcome="rate_limited") == 1
    assert total(m, "sidecar_requests_total", status="400", outcome="rejected") == 1
    # Histogram counts: one per row (duration), one per row with a first byte (ttft).
    assert total(m, "sidecar_request_duration_seconds_count") == 9
    assert total(m, "sidecar_ttft_seconds_count") == sum(r["ttft_ms"] is not None for r in rows)
    assert total(m, "sidecar_ttft_seconds_bucket", le="+Inf") == \
        total(m, "sidecar_ttft_seconds_count")
    # Each bucket holds exactly the rows at or under its bound (row ttft in ms, rounded).
    for le in ("0.001", "0.005", "0.05"):
        assert total(m, "sidecar_ttft_seconds_bucket", le=le) == sum(
            r["ttft_ms"] is not None and r["ttft_ms"] <= float(le) * 1000 for r in rows), le
    assert total(m, "sidecar_ttft_seconds_sum") == pytest.approx(
        sum(r["ttft_ms"] or 0 for r in rows) / 1000, abs=1e-6)
    # The paced streams had reads 3 ms apart: a gap sample each, at least ~3 ms.
    assert total(m, "sidecar_stream_max_gap_seconds_count") >= 4
    assert total(m, "sidecar_stream_max_gap_seconds_bucket", le="0.002") == 0
    # Tokens and cost equal the meter's.
    assert total(m, "sidecar_tokens_total", type="prompt") == sum(
        r["prompt_tokens"] or 0 for r in rows)
    assert total(m, "sidecar_tokens_total", type="completion") == sum(
        r["completion_tokens"] or 0 for r in rows)
    assert total(m, "sidecar_cost_usd_total") == pytest.approx(
        sum(r["cost_usd"] or 0 for r in rows))
    assert total(m, "sidecar_requests_in_flight") == 0
    # The provider's 429 said retry-after: 1, so its upstream is cooling down: not up,
    # and the route has no upstream taking requests right now.
    assert total(m, "sidecar_upstream_up", upstream=up) == 0
    assert total(m, "sidecar_route_upstreams_up", route=PATH) == 0
    assert total(m, "sidecar_meter_rows_written_total") == 9
    assert total(m, "sidecar_meter_batch_seconds_count") >= 1
    assert total(m, "sidecar_metrics_workers") == 1

    lines = read_log(log_path, 9)
    assert len(lines) == 9
    by_id = {r["request_id"]: r for r in rows}
    for line in lines:
        r = by_id[line["request_id"]]
        for k in ("route", "upstream", "model", "status", "outcome", "ttft_ms", "duration_ms",
                  "prompt_tokens", "completion_tokens", "cost_usd", "key_id"):
            assert line[k] == r[k], (k, line, r)
    m = scrape(stack.port)
    assert total(m, "sidecar_access_log_lines_total") == 9


def test_metrics_listen_serves_metrics_there_only(stack_factory: Callable[..., Stack]) -> None:
    port = closed_port()
    stack = stack_factory(with_metrics(listen_host="127.0.0.1", listen_port=port))
    assert stack.server.metrics_port == port
    assert roundtrip(stack.port, request_bytes("POST", PATH, chat_body())).status == 200
    assert roundtrip(stack.port, request_bytes("GET", "/metrics")).status == 404
    m = scrape(port)
    assert total(m, "sidecar_requests_total") == 1
    other = roundtrip(port, request_bytes("GET", "/healthz"))
    assert other.status == 404 and other.json["error"]["type"]
    post = roundtrip(port, request_bytes("POST", "/metrics", b""))
    assert post.status == 405 and post.header("allow") == "GET, HEAD"


def test_metrics_disabled_answers_404(stack_factory: Callable[..., Stack]) -> None:
    stack = stack_factory(with_metrics(enabled=False))
    assert roundtrip(stack.port, request_bytes("POST", PATH, chat_body())).status == 200
    assert roundtrip(stack.port, request_bytes("GET", "/metrics")).status == 404


def test_failovers_and_an_ejected_upstream_show_in_the_scrape(
        two_mocks: Callable[..., TwoMocks]) -> None:  # noqa: F811
    def budget(config: Config) -> Config:  # every request may fail over
        return dataclasses.replace(config, routes=tuple(
            dataclasses.replace(r, retry_budget=1.0) for r in config.routes))

    stack = two_mocks(primary_port=closed_port(), edit=budget)
    n = 6  # five connect failures in a row eject the primary (consecutive_failures)
    for _ in range(n):
        assert roundtrip(stack.port, request_bytes("POST", PATH, chat_body())).status == 200
    wait_rows(stack, n)
    m = scrape(stack.port)
    assert total(m, "sidecar_requests_total", upstream="secondary", status="200") == n
    failovers = total(m, "sidecar_failovers_total", upstream="primary", reason="connect")
    assert failovers == sum(r["failed_attempts"] is not None for r in stack.rows()) == 5
    assert total(m, "sidecar_upstream_up", upstream="primary") == 0
    assert total(m, "sidecar_upstream_up", upstream="secondary") == 1
    assert total(m, "sidecar_route_upstreams_up", route=PATH) == 1


# -- `sidecar run` processes: workers: 2, SIGUSR1 ------------------------------------------
SCRAPE_CONVERGE_S = 15.0  # workers publish every SHARE_INTERVAL_S (1 s); a loaded box lags


def scrape_until(port: int, ok: Callable[[dict[Any, float]], bool]) -> dict[Any, float]:
    deadline = time.monotonic() + SCRAPE_CONVERGE_S
    while True:
        m = scrape(port)
        if ok(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def meter_sums(db: pathlib.Path) -> tuple[int, int, int]:
    import sqlite3

    con = sqlite3.connect(db)
    try:
        n, p, c = con.execute("SELECT count(*), total(prompt_tokens), total(completion_tokens)"
                              " FROM requests").fetchone()
        return int(n), int(p), int(c)
    finally:
        con.close()


def test_two_workers_one_scrape_counts_both_and_a_restarted_worker_keeps_its_counts(
        tmp_path: pathlib.Path, procs: list[Proc]) -> None:  # noqa: F811
    mock_port = start_mock(procs, tmp_path)
    log_path = tmp_path / "access.jsonl"
    side, port = start_sidecar(procs, tmp_path, mock_port,
                               f"workers: 2\naccess_log: {log_path}\n")
    n = 40  # one connection each: SO_REUSEPORT spreads them over both workers
    assert [_one_request(port) for _ in range(n)] == [200] * n

    def converged(m: dict[Any, float]) -> bool:
        return total(m, "sidecar_metrics_workers") == 2 and \
            total(m, "sidecar_requests_total") == n and \
            total(m, "sidecar_meter_rows_written_total") == n

    # Every scrape (each may land on either worker) sees the whole process.
    for _ in range(4):
        m = scrape_until(port, converged)
        assert converged(m), {k: v for k, v in m.items() if "requests_total" in k[0]}
        assert total(m, "sidecar_requests_total", status="200", outcome="ok") == n
        assert total(m, "sidecar_ttft_seconds_count") == n
        assert total(m, "sidecar_request_duration_seconds_count") == n
        rows, prompt, completion = meter_sums(tmp_path / "meter.db")
        assert rows == n
        assert total(m, "sidecar_tokens_total", type="prompt") == prompt
        assert total(m, "sidecar_tokens_total", type="completion") == completion
    assert len(read_log(log_path, n)) == n

    # logrotate: the file moves away, SIGUSR1 to the supervisor reaches both workers.
    rotated = tmp_path / "access.jsonl.1"
    log_path.rename(rotated)
    side.p.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + SCRAPE_CONVERGE_S
    while not log_path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # both workers' reopen (each creates the file if the other has not)
    m2 = 10
    assert [_one_request(port) for _ in range(m2)] == [200] * m2
    assert len(read_log(log_path, m2)) == m2
    assert len(read_log(rotated, n)) == n  # nothing more went to the old file
    assert side.p.poll() is None  # SIGUSR1 did not end the supervisor

    # A worker killed and restarted in its slot carries its counters on.
    m = scrape_until(port, lambda m: total(m, "sidecar_requests_total") == n + m2)
    assert total(m, "sidecar_requests_total") == n + m2
    time.sleep(1.5)  # both have published their last counts
    kill_a_worker_and_await_its_replacement(side)
    time.sleep(3.0)  # the replacement imports, binds and publishes
    m = scrape_until(port, lambda m: total(m, "sidecar_metrics_workers") == 2)
    assert total(m, "sidecar_requests_total") == n + m2
    assert side.stop() == 0


# -- the per-read clock: the gap histogram and the upstream idle timeout share it ----------
def test_a_trickling_stream_outlives_the_idle_timeout_and_its_gap_is_measured(
        stack_factory: Callable[..., Stack]) -> None:
    from e2e_helpers import edit_timeouts

    # Events 100 ms apart for ~1 s, idle timeout 0.3 s: each read is progress.
    stack = stack_factory(edit_timeouts(idle=0.3), chunks=10, delay_ms=100, always_usage=True)
    resp = roundtrip(stack.port, request_bytes("POST", PATH, chat_body(stream=True)))
    assert resp.status == 200 and resp.complete and b"[DONE]" in resp.body
    (row,) = wait_rows(stack, 1)
    assert row["outcome"] == "ok" and row["duration_ms"] > 900
    m = scrape(stack.port)
    assert total(m, "sidecar_stream_max_gap_seconds_count") == 1
    # The longest pause was ~100 ms: not under 75 ms, not over 250 ms.
    assert total(m, "sidecar_stream_max_gap_seconds_bucket", le="0.075") == 0
    assert total(m, "sidecar_stream_max_gap_seconds_bucket", le="0.25") == 1


def test_a_stream_that_stalls_after_its_head_is_cut_by_the_idle_timeout(
        stack_factory: Callable[..., Stack]) -> None:
    from e2e_helpers import edit_timeouts

    # Events 1.5 s apart, idle timeout 0.3 s: cut after the first pause.
    stack = stack_factory(edit_timeouts(idle=0.3), chunks=3, delay_ms=1500)
    resp = roundtrip(stack.port, request_bytes("POST", PATH, chat_body(stream=True)))
    assert resp.status == 200 and b"[DONE]" not in resp.body
    (row,) = wait_rows(stack, 1)
    assert row["outcome"] == "upstream_timeout" and "idle" in row["error"]
    assert row["duration_ms"] < 1400
