"""The metrics core, the exposition format and the merge of workers' figures (pure, no I/O
except the share test's files), checked with prometheus-client's own parser."""

from __future__ import annotations

import pathlib
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.access_log import line_of
from sidecar.config import parse_config_text
from sidecar.context import RequestContext
from sidecar.errors import ConfigError
from sidecar.metrics import FAMILIES, LATENCY_BOUNDS_MS, OVERFLOW_LABEL, Histogram, Metrics
from sidecar.metrics.exposition import render
from sidecar.metrics.samples import Samples, from_json, from_metrics, merge, to_json
from sidecar.metrics.share import Share, slot_file
from sidecar.proxy import _is_loopback


def row(**kw: Any) -> RequestContext:
    base: dict[str, Any] = dict(request_id="r1", ts_ms=1, t_received=0.0,
                                route="/v1/chat/completions", upstream="up-a", status=200,
                                outcome="ok", model="gpt-4o-mini", ttft_ms=1.0,
                                duration_ms=10.0)
    base.update(kw)
    return RequestContext(**base)


def parse(text: bytes) -> dict[str, Any]:
    """{family name: [(sample name, labels, value), ...]} via prometheus-client's parser."""
    out: dict[str, Any] = {}
    for fam in text_string_to_metric_families(text.decode()):
        out[fam.name] = [(s.name, s.labels, s.value) for s in fam.samples]
    return out


def sample(fams: dict[str, Any], family: str, name: str, **labels: str) -> float:
    found = [v for n, lab, v in fams[family] if n == name and lab == labels]
    assert len(found) == 1, (name, labels, fams[family])
    return float(found[0])


# -- histogram buckets ---------------------------------------------------------------------
def test_a_value_on_a_bound_counts_in_that_bound_and_past_the_last_in_inf() -> None:
    h = Histogram()
    for v in (0.5, 0.500001, 0.1, 120000.0, 120000.5):
        h.observe(v)
    assert h.counts[0] == 2  # 0.1 and 0.5 (le="0.0005")
    assert h.counts[1] == 1  # 0.500001
    assert h.counts[len(LATENCY_BOUNDS_MS) - 1] == 1  # exactly 120 s
    assert h.counts[-1] == 1  # past every bound: +Inf only
    assert h.count == 5 and h.total == pytest.approx(0.5 + 0.500001 + 0.1 + 240000.5)


# -- the per-request counts ----------------------------------------------------------------
def test_observe_counts_status_outcome_latencies_tokens_cost_and_failovers() -> None:
    m = Metrics()
    m.observe(row(prompt_tokens=10, completion_tokens=5, cost_usd=0.25), None, 0.004)
    m.observe(row(prompt_tokens=1, completion_tokens=2, cost_usd=None,
                  upstream_model="renamed"), [("up-x", "connect"), ("up-y", "status_503")],
              None)
    m.observe(row(status=429, outcome="rate_limited", ttft_ms=None), None, None)
    s = m.by_route[("/v1/chat/completions", "up-a")]
    assert s.statuses == {(200, "ok"): 2, (429, "rate_limited"): 1}
    assert s.ttft.count == 2 and s.duration.count == 3
    assert s.gap.count == 1 and s.gap.total == pytest.approx(4.0)  # kept in ms
    # The model the provider was sent is the one priced and counted.
    assert m.by_model == {("gpt-4o-mini", "up-a"): [10, 5, 0.25], ("renamed", "up-a"): [1, 2, 0.0]}
    assert m.failovers == {("/v1/chat/completions", "up-x", "connect"): 1,
                           ("/v1/chat/completions", "up-y", "status_503"): 1}


def test_model_and_key_label_values_past_their_caps_count_as_other() -> None:
    m = Metrics(per_key=True, max_models=2, max_keys=1)
    for i in range(5):
        m.observe(row(model=f"m{i}", key_id=f"k{i}", prompt_tokens=1, completion_tokens=1),
                  None, None)
    assert set(m.by_model) == {("m0", "up-a", "k0"), ("m1", "up-a", OVERFLOW_LABEL),
                               (OVERFLOW_LABEL, "up-a", OVERFLOW_LABEL)}
    assert m.by_model[(OVERFLOW_LABEL, "up-a", OVERFLOW_LABEL)][0] == 3
    assert sum(v[0] for v in m.by_model.values()) == 5  # nothing lost, only folded


