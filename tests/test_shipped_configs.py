"""The files users start from: the example config, the systemd unit and the Dockerfile."""

from __future__ import annotations

import pathlib
import re

from sidecar.config import load_config

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_example_config_loads_with_the_container_environment() -> None:
    env = {"SIDECAR_LISTEN": "0.0.0.0:8080", "SIDECAR_METER_DB": "/var/lib/sidecar/meter.db"}
    cfg = load_config(str(REPO / "conf" / "sidecar.example.yaml"), env=env)
    assert (cfg.listen_host, cfg.listen_port) == ("0.0.0.0", 8080)
    assert cfg.meter.db == "/var/lib/sidecar/meter.db"


def test_systemd_unit_and_dockerfile_run_the_example_config() -> None:
    unit = (REPO / "systemd" / "sidecar.service").read_text()
    assert re.search(r"^ExecStart=\S*sidecar run -c \S+", unit, re.M)
    assert "KillSignal=SIGTERM" in unit
    docker = (REPO / "Dockerfile").read_text()
    assert '"sidecar", "run", "-c", "/app/conf/sidecar.example.yaml"' in docker
    assert "SIDECAR_TOKENIZER_DIR" in docker and "SIDECAR_METER_DB" in docker
