"""The sidecar as users run it: `sidecar run` / `sidecar check` processes, signals, RSS."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from e2e_helpers import request_bytes

from sidecar.http1 import ResponseParser

PY = sys.executable
# Hard bounds so a broken sidecar cannot hang the suite.
START_TIMEOUT = 20.0
STOP_TIMEOUT = 40.0


class Proc:
    def __init__(self, args: list[str], log: pathlib.Path) -> None:
        self.log = log
        self.fh = open(log, "wb")  # closed in stop()
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.fh,
                                  env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def wait_for_log(self, needle: str) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            for line in text.splitlines():
                if needle in line:
                    return line
            if self.p.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"never saw {needle!r}; log:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            code = self.p.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.p.kill()
            code = self.p.wait()
        self.fh.close()
        return code


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    made: list[Proc] = []
    yield made
    for p in made:
        if p.p.poll() is None:
            p.stop(signal.SIGKILL)


def start_mock(procs: list[Proc], tmp: pathlib.Path, *args: str) -> int:
    proc = Proc([PY, "-m", "sidecar", "mock-upstream", "--port", "0", *args], tmp / "mock.log")
    procs.append(proc)
    assert proc.p.stdout is not None
    line = proc.p.stdout.readline().decode().strip()
    assert line.startswith("http://127.0.0.1:"), line
    return int(line.rsplit(":", 1)[1])


def start_sidecar(procs: list[Proc], tmp: pathlib.Path, mock_port: int,
                  extra: str = "") -> tuple[Proc, int]:
    cfg = tmp / "sidecar.yaml"
    cfg.write_text(
        "listen: 127.0.0.1:0\n"
        "routes:\n"
        "  - path: /v1/chat/completions\n"
        f"    upstreams: [{{ target: http://127.0.0.1:{mock_port} }}]\n"
        # The same OpenAI-format mock for Anthropic clients: translated both ways.
        "  - path: /v1/messages\n"
        "    upstreams: [{ target: mock }]\n"
        "upstreams:\n"
        f"  mock: {{ url: http://127.0.0.1:{mock_port}, format: openai }}\n"
        "meter:\n"
        "  db: ./meter.db\n" + extra
    )
    proc = Proc([PY, "-m", "sidecar", "run", "-c", str(cfg)], tmp / "sidecar.log")
    procs.append(proc)
    line = proc.wait_for_log("listening on http://")
    port = int(line.split("http://127.0.0.1:", 1)[1].split()[0])
    return proc, port


def rss_kb(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def chat_request(body: dict[str, Any], *headers: tuple[bytes, bytes]) -> bytes:
    return request_bytes("POST", "/v1/chat/completions", body, headers=headers)


CLOSE = (b"connection", b"close")
CHAT = {"model": "gpt-4o-mini", "stream": True,
        "messages": [{"role": "user", "content": "hello"}]}


def test_check_prints_file_line_and_field_for_a_broken_config(tmp_path: pathlib.Path) -> None:
    cfg = tmp_path / "broken.yaml"
    cfg.write_text(
        "listen: 127.0.0.1:8080\n"
        "routes:\n"
        "  - path: /v1/chat/completions\n"
        "    upstreams:\n"
        "      - target: http://127.0.0.1:9000\n"
        "        weight: fifty\n"
    )
    res = subprocess.run([PY, "-m", "sidecar", "check", "-c", str(cfg)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert f"{cfg}:6: routes[0].upstreams[0].weight:" in res.stderr, res.stderr
    ok = tmp_path / "ok.yaml"
    ok.write_text("listen: 127.0.0.1:8080\nroutes:\n  - path: /v1/chat/completions\n"
                  "    upstreams: [{ target: http://127.0.0.1:9000 }]\n")
    res = subprocess.run([PY, "-m", "sidecar", "check", "-c", str(ok)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("mode", ["verbatim", "reframed", "translated"])
def test_slow_client_on_50mb_stream_keeps_sidecar_rss_bounded(
        tmp_path: pathlib.Path, procs: list[Proc], mode: str) -> None:
    mock_port = start_mock(procs, tmp_path)
    side, port = start_sidecar(procs, tmp_path, mock_port)
    pid = side.p.pid
    # Warm up: first request loads the tokenizer, the tap, the pool.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(chat_request(CHAT, CLOSE))
        while s.recv(65536):
            pass
    time.sleep(0.2)
    base = rss_kb(pid)
    peak = base
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_kb(pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    total = 50 * 1000 * 1000
    got = 0
    tail = b""
    body = dict(CHAT)
    request = chat_request
    if mode == "verbatim":  # the client wants usage: chunk frames pass through verbatim
        body["stream_options"] = {"include_usage": True}
    elif mode == "translated":  # an Anthropic client: every event rewritten on the way
        body["max_tokens"] = 100

        def request(body: dict[str, Any], *headers: tuple[bytes, bytes]) -> bytes:
            return request_bytes("POST", "/v1/messages", body, headers=headers)
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.settimeout(20)
        sock.connect(("127.0.0.1", port))
        sock.sendall(request(body, (b"x-mock-bytes", b"%d" % total), CLOSE))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            data = sock.recv(64 * 1024)
            if not data:
                break
            got += len(data)
            tail = (tail + data)[-64:]
            time.sleep(0.0005)  # a reader slower than loopback: the sidecar must hold back
        sock.close()
    finally:
        stop.set()
        sampler.join()
    # The whole stream arrived (mock's 50 MB of SSE, less the hidden usage fields when
    # reframed; translated, Anthropic's text_delta events are about as long as the chunks).
    assert got >= (0.8 if mode == "translated" else 0.95) * total, f"received only {got} bytes"
    end = b'event: message_stop\ndata: {"type":"message_stop"}\n\n' if mode == "translated" \
        else b"data: [DONE]\n\n"
    assert tail.endswith(end + b"\r\n0\r\n\r\n"), tail
    growth_mb = (peak - base) / 1024
    print(f"sidecar RSS base {base / 1024:.1f} MB, peak {peak / 1024:.1f} MB, "
          f"growth {growth_mb:.1f} MB over a {got / 1e6:.0f} MB stream")
    assert growth_mb < 10, growth_mb
    assert side.stop() == 0


async def _client_worker(port: int, n: int, in_last: asyncio.Event, results: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i in range(n):
            writer.write(chat_request(CHAT))
            parser = ResponseParser(65536)
            while parser.head is None:
                data = await reader.read(65536)
                assert data, "sidecar closed the connection before the head"
                parser.feed(data)
            if i == n - 1:
                in_last.set()  # our final request is being streamed: safe to SIGTERM now
            while not parser.done:
                data = await reader.read(65536)
                assert data, "stream cut before its end"
                parser.feed(data)
            results.append(parser.head.status)
    finally:
        writer.close()


def test_1000_requests_then_sigterm_lose_no_rows(tmp_path: pathlib.Path, procs: list[Proc]) -> None:
    mock_port = start_mock(procs, tmp_path, "--chunks", "5", "--delay-ms", "20")
    side, port = start_sidecar(procs, tmp_path, mock_port)
    workers, per = 50, 20
    results: list[int] = []

    async def run() -> None:
        flags = [asyncio.Event() for _ in range(workers)]
        tasks = [asyncio.create_task(_client_worker(port, per, flags[i], results))
                 for i in range(workers)]
        await asyncio.wait_for(asyncio.gather(*(f.wait() for f in flags)), 60)
        side.p.send_signal(signal.SIGTERM)  # every worker has its last stream in flight
        await asyncio.wait_for(asyncio.gather(*tasks), 60)

    asyncio.run(run())
    assert side.stop() == 0
    assert len(results) == workers * per and set(results) == {200}
    con = sqlite3.connect(tmp_path / "meter.db")
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("SELECT count(*) FROM requests").fetchone()[0] == 1000
        assert con.execute("SELECT count(*) FROM requests WHERE outcome='ok' AND "
                           "usage_source='reported'").fetchone()[0] == 1000
    finally:
        con.close()


def _children(pid: int) -> set[int]:
    path = pathlib.Path(f"/proc/{pid}/task/{pid}/children")
    return {int(x) for x in path.read_text().split()}


def status_of(port: int, request: bytes, timeout: float = 10.0) -> int:
    """Send one request that asks for ``connection: close``; the response's status,
    after reading it to the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    parser = ResponseParser(65536)
    parser.feed(data)
    assert parser.head is not None
    return parser.head.status


