"""Checking the source images and copying patient/study identity from them carefully.

The SR inherits the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1) from its
sources. Copying whole modules blindly also copies their defects (dciodvfy then reports
them against the SR), so :func:`identity_dataset` copies a fixed list of attributes,
fills Type 2 attributes the source lacks with empty values, and repairs one known defect:
Patient Identity Removed = YES without a De-identification Method (Type 1C).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from pydicom.dataset import Dataset
from pydicom.uid import UID

from inference.result import (
    SCORE_MAX,
    SCORE_MIN,
    AssessmentResult,
    Finding,
    Measurement,
    Region,
)

#: Attributes every source must have.
REQUIRED: Final = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "Modality", "Rows", "Columns",
)
#: Patient and General Study attributes copied when present (Type 1/3 or 2).
COPIED: Final = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "PatientAge", "PatientSize", "PatientWeight", "PatientIdentityRemoved",
    "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
    "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyDescription",
)
#: Type 2 attributes the SR must carry, empty when the source has none.
TYPE2: Final = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)
#: Equipment attributes kept so highdicom can record the acquisition equipment.
EQUIPMENT: Final = ("Manufacturer", "ManufacturerModelName", "DeviceSerialNumber",
                    "SoftwareVersions", "InstitutionName", "StationName")
DEID_UNKNOWN: Final = "Not stated in the source images"


def is_image(ds: Dataset) -> bool:
    """True for an image SOP class ("... Image Storage") with rows and columns."""
    name = UID(str(ds.get("SOPClassUID", ""))).name
    return "Image Storage" in name and "Rows" in ds and "Columns" in ds


def check_sources(sources: Sequence[Dataset], result: AssessmentResult) -> dict[str, Dataset]:
    """Validate ``sources`` against ``result``; return them by SOP Instance UID.

    Raises
    ------
    ValueError
        No sources; a source that is not an image or lacks a required attribute; sources
        from several studies or another study than the result's; a slice, finding,
        measurement or region that names an instance not among the sources.
    """
    _check_scores(result)
    if not sources:
        raise ValueError("at least one source image dataset is needed")
    by_uid: dict[str, Dataset] = {}
    for ds in sources:
        missing = [k for k in REQUIRED if k not in ds]
        if missing:
            raise ValueError(f"source dataset lacks {', '.join(missing)}")
        if not is_image(ds):
            raise ValueError(
                f"source {ds.SOPInstanceUID} is not an image (SOP class {ds.SOPClassUID})"
            )
        by_uid[str(ds.SOPInstanceUID)] = ds
    studies = {str(ds.StudyInstanceUID) for ds in sources}
    if studies != {result.study_instance_uid}:
        raise ValueError(
            f"sources belong to study(ies) {sorted(studies)}, the result to "
            f"{result.study_instance_uid}"
        )
    series = {str(ds.SeriesInstanceUID) for ds in sources}
    if series != {result.series_instance_uid}:
        raise ValueError(
            f"sources belong to series {sorted(series)}, the result to "
            f"{result.series_instance_uid}"
        )
    _check_region_owners(result)
    for uid in referenced_uids(result):
        if uid not in by_uid:
            raise ValueError(f"result references instance {uid}, which is not a source")
    return by_uid


def _check_region_owners(result: AssessmentResult) -> None:
    """A region must lie on the instance its slice, finding or measurement names."""
    owners: list[tuple[str | None, Region | None]] = [
        (s.sop_instance_uid, s.region) for s in result.slices
    ]
    owners += [(f.sop_instance_uid, f.region) for f in result.findings]
    owners += [(m.sop_instance_uid, m.region) for m in result.evidence]
    for uid, region in owners:
        if region is not None and uid != region.sop_instance_uid:
            raise ValueError(
                f"region on {region.sop_instance_uid} belongs to an item naming {uid}"
            )


def _check_scores(result: AssessmentResult) -> None:
    """Scores inside the scale (the dataclass checks too; a bypassed check stops here)."""
    for score in (result.score, *(s.score for s in result.slices)):
        if not SCORE_MIN <= score <= SCORE_MAX:
            raise ValueError(f"score {score} is outside the 0–4 quality scale")


def referenced_uids(result: AssessmentResult) -> list[str]:
    """Every SOP Instance UID the result names (slices, findings, evidence, regions)."""
    uids: list[str] = []
    regions: list[Region | None] = []
    for s in result.slices:
        uids.append(s.sop_instance_uid)
        regions.append(s.region)
    items: list[Finding | Measurement] = [*result.findings, *result.evidence]
    for item in items:
        if item.sop_instance_uid:
            uids.append(item.sop_instance_uid)
        regions.append(item.region)  # Finding and Measurement share these two fields
    uids.extend(r.sop_instance_uid for r in regions if r is not None)
    return uids


def identity_dataset(source: Dataset) -> Dataset:
    """A metadata-only copy of ``source`` with carefully copied identity (see module doc)."""
    out = Dataset()
    for key in (*REQUIRED, *COPIED, *EQUIPMENT):
        if key in source:
            out[key] = source[key]
    for key in TYPE2:
        if key not in out:
            setattr(out, key, "")
    removed = str(out.get("PatientIdentityRemoved", "")).upper()
    if removed == "YES" and not (
        out.get("DeidentificationMethod") or out.get("DeidentificationMethodCodeSequence")
    ):
        out.DeidentificationMethod = DEID_UNKNOWN
    elif removed not in ("YES", "NO") and "PatientIdentityRemoved" in out:
        del out.PatientIdentityRemoved
    return out