# -- the exposition ------------------------------------------------------------------------
def test_exposition_parses_and_carries_the_counts() -> None:
    m = Metrics()
    for ttft in (0.2, 0.7, 3.0):
        m.observe(row(ttft_ms=ttft, duration_ms=ttft * 10, prompt_tokens=3,
                      completion_tokens=4, cost_usd=0.5), None, 0.002)
    out: Samples = {}
    from_metrics(m, out)
    fams = parse(render(out))
    assert set(fams) >= {f.name.removesuffix("_total") for f in FAMILIES.values()}
    labels = {"route": "/v1/chat/completions", "upstream": "up-a"}
    assert sample(fams, "sidecar_requests", "sidecar_requests_total", status="200",
                  outcome="ok", **labels) == 3
    # Cumulative buckets, in seconds.
    assert sample(fams, "sidecar_ttft_seconds", "sidecar_ttft_seconds_bucket", le="0.0005",
                  **labels) == 1
    assert sample(fams, "sidecar_ttft_seconds", "sidecar_ttft_seconds_bucket", le="0.001",
                  **labels) == 2
    assert sample(fams, "sidecar_ttft_seconds", "sidecar_ttft_seconds_bucket", le="0.003",
                  **labels) == 3
    assert sample(fams, "sidecar_ttft_seconds", "sidecar_ttft_seconds_bucket", le="+Inf",
                  **labels) == 3
    assert sample(fams, "sidecar_ttft_seconds", "sidecar_ttft_seconds_count", **labels) == 3
    assert sample(fams, "sidecar_ttft_seconds", "sidecar_ttft_seconds_sum",
                  **labels) == pytest.approx(0.0039)
    assert sample(fams, "sidecar_tokens", "sidecar_tokens_total", model="gpt-4o-mini",
                  upstream="up-a", type="completion") == 12
    assert sample(fams, "sidecar_cost_usd", "sidecar_cost_usd_total", model="gpt-4o-mini",
                  upstream="up-a") == 1.5


def test_label_values_from_clients_are_escaped() -> None:
    m = Metrics()
    evil = 'a"b\\c\nd} x{'
    m.observe(row(model=evil, prompt_tokens=1, completion_tokens=1), None, None)
    out: Samples = {}
    from_metrics(m, out)
    fams = parse(render(out))
    assert sample(fams, "sidecar_tokens", "sidecar_tokens_total", model=evil,
                  upstream="up-a", type="prompt") == 1


# -- workers: merge and share ----------------------------------------------------------------
def test_merge_sums_counters_and_histograms_and_combines_gauges_by_family() -> None:
    a: Samples = {("sidecar_requests_total", (("route", "/r"),)): 2,
                  ("sidecar_ttft_seconds", ()): [1] + [0] * 22 + [0.5],
                  ("sidecar_requests_in_flight", (("route", "/r"),)): 3,
                  ("sidecar_upstream_up", (("upstream", "u"),)): 1}
    b: Samples = {("sidecar_requests_total", (("route", "/r"),)): 5,
                  ("sidecar_ttft_seconds", ()): [0, 2] + [0] * 21 + [2.0],
                  ("sidecar_requests_in_flight", (("route", "/r"),)): 4,
                  ("sidecar_upstream_up", (("upstream", "u"),)): 0,
                  ("not_ours_total", ()): 9}
    merge(a, b)
    assert a[("sidecar_requests_total", (("route", "/r"),))] == 7
    assert a[("sidecar_ttft_seconds", ())] == [1, 2] + [0] * 21 + [2.5]
    assert a[("sidecar_requests_in_flight", (("route", "/r"),))] == 7  # sum
    assert a[("sidecar_upstream_up", (("upstream", "u"),))] == 0  # min: the worst view
    assert ("not_ours_total", ()) not in a
    c: Samples = {}
    merge(c, b, gauges=False)  # a dead worker's counts carry on, its gauges do not
    assert ("sidecar_requests_in_flight", (("route", "/r"),)) not in c
    assert c[("sidecar_requests_total", (("route", "/r"),))] == 5


def test_samples_survive_json_and_malformed_entries_are_skipped() -> None:
    s: Samples = {("sidecar_requests_total", (("route", "/r"), ("status", "200"))): 4,
                  ("sidecar_ttft_seconds", (("route", "/r"),)): [1] * 23 + [7.5]}
    assert from_json(to_json(s)) == s
    bad = orjson.dumps({"v": 1, "samples": [["x", [["a", "b"]], [1, 2]], ["y"], 5,
                                            ["sidecar_requests_total", [], True]]})
    assert from_json(bad) == {}
    assert from_json(orjson.dumps({"v": 99, "samples": []})) == {}


def test_share_publishes_reads_the_other_slots_and_carries_a_dead_workers_counters(
        tmp_path: pathlib.Path) -> None:
    d = str(tmp_path)
    w0, w1 = Share(d, 0, 2), Share(d, 1, 2)
    w0._source = lambda: {("sidecar_requests_total", ()): 3.0,
                          ("sidecar_requests_in_flight", ()): 2.0}
    w1._source = lambda: {("sidecar_requests_total", ()): 4.0}
    w0.write()
    w1.write()
    assert w0.others() == [{("sidecar_requests_total", ()): 4.0}]
    assert pathlib.Path(slot_file(d, 1)).exists()
    # Slot 0 restarted: its successor starts from its counters, not its gauges.
    again = Share(d, 0, 2)
    again.load_baseline()
    assert again.baseline == {("sidecar_requests_total", ()): 3.0}


