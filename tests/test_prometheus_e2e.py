"""A real Prometheus scraping the sidecar, and the shadow split's two paths compared.

Real processes on loopback: the mock provider, `sidecar run`, an unprivileged Nginx that
sends half of the requests straight to the mock and half through the sidecar
(`split_clients` on $request_id, 50%, logging with the shipped `llm_shadow` format of
conf/nginx/llm-split.conf), mtail turning that log into
histograms per path (conf/prometheus/nginx_llm_shadow.mtail), and Debian's Prometheus
scraping the sidecar and mtail every second with the shipped rules loaded. The test
asks Prometheus what the README's comparison queries ask. Skipped where nginx, mtail or
prometheus is not installed (.ci/run installs them where apt-get can).
"""

from __future__ import annotations

import itertools
import json
import math
import pathlib
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from e2e_helpers import request_bytes
from test_process_e2e import Proc, procs, start_mock, start_sidecar, status_of  # noqa: F401


REPO = pathlib.Path(__file__).resolve().parent.parent
PROM_CONF = REPO / "conf" / "prometheus"
READY_S = 60.0  # Prometheus and mtail start-up on a loaded 2-core box
CONVERGE_S = 60.0
WARM_UP = 20
N_REQUESTS = 100

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("nginx", "mtail", "prometheus")),
    reason="needs nginx, mtail and prometheus (Debian: apt-get install nginx-light mtail "
           "prometheus)")

# The shipped log format (conf/nginx/llm-split.conf), which the mtail program reads.
SPLIT_CONF = REPO / "conf" / "nginx" / "llm-split.conf"