def _one_request(port: int) -> int:
    return status_of(port, chat_request(CHAT, CLOSE))


def kill_a_worker_and_await_its_replacement(side: Proc) -> int:
    """SIGKILL the lowest-pid worker of a ``workers: 2`` supervisor and wait (bounded)
    until the supervisor has two workers again; the victim's pid."""
    victim = sorted(_children(side.p.pid))[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        now = _children(side.p.pid)
        if len(now) == 2 and victim not in now:
            break
        time.sleep(0.1)
    return victim


def test_two_workers_share_the_port_and_a_crashed_worker_is_replaced(
        tmp_path: pathlib.Path, procs: list[Proc]) -> None:
    mock_port = start_mock(procs, tmp_path)
    side, port = start_sidecar(procs, tmp_path, mock_port, "workers: 2\n")
    deadline = time.monotonic() + START_TIMEOUT
    while len(_children(side.p.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    kids = _children(side.p.pid)
    assert len(kids) == 2  # the supervisor announced the port only once both listen
    assert [_one_request(port) for _ in range(10)] == [200] * 10
    # No pause for the meter to commit: what the victim had not committed yet is in its
    # crash journal, which the replacement worker records at its start.
    victim = kill_a_worker_and_await_its_replacement(side)
    assert victim == sorted(kids)[0]
    now = _children(side.p.pid)
    assert victim not in now and len(now) == 2, now
    time.sleep(3.0)  # the replacement imports and binds; the survivor serves meanwhile
    assert [_one_request(port) for _ in range(10)] == [200] * 10
    assert side.stop() == 0
    con = sqlite3.connect(tmp_path / "meter.db")
    try:
        assert con.execute("SELECT count(*) FROM requests").fetchone()[0] == 20
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        con.close()
