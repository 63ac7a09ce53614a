"""Independent DICOM senders and the checks of the interop matrix (``tests/test_interop.py``).

Senders nobody here wrote: DCMTK ``storescu``, pynetdicom, PixelMed's
``StorageSOPClassSCU`` (Debian ``libpixelmed-java``), GDCM's ``gdcmscu`` (Debian
``libgdcm-tools``) and Orthanc (``tests.support.orthanc``). Samples are pydicom's and
pydicom-data's test files (offline: ``pydicom.data.get_testdata_file``).

What "stored byte-identical to what was sent" means here (see :func:`check_stored`):

* **wire**: the data set of the node's spool file (the bytes after its File Meta
  Information) equals, byte for byte, the data set the sender put on the wire, as the
  recording proxy (:mod:`tests.support.dicomproxy`) reassembled it from the P-DATA-TF
  PDVs; its meta's Transfer Syntax is the one the node accepted for that presentation
  context. This holds for every sender and every case.
* **file**: where the sender streams its file's data set unchanged (pynetdicom given a
  path), the spool data set also equals the sample file's data set, byte for byte.
* **content**: where the sender re-encodes (DCMTK drops group lengths and converts to
  the negotiated syntax; Orthanc, PixelMed, GDCM write their own encoding), the wire
  data set decodes to the sample's elements: equal values for every element but group
  lengths, the same encoded Pixel Data when the syntax is unchanged, equal decoded
  pixels when it changed.
"""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, generate_uid

from tests.support.dicomproxy import SentDataSet

PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
GDCMSCU = Path("/usr/bin/gdcmscu")
STORESCU = Path("/usr/bin/storescu")
JAVA = Path("/usr/bin/java")
PIXEL_DATA = 0x7FE00010
#: Data Set Trailing Padding: a sender may drop it (PS3.10 §7.2).
TRAILING_PADDING = 0xFFFCFFFC
#: gdcmscu 3.0.21 throws "ProtocolStream as nullptr is invalid" while closing, against
#: every SCP (also DCMTK's storescp): SIGABRT after its stores (a GDCM bug).
GDCM_ABORT_EXIT = -6

#: The samples, by the role they play in the matrix (pydicom / pydicom-data names).
SAMPLES: dict[str, str] = {
    "ct": "CT_small.dcm",                        # CT, Explicit VR LE
    "ct_j2k": "693_J2KR.dcm",                    # CT, JPEG 2000 lossless
    "ct_j2k_lossy": "693_J2KI.dcm",              # CT, JPEG 2000
    "mr": "MR_small.dcm",                        # MR, Explicit VR LE
    "mr_implicit": "MR_small_implicit.dcm",      # MR, Implicit VR LE
    "mr_big": "MR_small_bigendian.dcm",          # MR, Explicit VR BE
    "mr_rle": "MR_small_RLE.dcm",                # MR, RLE lossless
    "mr_j2k": "MR_small_jp2klossless.dcm",       # MR, JPEG 2000 lossless
    "mr_jls": "MR_small_jpeg_ls_lossless.dcm",   # MR, JPEG-LS lossless
    "cr": "RG3_UNCR.dcm",                        # CR, 6 MB, Explicit VR LE
    "cr_j2k": "RG3_J2KR.dcm",                    # CR, JPEG 2000 lossless
    "us_rgb": "US1_UNCR.dcm",                    # US RGB, Explicit VR LE
    "us_rgb_j2k": "US1_J2KR.dcm",                # US YBR_RCT, JPEG 2000 lossless
    "us_rgb_big": "ExplVR_BigEnd.dcm",           # US RGB, Explicit VR BE
    "us_palette_rle": "OBXXXX1A_rle.dcm",        # US palette, RLE
    "mf": "emri_small.dcm",                      # Enhanced MR, 10 frames
    "mf_big": "emri_small_big_endian.dcm",       # 10 frames, Explicit VR BE
    "mf_rle": "emri_small_RLE.dcm",              # 10 frames, RLE
    "mf_j2k": "emri_small_jpeg_2k_lossless.dcm",  # 10 frames, JPEG 2000 lossless
    "sc_rgb_rle_2f": "SC_rgb_rle_2frame.dcm",    # SC RGB, 2 frames, RLE
    "sc_rgb_jpeg_ll": "SC_rgb_jpeg_gdcm.dcm",    # SC RGB, JPEG lossless SV1
    "nm_jpeg_ll": "JPEG-LL.dcm",                 # NM, JPEG lossless SV1
    "us_jpeg_ll": "JPGLosslessP14SV1_1s_1f_8b.dcm",  # US, JPEG lossless SV1
    "deflated": "image_dfl.dcm",                 # Deflated Explicit VR LE
}


