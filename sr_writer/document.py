"""What every qcnode report object shares: document attributes, identity, times.

Used by the TID 1500 SR (:mod:`sr_writer.tid1500`), the Basic Text SR
(:mod:`sr_writer.text_sr`) and the Encapsulated PDF (:mod:`sr_writer.pdf`).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any, Final

import highdicom as hd
from highdicom.sr import DeviceObserverIdentifyingAttributes, ObservationContext, ObserverContext
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as pd_codes

from inference.result import AssessmentResult, EngineInfo
from sr_writer import codes
from sr_writer.sources import identity_dataset
from sr_writer.uids import derive_uid

MANUFACTURER: Final = "qcnode"
SPECIFIC_CHARACTER_SET: Final = "ISO_IR 192"


def library_order(sources: Sequence[Dataset], result: AssessmentResult) -> list[Dataset]:
    """The sources with the worst slice first (TID 1600 image library order)."""
    worst = result.worst_slice
    if worst is None:
        return list(sources)
    first = [ds for ds in sources if ds.SOPInstanceUID == worst.sop_instance_uid]
    return first + [ds for ds in sources if ds.SOPInstanceUID != worst.sop_instance_uid]


def observation_context(engine: EngineInfo) -> ObservationContext:
    """TID 1001/1002/1004: the device observer is the algorithm, not a person."""
    device = DeviceObserverIdentifyingAttributes(
        uid=derive_uid(engine.key, "device-observer"),
        name=engine.name,
        manufacturer_name=MANUFACTURER,
        model_name=engine.version,
    )
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=pd_codes.cid270.Device, observer_identifying_attributes=device
        )
    )


def document_attributes(
    ordered: Sequence[Dataset], *, job_key: str, role: str, series_number: int,
    series_description: str, predecessor: Dataset | None, when: datetime.datetime,
) -> dict[str, Any]:
    """Keyword arguments shared by the SR documents (highdicom's SR classes).

    Evidence: identity copies of ``ordered`` (:func:`sr_writer.sources.identity_dataset`).
    Own series and instance (``<role>-series`` / ``<role>-instance`` UIDs derived from
    ``job_key``). SR Document General Module (PS3.3 C.17.2): never complete, final or
    verified (algorithm output); ``predecessor`` as Predecessor Documents Sequence;
    Content Date/Time from ``when``.
    """
    return {
        "evidence": [identity_dataset(ds) for ds in ordered],
        "series_instance_uid": derive_uid(job_key, f"{role}-series"),
        "series_number": series_number,
        "sop_instance_uid": derive_uid(job_key, f"{role}-instance"),
        "instance_number": 1,
        "manufacturer": MANUFACTURER,
        "is_complete": False,
        "is_final": False,
        "is_verified": False,
        "previous_versions": [predecessor] if predecessor is not None else None,
        "specific_character_set": SPECIFIC_CHARACTER_SET,
        "series_description": series_description,
        "content_date": when.date(),
        "content_time": when.time(),
    }


def stamp(sr: Dataset, when: datetime.datetime) -> None:
    """Creation times from ``when`` and the private coding scheme's identification.

    highdicom stamps Instance Creation Date/Time (PS3.3 C.12.1) and its own Contribution
    DateTime (Contributing Equipment Sequence) with "now"; all become ``when``, so that
    the dataset depends only on its inputs. The Coding Scheme Identification Sequence
    (PS3.3 C.12.1) declares the private scheme.
    """
    sr.InstanceCreationDate = when.strftime("%Y%m%d")
    sr.InstanceCreationTime = when.strftime("%H%M%S.%f")
    for item in sr.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = when.strftime("%Y%m%d%H%M%S.%f")
    sr.CodingSchemeIdentificationSequence = codes.coding_scheme_identification()


def procedures(sources: Sequence[Dataset]) -> list[hd.sr.CodedConcept]:
    """Procedure reported: CT (for CT sources) and image quality analysis."""
    modalities = {str(ds.Modality) for ds in sources}
    return ([codes.PROCEDURE_CT] if modalities == {"CT"} else []) + [codes.PROCEDURE_IQ]
