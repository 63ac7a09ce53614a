"""The objects a job sends: the TID 1500 SR and the companions destinations ask for.

Every object is rebuilt from what the ledger stores (the result, the job's creation
time, the job key), so a retried or redelivered job re-creates the same objects with
the same UIDs (derived from the job key, :func:`sr_writer.uids.derive_uid`) and the
same Content Date/Time: a PACS keeps one instance of each.

Companions (``DestinationSettings.companions``) are viewer-safe renderings of the same
result: a Basic Text SR (PS3.3 A.35.1) and an Encapsulated PDF quality card
(PS3.3 A.45.1). They are built only when some destination of the job asks for them.

Every object built is kept on disk before it is sent (:func:`keep_reports`):
``<home>/reports/<Study Instance UID>/<SOP Instance UID>.dcm``, a DICOM Part 10 file
(PS3.10 §7) written atomically. A rebuild has the same UIDs, hence the same path: a
retried or redelivered job finds its file and leaves it as it is, and a delivery retry
sends the kept files (:func:`load_kept`) rather than a rebuild.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from inference.prepare import PreparedSeries
from inference.result import AssessmentResult
from node.config import Companion, DestinationSettings, Settings
from node.ledger import SeriesInfo
from node.store.spool import fsync_dir
from sr_writer import build_pdf, build_sr, build_text_sr
from sr_writer.uids import derive_uid

SR = "sr"
TEXT_SR: Companion = "text_sr"
PDF: Companion = "pdf"
#: Directory under the node's home where every built object is kept.
REPORTS_DIR = "reports"
#: Upper bound of a compressed display image in a task message.
MAX_IMAGE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ReportSet:
    """The SR and its companions, by kind (``"sr"``, ``"text_sr"``, ``"pdf"``)."""

    objects: dict[str, Dataset]

    @property
    def sr(self) -> Dataset:
        """The TID 1500 Comprehensive 3D SR."""
        return self.objects[SR]

    def for_destination(self, dest: DestinationSettings) -> list[Dataset]:
        """What ``dest`` receives: the SR, then the companions it asks for."""
        return [self.sr, *(self.objects[c] for c in dest.companions)]


def content_time(created_at: dt.datetime) -> dt.datetime:
    """The Content Date/Time of a job's objects: its creation time, local, naive."""
    return created_at.astimezone().replace(tzinfo=None)


def destinations_of(settings: Settings, series: SeriesInfo) -> tuple[DestinationSettings, ...]:
    """The destinations of the rule that admitted ``series`` (recorded by name)."""
    rule = next((r for r in settings.rules if r.name == series.rule), None)
    if rule is None:
        rule = settings.rule_for(series.modality, "", series.description)
    return settings.destinations_for(rule) if rule is not None else ()


def wanted_companions(destinations: Sequence[DestinationSettings]) -> tuple[Companion, ...]:
    """Companions asked for by any of ``destinations``, in a fixed order."""
    asked = {c for d in destinations for c in d.companions}
    return tuple(c for c in (TEXT_SR, PDF) if c in asked)


def build_reports(
    sources: Sequence[Dataset], result: AssessmentResult, *, job_key: str,
    created: dt.datetime, companions: Sequence[Companion] = (),
    predecessor: Dataset | None = None, image: np.ndarray | None = None,
    text_predecessor: Dataset | None = None,
) -> ReportSet:
    """Build the SR (superseding ``predecessor``) and the requested companions.

    ``text_predecessor`` is the earlier Basic Text SR the new one supersedes (both go in
    the Predecessor Documents Sequence, PS3.3 C.17.2). The Encapsulated PDF has no such
    attribute (PS3.3 A.45.1 has no SR Document General Module): it supersedes nothing.

    Raises
    ------
    ValueError
        Invalid sources or result (from :mod:`sr_writer`).
    """
    objects = {SR: build_sr(sources, result, job_key=job_key, predecessor=predecessor,
                            created=created)}
    if TEXT_SR in companions:
        objects[TEXT_SR] = build_text_sr(sources, result, job_key=job_key, created=created,
                                         predecessor=text_predecessor)
    if PDF in companions:
        objects[PDF] = build_pdf(sources, result, job_key=job_key, image=image,
                                 created=created)
    return ReportSet(objects)


def reports_root(settings: Settings) -> Path:
    """Where reports are kept: ``<home>/reports``."""
    return settings.node.home / REPORTS_DIR


def report_relpath(ds: Dataset) -> str:
    """``<Study Instance UID>/<SOP Instance UID>.dcm``: where ``ds`` is kept."""
    return f"{ds.StudyInstanceUID}/{ds.SOPInstanceUID}.dcm"


def write_atomic(ds: Dataset, path: Path) -> None:
    """Write ``ds`` as a Part 10 file at ``path``: temp file, fsync, rename, fsync dir.

    A reader (or a crash) never sees a half-written file at ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def keep_reports(reports: ReportSet, root: Path) -> dict[str, str]:
    """Keep every object of ``reports`` under ``root``; their paths relative to it, by kind.

    An object whose file exists already (a retried or redelivered job: same UIDs,
    byte-identical rebuild) is not written again.

    Raises
    ------
    OSError
        The file could not be written.
    """
    kept: dict[str, str] = {}
    for kind, ds in reports.objects.items():
        rel = report_relpath(ds)
        path = root / rel
        if not path.is_file():
            write_atomic(ds, path)
        kept[kind] = rel
    return kept


#: The role each kind's UIDs are derived with (:func:`sr_writer.uids.derive_uid`).
_ROLES = {SR: "sr", TEXT_SR: "text-sr", PDF: "pdf"}


def load_kept(root: Path, job_key: str, sr_path: str,
              companions: Sequence[Companion]) -> ReportSet | None:
    """The objects a job kept under ``root`` (the SR at ``sr_path``, relative to it, and
    ``companions`` beside it), read back; None when one of them is not there.

    A delivery retry sends these rather than a rebuild: the objects the first attempt
    sent, whatever changed in the code or the sources since (a PACS that stored a first
    copy must see the same object again under the same UID), at the cost of a read.
    """
    study = sr_path.rpartition("/")[0]
    objects: dict[str, Dataset] = {}
    for kind in (SR, *companions):
        path = root / study / f"{derive_uid(job_key, f'{_ROLES[kind]}-instance')}.dcm"
        if kind == SR and f"{study}/{path.name}" != sr_path:
            return None
        try:
            objects[kind] = dcmread(path)
        except (OSError, InvalidDicomError):
            return None
    return ReportSet(objects)


def worst_image(prepared: PreparedSeries, result: AssessmentResult) -> np.ndarray | None:
    """The windowed RGB of the result's worst slice (for the PDF card), if prepared."""
    worst = result.worst_slice
    if worst is None:
        return None
    for item in prepared.slices:
        if item.sop_instance_uid == worst.sop_instance_uid and item.frame == worst.frame:
            return item.rgb
    return None


def encode_image(image: np.ndarray | None) -> bytes | None:
    """A display image as compressed ``.npy`` bytes (None stays None)."""
    if image is None:
        return None
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(image, dtype=np.uint8), allow_pickle=False)
    data = zlib.compress(buf.getvalue(), 6)
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"display image compresses to {len(data)} bytes")
    return data


def decode_image(data: bytes | None) -> np.ndarray | None:
    """Inverse of :func:`encode_image`."""
    if data is None:
        return None
    image: np.ndarray = np.load(io.BytesIO(zlib.decompress(data)), allow_pickle=False)
    return image
