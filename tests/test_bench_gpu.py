"""``bench/gpu.py --tiny``: the GPU check runs end to end on the CPU with the tiny Gemma 3.

The transformers backend always; vLLM (in process, from the vLLM venv) when installed.
Numbers on the tiny model mean nothing; the test checks that every figure of the table
is measured (positive) and written to the JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.vllm import vllm_env, vllm_python

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, backend: str, python: Path, timeout: float) -> dict[str, object]:
    out = tmp_path / "gpu.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--backends", backend,
         "--vllm-python", str(python), "--out", str(out)],
        capture_output=True, text=True, env=vllm_env(), timeout=timeout, check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "decode step, batch 64 (ms)" in run.stdout
    report = json.loads(out.read_text())
    result: dict[str, object] = report["results"][backend]
    return result


def _check(result: dict[str, object]) -> None:
    assert isinstance(result["readout_ms"], float) and result["readout_ms"] > 0
    steps, rates = result["decode_step_ms"], result["series_per_min"]
    assert isinstance(steps, dict) and set(steps) == {"1", "8", "32", "64"}
    assert isinstance(rates, dict) and set(rates) == {"1", "16", "64"}
    assert all(v > 0 for v in rates.values())
    assert isinstance(result["peak_memory_mib"], float) and result["peak_memory_mib"] > 0


@pytest.mark.timeout(300)
def test_gpu_bench_tiny_transformers(tmp_path: Path) -> None:
    _check(_run(tmp_path, "transformers", Path(sys.executable), timeout=240))


@pytest.mark.timeout(900)
def test_gpu_bench_tiny_vllm(tmp_path: Path) -> None:
    _check(_run(tmp_path, "vllm", vllm_python(), timeout=840))
