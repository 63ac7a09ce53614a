"""The receive journal: one flush makes an acknowledged instance durable.

Why: a C-STORE Success promises that the instance survives any crash (PS3.4 B.2.3 leaves
*how* to the SCP). Making a new file durable costs an fsync of the file (data + inode +
block allocation: a journal commit of the filesystem), a rename and an fsync of its
directory, and the ledger row adds a WAL fsync: three ordered flushes, 3–5 ms per image
on the development machine, for every image, because a sender waits for each response
and nothing can batch. Here each association appends its data sets to a *segment*, a
pre-allocated, already-written file, and makes each one durable with a single
``fdatasync`` (no block allocation and no inode change to commit: ~0.25 ms for a
512 KiB image). Files in the spool and rows in the ledger are derived from the journal
afterwards (:mod:`node.store.ingest`), without a flush each; a segment is reused only after
everything derived from it was flushed (one ``syncfs``) — a classic write-ahead log.

Layout of ``<home>/journal/seg-NNNNNN.wal``::

    0      segment header (4 KiB): magic, salt, state (free | active), CRC
    4096   record: header (40 bytes) | data set (Part 10 file bytes) | meta (JSON)
    ...    next record

A record header holds the segment's salt, the data and meta lengths, a CRC-32 of data
and meta and a CRC-32 of the header itself. The salt is a random 64-bit value drawn each
time a segment is taken, so bytes left by an earlier use of the segment (or planted by
a sender inside its own data) never read back as records. Recovery walks each active
segment from its first record and stops at the first header or body that does not
check out: everything acknowledged is before that point, because a record's header is
written after its body and a Success is sent only after the flush that covers both.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import secrets
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isal import isal_zlib

from node.logs import get_logger

log = get_logger(__name__)

#: CRC-32 (zlib's), computed by ISA-L (carry-less multiply), of every header and of a
#: record's data and meta. The data's is on the path of every C-STORE answer (each
#: byte received is checksummed before the flush): zlib needs 0.12 ms per 512 KiB
#: image on the development machine, ISA-L 0.009 ms, for the same value.
crc32: Callable[[bytes | memoryview, int], int] = isal_zlib.crc32

SEGMENT_MAGIC = b"QCJSEG01"
RECORD_MAGIC = b"QCJR"
SEGMENT_HEADER_BYTES = 4096
#: magic, salt, state, CRC-32 of the preceding fields
_SEG = struct.Struct("<8sQB3xI")
#: magic, salt, data length, meta length, CRC-32 of data + meta, CRC-32 of the preceding
_REC = struct.Struct("<4sQQQII")
RECORD_HEADER_BYTES = _REC.size
STATE_FREE, STATE_ACTIVE = 0, 1
_ZERO_CHUNK = 1 << 20
#: Free segments kept for reuse beyond ``segments`` (more are deleted when retired).
_POOL_EXTRA = 8


class JournalError(OSError):
    """The journal could not take or write a record (disk full, I/O error)."""


@dataclass(eq=False)
class Segment:
    """One journal file; written by one association at a time."""

    path: Path
    fd: int
    salt: int
    capacity: int
    written: int = 0  # records committed
    applied: int = 0  # records whose spool file and ledger row exist (not yet flushed)
    closed: bool = False  # no more records will be appended
    broken: bool = False  # a write or flush failed: never append again


@dataclass(frozen=True)
class Entry:
    """A committed record: where its data set is, and what the listener learnt of it."""

    segment: Segment
    offset: int  # of the data set in the segment file
    length: int
    meta: dict[str, Any] = field(hash=False)

    @contextlib.contextmanager
    def view(self) -> Iterator[memoryview]:
        """The data set's bytes (memory-mapped, read-only)."""
        with map_region(self.segment.fd, self.offset, self.length) as data:
            yield data


@contextlib.contextmanager
def map_region(fd: int, offset: int, length: int) -> Iterator[memoryview]:
    """A read-only memoryview of ``length`` bytes of file ``fd`` from ``offset``."""
    if length == 0:
        yield memoryview(b"")
        return
    base = offset - offset % mmap.ALLOCATIONGRANULARITY
    mapped = mmap.mmap(fd, offset - base + length, access=mmap.ACCESS_READ, offset=base)
    whole = memoryview(mapped)
    view = whole[offset - base:]
    try:
        yield view
    finally:
        view.release()
        whole.release()
        with contextlib.suppress(BufferError):  # a caller kept a slice: unmapped by GC
            mapped.close()


def _segment_header(salt: int, state: int) -> bytes:
    head = _SEG.pack(SEGMENT_MAGIC, salt, state, 0)[:-4]
    return head + struct.pack("<I", crc32(head, 0))


def _read_segment_header(fd: int) -> tuple[int, int] | None:
    raw = os.pread(fd, _SEG.size, 0)
    if len(raw) < _SEG.size:
        return None
    magic, salt, state, crc = _SEG.unpack(raw)
    if magic != SEGMENT_MAGIC or crc != crc32(raw[:-4], 0):
        return None
    return salt, state


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


