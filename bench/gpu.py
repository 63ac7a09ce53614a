"""GPU check of the VLM backends on random weights of MedGemma-4B-IT's exact shape.

One command, no download (the architecture is ``bench/medgemma_4b_it_config.json``; the
tokenizer is the offline test tokenizer, so only the special-token ids differ)::

    .venv/bin/python bench/gpu.py                      # both backends, GPU, < 10 min
    .venv/bin/python bench/gpu.py --vllm-python ~/.cache/qcnode/venv-vllm/bin/python
    .venv/bin/python bench/gpu.py --tiny               # tiny Gemma 3 on the CPU (tests)

For each backend (transformers: NF4 + peft path of the node; vLLM: bf16, in process) a
child process measures: the read-out time of one series (``--slices`` slices, digit and
decimal), the decode step time at batch 1/8/32/64, series per minute with explanations
(``--new-tokens`` generated per explained slice) for 1, 16 and 64 waiting series, and
peak memory (GPU: ``torch.cuda.max_memory_reserved``; CPU: peak RSS). The transformers
engine takes series one at a time (as a node worker does: its series/min is measured
on at most ``--seq-cap`` series); vLLM gets all waiting series' requests at once. Prints
one table and writes JSON (``--out``). Predictions: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from importlib import import_module
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIG = Path(__file__).with_name("medgemma_4b_it_config.json")
BATCHES = (1, 8, 32, 64)
WAITING = (1, 16, 64)


def build_model(out: Path, *, tiny: bool, new_tokens: int) -> Path:
    """Random weights (MedGemma-4B-IT's config, or the tiny Gemma 3), tokenizer, card."""
    from inference.card import DEFAULT_CARD
    from tests.support.tiny_gemma import build_tiny_gemma, tiny_card

    if tiny:
        build_tiny_gemma(out, for_vllm=True)
        replace(tiny_card(), max_new_tokens=new_tokens).save(out)
        return out
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from tests.support.tiny_gemma import to_hub_layout

    spec = json.loads(CONFIG.read_text())
    spec.pop("_comment", None)
    ids = _save_processor(out, spec["vision_config"]["image_size"], spec["mm_tokens_per_image"])
    spec.update(boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                image_token_index=ids["<image_soft_token>"])
    spec["text_config"].update(pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"],
                               eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model: Any = Gemma3ForConditionalGeneration(Gemma3Config(**spec))
        model = model.to(torch.bfloat16).eval()
    model.save_pretrained(out)
    del model
    to_hub_layout(out)
    replace(DEFAULT_CARD, max_new_tokens=new_tokens).save(out)
    return out


def _save_processor(out: Path, image_size: int, mm_tokens: int) -> dict[str, int]:
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    from tests.support.tiny_gemma import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer

    tokenizer: Any = build_tokenizer(newline_tokens=True)
    images = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size},
                                     image_mean=[0.5] * 3, image_std=[0.5] * 3)
    Gemma3Processor(image_processor=images, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                    image_seq_length=mm_tokens).save_pretrained(out)
    return {t: int(tokenizer.convert_tokens_to_ids(t)) for t in SPECIAL_TOKENS}


def _series(n: int, k: int, size: int, seed: int) -> list[Any]:
    from tests.support.prepared import random_series

    return [random_series(k, seed=seed + i, series=50 + i, size=size) for i in range(n)]


