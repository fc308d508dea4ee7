"""Result writers: JSON (everything), Markdown (tables), PNG (chart, when matplotlib is there)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _f(v: Any, fmt: str = "{:.2f}") -> str:
    if v is None:
        return "-"
    try:
        return fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


COLUMNS = [
    # (key, header, format)
    ("ttft_p50_c10", "TTFT p50 c10 ms", "{:.3f}"),
    ("added_ttft_p50_c10", "added p50 c10 ms", "{:+.3f}"),
    ("ttft_p50_c100s", "TTFT p50 100 streams@10ms ms", "{:.3f}"),
    ("added_ttft_p50_c100s", "added p50 100@10ms ms", "{:+.3f}"),
    ("added_ttft_p99_c100s", "added p99 100@10ms ms", "{:+.3f}"),
    ("ttft_p50_c100", "TTFT p50 c100 ms", "{:.3f}"),
    ("added_ttft_p50_c100", "added p50 c100 ms", "{:+.3f}"),
    ("ttft_p99_c100", "TTFT p99 c100 ms", "{:.3f}"),
    ("added_ttft_p99_c100", "added p99 c100 ms", "{:+.3f}"),
    ("rps_c100_paced", "req/s paced c100", "{:.0f}"),
    ("rps_c100_burst", "req/s burst c100", "{:.0f}"),
    ("cap_paced_per_core", "capacity/core paced (1/CPU)", "{:.0f}"),
    ("cap_burst_per_core", "capacity/core burst (1/CPU)", "{:.0f}"),
    ("rps_open", "req/s open-loop", "{:.0f}"),
    ("open_ttlb_p99", "open TTLB p99 ms", "{:.1f}"),
    ("cpu_us_c10", "CPU s/1k paced c10", "{:.3f}"),
    ("cpu_us_c100", "CPU s/1k paced c100", "{:.3f}"),
    ("cpu_us_c100s", "CPU s/1k 100@10ms", "{:.3f}"),
    ("cpu_us_burst", "CPU s/1k burst", "{:.3f}"),
    ("idle_rss_mb", "idle RSS MB", "{:.1f}"),
    ("peak_rss_mb", "peak RSS MB (load)", "{:.1f}"),
    ("rss_lo_mb", "RSS 1k streams MB", "{:.1f}"),
    ("rss_hi_mb", "RSS 10k streams MB", "{:.1f}"),
    ("kb_per_stream", "KB/stream", "{:.1f}"),
    ("meter_accuracy", "meter accuracy", "{:.2%}"),
    ("errors", "errors", "{:.0f}"),
]
CPU_KEYS = {
    "cpu_us_c10",
    "cpu_us_c100",
    "cpu_us_c100s",
    "cpu_us_burst",
}  # stored as µs/request = ms/1k


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    agg = res["medians"]
    names = [n for n in res["contenders"] if n in agg]
    L: list[str] = []
    L.append(
        f"# Benchmark: sidecar vs direct, Nginx, Nginx+Lua, LiteLLM, Portkey ({res['kind']} run)\n"
    )
    L.append(
        f"- started {res['started']}, took {res['duration_s']:.0f} s; command: `{res['command']}`"
    )
    L.append(
        f"- machine: {m.get('cpus')} CPUs ({m.get('cpu_model', '?')}), {m.get('mem_gib', '?')} GiB, "
        f"Linux {m.get('kernel')}, Python {m.get('python')}, fd limit {m.get('nofile')}"
    )
    L.append(
        f"- versions: {m.get('nginx') or 'nginx -'}; node {m.get('node') or '-'}; "
        f"litellm {m.get('litellm') or '-'}; portkey gateway {m.get('portkey') or '-'} "
        f"(@hono/node-server {m.get('hono_node_server') or '-'}); sidecar {m.get('sidecar_commit')}"
        f"{' + uncommitted changes' if m.get('sidecar_dirty') else ''}"
    )
    p = res["plan"]
    L.append(
        f"- plan: {p['runs']} interleaved run(s) (contender order rotated each run), medians; "
        f"closed loop c10 {p['c10']} s and c100 {p['c100']} s paced, c100 burst {p['burst']} s, "
        f"open loop {p['open_rate']:.0f} req/s for {p['open']} s paced; open slow streams "
        f"{'/'.join(str(x) for x in p['hold_levels'])} in {p['hold_runs']} run(s)"
    )
    L.append(f"- pinning: {res['pinning']}")
    L.append(
        f"- provider: {res['mock']['impl']} — 20 content events + usage + [DONE]; paced = 1 ms "
        "between events, burst = all in one write, slow = 10 s between events"
    )
    if res["missing"]:
        L.append(
            "- **missing** (not run, not faked): "
            + "; ".join(f"`{k}`: {v[:200]}" for k, v in res["missing"].items())
        )
    L.append("")
    L.append(
        "TTFT = time to the first SSE event at the client; *added* = minus `direct` in the same run. "
        "CPU = on-CPU time of the proxy's process tree (/proc schedstat) per 1,000 streamed requests, "
        "in CPU-seconds (0.250 s/1k = 250 µs per request). *c100* = 100 concurrent streams with 1 ms pacing, which saturates this 2-core box (TTFT there is mostly queueing); *100@10ms* = 100 concurrent streams with events 10 ms apart, which does not. *capacity/core* = 1 / CPU per stream at c100: what one core would sustain, since the measured req/s of the fast proxies is capped by the mock + load generator sharing this box. For `direct`, CPU and memory "
        "columns are the mock provider's own.\n"
    )
    L.append("## Absolute figures (medians)\n")
    L.append("| contender | " + " | ".join(h for _, h, _ in COLUMNS) + " |")
    L.append("|---" * (len(COLUMNS) + 1) + "|")
    for n in names:
        a = agg[n]
        cells = []
        for k, _, fmt in COLUMNS:
            v = a.get(k)
            if k in CPU_KEYS and v is not None:
                v = v / 1000.0
            cells.append(_f(v, fmt))
        L.append(f"| {n} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("## Ratios (median of per-run ratios; reference nginx with the same worker count)\n")
    rc = [
        ("cpu_us_c10_vs_nginx", "CPU c10 / nginx"),
        ("cpu_us_c100_vs_nginx", "CPU c100 / nginx"),
        ("cpu_us_burst_vs_nginx", "CPU burst / nginx"),
        ("cpu_us_c10_vs_nginx_lua", "CPU c10 / nginx-lua"),
        ("rps_c100_paced_vs_nginx", "req/s paced / nginx"),
        ("rps_c100_burst_vs_nginx", "req/s burst / nginx"),
        ("cap_paced_per_core_vs_nginx", "capacity paced / nginx"),
        ("rps_c100_paced_vs_direct", "req/s paced / direct"),
        ("rps_c100_burst_vs_direct", "req/s burst / direct"),
        ("added_ttft_p50_c10_minus_nginx", "added TTFT p50 c10 - nginx's (ms)"),
        ("added_ttft_p50_c100s_minus_nginx", "added TTFT p50 100@10ms - nginx's (ms)"),
        ("added_ttft_p50_c100_minus_nginx", "added TTFT p50 c100 - nginx's (ms)"),
        ("rss_lo_mb_vs_nginx", "RSS 1k / nginx"),
        ("rss_hi_mb_vs_nginx", "RSS 10k / nginx"),
    ]
    L.append("| contender | ref | " + " | ".join(h for _, h in rc) + " |")
    L.append("|---" * (len(rc) + 2) + "|")
    for n in names:
        a = agg[n]
        if n == "direct":
            continue
        L.append(
            f"| {n} | {a.get('ratio_reference')} | "
            + " | ".join(_f(a.get(k), "{:+.3f}" if "minus" in k else "{:.2f}") for k, _ in rc)
            + " |"
        )
    L.append("")
    if res.get("targets"):
        L.append("## Sidecar against the issue's targets (paced pattern)\n")
        L.append("| target | value | limit | met |")
        L.append("|---|---|---|---|")
        for t in res["targets"]:
            met = "-" if t["met"] is None else ("yes" if t["met"] else "**MISS**")
            L.append(f"| {t['target']} | {t['value'] or '-'} | {t['limit']} | {met} |")
        L.append("")
    L.append("## Per-run detail\n")
    L.append(
        "| run | contender | c10 TTFT p50 | c100 TTFT p50/p99 | paced req/s | burst req/s | CPU µs/req c10 (user/sys) | meter | hold |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|")
    for r in res["runs"]:
        if "missing" in r:
            L.append(
                f"| {r['run']} | {r['contender']} | missing: {r['missing'][:80]} | | | | | | |"
            )
            continue
        ph = r["phases"]

        def g(ph_name: str, *path: str, ph: dict[str, Any] = ph) -> Any:
            d: Any = ph.get(ph_name, {})
            for p_ in path:
                d = d.get(p_) if isinstance(d, dict) else None
            return d

        c10 = ph.get("c10_paced", {})
        ok = c10.get("ok") or 0
        us = ""
        if ok and "proxy" in c10:
            us = (
                f"{c10['cpu_us_per_req']:.0f} ({c10['proxy']['user_s'] * 1e6 / ok:.0f}/"
                f"{c10['proxy']['sys_s'] * 1e6 / ok:.0f})"
            )
        meter = r.get("meter")
        mt = f"{meter['correct_rows']}/{meter['requests']}" if meter else ""
        hold = ", ".join(
            f"{lv.get('established')}/{lv.get('level')}: {lv.get('mem', {}).get('rss_mb', 0):.1f} MB"
            for lv in r.get("hold", {}).get("levels", [])
            if "level" in lv
        )
        L.append(
            f"| {r['run']} | {r['contender']} | {_f(g('c10_paced', 'ttft_ms', 'p50'), '{:.3f}')} | "
            f"{_f(g('c100_paced', 'ttft_ms', 'p50'), '{:.3f}')}/{_f(g('c100_paced', 'ttft_ms', 'p99'), '{:.3f}')} | "
            f"{_f(g('c100_paced', 'rps'), '{:.0f}')} | {_f(g('c100_burst', 'rps'), '{:.0f}')} | {us} | {mt} | {hold} |"
        )
    L.append("")
    L.append("## Configurations (exactly as run)\n")
    for n, cfg in res["configs"].items():
        L.append(f"### {n}\n")
        L.append(
            f"command: `{' '.join(cfg.get('cmdline') or []) or '(none)'}`; CPUs: {cfg.get('pinned_cpus')}\n"
        )
        for fname, text in (cfg.get("config") or {}).items():
            L.append(f"`{fname}`:\n")
            L.append("```\n" + str(text).rstrip() + "\n```\n")
    L.append(f"Mock provider: `{' '.join(res['mock']['cmd'])}`\n")
    return "\n".join(L) + "\n"


def chart(res: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install -e '.[bench]')"
    agg = res["medians"]
    names = [n for n in res["contenders"] if n in agg]
    proxies = [n for n in names if n != "direct"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    colors = {
        n: (
            "#d62728"
            if n.startswith("sidecar")
            else "#1f77b4"
            if n.startswith("nginx")
            else "#7f7f7f"
            if n == "direct"
            else "#ff7f0e"
        )
        for n in names
    }

    def bars(
        ax: Any,
        keys: list[tuple[str, str]],
        who: list[str],
        title: str,
        ylabel: str,
        scale: float = 1.0,
        log: bool = False,
    ) -> None:
        if not who:
            ax.set_title(title + " (no data)", fontsize=10)
            return
        w = 0.8 / len(keys)
        for i, (k, label) in enumerate(keys):
            vals = [(agg[n].get(k) or 0) * scale for n in who]
            xs = [j + i * w for j in range(len(who))]
            b = ax.bar(
                xs,
                vals,
                w,
                label=label,
                color=[colors[n] for n in who],
                alpha=1.0 - 0.35 * i,
                edgecolor="black",
                linewidth=0.4,
            )
            ax.bar_label(
                b, labels=[f"{v:.0f}" if v >= 100 else f"{v:.3g}" for v in vals], fontsize=7
            )
        ax.set_xticks([j + w * (len(keys) - 1) / 2 for j in range(len(who))])
        ax.set_xticklabels(who, rotation=25, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        allv = [(agg[n].get(k) or 0) * scale for n in who for k, _ in keys]
        if log and allv and min(allv) > 0:
            ax.set_yscale("log")
        elif log and allv and max(allv) > 0:
            ax.set_yscale(
                "symlog", linthresh=max(1e-3, min(abs(v) for v in allv if v) if any(allv) else 1)
            )
        if len(keys) > 1:
            ax.legend(fontsize=8)

    bars(
        axes[0][0],
        [("cpu_us_c10", "paced c10"), ("cpu_us_burst", "burst c100")],
        proxies,
        "proxy CPU per 1,000 streamed requests",
        "CPU-seconds / 1k (log)",
        scale=1e-3,
        log=True,
    )
    bars(
        axes[0][1],
        [("added_ttft_p50_c100s", "p50"), ("added_ttft_p99_c100s", "p99")],
        proxies,
        "added TTFT over direct, 100 concurrent streams (10 ms pacing)",
        "ms (log)",
        log=True,
    )
    bars(
        axes[1][0],
        [("rps_c100_paced", "paced c100"), ("rps_c100_burst", "burst c100")],
        names,
        "closed-loop throughput (all on 2 shared cores)",
        "streamed req/s",
    )
    bars(
        axes[1][1],
        [("rss_lo_mb", "~1k open streams"), ("rss_hi_mb", "~10k open streams")],
        [n for n in names if agg[n].get("rss_lo_mb") is not None],
        "RSS of the process tree with open slow streams",
        "MB (log)",
        log=True,
    )
    fig.suptitle(
        f"LLM gateway sidecar benchmark — {res['kind']} run {res['started']} "
        f"({res['machine'].get('cpus')} CPUs; {res['pinning']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_all(res: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        note = chart(res, out_dir / "chart.png")
    except Exception as e:
        note = f"chart failed: {e!r}"
    res["chart"] = "chart.png" if note is None else None
    if note:
        res["chart_note"] = note
    (out_dir / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (out_dir / "results.md").write_text(markdown(res))
    for n, cfg in res["configs"].items():
        d = out_dir / "configs" / n
        d.mkdir(parents=True, exist_ok=True)
        for fname, text in (cfg.get("config") or {}).items():
            safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in fname)
            (d / safe).write_text(str(text))
    latest = out_dir.parent / ("latest-quick" if res["kind"] == "quick" else "latest")
    try:
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        latest.symlink_to(out_dir.name)
    except OSError:
        pass
