"""``python -m bench profile``: py-spy the sidecar under the paced load.

Starts the mock and the sidecar (``workers: 1``), drives closed-loop paced load
(c10, events 1 ms apart) and samples the sidecar with ``py-spy record`` (raw
collapsed stacks, active threads only, so idle time is not counted). Writes the
collapsed stacks and a Markdown summary: the functions holding the most samples
by self time and by inclusive time, grouped by module too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import contenders as C
from bench import procstat
from bench.compare import loadgen, log, new_results_dir, raise_nofile, start_mock


def _frame_key(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("/site-packages/", "/lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


def _module(frame: str) -> str:
    _, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    if "/sidecar/" in path:
        return "sidecar/" + path.split("/sidecar/", 1)[1]
    if path.endswith(".so") or ".so." in path:
        return "native:" + path.rsplit("/", 1)[-1]
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0]
    if "/lib/python3" in path:
        return "stdlib:" + path.rsplit("/", 1)[-1]
    return path or frame


# py-spy's idle detection does not work in this container (threads parked on a
# lock and the loop in epoll_pwait are sampled as active), so waits are dropped
# here by their native frames (hence --native).
SYSCALL_LEAVES = ("write (", "writev (", "read (", "recv", "send", "sendmsg (", "pwrite64 (")
IDLE_MARKERS = (
    "epoll_pwait",
    "epoll_wait",
    "PyThread_acquire_lock_timed",
    "pthread_cond_timedwait",
    "pthread_cond_wait",
    "_queue_SimpleQueue_get",
    "sem_timedwait",
    "sem_wait",
)


def summarize(raw: str, top: int = 25) -> dict[str, Any]:
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    mod_self: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    py_user: Counter[str] = Counter()
    total = idle = user_total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        k = int(n)
        frames = [f for f in stack.split(";") if f]
        if frames and frames[0].startswith("thread ("):
            thread = frames.pop(0).split(": ", 1)[-1]
        else:
            thread = "?"
        if not frames:
            continue
        if any(m in f for f in frames[-4:] for m in IDLE_MARKERS):
            idle += k
            continue
        total += k
        threads[thread] += k
        self_c[_frame_key(frames[-1])] += k
        leaf_native = not frames[-1].split(" (", 1)[-1].split(":")[0].endswith(".py")
        if not (leaf_native and any(sc in frames[-1] for sc in SYSCALL_LEAVES)):
            pyleaf = next((f for f in reversed(frames) if ".py:" in f), frames[-1])
            py_user[_frame_key(pyleaf)] += k
            user_total += k
        mod_self[_module(frames[-1])] += k
        for f in {_frame_key(f) for f in frames}:
            incl[f] += k
    return {
        "samples": total,
        "idle_samples": idle,
        "threads": threads.most_common(),
        "self": self_c.most_common(top),
        "inclusive": incl.most_common(top),
        "modules": mod_self.most_common(top),
        "user_samples": user_total,
        "python_leaf_no_syscalls": py_user.most_common(top),
    }


def profile(
    seconds: float,
    out_dir: Path | None,
    workers: int = 1,
    concurrency: int = 10,
    pattern: str = "paced",
    native: bool = True,
    rate: int = 250,
) -> Path:
    extra = ["--native"] if native else []
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        raise SystemExit("py-spy not installed (pip install py-spy)")
    raise_nofile()
    out_dir, work, _ = new_results_dir("profile", out_dir)
    mock, mock_port, _, _ = start_mock(work, None)
    running = None
    try:
        running = C.Sidecar(workers).start(mock_port, work, None)
        err, _ = C.wait_ready(running, 20)
        if err:
            raise SystemExit(f"sidecar not ready: {err}")
        assert running.root_pid
        pids = procstat.tree(running.root_pid)
        target = pids[-1] if workers > 1 else running.root_pid  # one worker of several
        spec = {
            "port": running.port,
            "mode": "closed",
            "concurrency": concurrency,
            "duration": seconds + 2.0,
            "headers": running.headers(pattern),
            "body": running.body(pattern),
            "cpu_root": running.root_pid,
            "stagger": C.PATTERN_DELAY_MS[pattern] * 22 / 1000,
        }
        loadgen({**spec, "duration": 1.0}, None, 30)  # warm-up
        lg = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=C.REPO,
        )
        assert lg.stdin
        lg.stdin.write(json.dumps(spec) + "\n")
        lg.stdin.close()
        time.sleep(1.0)
        raw_path = out_dir / "sidecar-pyspy.collapsed.txt"
        log(f"py-spy record -p {target} for {seconds:.0f}s under {pattern} c{concurrency}")
        subprocess.run(
            [
                pyspy,
                "record",
                "-p",
                str(target),
                "-d",
                str(int(seconds)),
                "-r",
                str(rate),
                "-f",
                "raw",
                "--threads",
                *extra,
                "-o",
                str(raw_path),
            ],
            capture_output=True,
            timeout=seconds + 60,
        )
        assert lg.stdout
        lg_out = lg.stdout.read()
        lg.wait(timeout=seconds + 60)
        result = json.loads(lg_out.strip().splitlines()[-1])
    finally:
        if running:
            running.stop()
        mock.stop()
    summary = summarize(raw_path.read_text())
    md = [
        f"# py-spy profile of the sidecar (workers: {workers}) under {pattern} load, "
        f"closed loop c{concurrency}, {seconds:.0f} s at {rate} Hz\n",
        f"Load during the profile: {result.get('rps', 0):.0f} req/s, TTFT p50 "
        f"{result.get('ttft_ms', {}).get('p50', 0):.3f} ms, CPU "
        f"{result.get('cpu_us_per_req', 0):.0f} µs per streamed request (with py-spy attached; "
        f"user {result.get('proxy', {}).get('user_s', 0):.2f} s / sys "
        f"{result.get('proxy', {}).get('sys_s', 0):.2f} s over the window). "
        f"{summary['samples']} busy samples ({summary['idle_samples']} idle samples - threads "
        "parked on a lock, the loop in epoll_pwait - dropped). Native frames (`write (libc)`, "
        "`read (libc)`) are system calls; their time is the kernel's.\n",
        "Busy samples by thread: " + ", ".join(f"{t}: {n}" for t, n in summary["threads"]) + "\n",
        "## Self time by module\n",
        "| module | samples | share |",
        "|---|---|---|",
    ]
    tot = summary["samples"] or 1
    md += [f"| {m} | {n} | {n / tot:.1%} |" for m, n in summary["modules"]]
    md += ["", "## Self time by function\n", "| function | samples | share |", "|---|---|---|"]
    md += [f"| `{f}` | {n} | {n / tot:.1%} |" for f, n in summary["self"]]
    ut = summary["user_samples"] or 1
    md += [
        "",
        "## Outside system calls, by the innermost Python frame\n",
        "Samples whose leaf is not a read/write system call, charged to the innermost "
        "Python function (C code it calls - orjson, h11's regexes, uvloop - included): "
        "where the user-space CPU goes.\n",
        "| function | samples | share of these |",
        "|---|---|---|",
    ]
    md += [f"| `{f}` | {n} | {n / ut:.1%} |" for f, n in summary["python_leaf_no_syscalls"]]
    md += ["", "## Inclusive time by function\n", "| function | samples | share |", "|---|---|---|"]
    md += [f"| `{f}` | {n} | {n / tot:.1%} |" for f, n in summary["inclusive"]]
    (out_dir / "profile.md").write_text("\n".join(md) + "\n")
    (out_dir / "profile.json").write_text(
        json.dumps({"summary": summary, "load": result}, indent=1)
    )
    log(f"profile in {out_dir}")
    return out_dir