# -- the access log line and /metrics' peer check --------------------------------------------
def test_access_log_line_has_the_row_fields_and_no_secret() -> None:
    r = row(key_id="key_abc", prompt_tokens=3, completion_tokens=4, total_tokens=7,
            cost_usd=0.01, error=None)
    r.api_key = object()  # the identity's key record: must not reach the line
    doc = orjson.loads(line_of(r))
    assert line_of(r).endswith(b"\n")
    assert doc == {"ts_ms": 1, "request_id": "r1", "key_id": "key_abc",
                   "route": "/v1/chat/completions", "upstream": "up-a", "model": "gpt-4o-mini",
                   "status": 200, "outcome": "ok", "ttft_ms": 1.0, "duration_ms": 10.0,
                   "prompt_tokens": 3, "completion_tokens": 4, "cost_usd": 0.01}
    r.error = 'upstream "x" answered 503'
    assert orjson.loads(line_of(r))["error"] == r.error  # only when there is one


@pytest.mark.parametrize(("ip", "loop"), [("127.0.0.1", True), ("127.3.4.5", True), ("::1", True),
                                          ("::ffff:127.0.0.1", True), ("10.0.0.1", False),
                                          ("::ffff:10.0.0.1", False), (None, False),
                                          ("junk", False)])
def test_only_loopback_peers_count_as_loopback(ip: str | None, loop: bool) -> None:
    assert _is_loopback(ip) is loop


# -- config ------------------------------------------------------------------------------------
def test_metrics_and_access_log_config_loads(tmp_path: pathlib.Path) -> None:
    cfg = parse_config_text(
        "listen: 127.0.0.1:8080\n"
        "metrics:\n  listen: 127.0.0.1:9464\n  per_key: true\n  max_models: 50\n"
        "access_log: ./access.jsonl\n", str(tmp_path / "s.yaml"))
    assert (cfg.metrics.listen_host, cfg.metrics.listen_port) == ("127.0.0.1", 9464)
    assert cfg.metrics.per_key and cfg.metrics.max_models == 50 and cfg.metrics.enabled
    assert cfg.access_log == str(tmp_path / "access.jsonl")
    assert parse_config_text("access_log: off\n", str(tmp_path / "s.yaml")).access_log is None
    assert parse_config_text("access_log: stdout\n", "s.yaml").access_log == "stdout"
    assert parse_config_text("listen: 1\n", "s.yaml").metrics.listen_port is None


@pytest.mark.parametrize(("text", "where"), [
    ("metrics:\n  listen: nowhere\n", "s.yaml:2: metrics.listen: must be a port or HOST:PORT"),
    ("metrics:\n  per_key: maybe\n", "s.yaml:2: metrics.per_key: must be a boolean"),
    ("metrics:\n  max_models: 0\n", "s.yaml:2: metrics.max_models:"),
    ("metrics:\n  colour: red\n", "s.yaml:2: metrics.colour:"),
    ("access_log: true\n", "s.yaml:1: access_log: must be off, stdout or a file path"),
    ("access_log: /no/such/dir/a.log\n", "s.yaml:1: access_log: directory not found"),
    ("listen: 127.0.0.1:8080\nmetrics:\n  listen: 127.0.0.1:8080\n",
     "s.yaml:3: metrics.listen: is the main listener's address"),
])
def test_bad_metrics_config_names_file_line_and_field(text: str, where: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config_text(text, "s.yaml")
    assert where in str(e.value), str(e.value)


def test_a_stuck_access_log_drops_and_counts_past_its_bound_and_writes_the_rest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipe nobody reads stalls the writer thread: the hot path keeps going, lines past
    the pending bound are dropped and counted, and once the pipe is read every line
    that was kept arrives, whole."""
    import asyncio
    import os
    import threading

    from sidecar import access_log as al

    monkeypatch.setattr(al, "ACCESS_LOG_MAX_PENDING_BYTES", 256 * 1024)
    n = 6000  # ~170 bytes each: ~1 MB, four times the bound and far past the pipe's 64 KiB
    r, w = os.pipe()
    got: list[bytes] = []

    async def main() -> tuple[int, int]:
        log = al.AccessLog(f"/dev/fd/{w}", asyncio.get_running_loop())
        os.close(w)  # the log holds its own descriptor of the pipe
        for i in range(n):
            log.write(row(request_id=f"r{i}"))
        await asyncio.sleep(0.2)
        assert log.dropped > 0  # nobody reads yet: the bound was hit
        reader = threading.Thread(target=lambda: got.extend(iter(lambda: os.read(r, 65536),
                                                                  b"")))
        reader.start()
        await log.close()
        reader.join(10)
        return log.written, log.dropped

    written, dropped = asyncio.run(main())
    os.close(r)
    lines = b"".join(got).splitlines()
    assert written + dropped == n and written == len(lines) > 0
    ids = [orjson.loads(line)["request_id"] for line in lines]
    assert ids == [f"r{i}" for i in range(len(ids))]  # in order, none torn
