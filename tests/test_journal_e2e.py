"""The crash journal end to end: a real `sidecar run` killed with SIGKILL under load, then
restarted; every request the mock provider received must have exactly one meter row."""

from __future__ import annotations

import asyncio
import os
import pathlib
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from typing import Any

from e2e_helpers import request_bytes

from sidecar.meter.journal import open_entries, parse
from sidecar.mock import MockUpstream

PY = sys.executable
START_TIMEOUT = 20.0  # a `sidecar run` process imports, opens the meter, listens
SLOW_STREAMS = 500  # in flight at the kill
FAST_REQUESTS = 60  # finished (or just finishing) before the kill
CONNECT_BATCH = 100  # client connections opened at once
SETTLE_TIMEOUT = 20.0  # bounds every wait below
FDS_NEEDED = 4 * SLOW_STREAMS  # clients + the mock's side, in this process


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < FDS_NEEDED:
        want = FDS_NEEDED if hard == resource.RLIM_INFINITY else min(FDS_NEEDED, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _write_config(tmp: pathlib.Path, mock_port: int, workers: int) -> pathlib.Path:
    cfg = tmp / "sidecar.yaml"
    cfg.write_text(
        "listen: 127.0.0.1:0\n"
        f"workers: {workers}\n"
        "routes:\n"
        "  - path: /v1/chat/completions\n"
        f"    upstreams: [{{ target: http://127.0.0.1:{mock_port} }}]\n"
        "limits: { max_connections: 5000 }\n"
        "meter:\n"
        "  db: ./meter.db\n"
    )
    return cfg


class Sidecar:
    """`sidecar run` as a child process, its stderr in a file."""

    def __init__(self, cfg: pathlib.Path, log: pathlib.Path) -> None:
        self.log = log
        self.fh = open(log, "ab")  # closed in wait()
        self.p = subprocess.Popen([PY, "-m", "sidecar", "run", "-c", str(cfg)],
                                  stdout=subprocess.DEVNULL, stderr=self.fh,
                                  env=dict(os.environ, PYTHONUNBUFFERED="1"))

    async def port(self, since: int) -> int:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            text = self.log.read_bytes()[since:].decode(errors="replace")
            for line in text.splitlines():
                if "listening on http://127.0.0.1:" in line:
                    return int(line.split("http://127.0.0.1:", 1)[1].split()[0])
            assert self.p.poll() is None, self.log.read_text()
            await asyncio.sleep(0.05)
        raise AssertionError(f"sidecar never listened; log:\n{self.log.read_text()}")

    def stop(self, sig: int) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            code = self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            code = self.p.wait()
        self.fh.close()
        return code


def _chat(delay_ms: int, chunks: int) -> bytes:
    body = {"model": "gpt-4o-mini", "stream": True,
            "messages": [{"role": "user", "content": "tell me a long story " * 8}]}
    return request_bytes("POST", "/v1/chat/completions", body, headers=(
        (b"x-mock-delay-ms", str(delay_ms).encode()), (b"x-mock-chunks", str(chunks).encode())))


async def _open_stream(port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Send a streamed request and wait for its head and first bytes of body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    got = b""
    while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) == 0:
        chunk = await asyncio.wait_for(reader.read(65536), SETTLE_TIMEOUT)
        assert chunk, got
        got += chunk
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    return reader, writer


async def _whole_response(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    got = b""
    while not got.endswith(b"0\r\n\r\n"):
        chunk = await asyncio.wait_for(reader.read(65536), SETTLE_TIMEOUT)
        assert chunk, got
        got += chunk
    writer.close()
    return got


def _assert_intact(db: pathlib.Path) -> None:
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        con.close()


def _rows(db: pathlib.Path) -> list[dict[str, Any]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM requests")]
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


async def _wait_rows(db: pathlib.Path, n: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + SETTLE_TIMEOUT
    rows = _rows(db)
    while len(rows) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        rows = _rows(db)
    return rows


def test_kill_9_under_500_streams_then_restart_leaves_exactly_one_row_per_served_request(
        tmp_path: pathlib.Path) -> None:
    _raise_fd_limit()
    db = tmp_path / "meter.db"
    log = tmp_path / "sidecar.log"

    async def main() -> None:
        mock = MockUpstream(backlog=4096)
        await mock.start()
        clients: list[asyncio.StreamWriter] = []
        try:
            cfg = _write_config(tmp_path, mock.port, workers=1)
            side = Sidecar(cfg, log)
            port = await side.port(0)
            # Requests that complete: their rows are committed, or still queued at the
            # kill (then only the journal knows them).
            fast = await asyncio.gather(*(_whole_response(port, _chat(0, 5))
                                          for _ in range(FAST_REQUESTS)))
            assert all(r.startswith(b"HTTP/1.1 200") for r in fast)
            slow = _chat(500, 200)  # 100 s streams: in flight whenever the kill comes
            for _i in range(0, SLOW_STREAMS, CONNECT_BATCH):
                opened = await asyncio.gather(*(_open_stream(port, slow)
                                                for _ in range(CONNECT_BATCH)))
                clients.extend(w for _, w in opened)
            served = len(mock.requests)
            assert served == FAST_REQUESTS + SLOW_STREAMS
            side.stop(signal.SIGKILL)
            assert side.p.returncode == -signal.SIGKILL
            in_db_at_kill = len(_rows(db))
            assert in_db_at_kill <= FAST_REQUESTS  # the streams had no row yet
            journals = list((tmp_path / "meter.db.journal").glob("*.journal"))
            assert len(journals) == 1

            # Restart with another worker count: any worker recovers any dead journal.
            cfg = _write_config(tmp_path, mock.port, workers=2)
            since = log.stat().st_size
            side = Sidecar(cfg, log)
            await side.port(since)
            rows = await _wait_rows(db, served)
            assert len(mock.requests) == served  # nothing was retried upstream on restart
            await asyncio.sleep(1.5)  # a second worker's retry must not add rows
            rows = _rows(db)
            assert side.stop(signal.SIGTERM) == 0

            sent_ids = sorted(r.header("x-request-id") or "" for r in mock.requests)
            row_ids = sorted(r["request_id"] for r in rows)
            assert len(set(sent_ids)) == served
            assert row_ids == sent_ids  # every served request once, nothing else
            interrupted = [r for r in rows if r["outcome"] == "interrupted"]
            assert len(interrupted) >= SLOW_STREAMS
            assert len(interrupted) == served - in_db_at_kill
            slow_body_len = len(slow.split(b"\r\n\r\n", 1)[1])
            for r in interrupted:
                assert r["usage_source"] == "estimated" and r["usage_approx"] == 1
                assert r["bytes_in"] == slow_body_len
                assert r["prompt_tokens"] == -(-slow_body_len // 4) == r["total_tokens"]
                assert r["completion_tokens"] == 0
                assert r["upstream"] and r["model"] == "gpt-4o-mini" and r["stream"] == 1
                assert r["cost_usd"] is not None and r["cost_usd"] > 0
            assert not list((tmp_path / "meter.db.journal").glob("*.journal"))

            # A third start finds nothing to recover: still one row per request.
            since = log.stat().st_size
            side = Sidecar(cfg, log)
            await side.port(since)
            await asyncio.sleep(1.0)
            assert side.stop(signal.SIGTERM) == 0
            assert sorted(r["request_id"] for r in _rows(db)) == sent_ids
            _assert_intact(db)
        finally:
            for w in clients:
                w.close()
            await mock.stop()

    asyncio.run(main())


def _children(pid: int) -> set[int]:
    path = pathlib.Path(f"/proc/{pid}/task/{pid}/children")
    return {int(x) for x in path.read_text().split()}


def test_a_worker_killed_under_a_supervisor_is_recovered_by_its_replacement_while_serving(
        tmp_path: pathlib.Path) -> None:
    _raise_fd_limit()
    db = tmp_path / "meter.db"
    log = tmp_path / "sidecar.log"
    jdir = tmp_path / "meter.db.journal"
    streams = 100

    async def main() -> None:
        mock = MockUpstream(backlog=4096)
        await mock.start()
        clients: list[asyncio.StreamWriter] = []
        side: Sidecar | None = None
        try:
            cfg = _write_config(tmp_path, mock.port, workers=2)
            cfg.write_text(cfg.read_text() + "timeouts: { shutdown_grace: 1s }\n")
            side = Sidecar(cfg, log)
            port = await side.port(0)
            workers = _children(side.p.pid)
            assert len(workers) == 2
            slow = _chat(500, 200)
            for _ in range(streams // CONNECT_BATCH or 1):
                opened = await asyncio.gather(*(_open_stream(port, slow)
                                                for _ in range(min(CONNECT_BATCH, streams))))
                clients.extend(w for _, w in opened)
            assert len(mock.requests) == streams
            # The kernel spread the connections; the victim is a worker with streams.
            victim = max(workers, key=lambda pid: sum(
                1 for p in jdir.glob(f"{pid}-*.journal") for _ in p.read_bytes().splitlines()))
            (journal,) = jdir.glob(f"{victim}-*.journal")
            victim_ids = {e.request_id for e in open_entries(*parse(journal.read_bytes())[:2])}
            assert 0 < len(victim_ids) < streams
            os.kill(victim, signal.SIGKILL)
            # The supervisor starts a replacement, whose meter recovers the dead journal;
            # the other worker goes on serving its streams meanwhile.
            deadline = time.monotonic() + SETTLE_TIMEOUT
            rows = _rows(db)
            while len(rows) < len(victim_ids) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                rows = _rows(db)
            assert {r["request_id"] for r in rows} == victim_ids
            assert {r["outcome"] for r in rows} == {"interrupted"}
            assert not journal.exists()
            assert side.p.poll() is None and victim not in _children(side.p.pid)
            # The survivor's streams are cut at shutdown_grace: rows of their own.
            assert side.stop(signal.SIGTERM) == 0
            side = None
            rows = _rows(db)
            sent = sorted(r.header("x-request-id") or "" for r in mock.requests)
            assert sorted(r["request_id"] for r in rows) == sent
            assert {r["outcome"] for r in rows if r["request_id"] not in victim_ids} == {
                "shutdown"}
            _assert_intact(db)
        finally:
            if side is not None:
                side.stop(signal.SIGKILL)
            for w in clients:
                w.close()
            await mock.stop()

    asyncio.run(main())
