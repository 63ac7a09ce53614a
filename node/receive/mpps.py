"""Modality Performed Procedure Step SCP (PS3.4 Annex F.7) inside ``qcnode serve``.

A modality reports a procedure step to a separately configured AE: N-CREATE when it
starts (status IN PROGRESS), N-SET when it ends (COMPLETED or DISCONTINUED) with the
Performed Series Sequence (0040,0340) listing the series and images it made. qcnode
takes that as the end of those series: the completion monitor closes them without
waiting for the quiet period (:mod:`node.ledger.mpps`, :mod:`node.store.completion`).

* **Its own AE**: ``[mpps] ae_title`` on ``[mpps] port``, bound to ``[node] host``, served
  by pynetdicom (the MPPS SOP Class and Verification, so ``echoscu`` can test it).
* **Same admission as the listener**: the calling AE and host must match a
  ``[[senders]]`` entry (reloaded with SIGHUP), checked on the A-ASSOCIATE-RQ; any other
  caller gets an A-ASSOCIATE-RJ (rejected permanent, service user, calling AE title not
  recognized: PS3.8 §9.3.4).
* **Validated per PS3.4 F.7.2**: an N-CREATE must say IN PROGRESS (F.7.2.1.2: else
  0106 Invalid Attribute Value); an N-SET of an unknown step is 0112 No Such SOP
  Instance; an N-SET of a COMPLETED or DISCONTINUED step is 0110 Processing Failure with
  Error ID A710, "Performed Procedure Step Object may no longer be updated" (F.7.2.2.2,
  Table F.7.2-2).
* **Receive and record only**: one ledger transaction per message, then the monitor is
  woken; steps live in the ledger, so an N-SET may arrive after a restart.
* **No patient data in logs**: an MPPS carries the patient's name and ID; only the
  step's SOP Instance UID, its status and the number of series are logged, and only the
  status and the UIDs of the Performed Series Sequence are read from the data set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt

from node.config import Settings
from node.ledger.mpps import (
    PPS_FINAL,
    PPS_IN_PROGRESS,
    PPS_STATUSES,
    MppsAPI,
    PerformedSeries,
    StepChange,
)
from node.logs import get_logger
from node.receive.dicomio import is_valid_uid
from node.receive.scp import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

log = get_logger(__name__)

MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"  # Modality Performed Procedure Step, PS3.4 F.7.3
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"  # PS3.4 Annex A

# N-CREATE / N-SET response statuses (PS3.7 Annex C; PS3.4 F.7.2.1.3, F.7.2.2.4) -------
STATUS_SUCCESS = 0x0000
STATUS_INVALID_ATTRIBUTE_VALUE = 0x0106
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_DUPLICATE_SOP_INSTANCE = 0x0111
STATUS_NO_SUCH_SOP_INSTANCE = 0x0112
STATUS_INVALID_OBJECT_INSTANCE = 0x0117
STATUS_MISSING_ATTRIBUTE = 0x0120
#: Error ID (0000,0903) with 0110: the step may no longer be updated (Table F.7.2-2).
ERROR_ID_MAY_NO_LONGER_BE_UPDATED = 0xA710
COMMENT_MAY_NO_LONGER_BE_UPDATED = "Performed Procedure Step Object may no longer be updated"

# A-ASSOCIATE-RJ of an unknown caller (PS3.8 §9.3.4) -----------------------------------
REJECTED_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
DIAGNOSTIC_CALLING_AE_NOT_RECOGNIZED = 0x03

_REFERENCE_SEQUENCES = ("ReferencedImageSequence",
                        "ReferencedNonImageCompositeSOPInstanceSequence")

OnStepEnded = Callable[[], None]
Reply = tuple[int | Dataset, Dataset | None]


class InvalidStep(ValueError):
    """A request the SCP refuses: its status and an Error Comment (≤ 64 characters,
    never a value from the data set)."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


def failure(status: int, comment: str, error_id: int | None = None) -> Dataset:
    """A status data set: Status, Error Comment and, if given, Error ID (PS3.7 C.4)."""
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    if error_id is not None:
        ds.ErrorID = error_id
    return ds


