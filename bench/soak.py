"""``python -m bench soak``: a long run at moderate load with faults; does anything leak?

One sidecar (``workers: 1``, metering on) in front of the project's mock, and closed-loop
clients in this process sending a weighted mix of requests (``KINDS``): normal streams,
slow streams, non-streamed calls, and faults — the client hangs up mid-stream, the
provider resets mid-stream (``disconnect-after``), answers 429, closes without replying,
or sends malformed SSE, and a client sends garbage instead of HTTP.

Every ``--sample`` seconds the harness records the sidecar's RSS and open fds (from
/proc), its live asyncio tasks, client connections and meter counters (the
``SIDECAR_DEBUG_STATS`` line it logs, sidecar/debug_stats.py), and the client-side
tallies. At the end it stops the sidecar with SIGTERM (the meter flushes) and joins its
meter rows to the requests sent by ``x-request-id`` (the sidecar keeps a client's id).

Output in ``bench/results/soak-<stamp>/``: ``samples.csv``, ``soak.png`` and
``results.md`` (start/end/max RSS, fds, tasks, errors, rows per kind of request).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import random
import signal
import sqlite3
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import contenders as C
from bench import procstat
from bench.compare import log, machine, new_results_dir, raise_nofile, sidecar_commit

PATH = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
REQUEST_TIMEOUT_S = 60.0  # a client gives up (and counts a timeout) after this
STATS_PERIOD_S = 5.0  # SIDECAR_DEBUG_STATS
DRAIN_S = 5.0  # after the load stops, before the last sample
# After this share of the run the process is warm (tokenizer, pools, caches, allocator
# arenas): growth is judged from here to the end.
WARM_SHARE = 0.2


@dataclass(frozen=True)
class Kind:
    name: str
    weight: int
    headers: tuple[tuple[str, str], ...] = ()
    stream: bool = True
    expect: frozenset[str] = frozenset({"200"})  # results that are not errors
    metered: bool = True  # one meter row expected


KINDS = (
    Kind("stream", 55, (("x-mock-delay-ms", "5"),)),
    Kind("slow_stream", 6, (("x-mock-delay-ms", "250"),)),
    Kind("non_stream", 7, stream=False),
    # The client reads the head and a few bytes, then resets the connection.
    Kind("client_disconnect", 8, (("x-mock-delay-ms", "20"),), expect=frozenset({"hung_up"})),
    Kind("provider_reset", 8, (("x-mock-delay-ms", "5"), ("x-mock-fault", "disconnect-after:5")),
         expect=frozenset({"200", "200_cut", "502"})),
    Kind("provider_429", 8, (("x-mock-fault", "status:429"), ("x-mock-retry-after", "0")),
         expect=frozenset({"429"})),
    Kind("provider_close", 3, (("x-mock-fault", "close-after-read:20"),),
         expect=frozenset({"502"})),
    Kind("malformed_sse", 3, (("x-mock-fault", "malformed"),),
         expect=frozenset({"200", "200_cut", "502"})),
    # Not HTTP at all: answered 400 and closed, no row.
    Kind("garbage", 2, expect=frozenset({"400", "closed"}), metered=False),
)


@dataclass
class Tally:
    sent: int = 0
    done: int = 0
    errors: int = 0  # results not in the kind's `expect`
    stale_keepalive: int = 0  # reused connections found closed before any answer (resent)
    results: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, result)
    usage: dict[str, tuple[int, int]] = field(default_factory=dict)  # request id -> seen usage
    ids: dict[str, str] = field(default_factory=dict)  # request id -> kind


def request_bytes(kind: Kind, rid: str) -> bytes:
    if kind.name == "garbage":
        return b"\x16\x03\x01\x02\x00 NOT-HTTP \r\n\r\n"
    body: dict[str, Any] = {"model": MODEL, "stream": kind.stream,
                            "messages": [{"role": "user", "content": C.PROMPT}]}
    if kind.stream:
        body["stream_options"] = {"include_usage": True}
    raw = json.dumps(body, separators=(",", ":")).encode()
    head = [f"POST {PATH} HTTP/1.1", "host: 127.0.0.1", "content-type: application/json",
            f"content-length: {len(raw)}", f"x-request-id: {rid}", "x-mock-always-usage: 1"]
    head += [f"{k}: {v}" for k, v in kind.headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + raw


def usage_in(body: bytes, stream: bool) -> tuple[int, int] | None:
    """(prompt, completion) of the last usage object the client received."""
    found: tuple[int, int] | None = None
    docs = ([line[5:].strip() for line in body.split(b"\n") if line.startswith(b"data:")]
            if stream else [body])
    for doc in docs:
        if b'"usage"' not in doc:
            continue
        try:
            u = json.loads(doc).get("usage")
        except (ValueError, AttributeError):
            continue
        if isinstance(u, dict) and "prompt_tokens" in u:
            found = (int(u["prompt_tokens"]), int(u.get("completion_tokens", 0)))
    return found


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> tuple[bytes, bool]:
    """The whole response body and whether it ended as framed (False: cut short)."""
    try:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    return b"".join(parts), True
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
        if "content-length" in headers:
            return await reader.readexactly(int(headers["content-length"])), True
        return await reader.read(), True
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        return b"", False


class Client:
    """One closed-loop client: a keep-alive connection, reopened when it cannot be reused."""

    def __init__(self, port: int, tally: Tally, rng: random.Random, think_s: float) -> None:
        self.port, self.tally, self.rng, self.think_s = port, tally, rng, think_s
        self.conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.weights = [k.weight for k in KINDS]

    def drop(self, abort: bool = False) -> None:
        if self.conn is not None:
            w = self.conn[1]
            if abort:
                w.transport.abort()
            else:
                w.close()
            self.conn = None

    async def one(self, kind: Kind, rid: str) -> str:
        fresh = self.conn is None or kind.name in ("garbage", "client_disconnect")
        if fresh:
            self.drop()
            self.conn = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 20)
        assert self.conn is not None
        reader, writer = self.conn
        writer.write(request_bytes(kind, rid))
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            self.drop(abort=True)
            got_nothing = not isinstance(e, asyncio.IncompleteReadError) or not e.partial
            if not fresh and got_nothing:
                # A keep-alive connection the server closed after its last response (as
                # it may, e.g. after a stream cut by the provider): what any HTTP client
                # does is send again on a new connection; counted, not an error.
                self.tally.stale_keepalive += 1
                return await self.one(kind, rid)
            return "closed"
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ")[1]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        if kind.name == "client_disconnect":
            with contextlib.suppress(ConnectionError):
                await reader.read(200)
            self.drop(abort=True)
            return "hung_up"
        body, complete = await read_body(reader, headers)
        if not complete or headers.get("connection", "").lower() == "close":
            self.drop(abort=not complete)
        if status == "200":
            seen = usage_in(body, kind.stream)
            if seen is not None:
                self.tally.usage[rid] = seen
            if not complete or (kind.stream and b"data: [DONE]" not in body):
                return "200_cut"
        return status

    async def run(self, stop_at: float, prefix: str) -> None:
        t = self.tally
        n = 0
        while time.monotonic() < stop_at:
            kind = self.rng.choices(KINDS, self.weights)[0]
            n += 1
            rid = f"{prefix}-{n}-{kind.name}"
            t.sent += 1
            t.ids[rid] = kind.name
            try:
                result = await asyncio.wait_for(self.one(kind, rid), REQUEST_TIMEOUT_S)
            except TimeoutError:
                self.drop(abort=True)
                result = "timeout"
            except (OSError, asyncio.IncompleteReadError, IndexError) as e:
                self.drop(abort=True)
                result = f"client_error:{type(e).__name__}"
            t.done += 1
            t.results[(kind.name, result)] += 1
            if result not in kind.expect:
                t.errors += 1
            if self.think_s:
                await asyncio.sleep(self.rng.uniform(0, 2 * self.think_s))
        self.drop()


# --------------------------------------------------------------------------- sampling
def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


class StatsTail:
    """The last ``sidecar-stats`` line of the sidecar's log (sidecar/debug_stats.py)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.last = path, 0, {}

    def read(self) -> dict[str, float]:
        from sidecar.debug_stats import parse_line

        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return self.last
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].decode(errors="replace").splitlines():
            parsed = parse_line(line)
            if parsed is not None:
                self.last = parsed
        return self.last


