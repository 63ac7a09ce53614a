"""Map an explanation's statements to coded findings, with severity and negation. Torch-free.

The VLM explains in prose ("moderate noise throughout the abdomen; no streak artifacts");
the SR carries codes. Each sentence is cut into clauses at contrastive words and
semicolons; a finding keyword in a clause is dropped when a negation cue precedes it in
that clause ("no", "without", "free of", "absence of", …) or follows it ("… are not
seen", "… absent"), and when the clause calls the problem negligible ("low noise",
"minimal blur"). Severity comes from words in the clause ("mild", "moderate", "severe",
…); an unqualified statement counts as moderate. Streaks mentioned together with metal
are reported once, as metal artifact.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from inference.result import Finding, FindingKind, Severity

#: Keyword pattern per finding kind (matched case-insensitively on word boundaries).
KIND_PATTERNS: dict[FindingKind, re.Pattern[str]] = {
    FindingKind.METAL_ARTIFACT: re.compile(
        r"\bmetal(?:lic)?\b|\bhardware\b|\bprosthe\w*|\bimplant\w*|\bsurgical clips?\b", re.I
    ),
    FindingKind.STREAK_ARTIFACT: re.compile(
        r"\bstreak\w*|\bsparse[- ]view\b|\bview aliasing\b|\bradial lines?\b", re.I
    ),
    FindingKind.NOISE: re.compile(
        r"\bnois\w*|\bgrain\w*|\bmottl\w*|\bspeckle\w*|\bquantum\b", re.I
    ),
    FindingKind.MOTION: re.compile(
        r"\bmotion\b|\bmovement\b|\bbreathing artifacts?\b|\brespiratory artifacts?\b"
        r"|\bghosting\b|\bdoubl(?:e|ed|ing) (?:contours?|edges?)\b",
        re.I,
    ),
    FindingKind.BEAM_HARDENING: re.compile(
        r"\bbeam[- ]hardening\b|\bcupping\b|\bdark bands?\b", re.I
    ),
    FindingKind.LOW_CONTRAST: re.compile(
        r"\b(?:low|poor|reduced|decreased|limited|diminished|insufficient|suboptimal|weak)"
        r"\s+(?:\w+\s+)?contrast\b|\bcontrast\s+(?:is\s+)?(?:low|poor|reduced|limited)\b"
        r"|\bwashed[- ]out\b|\bpoor (?:tissue )?differentiation\b",
        re.I,
    ),
    FindingKind.BLUR: re.compile(
        r"\bblur\w*|\bunsharp\b|\bsmear\w*|\bsmooth(?:ed|ing)? (?:appearance|edges?)\b"
        r"|\b(?:loss|lack) of (?:sharpness|detail|fine detail)\b|\bfuzzy\b|\bindistinct\b",
        re.I,
    ),
    FindingKind.TRUNCATED_FOV: re.compile(
        r"\btruncat\w*|\bfield[- ]of[- ]view (?:is )?(?:cut|clipped|too small|limited)"
        r"|\bfov (?:is )?(?:cut|clipped|truncated|too small|limited)\b|\bcut off\b",
        re.I,
    ),
}

_CLAUSE_SPLIT = re.compile(
    r";|:|\s[-–—]\s|\b(?:but|however|although|though|whereas|while|yet|except|apart from)\b"
    r"|,?\s\band\b(?=\s+(?:the|there|it|its|mild\w*|moderate\w*|severe\w*|marked\w*|some|"
    r"significant\w*|slight\w*|noticeable|substantial\w*|pronounced|prominent)\b)",
    re.I,
)
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
_PRE_NEGATION = re.compile(
    r"\b(?:no|not|without|free of|absence of|absent|lack of|lacks|lacking|neither|nor|"
    r"none|never|rule[sd]? out|devoid of)\b|n't\b",
    re.I,
)
_POST_NEGATION = re.compile(
    r"^[^.]*?\b(?:(?:is|are|was|were)\s+(?:not|absent)|not (?:seen|present|evident|"
    r"observed|apparent|visible|identified|detected|noted)|absent|none)\b",
    re.I,
)
_NEGLIGIBLE = re.compile(
    r"\b(?:low|minimal|negligible|little|insignificant|acceptable|well[- ]controlled|"
    r"unremarkable|barely)\b",
    re.I,
)
_SEVERITY_WORDS: tuple[tuple[Severity, re.Pattern[str]], ...] = (
    (Severity.SEVERE, re.compile(
        r"\b(?:severe\w*|marked\w*|pronounced|heavy|extensive|substantial\w*|strong\w*|"
        r"significant\w*|considerabl\w*|prominent|excessive|gross\w*|major)\b", re.I)),
    (Severity.MODERATE, re.compile(
        r"\b(?:moderate\w*|noticeable|evident|apparent|visible|some|present|high|elevated|"
        r"increased)\b", re.I)),
    (Severity.MILD, re.compile(
        r"\b(?:mild\w*|slight\w*|subtle|minor|faint|small amount|somewhat|few)\b", re.I)),
)


def extract_findings(text: str, sop_instance_uid: str | None = None) -> tuple[Finding, ...]:
    """Coded findings stated (not negated) in ``text``; one per kind, the most severe."""
    best: dict[FindingKind, Finding] = {}
    for clause in _clauses(text):
        for kind, severity in _clause_findings(clause):
            current = best.get(kind)
            if current is None or _rank(severity) > _rank(current.severity):
                best[kind] = Finding(
                    kind=kind, severity=severity, description=_short(clause),
                    sop_instance_uid=sop_instance_uid,
                )
    return tuple(best[k] for k in KIND_PATTERNS if k in best)


def merge_findings(groups: Iterable[Iterable[Finding]]) -> tuple[Finding, ...]:
    """One finding per kind across several explanations (the most severe, first seen)."""
    best: dict[FindingKind, Finding] = {}
    for group in groups:
        for finding in group:
            current = best.get(finding.kind)
            if current is None or _rank(finding.severity) > _rank(current.severity):
                best[finding.kind] = finding
    return tuple(best[k] for k in KIND_PATTERNS if k in best)


def _clauses(text: str) -> list[str]:
    clauses: list[str] = []
    for sentence in _SENTENCE_SPLIT.split(text):
        clauses.extend(c.strip() for c in _CLAUSE_SPLIT.split(sentence) if c and c.strip())
    return clauses


def _clause_findings(clause: str) -> list[tuple[FindingKind, Severity]]:
    found: list[tuple[FindingKind, Severity]] = []
    metal = KIND_PATTERNS[FindingKind.METAL_ARTIFACT].search(clause) is not None
    for kind, pattern in KIND_PATTERNS.items():
        if kind is FindingKind.STREAK_ARTIFACT and metal:
            continue  # "streaks from the hip prosthesis" is a metal artifact
        match = pattern.search(clause)
        if match is None or _negated(clause, match.start(), match.end(), kind):
            continue
        found.append((kind, _severity(clause, match.start(), match.end())))
    return found


def _negated(clause: str, start: int, end: int, kind: FindingKind) -> bool:
    before, after = clause[:start], clause[end:]
    if _PRE_NEGATION.search(before) or _POST_NEGATION.search(after):
        return True
    # "low noise", "minimal blur" describe a good image; "low contrast" is the finding.
    if kind is not FindingKind.LOW_CONTRAST and _NEGLIGIBLE.search(before[-30:]):
        return True
    return kind is not FindingKind.LOW_CONTRAST and re.search(
        r"^\W*(?:\w+\W+){0,3}(?:is|are|remains?)\s+(?:low|minimal|negligible)", after, re.I
    ) is not None


def _severity(clause: str, start: int, end: int) -> Severity:
    """The severity word nearest to the keyword at ``clause[start:end]`` (moderate if none)."""
    nearest: tuple[int, Severity] | None = None
    for severity, pattern in _SEVERITY_WORDS:
        for word in pattern.finditer(clause):
            distance = start - word.end() if word.end() <= start else 2 * (word.start() - end)
            if distance >= 0 and (nearest is None or distance < nearest[0]):
                nearest = (distance, severity)
    return Severity.MODERATE if nearest is None else nearest[1]


def _rank(severity: Severity) -> int:
    return (Severity.NONE, Severity.MILD, Severity.MODERATE, Severity.SEVERE).index(severity)


def _short(clause: str, limit: int = 200) -> str:
    clause = " ".join(clause.split())
    return clause if len(clause) <= limit else clause[: limit - 1] + "…"
