"""Spooled instances without the network: tiny CT files stored with the node's own
:class:`node.store.spool.Spool` and recorded with :meth:`Ledger.record_instances`, the way
the journal applier does (tests of retention and start-up, ``bench/startup.py``)."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID

from node.ledger import InstanceRecord, Ledger, SeriesState
from node.receive.dicomio import InstanceHeader
from node.store.ingest import instance_record
from node.store.spool import Spool

CT_IMAGE = UID("1.2.840.10008.5.1.4.1.1.2")
EXPLICIT_LE = UID("1.2.840.10008.1.2.1")
#: close_series, then these: a series that went through the whole pipeline.
DELIVERED_PATH = (SeriesState.QUEUED, SeriesState.ASSESSING, SeriesState.REPORTING,
                  SeriesState.DELIVERED)


def template() -> pydicom.Dataset:
    """A 16×16 CT image (~1.3 KB as a file); UIDs are set by :func:`encode`."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE
    ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
    ds.SOPClassUID = CT_IMAGE
    ds.Modality = "CT"
    ds.SeriesDescription = "spooled"
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = np.zeros((16, 16), dtype=np.int16).tobytes()
    return ds


def encode(ds: pydicom.Dataset, study: str, series: str, sop: str) -> bytes:
    """``ds`` with these UIDs as Part 10 bytes."""
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def header(study: str, series: str, sop: str) -> InstanceHeader:
    return InstanceHeader(sop_instance_uid=sop, sop_class_uid=CT_IMAGE,
                          study_instance_uid=study, series_instance_uid=series,
                          modality="CT", series_description="spooled",
                          transfer_syntax_uid=EXPLICIT_LE)


def spool_instance(spool: Spool, ds: pydicom.Dataset, study: str, series: str, sop: str,
                   assoc_id: str = "spooled") -> InstanceRecord:
    """Store one instance in the spool; its ledger record (not yet recorded)."""
    head = header(study, series, sop)
    stored = spool.store(spool.stage(memoryview(encode(ds, study, series, sop))), head)
    return instance_record(head, stored, "SPOOLED", assoc_id, "assess", "ct")


def spool_series(ledger: Ledger, spool: Spool, study: str, series: str, count: int,
                 *, state: SeriesState | None = SeriesState.DELIVERED) -> list[str]:
    """``count`` instances of a series, recorded, then taken to ``state`` (None: left
    receiving); the spool paths."""
    ds = template()
    recs = [spool_instance(spool, ds, study, series, f"{series}.{n}") for n in range(count)]
    errors = [e for e in ledger.record_instances(recs) if e is not None]
    if errors:
        raise errors[0]
    if state is not None:
        move_to(ledger, series, state)
    return [r.relpath for r in recs]


def move_to(ledger: Ledger, series: str, state: SeriesState) -> None:
    """Take a receiving series to ``state`` along the state machine."""
    info = ledger.series_info(series)
    ledger.close_series(series, info.generation, "quiet",
                        ignore=state == SeriesState.IGNORED)
    if state in (SeriesState.COMPLETE, SeriesState.IGNORED):
        return
    if state == SeriesState.FAILED:
        path: tuple[SeriesState, ...] = (SeriesState.QUEUED, SeriesState.FAILED)
    else:
        path = DELIVERED_PATH[:DELIVERED_PATH.index(state) + 1]
    for step in path:
        ledger.set_series_state(series, step)
