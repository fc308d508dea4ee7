"""SIGHUP reload of a real `sidecar run` process while streams are in flight."""

from __future__ import annotations

import pathlib
import signal
import socket
import time

from test_process_e2e import CHAT, CLOSE, PY, Proc, chat_request, procs, start_mock  # noqa: F401

from sidecar.http1 import ResponseParser

PY_STREAMS = 100


def _config(mock_port: int) -> str:
    return ("listen: 127.0.0.1:0\n"
            "routes:\n"
            "  - path: /v1/chat/completions\n"
            f"    upstreams: [{{ target: http://127.0.0.1:{mock_port} }}]\n"
            "meter:\n"
            "  db: ./meter.db\n")


def _read_all(sock: socket.socket) -> ResponseParser:
    """Read one response to its end (or to the connection's)."""
    parser = ResponseParser(65536)
    while not parser.done:
        data = sock.recv(65536)
        if not data:
            break
        parser.feed(data)
    return parser


def _one(port: int) -> tuple[int, str | None]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(chat_request({**CHAT, "stream": False}, CLOSE))
        parser = _read_all(s)
        assert parser.head is not None
        up = parser.head.get(b"x-sidecar-upstream")
        return parser.head.status, up.decode() if up else None


def test_sighup_swaps_the_config_without_breaking_streams_and_refuses_a_bad_one(
        tmp_path: pathlib.Path, procs: list[Proc]) -> None:  # noqa: F811
    a = start_mock(procs, tmp_path, "--chunks", "30", "--delay-ms", "40")
    b = start_mock(procs, tmp_path, "--chunks", "30", "--delay-ms", "40")
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(_config(a))
    side = Proc([PY, "-m", "sidecar", "run", "-c", str(cfg)], tmp_path / "sidecar.log")
    procs.append(side)
    line = side.wait_for_log("listening on http://")
    port = int(line.split("http://127.0.0.1:", 1)[1].split()[0])
    status, before = _one(port)
    assert status == 200 and before is not None

    socks = []
    for _ in range(PY_STREAMS):
        s = socket.create_connection(("127.0.0.1", port), timeout=20)
        s.sendall(chat_request(CHAT, CLOSE))
        socks.append(s)
    time.sleep(0.3)  # all in flight on the old config

    cfg.write_text(_config(b))
    side.p.send_signal(signal.SIGHUP)
    side.wait_for_log("reloaded")
    status, after = _one(port)
    assert status == 200 and after is not None and after != before

    broken = 0
    for s in socks:
        parser = _read_all(s)
        broken += not (parser.head is not None and parser.head.status == 200 and parser.done)
        s.close()
    assert broken == 0

    cfg.write_text(_config(b) + "  queue_size: lots\n")
    side.p.send_signal(signal.SIGHUP)
    refused = side.wait_for_log("reload refused")
    assert f"{cfg}:7: meter.queue_size:" in refused, refused
    assert _one(port) == (200, after)  # still serving the last good config
    assert side.stop() == 0

