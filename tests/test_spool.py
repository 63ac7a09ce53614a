"""Spool and header scanner on real files (pydicom's and pydicom-data's samples)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from node.receive.dicomio import MalformedDataset, read_header
from node.store.spool import Spool, SpoolFull
from tests.support.dcmtk import write_ct_series

SAMPLES = Path(pydicom.__file__).parent / "data" / "test_files"


def test_store_duplicate_and_new_version(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", tmp_path)
    src = write_ct_series(tmp_path / "in", 1)[0]
    header = read_header(src)
    first = spool.store(Path(shutil.copy(src, tmp_path / "a.dcm")), header)
    assert (first.version, first.duplicate) == (1, False)
    again = spool.store(Path(shutil.copy(src, tmp_path / "b.dcm")), header, [(1, first.sha256)])
    assert again.duplicate and not (tmp_path / "b.dcm").exists()
    changed = tmp_path / "c.dcm"
    changed.write_bytes(src.read_bytes() + b"\0\0")
    second = spool.store(changed, header, [(1, first.sha256)])
    assert (second.version, second.duplicate) == (2, False)
    assert second.relpath.endswith(".v2.dcm") and (spool.root / second.relpath).exists()


def test_watermark_check(tmp_path: Path) -> None:
    """The listener asks check_room before it acknowledges (0xA700 when refused, see
    test_scp): an impossible watermark refuses, none admits, and the size of the data
    set counts against the free space."""
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(SpoolFull):
        Spool(tmp_path / "a", tmp_path, min_free_bytes=2**62).check_room()
    Spool(tmp_path / "b", tmp_path).check_room(1 << 20)
    with pytest.raises(SpoolFull):
        Spool(tmp_path / "c", tmp_path, min_free_bytes=1).check_room(free + (1 << 30))


def test_truncated_files_are_malformed(tmp_path: Path) -> None:
    native = (SAMPLES / "CT_small.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(native[:-100])  # inside the trailing padding element
    with pytest.raises(MalformedDataset, match="truncated"):
        read_header(cut)
    cut.write_bytes(native[:-1000])  # inside the pixel data
    with pytest.raises(MalformedDataset, match="pixel data"):
        read_header(cut)
    j2k = (SAMPLES / "693_J2KI.dcm").read_bytes()
    cut.write_bytes(j2k[:-20])
    with pytest.raises(MalformedDataset):
        read_header(cut)
    assert read_header(SAMPLES / "693_J2KI.dcm").modality == "CT"


def test_quarantine_keeps_reason_and_clean_temp(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", tmp_path)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom")
    target = spool.quarantine(bad, "not a DICOM Part 10 file")
    assert target.exists() and target.with_suffix(".reason").read_text().startswith("not a")
    (spool.tmp / "partial.dcm").write_bytes(b"x")
    assert spool.clean_temp() == 1
