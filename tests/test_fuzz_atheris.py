"""A bounded coverage-guided fuzzing pass (tests/fuzz_atheris.py) in the test suite.

Runs only where atheris is installed (``pip install atheris``; .ci/run installs it when
it can): libFuzzer mutates raw bytes through every target of tests/fuzz_targets.py for
``ATHERIS_SECONDS`` and must find nothing. A failure prints the failing input, which
``python tests/fuzz_atheris.py <crash file>`` replays.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# Bounded so that the whole fuzzing budget (this and tests/test_fuzz.py) stays near a
# minute of CI; SIDECAR_ATHERIS_SECONDS runs it longer.
ATHERIS_SECONDS = int(os.environ.get("SIDECAR_ATHERIS_SECONDS", "15"))
PER_INPUT_TIMEOUT_S = 10  # libFuzzer's -timeout: one input that long is a hang

pytestmark = pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                                reason="atheris is not installed (pip install atheris)")


@pytest.mark.timeout(ATHERIS_SECONDS + 90)
def test_atheris_finds_nothing_in_a_bounded_run(tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    proc = subprocess.run(
        [sys.executable, str(HERE / "fuzz_atheris.py"), f"-max_total_time={ATHERIS_SECONDS}",
         f"-timeout={PER_INPUT_TIMEOUT_S}", "-rss_limit_mb=2048",
         f"-artifact_prefix={tmp_path}/", str(tmp_path / "corpus")],
        capture_output=True, text=True, cwd=tmp_path, timeout=ATHERIS_SECONDS + 60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])},
    )
    crashes = sorted(p.name for p in tmp_path.glob("crash-*"))
    assert proc.returncode == 0 and not crashes, (
        f"atheris exit {proc.returncode}, {crashes}:\n{proc.stderr[-4000:]}")
    done = [line for line in proc.stderr.splitlines() if line.startswith("Done ")]
    assert done and int(done[-1].split()[1]) > 0, proc.stderr[-2000:]
