"""The model card: one JSON file that drives VLM inference and training alike.

The card lives as ``qcnode_card.json`` beside a LoRA adapter (or inside a merged model
directory). It fixes everything the two sides must agree on, so that the prompt a model
was trained with is the prompt it is asked at inference: the prompt text and its order
with the image, the answer format, the display window and image size, generation
settings, the digits whose probabilities give the score, the read-out's batch bound, and
the revisions of the weights.

The answer template also fixes how the score read-out reads a score: with ``{score:.1f}``
(``Score: X.X``) it reads the integer digit and the decimal digit after it, with
``{score:.0f}`` only the digit (:attr:`ModelCard.score_format`).

:data:`DEFAULT_CARD` reproduces the published CT-IQA recipe for MedGemma-4B-IT (prompt
text then image in one user turn; answer ``Score: X.X`` newline ``Reasoning: …``), so the
authors' released fine-tuned weights work unchanged.

This module never imports torch (the listener host reads cards to pick the window).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from inference.errors import EngineError

if TYPE_CHECKING:
    from inference.prepare import Window

CARD_FILENAME = "qcnode_card.json"
CARD_SCHEMA_VERSION = 1

PUBLISHED_PROMPT = (
    "Evaluate the technical and diagnostic quality of this CT image. Predict a score from 0 "
    "(very poor) to 4 (excellent), and explain your reasoning clearly. Provide both the "
    "numerical score and the explanation in your answer."
)

ExplainSlice = Literal["worst", "median", "best"]
_EXPLAIN_CHOICES = ("worst", "median", "best")


class CardError(EngineError, ValueError):
    """A model card file is missing a field, has a bad value, or cannot be read."""


@dataclass(frozen=True)
class ScoreFormat:
    """How the answer writes the score after ``answer_prefix``: ``3`` or ``3.2``.

    Attributes
    ----------
    decimals
        0 (the score digit only) or 1 (digit, separator, one decimal digit).
    separator
        The text between the digit and the decimal digit (``"."``); empty for 0 decimals.
    """

    decimals: int
    separator: str


@dataclass(frozen=True)
class ModelCard:
    """Everything inference and training must agree on for one set of weights.

    Attributes
    ----------
    prompt
        The user instruction.
    image_first
        Put the image before the text in the user turn (the published recipe: text first).
    answer_prefix
        What the answer starts with, up to the score digit; the score read-out
        teacher-forces it and reads the next-token probabilities of ``score_tokens``.
    answer_template
        ``str.format`` template of a training answer (``score``, ``reasoning``).
    reasoning_prefix
        The label before the explanation in a generated answer.
    score_tokens
        The strings whose probabilities are read; the i-th means score i, and the
        answer template must write score i starting with it.
    window_center, window_width, window_mode
        The display window in HU that turns CT slices into the model's RGB images
        (``"multi"``: three windows in the colour channels).
    image_size
        Side in pixels of the square image the vision tower takes (896 for MedGemma).
    max_new_tokens, greedy
        Generation settings for the explanation.
    max_batch
        At most this many slices go through the model in one batch (read-out and
        generation); bounds the memory of a series with many selected slices.
    explain_slices
        Which slices of a series get a generated explanation (by their read-out score).
    disagreement_threshold
        A note is added when the score written in the text and the read-out differ by
        more than this.
    base_model, base_model_revision, adapter_revision
        Where the weights came from (hub name, commit hash) — recorded in results and SRs.
    """

    prompt: str = PUBLISHED_PROMPT
    image_first: bool = False
    answer_prefix: str = "Score: "
    answer_template: str = "Score: {score:.1f}\nReasoning: {reasoning}"
    reasoning_prefix: str = "Reasoning:"
    score_tokens: tuple[str, ...] = ("0", "1", "2", "3", "4")
    window_center: float = 40.0
    window_width: float = 350.0
    window_mode: Literal["single", "multi"] = "single"
    image_size: int = 896
    max_new_tokens: int = 768
    greedy: bool = True
    max_batch: int = 8
    explain_slices: tuple[ExplainSlice, ...] = ("worst", "median")
    disagreement_threshold: float = 0.75
    base_model: str = "google/medgemma-4b-it"
    base_model_revision: str | None = None
    adapter_revision: str | None = None
    schema: int = CARD_SCHEMA_VERSION

    def __post_init__(self) -> None:
        problems = _validate(self)
        if problems:
            raise CardError("invalid model card: " + "; ".join(problems))

    # Derived ---------------------------------------------------------------------
    @property
    def window(self) -> Window:
        """The display window as :class:`inference.prepare.Window`."""
        from inference.prepare import Window

        return Window(center=self.window_center, width=self.window_width, mode=self.window_mode)

    def answer(self, score: float, reasoning: str) -> str:
        """A training answer in the card's format, e.g. ``Score: 3.2\\nReasoning: …``."""
        return self.answer_template.format(score=score, reasoning=reasoning.strip())

    def with_revisions(
        self, base_model_revision: str | None = None, adapter_revision: str | None = None
    ) -> ModelCard:
        """A copy with the given revisions filled in (``None`` keeps the current one)."""
        return replace(
            self,
            base_model_revision=base_model_revision or self.base_model_revision,
            adapter_revision=adapter_revision or self.adapter_revision,
        )

    @property
    def score_format(self) -> ScoreFormat:
        """How the answer template writes a score (decimals and separator)."""
        found = _score_format(self)
        if isinstance(found, str):  # unreachable for a validated card
            raise CardError(found)
        return found

    # JSON ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        data = asdict(self)
        data["score_tokens"] = list(self.score_tokens)
        data["explain_slices"] = list(self.explain_slices)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        """Build a card from a dict; unknown keys and wrong types raise :class:`CardError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CardError(f"unknown model card field(s): {', '.join(unknown)}")
        schema = data.get("schema", CARD_SCHEMA_VERSION)
        if schema != CARD_SCHEMA_VERSION:
            raise CardError(f"unsupported model card schema {schema!r}")
        values = dict(data)
        for key in ("score_tokens", "explain_slices"):
            if key in values:
                if not isinstance(values[key], list | tuple):
                    raise CardError(f"model card field {key} must be a list")
                values[key] = tuple(values[key])
        try:
            return cls(**values)
        except TypeError as exc:
            raise CardError(f"invalid model card: {exc}") from exc

    @classmethod
    def load(cls, directory: Path) -> ModelCard:
        """Read ``qcnode_card.json`` from ``directory``."""
        path = Path(directory) / CARD_FILENAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise CardError(f"no model card {CARD_FILENAME} in {directory}") from exc
        except (OSError, json.JSONDecodeError) as exc:
            raise CardError(f"cannot read model card {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise CardError(f"model card {path} must hold a JSON object")
        return cls.from_dict(data)

    @classmethod
    def find(cls, *directories: Path | None) -> ModelCard | None:
        """The card of the first directory that has one, or ``None``."""
        for directory in directories:
            if directory is not None and (Path(directory) / CARD_FILENAME).is_file():
                return cls.load(Path(directory))
        return None

    def save(self, directory: Path) -> Path:
        """Write ``qcnode_card.json`` into ``directory`` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CARD_FILENAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path


