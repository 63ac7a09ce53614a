"""Serve OHIF v3's built viewer on a free loopback port, in front of a real Orthanc.

The viewer is npm's ``@ohif/app`` ``dist/`` (unpacked into ``viewer/ohif/`` by
``make viewer-deps``). One origin serves everything, so the browser needs no CORS:

- ``/app-config.js``: generated, with one DICOMweb data source at ``/dicom-web`` here;
- ``/dicom-web/…``: forwarded to Orthanc's DICOMweb plugin (GET/HEAD, ``Accept`` kept);
- any other path: the file in ``dist/`` or, for the single-page app's routes
  (``/viewer?StudyInstanceUIDs=…``), ``index.html``.

Orthanc's DICOMweb plugin writes absolute ``BulkDataURI`` values; with its ``Host``
setting left empty (:data:`DICOMWEB_SAME_ORIGIN`) it builds them from the request's
``Host`` header, which the proxy sets to its own address.

Usage::

    with running_orthanc(tmp, dicomweb=True, extra=DICOMWEB_SAME_ORIGIN) as pacs, \\
            OhifServer(pacs.http_port) as ohif:
        url = ohif.study_url(study_uid)
"""

from __future__ import annotations

import http.client
import json
import mimetypes
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

REPO = Path(__file__).resolve().parents[2]
OHIF_DIST = REPO / "viewer" / "ohif"
DICOMWEB_PREFIX = "/dicom-web"
PROXY_TIMEOUT = 60.0
#: Orthanc ``extra`` config: DICOMweb at /dicom-web/, URLs built from the Host header.
DICOMWEB_SAME_ORIGIN: dict[str, Any] = {
    "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False}
}
_FORWARDED_HEADERS = ("Accept", "Range", "If-None-Match")
_CONTENT_TYPES = {".wasm": "application/wasm", ".mjs": "text/javascript",
                  ".js": "text/javascript", ".json": "application/json"}


def ohif_dist() -> Path:
    """The unpacked OHIF viewer; raises if ``make viewer-deps`` has not run."""
    if not (OHIF_DIST / "index.html").is_file():
        raise FileNotFoundError(f"OHIF viewer missing in {OHIF_DIST}: run `make viewer-deps`")
    return OHIF_DIST


def app_config(dicomweb_root: str) -> str:
    """OHIF's ``window.config`` with one DICOMweb data source at ``dicomweb_root``.

    Mirrors OHIF's own ``config/local_orthanc.js`` shape (data source
    ``@ohif/extension-default.dataSourcesModule.dicomweb``, WADO-RS rendering).
    """
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": "qcnode test Orthanc",
            "name": "orthanc",
            "wadoUriRoot": dicomweb_root,
            "qidoRoot": dicomweb_root,
            "wadoRoot": dicomweb_root,
            "qidoSupportsIncludeField": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True},
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "showErrorDetails": "always",
        "defaultDataSourceName": "orthanc",
        "dataSources": [source],
    }
    return "window.config = " + json.dumps(config, indent=2) + ";\n"


class _Handler(BaseHTTPRequestHandler):
    server: _OhifHttpServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads failures from the browser, not from access logs."""

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, *, head: bool) -> None:
        path = urlsplit(self.path).path
        if path == DICOMWEB_PREFIX or path.startswith(DICOMWEB_PREFIX + "/"):
            self._proxy("HEAD" if head else "GET")
        elif path == "/app-config.js":
            self._send(200, "text/javascript", self.server.config_js, head=head)
        else:
            self._static(path, head=head)

    def _static(self, path: str, *, head: bool) -> None:
        root = self.server.dist
        candidate = (root / path.lstrip("/")).resolve()
        if not candidate.is_relative_to(root) or not candidate.is_file():
            candidate = root / "index.html"  # single-page-app route
        ctype = _CONTENT_TYPES.get(candidate.suffix) or _guess_type(candidate)
        self._send(200, ctype, candidate.read_bytes(), head=head)

    def _proxy(self, method: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.orthanc_port,
                                          timeout=PROXY_TIMEOUT)
        try:
            headers = {h: v for h in _FORWARDED_HEADERS if (v := self.headers.get(h))}
            headers["Host"] = self.headers.get("Host") or self.server.authority
            conn.request(method, self.path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        ctype = resp.getheader("Content-Type") or "application/octet-stream"
        self._send(resp.status, ctype, body, head=method == "HEAD")

    def _send(self, status: int, ctype: str, body: bytes, *, head: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not head:
            self.wfile.write(body)


def _guess_type(path: Path) -> str:
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


class _OhifHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, dist: Path, orthanc_port: int) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.dist = dist.resolve()
        self.orthanc_port = orthanc_port
        self.authority = f"127.0.0.1:{self.server_address[1]}"
        self.config_js = app_config(f"http://{self.authority}{DICOMWEB_PREFIX}").encode()


class OhifServer:
    """OHIF's built viewer plus a same-origin DICOMweb proxy, in a background thread.

    Parameters
    ----------
    orthanc_http_port
        Orthanc's HTTP port on 127.0.0.1 (its DICOMweb plugin at ``/dicom-web/``).
    dist
        The unpacked viewer (default :func:`ohif_dist`).
    """

    def __init__(self, orthanc_http_port: int, dist: Path | None = None) -> None:
        self._httpd = _OhifHttpServer(dist or ohif_dist(), orthanc_http_port)
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="ohif-http", daemon=True)

    @property
    def url(self) -> str:
        """Base URL of the viewer (loopback)."""
        return f"http://{self._httpd.authority}"

    def study_url(self, study_instance_uid: str) -> str:
        """The viewer route that opens one study in OHIF's basic viewer mode."""
        return f"{self.url}/viewer?StudyInstanceUIDs={quote(study_instance_uid)}"

    def __enter__(self) -> OhifServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)


def chromium_path() -> Path:
    """Debian's Chromium; raises if ``make system-deps`` has not installed it."""
    found = shutil.which("chromium") or "/usr/bin/chromium"
    path = Path(found)
    if not path.exists():
        raise FileNotFoundError("chromium missing: run `make system-deps`")
    return path