class Record:
    """A data set being appended; the acceptor streams fragments into :meth:`write`."""

    __slots__ = ("crc", "error", "segment", "size", "start", "writer")

    def __init__(self, writer: Writer, segment: Segment, start: int) -> None:
        self.writer, self.segment, self.start = writer, segment, start
        self.size = 0
        self.crc = 0
        self.error = False

    @property
    def data_offset(self) -> int:
        return self.start + RECORD_HEADER_BYTES

    def write(self, data: memoryview) -> None:
        """Append a fragment (a write error is remembered: answered "out of resources")."""
        self.crc = crc32(data, self.crc)
        if not self.error:
            try:
                _pwrite_all(self.segment.fd, data, self.data_offset + self.size)
            except OSError:
                self.error = True
        self.size += len(data)

    def view(self) -> contextlib.AbstractContextManager[memoryview]:
        """The bytes written so far (for header checks and quarantine)."""
        return map_region(self.segment.fd, self.data_offset, self.size)

    def discard(self) -> None:
        """Forget the record (refused or aborted): the next one starts at the same place."""


class Writer:
    """An association's appender: one segment at a time, records in order."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.segment: Segment | None = None
        self.pos = 0

    def begin(self) -> Record:
        """Start a record (taking a new segment when the current one is full)."""
        seg = self.segment
        if seg is None or seg.broken or self.pos >= seg.capacity:
            self.close()
            seg = self.segment = self.journal.take()
            self.pos = SEGMENT_HEADER_BYTES
        return Record(self, seg, self.pos)

    def commit(self, record: Record, meta: dict[str, Any]) -> Entry:
        """Write meta and header, flush once; the record is durable when this returns.

        Raises :class:`JournalError` when the data could not be written or flushed (the
        segment is then abandoned: the page cache state of a failed flush is unknown).
        """
        seg = record.segment
        if record.error or seg is not self.segment:
            raise JournalError("data set could not be written to the journal")
        body = json.dumps(meta, separators=(",", ":")).encode()
        crc = crc32(body, record.crc)
        head = _REC.pack(RECORD_MAGIC, seg.salt, record.size, len(body), crc, 0)[:-4]
        head += struct.pack("<I", crc32(head, 0))
        try:
            _pwrite_all(seg.fd, body, record.data_offset + record.size)
            _pwrite_all(seg.fd, head, record.start)
            os.fdatasync(seg.fd)
        except OSError as exc:
            seg.broken = True
            raise JournalError(exc.errno, f"journal write failed: {exc.strerror}") from exc
        self.pos = record.data_offset + record.size + len(body)
        with self.journal.lock:
            seg.written += 1
        return Entry(seg, record.data_offset, record.size, meta)

    def close(self) -> None:
        """No more records from this writer (association ended)."""
        if self.segment is not None:
            self.journal.close_segment(self.segment)
            self.segment = None


class Journal:
    """Segments under one directory: a pool of free ones, and recovery at start-up.

    Parameters
    ----------
    directory
        ``<home>/journal``.
    segment_bytes
        Pre-allocated size of a segment; a writer moves to a new one after passing it
        (a data set larger than a segment just extends the file).
    segments
        Segments written in full when the journal is first opened (creating one costs
        writing it once; afterwards segments are reused). More are created when all
        are in use, and retired ones beyond this number are deleted.
    """

    def __init__(self, directory: Path, *, segment_bytes: int = 8 << 20, segments: int = 64
                 ) -> None:
        self.directory = directory
        self.segment_bytes = max(segment_bytes, 1 << 20)
        self.segments = max(segments, 1)
        self.lock = threading.Lock()
        self._free: list[Segment] = []
        self._all: dict[Path, Segment] = {}
        self._next_number = 0

    # Start-up ------------------------------------------------------------------------
    def open(self) -> list[Entry]:
        """Scan the directory: free segments to the pool; entries of active ones.

        Returns the committed records of every segment that was active (not yet
        retired) when the node stopped, oldest first: the caller must apply them (the
        operation is idempotent) and then :meth:`retire` the segments.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        entries: list[Entry] = []
        for path in sorted(self.directory.glob("seg-*.wal")):
            with contextlib.suppress(ValueError):
                self._next_number = max(self._next_number, int(path.stem[4:]) + 1)
            fd = os.open(path, os.O_RDWR)
            size = os.fstat(fd).st_size
            seg = Segment(path, fd, 0, max(size, SEGMENT_HEADER_BYTES))
            self._all[path] = seg
            header = _read_segment_header(fd)
            if header is None or header[1] != STATE_ACTIVE:
                self._free.append(seg)
                continue
            seg.salt = header[0]
            found = list(_scan_records(seg))
            seg.written = len(found)
            seg.closed = True
            entries.extend(found)
            if not found:
                self.retire(seg)
        entries.sort(key=lambda e: int(e.meta.get("t", 0)))
        created = 0
        while len(self._all) < self.segments:
            self._free.append(self._create(zero=True))
            created += 1
        if created:
            log.info("journal segments created", segments=created,
                     bytes=created * self.segment_bytes)
        return entries

    def free_count(self) -> int:
        with self.lock:
            return len(self._free)

    def close(self) -> None:
        """Close every file."""
        with self.lock:
            for seg in self._all.values():
                with contextlib.suppress(OSError):
                    os.close(seg.fd)
            self._all.clear()
            self._free.clear()

    # Segments ------------------------------------------------------------------------
    def writer(self) -> Writer:
        return Writer(self)

    def take(self) -> Segment:
        """A free segment, activated under a new salt.

        The new header is not flushed on its own: a record's commit flushes the file
        (``fdatasync``), header page included, before the record is acknowledged. A
        crash before any commit leaves either the old header (free) or the new one with
        no record under its salt: nothing of the new use is replayed, and nothing of it
        was acknowledged.
        """
        with self.lock:
            seg = self._free.pop() if self._free else None
        try:
            if seg is None:
                log.warning("journal: every segment in use, creating one")
                seg = self._create(zero=False)
            seg.salt = secrets.randbits(64)
            seg.written = seg.applied = 0
            seg.closed = seg.broken = False
            _pwrite_all(seg.fd, _segment_header(seg.salt, STATE_ACTIVE), 0)
        except OSError as exc:
            raise JournalError(exc.errno, f"no journal segment: {exc.strerror}") from exc
        return seg

    def close_segment(self, seg: Segment) -> None:
        with self.lock:
            seg.closed = True

    def retirable(self, seg: Segment) -> bool:
        """Closed, and every record applied (the caller flushes before :meth:`retire`)."""
        with self.lock:
            return seg.closed and seg.applied >= seg.written and seg.path in self._all

    def retire(self, seg: Segment) -> None:
        """Mark a segment free (its derived files and rows are durable) for reuse."""
        try:
            _pwrite_all(seg.fd, _segment_header(seg.salt, STATE_FREE), 0)
            os.fdatasync(seg.fd)
        except OSError:
            log.exception("journal segment could not be retired", segment=seg.path.name)
            return
        with self.lock:
            if seg.path not in self._all:
                return
            keep = (len(self._free) < self.segments + _POOL_EXTRA
                    and os.fstat(seg.fd).st_size <= 2 * self.segment_bytes)
            if keep:
                self._free.append(seg)
                return
            del self._all[seg.path]
        os.close(seg.fd)
        seg.path.unlink(missing_ok=True)

    def active_segments(self) -> list[Segment]:
        with self.lock:
            return [s for s in self._all.values() if s not in self._free]

    def _create(self, *, zero: bool) -> Segment:
        """A new segment file. ``zero``: written in full, so later writes allocate
        nothing and a record's flush commits no metadata (the journal's first start);
        otherwise only reserved (fast: an association is waiting), and its first use
        pays for converting the reserved blocks as it goes."""
        with self.lock:
            number = self._next_number
            self._next_number += 1
        path = self.directory / f"seg-{number:06d}.wal"
        tmp = path.with_suffix(".new")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if zero:
                zeros = bytes(_ZERO_CHUNK)
                for offset in range(0, self.segment_bytes, _ZERO_CHUNK):
                    _pwrite_all(fd, zeros[: self.segment_bytes - offset], offset)
            else:
                os.posix_fallocate(fd, 0, self.segment_bytes)
            _pwrite_all(fd, _segment_header(0, STATE_FREE), 0)
            os.fsync(fd)
            os.replace(tmp, path)
            dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        seg = Segment(path, fd, 0, self.segment_bytes)
        with self.lock:
            self._all[path] = seg
        return seg


