"""Engine benchmarks: physics slices/s on a 512×512 series, prepare time for a 300-slice
series, synth speed; then the VLM engineer's overhead bench (bench/engines_vlm.py).

Run: ``.venv/bin/python bench/engines.py`` (also part of ``make bench``).
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.engine import create_engine
from inference.physics.measures import measure_slice
from inference.prepare import prepare_series
from inference.synth import SynthSpec, synthesize


def physics(work: Path) -> None:
    start = time.perf_counter()
    synthesize(SynthSpec(dose_levels=(0.25,), slices=32, size=512, seed=1), work / "s32")
    synth_s = time.perf_counter() - start
    print(f"synth: 32 slices of 512×512 in {synth_s:.1f} s ({32 / synth_s:.1f} slices/s)")
    series = prepare_series([work / "s32/dose0.25"], k=32)
    start = time.process_time()
    for s in series.slices:
        measure_slice(s.hu, s.pixel_spacing)
    cpu = time.process_time() - start
    print(f"physics measures: {len(series.slices) / cpu:.1f} slices/s "
          f"({1000 * cpu / len(series.slices):.0f} ms CPU per 512×512 slice)")


def end_to_end(work: Path) -> None:
    synthesize(SynthSpec(dose_levels=(1.0,), slices=300, size=512, seed=2), work / "s300")
    engine = create_engine("physics")
    start = time.perf_counter()
    series = prepare_series([work / "s300/dose1"], k=8)
    prepared = time.perf_counter() - start
    engine.assess(series)
    total = time.perf_counter() - start
    print(f"300-slice 512×512 series, k=8: prepare {prepared:.2f} s, prepare + physics "
          f"{total:.2f} s")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        physics(Path(tmp))
        end_to_end(Path(tmp))
    if importlib.util.find_spec("inference.vlm") is not None:
        vlm_bench = Path(__file__).with_name("engines_vlm.py")
        spec = importlib.util.spec_from_file_location("engines_vlm", vlm_bench)
        if spec is not None and spec.loader is not None:
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            module.main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
