"""Storage Commitment Push Model, SCU side (PS3.4 Annex J).

The node asks the PACS to commit to keeping the objects it just stored (N-ACTION,
Action Type ID 1, on the storage association); the PACS answers later with an
N-EVENT-REPORT (Event Type ID 1 all committed, 2 some failed), usually on a new
association that *it* opens to the calling AE. :class:`CommitmentListener` accepts that
association on the destination's ``commitment_port`` for the time of one delivery.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt

STORAGE_COMMITMENT_PUSH_MODEL = "1.2.840.10008.1.20.1"           # PS3.4 J.3
STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known instance

ACTION_REQUEST_COMMITMENT = 1       # PS3.4 J.3.2: Request Storage Commitment
EVENT_ALL_COMMITTED = 1             # PS3.4 J.3.3: Storage Commitment Request Successful
EVENT_SOME_FAILED = 2               # Storage Commitment Request Complete - Failures Exist
STATUS_SUCCESS = 0x0000


class CommitmentListener:
    """Accept N-EVENT-REPORTs for the calling AE on ``port`` while in a ``with`` block."""

    def __init__(self, ae_title: str, host: str, port: int) -> None:
        self.ae_title = ae_title
        self.address = (host, port)
        self._reports: dict[str, tuple[int, Dataset]] = {}
        self._cond = threading.Condition()
        self._server: Any = None

    def _on_report(self, event: Any) -> int:
        ds = event.event_information
        with self._cond:
            self._reports[str(ds.TransactionUID)] = (int(event.event_type), ds)
            self._cond.notify_all()
        return STATUS_SUCCESS

    def __enter__(self) -> CommitmentListener:
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(STORAGE_COMMITMENT_PUSH_MODEL, scu_role=True, scp_role=True)
        ae.require_called_aet = True
        self._server = ae.start_server(
            self.address, block=False,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report)],
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def wait(self, transaction_uid: str, timeout: float) -> tuple[int, Dataset] | None:
        """The (event type, event information) of a transaction, or None after ``timeout``."""
        with self._cond:
            self._cond.wait_for(lambda: transaction_uid in self._reports, timeout=timeout)
            return self._reports.get(transaction_uid)


def commitment_request(
    assoc: Any, listener: CommitmentListener, datasets: Sequence[Dataset], timeout: float
) -> tuple[bool, str]:
    """Request commitment for ``datasets`` and wait for the answer: (all committed, detail)."""
    request = Dataset()
    request.TransactionUID = generate_uid()
    refs = []
    for ds in datasets:
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        refs.append(item)
    request.ReferencedSOPSequence = refs
    status, _ = assoc.send_n_action(
        request, ACTION_REQUEST_COMMITMENT, STORAGE_COMMITMENT_PUSH_MODEL,
        STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
    )
    if not status or int(status.get("Status", -1)) != STATUS_SUCCESS:
        return False, "N-ACTION (storage commitment request) refused"
    report = listener.wait(str(request.TransactionUID), timeout)
    if report is None:
        return False, f"no N-EVENT-REPORT within {timeout:g} s"
    event_type, info = report
    committed = {str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])}
    wanted = {str(ds.SOPInstanceUID) for ds in datasets}
    if event_type != EVENT_ALL_COMMITTED or not wanted <= committed:
        failed = sorted(wanted - committed)
        return False, f"commitment failed for {len(failed)} object(s), e.g. {failed[:1]}"
    return True, "committed"
