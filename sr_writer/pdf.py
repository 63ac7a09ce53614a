"""The quality card as an Encapsulated PDF instance (PS3.3 A.45.1).

Chosen over a secondary capture: the PDF keeps the text selectable and searchable at any
zoom, holds the worst slice with its region outlined, and OHIF v3 and most PACS viewers
display encapsulated PDF. highdicom has no class for this IOD, so the modules are filled
here with pydicom: Patient and General Study (copied as for the SR), Encapsulated Document
Series, General Equipment, SC Equipment, Encapsulated Document, SOP Common.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Final

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian

from inference.result import AssessmentResult
from sr_writer import prose
from sr_writer.card import render_card
from sr_writer.document import MANUFACTURER, SPECIFIC_CHARACTER_SET, library_order
from sr_writer.sources import check_sources, identity_dataset
from sr_writer.uids import derive_uid

PDF_SERIES_NUMBER: Final = 9903
PDF_SERIES_DESCRIPTION: Final = "Image quality card (qcnode)"
DOCUMENT_TITLE: Final = "CT image quality card"
#: SC Equipment Module: "WSD" = workstation.
CONVERSION_TYPE: Final = "WSD"
#: Patient and General Study attributes (PS3.3 C.7.1.1, C.7.2.1) copied from the identity
#: dataset (:func:`sr_writer.sources.identity_dataset`) into the PDF instance.
IDENTITY_KEYS: Final = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
    "AccessionNumber", "StudyDescription",
)


def _header(identity: Dataset) -> list[str]:
    """``Patient Muster, Jürgen (ID PID-1)`` and ``Study 2024-01-02, accession A1``."""
    name = prose.person_name(identity.get("PatientName", "")) or "(no name)"
    pid = str(identity.get("PatientID", "")) or "no ID"
    date = str(identity.get("StudyDate", ""))
    shown = f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) == 8 else date or "(no date)"
    accession = str(identity.get("AccessionNumber", ""))
    study = f"Study {shown}" + (f", accession {accession}" if accession else "")
    return [f"Patient {name} (ID {pid})", study]


def _source_instances(sources: Sequence[Dataset]) -> list[Dataset]:
    items = []
    for ds in sources:
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        items.append(item)
    return items


def build_pdf(
    sources: Sequence[Dataset],
    result: AssessmentResult,
    *,
    job_key: str,
    image: np.ndarray | None = None,
    created: datetime.datetime | None = None,
    series_number: int = PDF_SERIES_NUMBER,
) -> Dataset:
    """Build the Encapsulated PDF quality card.

    Parameters
    ----------
    sources, result, job_key, created, series_number
        As for :func:`sr_writer.build_sr` (its own series and UIDs; the same
        ``(job_key, created)`` gives a byte-identical dataset, PDF included).
    image
        The worst slice rendered for display (uint8 H×W or H×W×3, e.g. the prepared
        slice's ``rgb``); region coordinates are scaled from the source's Rows/Columns.

    Raises
    ------
    ValueError
        Invalid sources, or an image that is not uint8 H×W(×3).
    """
    by_uid = check_sources(sources, result)
    ordered = library_order(sources, result)
    identity = identity_dataset(ordered[0])
    worst = result.worst_slice
    grid_ds = by_uid[worst.sop_instance_uid] if worst else ordered[0]
    pdf = render_card(result, _header(identity), image, (int(grid_ds.Rows), int(grid_ds.Columns)),
                      prose.instance_numbers(by_uid.values()))
    when = created or datetime.datetime.now()
    return _encapsulate(pdf, identity, ordered, job_key=job_key, when=when,
                        series_number=series_number)


def _encapsulate(pdf: bytes, identity: Dataset, ordered: Sequence[Dataset], *, job_key: str,
                 when: datetime.datetime, series_number: int) -> Dataset:
    """The Encapsulated PDF instance's modules (PS3.3 A.45.1) around ``pdf``."""
    ds = Dataset()
    for key in IDENTITY_KEYS:
        if key in identity:
            ds[key] = identity[key]
    ds.SpecificCharacterSet = SPECIFIC_CHARACTER_SET
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = derive_uid(job_key, "pdf-instance")
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = derive_uid(job_key, "pdf-series")
    ds.SeriesNumber = series_number
    ds.SeriesDescription = PDF_SERIES_DESCRIPTION
    ds.Manufacturer = MANUFACTURER
    ds.ConversionType = CONVERSION_TYPE
    ds.InstanceNumber = 1
    ds.ContentDate = when.strftime("%Y%m%d")
    ds.ContentTime = when.strftime("%H%M%S")
    ds.InstanceCreationDate = ds.ContentDate
    ds.InstanceCreationTime = ds.ContentTime
    ds.AcquisitionDateTime = ""
    ds.BurnedInAnnotation = "YES"
    ds.RecognizableVisualFeatures = "NO"
    ds.DocumentTitle = DOCUMENT_TITLE
    ds.ConceptNameCodeSequence = []  # Type 2: no standard code names a quality card
    ds.SourceInstanceSequence = _source_instances(ordered)
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def extract_pdf(ds: Dataset) -> bytes:
    """The PDF bytes of an Encapsulated PDF instance (without the padding byte)."""
    data = bytes(ds.EncapsulatedDocument)
    length = int(ds.get("EncapsulatedDocumentLength", len(data)))
    return data[:length]