def step_status(ds: Dataset, *, required: bool) -> str | None:
    """Performed Procedure Step Status (0040,0252), checked against the defined terms."""
    if "PerformedProcedureStepStatus" not in ds:
        if required:
            raise InvalidStep(STATUS_MISSING_ATTRIBUTE,
                              "Performed Procedure Step Status (0040,0252) missing")
        return None
    value = str(ds.PerformedProcedureStepStatus or "").strip()
    if value not in PPS_STATUSES:
        raise InvalidStep(STATUS_INVALID_ATTRIBUTE_VALUE,
                          "Performed Procedure Step Status not a defined term")
    return value


def performed_series(ds: Dataset) -> tuple[PerformedSeries, ...]:
    """The series and instance UIDs of the Performed Series Sequence (PS3.3 C.4.14).

    Raises :class:`InvalidStep` (0106) for a UID that is not a valid UID (PS3.5 §9).
    """
    found = []
    for item in ds.get("PerformedSeriesSequence") or ():
        series_uid = str(item.get("SeriesInstanceUID") or "")
        if not is_valid_uid(series_uid):
            raise InvalidStep(STATUS_INVALID_ATTRIBUTE_VALUE,
                              "Performed Series Sequence: invalid Series Instance UID")
        sop_uids = []
        for keyword in _REFERENCE_SEQUENCES:
            for ref in item.get(keyword) or ():
                sop_uid = str(ref.get("ReferencedSOPInstanceUID") or "")
                if not is_valid_uid(sop_uid):
                    raise InvalidStep(STATUS_INVALID_ATTRIBUTE_VALUE,
                                      "Performed Series Sequence: invalid SOP Instance UID")
                sop_uids.append(sop_uid)
        found.append(PerformedSeries(series_uid, tuple(sop_uids)))
    return tuple(found)


