"""VLM engine pipeline overhead per slice, on the tiny random Gemma 3 (CPU).

Everything the engine does except the model's own compute: PIL conversion, resizing
and normalising by the processor, prompt rendering and tokenization, batching, the
digit softmax, the generate loop's bookkeeping, decoding, parsing and finding
extraction. The model's compute is timed with forward hooks on the model (every
forward call of the read-out and of each generation step) and subtracted.

``bench/engines.py`` calls :func:`vlm_overhead`; run alone with
``.venv/bin/python bench/engines_vlm.py``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _series(k: int, size: int, seed: int = 0) -> Any:
    from inference.prepare import PreparedSeries, PreparedSlice

    rng = np.random.default_rng(seed)
    slices = tuple(
        PreparedSlice(
            sop_instance_uid=f"1.2.826.0.1.3680043.8.498.{i + 1}", frame=None, z=float(i),
            hu=np.zeros((size, size), np.float32), pixel_spacing=(0.7, 0.7),
            rgb=rng.integers(0, 256, (size, size, 3), dtype=np.uint8), index=i,
        )
        for i in range(k)
    )
    return PreparedSeries("1.2.826.0.1.3680043.8.498.90", "1.2.826.0.1.3680043.8.498.91",
                          "CT", "", slices, k)


class _ModelClock:
    """Accumulates wall time spent inside ``module.forward`` (outermost calls only)."""

    def __init__(self, module: Any) -> None:
        self.total = 0.0
        self._depth = 0
        self._start = 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, *_: Any) -> None:
        if self._depth == 0:
            self._start = time.perf_counter()
        self._depth += 1

    def _post(self, *_: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.total += time.perf_counter() - self._start


def vlm_overhead(k: int = 8, size: int = 512, repeats: int = 5) -> dict[str, float]:
    """Median per-slice timings (ms) of ``VlmEngine.assess`` on the tiny model.

    Returns ``total_ms_per_slice``, ``model_ms_per_slice`` and
    ``overhead_ms_per_slice`` (total minus model forward time), plus ``slices``.
    """
    from inference.vlm import VlmEngine
    from tests.support.tiny_gemma import build_tiny_gemma, tiny_card

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_gemma(Path(tmp) / "model")
        tiny_card().save(model_dir)
        engine = VlmEngine(model_dir, device="cpu")
        clock = _ModelClock(engine.loaded.model)
        series = _series(k, size)
        engine.assess(series)  # warm-up
        totals, models = [], []
        for _ in range(repeats):
            clock.total = 0.0
            t0 = time.perf_counter()
            engine.assess(series)
            totals.append(time.perf_counter() - t0)
            models.append(clock.total)
    total = statistics.median(totals) * 1000 / k
    model = statistics.median(models) * 1000 / k
    return {
        "slices": float(k), "total_ms_per_slice": total, "model_ms_per_slice": model,
        "overhead_ms_per_slice": total - model,
    }


def main() -> int:
    """Print the overhead for a 512×512, 8-slice series."""
    result = vlm_overhead()
    print(
        f"VLM pipeline on the tiny model, {int(result['slices'])} slices of 512×512: "
        f"total {result['total_ms_per_slice']:.1f} ms/slice, model forward "
        f"{result['model_ms_per_slice']:.1f} ms/slice, overhead "
        f"{result['overhead_ms_per_slice']:.1f} ms/slice"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
