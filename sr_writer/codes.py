"""Every code the SR writer uses, with why it was chosen.

Standard codes come from :data:`pydicom.sr.codedict.codes` (DCM = PS3.16 Annex D, SCT =
SNOMED CT, RADLEX, UCUM). Where the standard has no concept with the right meaning, the
code is taken from the private coding scheme :data:`PRIVATE_SCHEME` (designator
``99QCNODE``), which every SR declares in its Coding Scheme Identification Sequence
(PS3.3 C.17.2, "SR Document General Module"). dciodvfy warns once per private code in
use, so private codes are limited to concepts with no standard equivalent.

Choices (concept → code → reason):

- Document title → DCM 126000 "Imaging Measurement Report" (CID 7021, the TID 1500
  default title).
- Procedure reported (TID 1500 row 4) → SCT 77477000 "Computed tomography" for CT
  sources, plus SCT 133887000 "Image quality analysis" (CID 6043/6137) for the analysis
  itself.
- Observer (TID 1002) → DCM 121007 "Device" via highdicom's CID 270 code: the report is
  made by an algorithm, never by a person.
- Series and slice score → DCM 111029 "Image Quality Rating", unit UCUM ``{score}``
  (the LDCTIQA 0–4 Likert scale, no physical unit). Its uncertainty → TID 310
  "Measurement Properties", SCT 371886008 / 371885007 "+/− range of measurement
  uncertainty" (symmetric: the same value both ways).
- Score in words → DCM 111101 "Image Quality" with CID 3114 values: 4 "Excellent image
  quality" (122740), 3 "Good image quality" (122741), 1 "Poor image quality" (122742),
  0 "Unusable - Quality renders image unusable" (111235). CID 3114 has no "fair": score 2
  uses the private ``FAIR``.
- Finding kinds (qualitative evaluation concept names): beam hardening → RADLEX RID11327
  "Beam-hardening artifact"; motion → RADLEX RID11423 "Motion related artifact". No
  standard concept exists for CT image noise, streak artifact, metal artifact, low
  contrast, blur or truncated field of view (DCM 111210 "Motion blur" and DCM 130580
  "Inadequate contrast enhancement" mean something else): private codes.
- Severity (qualitative evaluation values) → SCT 260413007 "None", 255604002 "Mild",
  6736007 "Moderate", 24484000 "Severe" (CID 3716).
- Evidence: noise in soft tissue / fat → DCM 112183 "Standard Deviation of Attenuation
  Coefficient" (CID 6141) with finding site SCT 87784001 "Soft tissue" / 55603005 "Fat";
  streak index, contrast, CNR, edge width and MTF50 → private codes (no standard
  concept). Units are UCUM: ``[hnsf'U]`` (HU), ``1``, ``mm``, ``/mm``.
- Explanation → DCM 111412 "Narrative Summary" TEXT in TID 1500's report-level
  "Qualitative Evaluations" container (UMLS C0034375); finding and evidence
  descriptions and notes → DCM 121106 "Comment" TEXT items in the same container.
- Group comment → DCM 121106 "Comment", one TEXT item in each TID 1410 measurement
  group, stating the group in words (``Slice 11 quality 1.4 of 4 (poor)``). Allowed:
  the measurement-group templates have a pair of rows for qualitative evaluations of
  the group's subject, coded (CODE) or in text (TEXT) — TID 1501 rows 11 and 12
  ("… coded questions with coded or text answers"), TID 1411 rows 16 and 17, and the
  same CODE/TEXT pair in TID 1410, the planar ROI group used here. Not allowed under
  the NUM: TID 1419 "ROI Measurements" and TID 300 "Measurement" have no TEXT row, so
  the comment hangs from the group container, never from a measurement. OHIF 3.13's
  measurement panel shows it as the measurement's label (without it, "(empty)").
  highdicom's group classes take coded evaluations only; the TEXT item is appended to
  the built group.

Basic Text SR companion (no template; PS3.3 A.35.1 relationship constraints):

- Document title → LOINC 18748-4 "Diagnostic Imaging Report" (CID 7000). Not DCM
  126000: OHIF v3 treats a 126000-titled SR as a TID 1500 measurement report and shows
  an empty viewport for one without measurements.
- Sections (CID 7001 headings) → LOINC 55112-7 "Summary" (score, score in words,
  explanation), 59776-5 "Findings" (slice scores, findings, measured evidence), 55111-9
  "Current Procedure Descriptions" (scale, algorithm, notes). Each finding is a TEXT
  SCT 404684003 "Clinical finding" (OHIF prints DCM 121071 "Finding" items as
  preformatted text that does not wrap); the other lines keep the SR's concept names.
"""

from __future__ import annotations

from typing import Final

from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from inference.result import FindingKind, Severity

#: The private coding scheme (PS3.16 8.2: private designators start with "99").
PRIVATE_SCHEME: Final = "99QCNODE"
PRIVATE_SCHEME_NAME: Final = "qcnode image quality concepts"
PRIVATE_SCHEME_ORG: Final = "qcnode project"
#: derive_uid("coding-scheme", "99QCNODE") from uids.py, fixed here so it never changes.
PRIVATE_SCHEME_UID: Final = "2.25.112040119927387854521588993760017825013"
PRIVATE_SCHEME_VERSION: Final = "1"


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, PRIVATE_SCHEME, meaning)


def _std(code: object) -> CodedConcept:
    return CodedConcept.from_code(code)  # type: ignore[arg-type]


