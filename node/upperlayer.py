"""The DICOM Upper Layer PDUs the listener needs, and association negotiation (PS3.8).

The listener is an acceptor only. It reads an A-ASSOCIATE-RQ (PS3.8 §9.3.2), answers
A-ASSOCIATE-AC (§9.3.3) or A-ASSOCIATE-RJ (§9.3.4), then P-DATA-TF (§9.3.5) until
A-RELEASE-RQ/RP (§9.3.6–7) or A-ABORT (§9.3.8). This module only encodes and decodes
PDUs and decides the presentation contexts; :mod:`node.acceptor` moves the bytes.

Negotiation rules (PS3.8 Annex B, PS3.7 Annex D.3.3):

* each proposed presentation context is accepted when its abstract syntax is supported,
  with the first transfer syntax of *our* preference list the requestor proposed;
  otherwise it gets result 3 (abstract syntax not supported) or 4 (transfer syntaxes
  not supported);
* SCP/SCU role selection (PS3.7 §D.3.3.4) is answered only for the SOP classes the
  node serves as SCU (:func:`role_answers`): Storage Commitment, whose N-EVENT-REPORT
  the PACS sends as SCP on an association it opens (PS3.4 J.3); we accept its SCP
  role and not an SCU role. Elsewhere the default roles (requestor SCU, acceptor SCP)
  apply, which is all a store SCP does;
* SOP class extended negotiation (§D.3.3.5) and common extended negotiation (§D.3.3.6)
  are not answered, which means "not supported"; asynchronous operations (§D.3.3.3)
  are not answered, so one operation at a time (the default) applies;
* user identity (§D.3.3.7): qcnode admits callers by AE title and address, not by user.
  When a username (type 1) or username + passcode (type 2) requests a positive
  response, the AC carries a User Identity sub-item with a zero-length server response
  (§D.3.3.7.2); DCMTK ``storescu --user U -rsp`` fails the association without it.
  Other identity types get no response (the requestor decides, §D.3.3.7);
* the requestor's Maximum Length (§D.1) bounds every P-DATA-TF we send.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

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
class AssociateRequest:
    """The parts of an A-ASSOCIATE-RQ the listener uses (PS3.8 §9.3.2)."""

    protocol_version: int
    called_ae: str
    calling_ae: str
    called_raw: bytes
    calling_raw: bytes
    application_context: str
    #: presentation context id -> (abstract syntax, proposed transfer syntaxes)
    contexts: dict[int, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    #: the requestor's maximum P-DATA-TF PDU length; 0 = unlimited (PS3.8 §D.1)
    max_pdu: int = 0
    #: a User Identity sub-item requested a positive response for a username identity
    user_identity_response: bool = False
    #: SCP/SCU Role Selection sub-items: abstract syntax -> (SCU role, SCP role)
    roles: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Accepted:
    """An accepted presentation context (PS3.8 §9.3.3.2)."""

    abstract_syntax: str
    transfer_syntax: str


def pdu_header(data: bytes) -> tuple[int, int]:
    """``(pdu_type, length)`` from the 6 bytes of a PDU header."""
    pdu_type, _, length = _HEADER.unpack(data)
    return pdu_type, length


def _text(raw: bytes) -> str:
    return raw.decode("ascii", errors="replace").strip("\x00 ")


def _items(body: bytes | memoryview, start: int, end: int) -> Iterable[tuple[int, bytes]]:
    """``(item type, value)`` of consecutive items (PS3.8 §9.3.2.x / Annex D)."""
    pos = start
    while pos < end:
        if pos + _ITEM.size > end:
            raise ProtocolError("item header runs past its parent")
        kind, _, length = _ITEM.unpack_from(body, pos)
        pos += _ITEM.size
        if pos + length > end:
            raise ProtocolError("item runs past its parent")
        yield kind, bytes(body[pos : pos + length])
        pos += length


def _context(value: bytes) -> tuple[int, str, tuple[str, ...]]:
    if len(value) < 4:
        raise ProtocolError("presentation context item too short")
    abstract, syntaxes = "", []
    for kind, sub in _items(value, 4, len(value)):
        if kind == ITEM_ABSTRACT_SYNTAX:
            abstract = _text(sub)
        elif kind == ITEM_TRANSFER_SYNTAX:
            syntaxes.append(_text(sub))
    return value[0], abstract, tuple(syntaxes)


def _role(value: bytes) -> tuple[str, tuple[int, int]]:
    """``(abstract syntax, (SCU role, SCP role))`` of a Role Selection sub-item."""
    if len(value) < 2:
        raise ProtocolError("role selection item too short")
    length = struct.unpack_from(">H", value, 0)[0]
    if len(value) != 2 + length + 2:
        raise ProtocolError("role selection item length mismatch")
    return _text(value[2:2 + length]), (value[2 + length], value[3 + length])


def _user_information(
    user_info: bytes,
) -> tuple[int, bool, dict[str, tuple[int, int]]]:
    """``(maximum length, user identity response wanted, roles)`` from the user
    information.

    Sub-items other than Maximum Length (PS3.8 §D.1), SCP/SCU Role Selection (PS3.7
    §D.3.3.4) and User Identity (PS3.7 §D.3.3.7.1) are skipped by their length.
    """
    max_pdu, identity_response = 0, False
    roles: dict[str, tuple[int, int]] = {}
    for kind, sub in _items(user_info, 0, len(user_info)):
        if kind == ITEM_ROLE_SELECTION:
            abstract, role = _role(sub)
            roles[abstract] = role
        if kind == ITEM_MAXIMUM_LENGTH:
            if len(sub) != 4:
                raise ProtocolError("maximum length item is not 4 bytes")
            max_pdu = int(struct.unpack(">L", sub)[0])
        elif kind == ITEM_USER_IDENTITY_RQ:
            if len(sub) < 2:
                raise ProtocolError("user identity item too short")
            identity_response = sub[1] == 1 and sub[0] in (
                USER_IDENTITY_USERNAME, USER_IDENTITY_USERNAME_PASSCODE)
    return max_pdu, identity_response, roles


def parse_associate_rq(body: bytes) -> AssociateRequest:
    """Decode the body (after the 6-byte header) of an A-ASSOCIATE-RQ PDU."""
    if len(body) < 68:
        raise ProtocolError("A-ASSOCIATE-RQ too short")
    version = struct.unpack_from(">H", body, 0)[0]
    called, calling = body[4:20], body[20:36]
    app_context, max_pdu, identity_response = "", 0, False
    roles: dict[str, tuple[int, int]] = {}
    contexts: dict[int, tuple[str, tuple[str, ...]]] = {}
    for kind, value in _items(body, 68, len(body)):
        if kind == ITEM_APPLICATION_CONTEXT:
            app_context = _text(value)
        elif kind == ITEM_PRESENTATION_CONTEXT_RQ:
            pcid, abstract, syntaxes = _context(value)
            if pcid % 2 == 0 or pcid in contexts:
                raise ProtocolError("presentation context ids must be odd and unique")
            contexts[pcid] = (abstract, syntaxes)
        elif kind == ITEM_USER_INFORMATION:
            max_pdu, identity_response, roles = _user_information(value)
    return AssociateRequest(
        protocol_version=version, called_ae=_text(called), calling_ae=_text(calling),
        called_raw=bytes(called), calling_raw=bytes(calling),
        application_context=app_context, contexts=contexts, max_pdu=max_pdu,
        user_identity_response=identity_response, roles=roles,
    )


def negotiate(
    request: AssociateRequest, supported: Mapping[str, tuple[str, ...]]
) -> dict[int, tuple[int, str]]:
    """Result and transfer syntax for every proposed context (see module doc).

    ``supported`` maps an abstract syntax to our transfer syntaxes in preference order.
    Returns ``{context id: (result, transfer syntax)}``.
    """
    results: dict[int, tuple[int, str]] = {}
    for pcid, (abstract, proposed) in request.contexts.items():
        ours = supported.get(abstract)
        first = proposed[0] if proposed else ""
        if ours is None:
            results[pcid] = (PC_ABSTRACT_SYNTAX_NOT_SUPPORTED, first)
            continue
        chosen = next((ts for ts in ours if ts in proposed), None)
        if chosen is None:
            results[pcid] = (PC_TRANSFER_SYNTAXES_NOT_SUPPORTED, first)
        else:
            results[pcid] = (PC_ACCEPTANCE, chosen)
    return results


def role_answers(
    request: AssociateRequest, results: Mapping[int, tuple[int, str]],
    scp_role_classes: frozenset[str],
) -> dict[str, tuple[int, int]]:
    """The Role Selection answers (PS3.7 §D.3.3.4): for each accepted abstract syntax in
    ``scp_role_classes`` the requestor proposed roles for, its SCP role as proposed and
    no SCU role (the node only receives that class's notifications)."""
    accepted = {request.contexts[pcid][0] for pcid, (result, _) in results.items()
                if result == PC_ACCEPTANCE}
    return {abstract: (0, scp) for abstract, (_, scp) in request.roles.items()
            if abstract in scp_role_classes and abstract in accepted}


def _item(kind: int, value: bytes) -> bytes:
    return _ITEM.pack(kind, 0, len(value)) + value


def _uid(value: str) -> bytes:
    return value.encode("ascii")


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return _HEADER.pack(pdu_type, 0, len(body)) + body


def associate_ac(
    request: AssociateRequest, results: Mapping[int, tuple[int, str]], *,
    max_pdu: int, implementation_uid: str, implementation_version: str,
    roles: Mapping[str, tuple[int, int]] | None = None,
) -> bytes:
    """Encode the A-ASSOCIATE-AC answering ``request`` (PS3.8 §9.3.3); ``roles`` are the
    Role Selection answers (:func:`role_answers`)."""
    items = [_item(ITEM_APPLICATION_CONTEXT, _uid(APPLICATION_CONTEXT))]
    for pcid, (result, syntax) in sorted(results.items()):
        sub = _item(ITEM_TRANSFER_SYNTAX, _uid(syntax))
        items.append(_item(ITEM_PRESENTATION_CONTEXT_AC, bytes([pcid, 0, result, 0]) + sub))
    user = (
        _item(ITEM_MAXIMUM_LENGTH, struct.pack(">L", max_pdu))
        + _item(ITEM_IMPLEMENTATION_CLASS_UID, _uid(implementation_uid))
    )
    for abstract, (scu, scp) in (roles or {}).items():  # §D.3.3.4: after the class UID
        uid = _uid(abstract)
        user += _item(ITEM_ROLE_SELECTION, struct.pack(">H", len(uid)) + uid + bytes([scu, scp]))
    user += _item(ITEM_IMPLEMENTATION_VERSION_NAME, implementation_version.encode("ascii"))
    if request.user_identity_response:
        user += _item(ITEM_USER_IDENTITY_AC, struct.pack(">H", 0))  # empty server response
    items.append(_item(ITEM_USER_INFORMATION, user))
    fixed = (
        struct.pack(">HH", PROTOCOL_VERSION, 0) + request.called_raw + request.calling_raw
        + bytes(32)
    )
    return _pdu(A_ASSOCIATE_AC, fixed + b"".join(items))


def associate_rj(result: int, source: int, reason: int) -> bytes:
    """Encode an A-ASSOCIATE-RJ (PS3.8 §9.3.4)."""
    return _pdu(A_ASSOCIATE_RJ, bytes([0, result, source, reason]))


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
