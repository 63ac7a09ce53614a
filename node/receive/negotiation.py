"""Association negotiation of the listener, through pynetdicom (PS3.8 §9.3.2–4, PS3.7 D.3.3).

The listener's own Upper Layer (:mod:`node.receive.acceptor`) streams P-DATA; the association's
establishment is pynetdicom's: its PDU classes decode the A-ASSOCIATE-RQ
(``pynetdicom.pdu.A_ASSOCIATE_RQ``) and encode the A-ASSOCIATE-AC / -RJ, and its
acceptor-side negotiation (``pynetdicom.presentation.negotiate_as_acceptor``) decides
the presentation contexts and SCP/SCU roles, as pynetdicom's own ACSE does
(``pynetdicom.acse.ACSE._negotiate_as_acceptor``). What qcnode decides itself: who may
call (:meth:`node.receive.acceptor.Connection._rejection`) and the transfer syntax preference
(compressed first, :data:`node.receive.scp.TRANSFER_SYNTAXES`) — ``negotiate_as_acceptor``
takes, for each context, the first of *our* transfer syntaxes the requestor proposed.

The answer to each user information item (PS3.7 Annex D.3.3):

* Maximum Length (PS3.8 D.1): ours in the AC; the requestor's bounds our P-DATA-TF;
* Implementation Class UID / Version Name (D.3.3.2): ours;
* SCP/SCU Role Selection (D.3.3.4): answered with our roles per SOP class
  (:class:`Negotiator`): a storage or verification requestor is SCU, we are SCP
  (a proposed requestor-SCP-only role rejects that context, result 1);
* Asynchronous Operations Window (D.3.3.3): a window other than 1/1 is answered 1/1
  (one operation at a time), as pynetdicom does;
* SOP Class Extended (D.3.3.5) and Common Extended (D.3.3.6) Negotiation: not
  supported, so not answered;
* User Identity (D.3.3.7): callers are admitted by AE title and address, not by user.
  When a positive response is requested for a username (type 1) or username and
  passcode (type 2), the AC carries an empty server response (D.3.3.7.2): DCMTK
  ``storescu -usr U -rsp`` fails the association without one. pynetdicom itself
  answers only types 3–5, with its handler's response.

A request that cannot be decoded (a UID with a non-ASCII byte, an item running past
its parent) is a :class:`node.receive.upperlayer.ProtocolError`: A-ABORT, invalid PDU parameter.
Items of unknown type are skipped (PS3.8 §9.3.1), as are unknown user information
sub-items and the proposed transfer syntaxes that change nothing (:func:`_trimmed`).
The decoding and the negotiation run off the listener's event loop
(:meth:`node.receive.acceptor.Connection._establish`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from node.receive import upperlayer as ul

#: PDU items an A-ASSOCIATE-RQ carries (PS3.8 §9.3.2).
_RQ_ITEMS = frozenset({ul.ITEM_APPLICATION_CONTEXT, ul.ITEM_PRESENTATION_CONTEXT_RQ,
                       ul.ITEM_USER_INFORMATION})
#: User information sub-items of a request (PS3.8 D.1, PS3.7 D.3.3): 0x51–0x58.
_RQ_USER_ITEMS = frozenset(range(ul.ITEM_MAXIMUM_LENGTH, ul.ITEM_USER_IDENTITY_RQ + 1))
#: User-Identity-Types answered with an empty server response (PS3.7 D.3.3.7.1).
_IDENTITY_ANSWERED = frozenset({ul.USER_IDENTITY_USERNAME,
                                ul.USER_IDENTITY_USERNAME_PASSCODE})
#: The asynchronous operations window we answer: one invoked, one performed.
_WINDOW = (1, 1)
#: Our roles when a requestor proposes role selection: (requestor may be SCU,
#: requestor may be SCP) — a storage/verification requestor is the SCU.
DEFAULT_ROLES = (True, False)
#: What pynetdicom raises on bytes it cannot decode.
_DECODE_ERRORS = (ValueError, KeyError, IndexError, TypeError, struct.error)

_HEADER = struct.Struct(">BBL")
_ITEM = struct.Struct(">BBH")
#: The A-ASSOCIATE-RQ's fixed part: PDU header, version, reserved, AE titles, reserved.
_FIXED = 74


@dataclass(frozen=True)
class Request:
    """A decoded A-ASSOCIATE-RQ (PS3.8 §9.3.2) and what the acceptor checks."""

    primitive: A_ASSOCIATE
    protocol_version: int
    called_ae: str
    calling_ae: str
    application_context: str
    #: the requestor's maximum P-DATA-TF PDU length; 0 = unlimited (PS3.8 D.1)
    max_pdu: int


def _items(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """``(item type, value start, value end)`` of consecutive items, lengths checked."""
    pos = start
    while pos < end:
        if pos + _ITEM.size > end:
            raise ul.ProtocolError("item header runs past its parent")
        kind, _, length = _ITEM.unpack_from(data, pos)
        pos += _ITEM.size
        if pos + length > end:
            raise ul.ProtocolError("item runs past its parent")
        yield kind, pos, pos + length
        pos += length


def _item(kind: int, value: bytes) -> bytes:
    return _ITEM.pack(kind, 0, len(value)) + value


def _trimmed(pdu: bytes, ours: frozenset[bytes]) -> bytes:
    """``pdu`` checked and cut to what the negotiation reads, for pynetdicom to decode.

    Every item length is checked, presentation context ids must be odd and unique
    (PS3.8 §9.3.2.2) and UIDs ASCII. Items and user information sub-items of unknown
    type are dropped (pynetdicom raises on them), and so is each proposed transfer
    syntax that is neither the context's first (named in a rejection, §9.3.3.2) nor
    one of ``ours``: the answer is the same, and pynetdicom's decoding costs ~0.1 ms
    per UID — a 1 MiB request of 128 contexts × 300 transfer syntaxes took 7.9 s.
    """
    if len(pdu) < _FIXED:
        raise ul.ProtocolError("A-ASSOCIATE-RQ too short")
    kept, ids = [pdu[6:_FIXED]], set()
    for kind, start, end in _items(pdu, _FIXED, len(pdu)):
        if kind == ul.ITEM_PRESENTATION_CONTEXT_RQ:
            if end - start < 4 or pdu[start] % 2 == 0 or pdu[start] in ids:
                raise ul.ProtocolError("presentation context ids must be odd and unique")
            ids.add(pdu[start])
            kept.append(_item(kind, pdu[start:start + 4] + _context_subitems(
                pdu, start + 4, end, ours)))
        elif kind == ul.ITEM_USER_INFORMATION:
            kept.append(_item(kind, b"".join(
                pdu[s - _ITEM.size:e] for k, s, e in _items(pdu, start, end)
                if k in _RQ_USER_ITEMS)))
        elif kind in _RQ_ITEMS:
            kept.append(pdu[start - _ITEM.size:end])
    body = b"".join(kept)
    return _HEADER.pack(ul.A_ASSOCIATE_RQ, 0, len(body)) + body


def _context_subitems(pdu: bytes, start: int, end: int, ours: frozenset[bytes]) -> bytes:
    """A proposed context's abstract syntax, its first transfer syntax and ``ours``."""
    kept, first = [], True
    for kind, s, e in _items(pdu, start, end):
        if not pdu[s:e].isascii():
            raise ul.ProtocolError("a UID that is not ASCII (PS3.8 Annex F)")
        if kind == ul.ITEM_TRANSFER_SYNTAX and (first or pdu[s:e].rstrip(b"\0") in ours):
            first = False
            kept.append(pdu[s - _ITEM.size:e])
        elif kind == ul.ITEM_ABSTRACT_SYNTAX:
            kept.append(pdu[s - _ITEM.size:e])
    return b"".join(kept)


