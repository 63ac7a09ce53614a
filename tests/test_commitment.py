"""Storage Commitment with a real Orthanc: reports to qcnode's main listener (a ``qcnode
serve`` process, recording in the ledger) and to a separate commitment port, the words
said when no report comes, and ``qcnode echo`` checking the commitment path."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.filereader import read_dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role

from node.config import ConfigError, DestinationSettings, load_settings
from node.ledger import ConfirmedBy, DeliveryState, Ledger, SeriesState
from node.receive import dimse
from node.receive.scp_commit import STATUS_INVALID_ARGUMENT_VALUE
from node.send.scu import DeliveryError, Reason, deliver
from node.send.scu_commit import (
    EVENT_ALL_COMMITTED,
    STORAGE_COMMITMENT_PUSH_MODEL,
    STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
)
from tests.support.e2e import NodeSite, series_uid_of, storescu, synth_series
from tests.support.net import free_port
from tests.support.node import RunningNode, running_node
from tests.support.orthanc import Orthanc

NODE_AE = "QCNODE"
#: Orthanc's modality table also names an AE whose port nobody listens on.
LOST_AE = "LOSTNODE"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"


@dataclass
class Site:
    pacs: Orthanc
    node: RunningNode
    lost_port: int
    commit_port: int

    def dest(self, **kw: object) -> DestinationSettings:
        base: dict[str, object] = {"name": "pacs", "ae_title": self.pacs.ae_title,
                                   "host": "127.0.0.1", "port": self.pacs.dicom_port,
                                   "confirm": "commitment", "timeout": 10.0}
        return DestinationSettings.model_validate({**base, **kw})


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """Orthanc sends QCNODE's reports to qcnode's main port. The node admits only CT01 as
    a sender: Orthanc gets in as a commitment destination, not through the allow-list."""
    tmp = tmp_path_factory.mktemp("commitment")
    node_port, lost_port, commit_port = free_port(), free_port(), free_port()
    pacs = Orthanc(tmp / "orthanc", {NODE_AE: node_port, LOST_AE: lost_port,
                                     "PORTNODE": commit_port})
    pacs.start()
    try:
        tables: dict[str, list[dict[str, object]]] = {
            "senders": [{"ae_title": "CT01", "host": "127.0.0.1"}],
            "destinations": [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                              "port": pacs.dicom_port, "confirm": "commitment",
                              "timeout": 10.0}],
        }
        with running_node(tmp, tables=tables, port=node_port) as node:
            yield Site(pacs, node, lost_port, commit_port)
    finally:
        pacs.stop()


def _fresh_ct() -> Dataset:
    ds = copy.deepcopy(pydicom.dcmread(str(get_testdata_file("CT_small.dcm"))))
    ds.SOPInstanceUID = generate_uid()
    return ds


def test_report_to_main_listener_reaches_the_delivering_process(site: Site) -> None:
    """The listener (``qcnode serve``) records the report; this process, delivering like
    an io worker, finds it in the ledger. Before: Orthanc was rejected by the allow-list
    and the delivery waited 10 s for nothing."""
    ds = _fresh_ct()
    with Ledger(site.node.ledger_url) as ledger:
        receipt = deliver([ds], site.dest(), node_ae=NODE_AE, bind_host="127.0.0.1",
                          node_port=site.node.port, ledger=ledger)
        assert receipt.confirmation == "commitment"
        assert receipt.transaction_uid is not None
        report = ledger.commitment_report(receipt.transaction_uid)
    assert report is not None and report.event_type == EVENT_ALL_COMMITTED
    assert report.committed == {str(ds.SOPInstanceUID)}
    assert receipt.seconds < 5.0
    job = site.pacs.commitment_job(receipt.transaction_uid)
    assert job["State"] == "Success", job.get("ErrorDetails")  # our N-EVENT-REPORT-RSP


def test_commitment_port_configured_but_report_sent_to_main_port(site: Site) -> None:
    """The issue's case: qcnode listens on a commitment port, Orthanc reports to qcnode's
    main AE/port. Before: rejected by the allow-list, the delivery waited out its timeout."""
    dest = site.dest(confirm="auto", commitment_port=free_port())
    with Ledger(site.node.ledger_url) as ledger:
        receipt = deliver([_fresh_ct()], dest, node_ae=NODE_AE, bind_host="127.0.0.1",
                          node_port=site.node.port, ledger=ledger)
    assert receipt.confirmation == "commitment"
    assert receipt.seconds < 5.0


def test_response_to_an_event_report_names_the_event() -> None:
    """N-EVENT-REPORT-RSP (PS3.7 Table 10.3-1) as DCMTK reads it: field 0x8100, the
    instance and the Event Type ID echoed, Status."""
    request = dimse.Command(dimse.N_EVENT_REPORT_RQ, 7, STORAGE_COMMITMENT_PUSH_MODEL,
                            STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE, True, EVENT_ALL_COMMITTED)
    rsp = read_dataset(BytesIO(dimse.response(request, STATUS_INVALID_ARGUMENT_VALUE)),
                       is_implicit_VR=True, is_little_endian=True)
    assert rsp.CommandField == dimse.N_EVENT_REPORT_RSP
    assert rsp.MessageIDBeingRespondedTo == 7
    assert rsp.AffectedSOPInstanceUID == STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE
    assert rsp.EventTypeID == EVENT_ALL_COMMITTED
    assert rsp.Status == STATUS_INVALID_ARGUMENT_VALUE


def test_no_report_says_who_should_call_where(site: Site, tmp_path: Path) -> None:
    """Orthanc sends LOSTNODE's reports to a port nobody listens on."""
    with Ledger.open(f"sqlite:///{tmp_path / 'ledger.sqlite3'}") as ledger, \
            pytest.raises(DeliveryError) as info:
        deliver([_fresh_ct()], site.dest(timeout=2.0), node_ae=LOST_AE,
                bind_host="127.0.0.1", node_port=site.lost_port, ledger=ledger)
    assert info.value.failure.reason is Reason.NOT_CONFIRMED
    assert str(info.value.failure.detail) == (
        f"no N-EVENT-REPORT from ORTHANC within 2 s: check that ORTHANC sends its storage "
        f"commitment reports to {LOST_AE} at 127.0.0.1:{site.lost_port}")


