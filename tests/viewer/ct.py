"""A small, valid CT Image Storage series made with pydicom (PS3.3 A.3), for the viewer test.

A water-like elliptical body with a brighter "organ", a little noise and a streak on one
slice, so the screenshots look like CT and the worst slice is visibly worse.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ROWS = COLS = 256
PIXEL_MM = 1.5
RESCALE_INTERCEPT = -1024.0


def _slice_hu(rng: np.random.Generator, index: int, streak: bool) -> np.ndarray:
    yy, xx = np.mgrid[0:ROWS, 0:COLS].astype(np.float32)
    cy, cx = ROWS / 2, COLS / 2
    body = ((xx - cx) / 110) ** 2 + ((yy - cy) / 85) ** 2 <= 1.0
    organ = ((xx - cx - 30) / 35) ** 2 + ((yy - cy + 10 - index) / 25) ** 2 <= 1.0
    hu = np.full((ROWS, COLS), -1000.0, dtype=np.float32)
    hu[body] = 0.0
    hu[organ] = 60.0
    hu[body] += rng.normal(0.0, 12.0 + 6.0 * streak, size=int(body.sum()))
    if streak:
        angle = np.arctan2(yy - cy, xx - cx)
        hu[body] += (220.0 * np.cos(9 * angle) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2)
                                                       / 6000.0))[body]
    return hu


def ct_series(n_slices: int = 6, *, streak_slice: int = 2, seed: int = 7) -> list[Dataset]:
    """``n_slices`` CT instances of one new study and series, 2.5 mm apart.

    Parameters
    ----------
    n_slices
        Number of single-frame instances.
    streak_slice
        Index of the slice given a streak artifact (the intended worst slice).
    seed
        Noise seed, for reproducible pixels.
    """
    rng = np.random.default_rng(seed)
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    now = datetime(2024, 5, 17, 9, 30, 0)
    out = []
    for i in range(n_slices):
        hu = _slice_hu(rng, i, i == streak_slice)
        stored = np.clip(np.round(hu - RESCALE_INTERCEPT), 0, 4095).astype(np.uint16)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        sop = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName, ds.PatientID = "Viewer^Test", "QCNODE-VIEWER-1"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "VT0001", "1", ""
        ds.StudyDescription, ds.SeriesDescription = "qcnode viewer test", "Abdomen 2.5mm"
        ds.Modality, ds.Manufacturer, ds.SeriesNumber = "CT", "qcnode-tests", 1
        ds.InstanceNumber, ds.ImageType = i + 1, ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_ref, ""
        ds.ImagePositionPatient = [-COLS * PIXEL_MM / 2, -ROWS * PIXEL_MM / 2, -2.5 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness, ds.SliceLocation = 2.5, -2.5 * i
        ds.PixelSpacing = [PIXEL_MM, PIXEL_MM]
        ds.KVP, ds.AcquisitionNumber = 120, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = ROWS, COLS
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = RESCALE_INTERCEPT, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.PixelData = stored.tobytes()
        out.append(ds)
    return out