# Report structure -------------------------------------------------------------------
TITLE: Final = _std(codes.DCM.ImagingMeasurementReport)
PROCEDURE_CT: Final = _std(codes.SCT.ComputedTomography)
PROCEDURE_IQ: Final = CodedConcept("133887000", "SCT", "Image quality analysis")
QUALITATIVE_EVALUATIONS: Final = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
NARRATIVE_SUMMARY: Final = _std(codes.DCM.NarrativeSummary)
COMMENT: Final = _std(codes.DCM.Comment)
#: Text SR finding lines: not DCM 121071 "Finding", which OHIF shows unwrapped (<pre>).
FINDING: Final = CodedConcept("404684003", "SCT", "Clinical finding")
# Basic Text SR companion ------------------------------------------------------------
TEXT_TITLE: Final = CodedConcept("18748-4", "LN", "Diagnostic Imaging Report")
SUMMARY_SECTION: Final = CodedConcept("55112-7", "LN", "Summary")
FINDINGS_SECTION: Final = CodedConcept("59776-5", "LN", "Findings")
PROCEDURE_SECTION: Final = CodedConcept("55111-9", "LN", "Current Procedure Descriptions")

# Score ------------------------------------------------------------------------------
IMAGE_QUALITY_RATING: Final = _std(codes.DCM.ImageQualityRating)
SCORE_UNIT: Final = CodedConcept("{score}", "UCUM", "score")
IMAGE_QUALITY: Final = _std(codes.DCM.ImageQuality)
FAIR: Final = _private("FAIR", "Fair image quality")
#: Rounded score → CID 3114 value (private FAIR for 2).
QUALITY_LABELS: Final[tuple[CodedConcept, ...]] = (
    _std(codes.DCM.UnusableQualityRendersImageUnusable),
    _std(codes.DCM.PoorImageQuality),
    FAIR,
    _std(codes.DCM.GoodImageQuality),
    _std(codes.DCM.ExcellentImageQuality),
)
UPPER_UNCERTAINTY: Final = CodedConcept(
    "371886008", "SCT", "+, range of upper measurement uncertainty"
)

# Findings ---------------------------------------------------------------------------
FINDING_CODES: Final[dict[FindingKind, CodedConcept]] = {
    FindingKind.NOISE: _private("NOISE", "Image noise"),
    FindingKind.STREAK_ARTIFACT: _private("STREAK", "Streak artifact"),
    FindingKind.METAL_ARTIFACT: _private("METAL", "Metal artifact"),
    FindingKind.MOTION: CodedConcept("RID11423", "RADLEX", "Motion related artifact"),
    FindingKind.BEAM_HARDENING: CodedConcept("RID11327", "RADLEX", "Beam-hardening artifact"),
    FindingKind.LOW_CONTRAST: _private("LOWCONTRAST", "Low image contrast"),
    FindingKind.BLUR: _private("BLUR", "Reduced sharpness"),
    FindingKind.TRUNCATED_FOV: _private("TRUNCFOV", "Truncated field of view"),
}
SEVERITY_CODES: Final[dict[Severity, CodedConcept]] = {
    Severity.NONE: CodedConcept("260413007", "SCT", "None"),
    Severity.MILD: CodedConcept("255604002", "SCT", "Mild"),
    Severity.MODERATE: CodedConcept("6736007", "SCT", "Moderate"),
    Severity.SEVERE: CodedConcept("24484000", "SCT", "Severe"),
}

# Evidence ---------------------------------------------------------------------------
SD_ATTENUATION: Final = _std(codes.DCM.StandardDeviationOfAttenuationCoefficient)
SOFT_TISSUE: Final = _std(codes.SCT.SoftTissue)
FAT: Final = CodedConcept("55603005", "SCT", "Fat")
#: Measurement name → (concept name, finding site or None).
EVIDENCE_CODES: Final[dict[str, tuple[CodedConcept, CodedConcept | None]]] = {
    "noise_hu": (SD_ATTENUATION, SOFT_TISSUE),
    "noise_fat_hu": (SD_ATTENUATION, FAT),
    "streak_index_hu": (_private("STREAKIDX", "Streak artifact index"), None),
    "contrast_hu": (_private("CONTRAST", "Attenuation contrast"), None),
    "cnr": (_private("CNR", "Contrast-to-noise ratio"), None),
    "edge_width_mm": (_private("EDGEWIDTH", "Edge spread width"), None),
    "mtf50_per_mm": (_private("MTF50", "Spatial frequency at 50% MTF"), None),
}
#: UCUM unit → meaning (the units MEASUREMENT_NAMES uses).
UNIT_MEANINGS: Final[dict[str, str]] = {
    "[hnsf'U]": "Hounsfield unit",
    "1": "no units",
    "mm": "millimeter",
    "/mm": "per millimeter",
}


def unit_code(ucum: str) -> CodedConcept:
    """The UCUM coded concept for ``ucum`` (ValueError for a unit we do not know)."""
    if ucum not in UNIT_MEANINGS:
        raise ValueError(f"unit {ucum!r} is not one of {', '.join(UNIT_MEANINGS)}")
    return CodedConcept(ucum, "UCUM", UNIT_MEANINGS[ucum])


def quality_label(score: float) -> CodedConcept:
    """The CID 3114 value (or private FAIR) for a 0–4 score, rounded."""
    return QUALITY_LABELS[round(score)]


def same_code(a: object, b: CodedConcept) -> bool:
    """True when coded concept ``a`` has ``b``'s value and scheme (meanings may differ)."""
    return (
        getattr(a, "value", None) == b.value
        and getattr(a, "scheme_designator", None) == b.scheme_designator
    )


def coding_scheme_identification() -> list[Dataset]:
    """Items of the Coding Scheme Identification Sequence (0008,0110) for the private scheme."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeUID = PRIVATE_SCHEME_UID
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeVersion = PRIVATE_SCHEME_VERSION
    item.CodingSchemeResponsibleOrganization = PRIVATE_SCHEME_ORG
    return [item]
