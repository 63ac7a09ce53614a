"""Mutations of a C-STORE data set and the oracle's reading of one (issue 16).

:func:`mutate_data_set` changes the captured CT's Explicit VR Little Endian bytes
(PS3.5 §7.1.2): bit flips, truncation (mostly inside Pixel Data), a wrong VR code, a
wrong group length, another SOP Instance UID. :func:`read_data_set` is what a Success
from the node must imply.
"""

from __future__ import annotations

import random
import struct
import warnings
from io import BytesIO

import pydicom


def flip(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(len(out))
        out[pos] ^= 1 << rng.randrange(8)
    return bytes(out)



_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT",
             b"SV", b"UV"}


def elements(data: bytes) -> list[tuple[int, int, int]]:
    """``(offset, tag, value offset)`` of the top-level Explicit VR LE elements."""
    out, pos = [], 0
    while pos + 8 <= len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        vr = data[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(data):
                break
            length, start = struct.unpack_from("<L", data, pos + 8)[0], pos + 12
        else:
            length, start = struct.unpack_from("<H", data, pos + 6)[0], pos + 8
        out.append((pos, group << 16 | elem, start))
        if length == 0xFFFFFFFF:
            break  # undefined length: not in the captured CT
        pos = start + length
    return out


def mutate_data_set(data: bytes, rng: random.Random, name: str) -> bytes:
    """A mutation of the C-STORE data set's bytes (Explicit VR Little Endian)."""
    found = elements(data)
    if name == "ds_bit_flip":
        return flip(data, rng)
    if name == "ds_truncate":  # mostly inside Pixel Data, the last element
        return data[:rng.randrange(len(data) // 2, len(data))]
    if name == "ds_wrong_vr":
        pos = rng.choice(found)[0]
        vr = rng.choice([b"XX", b"CQ", b"UN", b"OB", b"SQ", b"DS", b"ZZ", b"\0\0"])
        return data[:pos + 4] + vr + data[pos + 6:]
    if name == "ds_group_length":  # (0008,0000) UL with a wrong value, first
        value = rng.choice([0, 1, 7, 0xFFFFFFFF, len(data)])
        return struct.pack("<HH2sHL", 8, 0, b"UL", 4, value) + data
    if name == "ds_other_instance":  # the same length, another last digit
        for pos, tag, start in found:
            if tag == 0x00080018:  # SOP Instance UID
                end = start + struct.unpack_from("<H", data, pos + 6)[0]
                last = end - 1 if data[end - 1] else end - 2  # before a NUL pad
                digit = str((data[last] - 0x30 + 1) % 10).encode()
                return data[:last] + digit + data[last + 1:]
    return data


def read_data_set(data: bytes, sop_class: str, sop_instance: str) -> bool:
    """True when pydicom reads every element of ``data`` (Explicit VR Little Endian),
    its SOP Class / Instance UIDs are the command's (PS3.4 B.2) and its native Pixel
    Data, an OB/OW value, holds Rows × Columns × Samples × Bits Allocated / 8 bytes
    (PS3.5 §8.1.1): what the node promises to check before a Success. Pixel values are
    not decoded (neither does the node: an unknown Photometric Interpretation passes)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.filereader.read_dataset(BytesIO(data), is_implicit_VR=False,
                                                 is_little_endian=True)
            for element in ds.iterall():
                _ = element.value
            if ds.SOPClassUID != sop_class or ds.SOPInstanceUID != sop_instance:
                return False
            if "PixelData" not in ds:
                return True
            pixels = ds["PixelData"]
            needed = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
                      * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.BitsAllocated) + 7) // 8
            return pixels.VR in ("OB", "OW") and len(pixels.value) >= needed
    except Exception:
        return False
