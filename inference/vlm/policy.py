"""When the VLM writes an explanation (a site's setting, ``[engine] explain``). Torch-free.

Generation is the expensive part of a VLM assessment (hundreds of decode steps per
explained slice against one forward pass for the score read-out), and a series that
reads out as good needs no paragraph of prose to be acted on. A site chooses:

* ``always``: the deciding slices of every series are explained (the default);
* ``below``: only series whose read-out score is below ``below`` (default 2.5, i.e.
  fair or worse) are explained; the others get the physics measurements in words;
* ``never``: no generation; every series gets the physics measurements in words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from inference.result import SCORE_MAX, SCORE_MIN

ExplainMode = Literal["always", "below", "never"]
EXPLAIN_MODES: tuple[ExplainMode, ...] = ("always", "below", "never")


@dataclass(frozen=True)
class ExplainPolicy:
    """Which series get a generated explanation."""

    mode: ExplainMode = "always"
    below: float = 2.5

    def __post_init__(self) -> None:
        if self.mode not in EXPLAIN_MODES:
            raise ValueError(f"explain must be one of {', '.join(EXPLAIN_MODES)}, not "
                             f"{self.mode!r}")
        if not SCORE_MIN <= self.below <= SCORE_MAX:
            raise ValueError(f"explain_below {self.below} is outside the 0–4 scale")

    def wants(self, score: float) -> bool:
        """Whether a series with read-out ``score`` gets a generated explanation."""
        return self.mode == "always" or (self.mode == "below" and score < self.below)
