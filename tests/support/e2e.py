"""End-to-end helpers: a real ``qcnode serve`` (and ``qcnode worker``) process per test.

:class:`NodeSite` writes a node home with a config (free ports, short quiet period and
backoffs, a unique queue prefix so runs sharing Redis or RabbitMQ never take each
other's work), starts ``qcnode serve`` as a subprocess, sends series with DCMTK's
``/usr/bin/storescu``, and reads the node's ledger directly to wait on conditions.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import signal
import subprocess
import sys
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy.exc import OperationalError

from inference.result import AssessmentResult
from node.config import Settings, load_settings
from node.ledger import JobInfo, Ledger, SeriesState
from node.ledger.base import NotFound
from node.pipeline.app import GPU, IO, create_app, queue_name
from tests.support.net import free_port, wait_for
from tests.support.orthanc import Orthanc

NODE_AE = "QCNODE"
STORESCU = Path("/usr/bin/storescu")
START_TIMEOUT = 90.0
STOP_TIMEOUT = 60.0
DEFAULT_TOML = """\
[node]
ae_title = "{ae}"
port = {port}
home = "{home}"

[completion]
quiet_seconds = {quiet}
poll_seconds = 0.1

[web]
port = {web_port}

[spool]  # a small receive journal: every test writes its own once
journal_segment_bytes = 1048576
journal_segments = 2

[broker]
queue_prefix = "e2e{prefix}."
{broker}

[engine]
{engine}

[delivery]
max_attempts = {max_attempts}
backoff_initial_seconds = 0.5
backoff_max_seconds = 2.0

[logging]
level = "INFO"
json = "always"

[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {pacs_port}
confirm = "find"
timeout = 5.0
{companions}
"""


def synth_series(out: Path, *, slices: int = 24, size: int = 256, seed: int = 0) -> Path:
    """A synthetic CT series written by ``qcnode synth``; returns its folder."""
    run = subprocess.run(
        [sys.executable, "-m", "node.cli", "synth", str(out), "--slices", str(slices),
         "--size", str(size), "--seed", str(seed)],
        capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    folders = sorted({p.parent for p in out.rglob("*.dcm")})
    assert len(folders) == 1, folders
    return folders[0]


def series_uid_of(folder: Path) -> str:
    """The Series Instance UID of the files in ``folder``."""
    first = next(iter(sorted(folder.glob("*.dcm"))))
    return str(pydicom.dcmread(first, stop_before_pixels=True).SeriesInstanceUID)


def storescu(folder: Path, port: int, *, ae: str = NODE_AE) -> None:
    """Send every file of ``folder`` in one association with DCMTK's storescu."""
    if not STORESCU.exists():
        raise AssertionError(f"{STORESCU} missing: run `make system-deps`")
    run = subprocess.run(
        [str(STORESCU), "-aet", "SCANNER", "-aec", ae, "+sd", "+sp", "*.dcm", "127.0.0.1",
         str(port), str(folder)],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "TCP_NODELAY": "1"})
    assert run.returncode == 0, f"storescu failed:\n{run.stdout[-1500:]}{run.stderr[-1500:]}"


def children(pid: int) -> list[int]:
    """PIDs of the direct children of ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def cmdline(pid: int) -> list[str]:
    """The argument vector of ``pid`` (empty if it exited)."""
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants (a worker and its pool processes)."""
    tree = [pid]
    for parent in tree:
        tree.extend(children(parent))
    for victim in reversed(tree):
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def delete_queues(settings: Settings) -> None:
    """Remove this run's queues and exchange from a shared broker (Redis, RabbitMQ)."""
    app = create_app(settings)
    with app.connection_for_write() as conn:
        channel = conn.channel()
        for stage in (GPU, IO):
            channel.queue_delete(queue=queue_name(settings, stage))
        channel.exchange_delete(exchange=f"{settings.broker.queue_prefix}qcnode")
        channel.close()


def _rounded(value: Any) -> Any:
    """Floats to 12 significant digits (an SR stores numbers as 16-character DS)."""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.12g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def same_result(a: AssessmentResult, b: AssessmentResult) -> bool:
    """Equal results, numbers compared to the precision a DICOM DS keeps."""
    return bool(_rounded(asdict(a)) == _rounded(asdict(b)))


