"""SIGHUP reload of a real `sidecar run` process while streams are in flight."""

from __future__ import annotations

import pathlib
import signal
import socket
import time

from test_process_e2e import CHAT, CLOSE, PY, Proc, chat_request, procs, start_mock  # noqa: F401

from sidecar.http1 import ResponseParser

PY_STREAMS = 200


def _config(a: int, b: int, weight_a: int, weight_b: int) -> str:
    return ("listen: 127.0.0.1:0\n"
            "upstreams:\n"
            f"  a: {{ url: 'http://127.0.0.1:{a}' }}\n"
            f"  b: {{ url: 'http://127.0.0.1:{b}' }}\n"
            "routes:\n"
            "  - path: /v1/chat/completions\n"
            f"    upstreams: [{{ target: a, weight: {weight_a} }}, "
            f"{{ target: b, weight: {weight_b} }}]\n"
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
    cfg.write_text(_config(a, b, 1, 0))  # b on standby
    side = Proc([PY, "-m", "sidecar", "run", "-c", str(cfg)], tmp_path / "sidecar.log")
    procs.append(side)
    line = side.wait_for_log("listening on http://")
    port = int(line.split("http://127.0.0.1:", 1)[1].split()[0])
    assert [_one(port) for _ in range(4)] == [(200, "a")] * 4

    socks = []
    for _ in range(PY_STREAMS):
        s = socket.create_connection(("127.0.0.1", port), timeout=20)
        s.sendall(chat_request(CHAT, CLOSE))
        socks.append(s)
    time.sleep(0.3)  # all in flight on the old config

    cfg.write_text(_config(a, b, 1, 3))
    side.p.send_signal(signal.SIGHUP)
    side.wait_for_log("reloaded")
    # New requests follow the new weights (smooth weighted round-robin: exactly 1:3).
    served = [_one(port) for _ in range(8)]
    assert all(status == 200 for status, _ in served)
    assert sorted(up or "" for _, up in served) == ["a"] * 2 + ["b"] * 6

    broken = 0
    for s in socks:
        parser = _read_all(s)
        broken += not (parser.head is not None and parser.head.status == 200 and parser.done)
        s.close()
    assert broken == 0

    cfg.write_text(_config(a, b, 0, 1) + "  queue_size: lots\n")
    side.p.send_signal(signal.SIGHUP)
    refused = side.wait_for_log("reload refused")
    assert f"{cfg}:10: meter.queue_size:" in refused, refused
    # Still serving the last good config (1:3), not the refused one (b only).
    assert sorted(_one(port)[1] or "" for _ in range(4)) == ["a", "b", "b", "b"]
    assert side.stop() == 0

