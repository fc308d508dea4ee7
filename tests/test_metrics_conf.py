"""The shipped Prometheus config, alert rules, mtail program and Grafana dashboard: every
metric they use exists in the sidecar's exposition (or the mtail program's), and promtool
accepts the files (skipped where Debian's prometheus package is not installed)."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from sidecar.metrics import FAMILIES

REPO = pathlib.Path(__file__).resolve().parent.parent
PROM = REPO / "conf" / "prometheus"
DASHBOARD = REPO / "conf" / "grafana" / "sidecar.json"
MTAIL = PROM / "nginx_llm_shadow.mtail"

# PromQL words that look like metric names but are not.
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "rate", "increase", "irate", "by", "without", "on",
    "ignoring", "group_left", "group_right", "and", "or", "unless", "histogram_quantile",
    "vector", "clamp_min", "le", "bool", "offset", "topk", "bottomk", "abs", "time",
}


def _exposed() -> set[str]:
    names = set()
    for f in FAMILIES.values():
        if f.kind == "histogram":
            names |= {f"{f.name}_bucket", f"{f.name}_sum", f"{f.name}_count"}
        else:
            names.add(f.name)
    return names


def _mtail_names() -> set[str]:
    text = MTAIL.read_text()
    out = set()
    for kind, name in re.findall(r"^(counter|histogram|gauge)\s+(\w+)", text, re.M):
        out |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" \
            else {name}
    return out


def _recorded() -> set[str]:
    doc = yaml.safe_load((PROM / "sidecar.rules.yml").read_text())
    return {r["record"] for g in doc["groups"] for r in g["rules"] if "record" in r}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (label matchers and strings removed first)."""
    bare = re.sub(r"\{[^}]*\}", "{}", expr)
    bare = re.sub(r'"[^"]*"', '""', bare)
    bare = re.sub(r"\[[^\]]*\]", "[]", bare)
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    names = set(re.findall(r"[a-zA-Z_:][\w:]*", bare))
    return {n for n in names if n not in PROMQL_WORDS and not re.fullmatch(r"\d.*", n)}


def known() -> set[str]:
    return _exposed() | _mtail_names() | _recorded() | {"up"}


def dashboard_exprs(doc: Any) -> list[str]:
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", ())]


def test_the_dashboard_is_valid_and_queries_only_metrics_that_exist() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["title"] and doc["schemaVersion"] >= 30
    panels = doc["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    kinds = {p["type"] for p in panels}
    assert "heatmap" in kinds  # the TTFT heatmap
    titles = " ".join(p["title"].lower() for p in panels)
    for what in ("time to first byte", "tokens/s", "spend by model", "error", "failover"):
        assert what in titles, what
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}"
        assert {"x", "y", "w", "h"} <= set(p["gridPos"])
        assert p["targets"], p["title"]
    exprs = dashboard_exprs(doc)
    used = set().union(*(metric_names(e) for e in exprs))
    assert used - known() == set(), used - known()
    assert {"sidecar_ttft_seconds_bucket", "sidecar_tokens_total", "sidecar_cost_usd_total",
            "sidecar_failovers_total", "sidecar_requests_total"} <= used


def test_the_rules_use_only_metrics_that_exist_and_alert_on_what_the_issue_names() -> None:
    doc = yaml.safe_load((PROM / "sidecar.rules.yml").read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    used = set().union(*(metric_names(r["expr"]) for r in rules))
    assert used - known() == set(), used - known()
    alerts = {r["alert"]: r["expr"] for r in rules if "alert" in r}
    assert "sidecar_meter_rows_spilled_total" in alerts["SidecarMeterSpilling"]
    assert "sidecar_route_upstreams_up" in alerts["SidecarNoHealthyUpstream"]
    assert "request_error_ratio" in alerts["SidecarErrorRateHigh"]


def test_the_name_extraction_sees_names_and_skips_labels_and_functions() -> None:
    assert metric_names('histogram_quantile(0.99, sum by (le, via) (rate(a_bucket{x="y"}[5m])))'
                        " - b_total / on() c") == {"a_bucket", "b_total", "c"}


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (Debian: apt-get install prometheus)")
def test_promtool_accepts_the_rules_and_the_scrape_config() -> None:
    rules = subprocess.run(["promtool", "check", "rules", str(PROM / "sidecar.rules.yml")],
                           capture_output=True, text=True, timeout=60)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS" in rules.stdout
    config = subprocess.run(["promtool", "check", "config", str(PROM / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert config.returncode == 0, config.stdout + config.stderr


@pytest.mark.skipif(shutil.which("mtail") is None,
                    reason="mtail not installed (Debian: apt-get install mtail)")
def test_the_mtail_program_turns_shadow_log_lines_into_histograms_per_path(
        tmp_path: pathlib.Path) -> None:
    def line(rid: str, via: str, status: int, rt: str, uht: str) -> str:
        return (f"msec=1765000000.000\trequest_id={rid}\tvia={via}\tstatus={status}\t"
                f"request_time={rt}\tupstream_header_time={uht}\tupstream_response_time={rt}\t"
                f"upstream_addr=127.0.0.1:1\tupstream_status={status}\tbytes_sent=100\t"
                f"uri=/v1/chat/completions\n")

    log = tmp_path / "access.log"
    log.write_text(line("a", "direct", 200, "0.120", "0.0040")
                   + line("b", "sidecar", 200, "0.130", "0.0049, 0.001")
                   + line("c", "sidecar", 502, "0.001", "-")
                   + line("d", "direct", 200, "2.000", "0.0100")
                   + line("e", "direct", 200, "0.000", "0.000"))  # sub-ms, as Nginx logs it
    out = subprocess.run(["mtail", "--progs", str(PROM), "--logs", str(log), "--one_shot",
                          "--one_shot_format", "prometheus"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    from prometheus_client.parser import text_string_to_metric_families

    got = {}
    for fam in text_string_to_metric_families(out.stdout):
        for s in fam.samples:
            got[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "prog")))] \
                = s.value
    hdr = "nginx_llm_upstream_header_seconds"
    assert got[(f"{hdr}_count", (("via", "direct"),))] == 3
    # Every observation is in a bucket, a logged 0.000 too (in the first).
    assert got[(f"{hdr}_bucket", (("le", "+Inf"), ("via", "direct")))] == 3
    assert got[(f"{hdr}_bucket", (("le", "0.0005"), ("via", "direct")))] == 1
    assert got[(f"{hdr}_count", (("via", "sidecar"),))] == 1  # "-" is not a time
    assert got[(f"{hdr}_bucket", (("le", "0.005"), ("via", "sidecar")))] == 1  # first of two
    assert got[(f"{hdr}_bucket", (("le", "0.005"), ("via", "direct")))] == 2
    assert got[(f"{hdr}_bucket", (("le", "0.01"), ("via", "direct")))] == 3
    assert got[("nginx_llm_requests_total", (("status", "502"), ("via", "sidecar")))] == 1
    assert got[("nginx_llm_request_seconds_count", (("via", "sidecar"),))] == 2
    # The same bucket bounds as the sidecar's own histograms, so the two compare 1:1.
    from sidecar.metrics.exposition import LE_VALUES

    les = {dict(k[1])["le"] for k in got if k[0] == f"{hdr}_bucket"}
    assert {float(x) for x in les} == {float(x) for x in LE_VALUES}
