"""``python -m bench avalanche``: one provider stops answering in time; does the site hold?

The scenario of the avalanche issue: the primary provider answers every request only
after 30 s while 200 clients hit its route. The sidecar runs with two routes, the slow
one (upstream ``slow`` with ``max_concurrent``, ``max_queue`` and ``queue_timeout``)
and a second path to a normal provider (``fast``). Two load processes start at the
same wall-clock instant (bench/avalanche_load.py): the slow-route clients, and a
prober that measures ``/healthz`` and the fast route from a few seconds before the
avalanche to its end. The harness samples the sidecar's memory and CPU meanwhile,
then stops everything and reads the sidecar's meter.

What it reports is what it sees: a build that does not enforce the limits yet sheds
nothing, and its slow requests are simply still pending at the end.
"""

from __future__ import annotations

import compileall
import http.client
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench import contenders as C
from bench import procstat
from bench.compare import log, machine, new_results_dir, raise_nofile, sidecar_commit
from bench.loadgen import pct

SLOW_PATH = "/v1/chat/completions"
FAST_PATH = "/v1/completions"
MODEL = "gpt-4o-mini"
SAMPLE_EVERY_S = 0.25  # sidecar RSS / CPU sampling period
AFTER_S = 3.0  # sampled on after the clients left


@dataclass(frozen=True)
class Plan:
    seconds: float  # the avalanche: slow-route clients running
    clients: int
    first_byte_ms: float  # the slow provider's delay before every response head
    max_concurrent: int
    max_queue: int
    queue_timeout: float
    probe_rate: float  # per second, for each of /healthz and the fast route
    baseline: float  # probing before the avalanche starts
    probe_timeout: float
    backoff: str  # after a 503/429: "retry-after" or seconds
    shutdown_grace: float = 1.0  # the sidecar's, so stopping it is quick


FULL = Plan(
    seconds=40.0, clients=200, first_byte_ms=30_000, max_concurrent=20, max_queue=50,
    queue_timeout=2.0, probe_rate=10.0, baseline=3.0, probe_timeout=10.0,
    backoff="retry-after",
)
QUICK = Plan(
    seconds=4.0, clients=40, first_byte_ms=2_500, max_concurrent=5, max_queue=10,
    queue_timeout=0.5, probe_rate=10.0, baseline=1.0, probe_timeout=5.0,
    backoff="retry-after",
)


def mock_command(port: int, *extra: str) -> list[str]:
    """The project's mock, a burst stream (20 deltas + usage) once it answers."""
    return [sys.executable, "-m", "sidecar.mock", "--port", str(port), "--chunks", "20",
            "--delay-ms", "0", "--always-usage", *extra]


def chat_body() -> str:
    return C.request_body(MODEL)


def completions_body() -> str:
    return json.dumps(
        {"model": MODEL, "prompt": C.PROMPT, "stream": True,
         "stream_options": {"include_usage": True}},
        separators=(",", ":"),
    )


def sidecar_config(plan: Plan, port: int, slow_port: int, fast_port: int, db: Path) -> str:
    return (
        "# avalanche: a slow provider (first byte after "
        f"{plan.first_byte_ms:g} ms) behind {SLOW_PATH},\n"
        f"# a normal one behind {FAST_PATH}; the limits on `slow` are what is tested\n"
        f"listen: 127.0.0.1:{port}\n"
        "workers: 1\n"
        "upstreams:\n"
        "  slow:\n"
        f"    url: http://127.0.0.1:{slow_port}\n"
        f"    max_concurrent: {plan.max_concurrent}\n"
        f"    max_queue: {plan.max_queue}\n"
        f"    queue_timeout: {plan.queue_timeout:g}\n"
        "  fast:\n"
        f"    url: http://127.0.0.1:{fast_port}\n"
        "routes:\n"
        f"  - path: {SLOW_PATH}\n"
        "    upstreams:\n"
        "      - target: slow\n"
        f"  - path: {FAST_PATH}\n"
        "    upstreams:\n"
        "      - target: fast\n"
        "timeouts:\n"
        f"  shutdown_grace: {plan.shutdown_grace:g}  # requests still waiting are cut at the end\n"
        "meter:\n"
        f"  db: {db}\n"
    )


