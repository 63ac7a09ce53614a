"""Parsing generated answers and mapping explanations to coded findings (no model)."""

from __future__ import annotations

import pytest

from inference.result import FindingKind, Severity
from inference.vlm.consistency import check_ratings
from inference.vlm.findings import extract_findings, merge_findings
from inference.vlm.parsing import parse_answer, parse_score
from inference.vlm.policy import ExplainMode, ExplainPolicy


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Score: 3.2\nReasoning: good.", 3.2),
        ("Score: 3.2/4\nReasoning: …", 3.2),
        ("**Score:** 2\n**Reasoning:** noisy", 2.0),
        ("score = 1,5", 1.5),
        ("The score is 4 out of 4.", 4.0),
        ("Noise of 22 HU at slice 118. Score: 1.8", 1.8),  # never the unrelated numbers
        ("Score: 0.0", 0.0),
    ],
)
def test_score_is_the_number_after_the_label(text: str, expected: float) -> None:
    assert parse_score(text) == (expected, None)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("The image has noise of 22 HU and 3 streaks.", "no score"),
        ("", "no score"),
        ("Score: 7.5", "outside the 0–4 scale"),
        ("Score: 4/5", "not on the 0–4 scale"),
        ("Score: 8 out of 10", "not on the 0–4 scale"),
        ("Predict a score from 0 (very poor) to 4", "no score"),
        ("underscore 3", "no score"),
    ],
)
def test_missing_or_foreign_scores_are_problems(text: str, problem: str) -> None:
    score, message = parse_score(text)
    assert score is None
    assert message is not None and problem in message


def test_reasoning_is_split_from_the_score() -> None:
    parsed = parse_answer("Score: 2.4\nReasoning: Moderate noise; no streaks.")
    assert parsed.score == 2.4
    assert parsed.reasoning == "Moderate noise; no streaks."
    bare = parse_answer("Score: 1\nThe image is very noisy.")
    assert bare.reasoning == "The image is very noisy."
    custom = parse_answer("Score: 1\nWhy: blur", reasoning_prefix="Why:")
    assert custom.reasoning == "blur"


def _kinds(text: str) -> dict[FindingKind, Severity]:
    return {f.kind: f.severity for f in extract_findings(text)}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No streak artifacts are seen. Moderate noise is present throughout.",
         {FindingKind.NOISE: Severity.MODERATE}),
        ("There is no streak, motion or noise artifact, but the image is slightly blurred.",
         {FindingKind.BLUR: Severity.MILD}),
        ("The image shows mild noise and severe streaks from the hip prosthesis.",
         {FindingKind.NOISE: Severity.MILD, FindingKind.METAL_ARTIFACT: Severity.SEVERE}),
        ("Noise is low and the contrast is good; no motion.", {}),
        ("Low contrast between liver and spleen. Beam hardening is not seen.",
         {FindingKind.LOW_CONTRAST: Severity.MODERATE}),
        ("The field of view is truncated at the right side.",
         {FindingKind.TRUNCATED_FOV: Severity.MODERATE}),
        # the adjective scopes over the coordination: "marked (graininess and streaks)"
        ("Marked graininess and sparse-view streaks; cupping near the spine.",
         {FindingKind.NOISE: Severity.SEVERE, FindingKind.STREAK_ARTIFACT: Severity.SEVERE,
          FindingKind.BEAM_HARDENING: Severity.MODERATE}),
        ("Respiratory motion causes ghosting of the diaphragm.",
         {FindingKind.MOTION: Severity.MODERATE}),
        ("Image without noticeable noise, free of metal artifacts.", {}),
        ("Excellent image: sharp edges, good detail.", {}),
    ],
)
def test_findings_with_severity_and_negation(
    text: str, expected: dict[FindingKind, Severity]
) -> None:
    assert _kinds(text) == expected


def test_findings_carry_slice_and_statement() -> None:
    (finding,) = extract_findings("Severe noise obscures the liver.", "1.2.3.4")
    assert finding.sop_instance_uid == "1.2.3.4"
    assert finding.description == "Severe noise obscures the liver."


def test_merge_keeps_the_most_severe_per_kind() -> None:
    a = extract_findings("Mild noise.", "1.1")
    b = extract_findings("Severe noise; mild blur.", "1.2")
    merged = {f.kind: f for f in merge_findings([a, b])}
    assert merged[FindingKind.NOISE].severity is Severity.SEVERE
    assert merged[FindingKind.NOISE].sop_instance_uid == "1.2"
    assert merged[FindingKind.BLUR].severity is Severity.MILD


@pytest.mark.parametrize(
    ("text", "kept", "rated"),
    [
        # the published answers' habit: a rating repeated inside the prose
        ("Moderate noise in the liver. Overall I would rate it 3/4.",
         "Moderate noise in the liver.", [3.0]),
        ("A score of 1.5 reflects the heavy noise. Streaks from the hip prosthesis.",
         "Streaks from the hip prosthesis.", [1.5]),
        ("The overall image quality is excellent, with sharp edges.\nFat is dark.",
         "Fat is dark.", [4.0]),
        ("The image was rated 2 out of 4.", "", [2.0]),
        ("Good quality image with minimal noise.", "", [3.0]),
        # measured quantities are not ratings
        ("Noise about 20 HU; slice 3 of 4 shows streaks; edges 0.7 mm wide.",
         "Noise about 20 HU; slice 3 of 4 shows streaks; edges 0.7 mm wide.", []),
        ("The noise level scored 12 HU. Streak index 3.5 HU.",
         "The noise level scored 12 HU. Streak index 3.5 HU.", []),
    ],
)
def test_ratings_inside_the_prose_are_taken_out(text: str, kept: str, rated: list[float]
                                                 ) -> None:
    checked = check_ratings(text, readout=1.4, threshold=0.75)
    assert checked.text == kept
    assert [r.value for r in checked.ratings] == rated


def test_a_rating_contradicts_when_it_is_far_from_the_readout() -> None:
    text = "Mild noise. I would give it 3.5. Overall quality is poor."
    near = check_ratings(text, readout=3.2, threshold=0.75)
    assert [r.contradicts for r in near.ratings] == [False, True]  # 3.5 ≈ 3.2; poor ≠ good
    far = check_ratings(text, readout=1.0, threshold=0.75)
    assert [r.contradicts for r in far.ratings] == [True, False]  # 3.5 ≠ 1.0; poor ≈ poor
    assert near.text == far.text == "Mild noise."


@pytest.mark.parametrize(
    ("mode", "below", "score", "wants"),
    [("always", 2.5, 3.9, True), ("below", 2.5, 2.4, True), ("below", 2.5, 2.6, False),
     ("never", 2.5, 0.1, False)],
)
def test_explain_policy(mode: ExplainMode, below: float, score: float, wants: bool) -> None:
    assert ExplainPolicy(mode, below).wants(score) is wants


def test_explain_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="explain must be one of"):
        ExplainPolicy("sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="0–4"):
        ExplainPolicy("below", 5.0)