def test_separate_commitment_port_still_works(site: Site) -> None:
    dest = site.dest(confirm="auto", commitment_port=site.commit_port,
                     calling_ae_title="PORTNODE")
    receipt = deliver([_fresh_ct()], dest, node_ae=NODE_AE, bind_host="127.0.0.1",
                      node_port=site.node.port)
    assert receipt.confirmation == "commitment"
    assert receipt.transaction_uid is not None
    job = site.pacs.commitment_job(receipt.transaction_uid)
    assert job["State"] == "Success", job.get("ErrorDetails")


def _report_as(ae_title: str, port: int, transaction_uid: str) -> tuple[bool, int | None]:
    """Send an N-EVENT-REPORT to qcnode as a PACS would: (associated, status)."""
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL)
    ae.add_requested_context(CT_IMAGE)
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    role = build_role(STORAGE_COMMITMENT_PUSH_MODEL, scp_role=True)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE, ext_neg=[role])
    if not assoc.is_established:
        return False, None
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        assert accepted == {STORAGE_COMMITMENT_PUSH_MODEL, VERIFICATION}  # no storage
        (commit,) = [cx for cx in assoc.accepted_contexts
                     if cx.abstract_syntax == STORAGE_COMMITMENT_PUSH_MODEL]
        assert commit.as_scp and not commit.as_scu  # the SCP role, answered (D.3.3.4)
        info = Dataset()
        info.TransactionUID = transaction_uid
        info.ReferencedSOPSequence = []
        status, _ = assoc.send_n_event_report(
            info, EVENT_ALL_COMMITTED, STORAGE_COMMITMENT_PUSH_MODEL,
            STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE)
        return True, int(status.Status) if status and "Status" in status else None
    finally:
        assoc.release()


def test_listener_admits_destinations_for_commitment_only(site: Site) -> None:
    admitted, status = _report_as("ORTHANC", site.node.port, generate_uid())
    assert admitted and status == STATUS_INVALID_ARGUMENT_VALUE  # not our transaction
    assert _report_as("STRANGER", site.node.port, generate_uid()) == (False, None)


def _echo(site: Site, tmp_path: Path, node: tuple[str, int, Path] | None = None,
          **dest: object) -> subprocess.CompletedProcess[str]:
    ae, port, home = node or (NODE_AE, site.node.port, site.node.home)
    cfg = tmp_path / "echo.toml"
    lines = [f'[node]\nae_title = "{ae}"\nport = {port}\n'
             f'home = "{home}"\n\n[[destinations]]\nname = "pacs"\n'
             f'ae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {site.pacs.dicom_port}\n']
    lines += [f"{k} = {v!r}\n".replace("'", '"') for k, v in dest.items()]
    cfg.write_text("".join(lines))
    return subprocess.run([sys.executable, "-m", "node.cli", "echo", "--config", str(cfg),
                           "pacs"], check=False, capture_output=True, text=True, timeout=90)


