"""``python -m bench instructions``: user-space instructions per streamed request (callgrind).

CPU seconds read from /proc are the figure the issue's targets use, but on these shared
2-core VMs they move with the box: the same sidecar measured 1.69x nginx on one day and
2.04x on another, and a 3% change cannot be seen through that. Valgrind's callgrind
counts the instructions a process executes in user space instead, which for the same
binaries, inputs and environment is the same count whatever else the machine is doing.
It does not count the kernel's side of system calls; that part costs the sidecar, nginx
and the uvloop floor about the same (the user/sys split in ``compare``'s per-run detail),
so the user-space count is where the proxies differ, and where the sidecar's work is.

Method, per contender: start it under ``valgrind --tool=callgrind --instr-atstart=no``
(so start-up runs uninstrumented, a few times slower rather than ~50x), warm it up with
real streams, switch instrumentation on with ``callgrind_control -i on`` for every
process of its tree, run a closed-loop load, switch it off, stop the contender (callgrind
writes its counts at exit) and divide the summed ``Ir`` (instructions executed) by the
requests completed. The load is the *paced10* pattern (events 10 ms apart) at low
concurrency so that even a process slowed ~50x by instrumentation still reads every
event on its own, as it does at full speed with 1 ms pacing: the count then stands for
a paced stream of 22 reads. Counts include what happens between requests (timers, the
meter's writer thread); warm-up and shutdown are outside the window.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bench import contenders as C
from bench import procstat
from bench.compare import (
    loadgen,
    log,
    new_results_dir,
    raise_nofile,
    sidecar_commit,
    start_mock,
)

# Contenders that run under valgrind here. LiteLLM and Portkey are left out: they cost
# tens of times more than the sidecar (compare measures that), and V8's JIT under
# valgrind measures valgrind more than Portkey.
SUPPORTED = ("sidecar", "sidecar-ref", "sidecar-2up", "sidecar-limited",
             "sidecar-limited-redis", "sidecar-nojournal",
             "sidecar-observed", "sidecar-metrics-off", "sidecar-translated", "uvloop-floor",
             "nginx", "nginx-lua")
DEFAULT = ("sidecar", "uvloop-floor", "nginx", "nginx-lua")
# Python start-up and imports run uninstrumented but still several times slower.
READY_TIMEOUT_S = 120.0
# Shutdown under valgrind (the sidecar drains and closes its meter) before a SIGKILL
# would lose the counts, which callgrind writes only at exit.
STOP_GRACE_S = 120.0
# callgrind_control finds the process by pid and waits for it to take the command.
CONTROL_TIMEOUT_S = 60.0


class CallgrindError(RuntimeError):
    pass


def _control(pids: list[int], instr: str) -> None:
    for pid in pids:
        p = subprocess.run(
            ["callgrind_control", "-i", instr, str(pid)],
            capture_output=True,
            text=True,
            timeout=CONTROL_TIMEOUT_S,
        )
        # It reports a process it cannot find on stdout, with exit status 0.
        if p.returncode != 0 or "Error" in p.stdout or "Error" in p.stderr:
            raise CallgrindError(f"callgrind_control -i {instr} {pid}: {p.stdout}{p.stderr}")


def total_ir(files: list[Path]) -> int:
    """Instructions executed, summed over callgrind output files (their ``totals:``
    line, or ``summary:`` where a file has no totals)."""
    total = 0
    for f in files:
        found = None
        for line in f.read_text(errors="replace").splitlines():
            if line.startswith(("totals:", "summary:")):
                parts = line.split()
                if len(parts) > 1 and parts[1].isdigit():
                    found = int(parts[1])
                    if line.startswith("totals:"):
                        break
        if found is None:
            raise CallgrindError(f"no instruction count in {f}")
        total += found
    return total


# Functions listed per contender in results.md, by their own (self) instructions.
TOP_FUNCTIONS = 15
_ANNOTATE_LINE = re.compile(r"^\s*([\d,]+) \(\s*([\d.]+)%\)\s+(\S.*)$")


def top_functions(files: list[Path], n: int = TOP_FUNCTIONS) -> list[tuple[int, float, str]]:
    """The ``n`` C functions with the most self instructions over ``files``:
    (instructions, percent of all, "file:function [object]" shortened)."""
    p = subprocess.run(
        ["callgrind_annotate", "--inclusive=no", "--threshold=100", *map(str, files)],
        capture_output=True, text=True, timeout=CONTROL_TIMEOUT_S,
    )
    if p.returncode != 0:
        raise CallgrindError(f"callgrind_annotate: {p.stderr.strip()[-300:]}")
    out: list[tuple[int, float, str]] = []
    for line in p.stdout.splitlines():
        m = _ANNOTATE_LINE.match(line)
        if m is None or "PROGRAM TOTALS" in line:
            continue
        # Build directories say nothing: keep the source file's name and the object's.
        name = re.sub(r"^\S*/([^/\s]+:)", r"\1", m.group(3))
        name = re.sub(r"\[\S*/([^/\]]+)\]$", r"[\1]", name)
        out.append((int(m.group(1).replace(",", "")), float(m.group(2)), name))
        if len(out) == n:
            break
    return out


def measure(
    contender: C.Contender, mock_port: int, workdir: Path, seconds: float, concurrency: int
) -> dict[str, Any]:
    name = contender.name
    # Writable by all (sticky, as /tmp): nginx's workers run as nobody and write their own.
    cg_dir = workdir / "callgrind"
    cg_dir.mkdir(exist_ok=True)
    cg_dir.chmod(0o1777)
    out_pattern = cg_dir / f"{name}.%p"
    for old in cg_dir.glob(f"{name}.*"):
        old.unlink()
    prefix = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out_pattern}",
    ]
    if isinstance(contender, C.Nginx):
        # callgrind_control reaches only the process valgrind started, not one it forked
        # (nginx's worker): one process without a master does the worker's work here.
        contender = C.Nginx(contender.workers, lua=contender.lua, single_process=True)
    with C.command_prefix(prefix):
        running = contender.start(mock_port, workdir, None)
    try:
        err, _ = C.wait_ready(running, READY_TIMEOUT_S)
        if err:
            return {"contender": name, "error": f"not ready under valgrind: {err}"}
        spec: dict[str, Any] = {
            "port": running.port,
            "mode": "closed",
            "concurrency": concurrency,
            "headers": running.headers("paced10"),
            "body": running.body("paced10"),
            "stagger": C.PATTERN_DELAY_MS["paced10"] * 22 / 1000,
        }
        loadgen({**spec, "duration": 2.0}, None, 120)  # warm-up, uninstrumented
        assert running.root_pid is not None
        pids = procstat.tree(running.root_pid)
        _control(pids, "on")
        result = loadgen({**spec, "duration": seconds}, None, seconds * 20 + 120)
        _control(pids, "off")
    finally:
        running.stop(grace=STOP_GRACE_S)
    files = sorted(cg_dir.glob(f"{name}.*"))
    if not files:
        return {"contender": name, "error": "callgrind wrote no output"}
    ok = int(result.get("ok", 0))
    ir = total_ir(files)
    top = top_functions(files)
    return {
        "contender": name,
        "requests": ok,
        "errors": result.get("n_errors", 0),
        "instructions": ir,
        "instructions_per_request": ir / ok if ok else None,
        "processes": len(files),
        # (instructions per request, share, function): where to look first
        "top_self": [(i / ok if ok else 0, pct, fn) for i, pct, fn in top],
        "config": running.config,
        "cmdline": prefix + running.cmdline,
    }


def report(res: dict[str, Any]) -> str:
    rows = res["results"]
    ref = next((r for r in rows if r["contender"] == "nginx" and r.get("requests")), None)
    base = ref["instructions_per_request"] if ref else None
    # The sidecar's own variants (sidecar-ref, -2up, -limited, -nojournal, -observed,
    # -metrics-off) read against the plain one.
    own = next((r for r in rows if r["contender"] == "sidecar" and r.get("requests")), None)
    own_base = own["instructions_per_request"] if own else None
    md = [
        "# User-space instructions per streamed request (callgrind)\n",
        f"- command: `{res['command']}`; sidecar {res['sidecar']}; {res['started']}",
        f"- load: closed loop c{res['concurrency']} for {res['seconds']:.0f} s, paced10 "
        "pattern (20 content events + usage + [DONE], 10 ms apart), after a 2 s "
        "uninstrumented warm-up",
        "- instructions: callgrind's Ir over every process of the contender's tree while "
        "instrumentation was on; kernel work (system calls) is not counted\n",
        "| contender | requests | errors | instructions per request | ratio to nginx "
        "| vs sidecar |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['contender']} | - | - | {r['error'][:120]} | - | - |")
            continue
        per = r["instructions_per_request"]
        ratio = f"{per / base:.2f}x" if base and per else "-"
        vs = f"{per / own_base - 1:+.1%}" if own_base and per else "-"
        per_s = f"{per:,.0f}" if per else "-"
        md.append(f"| {r['contender']} | {r['requests']} | {r['errors']} | {per_s} | {ratio} "
                  f"| {vs} |")
    for r in rows:
        if r.get("top_self"):
            md += [
                f"\n## {r['contender']}: C functions with the most self instructions\n",
                "Python code shows up as the interpreter (`_PyEval_EvalFrameDefault`); a "
                "C function that should not be there per request (exception set-up, a "
                "`__getattr__` hook, an adapter lookup) is what this list is for.\n",
                "| instructions per request | share | function [object] |",
                "|---|---|---|",
            ]
            md += [f"| {per:,.0f} | {pct:.1f}% | `{fn}` |" for per, pct, fn in r["top_self"]]
    return "\n".join(md) + "\n"


def instructions(
    names: list[str] | None, seconds: float, concurrency: int, out_dir: Path | None,
    command: str,
) -> Path:
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not installed (apt-get install valgrind)")
    names = list(names or DEFAULT)
    unknown = [n for n in names if n not in SUPPORTED]
    if unknown:
        raise SystemExit(f"not measured under valgrind: {unknown}; choose from {SUPPORTED}")
    raise_nofile()
    out_dir, work, stamp = new_results_dir("instructions", out_dir)
    mock, mock_port, _, _ = start_mock(work, None)
    rows: list[dict[str, Any]] = []
    try:
        for name in names:
            contender = C.ALL[name]
            missing = contender.available()
            if missing:
                rows.append({"contender": name, "error": f"missing: {missing}"})
                continue
            log(f"{name}: under callgrind, c{concurrency} for {seconds:.0f} s")
            try:
                row = measure(contender, mock_port, work, seconds, concurrency)
            except CallgrindError as exc:  # this contender's count is lost, not the run
                row = {"contender": name, "error": str(exc)}
            log(f"{name}: {row.get('instructions_per_request') or row.get('error')}")
            rows.append(row)
    finally:
        mock.stop()
    try:
        commit = sidecar_commit() or "?"
    except OSError:
        commit = "?"
    res = {
        "command": command,
        "sidecar": commit,
        "started": stamp,
        "seconds": seconds,
        "concurrency": concurrency,
        "results": rows,
    }
    (out_dir / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (out_dir / "results.md").write_text(report(res))
    return out_dir
