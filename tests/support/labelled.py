"""Small labelled CT inputs for the training/evaluation tests: DICOM slices and series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid


def write_ct(path: Path, hu: np.ndarray, *, series: str, study: str, z: float) -> str:
    """A minimal valid CT Image Storage instance (PS3.3 A.3) with the given HU."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2")
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality, ds.SeriesDescription = "CT", "test"
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 1.0
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = np.rint(hu + 1024).astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def phantom(size: int = 64, seed: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    body = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.4) ** 2
    hu = np.where(body, 40.0, -1000.0)
    return hu + np.random.default_rng(seed).normal(0, 10, hu.shape)


def write_series(folder: Path, n: int = 3, *, size: int = 64, seed: int = 0) -> str:
    """``n`` slices of one CT series into ``folder``; returns the Series Instance UID."""
    folder.mkdir(parents=True, exist_ok=True)
    series, study = generate_uid(), generate_uid()
    for z in range(n):
        write_ct(folder / f"{z:03d}.dcm", phantom(size, seed + z), series=series,
                 study=study, z=float(z))
    return str(series)
