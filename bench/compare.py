"""``python -m bench compare``: every contender on the same mock, interleaved runs, medians."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import contenders as C
from bench import procstat

REPO = C.REPO
RESULTS = REPO / "bench" / "results"


@dataclass(frozen=True)
class Plan:
    runs: int
    warmup: float
    c10: float
    c100: float
    burst: float
    open_rate: float
    open: float
    hold_levels: tuple[int, ...]
    hold_runs: int
    level_timeout: float
    drain: float


# The high open-streams level; the harness opens fewer when the fd limit is lower.
HOLD_TARGET_STREAMS = 10_000


# Descriptors kept free for the proxy's own use when sizing the high level.
FD_MARGIN = 200


def _fd_cap() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lim = hard if hard != resource.RLIM_INFINITY else 1 << 20
    # A single-process proxy holds two fds per stream (client + upstream) plus a few of
    # its own (listeners, logs, the meter DB). Idle keep-alive connections to the mock
    # need no room of their own: the held streams take them over. 9,900 of 10,000 at
    # the 20,000 hard limit of these machines was checked with the sidecar, nginx and
    # nginx+lua (bench/README.md).
    return max(100, min(HOLD_TARGET_STREAMS, (lim - FD_MARGIN) // 2 // 100 * 100))


FULL = Plan(
    runs=3,
    warmup=1.0,
    c10=4.0,
    c100=3.0,
    burst=3.0,
    open_rate=300.0,
    open=3.0,
    hold_levels=(1000, _fd_cap()),
    hold_runs=1,
    level_timeout=25.0,
    drain=6.0,
)
QUICK = Plan(
    runs=1,
    warmup=0.3,
    c10=1.0,
    c100=1.0,
    burst=0.6,
    open_rate=200.0,
    open=0.6,
    hold_levels=(100, 300),
    hold_runs=1,
    level_timeout=10.0,
    drain=5.0,
)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --------------------------------------------------------------------------- mock
def mock_command(port: int) -> tuple[list[str], str]:
    """The project's own mock provider (sidecar.mock), paced 1 ms by default."""
    return C.mock_command(port), "sidecar.mock"


def start_mock(workdir: Path, cpus: set[int] | None) -> tuple[C.Proc, int, str, list[str]]:
    port = C.free_port()
    cmd, kind = mock_command(port)
    proc = C.spawn(cmd, workdir / "mock.log", cpus, C.sidecar_env(), cwd=REPO)
    err = C.wait_mock(proc, port)
    if err:
        proc.stop()
        raise SystemExit(err)
    return proc, port, kind, cmd


