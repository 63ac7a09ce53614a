"""Reading what a sender stored, without decoding pixels.

The listener must not trust a dataset just because pynetdicom received it: pynetdicom
answers Success even when the pixel data was cut short. :func:`read_header` parses a
received Part 10 file (PS3.10 §7) up to and around its pixel data element, checks the
identifying UIDs (PS3.5 §9.1) before they become path parts, and checks that the pixel
data is complete:

* native (uncompressed) pixel data must hold Rows × Columns × Number of Frames ×
  Samples per Pixel × Bits Allocated / 8 bytes (PS3.5 §8.1.1, PS3.3 C.7.6.3);
* encapsulated pixel data must be a well-formed item sequence: a Basic Offset Table item,
  at least one fragment item per frame (or fragments for one frame), closed by a Sequence
  Delimitation Item (PS3.5 §A.4);
* an image Storage SOP Class data set must hold pixel data at all (the caller names
  those classes: Pixel Data is Type 1 in their Image Pixel Module, PS3.3 C.7.6.3, with
  every transfer syntax the node accepts);
* every explicit VR must be one PS3.5 §6.2 defines (pydicom, which reads the series
  later, cannot read an element of an unknown VR such as ``CQ``), in nested sequence
  items too;
* a deflated data set may inflate to :data:`MAX_INFLATED_BYTES` at most (a small
  deflate stream can expand a thousandfold: unbounded, it exhausted the listener's
  memory and the association was aborted instead of answered).

UIDs: the standard's form (PS3.5 §9.1: no leading zero in a component, at most 64
characters) is what :func:`is_valid_uid` checks; the listener also accepts components
with leading zeros, which some modalities send and DCMTK and Orthanc store
(:func:`is_acceptable_uid`), and :func:`node.store.spool.path_part` names them by a hash.
Nothing else: only digits and dots, no empty component, nothing after the last digit
(a trailing newline is refused: no sender means it), and at most 64 characters — the
ledger's UID columns hold 64 (PostgreSQL refused a longer one *after* the Success, so
the image never reached the pipeline) and the report copies the UIDs into UI elements
(at most 64 characters, PS3.5 §6.2): a longer UID is refused before the Success.

Nothing here decodes pixel values or builds a pydicom Dataset: a small scanner walks the
element headers of the memory-mapped file (PS3.5 §7.1: explicit/implicit VR, little/big
endian; deflated data is inflated first), keeps the handful of attributes routing needs
and stops at the pixel data. Reading a 512×512 CT header costs tens of microseconds.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import zlib
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path

#: PS3.5 §9.1: digits and dots, no empty component, no leading zero, at most 64 chars.
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
UID_MAX_LENGTH = 64
#: What the listener accepts besides: components with leading zeros.
_LOOSE_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
#: A deflated data set inflating to more than this is refused (PS3.5 §A.5): 256 MiB, a
#: 500-frame 512×512 16-bit multi-frame image; held in memory while it is checked.
MAX_INFLATED_BYTES = 256 << 20

PIXEL_DATA = 0x7FE00010
FLOAT_PIXEL_DATA = 0x7FE00008
DOUBLE_FLOAT_PIXEL_DATA = 0x7FE00009
_PIXEL_TAGS = {PIXEL_DATA: 0, FLOAT_PIXEL_DATA: 32, DOUBLE_FLOAT_PIXEL_DATA: 64}
#: The VRs each pixel data element may have (PS3.5 §8.2; UN: pydicom reads it as the
#: dictionary VR, PS3.5 §6.2.2; b"": implicit VR).
#: Pixel Data sent as SQ got a Success: its length was counted as pixels, pydicom
#: reads a sequence (fuzz seed 1 case 2909).
_PIXEL_VRS = {PIXEL_DATA: frozenset({b"OB", b"OW", b"UN", b""}),
              FLOAT_PIXEL_DATA: frozenset({b"OF", b""}),
              DOUBLE_FLOAT_PIXEL_DATA: frozenset({b"OD", b""})}
#: The VRs an Image Pixel US attribute may arrive with: US, or UN (pydicom reads it as
#: the dictionary's US) and implicit (b""). Columns sent as DS got a Success: two
#: characters were read as the number (fuzz seed 1 case 2207); Columns of length 18
#: (it swallowed the next element) passed as its first value (seed 1 case 83463).
_US_VRS = frozenset({b"US", b"UN", b""})
#: The VRs Photometric Interpretation may arrive with: CS, UN or implicit, or another
#: plain-text VR (a sender's slip pydicom still reads as the text). Sent as US, SS, FL or
#: AT (fuzz seed 3) its bytes still spelt "MONOCHROME2" for the node while pydicom read
#: numbers and could not decode the pixels (``TypeError: unhashable type``).
_TEXT_VRS = frozenset({b"CS", b"LO", b"SH", b"ST", b"LT", b"UT", b"UC", b"UN", b""})
_ITEM = 0xFFFEE000
_ITEM_DELIM = 0xFFFEE00D
_SEQ_DELIM = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
#: The VRs with a 2-byte length (PS3.5 §7.1.2, Table 7.1-2); any other code is unknown.
_SHORT_VRS = frozenset(
    {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT",
     b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
)
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
#: The syntaxes whose Pixel Data is native (PS3.5 §8.2); every other one encapsulates it
#: (§A.4) and a defined-length Pixel Data value cannot be decoded in it.
NATIVE_SYNTAXES = frozenset({
    IMPLICIT_VR_LITTLE_ENDIAN, "1.2.840.10008.1.2.1", EXPLICIT_VR_BIG_ENDIAN,
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
})
_TRANSFER_SYNTAX = 0x00020010
# Attributes kept while scanning (tag -> name); everything else is skipped.
_WANTED = {
    0x00080016: "sop_class_uid", 0x00080018: "sop_instance_uid", 0x00080060: "modality",
    0x0008103E: "series_description", 0x0020000D: "study_instance_uid",
    0x0020000E: "series_instance_uid", 0x00280002: "samples", 0x00280008: "frames",
    0x00280010: "rows", 0x00280011: "columns", 0x00280100: "bits_allocated",
    0x00280004: "photometric", 0x00280101: "bits_stored", 0x00280103: "pixel_representation",
    0x00280006: "planar_configuration",
}
_US_FIELDS = frozenset({"samples", "rows", "columns", "bits_allocated", "bits_stored",
                        "pixel_representation", "planar_configuration"})
#: Photometric Interpretation's defined terms (PS3.3 C.7.6.3.1.2, retired ones included).
_PHOTOMETRIC = frozenset({
    "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "HSV", "ARGB", "CMYK",
    "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT",
    "XYZ"})
_MAX_DEPTH = 32


class MalformedDataset(ValueError):
    """The received dataset cannot be accepted; ``reason`` is safe to log (no PHI)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class InstanceHeader:
    """The identifying attributes of one received instance (UIDs only, no PHI)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    series_description: str
    transfer_syntax_uid: str


def is_valid_uid(value: str) -> bool:
    """True when ``value`` is a UID per PS3.5 §9.1 (safe as a file-name part)."""
    return len(value) <= UID_MAX_LENGTH and _UID_RE.fullmatch(value) is not None


def is_acceptable_uid(value: str) -> bool:
    """True when the listener accepts ``value`` as a UID: digits and dots, no empty
    component, at most 64 characters (leading zeros allowed: see the module
    documentation)."""
    return len(value) <= UID_MAX_LENGTH and _LOOSE_UID_RE.fullmatch(value) is not None



_Buf = bytes | mmap.mmap | memoryview


class _Scanner:
    """Walks data element headers (PS3.5 §7.1) of one encoding over a buffer."""

    def __init__(self, buf: _Buf, end: int, *, little: bool, implicit: bool) -> None:
        self.buf, self.end, self.implicit = buf, end, implicit
        self.u16 = struct.Struct("<H" if little else ">H")
        self.u32 = struct.Struct("<L" if little else ">L")
        self.tag_len = struct.Struct("<HHL" if little else ">HHL")

    def _need(self, offset: int, count: int) -> None:
        if offset + count > self.end:
            raise MalformedDataset("dataset ends inside a data element (truncated)")

    def header(self, pos: int) -> tuple[int, bytes, int, int]:
        """(tag, VR or b"", value length, value offset) of the element at ``pos``."""
        self._need(pos, 8)
        group, elem, implicit_len = self.tag_len.unpack_from(self.buf, pos)
        tag = (group << 16) | elem
        if self.implicit or group == 0xFFFE:
            return tag, b"", implicit_len, pos + 8
        vr = bytes(self.buf[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            self._need(pos, 12)
            return tag, vr, self.u32.unpack_from(self.buf, pos + 8)[0], pos + 12
        if vr not in _SHORT_VRS:
            raise MalformedDataset(f"unknown Value Representation {vr.hex()} (hex)")
        return tag, vr, self.u16.unpack_from(self.buf, pos + 6)[0], pos + 8

    def skip_sequence(self, pos: int, depth: int, vr: bytes) -> int:
        """Offset just past an undefined-length sequence value starting at ``pos``
        (``vr`` SQ, UN — its items are Implicit VR Little Endian, PS3.5 §6.2.2 — or an
        encapsulated OB/OW whose items are fragments, not data sets)."""
        if depth > _MAX_DEPTH:
            raise MalformedDataset("sequences nested too deeply")
        inner = self if vr != b"UN" or self.implicit else _Scanner(
            self.buf, self.end, little=True, implicit=True
        )
        while True:
            tag, _, length, pos = self.header(pos)
            if tag == _SEQ_DELIM:
                return pos
            if tag != _ITEM:
                raise MalformedDataset("malformed sequence item")
            pos = inner.skip_item(pos, length, depth, parse=vr == b"SQ")

    def skip_items(self, pos: int, end: int, depth: int) -> None:
        """Walk the items of a defined-length sequence value ``[pos, end)``."""
        if depth > _MAX_DEPTH:
            raise MalformedDataset("sequences nested too deeply")
        while pos < end:
            tag, _, length, pos = self.header(pos)
            if tag != _ITEM:
                raise MalformedDataset("malformed sequence item")
            pos = self.skip_item(pos, length, depth, parse=True)
        if pos != end:
            raise MalformedDataset("sequence item runs past its sequence")

    def skip_item(self, pos: int, length: int, depth: int, *, parse: bool) -> int:
        """Offset just past an item's value; a data set item's elements are walked
        (their VRs checked) when the encoding is explicit or the length undefined."""
        if length == _UNDEFINED:
            while True:  # elements up to the item delimiter
                tag, vr, length, pos = self.header(pos)
                if tag == _ITEM_DELIM:
                    return pos
                pos = self.skip_value(pos, vr, length, depth + 1)
        self._need(pos, length)
        end = pos + length
        if parse and not self.implicit:
            while pos < end:
                tag, vr, length, pos = self.header(pos)
                pos = self.skip_value(pos, vr, length, depth + 1)
            if pos != end:
                raise MalformedDataset("item element runs past its item")
        return end

    def skip_value(self, pos: int, vr: bytes, length: int, depth: int) -> int:
        """Offset just past a value of ``length`` bytes (or an undefined-length one)."""
        if length == _UNDEFINED:
            return self.skip_sequence(pos, depth, vr if vr else b"SQ")
        self._need(pos, length)
        if vr == b"SQ":
            self.skip_items(pos, pos + length, depth + 1)
        return pos + length

    def text(self, pos: int, length: int) -> str:
        return bytes(self.buf[pos : pos + length]).decode("latin-1").strip("\x00 ")


def _fragments(scan: _Scanner, pos: int) -> tuple[int, int]:
    """Walk encapsulated pixel data items (PS3.5 §A.4): (fragment count, end offset)."""
    items = 0
    while True:
        if pos + 8 > scan.end:
            raise MalformedDataset("encapsulated pixel data ends without a delimiter")
        group, elem, length = struct.unpack_from("<HHL", scan.buf, pos)
        tag, pos = (group << 16) | elem, pos + 8
        if tag == _SEQ_DELIM:
            return items - 1, pos  # the first item is the Basic Offset Table
        if tag != _ITEM or length == _UNDEFINED or pos + length > scan.end:
            raise MalformedDataset("encapsulated pixel data has a malformed item")
        pos += length
        items += 1


def _meta(buf: _Buf, size: int) -> tuple[str, int]:
    """Transfer Syntax UID and the offset where the dataset starts (PS3.10 §7.1)."""
    if size < 132 or bytes(buf[128:132]) != b"DICM":
        raise MalformedDataset("not a DICOM Part 10 file")
    scan = _Scanner(buf, size, little=True, implicit=False)
    pos, syntax = 132, ""
    while pos + 8 <= size:
        if scan.u16.unpack_from(buf, pos)[0] != 0x0002:
            break  # the data set starts (deflated, maybe: no element header to read)
        tag, vr, length, value_pos = scan.header(pos)
        if tag == _TRANSFER_SYNTAX:
            syntax = scan.text(value_pos, length)
        pos = scan.skip_value(value_pos, vr, length, 0)
    if not is_valid_uid(syntax):
        raise MalformedDataset("file meta has no valid Transfer Syntax UID")
    return syntax, pos


def _scan_dataset(scan: _Scanner, pos: int, *, encapsulated: bool = False
                  ) -> dict[str, str | int]:
    """Collect the wanted attributes, checking every top-level element is complete;
    ``encapsulated``: the transfer syntax requires encapsulated Pixel Data."""
    found: dict[str, str | int] = {}
    while pos < scan.end:
        tag, vr, length, value_pos = scan.header(pos)
        bits = _PIXEL_TAGS.get(tag)
        if tag == PIXEL_DATA and encapsulated and length != _UNDEFINED:
            # PixelMed sends native pixels on the JPEG-LS context of another file
            raise MalformedDataset("native pixel data in a compressed transfer syntax")
        if bits is not None:
            if vr not in _PIXEL_VRS[tag]:
                raise MalformedDataset(f"pixel data element has VR {vr.hex()} (hex)")
            pos = _check_pixels(scan, found, value_pos, length, bits)
            found["pixel_data"] = tag
            continue
        name = _WANTED.get(tag)
        if name is not None and length != _UNDEFINED:
            scan._need(value_pos, length)
            if name in _US_FIELDS:  # -1: _number refuses it if the pixels need it
                us = length == 2 and vr in _US_VRS  # VM 1 (PS3.3 C.7.6.3)
                found[name] = scan.u16.unpack_from(scan.buf, value_pos)[0] if us else -1
            elif name == "photometric" and vr not in _TEXT_VRS:
                found[name] = ""  # refused below: not a defined term as pydicom reads it
            else:
                found[name] = scan.text(value_pos, length)
        pos = scan.skip_value(value_pos, vr, length, 0)
    return found


def _number(found: dict[str, str | int], name: str, default: int | None = None) -> int:
    value = found.get(name, default)
    try:
        number = int(value) if value is not None and value != "" else default
    except ValueError:
        number = None
    if number is None or number < 0:
        raise MalformedDataset(f"{name} missing or invalid")
    return number


def _check_image_pixel(found: dict[str, str | int], bits: int) -> None:
    """The Image Pixel attributes native pixels are read with (PS3.3 C.7.6.3; pydicom
    refuses to decode without them): the fuzzer had Bits Allocated 0, Bits Stored or
    Photometric Interpretation missing, "MONOHROME2" and (seed 3 of bench/fuzz.py)
    Samples per Pixel missing, Photometric Interpretation sent with a numeric VR all
    answered Success."""
    if found.get("photometric") not in _PHOTOMETRIC:
        raise MalformedDataset("photometric interpretation missing or not a defined term")
    if not 1 <= _number(found, "rows") <= 0xFFFF or not 1 <= _number(found, "columns") <= 0xFFFF:
        raise MalformedDataset("rows or columns out of range")
    samples = _number(found, "samples")
    if samples not in (1, 3) or _number(found, "frames", 1) < 1:
        raise MalformedDataset("samples per pixel or number of frames invalid")
    if samples == 3 and found.get("planar_configuration") not in (0, 1):
        # Type 1C when Samples per Pixel > 1; sent with two values, pydicom refused it
        raise MalformedDataset("planar configuration missing or not 0/1")
    if bits:  # Float / Double Float Pixel Data: 32 / 64 bits, no Bits Stored
        return
    allocated = _number(found, "bits_allocated")
    if allocated != 1 and (allocated % 8 or not 8 <= allocated <= 64):
        raise MalformedDataset("bits allocated is not 1 or a multiple of 8 up to 64")
    if not 1 <= _number(found, "bits_stored") <= allocated:
        raise MalformedDataset("bits stored missing or not within bits allocated")
    if _number(found, "pixel_representation") not in (0, 1):
        raise MalformedDataset("pixel representation missing or not 0/1")


def _check_pixels(
    scan: _Scanner, found: dict[str, str | int], pos: int, length: int, bits: int
) -> int:
    """Check the pixel data value at ``pos`` (MalformedDataset when incomplete); its end."""
    frames = _number(found, "frames", 1)
    if length == _UNDEFINED:
        fragments, end = _fragments(scan, pos)
        if fragments < max(frames, 1):
            raise MalformedDataset(
                f"encapsulated pixel data has {fragments} fragment(s) for {frames} frame(s)"
            )
        return end
    if pos + length > scan.end:
        raise MalformedDataset("pixel data is longer than the data received")
    _check_image_pixel(found, bits)
    sample_bits = bits or _number(found, "bits_allocated")
    samples = _number(found, "samples", 1)
    if found.get("photometric") == "YBR_FULL_422":  # 2 samples per pixel (PS3.3 C.7.6.3.1.2)
        samples = 2
    total_bits = (
        _number(found, "rows") * _number(found, "columns") * frames * samples * sample_bits
    )
    expected = (total_bits + 7) // 8
    if length < expected:
        raise MalformedDataset(f"pixel data has {length} bytes, the image needs {expected}")
    return pos + length


def _uid(found: dict[str, str | int], name: str) -> str:
    value = found.get(name)
    if not isinstance(value, str) or not is_acceptable_uid(value):
        raise MalformedDataset(f"{name} missing or not a valid UID")
    return value


def _inflate(deflated: bytes) -> bytes:
    """A deflated data set's bytes (PS3.5 §A.5), at most :data:`MAX_INFLATED_BYTES`."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        data = inflater.decompress(deflated, MAX_INFLATED_BYTES + 1)
    except zlib.error as exc:
        raise MalformedDataset("deflated dataset cannot be inflated") from exc
    if len(data) > MAX_INFLATED_BYTES:
        raise MalformedDataset(f"deflated dataset inflates beyond {MAX_INFLATED_BYTES} bytes")
    if not inflater.eof:
        raise MalformedDataset("deflated dataset cannot be inflated (truncated)")
    return data


