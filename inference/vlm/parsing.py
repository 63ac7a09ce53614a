"""Parse a generated answer (``Score: X.X`` newline ``Reasoning: …``) robustly. Torch-free.

Only the number written right after the score label counts: "the noise is about 20 HU"
or "slice 3 of 4" never become a score. Tolerated forms: ``Score: 3.2``, ``**Score:** 3``,
``Score: 3.2/4``, ``Score = 3,5``, ``score: 3 out of 4``. A value outside 0–4, or one
given on another scale (``/5``, ``/10``), is reported as a problem instead of a score.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from inference.result import SCORE_MAX, SCORE_MIN

_SCORE_RE = re.compile(
    r"""(?ix)
    (?<![a-z])score            # the label, not "underscore"
    [\s*_:=\-]*                # markdown, colon, equals
    (?:is\s+|of\s+)?
    (?P<num>[0-9]+(?:[.,][0-9]+)?)
    (?:\s*(?:/|out\s+of)\s*(?P<den>[0-9]+(?:\.[0-9]+)?))?
    """
)
_REASONING_RE = re.compile(r"(?i)[*_\s]*(?:reasoning|explanation)[*_\s]*[:\-][*_\s]*")


@dataclass(frozen=True)
class ParsedAnswer:
    """What a generated answer says: the written score (if any) and the explanation."""

    score: float | None
    reasoning: str
    problem: str | None = None


def parse_score(text: str) -> tuple[float | None, str | None]:
    """The score written after the first ``Score`` label, and a problem description.

    Returns ``(score, None)`` on success, ``(None, problem)`` otherwise.
    """
    match = _SCORE_RE.search(text)
    if match is None:
        return None, "no score after a 'Score:' label in the generated text"
    value = float(match.group("num").replace(",", "."))
    den = match.group("den")
    if den is not None and float(den) != SCORE_MAX:
        return None, f"generated score {match.group(0).strip()!r} is not on the 0–4 scale"
    if not SCORE_MIN <= value <= SCORE_MAX:
        return None, f"generated score {value:g} is outside the 0–4 scale"
    return value, None


def parse_answer(text: str, reasoning_prefix: str = "Reasoning:") -> ParsedAnswer:
    """Split a generated answer into its score and its explanation.

    The explanation is the text after the reasoning label when there is one, else the
    text without the score line.
    """
    score, problem = parse_score(text)
    reasoning = _reasoning(text, reasoning_prefix)
    return ParsedAnswer(score=score, reasoning=reasoning, problem=problem)


def _reasoning(text: str, reasoning_prefix: str) -> str:
    label = reasoning_prefix.rstrip(": ").strip()
    custom = re.compile(rf"(?i)[*_\s]*{re.escape(label)}[*_\s]*[:\-][*_\s]*") if label else None
    for pattern in (custom, _REASONING_RE):
        if pattern is None:
            continue
        match = pattern.search(text)
        if match is not None:
            return text[match.end():].strip()
    lines = [ln for ln in text.splitlines() if _SCORE_RE.search(ln) is None or len(ln) > 80]
    return "\n".join(lines).strip()