def new_results_dir(kind: str, out_dir: Path | None) -> tuple[Path, Path, str]:
    """A run's folder (``bench/results/<kind>-<stamp>`` unless given), its work folder
    (made), and the stamp."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # Absolute: contenders run in the work folder and are given paths inside it.
    out_dir = (out_dir or RESULTS / f"{kind}-{stamp}").resolve()
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    return out_dir, work, stamp


# --------------------------------------------------------------------------- loadgen
def loadgen(spec: dict[str, Any], cpus: set[int] | None, timeout: float) -> dict[str, Any]:
    p = subprocess.run(
        [sys.executable, "-m", "bench.loadgen"],
        input=json.dumps(spec) + "\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    if p.returncode != 0:
        return {"ok": 0, "n_errors": 1, "errors": {"loadgen": 1}, "stderr": p.stderr[-2000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def hold(
    spec: dict[str, Any], cpus: set[int] | None, root: int | None, timeout: float
) -> dict[str, Any]:
    """Open slow streams level by level; sample the proxy tree's memory at each level."""
    p = subprocess.Popen(
        [sys.executable, "-m", "bench.loadgen"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    assert p.stdin and p.stdout
    p.stdin.write(json.dumps(spec) + "\n")
    p.stdin.flush()
    levels = []
    deadline = time.monotonic() + timeout
    try:
        for _ in spec["levels"]:
            line = p.stdout.readline()
            if not line:
                break
            rep = json.loads(line)
            time.sleep(0.5)  # let the proxy settle
            if root:
                rep["mem"] = procstat.mem_sample(procstat.tree(root))
            levels.append(rep)
            if time.monotonic() > deadline:
                p.stdin.write("stop\n")
                p.stdin.flush()
                break
            p.stdin.write("next\n")
            p.stdin.flush()
        p.wait(timeout=30)
    except (subprocess.TimeoutExpired, OSError, ValueError) as e:
        levels.append({"error": repr(e)})
        p.kill()
        p.wait()
    return {"levels": levels}


# --------------------------------------------------------------------------- one contender
def measure(
    c: C.Contender,
    run_no: int,
    plan: Plan,
    mock_port: int,
    mock_pid: int,
    workdir: Path,
    proxy_cpus: set[int] | None,
    aux_cpus: set[int] | None,
    do_hold: bool,
) -> dict[str, Any]:
    out: dict[str, Any] = {"contender": c.name, "run": run_no}
    cpus = proxy_cpus if c.workers == 1 else None
    t0 = time.monotonic()
    try:
        running = c.start(mock_port, workdir, cpus)
    except Exception as e:
        out["missing"] = f"could not start: {e!r}"
        return out
    out["pinned_cpus"] = sorted(cpus) if cpus else "unpinned"
    out["config"] = running.config
    out["cmdline"] = running.cmdline
    try:
        err, probe_usage = C.wait_ready(running, c.start_timeout)
        if err:
            out["missing"] = f"did not become ready: {err}"
            return out
        out["startup_s"] = time.monotonic() - t0
        client_usage: Counter[str] = Counter()
        client_usage[probe_usage] += 1  # the readiness probe that succeeded is metered too
        root = running.root_pid if running.root_pid else mock_pid
        out["cpu_of"] = "proxy" if running.root_pid else "mock (direct: no proxy)"
        if running.root_pid:
            out["idle_mem"] = procstat.mem_sample(procstat.tree(root))

        def spec(mode: str, pattern: str, **kw: Any) -> dict[str, Any]:
            s = {
                "port": running.port,
                "mode": mode,
                "headers": running.headers(pattern),
                "body": running.body(pattern),
                "cpu_root": root,
                "drain_timeout": plan.drain,
                "stagger": C.PATTERN_DELAY_MS[pattern] * 22 / 1000 if pattern != "slow" else 0,
            }
            s.update(kw)
            return s

        phases = [
            ("warmup", spec("closed", "paced", concurrency=10, duration=plan.warmup)),
            ("c10_paced", spec("closed", "paced", concurrency=10, duration=plan.c10)),
            ("c100_paced", spec("closed", "paced", concurrency=100, duration=plan.c100)),
            ("c100_paced10", spec("closed", "paced10", concurrency=100, duration=plan.c100)),
            ("c100_burst", spec("closed", "burst", concurrency=100, duration=plan.burst)),
            (
                "open_paced",
                spec("open", "paced", rate=plan.open_rate, duration=plan.open, max_inflight=1000),
            ),
        ]
        out["phases"] = {}
        for name, s in phases:
            budget = float(s["duration"]) + plan.drain + 30
            try:
                r = loadgen(s, aux_cpus, budget)
            except subprocess.TimeoutExpired:
                r = {"ok": 0, "n_errors": 1, "errors": {"loadgen_timeout": 1}}
            out["phases"][name] = r
            for k, v in r.get("usage", {}).items():
                client_usage[k] += v
            log(
                f"  {c.name} run{run_no} {name}: ok={r.get('ok')} err={r.get('n_errors')} "
                f"rps={r.get('rps', 0):.0f} ttft_p50={r.get('ttft_ms', {}).get('p50', float('nan')):.3f}ms "
                f"cpu/req={r.get('cpu_us_per_req', float('nan')):.0f}us"
            )
        if running.root_pid:
            out["mem_after_load"] = procstat.mem_sample(procstat.tree(root))
        out["client_usage"] = dict(client_usage)
        if running.meters:
            out["meter"] = check_meter(running, client_usage)
        if do_hold:
            hs = spec(
                "hold",
                "slow",
                levels=list(plan.hold_levels),
                level_timeout=plan.level_timeout,
                connect_batch=250,
            )
            hs.pop("cpu_root")
            out["hold"] = hold(
                hs,
                aux_cpus,
                running.root_pid or mock_pid,
                timeout=plan.level_timeout * len(plan.hold_levels) + 30,
            )
            log(
                f"  {c.name} run{run_no} hold: "
                + ", ".join(
                    f"{lv.get('established')}/{lv.get('level')} -> {lv.get('mem', {}).get('rss_mb', 0):.1f} MB"
                    for lv in out["hold"]["levels"]
                    if "level" in lv
                )
            )
    finally:
        running.stop()
        out["wall_s"] = time.monotonic() - t0
    return out


def check_meter(running: C.Running, client: Counter[str]) -> dict[str, Any]:
    expected = sum(v for k, v in client.items() if not k.startswith("_"))
    deadline = time.monotonic() + 8
    tally = running.meter_tally() or {}
    while time.monotonic() < deadline and tally.get("rows", 0) < expected:
        time.sleep(0.25)
        tally = running.meter_tally() or {}
    db = tally.get("tally", {})
    correct = sum(
        min(n, db.get(k, 0)) for k, n in client.items() if k != "none" and not k.startswith("_")
    )
    return {
        "requests": expected,
        "rows": tally.get("rows", 0),
        "correct_rows": correct,
        "accuracy": correct / expected if expected else None,
        "db_tally": db,
        "client_tally": {k: v for k, v in client.items() if not k.startswith("_")},
        **{k: v for k, v in tally.items() if k not in ("tally", "rows")},
    }


# --------------------------------------------------------------------------- aggregation
def _g(d: dict[str, Any] | None, *path: str) -> float | None:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d if isinstance(d, (int, float)) else None  # type: ignore[return-value]


def run_metrics(r: dict[str, Any]) -> dict[str, float | None]:
    ph = r.get("phases", {})
    m: dict[str, float | None] = {
        "ttft_p50_c10": _g(ph, "c10_paced", "ttft_ms", "p50"),
        "ttft_p99_c10": _g(ph, "c10_paced", "ttft_ms", "p99"),
        "ttft_p50_c100": _g(ph, "c100_paced", "ttft_ms", "p50"),
        "ttft_p99_c100": _g(ph, "c100_paced", "ttft_ms", "p99"),
        "ttft_p50_c100s": _g(ph, "c100_paced10", "ttft_ms", "p50"),
        "ttft_p99_c100s": _g(ph, "c100_paced10", "ttft_ms", "p99"),
        "rps_c100_paced10": _g(ph, "c100_paced10", "rps"),
        "cpu_us_c100s": _g(ph, "c100_paced10", "cpu_us_per_req"),
        "ttlb_p50_c10": _g(ph, "c10_paced", "ttlb_ms", "p50"),
        "ttlb_p99_c100": _g(ph, "c100_paced", "ttlb_ms", "p99"),
        "rps_c10_paced": _g(ph, "c10_paced", "rps"),
        "rps_c100_paced": _g(ph, "c100_paced", "rps"),
        "rps_c100_burst": _g(ph, "c100_burst", "rps"),
        "rps_open": _g(ph, "open_paced", "rps"),
        "open_ttft_p50": _g(ph, "open_paced", "ttft_ms", "p50"),
        "open_ttft_p99": _g(ph, "open_paced", "ttft_ms", "p99"),
        "open_ttlb_p99": _g(ph, "open_paced", "ttlb_ms", "p99"),
        "cpu_us_c10": _g(ph, "c10_paced", "cpu_us_per_req"),
        "cpu_us_c100": _g(ph, "c100_paced", "cpu_us_per_req"),
        "cpu_us_burst": _g(ph, "c100_burst", "cpu_us_per_req"),
        "cpu_us_open": _g(ph, "open_paced", "cpu_us_per_req"),
        "idle_rss_mb": _g(r, "idle_mem", "rss_mb"),
        "peak_rss_mb": _g(r, "mem_after_load", "hwm_mb"),
        "errors": float(sum(int(p.get("n_errors", 0)) for k, p in ph.items() if k != "warmup"))
        if ph
        else None,
        "meter_accuracy": _g(r, "meter", "accuracy"),
    }
    # CPU-bound capacity: what one core would sustain at this CPU cost per stream (the
    # measured req/s of fast proxies is capped by the mock + load generator on this box)
    for src, dst in (("cpu_us_c100", "cap_paced_per_core"), ("cpu_us_burst", "cap_burst_per_core")):
        v = m.get(src)
        m[dst] = 1e6 / v if v else None
    c10 = ph.get("c10_paced", {})
    ok = c10.get("ok") or 0
    if ok and "proxy" in c10:
        m["cpu_user_us_c10"] = c10["proxy"]["user_s"] * 1e6 / ok
        m["cpu_sys_us_c10"] = c10["proxy"]["sys_s"] * 1e6 / ok
    levels = [lv for lv in r.get("hold", {}).get("levels", []) if "level" in lv and "mem" in lv]
    if len(levels) >= 2:
        a, b = levels[0], levels[-1]
        m["streams_lo"], m["streams_hi"] = float(a["established"]), float(b["established"])
        # a level counts only when (nearly) all its streams were established in time
        ok_a = a["established"] >= 0.9 * a["level"]
        ok_b = b["established"] >= 0.9 * b["level"]
        if ok_a:
            m["rss_lo_mb"], m["pss_lo_mb"] = a["mem"]["rss_mb"], a["mem"]["pss_mb"]
        if ok_b:
            m["rss_hi_mb"], m["pss_hi_mb"] = b["mem"]["rss_mb"], b["mem"]["pss_mb"]
        dn = b["established"] - a["established"]
        if ok_a and ok_b and dn > 0:
            m["kb_per_stream"] = (b["mem"]["rss_mb"] - a["mem"]["rss_mb"]) * 1024 / dn
    return m


def med(xs: list[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return statistics.median(v) if v else None


def aggregate(raw: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    per: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in raw:
        if "missing" not in r:
            per[r["contender"]].append(r)
    by_run: dict[int, dict[str, dict[str, float | None]]] = {}
    for r in raw:
        if "missing" not in r:
            by_run.setdefault(r["run"], {})[r["contender"]] = run_metrics(r)
    agg: dict[str, Any] = {}
    for n in names:
        runs = [run_metrics(r) for r in per[n]]
        if not runs:
            continue
        keys = sorted({k for m in runs for k in m})
        a: dict[str, Any] = {k: med([m.get(k) for m in runs]) for k in keys}
        a["runs"] = len(runs)
        # paired, per-run comparisons (same run = same machine weather), then the median
        ref = "nginx-w2" if n.endswith("-w2") else "nginx"
        pairs: dict[str, list[float | None]] = {}
        for ms in by_run.values():
            me, d, ng, lua = ms.get(n), ms.get("direct"), ms.get(ref), ms.get("nginx-lua")
            if me is None:
                continue

            def add(k: str, v: float | None, pairs: dict[str, list[float | None]] = pairs) -> None:
                pairs.setdefault(k, []).append(v)

            def ratio(x: float | None, y: float | None) -> float | None:
                return x / y if x is not None and y else None

            def diff(x: float | None, y: float | None) -> float | None:
                return x - y if x is not None and y is not None else None

            if d:
                for k in (
                    "ttft_p50_c10",
                    "ttft_p99_c10",
                    "ttft_p50_c100",
                    "ttft_p99_c100",
                    "ttft_p50_c100s",
                    "ttft_p99_c100s",
                ):
                    add("added_" + k, diff(me.get(k), d.get(k)))
                add(
                    "rps_c100_paced_vs_direct",
                    ratio(me.get("rps_c100_paced"), d.get("rps_c100_paced")),
                )
                add(
                    "rps_c100_burst_vs_direct",
                    ratio(me.get("rps_c100_burst"), d.get("rps_c100_burst")),
                )
            if ng:
                for k in (
                    "cpu_us_c10",
                    "cpu_us_c100",
                    "cpu_us_c100s",
                    "cpu_us_burst",
                    "rps_c100_paced",
                    "rps_c100_burst",
                    "cap_paced_per_core",
                    "cap_burst_per_core",
                    "rss_lo_mb",
                    "rss_hi_mb",
                    "peak_rss_mb",
                ):
                    add(f"{k}_vs_nginx", ratio(me.get(k), ng.get(k)))
                if d:
                    add(
                        "added_ttft_p50_c100_minus_nginx",
                        diff(
                            diff(me.get("ttft_p50_c100"), d.get("ttft_p50_c100")),
                            diff(ng.get("ttft_p50_c100"), d.get("ttft_p50_c100")),
                        ),
                    )
                    add(
                        "added_ttft_p50_c100s_minus_nginx",
                        diff(
                            diff(me.get("ttft_p50_c100s"), d.get("ttft_p50_c100s")),
                            diff(ng.get("ttft_p50_c100s"), d.get("ttft_p50_c100s")),
                        ),
                    )
                    add(
                        "added_ttft_p50_c10_minus_nginx",
                        diff(
                            diff(me.get("ttft_p50_c10"), d.get("ttft_p50_c10")),
                            diff(ng.get("ttft_p50_c10"), d.get("ttft_p50_c10")),
                        ),
                    )
            if lua:
                add("cpu_us_c10_vs_nginx_lua", ratio(me.get("cpu_us_c10"), lua.get("cpu_us_c10")))
        for k, v in pairs.items():
            a[k] = med(v)
        a["ratio_reference"] = ref
        agg[n] = a
    return agg


def targets(agg: dict[str, Any]) -> list[dict[str, Any]]:
    s, s2 = agg.get("sidecar"), agg.get("sidecar-w2")
    ll, pk = agg.get("litellm"), agg.get("portkey")
    rows: list[dict[str, Any]] = []

    def row(
        name: str, value: float | None, limit: str, ok: bool | None, fmt: str = "{:.2f}"
    ) -> None:
        rows.append(
            {
                "target": name,
                "value": None if value is None else fmt.format(value),
                "limit": limit,
                "met": ok,
            }
        )

    def le(v: float | None, lim: float) -> bool | None:
        return None if v is None else v <= lim

    def ge(v: float | None, lim: float) -> bool | None:
        return None if v is None else v >= lim

    if s:
        v = s.get("cpu_us_c10_vs_nginx")
        row("CPU/streamed request vs nginx (paced c10)", v, "<= 1.20x", le(v, 1.2), "{:.2f}x")
        v = s.get("cpu_us_c10_vs_nginx_lua")
        row("CPU/streamed request vs nginx+lua", v, "<= 1.00x", le(v, 1.0), "{:.2f}x")
        if ll and s.get("cpu_us_c10") and ll.get("cpu_us_c10"):
            v = ll["cpu_us_c10"] / s["cpu_us_c10"]
            row("LiteLLM CPU / sidecar CPU", v, ">= 30x", ge(v, 30), "{:.1f}x")
        else:
            row("LiteLLM CPU / sidecar CPU", None, ">= 30x", None)
        if pk and s.get("cpu_us_c10") and pk.get("cpu_us_c10"):
            v = pk["cpu_us_c10"] / s["cpu_us_c10"]
            row("Portkey CPU / sidecar CPU", v, ">= 5x", ge(v, 5), "{:.1f}x")
        else:
            row("Portkey CPU / sidecar CPU", None, ">= 5x", None)
        v = s.get("added_ttft_p50_c10_minus_nginx")
        row("added TTFT p50 c10 minus nginx's", v, "<= 0.05 ms", le(v, 0.05), "{:+.3f} ms")
        v = s.get("added_ttft_p50_c10")
        row("added TTFT p50 c10 (absolute)", v, "<= 0.3 ms", le(v, 0.3), "{:.3f} ms")
        v = s.get("added_ttft_p50_c100s_minus_nginx")
        row(
            "added TTFT p50, 100 streams (10 ms pacing) minus nginx's",
            v,
            "<= 0.05 ms",
            le(v, 0.05),
            "{:+.3f} ms",
        )
        v = s.get("added_ttft_p50_c100s")
        row("added TTFT p50, 100 streams (10 ms pacing)", v, "<= 0.3 ms", le(v, 0.3), "{:.3f} ms")
        v = s.get("added_ttft_p99_c100s")
        row("added TTFT p99, 100 streams (10 ms pacing)", v, "<= 2 ms", le(v, 2.0), "{:.3f} ms")
        v = s.get("added_ttft_p50_c100_minus_nginx")
        row(
            "added TTFT p50 c100 1 ms pacing (saturated box) minus nginx's",
            v,
            "<= 0.05 ms",
            le(v, 0.05),
            "{:+.3f} ms",
        )
        v = s.get("added_ttft_p99_c100")
        row(
            "added TTFT p99 c100 1 ms pacing (saturated box)", v, "<= 2 ms", le(v, 2.0), "{:.3f} ms"
        )
        v = s.get("rss_lo_mb")
        row(
            f"RSS at {int(s.get('streams_lo') or 0)} open streams",
            v,
            "<= 40 MB (1k)",
            le(v, 40),
            "{:.1f} MB",
        )
        v = s.get("rss_hi_mb")
        hi = int(s.get("streams_hi") or 0)
        kb = s.get("kb_per_stream")
        if v is not None and kb is not None and 0 < hi < HOLD_TARGET_STREAMS:
            # The fd limit capped the level below the target's 10,000: judge the target
            # on the measured level plus the measured per-stream slope, and say so.
            row(f"RSS at {hi} open streams (the fd limit's cap)", v, "(info)", None, "{:.1f} MB")
            v = v + (HOLD_TARGET_STREAMS - hi) * kb / 1024
            label = f"RSS at 10000 open streams (extrapolated from {hi} at {kb:.1f} KB/stream)"
        else:
            label = f"RSS at {hi} open streams"
        row(label, v, "<= 100 MB (10k)", le(v, 100), "{:.1f} MB")
        v = s.get("kb_per_stream")
        row("RSS per idle stream", v, "<= 6 KB", le(v, 6), "{:.1f} KB")
        v = s.get("meter_accuracy")
        row(
            "metering accuracy",
            None if v is None else v * 100,
            "100%",
            None if v is None else v >= 1.0,
            "{:.2f}%",
        )
    if s2:
        v = s2.get("rps_c100_paced_vs_nginx")
        row("throughput w2 vs nginx w2 (paced c100)", v, ">= 0.85x", ge(v, 0.85), "{:.2f}x")
        v = s2.get("cap_paced_per_core_vs_nginx")
        row(
            "CPU-bound capacity w2 vs nginx w2 (paced, 1/CPU per stream)",
            v,
            ">= 0.85x",
            ge(v, 0.85),
            "{:.2f}x",
        )
        v = s2.get("rps_c100_burst_vs_nginx")
        row("throughput w2 vs nginx w2 (burst c100, info)", v, ">= 0.85x", ge(v, 0.85), "{:.2f}x")
    return rows


# --------------------------------------------------------------------------- machine
def sidecar_commit() -> str:
    """This checkout's short commit ('' when git prints none; OSError without git)."""
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()
        info["mem_gib"] = round(int(mem[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    info["nofile"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
    for name, cmd in (
        ("nginx", ["nginx", "-v"]),
        ("node", ["node", "--version"]),
        (
            "litellm",
            [
                str(C.LITELLM_BIN.parent / "python"),
                "-c",
                "import importlib.metadata as m; print(m.version('litellm'))",
            ],
        ),
    ):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            info[name] = (
                (p.stdout + p.stderr).strip().splitlines()[-1] if p.returncode == 0 else None
            )
        except (OSError, subprocess.TimeoutExpired, IndexError):
            info[name] = None
    pk = C.PORTKEY_ENTRY.parent.parent / "package.json"
    if pk.exists():
        info["portkey"] = json.loads(pk.read_text()).get("version")
        hn = C.PORTKEY_DIR / "node_modules" / "@hono" / "node-server" / "package.json"
        if hn.exists():
            info["hono_node_server"] = json.loads(hn.read_text()).get("version")
    try:
        info["sidecar_commit"] = sidecar_commit()
        info["sidecar_dirty"] = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "sidecar"],
                cwd=REPO,
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
    except OSError:
        pass
    return info


# --------------------------------------------------------------------------- main
def compare(
    names: list[str] | None,
    quick: bool,
    pin: bool,
    runs: int | None,
    out_dir: Path | None,
    no_hold: bool = False,
) -> dict[str, Any]:
    plan = QUICK if quick else FULL
    if runs:
        plan = Plan(**{**plan.__dict__, "runs": runs})
    raise_nofile()
    names = names or (C.DEFAULT_QUICK if quick else C.DEFAULT_FULL)
    unknown = [n for n in names if n not in C.ALL]
    if unknown:
        raise SystemExit(f"unknown contenders {unknown}; known: {sorted(C.ALL)}")
    if "direct" not in names:
        names = ["direct", *names]  # added TTFT needs the floor in the same run
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = (out_dir or RESULTS / (("quick-" if quick else "") + stamp)).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "work"
    work.mkdir(exist_ok=True)

    ncpu = len(os.sched_getaffinity(0))
    proxy_cpus = aux_cpus = None
    if pin and ncpu >= 2:
        allc = sorted(os.sched_getaffinity(0))
        aux_cpus, proxy_cpus = {allc[0]}, set(allc[1:])
    layout = (
        f"proxy on CPU {sorted(proxy_cpus)}, mock + load generator on CPU {sorted(aux_cpus)}; "
        "2-worker contenders unpinned"
        if proxy_cpus
        else "unpinned"
    )

    missing: dict[str, str] = {}
    present = []
    for n in names:
        why = C.ALL[n].available()
        if why:
            missing[n] = why
        else:
            present.append(n)
    log(f"contenders: {present}; missing: {missing}; pinning: {layout}")

    machine_info = machine()  # before the runs: the checkout may move while they go on
    mock, mock_port, mock_kind, mock_cmd = start_mock(work, aux_cpus)
    raw: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for run_no in range(plan.runs):
            order = present[run_no % len(present) :] + present[: run_no % len(present)]
            for n in order:
                c = C.ALL[n]
                do_hold = run_no < plan.hold_runs and not no_hold and c.workers == 1
                log(f"run {run_no + 1}/{plan.runs}: {n}")
                r = measure(
                    c, run_no, plan, mock_port, mock.popen.pid, work, proxy_cpus, aux_cpus, do_hold
                )
                if "missing" in r:
                    log(f"  {n}: {r['missing'][:300]}")
                raw.append(r)
                if mock.popen.poll() is not None:
                    raise SystemExit(f"mock died: {C.tail(mock.log)}")
    finally:
        mock.stop()
    for r in raw:  # a contender that never ran is missing, with the reason
        if "missing" in r and not any(
            x["contender"] == r["contender"] and "missing" not in x for x in raw
        ):
            missing.setdefault(r["contender"], r["missing"][:500])
    ran = [n for n in present if n not in missing]
    agg = aggregate(raw, ran)
    result = {
        "kind": "quick" if quick else "full",
        "started": stamp,
        "duration_s": time.monotonic() - started,
        "command": " ".join(["python -m bench", *sys.argv[1:]])
        if sys.argv[0].endswith("__main__.py")
        else " ".join(sys.argv),
        "machine": machine_info,
        "plan": plan.__dict__,
        "pinning": layout,
        "mock": {"impl": mock_kind, "cmd": mock_cmd, "port": mock_port},
        "contenders": ran,
        "missing": missing,
        "configs": {
            r["contender"]: {
                "config": r.get("config"),
                "cmdline": r.get("cmdline"),
                "pinned_cpus": r.get("pinned_cpus"),
            }
            for r in raw
            if r.get("config")
        },
        "medians": agg,
        "targets": targets(agg),
        "runs": raw,
    }
    from bench import report

    report.write_all(result, out_dir)
    log(f"results in {out_dir} ({result['duration_s']:.0f}s)")
    return result


def regenerate(out_dir: Path) -> dict[str, Any]:
    """Recompute medians, ratios and targets from a results.json and rewrite the outputs."""
    res: dict[str, Any] = json.loads((out_dir / "results.json").read_text())
    res["medians"] = aggregate(res["runs"], res["contenders"])
    res["targets"] = targets(res["medians"])
    from bench import report

    report.write_all(res, out_dir)
    return res