def sample(name: str) -> Path:
    """The path of sample ``name`` (a key of :data:`SAMPLES`)."""
    return Path(get_testdata_file(SAMPLES[name]))  # type: ignore[arg-type]


def fresh_copies(names: Sequence[str], out: Path) -> dict[str, Path]:
    """Copies of the samples with new SOP Instance UIDs, in their own transfer syntax
    (pydicom keeps the original encoding), so that every case of the matrix stores
    instances of its own and each can be traced to exactly one spool file."""
    out.mkdir(parents=True, exist_ok=True)
    copies = {}
    for name in names:
        ds = pydicom.dcmread(sample(name))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        copies[name] = out / f"{name}.dcm"
        ds.save_as(copies[name])
    return copies


def sop_instance_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# Part 10 files ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Part10:
    """A DICOM file split at the end of its File Meta Information (PS3.10 §7.1)."""

    meta: Dataset
    dataset: bytes

    @property
    def transfer_syntax(self) -> UID:
        return UID(self.meta.TransferSyntaxUID)


def split_part10(raw: bytes) -> Part10:
    """Preamble, ``DICM``, group 0002 (always Explicit VR LE), then the data set."""
    if raw[128:132] != b"DICM":
        raise ValueError("no DICM prefix")
    pos = 132
    while pos + 8 <= len(raw) and struct.unpack("<H", raw[pos:pos + 2])[0] == 0x0002:
        vr = raw[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            pos += 12 + struct.unpack("<I", raw[pos + 8:pos + 12])[0]
        else:
            pos += 8 + struct.unpack("<H", raw[pos + 6:pos + 8])[0]
    meta = read_dataset(BytesIO(raw[132:pos]), is_implicit_VR=False, is_little_endian=True)
    return Part10(meta, raw[pos:])


def spool_files(spool: Path, sop_instance_uid: str) -> list[Path]:
    """Every stored version of an instance (``<uid>.dcm``, ``<uid>.vN.dcm``)."""
    return sorted(spool.rglob(f"{sop_instance_uid}.dcm")) + sorted(
        spool.rglob(f"{sop_instance_uid}.v*.dcm"))


def decode(data: bytes, transfer_syntax: str) -> Dataset:
    """A data set (no meta) in ``transfer_syntax``, decoded by pydicom."""
    ts = UID(transfer_syntax)
    fm = Dataset()
    fm.TransferSyntaxUID = ts
    buffer = BytesIO(data)
    if ts.is_deflated:
        import zlib
        buffer = BytesIO(zlib.decompress(data, -zlib.MAX_WBITS))
    ds = read_dataset(buffer, is_implicit_VR=ts.is_implicit_VR,
                      is_little_endian=ts.is_little_endian)
    ds.file_meta = fm  # type: ignore[assignment]
    ds.set_original_encoding(ts.is_implicit_VR, ts.is_little_endian)
    return ds


# Checks --------------------------------------------------------------------------------------
def check_stored(spool: Path, sent: SentDataSet, *, calling_ae: str) -> Part10:
    """**wire**: the spool's one file for ``sent`` holds exactly the data set sent, in the
    accepted transfer syntax, with our meta naming the instance and the caller."""
    files = spool_files(spool, sent.sop_instance_uid)
    assert len(files) == 1, f"{sent.sop_instance_uid}: {files}"
    stored = split_part10(files[0].read_bytes())
    assert stored.dataset == sent.data, (
        f"{sent.sop_instance_uid}: stored data set differs from the wire "
        f"({len(stored.dataset)} vs {len(sent.data)} bytes)")
    assert stored.transfer_syntax == sent.transfer_syntax, (stored.transfer_syntax, sent)
    assert stored.meta.MediaStorageSOPInstanceUID == sent.sop_instance_uid
    assert stored.meta.MediaStorageSOPClassUID == sent.sop_class_uid
    assert stored.meta.SourceApplicationEntityTitle.strip() == calling_ae
    return stored


def check_file_identical(stored: Part10, source: Path) -> None:
    """**file**: the stored data set is the sample file's data set, byte for byte."""
    original = split_part10(source.read_bytes())
    assert stored.transfer_syntax == original.transfer_syntax, source.name
    assert stored.dataset == original.dataset, f"{source.name}: data set bytes differ"


def _comparable(ds: Dataset) -> dict[int, object]:
    """Element values by tag, group lengths and Pixel Data left out, sequences recursed."""
    out: dict[int, object] = {}
    for elem in ds:
        if elem.tag.element == 0 or elem.tag in (PIXEL_DATA, TRAILING_PADDING):
            continue
        if elem.VR == "SQ":
            out[int(elem.tag)] = [_comparable(item) for item in elem.value]
        elif elem.VR in ("UN", "OB", "OW") or elem.tag.is_private:
            # implicit VR leaves private elements undecoded: compare their value bytes
            # (what a sender re-encoding them cannot change, up to padding)
            value = elem.value
            out[int(elem.tag)] = bytes(value).rstrip(b"\0 ") if isinstance(
                value, (bytes, bytearray)) else value
        else:
            out[int(elem.tag)] = elem.value
    return out


def check_same_content(sent: SentDataSet, source: Path) -> None:
    """**content**: the wire data set decodes to the sample's elements and pixels."""
    original = pydicom.dcmread(source)
    wire = decode(sent.data, sent.transfer_syntax)
    assert str(wire.SOPInstanceUID) == sent.sop_instance_uid
    mine, theirs = _comparable(original), _comparable(wire)
    differing = sorted(f"{t:08X}" for t in set(mine) | set(theirs)
                       if mine.get(t) != theirs.get(t))
    assert not differing, f"{source.name}: elements differ on the wire: {differing[:8]}"
    if original.file_meta.TransferSyntaxUID == sent.transfer_syntax:
        assert wire.PixelData == original.PixelData, f"{source.name}: encoded pixels differ"
    else:
        assert np.array_equal(wire.pixel_array, original.pixel_array), (
            f"{source.name}: decoded pixels differ after conversion to "
            f"{UID(sent.transfer_syntax).name}")


# Senders -----------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def run_storescu(port: int, files: Sequence[Path], options: Sequence[str], *,
                 aet: str, aec: str = "QCNODE") -> subprocess.CompletedProcess[str]:
    """DCMTK storescu, one association, ``-v`` (never raises on a DICOM failure)."""
    cmd = [str(STORESCU), "-v", "-aet", aet, "-aec", aec, "-to", "30", "-nh", *options,
           "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300,
                          check=False)


