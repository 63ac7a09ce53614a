"""`qcnode synth`: synthetic CT Image Storage series with known quality.

Each (dose level, artifact) pair becomes its own series in one study, written as
``OUT/<series-name>/IM0001.dcm …`` with a ``truth.json`` sidecar: the relative dose,
the photons per ray, the *simulated noise* (SD in HU of the noise-only reconstruction
over soft tissue, see :mod:`inference.ctsim`) and where metal was put. Per-slice lists
are in slice order (``IM0001.dcm`` first): ``slice_noise_hu[i]`` is null for a metal
slice, whose streaks make "the noise" meaningless. The files are CT
Image Storage instances (PS3.3 A.3) that dciodvfy accepts; the patient is synthetic
(``QC^PHANTOM``). The same seed gives the same pixels; the UIDs are fresh on every run
(``--uid-seed TEXT`` makes them reproducible). A UID names one object for good (PS3.5
9): a second run, perhaps with other options, sent to the same node or PACS must be new
images, not different pixels under the UIDs of the first run's instances.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from scipy import ndimage

from inference import ctsim
from inference.dicom import CT_IMAGE_STORAGE

TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg-ls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
}
FOV_MM = 380.0
SLICE_MM = 2.5
STORED_OFFSET = 1024  # stored = HU + 1024, unsigned 16 bit
TRUTH_FILE = "truth.json"


@dataclass(frozen=True)
class SynthSpec:
    """What to write: dose levels (1.0 = routine), artifact variants, size, seed…"""

    dose_levels: tuple[float, ...] = (1.0,)
    artifacts: tuple[str, ...] = ("none",)
    slices: int = 32
    size: int = 512
    seed: int = 0
    transfer_syntax: str = "explicit"
    #: Source of the UIDs; None: fresh UIDs on every :func:`synthesize` run.
    uid_seed: str | None = None

    def __post_init__(self) -> None:
        if not self.dose_levels or any(d <= 0 or d > 10 for d in self.dose_levels):
            raise ValueError("dose levels must be in (0, 10]")
        if self.slices < 1 or self.slices > 2000:
            raise ValueError("slices must be between 1 and 2000")
        if self.size < 64 or self.size > 1024 or self.size % 2:
            raise ValueError("size must be an even number between 64 and 1024")
        if self.transfer_syntax not in TRANSFER_SYNTAXES:
            raise ValueError(f"unknown transfer syntax {self.transfer_syntax!r}")


@dataclass
class SeriesTruth:
    """The known quality of one written series (the ``truth.json`` sidecar)."""

    series_instance_uid: str
    dose: float
    photons_per_ray: float
    artifact: str
    simulated_noise_hu: float  # RMS of slice_noise_hu over the slices without metal
    #: One entry per slice in slice order; None (JSON null) on a metal slice.
    slice_noise_hu: list[float | None] = field(default_factory=list)
    metal_slices: list[int] = field(default_factory=list)  # 0-based, in z order
    metal_centres_px: list[tuple[float, float]] = field(default_factory=list)
    sop_instance_uids: list[str] = field(default_factory=list)


def _uid(spec: SynthSpec, *parts: object) -> str:
    """A UID derived from the spec's ``uid_seed`` (:func:`synthesize` sets a fresh one
    per run unless the caller fixed it) and ``parts``."""
    if spec.uid_seed is None:
        raise ValueError("SynthSpec.uid_seed is unset: write series through synthesize()")
    return str(generate_uid(entropy_srcs=["qcnode-synth", spec.uid_seed, *map(str, parts)]))


def _base_dataset(spec: SynthSpec, study_uid: str, series_uid: str, number: int,
                  description: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.PatientName = "QC^PHANTOM"
    ds.PatientID = "QC-PHANTOM-0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "QCSYNTH"
    ds.AccessionNumber = ""
    ds.StudyDescription = "qcnode synthetic phantom"
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = number
    ds.SeriesDescription = description
    ds.BodyPartExamined = "ABDOMEN"
    ds.PatientPosition = "FFS"
    ds.FrameOfReferenceUID = _uid(spec, "for")
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "qcnode"
    ds.ManufacturerModelName = "qcnode synth"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber = 1
    ds.KVP = "120"
    ds.SliceThickness = f"{SLICE_MM}"
    ds.ConvolutionKernel = "SIM-SOFT"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [f"{FOV_MM / spec.size:.6f}"] * 2
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = spec.size
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = f"{-STORED_OFFSET}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "350"
    return ds


def _write_slice(base: Dataset, spec: SynthSpec, index: int, sop_uid: str, hu: np.ndarray,
                 path: Path) -> None:
    ds = Dataset()
    ds.update(base)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = index + 1
    z = -SLICE_MM * index
    half = FOV_MM / 2.0 - FOV_MM / spec.size / 2.0
    ds.ImagePositionPatient = [f"{-half:.4f}", f"{-half:.4f}", f"{z:.2f}"]
    ds.SliceLocation = f"{z:.2f}"
    stored = np.clip(np.rint(hu) + STORED_OFFSET, 0, 65535).astype(np.uint16)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(CT_IMAGE_STORAGE)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    syntax = TRANSFER_SYNTAXES[spec.transfer_syntax]
    if syntax.is_compressed:
        ds.compress(syntax, stored)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_series(spec: SynthSpec, out: Path, dose: float, artifact: str, number: int,
                 study_uid: str) -> SeriesTruth:
    """Simulate and write one series; returns (and writes) its truth sidecar."""
    metal = artifact == "metal"
    name = f"dose{dose:.3g}" + ("_metal" if metal else "")
    series_uid = _uid(spec, "series", dose, artifact)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    base = _base_dataset(spec, study_uid, series_uid, number,
                         f"QC phantom dose {dose:g}" + (" metal" if metal else ""))
    truth = SeriesTruth(series_uid, dose, ctsim.I0_FULL_DOSE * dose, artifact, 0.0)
    rng = np.random.default_rng([spec.seed, number])
    pixel_mm = FOV_MM / spec.size
    lo, hi = spec.slices // 3, max(spec.slices // 3 + 1, 2 * spec.slices // 3)
    for i in range(spec.slices):
        u = i / max(spec.slices - 1, 1)
        has_metal = metal and lo <= i < hi
        hu, noise = ctsim.simulate_slice(spec.size, pixel_mm, u, dose, has_metal, rng)
        sop_uid = _uid(spec, "sop", dose, artifact, i)
        _write_slice(base, spec, i, sop_uid, hu, folder / f"IM{i + 1:04d}.dcm")
        truth.sop_instance_uids.append(sop_uid)
        if has_metal:
            truth.metal_slices.append(i)
        truth.slice_noise_hu.append(None if has_metal else _soft_tissue_sd(spec.size, u, noise))
    truth.metal_centres_px = ctsim.metal_centres(spec.size) if metal else []
    clean = [sd for sd in truth.slice_noise_hu if sd is not None] or [float("nan")]
    truth.simulated_noise_hu = float(np.sqrt(np.mean(np.square(clean))))
    (folder / TRUTH_FILE).write_text(json.dumps(asdict(truth), indent=2))
    return truth


def _soft_tissue_sd(size: int, u: float, noise: np.ndarray) -> float:
    """SD of the noise-only image over eroded soft tissue (20–80 HU in the phantom)."""
    clean = ctsim.rasterize(ctsim.phantom_ellipses(size, u, False), size)
    soft = ndimage.binary_erosion((clean > 20) & (clean < 80), iterations=3)
    return float(noise[soft].std())


def synthesize(spec: SynthSpec, out: Path) -> list[SeriesTruth]:
    """Write every (artifact, dose) series of ``spec`` under ``out``: the same pixels
    for the same ``seed``, fresh UIDs on every call unless ``spec.uid_seed`` is set."""
    if spec.uid_seed is None:
        spec = replace(spec, uid_seed=uuid.uuid4().hex)
    study_uid = _uid(spec, "study")
    truths = []
    number = 1
    for artifact in spec.artifacts:
        for dose in spec.dose_levels:
            truths.append(write_series(spec, out, dose, artifact, number, study_uid))
            number += 1
    return truths


def main(args: argparse.Namespace) -> int:
    """The ``qcnode synth OUT`` handler."""
    try:
        spec = SynthSpec(
            dose_levels=tuple(args.dose_levels),
            artifacts=tuple(dict.fromkeys(args.artifacts or ["none"])),
            slices=args.slices, size=args.size, seed=args.seed,
            transfer_syntax=args.transfer_syntax, uid_seed=args.uid_seed,
        )
    except ValueError as exc:
        print(f"qcnode synth: {exc}", file=sys.stderr)
        return 2
    try:
        truths = synthesize(spec, args.out)
    except OSError as exc:
        print(f"qcnode synth: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for t in truths:
        print(f"{t.series_instance_uid}  dose {t.dose:g}  {t.artifact:5s}  "
              f"simulated noise {t.simulated_noise_hu:.1f} HU  → {args.out}")
    return 0

