"""The spool: received instances as durable files, moved in atomically.

Layout under the spool directory (UIDs are validated before they become path parts)::

    <study UID>/<series UID>/<SOP instance UID>.dcm        first version
    <study UID>/<series UID>/<SOP instance UID>.v2.dcm     different bytes, same UID

and under ``<home>``: ``tmp/`` (partial receptions; emptied at start-up) and
``quarantine/`` (malformed datasets with a ``.reason`` file beside each).

A UID the listener accepts without it being valid per PS3.5 §9.1 (a component with a
leading zero: :func:`node.receive.dicomio.is_acceptable_uid`) is named by its hash instead
(:func:`path_part`): ``uid-<40 hex digits>``, which no valid UID can collide with. The
ledger keeps the UID itself and the file's relative path.

Files arrive here from the receive journal (:mod:`node.store.ingest`), which already holds
every acknowledged data set durably: they are renamed in without a flush each, and
:meth:`Spool.sync` (one ``syncfs`` at the journal's checkpoint) makes a batch durable
before the journal segments holding their bytes are reused.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from node.receive.dicomio import InstanceHeader, is_acceptable_uid, is_valid_uid

_CHUNK = 1 << 20
#: Buffer of :meth:`Spool.stage_copy` (one per spool; the journal applier is one thread).
_COPY_BUFFER = 4 << 20


def _find_syncfs() -> Callable[[int], int] | None:
    """``syncfs(2)`` from the C library (Linux), or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.syncfs
    except (OSError, AttributeError):
        return None
    func.argtypes, func.restype = [ctypes.c_int], ctypes.c_int
    return cast("Callable[[int], int]", func)


_SYNCFS = _find_syncfs()
SUFFIX = ".dcm"
#: Under the spool root; a UID never starts with a dot, so no study directory clashes.
TRASH_DIR = ".purge"


class SpoolFull(OSError):
    """The spool's disk is past its free-space watermark (or ran out of space)."""


@dataclass(frozen=True)
class Stored:
    """Where an instance went: ``duplicate`` means identical bytes were already there."""

    relpath: str
    size: int
    sha256: str
    version: int
    duplicate: bool


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a directory's entries durable (needed after create/rename, POSIX)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def path_part(uid: str) -> str:
    """The file-name part for ``uid``: the UID itself when valid per PS3.5 §9.1,
    else ``uid-`` and 40 hex digits of its SHA-256 (see the module documentation).

    Raises
    ------
    ValueError
        ``uid`` is not even acceptable (:func:`node.receive.dicomio.is_acceptable_uid`).
    """
    if is_valid_uid(uid):
        return uid
    if not is_acceptable_uid(uid):
        raise ValueError("invalid UID used as a path part")
    return "uid-" + hashlib.sha256(uid.encode("ascii")).hexdigest()[:40]


def version_name(sop_instance_uid: str, version: int) -> str:
    """File name of one version of an instance."""
    name = path_part(sop_instance_uid)
    if version == 1:
        return f"{name}{SUFFIX}"
    return f"{name}.v{version}{SUFFIX}"