def _image_sets(n: int, k: int, size: int, seed: int) -> list[list[Any]]:
    """``n`` series of ``k`` random RGB slices as PIL images (no pydicom needed)."""
    from inference.vlm.prompting import to_image

    rng = np.random.default_rng(seed)
    return [[to_image(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(k)]
            for _ in range(n)]


def _timed(fn: Any, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_memory_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return float(torch.cuda.max_memory_reserved() / 2**20)
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _decode_steps(generate: Any, batch: int, short: int, long: int) -> float:
    """ms per decode step at ``batch``: the difference of two lengths removes prefill."""
    t_short = _timed(lambda: generate(batch, short), repeats=1)
    t_long = _timed(lambda: generate(batch, long), repeats=1)
    return 1000 * max(t_long - t_short, 0.0) / (long - short)


def measure_transformers(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """NF4 + peft path of :class:`VlmEngine`: read-out, decode steps, series/min."""
    import torch

    from inference.vlm import VlmEngine
    from inference.vlm.prompting import encode_batch, to_image

    engine = VlmEngine(model_dir, device="auto")
    lm, size = engine.loaded, engine.card.image_size
    one = _series(1, args.slices, size, seed=1)[0]
    out: dict[str, Any] = {"readout_ms": 1000 * _timed(lambda: engine.read_slices(one.slices))}
    image = to_image(one.slices[0].rgb)

    def generate(batch: int, tokens: int) -> None:
        inputs = encode_batch(lm.processor, engine.card, [image] * batch, dtype=lm.dtype,
                              device=lm.device)
        with torch.inference_mode():
            lm.model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens,
                              do_sample=False)

    out["decode_step_ms"] = {str(b): _decode_steps(generate, b, *args.steps) for b in BATCHES}
    out["series_per_min"] = {}
    for waiting in WAITING:
        batch = _series(min(waiting, args.seq_cap), args.slices, size, seed=1000)
        start = time.perf_counter()
        for series in batch:
            engine.assess(series)
        out["series_per_min"][str(waiting)] = 60 * len(batch) / (time.perf_counter() - start)
    out["peak_memory_mib"] = _peak_memory_mib()
    return out


def measure_vllm(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """vLLM in process (bf16 on a GPU): the same measurements, waiting series batched."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: memory
    import torch

    from inference.vlm.source import resolve_source
    from inference.vlm.vllm_backend import VllmBackend, VllmOptions

    gpu = torch.cuda.is_available()
    options = VllmOptions(dtype="bfloat16" if gpu else "float32", enforce_eager=not gpu,
                          max_model_len=4096 if gpu else 512, max_num_seqs=256 if gpu else 64)
    backend = VllmBackend(resolve_source(model_dir), options)
    size = backend.spec.card.image_size
    one = _image_sets(1, args.slices, size, seed=1)[0]
    out: dict[str, Any] = {"readout_ms": 1000 * _timed(lambda: backend.read_scores(one))}
    llm: Any = backend.runner.llm  # type: ignore[attr-defined]
    prompt = {"prompt_token_ids": list(backend.spec.ids), "multi_modal_data": {"image": one[0]}}

    def generate(batch: int, tokens: int) -> None:
        vllm: Any = import_module("vllm")
        params = vllm.SamplingParams(max_tokens=tokens, min_tokens=tokens, ignore_eos=True,
                                temperature=0.0)
        llm.generate([prompt] * batch, params, use_tqdm=False)

    out["decode_step_ms"] = {str(b): _decode_steps(generate, b, *args.steps) for b in BATCHES}
    out["series_per_min"] = {}
    for waiting in WAITING:
        sets = _image_sets(waiting, args.slices, size, seed=1000)
        start = time.perf_counter()
        images = [image for series in sets for image in series]
        readouts = backend.read_scores(images)
        picks = []
        for i in range(waiting):
            mine = readouts[i * args.slices:(i + 1) * args.slices]
            order = sorted(range(len(mine)), key=lambda j: mine[j].expected)
            chosen = {order[0], order[(len(order) - 1) // 2]}  # worst and median, as the card
            picks += [images[i * args.slices + j] for j in sorted(chosen)]
        backend.generate(picks)
        out["series_per_min"][str(waiting)] = 60 * waiting / (time.perf_counter() - start)
    out["peak_memory_mib"] = _peak_memory_mib()
    return out


def _rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("read-out, one series (ms)", f"{r['readout_ms']:.0f}")]
    rows += [(f"decode step, batch {b} (ms)", f"{r['decode_step_ms'][str(b)]:.1f}")
             for b in BATCHES]
    rows += [(f"series/min, {w} waiting", f"{r['series_per_min'][str(w)]:.1f}")
             for w in WAITING]
    return [*rows, ("peak memory (MiB)", f"{r['peak_memory_mib']:.0f}")]


def _table(results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    columns = {n: dict(_rows(r)) for n, r in results.items() if "error" not in r}
    blank = {"readout_ms": 0.0, "peak_memory_mib": 0.0,
             "decode_step_ms": dict.fromkeys(map(str, BATCHES), 0.0),
             "series_per_min": dict.fromkeys(map(str, WAITING), 0.0)}
    labels = [label for label, _ in _rows(blank)]
    lines = [f"{'':32}" + "".join(f"{n:>16}" for n in names)]
    for label in labels:
        lines.append(f"{label:32}" + "".join(
            f"{columns[n][label] if n in columns else 'error':>16}" for n in names))
    return "\n".join(lines)


def _child(backend: str, python: str, model_dir: Path, args: argparse.Namespace,
           part: Path) -> dict[str, Any]:
    cmd = [python, str(Path(__file__).resolve()), "--worker", backend, "--model-dir",
           str(model_dir), "--out", str(part), "--slices", str(args.slices),
           "--seq-cap", str(args.seq_cap), "--steps", *map(str, args.steps)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if run.returncode != 0 or not part.is_file():
        return {"error": run.stderr[-2000:]}
    result: dict[str, Any] = json.loads(part.read_text())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny Gemma 3, CPU, seconds")
    parser.add_argument("--backends", default="transformers,vllm")
    parser.add_argument("--vllm-python", default=sys.executable)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "gpu.json")
    parser.add_argument("--slices", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--seq-cap", type=int, default=None)
    parser.add_argument("--steps", type=int, nargs=2, default=None)
    parser.add_argument("--worker", choices=("transformers", "vllm"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.slices = args.slices or (2 if args.tiny else 8)
    args.seq_cap = args.seq_cap or (2 if args.tiny else 4)
    args.steps = args.steps or ([2, 6] if args.tiny else [8, 40])
    new_tokens = args.new_tokens or (8 if args.tiny else 128)
    if args.worker:
        measure = measure_vllm if args.worker == "vllm" else measure_transformers
        args.out.write_text(json.dumps(measure(args.model_dir, args)))
        return 0
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "model", tiny=args.tiny, new_tokens=new_tokens)
        for backend in args.backends.split(","):
            python = args.vllm_python if backend == "vllm" else sys.executable
            results[backend] = _child(backend, python, model_dir, args, Path(tmp) / backend)
    report = {"tiny": args.tiny, "slices": args.slices, "new_tokens": new_tokens,
              "seq_cap": args.seq_cap, "results": results}
    args.out.write_text(json.dumps(report, indent=2))
    print(_table(results))
    errors = [name for name, r in results.items() if "error" in r]
    for name in errors:
        print(f"{name} failed:\n{results[name]['error']}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
