"""A modality's MPPS client (pynetdicom SCU, PS3.4 F.7): N-CREATE and N-SET a step.

DCMTK 3.6.7 ships no MPPS SCU, so pynetdicom plays the modality. The data sets carry
a patient name and ID (:data:`PATIENT_NAME`, :data:`PATIENT_ID`) so tests can check they
never reach a log.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE

from node.receive.mpps import STATUS_SUCCESS

MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PATIENT_NAME = "Mppstest^Philippa"
PATIENT_ID = "PHI-MPPS-4711"
MPPS_AE = "QCNODE_MPPS"


def create_attributes(status: str = "IN PROGRESS",
                      series: Mapping[str, Sequence[str]] | None = None) -> Dataset:
    """An N-CREATE Attribute List (PS3.4 Table F.7.2-1), with patient attributes."""
    ds = Dataset()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    item = Dataset()
    item.StudyInstanceUID = generate_uid()
    item.AccessionNumber = "ACC-MPPS-1"
    ds.ScheduledStepAttributesSequence = [item]
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = "SCANNER"
    ds.PerformedProcedureStepStartDate = "20261204"
    ds.PerformedProcedureStepStartTime = "120000"
    ds.PerformedProcedureStepStatus = status
    ds.Modality = "CT"
    ds.PerformedSeriesSequence = performed_series(series or {})
    return ds


def performed_series(series: Mapping[str, Sequence[str]]) -> list[Dataset]:
    """Performed Series Sequence items: Series Instance UID → listed image UIDs."""
    items = []
    for series_uid, sop_uids in series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.PerformingPhysicianName = "Doctor^Mppstest"
        item.OperatorsName = "Operator^Mppstest"
        item.ProtocolName = "chest"
        item.SeriesDescription = "chest"
        item.RetrieveAETitle = ""
        refs = []
        for sop_uid in sop_uids:
            ref = Dataset()
            ref.ReferencedSOPClassUID = CT_IMAGE_STORAGE
            ref.ReferencedSOPInstanceUID = sop_uid
            refs.append(ref)
        item.ReferencedImageSequence = refs
        item.ReferencedNonImageCompositeSOPInstanceSequence = []
        items.append(item)
    return items


def set_attributes(status: str | None,
                   series: Mapping[str, Sequence[str]] | None = None) -> Dataset:
    """An N-SET Modification List: the new status and, if given, the series."""
    ds = Dataset()
    if status is not None:
        ds.PerformedProcedureStepStatus = status
        ds.PerformedProcedureStepEndDate = "20261204"
        ds.PerformedProcedureStepEndTime = "121000"
    if series is not None:
        ds.PerformedSeriesSequence = performed_series(series)
    return ds


class Modality:
    """An established association to the MPPS SCP."""

    def __init__(self, assoc: Any) -> None:
        self.assoc = assoc

    def create(self, step_uid: str | None, attributes: Dataset) -> Dataset:
        """N-CREATE; the response status data set."""
        status, _ = self.assoc.send_n_create(attributes, MPPS_SOP_CLASS, step_uid)
        assert isinstance(status, Dataset) and "Status" in status, "no N-CREATE response"
        return status

    def set(self, step_uid: str, modifications: Dataset) -> Dataset:
        """N-SET; the response status data set."""
        status, _ = self.assoc.send_n_set(modifications, MPPS_SOP_CLASS, step_uid)
        assert isinstance(status, Dataset) and "Status" in status, "no N-SET response"
        return status


def associate(port: int, *, calling_ae: str = "SCANNER", called_ae: str = MPPS_AE) -> Any:
    """An association (possibly rejected) with the MPPS SCP on 127.0.0.1:``port``."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(MPPS_SOP_CLASS)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    return ae.associate("127.0.0.1", port, ae_title=called_ae)


@contextmanager
def modality(port: int, *, calling_ae: str = "SCANNER",
             called_ae: str = MPPS_AE) -> Iterator[Modality]:
    """An established association, released afterwards."""
    assoc = associate(port, calling_ae=calling_ae, called_ae=called_ae)
    assert assoc.is_established, "MPPS association not established"
    try:
        yield Modality(assoc)
    finally:
        assoc.release()


def complete_step(port: int, series: Mapping[str, Sequence[str]],
                  status: str = "COMPLETED") -> str:
    """N-CREATE a step, then N-SET it to ``status`` listing ``series``; its UID."""
    step_uid = generate_uid()
    with modality(port) as scu:
        assert scu.create(step_uid, create_attributes()).Status == STATUS_SUCCESS
        assert scu.set(step_uid, set_attributes(status, series)).Status == STATUS_SUCCESS
    return step_uid