class Spool:
    """Received instances on disk.

    Parameters
    ----------
    root
        The spool directory.
    home
        The node's home; ``tmp/`` and ``quarantine/`` live here (same filesystem as the
        spool in the default layout, so moves are atomic renames).
    min_free_bytes, min_free_percent
        Watermark: below either, :meth:`check_room` raises :class:`SpoolFull`.
    """

    def __init__(
        self, root: Path, home: Path, *, min_free_bytes: int = 0, min_free_percent: float = 0.0
    ) -> None:
        self.root = root
        self.tmp = home / "tmp"
        self.quarantine_dir = home / "quarantine"
        #: Series directories retention detached, deleted outside any lock.
        self.trash = root / TRASH_DIR
        self.min_free_bytes = min_free_bytes
        self.min_free_percent = min_free_percent
        #: Called (in the caller's thread) each time :meth:`check_room` refuses, e.g. to
        #: wake the retention sweep (node.store.retention); it must return at once.
        self.on_full: Callable[[], None] | None = None
        self._copy_buffer = memoryview(bytearray(_COPY_BUFFER))
        for directory in (self.root, self.tmp, self.quarantine_dir):
            directory.mkdir(parents=True, exist_ok=True)

    # Space ---------------------------------------------------------------------------
    def check_room(self, incoming: int = 0) -> None:
        """Raise :class:`SpoolFull` when storing ``incoming`` bytes would pass the watermark."""
        usage = shutil.disk_usage(self.root)
        free = usage.free - incoming
        if free < self.min_free_bytes or free * 100.0 < self.min_free_percent * usage.total:
            if self.on_full is not None:
                self.on_full()
            raise SpoolFull(errno.ENOSPC, "spool disk is over its free-space watermark")

    # Storing ------------------------------------------------------------------------
    def series_dir(self, header: InstanceHeader) -> Path:
        """Directory of a series (UIDs re-checked: they are path parts, :func:`path_part`)."""
        path_part(header.sop_instance_uid)
        return (self.root / path_part(header.study_instance_uid)
                / path_part(header.series_instance_uid))

    def store(
        self, src: Path, header: InstanceHeader, known: list[tuple[int, str]] | None = None,
        *, sha256: str | None = None, recovering: bool = False,
    ) -> Stored:
        """Move the received file ``src`` into the spool.

        ``known`` are the ``(version, sha256)`` pairs the ledger already holds for this
        SOP Instance UID; versions found on disk count too. Identical bytes are not
        stored twice (``src`` is removed); different bytes become the next version.
        ``sha256`` is the file's digest when the caller computed it already.

        Nothing is flushed here: the caller makes a batch durable with :meth:`sync`
        (the journal applier, at its checkpoint). The free-space watermark is the
        listener's check (:meth:`check_room`), made before it acknowledges: an
        instance already acknowledged is stored whatever the watermark says.

        ``recovering``: replaying the journal after a crash. Files on disk were then
        possibly renamed but never flushed, so their bytes are checked: a file the
        ledger does not know, or whose bytes differ from what the ledger recorded, is
        replaced rather than trusted.
        """
        size = src.stat().st_size
        sha = sha256 or file_sha256(src)
        directory = self.series_dir(header)
        versions = dict(known or [])
        version = 1
        while True:
            name = version_name(header.sop_instance_uid, version)
            target = directory / name
            relpath = target.relative_to(self.root).as_posix()
            recorded = versions.get(version)
            on_disk = target.exists()
            if recovering and on_disk:
                if recorded in (None, sha):
                    if file_sha256(target) == sha:
                        src.unlink(missing_ok=True)
                    else:  # unflushed or foreign bytes under this name: replace them
                        self._move(src, target)
                    return Stored(relpath, size, sha, version, duplicate=True)
                version += 1
                continue
            existing = recorded
            if existing is None and on_disk:
                existing = file_sha256(target)
            if existing is None:
                break
            if existing == sha:
                if on_disk:
                    src.unlink(missing_ok=True)
                else:  # known to the ledger but lost on disk: put it back
                    self._move(src, target)
                return Stored(relpath, size, sha, version, duplicate=True)
            version += 1
        if not directory.is_dir():  # one stat per image; mkdir tries then stats again
            directory.mkdir(parents=True, exist_ok=True)
        self._move(src, target)
        return Stored(relpath, size, sha, version, duplicate=False)

    def stage(self, data: memoryview) -> Path:
        """Write ``data`` (a received data set) to a new file in ``tmp/``; not flushed."""
        return self._stage([data])

    def stage_copy(self, fd: int, offset: int, length: int) -> tuple[Path, str]:
        """Copy ``length`` bytes of the open file ``fd`` from ``offset`` into a new file
        in ``tmp/`` (not flushed), hashing them on the way; (path, SHA-256 hex).

        Reads with ``pread`` into one reused buffer: a memory map of the source costs a
        page fault per 4 KiB, which doubled the copy's time for a 512 KiB image.
        """
        digest = hashlib.sha256()

        def chunks() -> Iterator[memoryview]:
            buf, done = self._copy_buffer, 0
            while done < length:
                count = os.preadv(fd, [buf[: min(len(buf), length - done)]], offset + done)
                if count <= 0:
                    raise OSError(errno.EIO, "source ended early")
                digest.update(buf[:count])
                yield buf[:count]
                done += count

        return self._stage(chunks()), digest.hexdigest()

    def _stage(self, chunks: Iterable[memoryview]) -> Path:
        """A new file in ``tmp/`` holding ``chunks`` (not flushed); a full disk raises
        :class:`SpoolFull`, any failure leaves no file behind."""
        path = self.tmp / f"{uuid.uuid4().hex}.part"
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for chunk in chunks:
                left = chunk
                while left:
                    left = left[os.write(out, left):]
        except OSError as exc:
            os.close(out)
            path.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFull(exc.errno, "spool disk is full") from exc
            raise
        os.close(out)
        return path

    def sync(self) -> None:
        """Flush everything written to the spool's filesystem (``syncfs``; ``sync``
        where the C library has no ``syncfs``)."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _SYNCFS is None or _SYNCFS(fd) != 0:
                os.sync()
        finally:
            os.close(fd)

    def _move(self, src: Path, target: Path) -> None:
        try:
            os.replace(src, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            self._copy_across(src, target)

    def _copy_across(self, src: Path, target: Path) -> None:
        """``src`` is on another filesystem: copy into our tmp, fsync, rename."""
        staging = self.tmp / f"{uuid.uuid4().hex}.part"
        try:
            with src.open("rb") as fin, staging.open("wb") as fout:
                shutil.copyfileobj(fin, fout, _CHUNK)
                fout.flush()
                os.fsync(fout.fileno())
            os.replace(staging, target)
        except OSError as exc:
            staging.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFull(exc.errno, "spool disk is full") from exc
            raise
        src.unlink(missing_ok=True)

    # Quarantine ---------------------------------------------------------------------
    def quarantine(self, src: Path, reason: str) -> Path:
        """Keep a malformed reception for inspection, with its reason beside it."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = self.quarantine_dir / f"{stamp}-{uuid.uuid4().hex[:12]}{SUFFIX}"
        try:
            os.replace(src, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            shutil.move(src, target)
        target.with_suffix(".reason").write_text(reason + "\n", encoding="utf-8")
        return target

    # Deleting (retention) -----------------------------------------------------------
    def detach(self, series_dir: str) -> None:
        """Move a series directory (``<study UID>/<series UID>``, spool-relative) out
        of the spool's namespace into ``.purge/`` with one rename, and remove its study
        directory if that is now empty. A file stored for the series afterwards goes
        into a new directory; :meth:`empty_trash` deletes the detached files later
        (unlinking is slow, ~2–3 ms per file on a busy disk: not done under a lock)."""
        source = self.root / series_dir
        if not source.is_dir():
            return
        self.trash.mkdir(exist_ok=True)
        os.rename(source, self.trash / uuid.uuid4().hex)
        with contextlib.suppress(OSError):  # other series in the study: kept
            source.parent.rmdir()

    def empty_trash(self) -> tuple[int, int]:
        """Delete what :meth:`detach` moved aside; ``(files, bytes)`` deleted."""
        files = freed = 0
        if not self.trash.is_dir():
            return 0, 0
        for directory in self.trash.iterdir():
            for entry in os.scandir(directory):
                with contextlib.suppress(FileNotFoundError):
                    size = entry.stat(follow_symlinks=False).st_size
                    os.unlink(entry.path)
                    files, freed = files + 1, freed + size
            with contextlib.suppress(OSError):
                directory.rmdir()
        return files, freed

    def expired_quarantine(self, before: float) -> list[tuple[Path, int]]:
        """Quarantined data sets (and their ``.reason``) last modified before ``before``
        (a POSIX time), with their sizes."""
        found = []
        for path in self.quarantine_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                if path.is_file() and stat.st_mtime < before:
                    found.append((path, stat.st_size))
        return sorted(found)

    def used_percent(self) -> float:
        """How full the spool's filesystem is, in percent (``free`` as in :meth:`check_room`)."""
        usage = shutil.disk_usage(self.root)
        return 100.0 * (usage.total - usage.free) / usage.total if usage.total else 0.0

    # Start-up -----------------------------------------------------------------------
    def clean_temp(self) -> int:
        """Remove partial receptions left in ``tmp/`` by a crash; return how many."""
        count = 0
        for path in self.tmp.iterdir():
            if path.is_file():
                path.unlink(missing_ok=True)
                count += 1
        return count

    def iter_relpaths(self, series: Iterable[tuple[str, str]] | None = None) -> Iterator[str]:
        """Stored instance files, relative to the spool root: every one, or those of
        the ``(study UID, series UID)`` directories given (only these are read)."""
        if series is None:
            for path in self.root.rglob(f"*{SUFFIX}"):
                if path.is_file():
                    yield path.relative_to(self.root).as_posix()
            return
        for study_uid, series_uid in sorted(set(series)):
            if not (is_valid_uid(study_uid) and is_valid_uid(series_uid)):
                continue
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                for entry in os.scandir(self.root / study_uid / series_uid):
                    if entry.name.endswith(SUFFIX) and entry.is_file():
                        yield f"{study_uid}/{series_uid}/{entry.name}"
