"""``python -m bench instructions``: the callgrind count and the command prefix it relies on.

The end-to-end check runs the uvloop floor under valgrind for a short window (skipped,
and reported as skipped, where valgrind is not installed). Counts are not compared
with anything: they only have to exist, be positive and come from real requests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import contenders as C
from bench.instructions import CallgrindError, top_functions, total_ir

REPO = Path(__file__).resolve().parent.parent


def test_total_ir_sums_the_totals_of_every_process(tmp_path: Path) -> None:
    a = tmp_path / "cg.1"
    a.write_text("version: 1\nevents: Ir\nsummary: 900\nfn=x\n1 5\ntotals: 1000\n")
    b = tmp_path / "cg.2"
    b.write_text("version: 1\nevents: Ir\nsummary: 234\nfn=y\n1 234\n")  # no totals line
    assert total_ir([a, b]) == 1234


def test_total_ir_refuses_a_file_without_a_count(tmp_path: Path) -> None:
    f = tmp_path / "cg.3"
    f.write_text("version: 1\nevents: Ir\n")
    with pytest.raises(CallgrindError, match="no instruction count"):
        total_ir([f])


def test_command_prefix_applies_only_inside_its_block(tmp_path: Path) -> None:
    code = "import sys; print(sys.argv[1:])"
    with C.command_prefix([sys.executable, "-c", code]):
        inside = C.spawn(["marker"], tmp_path / "inside.log", None)
    inside.popen.wait(timeout=30)
    outside = C.spawn([sys.executable, "-c", code, "plain"], tmp_path / "outside.log", None)
    outside.popen.wait(timeout=30)
    assert (tmp_path / "inside.log").read_text().strip() == "['marker']"
    assert (tmp_path / "outside.log").read_text().strip() == "['plain']"


@pytest.mark.skipif(shutil.which("callgrind_annotate") is None, reason="valgrind not installed")
def test_top_functions_ranks_by_self_instructions_and_drops_build_paths(tmp_path: Path) -> None:
    f = tmp_path / "cg.4"
    f.write_text("version: 1\nevents: Ir\nsummary: 300\nfl=/build/tree/src/a.c\n"
                 "fn=cold\n1 100\nfn=hot\n2 200\ntotals: 300\n")
    top = top_functions([f])
    assert [(ir, fn) for ir, _, fn in top] == [(200, "a.c:hot"), (100, "a.c:cold")]
    assert abs(top[0][1] - 66.67) < 0.01


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind not installed")
def test_floor_counted_under_callgrind(tmp_path: Path) -> None:
    out = tmp_path / "ins"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "instructions", "--contenders", "uvloop-floor",
         "--seconds", "1", "--concurrency", "2", "--out", str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    (row,) = res["results"]
    assert "error" not in row, row
    assert row["requests"] > 0 and row["errors"] == 0
    # A floor request is tens of thousands of instructions at the very least.
    assert row["instructions_per_request"] > 10_000
    assert "valgrind" in row["cmdline"][0]
    md = (out / "results.md").read_text()
    assert "uvloop-floor" in md
    # Where its instructions go: the floor is a Python byte pump on uvloop.
    assert "C functions with the most self instructions" in md
    assert any("_PyEval_EvalFrameDefault" in fn for _, _, fn in row["top_self"])