COLUMNS = ["t_s", "rss_kb", "fds", "tasks", "conns", "meter_written", "meter_spilled",
           "meter_errors", "sent", "done", "errors", "fault_answers", "req_per_s"]


async def sample_loop(pid: int, tally: Tally, stats: StatsTail, start: float, every: float,
                      stop_at: float, rows: list[dict[str, float]]) -> None:
    last_done, last_t = 0, start
    while True:
        now = time.monotonic()
        st = stats.read()
        faults = sum(n for (k, r), n in tally.results.items() if r != "200" and k != "stream")
        rows.append({
            "t_s": round(now - start, 1), "rss_kb": procstat._status_kb(pid, b"VmRSS:"),
            "fds": fd_count(pid), "tasks": st.get("tasks", -1), "conns": st.get("conns", -1),
            "meter_written": st.get("meter_written", -1),
            "meter_spilled": st.get("meter_spilled", -1),
            "meter_errors": st.get("meter_errors", -1), "sent": tally.sent, "done": tally.done,
            "errors": tally.errors, "fault_answers": faults,
            "req_per_s": round((tally.done - last_done) / max(now - last_t, 1e-9), 1),
        })
        last_done, last_t = tally.done, now
        if now >= stop_at:
            return
        await asyncio.sleep(every)


