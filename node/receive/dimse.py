"""DIMSE command sets for C-ECHO, C-STORE and N-EVENT-REPORT, and the Part 10 header of a
received file.

Command sets are encoded in Implicit VR Little Endian, group 0000, ascending tags, with
the Command Group Length first (PS3.7 §6.3.1, §9.3.1 C-STORE, §9.3.5 C-ECHO, §10.3.1
N-EVENT-REPORT, Annex E).
A received C-STORE data set is written after a File Meta Information group (PS3.10
§7.1) built from the request, so every spool file is a DICOM Part 10 file holding
exactly the data set bytes that arrived.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Command Field values (PS3.7 §E.1) -------------------------------------------------------
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
N_EVENT_REPORT_RQ = 0x0100
N_EVENT_REPORT_RSP = 0x8100
_RESPONSE_FIELD = {C_STORE_RQ: C_STORE_RSP, C_ECHO_RQ: C_ECHO_RSP,
                   N_EVENT_REPORT_RQ: N_EVENT_REPORT_RSP}
#: Command Data Set Type meaning "no data set" (PS3.7 §E.1).
NO_DATA_SET = 0x0101
DATA_SET_PRESENT = 0x0000

# Command elements (PS3.7 §E.1) -------------------------------------------------------------
TAG_GROUP_LENGTH = 0x00000000
TAG_AFFECTED_SOP_CLASS = 0x00000002
TAG_COMMAND_FIELD = 0x00000100
TAG_MESSAGE_ID = 0x00000110
TAG_MESSAGE_ID_RESPONDED = 0x00000120
TAG_DATA_SET_TYPE = 0x00000800
TAG_STATUS = 0x00000900
TAG_ERROR_COMMENT = 0x00000902
#: Error Comment is LO: at most 64 characters (PS3.5 §6.2, PS3.7 §C.4.1).
MAX_ERROR_COMMENT = 64
TAG_AFFECTED_SOP_INSTANCE = 0x00001000
TAG_EVENT_TYPE_ID = 0x00001002
_US_TAGS = frozenset(
    {TAG_COMMAND_FIELD, TAG_MESSAGE_ID, TAG_DATA_SET_TYPE, TAG_STATUS, 0x00000700,
     TAG_EVENT_TYPE_ID}
)
_ELEMENT = struct.Struct("<HHL")
#: A command set longer than this is not a request the listener serves.
MAX_COMMAND_BYTES = 64 * 1024


class CommandError(ValueError):
    """A command set that cannot be decoded."""


@dataclass(frozen=True)
class Command:
    """The fields of a request command set the listener uses (PS3.7 §9.3.1, §9.3.5,
    §10.3.1)."""

    field: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    has_data_set: bool
    event_type: int | None = None  # N-EVENT-REPORT's Event Type ID


def decode_command(data: bytes) -> Command:
    """Decode an Implicit VR Little Endian command set (PS3.7 §6.3.1)."""
    values: dict[int, int | str] = {}
    pos, end = 0, len(data)
    while pos < end:
        if pos + _ELEMENT.size > end:
            raise CommandError("command element header truncated")
        group, element, length = _ELEMENT.unpack_from(data, pos)
        pos += _ELEMENT.size
        if group != 0x0000 or pos + length > end:
            raise CommandError("command element outside group 0000 or truncated")
        tag = element
        value = data[pos : pos + length]
        pos += length
        if tag in _US_TAGS:
            if length != 2:
                raise CommandError("US command element is not 2 bytes")
            values[tag] = struct.unpack("<H", value)[0]
        elif tag in (TAG_AFFECTED_SOP_CLASS, TAG_AFFECTED_SOP_INSTANCE):
            values[tag] = value.decode("ascii", errors="replace").strip("\x00 ")
    if TAG_COMMAND_FIELD not in values or TAG_MESSAGE_ID not in values:
        raise CommandError("command set lacks Command Field or Message ID")
    return Command(
        field=int(values[TAG_COMMAND_FIELD]),
        message_id=int(values[TAG_MESSAGE_ID]),
        sop_class_uid=str(values.get(TAG_AFFECTED_SOP_CLASS, "")),
        sop_instance_uid=str(values.get(TAG_AFFECTED_SOP_INSTANCE, "")),
        has_data_set=int(values.get(TAG_DATA_SET_TYPE, NO_DATA_SET)) != NO_DATA_SET,
        event_type=int(values[TAG_EVENT_TYPE_ID]) if TAG_EVENT_TYPE_ID in values else None,
    )


def _even(raw: bytes, pad: bytes) -> bytes:
    return raw + pad if len(raw) % 2 else raw


def _ui(value: str) -> bytes:
    """A UI value: ASCII, padded to even length with NUL (PS3.5 §6.2)."""
    return _even(value.encode("ascii", "replace"), b"\0")


def _implicit(tag: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, tag, len(value)) + value


def response(request: Command, status: int, error_comment: str | None = None) -> bytes:
    """The C-STORE-RSP, C-ECHO-RSP or N-EVENT-REPORT-RSP command set answering ``request``.

    ``error_comment`` (only for a failure status) becomes Error Comment (0000,0902),
    ASCII, cut to 64 characters (PS3.7 §9.1.1.1.9, Annex C.4.1). An N-EVENT-REPORT-RSP
    carries the Affected SOP Instance UID and the Event Type ID (PS3.7 Table 10.3-1).
    """
    field = _RESPONSE_FIELD[request.field]
    body = _implicit(TAG_AFFECTED_SOP_CLASS, _ui(request.sop_class_uid))
    body += _implicit(TAG_COMMAND_FIELD, struct.pack("<H", field))
    body += _implicit(TAG_MESSAGE_ID_RESPONDED, struct.pack("<H", request.message_id))
    body += _implicit(TAG_DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET))
    body += _implicit(TAG_STATUS, struct.pack("<H", status))
    if error_comment:
        text = error_comment.encode("ascii", "replace")[:MAX_ERROR_COMMENT]
        body += _implicit(TAG_ERROR_COMMENT, _even(text, b" "))
    if field in (C_STORE_RSP, N_EVENT_REPORT_RSP):
        body += _implicit(
            TAG_AFFECTED_SOP_INSTANCE, _ui(request.sop_instance_uid)
        )
    if field == N_EVENT_REPORT_RSP and request.event_type is not None:
        body += _implicit(TAG_EVENT_TYPE_ID, struct.pack("<H", request.event_type))
    return _implicit(TAG_GROUP_LENGTH, struct.pack("<L", len(body))) + body


def _explicit(element: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"UN"):
        return struct.pack("<HH2sHL", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def part10_header(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, *,
    implementation_uid: str, implementation_version: str, source_ae: str,
) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group (PS3.10 §7.1)."""
    meta = (
        _explicit(0x0001, b"OB", b"\x00\x01")
        + _explicit(0x0002, b"UI", _ui(sop_class_uid))
        + _explicit(0x0003, b"UI", _ui(sop_instance_uid))
        + _explicit(0x0010, b"UI", _ui(transfer_syntax_uid))
        + _explicit(0x0012, b"UI", _ui(implementation_uid))
        + _explicit(0x0013, b"SH", _even(implementation_version.encode("ascii", "replace"), b" "))
        + _explicit(0x0016, b"AE", _even(source_ae.encode("ascii", "replace"), b" "))
    )
    group_length = _explicit(0x0000, b"UL", struct.pack("<L", len(meta)))
    return bytes(128) + b"DICM" + group_length + meta
