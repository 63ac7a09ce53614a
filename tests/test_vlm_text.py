"""Parsing generated answers and mapping explanations to coded findings (no model)."""

from __future__ import annotations

import pytest

from inference.result import FindingKind, Severity
from inference.vlm.findings import extract_findings, merge_findings
from inference.vlm.parsing import parse_answer, parse_score


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
