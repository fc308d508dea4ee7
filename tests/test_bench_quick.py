"""Smoke test of the benchmark harness: ``python -m bench compare --quick``.

Checks that the harness starts the mock, direct and the sidecar (and Nginx when it is
installed), drives real streamed load through each, and writes sane, non-empty JSON,
Markdown and per-contender configs. No timing assertion: figures only have to exist
and be positive. A peer that is not installed must be reported missing, never faked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-quick")
    empty = tmp_path_factory.mktemp("no-peers")  # Portkey is looked for here: absent
    env = {**os.environ, "BENCH_VENVS": str(empty), "PYTHONPATH": str(REPO)}
    names = ["direct", "sidecar", "portkey"] + (["nginx"] if shutil.which("nginx") else [])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "compare",
            "--quick",
            "--contenders",
            *names,
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    res["_out"] = str(out)
    res["_stderr"] = proc.stderr
    return res


def _phases_sane(res: dict[str, Any], name: str) -> None:
    assert name in res["contenders"], (res["missing"], res["_stderr"][-2000:])
    runs = [r for r in res["runs"] if r["contender"] == name and "phases" in r]
    assert runs, f"{name} produced no run"
    for phase, r in runs[0]["phases"].items():
        assert r["ok"] > 0, (name, phase, r)
        assert r["n_errors"] == 0, (name, phase, r)
        assert (
            r["rps"] > 0 and r["ttft_ms"]["p50"] > 0 and r["ttlb_ms"]["p99"] >= r["ttft_ms"]["p50"]
        )
        assert r["done_seen"] == r["ok"]  # every stream ran to [DONE]
        assert r["proxy"]["cpu_s"] > 0 and r["cpu_us_per_req"] > 0
    med = res["medians"][name]
    for key in ("ttft_p50_c10", "rps_c100_paced", "rps_c100_burst", "cpu_us_c10"):
        assert med[key] is not None and med[key] > 0, (name, key, med)


def test_direct_and_sidecar_measured(quick: dict[str, Any]) -> None:
    _phases_sane(quick, "direct")
    _phases_sane(quick, "sidecar")
    med = quick["medians"]["sidecar"]
    assert med["added_ttft_p50_c10"] is not None  # paired with direct in the same run
    assert med["peak_rss_mb"] > 0 and med["rss_lo_mb"] > 0 and med["rss_hi_mb"] > 0
    assert med["streams_hi"] > med["streams_lo"] > 0


def test_sidecar_meter_checked(quick: dict[str, Any]) -> None:
    run = next(r for r in quick["runs"] if r["contender"] == "sidecar" and "phases" in r)
    meter = run["meter"]
    assert meter["requests"] > 0 and meter["rows"] > 0
    assert 0.0 <= meter["accuracy"] <= 1.0
    assert meter["client_tally"], "the client saw no usage frames"


def test_outputs_written(quick: dict[str, Any]) -> None:
    out = Path(quick["_out"])
    md = (out / "results.md").read_text()
    assert "| sidecar |" in md and "| direct |" in md and "Configurations" in md
    cfg = quick["configs"]["sidecar"]["config"]
    assert any("listen: 127.0.0.1:" in text for text in cfg.values())
    assert (out / "configs" / "sidecar").is_dir()
    if quick.get("chart"):
        assert (out / "chart.png").stat().st_size > 1000
    else:
        assert "matplotlib" in quick["chart_note"]


def test_missing_peer_reported_not_faked(quick: dict[str, Any]) -> None:
    assert "portkey" in quick["missing"]
    assert "portkey" not in quick["medians"]
    assert not any(r["contender"] == "portkey" for r in quick["runs"])


def test_nginx_measured(quick: dict[str, Any]) -> None:
    if not shutil.which("nginx"):
        pytest.skip("nginx not installed")
    _phases_sane(quick, "nginx")
    med = quick["medians"]["sidecar"]
    assert med["cpu_us_c10_vs_nginx"] is not None and med["cpu_us_c10_vs_nginx"] > 0