def llm_shadow_format() -> str:
    m = re.search(r"^log_format llm_shadow .*?;$", SPLIT_CONF.read_text(), re.S | re.M)
    assert m is not None, "conf/nginx/llm-split.conf has no llm_shadow log_format"
    return m.group(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nginx_conf(tmp: pathlib.Path, port: int, mock_port: int, sidecar_port: int) -> str:
    temps = "\n".join(f"  {k}_temp_path {tmp}/{k};" for k in
                      ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
{temps}
  access_log off;
  {llm_shadow_format()}
  upstream direct {{ server 127.0.0.1:{mock_port}; keepalive 16; }}
  upstream sidecar {{ server 127.0.0.1:{sidecar_port}; keepalive 16; }}
  split_clients "$request_id" $llm_via {{ 50% sidecar; * direct; }}
  server {{
    listen 127.0.0.1:{port};
    location /v1/ {{
      access_log {tmp}/access.log llm_shadow;
      proxy_pass http://$llm_via;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""


def prometheus_conf(sidecar_port: int, mtail_port: int) -> str:
    return f"""
global: {{ scrape_interval: 1s, evaluation_interval: 1s }}
rule_files: [{PROM_CONF / "sidecar.rules.yml"}]
scrape_configs:
  - job_name: sidecar
    static_configs: [{{ targets: ["127.0.0.1:{sidecar_port}"] }}]
  - job_name: nginx_shadow
    static_configs: [{{ targets: ["127.0.0.1:{mtail_port}"] }}]
"""


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except OSError:
        return 0, b""


def wait_http(url: str, proc: Proc) -> None:
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if get(url)[0] == 200:
            return
        assert proc.p.poll() is None, proc.log.read_text()[-2000:]
        time.sleep(0.2)
    raise AssertionError(f"{url} never answered; log:\n{proc.log.read_text()[-2000:]}")


def query(prom: int, promql: str) -> list[dict[str, Any]]:
    status, body = get(f"http://127.0.0.1:{prom}/api/v1/query?"
                       + urllib.parse.urlencode({"query": promql}))
    assert status == 200, body
    doc = json.loads(body)
    assert doc["status"] == "success", doc
    return list(doc["data"]["result"])


def scalar(prom: int, promql: str) -> float | None:
    res = query(prom, promql)
    return float(res[0]["value"][1]) if len(res) == 1 else None


def stream_via_nginx(port: int) -> int:
    body = {"model": "gpt-4o-mini", "stream": True,
            "messages": [{"role": "user", "content": "hello"}]}
    return status_of(port, request_bytes("POST", "/v1/chat/completions", body,
                                         headers=((b"connection", b"close"),)), timeout=20)


@pytest.fixture
def nginx(tmp_path: pathlib.Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    made: list[subprocess.Popen[bytes]] = []
    yield made
    for p in made:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_prometheus_scrapes_the_sidecar_and_compares_the_two_paths_latency_buckets(
        tmp_path: pathlib.Path, procs: list[Proc],  # noqa: F811
        nginx: list[subprocess.Popen[bytes]]) -> None:
    mock_port = start_mock(procs, tmp_path, "--chunks", "8", "--delay-ms", "2",
                           "--always-usage")
    _, sidecar_port = start_sidecar(procs, tmp_path, mock_port)

    nginx_port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_conf(tmp_path, nginx_port, mock_port, sidecar_port))
    log = tmp_path / "access.log"
    log.touch()  # mtail follows it from the start
    nginx.append(subprocess.Popen(["nginx", "-p", str(tmp_path), "-c", str(conf),
                                   "-e", str(tmp_path / "nginx-error.log")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    mtail_port = free_port()
    mtail = Proc(["mtail", "--progs", str(PROM_CONF), "--logs", str(log), "--address",
                  "127.0.0.1", "--port", str(mtail_port), "--logtostderr"],
                 tmp_path / "mtail.log")
    procs.append(mtail)
    prom_port = free_port()
    pconf = tmp_path / "prometheus.yml"
    pconf.write_text(prometheus_conf(sidecar_port, mtail_port))
    prom = Proc(["prometheus", f"--config.file={pconf}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}"], tmp_path / "prometheus.log")
    procs.append(prom)
    wait_http(f"http://127.0.0.1:{mtail_port}/metrics", mtail)
    wait_http(f"http://127.0.0.1:{prom_port}/-/ready", prom)

    deadline = time.monotonic() + READY_S
    while stream_via_nginx(nginx_port) != 200:  # nginx is up once a request passes
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # Two batches: rate() and increase() count from a series' first scrape, so the first
    # batch makes every series exist in Prometheus and the second is what is compared.
    sent = 1
    for batch in (WARM_UP, N_REQUESTS):
        statuses = [stream_via_nginx(nginx_port) for _ in range(batch)]
        assert statuses == [200] * batch
        sent += batch
        deadline = time.monotonic() + CONVERGE_S  # nginx logs just after the last byte
        while len(lines := log.read_text().splitlines()) < sent \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        via = [dict(f.split("=", 1) for f in line.split("\t"))["via"] for line in lines]
        n_sidecar, n_total = via.count("sidecar"), len(via)
        assert 0 < n_sidecar < n_total
        # Prometheus has every request: the sidecar counted its share, mtail the whole log.
        deadline = time.monotonic() + CONVERGE_S
        while time.monotonic() < deadline:
            got = (scalar(prom_port, "sum(sidecar_requests_total)"),
                   scalar(prom_port, "sum(nginx_llm_requests_total)"))
            if got == (n_sidecar, n_total):
                break
            time.sleep(0.5)
        assert got == (n_sidecar, n_total)
    assert n_total == 1 + WARM_UP + N_REQUESTS
    assert scalar(prom_port, "sum(sidecar_ttft_seconds_count)") == n_sidecar
    assert scalar(prom_port, 'sum(nginx_llm_upstream_header_seconds_count{via="sidecar"})') \
        == n_sidecar
    time.sleep(2.0)  # a couple more scrapes after the last request

    # The README's comparison: Nginx's wait for the response head on each path, from
    # histograms with the same buckets, and the sidecar path's extra at p50.
    per_path = query(prom_port, "histogram_quantile(0.5, sum by (via, le) "
                                "(increase(nginx_llm_upstream_header_seconds_bucket[5m])))")
    p50 = {r["metric"]["via"]: float(r["value"][1]) for r in per_path}
    assert set(p50) == {"direct", "sidecar"} and all(math.isfinite(v) for v in p50.values())
    extra = scalar(prom_port,
                   'histogram_quantile(0.5, sum by (le) (increase('
                   'nginx_llm_upstream_header_seconds_bucket{via="sidecar"}[5m])))'
                   ' - histogram_quantile(0.5, sum by (le) (increase('
                   'nginx_llm_upstream_header_seconds_bucket{via="direct"}[5m])))')
    assert extra is not None and math.isfinite(extra)
    # Bucket by bucket: the share of each path's requests at or under each bound (since
    # the start: exact, where increase() would extrapolate).
    shares = query(prom_port,
                   "sum by (via, le) (nginx_llm_upstream_header_seconds_bucket)"
                   " / ignoring (le) group_left"
                   " sum by (via) (nginx_llm_upstream_header_seconds_count)")
    by_path: dict[str, list[tuple[float, float]]] = {}
    for r in shares:
        by_path.setdefault(r["metric"]["via"], []).append(
            (float(r["metric"]["le"]), float(r["value"][1])))
    assert set(by_path) == {"direct", "sidecar"}
    for buckets in by_path.values():
        buckets.sort()
        assert len(buckets) == 23 and buckets[-1] == (math.inf, 1.0), buckets
        assert all(a[1] <= b[1] for a, b in itertools.pairwise(buckets))
    # The shipped rules load and evaluate: the sidecar's own TTFT p50 is recorded.
    deadline = time.monotonic() + CONVERGE_S
    while scalar(prom_port, "sidecar:ttft_seconds:p50_5m") is None \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    recorded = scalar(prom_port, "sidecar:ttft_seconds:p50_5m")
    assert recorded is not None and 0 < recorded < 10
