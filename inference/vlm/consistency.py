"""Keep a generated explanation from contradicting the read-out score. Torch-free.

The model writes ``Score: X.X`` and then its reasoning, and the answers it was trained
on (LDCTIQA's published explanations) repeat a rating inside the prose: "overall I would
rate it 3/4", "a score of 2.5 reflects …", "the image quality is excellent". The report's
score is the read-out (the model's score probabilities), not the number the generation
happened to write, so a rating in the prose is at best a duplicate and at worst a
contradiction the radiologist reads beside a different score.

:func:`check_ratings` finds every rating in the prose — numbers on the 0–4 scale after a
rating word or before ``/4`` / ``out of 4``, and the scale's words (bad · poor · fair ·
good · excellent) said of the image's quality — removes the sentences that carry them,
and reports each one that disagrees with the read-out by more than the card's
disagreement threshold (a word disagrees when the read-out's own word is more than one
step away). Sentences about measured quantities ("noise about 20 HU", "slice 3 of 40")
are not ratings and stay.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from inference.result import SCORE_LABELS, SCORE_MAX, score_label

_NUMBER = r"(?P<num>[0-4](?:[.,][0-9]+)?)(?![\d.,]*\d)"
_NOT_A_UNIT = r"(?!\s*(?:hu|mm|%|cm|ms|kv|mas|mgy|slices?)\b)"
_NUMERIC_RATINGS = (
    # "score of 3", "rated 2.5", "rating: 3", "grade 2", "I would give it 3"
    re.compile(
        r"(?ix)\b(?:score[sd]?|rat(?:ed|ing|e)|grade[sd]?|give\s+(?:it|this(?:\s+\w+)?))"
        r"\b[^.\n\d]{0,20}?" + _NUMBER + _NOT_A_UNIT
    ),
    # "3/4", "3.5 / 4", "3 out of 4"
    re.compile(r"(?ix)(?<![\d.])" + _NUMBER + r"\s*(?:/|out\s+of)\s*4(?:\.0)?\b"),
)
_WORDS = "|".join(SCORE_LABELS)
_WORD_RATING = re.compile(
    rf"(?ix)\b(?:overall|image|diagnostic|technical)?\s*quality\b[^.\n]{{0,30}}?"
    rf"\b(?:is|was|appears|seems|remains|as|:)\s+(?:\w+\s+)?(?P<word>{_WORDS})\b"
    rf"|\b(?P<word2>{_WORDS})\s+(?:overall\s+|image\s+|diagnostic\s+|technical\s+)?quality\b"
)
#: A sentence ends at . ! ? followed by a space or the end (not inside "1.5" or "0.7 mm").
_SENTENCE = re.compile(r".+?(?:[.!?]+(?=\s|$)|$)")


@dataclass(frozen=True)
class Rating:
    """A rating found in the prose: its text, the value on the 0–4 scale, and whether it
    disagrees with the read-out."""

    text: str
    value: float
    contradicts: bool


@dataclass(frozen=True)
class CheckedText:
    """The prose without its rating sentences, and the ratings found."""

    text: str
    ratings: tuple[Rating, ...]

    @property
    def contradictions(self) -> tuple[Rating, ...]:
        """The ratings that disagree with the read-out."""
        return tuple(r for r in self.ratings if r.contradicts)


def _ratings_in(sentence: str, readout: float, threshold: float) -> list[Rating]:
    """The ratings of one sentence, in order; one per number ("rate it 3/4" is one)."""
    found: list[tuple[int, Rating]] = []
    numbers: set[int] = set()  # where each numeric rating's number starts
    for pattern in _NUMERIC_RATINGS:
        for match in pattern.finditer(sentence):
            value = float(match.group("num").replace(",", "."))
            if value > SCORE_MAX or match.start("num") in numbers:
                continue
            numbers.add(match.start("num"))
            rating = Rating(match.group(0).strip(), value, abs(value - readout) > threshold)
            found.append((match.start(), rating))
    for match in _WORD_RATING.finditer(sentence):
        word = (match.group("word") or match.group("word2")).lower()
        steps = abs(SCORE_LABELS.index(word) - SCORE_LABELS.index(score_label(readout)))
        rating = Rating(match.group(0).strip(), float(SCORE_LABELS.index(word)), steps > 1)
        found.append((match.start(), rating))
    return [rating for _, rating in sorted(found, key=lambda item: item[0])]


def check_ratings(text: str, readout: float, threshold: float) -> CheckedText:
    """``text`` without the sentences that rate the image, and those ratings.

    ``readout`` is the read-out score the report states; ``threshold`` the card's
    disagreement threshold for numbers.
    """
    kept: list[str] = []
    ratings: list[Rating] = []
    for line in text.splitlines():
        parts: list[str] = []
        for sentence in _SENTENCE.findall(line):
            found = _ratings_in(sentence, readout, threshold)
            if found:
                ratings.extend(found)
            else:
                parts.append(sentence.strip())
        kept.append(" ".join(p for p in parts if p))
    cleaned = "\n".join(kept).strip()
    return CheckedText(re.sub(r"\n{3,}", "\n\n", cleaned), tuple(ratings))
