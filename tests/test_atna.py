"""The security audit log on a real node: a rejected echoscu association, a failed and a
successful API login, a configuration change through the API and the shell, and a report
delivered to a real Orthanc each leave a DICOM audit message (PS3.15 A.5) — sent to a
UDP syslog receiver bound here (RFC 5424 framing) or appended to the audit file — and
every message validates against the Relax NG schema of PS3.15 A.5.1.1."""

from __future__ import annotations

import base64
import datetime as dt
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import pydicom
import pytest
import rnc2rng
from lxml import etree

from node import atna
from node.audit_log import BOM, MSGID, frame
from node.ledger import SeriesState
from tests.support.e2e import NODE_AE, NodeSite, series_uid_of, storescu, synth_series
from tests.support.net import wait_for
from tests.support.orthanc import Orthanc, running_orthanc
from tests.test_web_api import ADMIN, _call, _qcnode

SCHEMA = Path(__file__).parent / "support" / "dicom_audit_message.rnc"
ECHOSCU = "/usr/bin/echoscu"
SYSLOG_HEADER = re.compile(
    rb"^<(\d+)>1 (\S+) (\S+) qcnode (\d+) " + re.escape(MSGID.encode()) + rb" - ")
NOW = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC)


@lru_cache(maxsize=1)
def schema() -> Any:
    """PS3.15 A.5.1.1's schema, compact syntax converted, as an lxml validator."""
    return etree.RelaxNG(etree.fromstring(
        rnc2rng.dumps(rnc2rng.loads(SCHEMA.read_text())).encode()))


def valid(xml: bytes) -> Any:
    """The parsed message, asserting it validates against the DICOM schema."""
    doc = etree.fromstring(xml)
    assert schema().validate(doc), f"{schema().error_log}\n{xml.decode()}"
    return doc


def event(doc: Any) -> tuple[str, str | None, str]:
    """(EventID code, EventTypeCode code, outcome) of a message."""
    ident = doc.find("EventIdentification")
    kind = ident.find("EventTypeCode")
    return (ident.find("EventID").get("csd-code"),
            kind.get("csd-code") if kind is not None else None,
            ident.get("EventOutcomeIndicator"))


def detail(doc: Any) -> str:
    """The decoded Alert Description of a Security Alert."""
    item = doc.find("ParticipantObjectIdentification/ParticipantObjectDetail")
    return base64.b64decode(item.get("value")).decode()


# The builders against the schema ---------------------------------------------------------
SOURCE = atna.AuditSource("host-a", NODE_AE, "qcnode-serve:42", "site-1")


def test_every_message_validates_and_a_broken_one_does_not() -> None:
    transfer = atna.Transfer("pacs", "ORTHANC", "10.0.0.9", NODE_AE, "10.0.0.2",
                             (("1.2.3", "1.2.840.10008.5.1.4.1.1.88.34"),) * 2)
    messages = [
        atna.association_rejected(SOURCE, "INTRUDER", "10.0.0.5", "calling_ae_or_host", NOW),
        atna.association_rejected(SOURCE, "", "10.0.0.5", "per_host_limit", NOW),
        atna.config_changed(SOURCE, "admin", "add", "senders[1]", "file:///etc/q.toml", NOW),
        atna.login(SOURCE, "admin", "127.0.0.1", True, NOW),
        atna.instances_transferred(SOURCE, transfer, NOW),
    ]
    for message in messages:
        valid(message.to_xml())
    doc = valid(messages[-1].to_xml())
    assert doc.find("ParticipantObjectIdentification/ParticipantObjectDescription/SOPClass"
                    ).get("NumberOfInstances") == "2"
    # the validator is not a rubber stamp: without its EventDateTime a message fails
    broken = etree.fromstring(messages[0].to_xml())
    del broken.find("EventIdentification").attrib["EventDateTime"]
    assert not schema().validate(broken)


def test_syslog_frame_is_rfc5424_with_the_dicom_msgid() -> None:
    rejected = atna.association_rejected(SOURCE, "X", "10.0.0.5", "called_ae", NOW)
    changed = atna.config_changed(SOURCE, "a", "add", "rules[0]", "file:///q.toml", NOW)
    for message, pri in ((rejected, b"84"), (changed, b"85")):  # facility 10, sev. 4 / 5
        data = frame(message, "host-a")
        head = SYSLOG_HEADER.match(data)
        assert head is not None and head.group(1) == pri, data[:80]
        assert head.group(2) == b"2026-12-04T12:00:00.000Z"
        assert data[head.end():].startswith(BOM)
        valid(data[head.end() + len(BOM):])


