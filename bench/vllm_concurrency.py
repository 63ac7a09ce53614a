"""16 series one after another against 16 at once, through one real vLLM server (CPU).

The test (tests/test_vlm_vllm.py) proves the batching by the server's engine-step count;
this measures what it buys in wall time, on two random Gemma 3 models built on the fly:
the test suite's tiny one (hidden 64, 1 layer: its step is cheaper than the server's
handling of a request, so there is little to batch) and a wider one (hidden 512, 8 layers:
a step of ~10 ms, so requests sent at once meet in the engine, as on a GPU with MedGemma).

    QCNODE_VLLM_PYTHON=~/.cache/qcnode/venv-vllm/bin/python \\
        .venv/bin/python bench/vllm_concurrency.py [--rounds 3]

Prints, per model and round, the seconds for 16 in a row and 16 at once, the ratio and
the server's engine steps for each; the medians at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from inference.vlm import VlmEngine  # noqa: E402
from inference.vlm.source import resolve_source  # noqa: E402
from inference.vlm.vllm_backend import VllmBackend, VllmOptions  # noqa: E402
from tests.support.prepared import random_series  # noqa: E402
from tests.support.tiny_gemma import TINY_IMAGE_SIZE, build_tiny_gemma, tiny_card  # noqa: E402
from tests.support.vllm import vllm_python, vllm_server  # noqa: E402
from tests.test_vlm_vllm import _server_counts  # noqa: E402

MODELS = {"tiny (hidden 64, 1 layer)": (64, 1), "wide (hidden 512, 8 layers)": (512, 8)}


def measure(model: Path, log: Path, rounds: int) -> list[tuple[float, float, float, float]]:
    """Per round: seconds in a row, seconds at once, engine steps for each."""
    out = []
    with vllm_server(vllm_python(), model, log) as url:
        backend = VllmBackend(resolve_source(model), VllmOptions(url=url))
        engine = VlmEngine(model, device="cpu", backend=backend)
        batch = [random_series(2, seed=100 + i, series=7, size=TINY_IMAGE_SIZE)
                 for i in range(16)]
        engine.assess(batch[0])  # warm-up and the server's prompt check
        for _ in range(rounds):
            before, start = _server_counts(url), time.perf_counter()
            for series in batch:
                engine.assess(series)
            between, middle = _server_counts(url), time.perf_counter()
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(engine.assess, batch))
            after, end = _server_counts(url), time.perf_counter()
            out.append((middle - start, end - middle, between["steps"] - before["steps"],
                        after["steps"] - between["steps"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qcnode-bench-vllm-") as tmp:
        for name, (hidden, layers) in MODELS.items():
            model = build_tiny_gemma(Path(tmp) / f"m{hidden}", for_vllm=True, hidden=hidden,
                                     text_layers=layers)
            tiny_card().save(model)
            rows = measure(model, Path(tmp) / f"server{hidden}.log", args.rounds)
            for seq, conc, s_steps, c_steps in rows:
                print(f"{name}: in a row {seq:.2f} s ({s_steps:.0f} steps), at once "
                      f"{conc:.2f} s ({c_steps:.0f} steps), ratio {conc / seq:.2f}", flush=True)
            print(f"{name}: median ratio "
                  f"{statistics.median(c / s for s, c, _, _ in rows):.2f}", flush=True)


if __name__ == "__main__":
    main()
