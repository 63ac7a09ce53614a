"""The DICOM Upper Layer PDUs the listener moves itself (PS3.8).

The listener is an acceptor only. Its association is negotiated by
:mod:`node.receive.negotiation` (pynetdicom decodes the A-ASSOCIATE-RQ, §9.3.2, and encodes
the A-ASSOCIATE-AC / -RJ, §9.3.3–4); then P-DATA-TF (§9.3.5) until A-RELEASE-RQ/RP
(§9.3.6–7) or A-ABORT (§9.3.8), which this module encodes and whose headers it parses
in place; :mod:`node.receive.acceptor` moves the bytes. The requestor's Maximum Length (§D.1)
bounds every P-DATA-TF we send.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# PDU types (PS3.8 §9.3.1) ----------------------------------------------------------------
A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

# Item types (PS3.8 §9.3.2, Annex D) ---------------------------------------------------------
ITEM_APPLICATION_CONTEXT = 0x10
ITEM_PRESENTATION_CONTEXT_RQ = 0x20
ITEM_PRESENTATION_CONTEXT_AC = 0x21
ITEM_ABSTRACT_SYNTAX = 0x30
ITEM_TRANSFER_SYNTAX = 0x40
ITEM_USER_INFORMATION = 0x50
ITEM_MAXIMUM_LENGTH = 0x51
ITEM_IMPLEMENTATION_CLASS_UID = 0x52
ITEM_IMPLEMENTATION_VERSION_NAME = 0x55
ITEM_ROLE_SELECTION = 0x54
ITEM_USER_IDENTITY_RQ = 0x58
ITEM_USER_IDENTITY_AC = 0x59
#: User-Identity-Types answered with a zero-length server response (PS3.7 D.3.3.7.1).
USER_IDENTITY_USERNAME = 1
USER_IDENTITY_USERNAME_PASSCODE = 2

#: The DICOM Application Context Name (PS3.7 Annex A.2.1).
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
PROTOCOL_VERSION = 0x0001

# Presentation context results (PS3.8 §9.3.3.2) -------------------------------------------
PC_ACCEPTANCE = 0
PC_ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
PC_TRANSFER_SYNTAXES_NOT_SUPPORTED = 4

# A-ASSOCIATE-RJ result / source / reason (PS3.8 §9.3.4) ------------------------------------
RJ_REJECTED_PERMANENT = 0x01
RJ_REJECTED_TRANSIENT = 0x02
RJ_SOURCE_SERVICE_USER = 0x01
RJ_SOURCE_SERVICE_PROVIDER_ACSE = 0x02
RJ_SOURCE_SERVICE_PROVIDER_PRESENTATION = 0x03
RJ_NO_REASON = 0x01
RJ_APPLICATION_CONTEXT_NOT_SUPPORTED = 0x02
RJ_CALLING_AE_NOT_RECOGNISED = 0x03
RJ_CALLED_AE_NOT_RECOGNISED = 0x07
RJ_PROTOCOL_VERSION_NOT_SUPPORTED = 0x02  # source: service-provider (ACSE)
RJ_LOCAL_LIMIT_EXCEEDED = 0x02  # source: service-provider (presentation)

# A-ABORT source / reason (PS3.8 §9.3.8) ------------------------------------------------------
ABORT_SOURCE_SERVICE_PROVIDER = 0x02
ABORT_REASON_NOT_SPECIFIED = 0x00
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_UNRECOGNIZED_PDU_PARAMETER = 0x03
ABORT_INVALID_PDU_PARAMETER = 0x06

#: Length of A-RELEASE-RQ/RP and A-ABORT PDUs (PS3.8 §9.3.6–8).
FIXED_PDU_LENGTH = 4

_HEADER = struct.Struct(">BBL")  # PDU type, reserved, length
_ITEM = struct.Struct(">BBH")  # item type, reserved, length
#: Bytes of a P-DATA-TF PDU before the first PDV's value: PDU header + PDV header.
PDV_OVERHEAD = _HEADER.size + 6


class ProtocolError(ValueError):
    """The peer sent something PS3.8 does not allow; the association is aborted.

    ``reason`` is the A-ABORT reason/diag sent to the peer (PS3.8 §9.3.8).
    """

    def __init__(self, message: str, reason: int = ABORT_INVALID_PDU_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Accepted:
    """An accepted presentation context (PS3.8 §9.3.3.2)."""

    abstract_syntax: str
    transfer_syntax: str


def pdu_header(data: bytes) -> tuple[int, int]:
    """``(pdu_type, length)`` from the 6 bytes of a PDU header."""
    pdu_type, _, length = _HEADER.unpack(data)
    return pdu_type, length


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return _HEADER.pack(pdu_type, 0, len(body)) + body


def release_rp() -> bytes:
    """Encode an A-RELEASE-RP (PS3.8 §9.3.7)."""
    return _pdu(A_RELEASE_RP, bytes(4))


def abort(reason: int = ABORT_REASON_NOT_SPECIFIED) -> bytes:
    """Encode an A-ABORT from the service provider (PS3.8 §9.3.8)."""
    return _pdu(A_ABORT, bytes([0, 0, ABORT_SOURCE_SERVICE_PROVIDER, reason]))


def p_data(pcid: int, message: bytes, *, command: bool, max_pdu: int) -> list[bytes]:
    """``message`` as P-DATA-TF PDUs of one PDV each, none longer than ``max_pdu``.

    ``max_pdu`` is the peer's Maximum Length (the PDU's variable field, PS3.8 §D.1);
    0 means unlimited. The message control header (PS3.8 §E.2) marks command or data
    set and the last fragment.
    """
    room = max(max_pdu - 6, 1) if max_pdu else max(len(message), 1)
    pdus: list[bytes] = []
    pos = 0
    while True:
        chunk = message[pos : pos + room]
        pos += len(chunk)
        control = (0x01 if command else 0x00) | (0x02 if pos >= len(message) else 0x00)
        pdv = struct.pack(">LBB", len(chunk) + 2, pcid, control) + chunk
        pdus.append(_pdu(P_DATA_TF, pdv))
        if pos >= len(message):
            return pdus
