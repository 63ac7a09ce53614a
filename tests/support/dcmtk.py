"""DCMTK peers (``/usr/bin/storescu``, ``/usr/bin/echoscu``) and test CT series.

DCMTK keeps Nagle's algorithm on unless ``TCP_NODELAY=1`` is in its environment; every
call here sets it. Tools are called by absolute path: the virtualenv's pynetdicom
installs scripts with the same names.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

DCMTK = Path("/usr/bin")
#: A patient name no log line may ever contain.
SECRET_PATIENT_NAME = "Zyxwvut^Secretname"


def _env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def _tool(name: str) -> str:
    path = DCMTK / name
    if not path.exists():
        raise FileNotFoundError(f"DCMTK tool {path} is missing: run `make system-deps`")
    return str(path)


def echoscu(port: int, *, aec: str = "QCNODE", aet: str = "ECHOSCU",
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """C-ECHO 127.0.0.1:``port`` (never raises on a DICOM failure)."""
    return subprocess.run(
        [_tool("echoscu"), "-aet", aet, "-aec", aec, "-to", "10", "127.0.0.1", str(port)],
        capture_output=True, text=True, env=_env(), timeout=timeout, check=False,
    )


#: storescu option proposing a transfer syntax (DCMTK 3.6.7 ``storescu --help``).
PROPOSE_OPTION = {
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx", "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.1.99": "-xd",
}


def storescu_command(port: int, files: Sequence[Path], *, aec: str = "QCNODE",
                     aet: str = "STORESCU", verbose: bool = True,
                     options: Sequence[str] = ()) -> list[str]:
    """The storescu command line sending ``files`` as they are.

    ``-R`` proposes only the SOP classes of the files; ``options`` such as
    ``PROPOSE_OPTION[ts]`` make a compressed file travel as it is (no conversion).
    """
    cmd = [_tool("storescu"), "-aet", aet, "-aec", aec, "-to", "30", "-nh", "-R", *options]
    if verbose:
        cmd.append("-v")
    return [*cmd, "127.0.0.1", str(port), *map(str, files)]


def storescu(port: int, files: Sequence[Path], *, aec: str = "QCNODE", aet: str = "STORESCU",
             timeout: float = 300, options: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """C-STORE ``files`` in one association (never raises on a DICOM failure)."""
    return subprocess.run(
        storescu_command(port, files, aec=aec, aet=aet, options=options),
        capture_output=True, text=True, env=_env(), timeout=timeout, check=False,
    )


def storescu_popen(port: int, files: Sequence[Path], *, aec: str = "QCNODE",
                   aet: str = "STORESCU") -> subprocess.Popen[str]:
    """Start storescu in the background (stdout+stderr merged into ``.stdout``)."""
    return subprocess.Popen(
        storescu_command(port, files, aec=aec, aet=aet), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env=_env(),
    )


_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response \((.+)\)")


def successes(output: str) -> list[Path]:
    """Files storescu ``-v`` reports as stored with status Success."""
    done: list[Path] = []
    current: Path | None = None
    for line in output.splitlines():
        if match := _SENDING.search(line):
            current = Path(match.group(1).strip())
        elif (match := _RESPONSE.search(line)) and current is not None:
            if match.group(1).startswith("Success"):
                done.append(current)
            current = None
    return done


def write_ct_series(out: Path, count: int, *, size: int = 64, series_uid: str | None = None,
                    study_uid: str | None = None, description: str = "test series",
                    truncate_pixels: bool = False) -> list[Path]:
    """Write ``count`` CT images (one series) carrying :data:`SECRET_PATIENT_NAME`.

    ``truncate_pixels`` writes a well-formed file whose Pixel Data holds half the bytes
    that Rows × Columns × Bits Allocated call for.
    """
    out.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    rng = np.random.default_rng(len(series_uid))
    pixels = rng.normal(40, 20, (size, size)).astype(np.int16).tobytes()
    if truncate_pixels:
        pixels = pixels[: len(pixels) // 2]
    paths = []
    for index in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality, ds.SeriesDescription = "CT", description
        ds.PatientName, ds.PatientID = SECRET_PATIENT_NAME, "SECRETID42"
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(index)]
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = pixels
        path = out / f"ct{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