def storescu_profile(path: Path, transfer_syntax: str, sop_classes: Sequence[str]) -> Path:
    """A storescu ``--config-file`` whose profile ``ONLY`` proposes one transfer syntax
    for each SOP class (``-x?`` options always add the uncompressed syntaxes, and the
    node prefers Explicit VR Little Endian among them)."""
    contexts = "\n".join(f"PresentationContext{i} = {uid}\\Only"
                         for i, uid in enumerate(dict.fromkeys(sop_classes), 1))
    path.write_text(
        "[[TransferSyntaxes]]\n[Only]\nTransferSyntax1 = " + transfer_syntax + "\n"
        "[[PresentationContexts]]\n[OnlyContexts]\n" + contexts + "\n"
        "[[Profiles]]\n[ONLY]\nPresentationContexts = OnlyContexts\n")
    return path


def run_pixelmed(port: int, files: Sequence[Path], *, aet: str,
                 aec: str = "QCNODE") -> subprocess.CompletedProcess[str]:
    """PixelMed's StorageSOPClassSCU: ``host port calledAE callingAE - compression``
    reads the file names from stdin and sends them in one association; compression
    level 0 proposes each file's own transfer syntax (plus the uncompressed ones).
    It prints a failure's stack trace and still exits 0: judge by what was stored."""
    if not PIXELMED_JAR.exists():
        raise FileNotFoundError(f"{PIXELMED_JAR} missing: run `make system-deps`")
    cmd = [str(JAVA), "-cp", str(PIXELMED_JAR), "com.pixelmed.network.StorageSOPClassSCU",
           "127.0.0.1", str(port), aec, aet, "-", "0"]
    return subprocess.run(cmd, input="".join(f"{f}\n" for f in files), capture_output=True,
                          text=True, timeout=300, check=False)


def run_gdcmscu(port: int, files: Sequence[Path], *, aet: str,
                aec: str = "QCNODE") -> subprocess.CompletedProcess[str]:
    """GDCM's gdcmscu ``--store``, one association for all files (exits with SIGABRT
    after its stores: :data:`GDCM_ABORT_EXIT`)."""
    if not GDCMSCU.exists():
        raise FileNotFoundError(f"{GDCMSCU} missing: run `make system-deps`")
    cmd = [str(GDCMSCU), "--store", "--call", aec, "--aetitle", aet, "127.0.0.1", str(port),
           *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