class NodeSite:
    """A node home, its ``qcnode serve`` process and optional ``qcnode worker`` processes."""

    def __init__(self, home: Path, pacs: Orthanc | None, *, broker: str = "",
                 engine: str = "", companions: str = "", quiet: float = 1.0,
                 max_attempts: int = 6) -> None:
        """``pacs`` None: no ``[[destinations]]`` at all (reports are only kept on disk)."""
        self.home = home
        self._pacs = pacs
        self.port = free_port()
        self.web_port = free_port()
        home.mkdir(parents=True, exist_ok=True)
        self.config = home / "qcnode.toml"
        text = DEFAULT_TOML.format(
            ae=NODE_AE, port=self.port, home=home, quiet=quiet, prefix=uuid.uuid4().hex[:8],
            broker=broker, engine=engine or 'name = "physics"', max_attempts=max_attempts,
            pacs_port=pacs.dicom_port if pacs is not None else 0, companions=companions,
            web_port=self.web_port)
        if pacs is None:
            text = text.partition("[[destinations]]")[0]
        self.config.write_text(text)
        self.settings: Settings = load_settings(self.config)
        self.serve: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self._ledger: Ledger | None = None

    @property
    def pacs(self) -> Orthanc:
        """The destination PACS (fails for a site configured without one)."""
        assert self._pacs is not None, "this site has no destination"
        return self._pacs

    # Processes ----------------------------------------------------------------------
    def _log(self, name: str) -> Any:
        return (self.home / f"{name}.log").open("ab")

    def start(self) -> None:
        """Start ``qcnode serve`` and wait until it listens."""
        with self._log("serve") as log:
            self.serve = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "serve", "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._listening, timeout=START_TIMEOUT, interval=0.1,
                 what=f"qcnode serve listening; log:\n{self.log('serve')}")

    def _listening(self) -> bool:
        if self.serve is None or self.serve.poll() is not None:
            raise AssertionError(f"qcnode serve exited:\n{self.log('serve')}")
        return "listening on" in self.log("serve")

    def start_worker(self, queues: str) -> subprocess.Popen[bytes]:
        """Start a separate ``qcnode worker --queues QUEUES`` process."""
        with self._log(f"worker-{queues}") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "worker", "--queues", queues,
                 "--config", str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        self.workers.append(proc)
        return proc

    def kill_node(self) -> None:
        """SIGKILL ``qcnode serve`` (its embedded workers die with it)."""
        assert self.serve is not None
        self.serve.send_signal(signal.SIGKILL)
        self.serve.wait(timeout=STOP_TIMEOUT)
        self.serve = None

    def embedded_worker(self, queue: str) -> int:
        """PID of the embedded ``qcnode worker --queues QUEUE`` child of ``qcnode serve``."""
        assert self.serve is not None
        for pid in children(self.serve.pid):
            argv = cmdline(pid)
            if "worker" in argv and argv[argv.index("--queues") + 1] == queue:
                return pid
        raise AssertionError(f"no embedded {queue} worker")

    def stop(self) -> None:
        """SIGTERM everything started here; SIGKILL what does not stop in time."""
        procs = [p for p in [self.serve, *self.workers] if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.serve, self.workers = None, []
        if self.settings.broker.url:
            delete_queues(self.settings)
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    def log(self, name: str = "serve", chars: int = 4000) -> str:
        path = self.home / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def logs(self) -> str:
        """Tails of every log in the home, for failure messages."""
        return "\n".join(f"--- {p.name}\n{self.log(p.stem, 2500)}"
                         for p in sorted(self.home.glob("*.log")))

    # Ledger ---------------------------------------------------------------------------
    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            self._ledger = Ledger(self.settings.ledger_url)
        return self._ledger

    def state(self, series_uid: str) -> SeriesState | None:
        """The series' state, or None while the ledger does not know it."""
        try:
            return self.ledger.series_info(series_uid).state
        except (NotFound, OperationalError):  # not recorded yet, or not migrated yet
            return None

    def wait_state(self, series_uid: str, state: SeriesState, timeout: float = 120.0) -> None:
        """Wait until the series reaches ``state``; fail early if it failed instead."""
        def reached() -> bool:
            now = self.state(series_uid)
            if now == SeriesState.FAILED and state != SeriesState.FAILED:
                raise AssertionError(f"series failed: "
                                     f"{self.ledger.series_info(series_uid).last_error}\n"
                                     f"{self.logs()}")
            return now == state
        wait_for(reached, timeout=timeout, interval=0.05,
                 what=f"series {state.value}; logs:\n{self.logs()}")

    def job(self, series_uid: str) -> JobInfo:
        """The series' one job."""
        jobs = self.ledger.jobs_of_series(series_uid)
        assert len(jobs) == 1, jobs
        return jobs[0]

    def sr_in_pacs(self, sr_uid: str) -> pydicom.Dataset:
        """The one instance with ``sr_uid`` in the PACS, parsed."""
        found = self.pacs.find_sop(sr_uid)
        assert len(found) == 1, f"{len(found)} instances of {sr_uid} in Orthanc"
        return pydicom.dcmread(io.BytesIO(self.pacs.instance_file(found[0])))
