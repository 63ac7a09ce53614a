"""The model card: one JSON file that drives VLM inference and training alike.

The card lives as ``qcnode_card.json`` beside a LoRA adapter (or inside a merged model
directory). It fixes everything the two sides must agree on, so that the prompt a model
was trained with is the prompt it is asked at inference: the prompt text and its order
with the image, the answer format, the display window and image size, generation
settings, the digits whose probabilities give the score, and the revisions of the weights.

:data:`DEFAULT_CARD` reproduces the published CT-IQA recipe for MedGemma-4B-IT (prompt
text then image in one user turn; answer ``Score: X.X`` newline ``Reasoning: …``), so the
authors' released fine-tuned weights work unchanged.

This module never imports torch (the listener host reads cards to pick the window).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

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


class CardError(ValueError):
    """A model card file is missing a field, has a bad value, or cannot be read."""


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
        The strings whose probabilities are read; the i-th means score i.
    window_center, window_width, window_mode
        The display window in HU that turns CT slices into the model's RGB images
        (``"multi"``: three windows in the colour channels).
    image_size
        Side in pixels of the square image the vision tower takes (896 for MedGemma).
    max_new_tokens, greedy
        Generation settings for the explanation.
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
    problems: list[str] = []
    if not isinstance(card.prompt, str) or not card.prompt.strip():
        problems.append("prompt must be non-empty text")
    if not isinstance(card.answer_prefix, str) or not card.answer_prefix:
        problems.append("answer_prefix must be non-empty text")
    elif not card.answer_template.startswith(card.answer_prefix):
        problems.append("answer_template must start with answer_prefix")
    if len(card.score_tokens) < 2 or len(set(card.score_tokens)) != len(card.score_tokens):
        problems.append("score_tokens must be at least two distinct strings")
    if card.window_width <= 0:
        problems.append("window_width must be positive")
    if card.window_mode not in ("single", "multi"):
        problems.append("window_mode must be 'single' or 'multi'")
    if not isinstance(card.image_size, int) or card.image_size < 8:
        problems.append("image_size must be an integer of at least 8 pixels")
    if not isinstance(card.max_new_tokens, int) or card.max_new_tokens < 1:
        problems.append("max_new_tokens must be a positive integer")
    if not card.explain_slices or any(s not in _EXPLAIN_CHOICES for s in card.explain_slices):
        problems.append(f"explain_slices must be a non-empty list of {_EXPLAIN_CHOICES}")
    if card.disagreement_threshold < 0:
        problems.append("disagreement_threshold must be non-negative")
    try:
        card.answer(0.0, "x")
    except (KeyError, IndexError, ValueError) as exc:
        problems.append(f"answer_template does not format: {exc}")
    return problems


#: The published CT-IQA recipe (MedGemma-4B-IT, W350/L40, 896 px).
DEFAULT_CARD = ModelCard()


def resolve_card(model_dir: Path | None, adapter_dir: Path | None = None) -> ModelCard:
    """The card that goes with these weights: beside the adapter, else in the model
    directory (a merged model), else :data:`DEFAULT_CARD`. Torch-free (for the listener).
    """
    return ModelCard.find(adapter_dir, model_dir) or DEFAULT_CARD
