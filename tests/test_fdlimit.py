"""sidecar.fdlimit: the client budget arithmetic and the once-per-burst log (pure)."""

from __future__ import annotations

import logging

import pytest

from sidecar import fdlimit
from sidecar.fdlimit import FD_RESERVE, BurstLog, client_budget


def test_client_budget_leaves_one_provider_connection_each_the_pools_and_the_reserve() -> None:
    assert client_budget(1024, 128) == (1024 - FD_RESERVE - 128) // 2
    assert client_budget(1_048_576, 0) == (1_048_576 - FD_RESERVE) // 2
    assert client_budget(10, 500) == 1  # never zero: one client is always let in


def test_burst_log_one_error_per_burst_then_its_count(caplog: pytest.LogCaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fdlimit, "BURST_QUIET_S", 5.0)
    b = BurstLog(logging.getLogger("t.fd"), "out of file descriptors")
    with caplog.at_level(logging.INFO, logger="t.fd"):
        for t in range(100):
            b.hit(float(t) / 10, "detail")
        b.end_if_quiet(10.0)  # 0.1 s after the last: still the same burst
        b.end_if_quiet(15.0)
        b.hit(20.0, "again")
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("ERROR", "out of file descriptors: detail (logged once per burst)"),
        ("WARNING", "out of file descriptors: burst over, 100 in it"),
        ("ERROR", "out of file descriptors: again (logged once per burst)"),
    ]
