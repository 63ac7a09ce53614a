"""``qcnode serve``: the node's long-running process, and the reusable :class:`Node`.

Start-up order (each step needs the previous one):

1. load and validate the settings (an invalid file: every error printed with its key,
   exit status 1);
2. open the ledger (Alembic migrations to the newest revision);
3. remove partial copies from ``<home>/tmp`` (a crash mid-copy leaves them);
4. close associations a crash left open in the ledger;
5. replay the receive journal (:mod:`node.journal`): every instance acknowledged
   before a crash reaches the spool and the ledger now;
6. reconcile the spool with the ledger: a file the ledger does not know in the
   directory of a series the journal replayed, or of one still receiving, is recorded
   now. Only these directories are read: start-up time does not grow with the spool
   (100,000 delivered instances: 14.8 → 3.9 s to a C-ECHO, docs/benchmarks.md);
7. start the completion monitor, then the listener, then the retention sweep
   (:mod:`node.retention`); print one line ``listening on HOST:PORT as AE_TITLE`` to
   stdout.

While it runs the node holds a shared lock on ``<home>/node.lock``: ``qcnode retention
run`` (which deletes without the node's journal applier) takes it exclusively.

SIGTERM / SIGINT stop the listener first (running associations finish, new ones are
refused), then the journal applier (what was acknowledged is applied and flushed),
then the completion monitor; no partial file is left in the spool because files only
enter it by atomic rename.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType

from node.completion import CompletionMonitor
from node.config import ConfigError, Settings, load_settings
from node.dicomio import MalformedDataset, read_header
from node.ingest import instance_record
from node.ledger import Ledger
from node.logs import configure_logging, get_logger
from node.retention import Retention, Sweeper, applier_guard, hold_node_lock
from node.scp import Listener
from node.spool import Spool, Stored, file_sha256

log = get_logger(__name__)
EXIT_OK = 0
EXIT_CONFIG = 1
RECOVERED_ASSOC = "recovered"
_VERSION_RE = re.compile(r"\.v([0-9]+)\.dcm$")

OnComplete = Callable[[str, str], None]


def reconcile(spool: Spool, ledger: Ledger, settings: Settings,
              series: set[tuple[str, str]]) -> int:
    """Record spool files of ``series`` (``(study UID, series UID)``) that the ledger
    does not know.

    The journal applier stores a file before its ledger row commits; a crash in between
    leaves the record in the journal, which start-up replays: the series worth looking
    at are those replayed and those still receiving, never the whole spool. Returns the
    number of instances recorded. A file that no longer parses is moved to quarantine.
    """
    if not series:
        return 0
    known = ledger.series_relpaths(uid for _, uid in series)
    recorded = 0
    for relpath in sorted(set(spool.iter_relpaths(series)) - known):
        path = spool.root / relpath
        try:
            header = read_header(path)
        except MalformedDataset as exc:
            spool.quarantine(path, f"reconciliation: {exc.reason}")
            continue
        match = _VERSION_RE.search(relpath)
        stored = Stored(
            relpath=relpath, size=path.stat().st_size, sha256=file_sha256(path),
            version=int(match.group(1)) if match else 1, duplicate=False,
        )
        rule = settings.rule_for(header.modality, header.sop_class_uid,
                                 header.series_description)
        action = rule.action if rule is not None else "store"
        ledger.record_instance(
            instance_record(header, stored, "", RECOVERED_ASSOC, action,
                            rule.name if rule else "")
        )
        recorded += 1
    return recorded


class Node:
    """Settings → ledger, spool, completion monitor and listener, as a context manager.

    ``on_complete`` is a list of hooks ``(series_instance_uid, trigger) -> None`` called
    by the completion monitor after a series closed; the pipeline appends its
    dispatcher here (before ``__enter__``) without touching the listener.
    """

    def __init__(self, settings: Settings, on_complete: list[OnComplete] | None = None) -> None:
        self.settings = settings
        self.on_complete: list[OnComplete] = list(on_complete or [])
        self.ledger: Ledger | None = None
        self.spool: Spool | None = None
        self.monitor: CompletionMonitor | None = None
        self.listener: Listener | None = None
        self.sweeper: Sweeper | None = None
        self._lock_fd: int | None = None

    def _notify(self, series_uid: str, trigger: str) -> None:
        for hook in self.on_complete:
            try:
                hook(series_uid, trigger)
            except Exception:  # one failing hook must not stop the others
                log.exception("on_complete hook failed", series_uid=series_uid)

    def __enter__(self) -> Node:
        settings = self.settings
        settings.node.home.mkdir(parents=True, exist_ok=True)
        try:
            self._lock_fd = hold_node_lock(settings.node.home, exclusive=False)
            self.ledger = Ledger.open(settings.ledger_url)
            self.spool = Spool(
                settings.spool_dir, settings.node.home,
                min_free_bytes=settings.spool.min_free_bytes,
                min_free_percent=settings.spool.min_free_percent,
            )
            cleaned = self.spool.clean_temp()
            stale = self.ledger.close_stale_associations()
            self.listener = Listener(settings, self.spool, self.ledger, self._wake_monitor)
            replayed = self.listener.recover()
            recovered = reconcile(self.spool, self.ledger, settings,
                                  self.listener.applier.replayed
                                  | self.ledger.open_series_dirs())
            log.info("node starting", temp_files_removed=cleaned, stale_associations=stale,
                     journal_records_replayed=replayed, instances_recovered=recovered)
            self.monitor = CompletionMonitor(self.ledger, settings, self._notify)
            self.monitor.start()
            self.listener.start()
            retention = Retention(settings, self.ledger, self.spool,
                                  applier_guard(self.listener.applier))
            self.sweeper = Sweeper(retention).__enter__()
            self.spool.on_full = self.sweeper.wake
        except BaseException:
            self.close()
            raise
        return self

    def _wake_monitor(self) -> None:
        if self.monitor is not None:
            self.monitor.wake()

    @property
    def address(self) -> tuple[str, int]:
        """Where the listener is bound."""
        if self.listener is None:
            raise RuntimeError("node not started")
        return self.listener.address

    def close(self) -> None:
        """Stop the retention sweep, the listener, the monitor; close the ledger."""
        if self.sweeper is not None:
            self.sweeper.__exit__(None, None, None)
            self.sweeper = None
        if self.listener is not None:
            self.listener.stop()
            self.listener = None
        if self.monitor is not None:
            self.monitor.stop()
            self.monitor = None
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _load(path: Path | None) -> Settings | None:
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(f"{exc.source}: {len(exc.problems)} error(s); not starting", file=sys.stderr)
        for key, message in exc.problems:
            print(f"  {key}: {message}", file=sys.stderr)
        return None


def main(args: argparse.Namespace) -> int:
    """``qcnode serve [--config F]``: run until SIGTERM / SIGINT."""
    settings = _load(getattr(args, "config", None))
    if settings is None:
        return EXIT_CONFIG
    configure_logging(settings.logging.level, settings.logging.json_output)
    # The listener writes data sets into <home>/tmp itself (node.acceptor); other
    # temporary files of this process go there too, on the spool's filesystem, and a
    # restart removes whatever a crash left (Spool.clean_temp).
    tmp = settings.node.home / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(tmp.resolve())
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    from node.pipeline.service import Pipeline  # the pipeline's hook (issue 5)

    with Pipeline(settings, getattr(args, "config", None)) as pipeline, \
            Node(settings, [pipeline.on_complete]) as node:
        host, port = node.address
        print(f"listening on {host}:{port} as {settings.node.ae_title}", flush=True)
        while not stop.wait(1.0):
            pass
    log.info("stopped")
    return EXIT_OK
