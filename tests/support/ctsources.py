"""Valid CT image datasets (metadata only, or with tiny pixel data) for SR tests."""

from __future__ import annotations

import datetime

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from inference.result import (
    AssessmentResult,
    EngineInfo,
    Finding,
    FindingKind,
    Measurement,
    Region,
    Severity,
    SliceScore,
)


def ct_series(
    n: int = 8,
    *,
    rows: int = 64,
    cols: int = 64,
    study_uid: str | None = None,
    patient_name: str = "Muster^Jürgen",
    accession: str | None = "ACC123",
    birth_date: str | None = "19600101",
    pixels: bool = True,
) -> list[Dataset]:
    """``n`` consecutive axial CT slices of one series that pass dciodvfy."""
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = generate_uid()
    out = []
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDate = "20240102"
        ds.StudyTime = "101500"
        ds.ContentDate = "20240102"
        ds.ContentTime = "101600"
        ds.AccessionNumber = accession if accession is not None else ""
        if accession is None:
            del ds.AccessionNumber
        ds.Modality = "CT"
        ds.BodyPartExamined = "ABDOMEN"
        ds.Manufacturer = "ACME"
        ds.ReferringPhysicianName = ""
        ds.PatientName = patient_name
        ds.PatientID = "PID-0001"
        if birth_date is not None:
            ds.PatientBirthDate = birth_date
        ds.PatientSex = "M"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.InstanceNumber = i + 1
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "FFS"
        ds.ImagePositionPatient = [-160.0, -160.0, 0.0 - 5.0 * i]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.SliceThickness = 5.0
        ds.PixelSpacing = [5.0, 5.0]
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 350
        if pixels:
            ds.PixelData = np.zeros((rows, cols), dtype=np.int16).tobytes()
        out.append(ds)
    return out


def sample_result(
    sources: list[Dataset],
    *,
    explanation: str = "Moderate noise; streaks near the hips. Diagnostic quality is fair.",
    findings: bool = True,
) -> AssessmentResult:
    """A result covering every feature: slice scores, regions, findings, evidence, notes."""
    first = sources[0]
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    slices = tuple(
        SliceScore(
            uid,
            score=[3.0, 2.4, 1.2, 2.8, 3.6, 2.0, 2.6, 3.2][i % 8],
            uncertainty=0.3 if i % 2 == 0 else None,
            region=Region.box(uid, 10, 12, 40, 44) if i != 1 else None,
        )
        for i, uid in enumerate(uids)
    )
    worst = min(slices, key=lambda s: s.score).sop_instance_uid
    found = (
        Finding(FindingKind.NOISE, Severity.MODERATE, "Noise above the usual level."),
        Finding(FindingKind.STREAK_ARTIFACT, Severity.SEVERE, "Streaks from the left hip.",
                worst, Region(worst, "ELLIPSE", ((20, 30), (40, 30), (30, 25), (30, 35)))),
        Finding(FindingKind.BEAM_HARDENING, Severity.MILD, "", uids[0]),
        Finding(FindingKind.MOTION, Severity.NONE),
    ) if findings else ()
    evidence = (
        Measurement("noise_hu", 22.4, "[hnsf'U]", "SD in soft tissue", worst,
                    Region(worst, "CIRCLE", ((32, 32), (32, 40)))),
        Measurement("noise_fat_hu", 18.0, "[hnsf'U]"),
        Measurement("cnr", 1.7, "1", "liver vs fat", uids[0]),
        Measurement("mtf50_per_mm", 0.41, "/mm"),
    )
    return AssessmentResult(
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        score=2.2,
        uncertainty=0.45,
        explanation=explanation,
        engine=EngineInfo("physics", "0.1.0", "rev-abc", None),
        slices=slices,
        findings=found,
        evidence=evidence,
        notes=("sampled 8 of 120 slices",),
    )


FIXED_TIME = datetime.datetime(2024, 1, 2, 12, 0, 0)