def decode_request(pdu: bytes, ours: frozenset[bytes]) -> Request:
    """Decode a whole A-ASSOCIATE-RQ PDU (header included) with pynetdicom; ``ours``:
    the transfer syntaxes we accept for any abstract syntax (ASCII)."""
    rq = A_ASSOCIATE_RQ()
    try:
        rq.decode(_trimmed(pdu, ours))
        primitive = rq.to_primitive()
    except _DECODE_ERRORS as exc:
        raise ul.ProtocolError(f"malformed A-ASSOCIATE-RQ ({type(exc).__name__})",
                               ul.ABORT_INVALID_PDU_PARAMETER) from exc
    return Request(
        primitive=primitive, protocol_version=rq.protocol_version,
        called_ae=primitive.called_ae_title.strip(),
        calling_ae=primitive.calling_ae_title.strip(),
        application_context=str(primitive.application_context_name or ""),
        max_pdu=primitive.maximum_length_received or 0,
    )


def reject(result: int, source: int, reason: int) -> bytes:
    """Encode an A-ASSOCIATE-RJ (PS3.8 §9.3.4) with pynetdicom."""
    primitive = A_ASSOCIATE()
    primitive.result, primitive.result_source, primitive.diagnostic = result, source, reason
    pdu = A_ASSOCIATE_RJ()
    pdu.from_primitive(primitive)
    return pdu.encode()


