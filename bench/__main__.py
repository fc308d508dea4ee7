"""``python -m bench compare|setup|profile|instructions|avalanche|soak|meter-summary|report``.

See bench/README.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench")
    sub = ap.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compare", help="run the comparison and write bench/results/")
    c.add_argument(
        "--quick", action="store_true", help="seconds: direct + sidecar (+ nginx), 1 run"
    )
    c.add_argument(
        "--contenders",
        nargs="+",
        metavar="NAME",
        help="subset, e.g. direct sidecar nginx nginx-lua litellm portkey sidecar-w2 nginx-w2 "
        "nginx-lua-w2 (direct is always added)",
    )
    c.add_argument(
        "--pin",
        action="store_true",
        help="taskset: 1-worker proxy on its own CPU, mock + load generator on another",
    )
    c.add_argument("--runs", type=int, default=None, help="interleaved runs (default 3; quick 1)")
    c.add_argument("--no-hold", action="store_true", help="skip the open-streams RSS phase")
    c.add_argument(
        "--out", type=Path, default=None, help="result folder (default bench/results/<stamp>)"
    )

    s = sub.add_parser("setup", help="install the peers (nginx + lua, LiteLLM venv, Portkey)")
    s.add_argument("--nginx", action="store_true")
    s.add_argument("--litellm", action="store_true")
    s.add_argument("--portkey", action="store_true")
    s.add_argument("--bench-deps", action="store_true", help="matplotlib + py-spy into this venv")
    s.add_argument("--dry-run", action="store_true", help="print the commands only")

    pr = sub.add_parser("profile", help="py-spy the sidecar under the paced load")
    pr.add_argument("--seconds", type=float, default=10.0)
    pr.add_argument("--workers", type=int, default=1)
    pr.add_argument("--concurrency", type=int, default=10)
    # At 250 Hz a 10 s profile has a few hundred busy samples; a finer comparison of
    # small functions wants a higher rate over longer (py-spy itself then costs more).
    pr.add_argument("--rate", type=int, default=250, help="samples per second")
    pr.add_argument("--pattern", default="paced", choices=["paced", "paced10", "burst"])
    pr.add_argument(
        "--no-native",
        dest="native",
        action="store_false",
        help="Python frames only (idle waits then cannot be told apart)",
    )
    pr.add_argument("--out", type=Path, default=None)

    ins = sub.add_parser(
        "instructions", help="user-space instructions per streamed request, under callgrind"
    )
    ins.add_argument("--contenders", nargs="+", metavar="NAME",
                     help="sidecar sidecar-ref uvloop-floor nginx nginx-lua "
                     "(default: all but sidecar-ref)")
    ins.add_argument("--seconds", type=float, default=10.0, help="instrumented load window")
    ins.add_argument("--concurrency", type=int, default=4)
    ins.add_argument("--out", type=Path, default=None)

    av = sub.add_parser(
        "avalanche", help="a 30 s provider behind one route, 200 clients: does the rest hold?"
    )
    av.add_argument("--quick", action="store_true",
                    help="seconds: 40 clients, 2.5 s provider, 4 s, smaller limits")
    av.add_argument("--seconds", type=float, default=None, help="avalanche length (default 40)")
    av.add_argument("--clients", type=int, default=None, help="slow-route clients (default 200)")
    av.add_argument("--first-byte-ms", type=float, default=None,
                    help="the slow provider's delay before each answer (default 30000)")
    av.add_argument("--max-concurrent", type=int, default=None, help="on `slow` (default 20)")
    av.add_argument("--max-queue", type=int, default=None, help="on `slow` (default 50)")
    av.add_argument("--queue-timeout", type=float, default=None,
                    help="on `slow`, seconds (default 2)")
    av.add_argument("--probe-rate", type=float, default=None,
                    help="per second, for each of /healthz and the fast route (default 10)")
    av.add_argument("--baseline", type=float, default=None,
                    help="seconds probed before the avalanche (default 3)")
    av.add_argument("--backoff", default=None,
                    help="after a 503/429: retry-after (default) or seconds (0: at once)")
    av.add_argument("--out", type=Path, default=None)

    so = sub.add_parser(
        "soak", help="a long run at moderate load with faults: RSS, fds, tasks, errors over time"
    )
    so.add_argument("--minutes", type=float, default=30.0)
    so.add_argument("--clients", type=int, default=16, help="closed-loop clients")
    so.add_argument("--think-ms", type=float, default=50.0,
                    help="mean pause between a client's requests (uniform 0..2x)")
    so.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    so.add_argument("--seed", type=int, default=1)
    so.add_argument("--out", type=Path, default=None)

    ms = sub.add_parser("meter-summary",
                        help="time `sidecar meter summary --since 24h` on a 10M-row meter DB")
    ms.add_argument("--db", type=Path, default=Path("bench/results/meter-10m.db"),
                    help="made once and reused while it has --rows rows")
    ms.add_argument("--rows", type=int, default=10_000_000)
    ms.add_argument("--days", type=int, default=90, help="the rows span this many days")
    ms.add_argument("--runs", type=int, default=5)
    ms.add_argument("--by", nargs="+", default=None, help="groupings (default: all)")
    ms.add_argument("--rebuild", action="store_true")
    ms.add_argument("--covering-index", action="store_true",
                    help="also time with an index covering every column read")

    rg = sub.add_parser("report", help="recompute tables and chart from a results folder")
    rg.add_argument("dir", type=Path)

    a = ap.parse_args(argv)
    if a.cmd == "compare":
        from bench.compare import compare

        res = compare(a.contenders, a.quick, a.pin, a.runs, a.out, no_hold=a.no_hold)
        print(
            (Path(a.out) if a.out else Path("bench/results")) / "",
            res.get("contenders"),
            file=sys.stderr,
        )
        return 0
    if a.cmd == "profile":
        from bench.profile import profile

        out = profile(a.seconds, a.out, a.workers, a.concurrency, a.pattern, a.native, a.rate)
        print((out / "profile.md").read_text())
        return 0
    if a.cmd == "instructions":
        from bench.instructions import instructions

        out = instructions(a.contenders, a.seconds, a.concurrency, a.out,
                           "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv))
        print((out / "results.md").read_text())
        return 0
    if a.cmd == "avalanche":
        from bench.avalanche import avalanche

        if a.backoff not in (None, "retry-after"):
            try:
                float(a.backoff)
            except ValueError:
                ap.error("--backoff: retry-after or a number of seconds")
        out = avalanche(
            a.quick, a.out,
            "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
            seconds=a.seconds, clients=a.clients, first_byte_ms=a.first_byte_ms,
            max_concurrent=a.max_concurrent, max_queue=a.max_queue,
            queue_timeout=a.queue_timeout, probe_rate=a.probe_rate, baseline=a.baseline,
            backoff=a.backoff,
        )
        print((out / "results.md").read_text())
        return 0
    if a.cmd == "soak":
        from bench.soak import soak

        out = soak(a.minutes, a.clients, a.think_ms, a.sample, a.out,
                   "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
                   seed=a.seed)
        print((out / "results.md").read_text())
        print(out / "soak.png")
        return 0

    if a.cmd == "meter-summary":
        from bench.meter_summary import main as meter_summary

        return meter_summary(a.db, a.rows, a.days, a.runs, a.by, a.rebuild,
                             a.covering_index)
    if a.cmd == "report":
        from bench.compare import regenerate

        regenerate(a.dir)
        print(a.dir / "results.md")
        return 0
    if a.cmd == "setup":
        from bench.setup import setup

        return setup(a.nginx, a.litellm, a.portkey, a.bench_deps, a.dry_run)
    return 2


if __name__ == "__main__":
    sys.exit(main())
