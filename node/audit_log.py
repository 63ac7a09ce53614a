"""The security audit log: where :mod:`node.atna` messages go (``[audit]``).

``target = "file"`` appends one ``<AuditMessage>`` per line to ``<home>/audit/atna.log``
(one ``write`` on an ``O_APPEND`` descriptor, so the listener and the embedded workers
share the file without interleaving); ``"syslog"`` sends each message as one RFC 5424
syslog message over UDP (RFC 5426) as PS3.15 A.6/A.7 transmit them: facility 10
(security/authorization), severity 5 (notice) or 4 (warning) for a failure, APP-NAME
``qcnode``, MSGID ``DICOM+RFC3881``, no structured data, the XML after a UTF-8 BOM.

Like logging, the log is configured once per process (:func:`configure`, by ``qcnode
serve``, ``qcnode worker`` and ``qcnode config``) and the four hooks — a rejected
association (:func:`association_rejected`), a configuration change, an API login, a
delivered report — call one function each; with ``target = "none"`` or before
:func:`configure` they do nothing. Sending never raises into the caller (the listener's
event loop, a request, a task): a failure is logged with its class and counted as
``audit_failed``.

Logins: HTTP Basic proves the caller on every request, so a success is recorded once per
user and client address every :data:`LOGIN_REPEAT_SECONDS` (a console polling the API
would otherwise write a message every few seconds); every failure is recorded.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import ipaddress
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from node import atna
from node.config import DestinationSettings, Settings
from node.logs import get_logger

log = get_logger(__name__)
LOGIN_REPEAT_SECONDS = 300.0
#: RFC 5424 PRI parts (PS3.15 A.6: facility 10, security/authorization messages)
FACILITY_AUTHPRIV = 10
SEVERITY_WARNING = 4
SEVERITY_NOTICE = 5
MSGID = "DICOM+RFC3881"
APP_NAME = "qcnode"
BOM = b"\xef\xbb\xbf"


class Sink(Protocol):
    """Where one encoded message goes."""

    def send(self, message: atna.AuditMessage) -> None:
        """Write or send ``message``."""


class FileSink:
    """One message per line, appended."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

    def send(self, message: atna.AuditMessage) -> None:
        """Append the message's XML and a newline in one write."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, message.to_xml() + b"\n")
        finally:
            os.close(fd)


class SyslogSink:
    """RFC 5424 messages over UDP (RFC 5426) to one collector."""

    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        self._hostname = socket.gethostname() or "-"

    def send(self, message: atna.AuditMessage) -> None:
        """One datagram: the RFC 5424 header, no structured data, BOM + XML."""
        self._sock.sendto(frame(message, self._hostname), self.address)


def frame(message: atna.AuditMessage, hostname: str) -> bytes:
    """``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM MSG`` (RFC 5424 §6)."""
    severity = SEVERITY_WARNING if message.failed else SEVERITY_NOTICE
    stamp = message.at.astimezone(dt.UTC).isoformat(timespec="milliseconds")
    stamp = stamp.replace("+00:00", "Z")
    head = (f"<{FACILITY_AUTHPRIV * 8 + severity}>1 {stamp} {hostname[:255]} {APP_NAME} "
            f"{os.getpid()} {MSGID} - ")
    return head.encode("ascii", "replace") + BOM + message.to_xml()


@dataclass
class Auditor:
    """A process's audit log: who reports, and where to."""

    source: atna.AuditSource
    sink: Sink
    node_host: str

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._logins: dict[tuple[str, str], float] = {}

    def emit(self, message: atna.AuditMessage) -> None:
        """Send ``message``; a failure is logged, never raised."""
        try:
            self.sink.send(message)
        except (OSError, ValueError) as exc:
            log.warning("audit_failed", event=message.event.meaning, error=type(exc).__name__)

    def login_due(self, user: str, host: str, success: bool) -> bool:
        """Whether this login is recorded (failures always; successes now and then)."""
        if not success:
            return True
        now = time.monotonic()
        with self._lock:
            last = self._logins.get((user, host))
            if last is not None and now - last < LOGIN_REPEAT_SECONDS:
                return False
            self._logins[(user, host)] = now
            return True


class _Current:
    """The process's auditor (None: nothing is recorded)."""

    auditor: Auditor | None = None


def configure(settings: Settings, process: str) -> Auditor | None:
    """Record this process's events as ``[audit]`` says (``process``: its name, e.g.
    ``serve``, used with the PID as the node's UserID, PS3.15 A.5.2.1)."""
    cfg = settings.audit
    sink: Sink
    if cfg.target == "file":
        sink = FileSink(settings.audit_file)
    elif cfg.target == "syslog":
        sink = SyslogSink(cfg.syslog_host, cfg.syslog_port)
    else:
        _Current.auditor = None
        return None
    source = atna.AuditSource(cfg.source_id or socket.gethostname() or "qcnode",
                              settings.node.ae_title, f"qcnode-{process}:{os.getpid()}",
                              cfg.site_id)
    _Current.auditor = Auditor(source, sink, _node_host(settings.node.host))
    return _Current.auditor


def _node_host(bound: str) -> str:
    """The node's network access point: its bound address, the host name when it binds
    every address (PS3.15 A.5.2.4: one name or address for all messages)."""
    return socket.gethostname() if ipaddress.ip_address(bound).is_unspecified else bound


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def association_rejected(calling_ae: str, host: str, reason: str) -> None:
    """Record a rejected association (called from :func:`node.metrics.rejected`)."""
    auditor = _Current.auditor
    if auditor is not None:
        auditor.emit(atna.association_rejected(auditor.source, calling_ae, host, reason,
                                               _now()))


def config_changed(who: str, action: str, path: str, file: Path) -> None:
    """Record a change to the configuration file (from the config store)."""
    auditor = _Current.auditor
    if auditor is not None:
        auditor.emit(atna.config_changed(auditor.source, who, action, path,
                                         file.resolve().as_uri(), _now()))


def api_login(authorization: str | None, host: str, user: str | None) -> None:
    """Record an API authentication: ``user`` is who it proved, None when it failed.

    A request without credentials is not a login attempt (a browser asks first without
    them); a failed one is recorded with the name it gave.
    """
    auditor = _Current.auditor
    if auditor is None or (user is None and not authorization):
        return
    name = user if user is not None else _basic_name(authorization or "")
    if auditor.login_due(name, host, user is not None):
        auditor.emit(atna.login(auditor.source, name, host, user is not None, _now()))


def _basic_name(header: str) -> str:
    if not header.startswith("Basic "):
        return "(not basic)"
    try:
        return base64.b64decode(header[6:], validate=True).decode().partition(":")[0]
    except (binascii.Error, UnicodeDecodeError):
        return "(undecodable)"


def report_delivered(destination: DestinationSettings, calling_ae: str,
                     objects: list[tuple[str, str]]) -> None:
    """Record a confirmed delivery of ``objects`` ((study UID, SOP class UID) each)."""
    auditor = _Current.auditor
    if auditor is not None:
        transfer = atna.Transfer(destination.name, destination.ae_title, destination.host,
                                 calling_ae, auditor.node_host, tuple(objects))
        auditor.emit(atna.instances_transferred(auditor.source, transfer, _now()))