def _scan_file(buf: _Buf, size: int, image_classes: Container[str]) -> InstanceHeader:
    syntax, start = _meta(buf, size)
    if syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        buf, start = _inflate(bytes(buf[start:size])), 0
        size = len(buf)
    scan = _Scanner(
        buf, size,
        little=syntax != EXPLICIT_VR_BIG_ENDIAN,
        implicit=syntax == IMPLICIT_VR_LITTLE_ENDIAN,
    )
    found = _scan_dataset(scan, start, encapsulated=syntax not in NATIVE_SYNTAXES)
    sop_class_uid = _uid(found, "sop_class_uid")
    if sop_class_uid in image_classes and "pixel_data" not in found:
        raise MalformedDataset("image storage data set without pixel data")
    return InstanceHeader(
        sop_instance_uid=_uid(found, "sop_instance_uid"),
        sop_class_uid=sop_class_uid,
        study_instance_uid=_uid(found, "study_instance_uid"),
        series_instance_uid=_uid(found, "series_instance_uid"),
        modality=str(found.get("modality", "")),
        series_description=str(found.get("series_description", "")),
        transfer_syntax_uid=syntax,
    )


def read_header(path: Path, image_classes: Container[str] = frozenset()) -> InstanceHeader:
    """Scan a received Part 10 file and check that it can be accepted.

    Parameters
    ----------
    path
        A file in the DICOM File Format (PS3.10), as pynetdicom writes it when
        receiving with ``STORE_RECV_CHUNKED_DATASET``.
    image_classes
        SOP Class UIDs whose data sets must hold pixel data (image storage classes).

    Returns
    -------
    InstanceHeader
        The identifying UIDs, modality and series description.

    Raises
    ------
    MalformedDataset
        With a reason free of patient data: truncated or malformed element headers,
        an unknown VR, invalid UIDs, pixel data missing from an image or shorter than
        the image attributes require, a deflated data set inflating beyond its bound.
    """
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise MalformedDataset("empty dataset")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return scan_header(buf, size, image_classes)


def scan_header(
    buf: _Buf, size: int | None = None, image_classes: Container[str] = frozenset()
) -> InstanceHeader:
    """:func:`read_header` over bytes in memory (a Part 10 file's bytes, e.g. a
    memory-mapped journal record); same checks, same errors."""
    size = len(buf) if size is None else size
    if size == 0:
        raise MalformedDataset("empty dataset")
    try:
        return _scan_file(buf, size, image_classes)
    except (struct.error, ValueError) as exc:
        if isinstance(exc, MalformedDataset):
            raise
        raise MalformedDataset(f"cannot parse dataset: {type(exc).__name__}") from exc