# --------------------------------------------------------------------------- run
def sidecar_config(port: int, mock_port: int, db: Path) -> str:
    return (
        "# soak: one worker, metering on, the mock behind one route\n"
        f"listen: 127.0.0.1:{port}\n"
        "workers: 1\n"
        "upstreams:\n"
        "  mock:\n"
        f"    url: http://127.0.0.1:{mock_port}\n"
        "routes:\n"
        f"  - path: {PATH}\n"
        "    upstreams:\n"
        "      - target: mock\n"
        "timeouts:\n"
        "  shutdown_grace: 10\n"
        "meter:\n"
        f"  db: {db}\n"
    )


def meter_join(db: Path, tally: Tally) -> dict[str, Any]:
    """Rows per kind of request (by x-request-id), duplicates, usage exactness."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = con.execute(
            "SELECT request_id, outcome, status, prompt_tokens, completion_tokens, usage_source "
            "FROM requests").fetchall()
        integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()
    per_id = Counter(r[0] for r in rows)
    by_kind: dict[str, Counter[str]] = {}
    exact = mismatch = 0
    for rid, outcome, status, prompt, completion, source in rows:
        kind = tally.ids.get(rid, "(unknown id)")
        by_kind.setdefault(kind, Counter())[f"{outcome}/{status}/{source}"] += 1
        if rid in tally.usage:
            if tally.usage[rid] == (prompt, completion):
                exact += 1
            else:
                mismatch += 1
    sent = Counter(tally.ids.values())
    kinds = {k.name: k for k in KINDS}
    expected = sum(n for name, n in sent.items() if kinds[name].metered)
    return {
        "rows": len(rows), "integrity_check": integrity,
        "requests_sent": tally.sent, "requests_expected_rows": expected,
        "ids_with_rows": sum(1 for rid in per_id if rid in tally.ids),
        "duplicate_ids": sum(1 for n in per_id.values() if n > 1),
        "missing_rows": sum(1 for rid, k in tally.ids.items()
                            if kinds[k].metered and rid not in per_id),
        "usage_seen_by_client": len(tally.usage), "usage_exact": exact,
        "usage_mismatch": mismatch,
        "sent_by_kind": dict(sent),
        "rows_by_kind": {k: dict(v.most_common()) for k, v in sorted(by_kind.items())},
    }


def chart(rows: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t_s"] / 60 for r in rows]
    nan = float("nan")

    def col(key: str, scale: float = 1.0) -> list[float]:
        return [r[key] / scale if r[key] >= 0 else nan for r in rows]  # -1: not reported yet

    fig, ax = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    ax[0].plot(t, col("rss_kb", 1024), color="tab:blue")
    ax[0].set_ylabel("sidecar RSS (MiB)")
    ax[0].set_ylim(bottom=0)
    ax[1].plot(t, col("fds"), label="open fds")
    ax[1].plot(t, col("conns"), label="client conns")
    ax[1].plot(t, col("tasks"), label="asyncio tasks")
    ax[1].set_ylabel("count")
    ax[1].set_ylim(bottom=0)
    ax[1].legend(loc="upper left")
    ax[2].plot(t, col("req_per_s"), color="tab:green")
    ax[2].set_ylabel("requests/s")
    ax[2].set_ylim(bottom=0)
    ax[3].plot(t, col("fault_answers"), label="fault answers (expected, cum.)")
    ax[3].plot(t, col("errors"), label="unexpected results (cum.)", color="red")
    ax[3].set_ylabel("cumulative")
    ax[3].set_xlabel("minutes")
    ax[3].legend(loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summary(rows: list[dict[str, float]], key: str) -> dict[str, float]:
    vals = [r[key] for r in rows if r[key] >= 0]
    warm = [r[key] for r in rows if r["t_s"] >= rows[-1]["t_s"] * WARM_SHARE and r[key] >= 0]
    if not vals:
        return {}
    return {"start": vals[0], "end": vals[-1], "max": max(vals), "min": min(vals),
            "warm_start": warm[0] if warm else vals[0]}


async def drive(port: int, pid: int, tally: Tally, stats: StatsTail, minutes: float,
                clients: int, think_s: float, every: float, seed: int
                ) -> list[dict[str, float]]:
    start = time.monotonic()
    stop_load = start + minutes * 60
    rows: list[dict[str, float]] = []
    master = random.Random(seed)
    workers = [Client(port, tally, random.Random(master.random()), think_s)
               for _ in range(clients)]
    sampler = asyncio.create_task(
        sample_loop(pid, tally, stats, start, every, stop_load + DRAIN_S + STATS_PERIOD_S, rows))
    await asyncio.gather(*(w.run(stop_load, f"soak{i}") for i, w in enumerate(workers)))
    await sampler
    return rows


def soak(minutes: float, clients: int, think_ms: float, sample_s: float, out_dir: Path | None,
         command: str, seed: int = 1) -> Path:
    import uvloop

    raise_nofile()
    # Read now: the checkout may move on during a long run (the processes keep the code
    # they started with).
    commit, box = sidecar_commit(), machine()
    out, work, stamp = new_results_dir("soak", out_dir)
    env = C.sidecar_env()
    mock_port, port = C.free_port(), C.free_port()
    mock = C.spawn([sys.executable, "-m", "sidecar.mock", "--port", str(mock_port),
                    "--chunks", "20", "--always-usage"], work / "mock.log", None, env, cwd=C.REPO)
    err = C.wait_mock(mock, mock_port)
    if err:
        mock.stop()
        raise SystemExit(err)
    db = work / "meter.db"
    cfg = work / "sidecar.yaml"
    cfg.write_text(sidecar_config(port, mock_port, db))
    side_log = work / "sidecar.log"
    sidecar = C.spawn([sys.executable, "-m", "sidecar", "run", "-c", str(cfg)], side_log, None,
                      {**env, "SIDECAR_DEBUG_STATS": str(STATS_PERIOD_S)}, cwd=work)
    tally = Tally()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and b"listening on" not in side_log.read_bytes():
            if sidecar.popen.poll() is not None:
                raise SystemExit(f"sidecar exited: {C.tail(side_log)}")
            time.sleep(0.2)
        log(f"soak: {minutes:g} min, {clients} clients, think {think_ms:g} ms, "
            f"sidecar pid {sidecar.popen.pid} on :{port}, mock :{mock_port}")
        rows = uvloop.run(drive(port, sidecar.popen.pid, tally, StatsTail(side_log), minutes,
                                clients, think_ms / 1000, sample_s, seed))
        alive = sidecar.popen.poll() is None
    finally:
        sidecar.stop(signal.SIGTERM, grace=30)
        mock.stop()
    meter = meter_join(db, tally)
    with open(out / "samples.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    chart(rows, out / "soak.png",
          f"bench soak: {minutes:g} min, {clients} clients, faults mixed in ({stamp})")
    figures = {k: summary(rows, k) for k in ("rss_kb", "fds", "tasks", "conns")}
    result = {
        "command": command, "stamp": stamp, "commit": commit, "machine": box,
        "minutes": minutes, "clients": clients, "think_ms": think_ms, "seed": seed,
        "kinds": [{"name": k.name, "weight": k.weight, "headers": dict(k.headers),
                   "expect": sorted(k.expect)} for k in KINDS],
        "sidecar_alive_at_end": alive, "sidecar_exit": sidecar.popen.returncode,
        "figures": figures, "requests": tally.sent, "errors": tally.errors,
        "results": {f"{k}:{r}": n for (k, r), n in sorted(tally.results.items())},
        "stale_keepalive_resent": tally.stale_keepalive,
        "meter": meter, "config": cfg.read_text(),
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(render(result))
    return out


def render(r: dict[str, Any]) -> str:
    f = r["figures"]
    m = r["meter"]

    def fig(key: str, scale: float = 1.0, unit: str = "") -> str:
        d = f.get(key) or {}
        if not d:
            return "| n/a |"
        return (f"| {d['start'] / scale:.1f}{unit} | {d['warm_start'] / scale:.1f}{unit} | "
                f"{d['end'] / scale:.1f}{unit} | {d['max'] / scale:.1f}{unit} |")

    lines = [
        f"# soak {r['stamp']} ({r['minutes']:g} min, {r['clients']} clients)",
        "", f"`{r['command']}` at {r['commit']}", "",
        "| figure | start | after warm-up (20%) | end | max |", "|---|---|---|---|---|",
        f"| sidecar RSS (MiB) {fig('rss_kb', 1024)}", f"| open fds {fig('fds')}",
        f"| asyncio tasks {fig('tasks')}", f"| client connections {fig('conns')}", "",
        f"Requests sent: {r['requests']}; unexpected results: {r['errors']}; "
        f"resent after a kept-alive connection was found closed: "
        f"{r['stale_keepalive_resent']}; "
        f"sidecar alive at the end: {r['sidecar_alive_at_end']} (exit {r['sidecar_exit']} "
        "after SIGTERM).", "",
        f"Meter: {m['rows']} rows for {m['requests_expected_rows']} requests that should "
        f"have one ({m['requests_sent']} sent, garbage excluded); missing {m['missing_rows']}, "
        f"duplicate ids {m['duplicate_ids']}; client-seen usage {m['usage_seen_by_client']}, "
        f"metered exactly {m['usage_exact']}, mismatched {m['usage_mismatch']}; "
        f"integrity_check {m['integrity_check']}.", "",
        "| kind:result | requests |", "|---|---|",
        *(f"| {k} | {n} |" for k, n in r["results"].items()), "",
        "| kind | rows (outcome/status/usage_source) |", "|---|---|",
        *(f"| {k} | {json.dumps(v)} |" for k, v in m["rows_by_kind"].items()), "",
    ]
    return "\n".join(lines)