def test_echo_checks_the_commitment_path(site: Site, tmp_path: Path) -> None:
    """Through ``qcnode serve``'s listener, then through a commitment port, then a route
    Orthanc does not send to: the echo says so in words."""
    main = _echo(site, tmp_path, confirm="commitment", timeout=10.0)
    assert main.returncode == 0, main.stdout + main.stderr
    assert "storage commitment: report from ORTHANC arrived at QCNODE at" in main.stdout
    port = _echo(site, tmp_path, confirm="auto", commitment_port=site.commit_port,
                 calling_ae_title="PORTNODE", timeout=10.0)
    assert port.returncode == 0, port.stdout + port.stderr
    assert f"arrived at PORTNODE at 127.0.0.1:{site.commit_port}" in port.stdout
    lost = _echo(site, tmp_path, confirm="auto", commitment_port=free_port(),
                 calling_ae_title=LOST_AE, timeout=2.0)
    assert lost.returncode == 1
    assert (f"no N-EVENT-REPORT from ORTHANC within 2 s: check that ORTHANC sends its "
            f"storage commitment reports to {LOST_AE} at") in lost.stdout


def test_pipeline_delivery_confirmed_through_the_main_listener(tmp_path: Path) -> None:
    """The whole node: the embedded io worker (a subprocess) delivers the SR and asks
    for commitment; Orthanc reports to ``qcnode serve``'s listener; the worker finds the
    report in the ledger and records the delivery confirmed by commitment."""
    pacs = Orthanc(tmp_path / "orthanc")
    site = NodeSite(tmp_path / "home", pacs)
    site.config.write_text(site.config.read_text().replace(
        'confirm = "find"', 'confirm = "commitment"'))
    site.settings = load_settings(site.config)
    pacs.reconfigure(peers={NODE_AE: site.port})
    try:
        pacs.start()
        site.start()
        series = synth_series(tmp_path / "synth", slices=8, size=128)
        storescu(series, site.port)
        uid = series_uid_of(series)
        site.wait_state(uid, SeriesState.DELIVERED)
        (delivery,) = site.ledger.deliveries_of(site.job(uid).id)
        assert delivery.state == DeliveryState.CONFIRMED
        assert delivery.confirmed_by == ConfirmedBy.COMMITMENT
        assert '"event": "commitment report received"' in site.log("serve", 1 << 20)
    finally:
        site.stop()
        pacs.stop()


def test_config_refuses_a_report_route_the_listener_cannot_take(tmp_path: Path) -> None:
    """Reports for a calling AE of its own would reach the main listener addressed to an
    AE title that is not the node's (rejected): said at load time, with the key."""
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
                   'port = 4242\nconfirm = "commitment"\ncalling_ae_title = "OTHER"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert "set commitment_port or drop calling_ae_title" in str(info.value)


def test_ledger_keeps_reports_per_transaction_and_peer(ledger_url: str) -> None:
    """SQLite and PostgreSQL: a report counts only for a transaction this node asked
    that peer for; the waiting side sees it once recorded."""
    with Ledger.open(ledger_url) as ledger:
        uid = generate_uid()
        assert not ledger.record_commitment_report(uid, "ORTHANC", event_type=1,
                                                   committed=["1.2"], failed=[])
        ledger.expect_commitment(uid, "pacs", "ORTHANC")
        ledger.expect_commitment(uid, "pacs", "ORTHANC")  # a retried request: one row
        assert ledger.commitment_report(uid) is None
        assert not ledger.record_commitment_report(uid, "OTHERPACS", event_type=1,
                                                   committed=["1.2"], failed=[])
        assert ledger.record_commitment_report(uid, "ORTHANC", event_type=2,
                                               committed=["1.2"], failed=[("1.3", 0x0112)])
        report = ledger.commitment_report(uid)
    assert report is not None
    assert (report.event_type, report.committed, report.failed) == (
        2, frozenset({"1.2"}), (("1.3", 0x0112),))


def test_echo_says_when_the_listener_is_not_running(site: Site, tmp_path: Path) -> None:
    """Orthanc sends LOSTNODE's reports to LOSTNODE's port, where no node runs."""
    down = _echo(site, tmp_path, (LOST_AE, site.lost_port, tmp_path / "home"),
                 confirm="commitment", timeout=2.0)
    assert down.returncode == 1
    assert (f"to {LOST_AE} at 127.0.0.1:{site.lost_port} (nothing listens on "
            f"127.0.0.1:{site.lost_port}: is `qcnode serve` running?)") in down.stdout
