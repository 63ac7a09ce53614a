"""Choosing the VLM backend, and the log-probability read-out's math (no vLLM needed).

The vLLM backend reads log-probabilities where the transformers path reads logits; the
restricted softmax must give the same distribution, and a server that does not return
every score token must be refused rather than read as probability 0.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from inference.engine import create_engine
from inference.errors import EngineError
from inference.vlm.prompting import ScoreTokens
from inference.vlm.readout import SliceReadout, digit_distribution
from inference.vlm.vllm_backend import VllmBackend, readout_from_logprobs
from node.config import EngineSettings

TOKENS = ScoreTokens(prefix_ids=(5, 6), digit_ids=(10, 11, 12, 13, 14), separator_ids=(7,),
                     decimal_ids=tuple(range(20, 30)))


def _logprobs(logits: torch.Tensor) -> dict[int, float]:
    return dict(enumerate(torch.log_softmax(logits.double(), -1).tolist()))


def test_logprob_readout_equals_the_logit_readout() -> None:
    torch.manual_seed(0)
    digit_logits = torch.randn(40) * 3
    decimal_logits = [torch.randn(40) * 3 for _ in range(4)]
    ours = readout_from_logprobs(
        TOKENS, [_logprobs(digit_logits), *(_logprobs(x) for x in decimal_logits)]
    )
    digits = digit_distribution(digit_logits[None], TOKENS)[0].tolist()
    decimals = [torch.softmax(x[list(TOKENS.decimal_ids)].double(), -1).tolist()
                for x in decimal_logits]
    theirs = SliceReadout.from_digits(digits, [*decimals, [1.0]])
    assert ours.probabilities == pytest.approx(theirs.probabilities, abs=1e-12)
    assert ours.expected == pytest.approx(theirs.expected, abs=1e-12)
    assert ours.std == pytest.approx(theirs.std, abs=1e-12)


def test_a_missing_score_token_is_an_error_not_probability_zero() -> None:
    answer = _logprobs(torch.zeros(40))
    del answer[12]
    with pytest.raises(EngineError, match=r"no log-probability for token ids \[12\]"):
        readout_from_logprobs(ScoreTokens((5,), (10, 11, 12, 13, 14)), [answer])


def test_masked_score_tokens_are_refused() -> None:
    answer = dict.fromkeys(range(40), float("-inf"))
    with pytest.raises(EngineError, match="logprobs-mode"):
        readout_from_logprobs(ScoreTokens((5,), (10, 11, 12, 13, 14)), [answer])


def test_engine_settings_backend() -> None:
    model = Path("/models/medgemma")
    settings = EngineSettings(name="vlm", model=model, backend="vllm",
                              vllm_url="http://gpu1:8000")
    assert settings.backend == "vllm"
    assert EngineSettings(name="vlm", model=model).backend == "transformers"
    with pytest.raises(ValidationError, match="needs backend"):
        EngineSettings(name="vlm", model=model, vllm_url="http://gpu1:8000")
    with pytest.raises(ValidationError):
        EngineSettings(name="vlm", model=model, backend="vllm", vllm_url="file:///etc/passwd")
    with pytest.raises(ValidationError):
        EngineSettings(name="vlm", model=model, backend="tgi")  # type: ignore[arg-type]


def test_create_engine_builds_the_vllm_backend_lazily(tiny_gemma_dir: Path) -> None:
    engine = create_engine("vlm", model=tiny_gemma_dir, device="cpu", backend="vllm",
                           vllm_url="http://127.0.0.1:9")  # nothing listens: not contacted
    backend = engine._backend  # type: ignore[attr-defined]
    assert isinstance(backend, VllmBackend)
    assert backend.options.url == "http://127.0.0.1:9"
    with pytest.raises(EngineError, match="unreachable"):
        backend.read_scores([Image.new("RGB", (64, 64))])
    with pytest.raises(EngineError, match="unknown VLM backend"):
        create_engine("vlm", model=tiny_gemma_dir, backend="tgi")
    with pytest.raises(EngineError, match="backend is 'transformers'"):
        create_engine("vlm", model=tiny_gemma_dir, vllm_url="http://127.0.0.1:9")
