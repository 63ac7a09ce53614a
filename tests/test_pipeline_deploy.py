"""deploy/: the example config validates; units and compose name real commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_example_config_checks() -> None:
    run = subprocess.run([sys.executable, "-m", "node.cli", "config", "check",
                          str(DEPLOY / "qcnode.example.toml")],
                         check=False, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "OK" in run.stdout


def test_units_run_real_subcommands() -> None:
    serve = (DEPLOY / "systemd" / "qcnode.service").read_text()
    worker = (DEPLOY / "systemd" / "qcnode-worker@.service").read_text()
    assert "qcnode serve --config" in serve
    assert "qcnode worker --config /etc/qcnode/qcnode.toml --queues %i" in worker
    compose = (DEPLOY / "compose.yaml").read_text()
    for needle in ("runtime: nvidia", "rabbitmq", "postgres", '"--queues", "gpu"'):
        assert needle in compose