class Negotiator:
    """Our supported presentation contexts, and the A-ASSOCIATE-AC for a request.

    Parameters
    ----------
    supported
        Abstract syntax → our transfer syntaxes in preference order.
    roles
        Abstract syntax → (requestor may be SCU, requestor may be SCP) answered to a
        role selection proposal (PS3.7 D.3.3.4); :data:`DEFAULT_ROLES` for the others.
    """

    def __init__(
        self, supported: Mapping[str, tuple[str, ...]],
        roles: Mapping[str, tuple[bool, bool]], *, max_pdu: int,
        implementation_uid: str, implementation_version: str,
    ) -> None:
        self._contexts = [
            _context(abstract, syntaxes, roles.get(abstract, DEFAULT_ROLES))
            for abstract, syntaxes in supported.items()
        ]
        self.transfer_syntaxes = frozenset(
            ts.encode("ascii") for syntaxes in supported.values() for ts in syntaxes)
        self.max_pdu = max_pdu
        self.implementation_uid = implementation_uid
        self.implementation_version = implementation_version

    def decode(self, pdu: bytes) -> Request:
        """Decode an A-ASSOCIATE-RQ (:func:`decode_request`)."""
        return decode_request(pdu, self.transfer_syntaxes)

    def accept(self, request: Request) -> tuple[bytes, dict[int, ul.Accepted]]:
        """The A-ASSOCIATE-AC answering ``request`` and the accepted contexts by id."""
        rq = request.primitive
        results, role_replies = negotiate_as_acceptor(
            rq.presentation_context_definition_list, self._contexts, _proposed_roles(rq))
        accepted = {
            int(cx.context_id): ul.Accepted(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            for cx in results if cx.result == ul.PC_ACCEPTANCE and cx.context_id is not None
        }
        ac = A_ASSOCIATE()
        ac.application_context_name = ul.APPLICATION_CONTEXT
        ac.calling_ae_title, ac.called_ae_title = rq.calling_ae_title, rq.called_ae_title
        ac.result = 0x00
        ac.presentation_context_definition_results_list = results
        ac.user_information = [*self._identity(), *role_replies, *_answers(rq)]
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(ac)
        return pdu.encode(), accepted

    def _identity(self) -> list[MaximumLengthNotification | ImplementationClassUIDNotification
                                | ImplementationVersionNameNotification]:
        length = MaximumLengthNotification()
        length.maximum_length_received = self.max_pdu
        uid = ImplementationClassUIDNotification()
        uid.implementation_class_uid = self.implementation_uid
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = self.implementation_version
        return [length, uid, version]


def _context(abstract: str, syntaxes: tuple[str, ...],
             roles: tuple[bool, bool]) -> PresentationContext:
    context = PresentationContext()
    context.abstract_syntax = abstract
    context.transfer_syntax = list(syntaxes)
    context.scu_role, context.scp_role = roles
    return context


def _proposed_roles(rq: A_ASSOCIATE) -> dict[UID, tuple[bool | None, bool | None]] | None:
    """SOP class → (SCU role, SCP role) the requestor proposed (PS3.7 D.3.3.4)."""
    roles = {item.sop_class_uid: (item.scu_role, item.scp_role)
             for item in rq.user_information
             if isinstance(item, SCP_SCU_RoleSelectionNegotiation)
             and item.sop_class_uid is not None}
    return roles or None


def _answers(
    rq: A_ASSOCIATE,
) -> list[AsynchronousOperationsWindowNegotiation | UserIdentityNegotiation]:
    """Our answers to the asynchronous window and user identity items (module doc)."""
    answers: list[AsynchronousOperationsWindowNegotiation | UserIdentityNegotiation] = []
    for item in rq.user_information:
        if isinstance(item, AsynchronousOperationsWindowNegotiation):
            proposed = (item.maximum_number_operations_invoked,
                        item.maximum_number_operations_performed)
            if proposed != _WINDOW:
                window = AsynchronousOperationsWindowNegotiation()
                (window.maximum_number_operations_invoked,
                 window.maximum_number_operations_performed) = _WINDOW
                answers.append(window)
        elif (isinstance(item, UserIdentityNegotiation) and item.positive_response_requested
              and item.user_identity_type in _IDENTITY_ANSWERED):
            identity = UserIdentityNegotiation()
            identity.server_response = b""
            answers.append(identity)
    return answers
