"""The model card: published defaults, JSON round trip, validation, lookup; torch-free."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from inference.card import (
    CARD_FILENAME,
    DEFAULT_CARD,
    PUBLISHED_PROMPT,
    CardError,
    ModelCard,
    ScoreFormat,
    resolve_card,
)
from inference.errors import EngineError
from inference.prepare import Window

ROOT = Path(__file__).resolve().parents[1]


def test_default_card_is_the_published_recipe() -> None:
    assert DEFAULT_CARD.prompt == (
        "Evaluate the technical and diagnostic quality of this CT image. Predict a score from "
        "0 (very poor) to 4 (excellent), and explain your reasoning clearly. Provide both the "
        "numerical score and the explanation in your answer."
    )
    assert DEFAULT_CARD.prompt == PUBLISHED_PROMPT
    assert DEFAULT_CARD.image_first is False  # text, then image
    assert DEFAULT_CARD.answer(3.2, " Mild noise. ") == "Score: 3.2\nReasoning: Mild noise."
    assert DEFAULT_CARD.window == Window(center=40.0, width=350.0, mode="single")
    assert DEFAULT_CARD.score_tokens == ("0", "1", "2", "3", "4")
    assert DEFAULT_CARD.greedy is True
    assert DEFAULT_CARD.image_size == 896
    assert DEFAULT_CARD.score_format == ScoreFormat(decimals=1, separator=".")
    assert DEFAULT_CARD.max_batch == 8


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("Score: {score:.1f}\nReasoning: {reasoning}", ScoreFormat(1, ".")),
        ("Score: {score:.1f}/4\nReasoning: {reasoning}", ScoreFormat(1, ".")),
        ("Score: {score:.0f}\nReasoning: {reasoning}", ScoreFormat(0, "")),
        ("Score: {score:.0f}/4 because {reasoning}", ScoreFormat(0, "")),
    ],
)
def test_the_answer_template_fixes_the_score_format(
    template: str, expected: ScoreFormat
) -> None:
    assert replace(DEFAULT_CARD, answer_template=template).score_format == expected


def test_save_load_round_trip(tmp_path: Path) -> None:
    card = replace(
        DEFAULT_CARD, window_center=-300.0, window_width=1400.0, window_mode="multi",
        explain_slices=("worst",), base_model_revision="a" * 40, adapter_revision="v3",
    )
    path = card.save(tmp_path / "adapter")
    assert path.name == CARD_FILENAME
    loaded = ModelCard.load(tmp_path / "adapter")
    assert loaded == card
    assert loaded.window == Window(-300.0, 1400.0, "multi")
    assert json.loads(path.read_text())["explain_slices"] == ["worst"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompt": "  "}, "prompt"),
        ({"window_width": 0}, "window_width"),
        ({"window_mode": "rainbow"}, "window_mode"),
        ({"score_tokens": ["1"]}, "score_tokens"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_batch": 0}, "max_batch"),
        ({"max_batch": True}, "max_batch"),
        ({"answer_template": "Score: {score:g}\nReasoning: {reasoning}"},
         "same number of decimals"),
        ({"answer_template": "Score: {score:.2f}\nReasoning: {reasoning}"},
         "at most one decimal"),
        ({"score_tokens": ["a", "b", "c", "d", "e"]}, r"score_tokens\[0\] 'a'"),
        ({"answer_template": "Score: {score:.1f}\nReasoning: {reasoning}",
          "answer_prefix": "Score:"}, "does not start with score_tokens"),
        ({"explain_slices": ["random"]}, "explain_slices"),
        ({"answer_template": "Rating {score}"}, "answer_template"),
        ({"colour": "red"}, "unknown model card field"),
        ({"schema": 99}, "schema"),
    ],
)
def test_bad_card_fields_are_named(change: dict[str, object], message: str) -> None:
    data = {**DEFAULT_CARD.to_dict(), **change}
    with pytest.raises(CardError, match=message):
        ModelCard.from_dict(data)


def test_card_errors_are_engine_errors_and_value_errors() -> None:
    assert issubclass(CardError, EngineError) and issubclass(CardError, ValueError)


def test_unreadable_and_missing_cards(tmp_path: Path) -> None:
    with pytest.raises(CardError, match="no model card"):
        ModelCard.load(tmp_path)
    (tmp_path / CARD_FILENAME).write_text("{not json")
    with pytest.raises(CardError, match="cannot read"):
        ModelCard.load(tmp_path)
    (tmp_path / CARD_FILENAME).write_text("[1, 2]")
    with pytest.raises(CardError, match="JSON object"):
        ModelCard.load(tmp_path)


def test_card_lookup_prefers_the_adapter(tmp_path: Path) -> None:
    model, adapter = tmp_path / "model", tmp_path / "adapter"
    model.mkdir()
    adapter.mkdir()
    assert resolve_card(model, adapter) == DEFAULT_CARD
    replace(DEFAULT_CARD, adapter_revision="merged").save(model)
    assert resolve_card(model, adapter).adapter_revision == "merged"
    replace(DEFAULT_CARD, adapter_revision="beside-adapter").save(adapter)
    assert resolve_card(model, adapter).adapter_revision == "beside-adapter"
    assert resolve_card(model).adapter_revision == "merged"


def test_card_parsing_and_findings_never_import_torch() -> None:
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "import inference.card, inference.vlm, inference.vlm.parsing, inference.vlm.findings\n"
        "from inference.engine import EngineError, create_engine\n"
        "inference.card.resolve_card(None)\n"
        "inference.vlm.findings.extract_findings('moderate noise')\n"
        "try:\n"
        "    create_engine('vlm', model=Path('google/medgemma-4b-it'))\n"
        "except EngineError as exc:\n"
        "    assert 'hub id' in str(exc) and '--model DIR' in str(exc), exc\n"
        "    assert isinstance(exc, inference.vlm.ModelDirectoryError)\n"
        "else:\n"
        "    raise AssertionError('a hub id was accepted')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def test_packaged_default_card_matches_the_code() -> None:
    packaged = ROOT / "inference" / "cards" / "medgemma_ct_iqa.json"
    assert ModelCard.from_dict(json.loads(packaged.read_text())) == DEFAULT_CARD
