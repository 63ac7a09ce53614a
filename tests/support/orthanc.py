"""A real Orthanc PACS for tests: temp config, free ports, locked down, always stopped.

Orthanc 1.10 cannot bind to loopback only, so it is locked down by configuration:
``RemoteAccessAllowed: false`` (REST from 127.0.0.1 only), ``DicomCheckModalityHost``
with a modality table naming only 127.0.0.1 peers, and callers connect to 127.0.0.1
alone. ``TCP_NODELAY=1`` is set in its environment (DCMTK keeps Nagle on otherwise).

Usage::

    with running_orthanc(tmp_path, peers={"QCNODE": 11112}) as pacs:
        ...  # pacs.dicom_port, pacs.ae_title, pacs.find_sop(uid), pacs.instance_file(id)

``pacs.stop()`` / ``pacs.start()`` take it down and bring it back on the same ports with
the same storage (a PACS that is down for a while).
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.net import free_port, wait_for

ORTHANC_BIN = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DEFAULT_AE = "ORTHANC"
STARTUP_TIMEOUT = 60.0


class OrthancError(RuntimeError):
    """Orthanc did not start, or a REST call failed."""


class Orthanc:
    """One Orthanc process with its own temp storage, DICOM port and HTTP port.

    Parameters
    ----------
    workdir
        Directory for the config, storage, index and log (created).
    peers
        Modality table: AE title -> DICOM port of a peer on 127.0.0.1 (e.g. qcnode's
        listener, the target of Orthanc's storage-commitment N-EVENT-REPORT).
    ae_title
        Orthanc's own AE title; ``DicomCheckCalledAet`` is on, so callers must use it.
    always_allow_store
        Accept C-STORE from AE titles missing from ``peers`` (``DicomAlwaysAllowStore``).
    dicomweb
        Load Debian's DICOMweb plugin (``/dicom-web/``, for OHIF).
    extra
        More Orthanc configuration keys, merged last.
    """

    def __init__(
        self,
        workdir: Path,
        peers: Mapping[str, int] | None = None,
        *,
        ae_title: str = DEFAULT_AE,
        always_allow_store: bool = True,
        dicomweb: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if not ORTHANC_BIN.exists():
            raise OrthancError(f"{ORTHANC_BIN} missing: run `make system-deps`")
        if dicomweb and not DICOMWEB_PLUGIN.exists():
            raise OrthancError(f"{DICOMWEB_PLUGIN} missing: install orthanc-dicomweb")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.host = "127.0.0.1"
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.dicomweb = dicomweb
        self._peers = dict(peers or {})
        self._always_allow_store = always_allow_store
        self._extra = dict(extra or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"

    # Life cycle -------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The JSON configuration Orthanc is started with."""
        storage = self.workdir / "storage"
        modalities = {
            f"peer{i}": {"AET": ae, "Host": "127.0.0.1", "Port": port}
            for i, (ae, port) in enumerate(sorted(self._peers.items()))
        }
        cfg: dict[str, Any] = {
            "Name": f"qcnode-test-{self.dicom_port}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "Plugins": [str(DICOMWEB_PLUGIN)] if self.dicomweb else [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomCheckModalityHost": True,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": self._always_allow_store,
            "DicomAlwaysAllowFind": False,
            "DicomModalities": modalities,
            "DicomModalitiesInDatabase": False,
            "DicomScuTimeout": 10,
            "DicomThreadsCount": 4,
            "SaveJobs": False,
            "StableAge": 2,
            "OverwriteInstances": False,
            "HttpThreadsCount": 8,
            "TcpNoDelay": True,
            "KeepAlive": True,
        }
        if self.dicomweb:
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                               "Host": f"127.0.0.1:{self.http_port}", "Ssl": False}
        cfg.update(self._extra)
        return cfg

    def reconfigure(self, *, ae_title: str | None = None,
                    peers: Mapping[str, int] | None = None) -> None:
        """Change Orthanc's AE title or modality table; takes effect at the next start."""
        if ae_title is not None:
            self.ae_title = ae_title
        if peers is not None:
            self._peers = dict(peers)

    def start(self) -> None:
        """Start Orthanc (again, same ports and storage) and wait until REST answers."""
        if self._proc is not None and self._proc.poll() is None:
            return
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        env = {**os.environ, "TCP_NODELAY": "1"}
        log = self.log_path.open("ab")
        try:
            self._proc = subprocess.Popen(
                [str(ORTHANC_BIN), "--logdir=" + str(self.workdir), str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
            )
        finally:
            log.close()
        try:
            wait_for(self._ready, timeout=STARTUP_TIMEOUT, interval=0.1,
                     what=f"Orthanc REST on 127.0.0.1:{self.http_port}")
        except TimeoutError as exc:
            self.stop()
            raise OrthancError(f"Orthanc did not start; log:\n{self.log_tail()}") from exc

    def _ready(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            raise OrthancError(f"Orthanc exited; log:\n{self.log_tail()}")
        try:
            return bool(self.get_json("/system").get("DicomAet") == self.ae_title)
        except (OSError, OrthancError):
            return False

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after 20 s); storage is kept."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        """The end of Orthanc's own log files (for failure messages)."""
        texts = [p.read_text(errors="replace") for p in sorted(self.workdir.glob("*.log*"))]
        return "\n".join(texts)[-chars:]

    def __enter__(self) -> Orthanc:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # REST client ------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Base URL of the REST API (loopback)."""
        return f"http://127.0.0.1:{self.http_port}"

    def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                data: bytes = resp.read()
                return data
        except urllib.error.HTTPError as exc:
            raise OrthancError(f"{method} {path}: HTTP {exc.code}") from exc

    def get_json(self, path: str) -> Any:
        """GET ``path`` and decode JSON."""
        return json.loads(self._request("GET", path))

    def post_json(self, path: str, payload: Any) -> Any:
        """POST a JSON body to ``path`` and decode the JSON answer."""
        return json.loads(self._request("POST", path, json.dumps(payload).encode()))

    def upload(self, part10: bytes) -> dict[str, Any]:
        """POST a DICOM file to ``/instances`` (stored as it is); Orthanc's answer."""
        answer: dict[str, Any] = json.loads(self._request("POST", "/instances", part10))
        return answer

    def instances(self) -> list[str]:
        """Orthanc IDs of every stored instance."""
        ids: list[str] = self.get_json("/instances")
        return ids

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file of one instance (Part 10 bytes)."""
        return self._request("GET", f"/instances/{orthanc_id}/file")

    def find_sop(self, sop_instance_uid: str) -> list[str]:
        """Orthanc IDs of instances whose SOP Instance UID is ``sop_instance_uid``."""
        found: list[str] = self.post_json(
            "/tools/find",
            {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}},
        )
        return found

    def find_modality(self, modality: str) -> list[str]:
        """Orthanc IDs of instances in series of ``modality`` (e.g. ``SR``)."""
        found: list[str] = self.post_json(
            "/tools/find", {"Level": "Instance", "Query": {"Modality": modality}}
        )
        return found

    def commitment_job(self, transaction_uid: str, timeout: float = 30.0) -> dict[str, Any]:
        """Orthanc's finished storage-commitment job for ``transaction_uid`` (its SCP side:
        N-EVENT-REPORT sent and its response read). ``State`` is ``Success`` only when
        Orthanc got an N-EVENT-REPORT-RSP with a success status."""

        def finished() -> dict[str, Any] | None:
            for job in self.get_json("/jobs?expand"):
                content = job.get("Content", {})
                if (job.get("Type") == "StorageCommitmentScp"
                        and content.get("TransactionUid") == transaction_uid
                        and job.get("State") in ("Success", "Failure")):
                    return dict(job)
            return None

        return wait_for(finished, timeout=timeout, interval=0.05,
                        what=f"Orthanc's commitment job for {transaction_uid}")

    def delete(self, orthanc_id: str) -> None:
        """Delete one instance."""
        self._request("DELETE", f"/instances/{orthanc_id}")


@contextmanager
def running_orthanc(
    workdir: Path,
    peers: Mapping[str, int] | None = None,
    **kwargs: Any,
) -> Iterator[Orthanc]:
    """Start an :class:`Orthanc` in ``workdir`` and always stop it afterwards."""
    server = Orthanc(workdir, peers, **kwargs)
    try:
        server.start()
        yield server
    finally:
        server.stop()