class MppsServer:
    """The MPPS SCP (see the module documentation); :meth:`start` / :meth:`stop`.

    ``on_step_ended`` is called after a step became COMPLETED or DISCONTINUED (e.g. to
    wake the completion monitor).
    """

    def __init__(self, settings: Settings, ledger: MppsAPI,
                 on_step_ended: OnStepEnded | None = None) -> None:
        self.settings = settings
        self.ledger = ledger
        self._on_step_ended = on_step_ended
        self._server: Any = None

    def use_settings(self, settings: Settings) -> None:
        """Admit by reloaded ``[[senders]]`` from the next association."""
        self.settings = settings

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` bound (``[mpps] port = 0`` picks a free one)."""
        if self._server is None:
            raise RuntimeError("MPPS SCP not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Bind ``[node] host`` : ``[mpps] port`` and serve in background threads."""
        node, mpps = self.settings.node, self.settings.mpps
        ae = AE(ae_title=mpps.ae_title)
        ae.add_supported_context(MPPS_SOP_CLASS)
        ae.add_supported_context(VERIFICATION_SOP_CLASS)
        ae.require_called_aet = True
        ae.acse_timeout = node.acse_timeout
        ae.dimse_timeout = node.dimse_timeout
        ae.network_timeout = node.network_timeout
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        self._server = ae.start_server(
            (node.host, mpps.port), block=False,
            evt_handlers=[(evt.EVT_REQUESTED, self._on_requested),
                          (evt.EVT_N_CREATE, self._on_create),
                          (evt.EVT_N_SET, self._on_set)],
        )
        host, port = self.address
        log.info("mpps listening", host=host, port=port, ae_title=mpps.ae_title)

    def stop(self) -> None:
        """Stop accepting and close the running associations."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> MppsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Events (pynetdicom calls these in the association's thread) ----------------------
    def _on_requested(self, event: Any) -> None:
        """Reject a caller no ``[[senders]]`` entry admits (on the A-ASSOCIATE-RQ)."""
        assoc = event.assoc
        calling_ae = str(assoc.requestor.primitive.calling_ae_title).strip()
        address = assoc.requestor.address
        if any(s.admits(calling_ae, address) for s in self.settings.senders):
            return
        log.warning("mpps association rejected: unknown caller", calling_ae=calling_ae,
                    address=address)
        # As pynetdicom's own ACSE rejects: the A-ASSOCIATE-RJ, then end the association
        # once its DUL has sent it (closing the socket first would lose the PDU).
        assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER,
                               DIAGNOSTIC_CALLING_AE_NOT_RECOGNIZED)
        assoc.kill()

    def _on_create(self, event: Any) -> Reply:
        """N-CREATE (PS3.4 F.7.2.1): record a new step, IN PROGRESS."""
        calling_ae = event.assoc.requestor.ae_title
        given = event.request.AffectedSOPInstanceUID
        step_uid = str(given) if given else generate_uid()
        try:
            if not is_valid_uid(step_uid):
                raise InvalidStep(STATUS_INVALID_OBJECT_INSTANCE, "Invalid SOP Instance UID")
            ds = event.attribute_list
            status = step_status(ds, required=True)
            if status != PPS_IN_PROGRESS:
                raise InvalidStep(STATUS_INVALID_ATTRIBUTE_VALUE,
                                  "N-CREATE needs Performed Procedure Step Status IN PROGRESS")
            series = performed_series(ds)
            created = self.ledger.mpps_create(step_uid, calling_ae, PPS_IN_PROGRESS, series)
        except InvalidStep as exc:
            return self._refuse("N-CREATE", step_uid, calling_ae, exc.status, exc.comment)
        except Exception as exc:  # noqa: BLE001 — answer 0110, never leak a traceback
            log.error("mpps N-CREATE failed", step_uid=step_uid, error=type(exc).__name__)
            return failure(STATUS_PROCESSING_FAILURE, "Step not recorded: internal error"), None
        if not created:
            return self._refuse("N-CREATE", step_uid, calling_ae,
                                STATUS_DUPLICATE_SOP_INSTANCE, "Step exists already")
        log.info("mpps step created", step_uid=step_uid, calling_ae=calling_ae,
                 series=len(series))
        reply = Dataset()
        if not given:  # PS3.7 10.1.5.1.4: the SCP assigns the UID and returns it
            reply.AffectedSOPInstanceUID = step_uid
        return STATUS_SUCCESS, reply

    def _on_set(self, event: Any) -> Reply:
        """N-SET (PS3.4 F.7.2.2): update a step that is still IN PROGRESS."""
        calling_ae = event.assoc.requestor.ae_title
        step_uid = str(event.request.RequestedSOPInstanceUID or "")
        try:
            mods = event.modification_list
            status = step_status(mods, required=False)
            series = performed_series(mods) if "PerformedSeriesSequence" in mods else None
            change = self.ledger.mpps_set(step_uid, status, series)
        except InvalidStep as exc:
            return self._refuse("N-SET", step_uid, calling_ae, exc.status, exc.comment)
        except Exception as exc:  # noqa: BLE001 — answer 0110, never leak a traceback
            log.error("mpps N-SET failed", step_uid=step_uid, error=type(exc).__name__)
            return failure(STATUS_PROCESSING_FAILURE, "Step not updated: internal error"), None
        if change == StepChange.NO_SUCH_STEP:
            return self._refuse("N-SET", step_uid, calling_ae, STATUS_NO_SUCH_SOP_INSTANCE,
                                "No such Performed Procedure Step")
        if change == StepChange.FINAL:
            log.warning("mpps N-SET refused", step_uid=step_uid, calling_ae=calling_ae,
                        status="0x0110", error_id="0xA710")
            return failure(STATUS_PROCESSING_FAILURE, COMMENT_MAY_NO_LONGER_BE_UPDATED,
                           ERROR_ID_MAY_NO_LONGER_BE_UPDATED), None
        log.info("mpps step updated", step_uid=step_uid, calling_ae=calling_ae,
                 step_status=status, series=None if series is None else len(series))
        if status in PPS_FINAL and self._on_step_ended is not None:
            self._on_step_ended()
        return STATUS_SUCCESS, None

    @staticmethod
    def _refuse(operation: str, step_uid: str, calling_ae: str, status: int,
                comment: str) -> Reply:
        log.warning(f"mpps {operation} refused", step_uid=step_uid, calling_ae=calling_ae,
                    status=f"0x{status:04X}", reason=comment)
        return failure(status, comment), None
