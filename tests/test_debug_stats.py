"""SIDECAR_DEBUG_STATS: the periodic stats line `bench soak` reads (sidecar/debug_stats.py)."""

from __future__ import annotations

import pathlib
import socket
import time

import pytest
from e2e_helpers import ClientConn, chat_body, request_bytes
from test_process_e2e import Proc, procs, start_mock, start_sidecar

from sidecar.debug_stats import (
    ENV_DEBUG_STATS,
    MIN_PERIOD_S,
    format_line,
    parse_line,
    period_from_env,
)

__all__ = ["procs"]  # the fixture, used below


@pytest.mark.parametrize(("raw", "want"), [
    (None, None), ("", None), ("  ", None), ("x", None), ("0", None), ("-1", None),
    ("nan", None), ("5", 5.0), (" 2.5 ", 2.5), ("0.01", MIN_PERIOD_S),
])
def test_period_from_env(raw: str | None, want: float | None) -> None:
    env = {} if raw is None else {ENV_DEBUG_STATS: raw}
    assert period_from_env(env) == want


def test_a_line_reads_back_as_written() -> None:
    line = format_line(12.04, {"tasks": 3, "conns": 16, "meter_written": 1820})
    assert line == "sidecar-stats t=12.0 tasks=3 conns=16 meter_written=1820"
    assert parse_line(line + "\n") == {"t": 12.0, "tasks": 3, "conns": 16, "meter_written": 1820}
    assert parse_line("2026-12-06 INFO sidecar.server: draining") is None
    assert parse_line("sidecar-stats t=1 tasks") is None
    assert parse_line("sidecar-stats t=1 tasks=x") is None


def _stats_lines(log: pathlib.Path) -> list[dict[str, float]]:
    return [p for p in map(parse_line, log.read_text(errors="replace").splitlines()) if p]


def test_a_running_sidecar_reports_its_tasks_connections_and_rows(
    tmp_path: pathlib.Path, procs: list[Proc], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_DEBUG_STATS, "0.2")
    mock_port = start_mock(procs, tmp_path)
    sidecar, port = start_sidecar(procs, tmp_path, mock_port)
    with ClientConn(port) as c:
        c.send(request_bytes("POST", "/v1/chat/completions", chat_body(stream=True)))
        assert c.read_response().status == 200
        # The connection is still open (kept alive) and the row is written.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            seen = [s for s in _stats_lines(sidecar.log)
                    if s["conns"] == 1 and s["meter_written"] == 1]
            if seen:
                break
            time.sleep(0.1)
        assert seen, sidecar.log.read_text()
        assert seen[-1]["tasks"] >= 1 and seen[-1]["meter_spilled"] == 0
    with socket.create_connection(("127.0.0.1", port)):
        pass
    assert sidecar.stop() == 0


def test_off_by_default(tmp_path: pathlib.Path, procs: list[Proc],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_DEBUG_STATS, raising=False)
    mock_port = start_mock(procs, tmp_path)
    sidecar, port = start_sidecar(procs, tmp_path, mock_port)
    with ClientConn(port) as c:
        c.send(request_bytes("POST", "/v1/chat/completions", chat_body()))
        assert c.read_response().status == 200
    time.sleep(0.5)
    assert sidecar.stop() == 0
    assert _stats_lines(sidecar.log) == []
