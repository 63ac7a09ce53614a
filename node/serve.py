"""``qcnode serve``: the node's long-running process, and the reusable :class:`Node`.

Start-up order (each step needs the previous one):

1. load and validate the settings (an invalid file: every error printed with its key,
   exit status 1);
2. open the ledger (Alembic migrations to the newest revision);
3. remove partial copies from ``<home>/tmp`` (a crash mid-copy leaves them);
4. close associations a crash left open in the ledger;
5. replay the receive journal (:mod:`node.store.journal`): every instance acknowledged
   before a crash reaches the spool and the ledger now;
6. reconcile the spool with the ledger: a file the ledger does not know in the
   directory of a series the journal replayed, or of one still receiving, is recorded
   now. Only these directories are read: start-up time does not grow with the spool
   (100,000 delivered instances: 14.8 → 3.9 s to a C-ECHO, docs/benchmarks.md);
7. start the completion monitor, then the listener (and, with ``[mpps] enabled``, the
   MPPS SCP, :mod:`node.receive.mpps`), then the retention sweep
   (:mod:`node.store.retention`); print one line ``listening on HOST:PORT as AE_TITLE`` to
   stdout.

SIGHUP reloads the settings file (:mod:`node.reload`): senders, destinations and rules
change without dropping an association; an invalid file is logged and ignored.

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
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING

from node import audit_log, metrics, tls_files
from node.config import ConfigError, Settings, load_settings, resolve_config_path
from node.ledger import Ledger
from node.logs import configure_logging, get_logger
from node.receive.dicomio import MalformedDataset, read_header
from node.receive.mpps import MppsServer
from node.receive.scp import Listener
from node.reload import Reloader, ReloadPlan
from node.store.completion import CompletionMonitor
from node.store.ingest import instance_record
from node.store.retention import Retention, Sweeper, applier_guard, hold_node_lock
from node.store.spool import Spool, Stored, file_sha256

if TYPE_CHECKING:
    from node.web.server import WebServer

log = get_logger(__name__)
EXIT_OK = 0
EXIT_CONFIG = 1
RECOVERED_ASSOC = "recovered"
#: Signals that stop the node (SIGHUP reloads its settings instead).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
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
        self.mpps: MppsServer | None = None
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
            if settings.mpps.enabled:
                self.mpps = MppsServer(settings, self.ledger, self._wake_monitor)
                self.mpps.start()
            retention = Retention(settings, self.ledger, self.spool,
                                  applier_guard(self.listener.applier))
            self.sweeper = Sweeper(retention).__enter__()
            self.spool.on_full = self.sweeper.wake
        except BaseException:
            self.close()
            raise
        return self

    def apply(self, plan: ReloadPlan) -> None:
        """Run with reloaded settings (SIGHUP, :mod:`node.reload`): the listener admits
        by the new ``[[senders]]`` from the next association and routes by the new
        ``[[rules]]`` from the next C-STORE; open associations are not touched."""
        self.settings = plan.settings
        if self.listener is not None:
            self.listener.settings = plan.settings
        if self.monitor is not None:
            self.monitor.use_settings(plan.settings)
        if self.mpps is not None:
            self.mpps.use_settings(plan.settings)

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
        """Stop the retention sweep, the MPPS SCP and the listener, then the monitor, then
        close the ledger."""
        if self.mpps is not None:
            self.mpps.stop()
            self.mpps = None
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
        settings = load_settings(path)
    except ConfigError as exc:
        print(exc.report("not starting"), file=sys.stderr)
        return None
    # The TLS port's files must be usable (dates are only logged: node.tls_files).
    config = resolve_config_path(path)
    problems = tls_files.check(settings, config.read_text("utf-8") if config else "",
                               dates=False)
    if problems:
        print(ConfigError(str(config), problems).report("not starting"), file=sys.stderr)
        return None
    return settings


def main(args: argparse.Namespace) -> int:
    """``qcnode serve [--config F]``: run until SIGTERM / SIGINT."""
    settings = _load(getattr(args, "config", None))
    if settings is None:
        return EXIT_CONFIG
    configure_logging(settings.logging.level, settings.logging.json_output)
    audit_log.configure(settings, "serve")
    for problem in tls_files.check(settings):
        log.warning("TLS certificate not valid now", key=problem.key, problem=problem.message)
    # The listener writes data sets into <home>/tmp itself (node.receive.acceptor); other
    # temporary files of this process go there too, on the spool's filesystem, and a
    # restart removes whatever a crash left (Spool.clean_temp).
    tmp = settings.node.home / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(tmp.resolve())
    signals = SignalPipe((*STOP_SIGNALS, signal.SIGHUP))
    # Every process of this node counts into one directory (before anything counts).
    metrics.use_directory(settings.node.home / "run" / "metrics")
    from node.pipeline.service import Pipeline  # the pipeline's hook (issue 5)

    config = getattr(args, "config", None)
    with signals, Pipeline(settings, config) as pipeline, \
            Node(settings, [pipeline.on_complete]) as node, ExitStack() as web:
        reloader = Reloader(config, settings, [node.apply, pipeline.apply])
        refused = web_refusal(settings)
        if refused:
            log.error("web_refused", reason=refused)
        elif settings.web.enabled:
            web.enter_context(web_server(node, settings, reloader))
        host, port = node.address
        print(f"listening on {host}:{port} as {settings.node.ae_title}", flush=True)
        while True:
            received = signals.wait()
            stopping = [s for s in received if s in STOP_SIGNALS]
            if stopping:
                log.info("stopping", signal=stopping[0].name)
                break
            if signal.SIGHUP in received:
                reloader.reload()
    log.info("stopped")
    return EXIT_OK


def web_refusal(settings: Settings) -> str | None:
    """Why the web side stays off, or None: off loopback it needs an admin account (the
    configuration check already required HTTPS there)."""
    from node.web.auth import Accounts

    web = settings.web
    if not web.enabled or web.loopback or Accounts(settings.node.home).any_admin():
        return None
    return (f"[web] host {web.host} is not a loopback address and no admin account "
            "exists: create one with `qcnode user add NAME --role admin`, then restart")


def web_server(node: Node, settings: Settings, reloader: Reloader) -> WebServer:
    """The node's web side (health, readiness, metrics, the configuration API) over the
    running ``node``; a change through the API is applied as a SIGHUP reload."""
    from node.config_store import ConfigStore
    from node.pipeline.app import queue_depths
    from node.web.api import ApiContext
    from node.web.app import NodeView
    from node.web.auth import Accounts
    from node.web.server import WebServer

    def listening() -> tuple[str, int] | None:
        return node.address if node.listener is not None else None

    def apply() -> tuple[str, ...]:
        reloader.reload()
        return reloader.last.restart_needed if reloader.last is not None else ()

    home = settings.node.home
    path = reloader.path
    store = ConfigStore(path, home / "audit" / "config.jsonl") if path is not None else None
    api = ApiContext(store=store, accounts=Accounts(home), apply=apply,
                     refused=lambda reason: metrics.metrics().http_refused.labels(reason).inc())
    view = NodeView(settings=lambda: node.settings, ledger=lambda: node.ledger,
                    listening=listening, depths=queue_depths, api=api)
    web = settings.web
    return WebServer(view, web.host, web.port, certfile=web.tls_cert_file,
                     keyfile=web.tls_key_file)


class SignalPipe:
    """Signals handed to the main loop through a pipe (:func:`signal.set_wakeup_fd`).

    The handlers do nothing (they only replace the default action: SIGHUP would end the
    process); the interpreter writes each signal's number to the pipe and
    :meth:`wait` reads them. No lock is taken in a handler, so a signal can never
    deadlock the thread it interrupts. Installed at construction, so a SIGHUP during
    start-up is kept until the loop reads it.
    """

    def __init__(self, signums: tuple[signal.Signals, ...]) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for signum in signums:
            signal.signal(signum, _ignore)

    def wait(self) -> list[signal.Signals]:
        """Block until signals arrive; those that did, in order (any signal with a
        Python handler is written to the pipe: the caller picks the ones it handles)."""
        known = set(signal.Signals)
        return [signal.Signals(n) for n in os.read(self._read, 64) if n in known]

    def __enter__(self) -> SignalPipe:
        return self

    def __exit__(self, *exc: object) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._read)
        os.close(self._write)


def _ignore(_signum: int, _frame: FrameType | None) -> None:
    """A handler that leaves the work to :class:`SignalPipe`'s reader."""
