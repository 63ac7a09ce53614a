"""Embedded workers: ``qcnode serve`` without a broker URL runs real Celery workers.

One child process per queue (``qcnode worker --queues gpu`` and ``… io``) on the
SQLite-backed broker; they die with the node (``PR_SET_PDEATHSIG``) and are restarted
if they exit. Nothing else to install or start.

A worker killed outright (SIGKILL, the OOM killer) takes the message it was working on
with it: the SQLite transport has no visibility timeout. ``on_restart(queue)`` is
called after such a worker was replaced, so the node can re-dispatch that stage's
unfinished jobs from the ledger (:meth:`node.pipeline.dispatch.Dispatcher.redispatch`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from node.pipeline.app import GPU, IO

log = structlog.get_logger(__name__)
PR_SET_PDEATHSIG = 1
STOP_TIMEOUT = 20.0
RESTART_CHECK_SECONDS = 1.0


_LIBC = ctypes.CDLL("libc.so.6", use_errno=True)  # loaded before any fork


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def worker_command(config: Path | None, queues: str, concurrency: int = 1) -> list[str]:
    """The command line of a ``qcnode worker`` for ``queues``."""
    cmd = [sys.executable, "-m", "node.cli", "worker", "--queues", queues,
           "--concurrency", str(concurrency)]
    if config is not None:
        cmd += ["--config", str(config)]
    return cmd


class EmbeddedWorkers:
    """Start, supervise and stop one worker process per queue (a context manager)."""

    def __init__(self, config: Path | None, queues: tuple[str, ...] = (GPU, IO), *,
                 on_restart: Callable[[str], None] | None = None) -> None:
        self._commands = {q: worker_command(config, q) for q in queues}
        self._on_restart = on_restart
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._restarting: set[str] = set()  # asked to stop by :meth:`restart`
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="qcnode-workers",
                                        daemon=True)

    @property
    def pids(self) -> dict[str, int]:
        """Process IDs of the running worker processes, by queue."""
        return {q: p.pid for q, p in self._procs.items()}

    def _spawn(self, queue: str) -> None:
        self._procs[queue] = subprocess.Popen(
            self._commands[queue], env=os.environ.copy(),
            # Only an already-resolved libc call runs between fork and exec.
            preexec_fn=_die_with_parent,  # noqa: PLW1509
        )
        log.info("worker_started", queue=queue, pid=self._procs[queue].pid)

    def _supervise(self) -> None:
        while not self._stop.wait(RESTART_CHECK_SECONDS):
            for queue, proc in list(self._procs.items()):
                if proc.poll() is not None and not self._stop.is_set():
                    if queue in self._restarting:
                        self._restarting.discard(queue)
                        self._spawn(queue)  # warm shutdown: nothing was lost
                        continue
                    log.warning("worker_exited", queue=queue, returncode=proc.returncode)
                    self._spawn(queue)
                    self._restarted(queue)

    def restart(self) -> None:
        """Replace every worker, e.g. to read a reloaded settings file: SIGTERM is
        Celery's warm shutdown (the running task finishes and is acknowledged), then
        the supervisor starts the new process."""
        for queue, proc in list(self._procs.items()):
            if proc.poll() is None:
                self._restarting.add(queue)
                proc.send_signal(signal.SIGTERM)
                log.info("worker_restarting", queue=queue, pid=proc.pid, reason="reload")

    def _restarted(self, queue: str) -> None:
        if self._on_restart is None:
            return
        try:
            self._on_restart(queue)
        except Exception as exc:  # noqa: BLE001 - supervision must go on
            log.error("worker_restart_hook_failed", queue=queue, error=type(exc).__name__)

    def __enter__(self) -> EmbeddedWorkers:
        for queue in self._commands:
            self._spawn(queue)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._procs.values():
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