def _scan_records(seg: Segment) -> Iterator[Entry]:
    """Committed records of an active segment, in order (stops at the first bad one)."""
    fd, pos = seg.fd, SEGMENT_HEADER_BYTES
    size = os.fstat(fd).st_size
    while pos + RECORD_HEADER_BYTES <= size:
        raw = os.pread(fd, RECORD_HEADER_BYTES, pos)
        magic, salt, length, meta_len, crc, head_crc = _REC.unpack(raw)
        if (magic != RECORD_MAGIC or salt != seg.salt or head_crc != crc32(raw[:-4], 0)
                or pos + RECORD_HEADER_BYTES + length + meta_len > size):
            return
        data_at = pos + RECORD_HEADER_BYTES
        with map_region(fd, data_at, length + meta_len) as body:
            if crc32(body, 0) != crc:
                return
            meta_raw = bytes(body[length:])
        try:
            meta = json.loads(meta_raw)
        except ValueError:
            return
        yield Entry(seg, data_at, length, meta)
        pos = data_at + length + meta_len


def unapplied_records(directory: Path) -> int:
    """Committed records in the active segments under ``directory``, read-only: what
    the next start will replay (0 when the node stopped cleanly). For tools that run
    while no node does, e.g. ``qcnode retention run``."""
    count = 0
    for path in sorted(directory.glob("seg-*.wal")):
        fd = os.open(path, os.O_RDONLY)
        try:
            header = _read_segment_header(fd)
            if header is None or header[1] != STATE_ACTIVE:
                continue
            seg = Segment(path, fd, header[0], max(os.fstat(fd).st_size, SEGMENT_HEADER_BYTES))
            count += sum(1 for _ in _scan_records(seg))
        finally:
            os.close(fd)
    return count