def _validate(card: ModelCard) -> list[str]:
    problems = _text_problems(card) + _setting_problems(card)
    if not problems:  # the template formats: check how it writes the score
        found = _score_format(card)
        if isinstance(found, str):
            problems.append(found)
    return problems


def _text_problems(card: ModelCard) -> list[str]:
    problems: list[str] = []
    if not isinstance(card.prompt, str) or not card.prompt.strip():
        problems.append("prompt must be non-empty text")
    if not isinstance(card.answer_prefix, str) or not card.answer_prefix:
        problems.append("answer_prefix must be non-empty text")
    elif not card.answer_template.startswith(card.answer_prefix):
        problems.append("answer_template must start with answer_prefix")
    if len(card.score_tokens) < 2 or len(set(card.score_tokens)) != len(card.score_tokens):
        problems.append("score_tokens must be at least two distinct strings")
    if not card.explain_slices or any(s not in _EXPLAIN_CHOICES for s in card.explain_slices):
        problems.append(f"explain_slices must be a non-empty list of {_EXPLAIN_CHOICES}")
    try:
        card.answer(0.0, "x")
    except (KeyError, IndexError, ValueError) as exc:
        problems.append(f"answer_template does not format: {exc}")
    return problems


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _setting_problems(card: ModelCard) -> list[str]:
    problems: list[str] = []
    if card.window_width <= 0:
        problems.append("window_width must be positive")
    if card.window_mode not in ("single", "multi"):
        problems.append("window_mode must be 'single' or 'multi'")
    if not isinstance(card.image_size, int) or card.image_size < 8:
        problems.append("image_size must be an integer of at least 8 pixels")
    if not _positive_int(card.max_new_tokens):
        problems.append("max_new_tokens must be a positive integer")
    if not _positive_int(card.max_batch):
        problems.append("max_batch must be a positive integer")
    if card.disagreement_threshold < 0:
        problems.append("disagreement_threshold must be non-negative")
    return problems


#: The number as written after the answer prefix: digits, then optionally a decimal
#: separator and more digits (``3``, ``3.2``, ``3,2``; in ``3/4`` the score is ``3``).
_WRITTEN_SCORE_RE = re.compile(r"(?P<int>[0-9]+)(?:(?P<sep>[.,])(?P<dec>[0-9]+))?")
#: Probe values: every integer score plus fractional ones (a ``{score:g}`` template
#: writes 2 and 2.6 with different numbers of decimals, which the read-out cannot follow).
_FRACTION_PROBES = (0.4, 1.6, 2.6)


def _score_format(card: ModelCard) -> ScoreFormat | str:
    """The answer's score format, or a problem description."""
    top = len(card.score_tokens) - 1
    probes = [float(i) for i in range(top + 1)] + [p for p in _FRACTION_PROBES if p < top]
    formats: set[tuple[int, str]] = set()
    for value in probes:
        written = card.answer(value, "x")[len(card.answer_prefix):]
        match = _WRITTEN_SCORE_RE.match(written)
        if value.is_integer() and not written.startswith(card.score_tokens[int(value)]):
            return (
                f"answer_template writes score {value:g} as {written[:8]!r}, which does not "
                f"start with score_tokens[{int(value)}] {card.score_tokens[int(value)]!r}"
            )
        if match is None:
            return f"answer_template writes score {value:g} without a number after answer_prefix"
        formats.add((len(match.group("dec") or ""), match.group("sep") or ""))
    if len(formats) != 1:
        return "answer_template must write every score with the same number of decimals"
    ((decimals, separator),) = formats
    if decimals > 1:
        return "answer_template may write at most one decimal (the read-out reads X or X.X)"
    return ScoreFormat(decimals=decimals, separator=separator)


#: The published CT-IQA recipe (MedGemma-4B-IT, W350/L40, 896 px).
DEFAULT_CARD = ModelCard()


def resolve_card(model_dir: Path | None, adapter_dir: Path | None = None) -> ModelCard:
    """The card that goes with these weights: beside the adapter, else in the model
    directory (a merged model), else :data:`DEFAULT_CARD`. Torch-free (for the listener).
    """
    return ModelCard.find(adapter_dir, model_dir) or DEFAULT_CARD