def _request(port: int, method: str, path: str, body: str | None, timeout: float) -> int:
    """One request on its own connection, the whole body read; its status (0: failed)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body,
                     headers={"content-type": "application/json"} if body else {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        conn.close()


def wait_sidecar(proc: C.Proc, port: int, timeout: float = 30.0) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            return f"sidecar exited with {proc.popen.returncode}: {C.tail(proc.log)}"
        if (_request(port, "GET", "/healthz", None, 2) == 200
                and _request(port, "POST", FAST_PATH, completions_body(), 5) == 200):
            return None
        time.sleep(0.2)
    return f"sidecar not ready after {timeout:.0f} s: {C.tail(proc.log)}"


def meter_rows(db: Path) -> list[list[Any]]:
    """(route, outcome, status, rows) from the sidecar's meter table."""
    if not db.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            rows = con.execute(
                "SELECT route, outcome, status, COUNT(*) FROM requests "
                "GROUP BY 1, 2, 3 ORDER BY 1, 4 DESC"
            ).fetchall()
        finally:
            con.close()
    except sqlite3.Error as e:
        return [["?", f"sqlite: {e}", 0, 0]]
    return [list(r) for r in rows]


# --------------------------------------------------------------------------- the run
class Driver:
    """A load process (bench/avalanche_load.py); its result goes to a file, so a large
    one never blocks on a pipe while the harness samples."""

    def __init__(self, spec: dict[str, Any], work: Path) -> None:
        self.out = work / f"load-{spec['role']}.json"
        self.err = work / f"load-{spec['role']}.log"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "bench.avalanche_load"],
                stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=C.REPO,
                env={**os.environ, **C.sidecar_env()}, start_new_session=True,
            )
        assert self.popen.stdin is not None
        self.popen.stdin.write((json.dumps(spec) + "\n").encode())
        self.popen.stdin.close()

    def kill(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(timeout=5)

    def result(self) -> dict[str, Any]:
        if self.popen.returncode != 0:
            return {"error": f"exit {self.popen.returncode}: {C.tail(self.err)}"}
        try:
            return json.loads(self.out.read_text().strip().splitlines()[-1])  # type: ignore[no-any-return]
        except (OSError, ValueError, IndexError) as e:
            return {"error": f"no result ({e!r}): {C.tail(self.err)}"}


def sample_while(drivers: list[Driver], root: int, start_at: float, deadline: float
                 ) -> tuple[list[list[float]], list[list[float]]]:
    """Until every driver has exited (or ``deadline``, when they are killed): the
    sidecar tree's [t, rss_mb, hwm_mb] and [t, cpu_s] every SAMPLE_EVERY_S."""
    mem: list[list[float]] = []
    cpu: list[list[float]] = []
    pids = procstat.tree(root)
    cpu0 = procstat.cpu_sample(pids)
    last_tree = time.monotonic()
    while any(d.popen.poll() is None for d in drivers):
        if time.time() > deadline:
            for d in drivers:
                d.kill()
            break
        if time.monotonic() - last_tree > 2.0:
            pids, last_tree = procstat.tree(root), time.monotonic()
        t = time.time() - start_at
        m = procstat.mem_sample(pids)
        mem.append([round(t, 3), m["rss_mb"], m["hwm_mb"]])
        cpu.append([round(t, 3), procstat.cpu_sample(pids).minus(cpu0)["cpu_s"]])
        time.sleep(SAMPLE_EVERY_S)
    return mem, cpu


def avalanche(quick: bool, out_dir: Path | None, command: str, **overrides: Any) -> Path:
    plan = QUICK if quick else FULL
    plan = replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    raise_nofile()
    out_dir, work, stamp = new_results_dir("avalanche-quick" if quick else "avalanche", out_dir)
    procs: list[C.Proc] = []
    drivers: list[Driver] = []
    res: dict[str, Any] = {"command": command, "started": stamp, "plan": asdict(plan),
                           "machine": machine()}
    try:
        res["sidecar"] = sidecar_commit() or "?"
    except OSError:
        res["sidecar"] = "?"
    t_begin = time.monotonic()
    try:
        slow_port, fast_port, port = C.free_port(), C.free_port(), C.free_port()
        slow_cmd = mock_command(slow_port, "--first-byte-ms", f"{plan.first_byte_ms:g}")
        fast_cmd = mock_command(fast_port)
        for name, mcmd, mport, hdrs in (
            ("slow", slow_cmd, slow_port, {"x-mock-first-byte-ms": "0"}),
            ("fast", fast_cmd, fast_port, {}),
        ):
            proc = C.spawn(mcmd, work / f"mock-{name}.log", None, C.sidecar_env(), cwd=C.REPO)
            procs.append(proc)
            err = C.wait_mock(proc, mport, headers=hdrs)
            if err:
                raise SystemExit(f"{name} mock: {err}")
        compileall.compile_dir(str(C.REPO / "sidecar"), quiet=1)  # as a pip install would
        db = work / "meter.db"
        cfg = sidecar_config(plan, port, slow_port, fast_port, db)
        cfg_path = work / "sidecar.yaml"
        cfg_path.write_text(cfg)
        cmd = [sys.executable, "-m", "sidecar", "run", "-c", str(cfg_path),
               "--log-level", "warning"]
        sidecar = C.spawn(cmd, work / "sidecar.log", None, C.sidecar_env(), cwd=work)
        procs.append(sidecar)
        res["config"] = {"sidecar.yaml": cfg, "sidecar": " ".join(cmd),
                         "mock slow": " ".join(slow_cmd), "mock fast": " ".join(fast_cmd)}
        err = wait_sidecar(sidecar, port)
        if err:
            raise SystemExit(err)
        root = sidecar.popen.pid
        res["rss_idle_mb"] = procstat.mem_sample(procstat.tree(root))["rss_mb"]

        start_at = time.time() + 1.0 + plan.baseline  # both load processes up by then
        common = {"port": port, "start_at": start_at, "seconds": plan.seconds}
        backoff: str | float = plan.backoff if plan.backoff == "retry-after" else float(
            plan.backoff)
        drivers.append(Driver({**common, "role": "probe", "rate": plan.probe_rate,
                               "baseline": plan.baseline, "timeout": plan.probe_timeout,
                               "fast_path": FAST_PATH, "fast_body": completions_body()}, work))
        drivers.append(Driver({**common, "role": "slow", "clients": plan.clients,
                               "path": SLOW_PATH, "body": chat_body(), "backoff": backoff},
                              work))
        log(f"avalanche: {plan.clients} clients on {SLOW_PATH} for {plan.seconds:g} s "
            f"(provider's first byte after {plan.first_byte_ms / 1000:g} s); probing "
            f"/healthz and {FAST_PATH} at {plan.probe_rate:g}/s each")
        deadline = start_at + plan.seconds + plan.probe_timeout + 30
        mem, cpu = sample_while(drivers, root, start_at, deadline)
        res["rss_samples"], res["cpu_samples"] = mem, cpu
        # The clients' leaving is work too (a row per cut request; the first token
        # estimate loads the tokenizer): sample on for a while.
        after = []
        for _ in range(int(AFTER_S / SAMPLE_EVERY_S)):
            time.sleep(SAMPLE_EVERY_S)
            after.append(procstat.mem_sample(procstat.tree(root)))
        res["rss_after_mb"] = after[-1]["rss_mb"]
        res["hwm_end_mb"] = after[-1]["hwm_mb"]
        res["probe"], res["slow"] = drivers[0].result(), drivers[1].result()
        log("avalanche: load done; stopping the sidecar and the mocks")
        sidecar.stop(grace=plan.shutdown_grace + 15)
        res["sidecar_exit"] = sidecar.popen.returncode
        res["meter"] = meter_rows(db)
    finally:
        for d in drivers:
            d.kill()
        for p in reversed(procs):
            p.stop(grace=5)
    res["wall_s"] = time.monotonic() - t_begin
    # The raw events stay in the work folder; results.json carries the figures.
    res["summary"] = summarize(res, plan)
    slim = {k: v for k, v in res.items() if k not in ("probe", "slow")}
    slim["slow_pending"] = res["slow"].get("pending")
    slim["errors"] = {k: res[k]["error"] for k in ("probe", "slow") if "error" in res[k]}
    (out_dir / "results.json").write_text(json.dumps(slim, indent=2) + "\n")
    (out_dir / "results.md").write_text(report(slim))
    return out_dir


# --------------------------------------------------------------------------- figures
def _ms(d: dict[str, float], key: str) -> float | None:
    return round(d[key], 3) if key in d else None


def _lat(values: list[float]) -> dict[str, Any]:
    p = pct(values)
    return {"n": len(values), "p50_ms": _ms(p, "p50"), "p99_ms": _ms(p, "p99"),
            "max_ms": _ms(p, "max")}


def summarize(res: dict[str, Any], plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {}
    probes = res.get("probe", {}).get("events", [])
    for name in ("healthz", "fast"):
        for phase, lo, hi in (("before", -plan.baseline, 0.0), ("during", 0.0, plan.seconds)):
            ev = [e for e in probes if e[1] == name and lo <= e[0] < hi]
            ok = [e for e in ev if e[2] == 200]
            errors = Counter(str(e[2]) for e in ev if e[2] != 200)
            out[f"{name}_{phase}"] = {
                "sent": len(ev), "ok": len(ok), "errors": sum(errors.values()),
                "error_kinds": dict(errors), **_lat([e[4] for e in ok]),
                "ttfb": _lat([e[3] for e in ok]),
                "start_lag": _lat([e[5] for e in ev if e[5] is not None]),
            }
    slow = res.get("slow", {})
    events = slow.get("events", [])
    pending = slow.get("pending", {})
    status = Counter(e[1] for e in events if isinstance(e[1], int))
    errors = Counter(e[1] for e in events if not isinstance(e[1], int))
    sheds = [e[2] for e in events if e[1] == 503]
    half = plan.queue_timeout / 2
    out["slow"] = {
        "clients": plan.clients,
        "requests": len(events) + sum(pending.values()),
        "served": status.get(200, 0),
        "shed_503": status.get(503, 0),
        "rate_limited_429": status.get(429, 0),
        "other_status": {str(k): v for k, v in status.items() if k not in (200, 429, 503)},
        "errors": dict(errors),
        "pending_at_end": sum(pending.values()),
        "pending_detail": pending,
        "connections": slow.get("connections"),
        "served_head": _lat([e[2] for e in events if e[1] == 200]),
        "shed": {**_lat(sheds), "queue_timeout_s": plan.queue_timeout,
                 f"under_{half:g}s": sum(1 for s in sheds if s < half),
                 f"from_{half:g}s": sum(1 for s in sheds if s >= half)},
        "retry_after": dict(Counter(str(e[3]) for e in events if e[1] in (429, 503))),
    }
    mem = res.get("rss_samples", [])
    before = [m for m in mem if m[0] < 0]
    during = [m for m in mem if 0 <= m[0] <= plan.seconds]
    out["rss_mb"] = {
        "idle": res.get("rss_idle_mb"),
        "start": (before[-1] if before else mem[0] if mem else [None, None])[1],
        "max": max((m[1] for m in during), default=None),
        "end": during[-1][1] if during else None,
        "after_clients_left": res.get("rss_after_mb"),
        "hwm_during": mem[-1][2] if mem else None,
        "hwm_end": res.get("hwm_end_mb"),
    }
    cpu = res.get("cpu_samples", [])
    c0 = [c for c in cpu if c[0] < 0]
    c1 = [c for c in cpu if c[0] <= plan.seconds]
    if c0 and c1:
        span = c1[-1][0] - c0[-1][0]
        used = c1[-1][1] - c0[-1][1]
        out["sidecar_cpu"] = {"cpu_s": round(used, 3), "window_s": round(span, 2),
                              "share_of_one_core": round(used / span, 3) if span > 0 else None}
    out["timeline"] = timeline(res, plan)
    return out


def timeline(res: dict[str, Any], plan: Plan) -> list[dict[str, Any]]:
    width = max(1.0, round(plan.seconds / 10))
    probes = res.get("probe", {}).get("events", [])
    events = res.get("slow", {}).get("events", [])
    mem = res.get("rss_samples", [])
    rows = []
    # the baseline as one interval, then the avalanche in steps from its start
    edges = [-plan.baseline] if plan.baseline > 0 else []
    k = 0
    while k * width < plan.seconds:
        edges.append(k * width)
        k += 1
    for t, hi in zip(edges, [*edges[1:], plan.seconds], strict=True):
        row: dict[str, Any] = {"from_s": round(t, 2), "to_s": round(hi, 2)}
        for name in ("healthz", "fast"):
            ev = [e for e in probes if e[1] == name and t <= e[0] < hi]
            ok = [e[4] for e in ev if e[2] == 200]
            row[f"{name}_p99_ms"] = _ms(pct(ok), "p99")
            row[f"{name}_errors"] = len(ev) - len(ok)
        # slow requests by the time their answer came (sent + head latency)
        done = [e for e in events if e[2] is not None and t <= e[0] + e[2] < hi]
        row["slow_200"] = sum(1 for e in done if e[1] == 200)
        row["slow_503"] = sum(1 for e in done if e[1] == 503)
        row["slow_other"] = len(done) - row["slow_200"] - row["slow_503"]
        row["rss_mb"] = max((m[1] for m in mem if t <= m[0] < hi), default=None)
        rows.append(row)
    return rows


def _f(v: Any, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def report(res: dict[str, Any]) -> str:
    p = res["plan"]
    s = res["summary"]
    sl = s["slow"]
    lag = max((s[k]["start_lag"]["max_ms"] or 0 for k in s if k.startswith(("healthz_", "fast_"))),
              default=None)
    wait = ("its retry-after (1 s without)" if p["backoff"] == "retry-after"
            else f"{p['backoff']} s")
    md = [
        f"# Avalanche: a {p['first_byte_ms'] / 1000:g} s provider, {p['clients']} clients "
        "on its route\n",
        f"- command: `{res['command']}`; sidecar {res['sidecar']}; {res['started']}; "
        f"{res['machine'].get('cpus')} CPUs; wall {res.get('wall_s', 0):.0f} s",
        f"- slow route `{SLOW_PATH}` -> upstream `slow` (mock, first byte after "
        f"{p['first_byte_ms']:g} ms): `max_concurrent: {p['max_concurrent']}`, "
        f"`max_queue: {p['max_queue']}`, `queue_timeout: {p['queue_timeout']:g}s`",
        f"- {p['clients']} closed-loop keep-alive clients on it for {p['seconds']:g} s; after "
        f"a 503/429 a client waits {wait}",
        f"- prober: `GET /healthz` and a streamed `{FAST_PATH}` (upstream `fast`, a normal "
        f"mock) at {p['probe_rate']:g}/s each on a fixed schedule, a fresh connection per "
        f"probe, latency from connect to the end of the answer, from {p['baseline']:g} s "
        f"before the avalanche; timeout {p['probe_timeout']:g} s; the prober's own start "
        f"lag: max {_f(lag, '{:.2f}')} ms",
    ]
    for k, v in (res.get("errors") or {}).items():
        md.append(f"- **{k} load failed**: {v[:300]}")
    if not sl["shed_503"] and not sl["rate_limited_429"]:
        md.append("- **no 503 and no 429 from the sidecar**: this build does not enforce the "
                  "limits on `slow` (or they were never reached)")
    md += [
        "\n## The rest of the site\n",
        "| probe | phase | sent | ok | errors | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, label in (("healthz", "/healthz"), ("fast", f"{FAST_PATH} (fast route)")):
        for phase in ("before", "during"):
            r = s[f"{name}_{phase}"]
            kinds = ", ".join(f"{k}: {v}" for k, v in r["error_kinds"].items())
            md.append(f"| {label} | {phase} | {r['sent']} | {r['ok']} | {r['errors']}"
                      f"{f' ({kinds})' if kinds else ''} | {_f(r['p50_ms'], '{:.2f}')} | "
                      f"{_f(r['p99_ms'], '{:.2f}')} | {_f(r['max_ms'], '{:.2f}')} |")
    other = ", ".join(f"{k}: {v}" for k, v in {**sl["other_status"], **sl["errors"]}.items())
    sh = sl["shed"]
    splits = [k for k in sh if k.startswith(("under_", "from_"))]
    md += [
        f"\n## The slow route ({sl['clients']} clients)\n",
        "| requests | served (200) | shed (503) | 429 | other | still pending at the end |",
        "|---|---|---|---|---|---|",
        f"| {sl['requests']} | {sl['served']} | {sl['shed_503']} | {sl['rate_limited_429']} | "
        f"{other or 0} | {sl['pending_at_end']} |",
        "",
        f"- sheds came back after p50 {_f(sh['p50_ms'], '{:.1f}')} ms, p99 "
        f"{_f(sh['p99_ms'], '{:.1f}')} ms, max {_f(sh['max_ms'], '{:.1f}')} ms "
        f"(queue_timeout {sh['queue_timeout_s'] * 1000:g} ms); "
        + ", ".join(f"{k.replace('_', ' ')}: {sh[k]}" for k in splits),
        f"- served: response head after p50 {_f(sl['served_head']['p50_ms'], '{:.0f}')} ms, "
        f"max {_f(sl['served_head']['max_ms'], '{:.0f}')} ms; retry-after values: "
        f"{sl['retry_after'] or '-'}; client connections opened: {sl['connections']}",
    ]
    rss = s["rss_mb"]
    cpu = s.get("sidecar_cpu", {})
    md += [
        "\n## The sidecar\n",
        "| RSS idle | start | max | end | 3 s after the clients left | VmHWM at the end | "
        "CPU s in the window (share of a core) |",
        "|---|---|---|---|---|---|---|",
        f"| {_f(rss['idle'])} MB | {_f(rss['start'])} MB | {_f(rss['max'])} MB | "
        f"{_f(rss['end'])} MB | {_f(rss['after_clients_left'])} MB | {_f(rss['hwm_end'])} MB | "
        f"{_f(cpu.get('cpu_s'), '{:.2f}')} ({_f(cpu.get('share_of_one_core'), '{:.0%}')}) |",
        "",
        "Meter rows (the sidecar's own view; requests still waiting at the end are cut "
        "when the clients leave):\n",
        "| route | outcome | status | rows |",
        "|---|---|---|---|",
    ]
    md += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in res.get("meter", [])]
    md += [
        "\n## Timeline\n",
        "Slow-route answers counted when they came back; p99 over the probes scheduled "
        "in the interval.\n",
        "| t (s) | /healthz p99 ms | fast p99 ms | fast errors | slow 200 | slow 503 | "
        "slow other | RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in s["timeline"]:
        md.append(
            f"| {r['from_s']:g}..{r['to_s']:g} | {_f(r['healthz_p99_ms'], '{:.2f}')} | "
            f"{_f(r['fast_p99_ms'], '{:.2f}')} | {r['fast_errors']} | {r['slow_200']} | "
            f"{r['slow_503']} | {r['slow_other']} | {_f(r['rss_mb'])} |"
        )
    md.append("\n## Configuration\n")
    for name, text in res.get("config", {}).items():
        md += [f"`{name}`:\n", "```" + ("yaml" if name.endswith(".yaml") else ""), text.rstrip(),
               "```\n"]
    return "\n".join(md) + "\n"