# A real node ------------------------------------------------------------------------------
class SyslogReceiver:
    """A UDP syslog collector on 127.0.0.1 (RFC 5426), keeping every datagram."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.datagrams: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.datagrams.append(self.sock.recv(65535))
            except TimeoutError:
                continue

    def messages(self) -> list[Any]:
        """Every message so far, its header checked, its XML validated and parsed."""
        docs = []
        for data in list(self.datagrams):
            head = SYSLOG_HEADER.match(data)
            assert head is not None, data[:120]
            docs.append(valid(data[head.end() + len(BOM):]))
        return docs

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def _with_audit(site: NodeSite, audit: str) -> None:
    """``[audit]`` as given, and one sender: SCANNER (storescu) from 127.0.0.1."""
    site.config.write_text(site.config.read_text() + f"\n{audit}\n[[senders]]\n"
                           'ae_title = "SCANNER"\nhost = "127.0.0.1"\n')


def _echo(site: NodeSite, ae: str) -> int:
    return subprocess.run([ECHOSCU, "-aet", ae, "-aec", NODE_AE, "127.0.0.1", str(site.port)],
                          capture_output=True, timeout=30, check=False).returncode


def _found(docs: list[Any], code: str, kind: str | None, outcome: str) -> list[Any]:
    return [d for d in docs if event(d) == (code, kind, outcome)]


@pytest.fixture()
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path / "orthanc", {NODE_AE: 104}) as server:
        yield server


def test_a_node_sends_its_security_events_to_syslog(tmp_path: Path, pacs: Orthanc) -> None:
    receiver = SyslogReceiver()
    site = NodeSite(tmp_path / "home", pacs)
    _with_audit(site, f'[audit]\ntarget = "syslog"\nsyslog_port = {receiver.port}\n')
    series = synth_series(tmp_path / "series", slices=8, size=128)
    site.start()
    try:
        # a rejected association: INTRUDER is not a configured sender
        assert _echo(site, "INTRUDER") != 0
        wait_for(lambda: _found(receiver.messages(), "110113", "110126", "4"), timeout=30,
                 what="a Security Alert for the rejected association")
        alert = _found(receiver.messages(), "110113", "110126", "4")[0]
        assert "calling_ae_or_host" in detail(alert) and "INTRUDER" in detail(alert)
        caller = alert.findall("ActiveParticipant")[1]
        assert caller.get("AlternativeUserID") == "AETITLES=INTRUDER"
        assert caller.get("NetworkAccessPointID") == "127.0.0.1"
        # a failed login, then a change through the API (a successful login)
        assert _qcnode(site, "user", "add", ADMIN[0], "--role", "admin",
                       password=ADMIN[1]).returncode == 0
        assert _call(site, "GET", "/api/config/senders", user=("admin", "wrong"))[0] == 401
        status, _ = _call(site, "POST", "/api/config/senders",
                          {"ae_title": "CT2", "host": "127.0.0.1"})
        assert status == 201
        wait_for(lambda: _found(receiver.messages(), "110113", "110131", "0"), timeout=30,
                 what="a Security Alert for the configuration change")
        docs = receiver.messages()
        failed = _found(docs, "110114", "110122", "4")
        assert [d.find("ActiveParticipant").get("UserID") for d in failed] == ["admin"]
        assert _found(docs, "110114", "110122", "0"), "the successful login"
        change = _found(docs, "110113", "110131", "0")[0]
        assert change.find("ActiveParticipant").get("UserID") == "admin"
        assert detail(change) == "add senders[1]"
        # a report delivered to Orthanc
        storescu(series, site.port)
        site.wait_state(series_uid_of(series), SeriesState.DELIVERED)
        wait_for(lambda: _found(receiver.messages(), "110104", None, "0"), timeout=30,
                 what="DICOM Instances Transferred for the delivered report")
        sent = _found(receiver.messages(), "110104", None, "0")[0]
        study = sent.find("ParticipantObjectIdentification")
        first = pydicom.dcmread(next(iter(sorted(series.glob("*.dcm")))),
                                stop_before_pixels=True)
        assert study.get("ParticipantObjectID") == first.StudyInstanceUID
        roles = {p.find("RoleIDCode").get("csd-code"): p for p in sent.findall(
            "ActiveParticipant")}
        assert roles["110152"].get("AlternativeUserID") == "AETITLES=ORTHANC"
        assert roles["110153"].get("AlternativeUserID") == f"AETITLES={NODE_AE}"
        # no patient data anywhere: the synthetic patient's name and ID are not sent
        raw = b"".join(receiver.datagrams)
        for value in (str(first.PatientName), str(first.PatientID)):
            assert value.encode() not in raw
    finally:
        site.stop()
        receiver.close()


def test_the_file_target_takes_the_node_and_the_shell(tmp_path: Path) -> None:
    site = NodeSite(tmp_path / "home", None)
    _with_audit(site, '[audit]\ntarget = "file"\n')
    log = site.home / "audit" / "atna.log"

    def lines() -> list[Any]:
        return [valid(line) for line in log.read_bytes().splitlines()] if log.exists() else []

    site.start()
    try:
        assert _echo(site, "INTRUDER") != 0
        assert _call(site, "GET", "/api/config/senders", user=("nobody", "x" * 12))[0] == 401
        wait_for(lambda: len(lines()) >= 2, timeout=30, what=f"two audit lines in {log}")
        # a change from the shell (qcnode config) is audited too
        run = _qcnode(site, "config", "add", "senders", "ae_title=CT3", "host=127.0.0.1")
        assert run.returncode == 0, run.stderr
        wait_for(lambda: _found(lines(), "110113", "110131", "0"), timeout=30,
                 what="the shell's change in the audit file")
        docs = lines()
        assert _found(docs, "110113", "110126", "4")
        assert [d.find("ActiveParticipant").get("UserID")
                for d in _found(docs, "110114", "110122", "4")] == ["nobody"]
        shell = _found(docs, "110113", "110131", "0")[0]
        assert shell.find("ActiveParticipant").get("UserID").endswith("@shell")
        assert oct(os.stat(log).st_mode & 0o777) == "0o640"
    finally:
        site.stop()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
