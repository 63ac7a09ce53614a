"""``qcnode serve`` as a process: access control, watermark, crash recovery, config, stop."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from node.ledger import Ledger, SeriesState
from tests.support.dcmtk import echoscu, storescu, storescu_popen, successes, write_ct_series
from tests.support.net import free_port, wait_for
from tests.support.node import (
    REPO,
    RunningNode,
    default_sections,
    running_node,
    start_node,
    write_config,
)


def test_unknown_calling_ae_host_or_called_ae_rejected(tmp_path: Path, dcmtk: Path) -> None:
    senders = {"senders": [{"ae_title": "MODALITY1", "host": "127.0.0.1"},
                           {"ae_title": "REMOTE", "host": "10.1.0.0/16"}]}
    with running_node(tmp_path, tables=senders) as node:
        assert echoscu(node.port, aet="MODALITY1").returncode == 0
        unknown_ae = echoscu(node.port, aet="STRANGER")
        assert unknown_ae.returncode != 0
        assert "Calling AE Title Not Recognized" in unknown_ae.stdout + unknown_ae.stderr
        wrong_host = echoscu(node.port, aet="REMOTE")  # allowed only from 10.1/16
        assert "Calling AE Title Not Recognized" in wrong_host.stdout + wrong_host.stderr
        wrong_called = echoscu(node.port, aet="MODALITY1", aec="OTHERNODE")
        assert "Called AE Title Not Recognized" in wrong_called.stdout + wrong_called.stderr
        assert echoscu(node.port, aet="MODALITY1").returncode == 0  # still serving


def test_disk_over_watermark_answers_out_of_resources(tmp_path: Path, dcmtk: Path) -> None:
    files = write_ct_series(tmp_path / "ct", 2)
    extra = {"spool": {"min_free_bytes": 2**62}}
    with running_node(tmp_path, extra=extra) as node:
        result = storescu(node.port, files)
        output = result.stdout + result.stderr
        assert "Store Response (Refused: OutOfResources)" in output, output
        assert '"status": "0xA700"' in node.log_text() or "spool full" in node.log_text()
        assert not list(node.spool.rglob("*.dcm"))
        assert not [p for p in (node.home / "tmp").iterdir() if p.is_file()]
        assert echoscu(node.port).returncode == 0


def test_kill_during_transfer_then_restart_recovers(tmp_path: Path, dcmtk: Path) -> None:
    files = write_ct_series(tmp_path / "ct", 300)
    series_uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    home = tmp_path / "home"
    port = free_port()
    config = write_config(tmp_path / "qcnode.toml", default_sections(home, port))
    node = start_node(config, home, tmp_path / "node.log")
    sender = storescu_popen(node.port, files)
    with Ledger(node.ledger_url) as ledger:
        wait_for(lambda: len(ledger.instance_relpaths(series_uid)) >= 40, timeout=120,
                 what="transfer under way")
        node.kill()  # SIGKILL mid-transfer
        output, _ = sender.communicate(timeout=60)
        stored_ok = successes(output)
        assert 40 <= len(stored_ok) < 300, output[-2000:]
        restarted = start_node(config, home, tmp_path / "node2.log")
        try:
            uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                    for f in stored_ok}
            for uid in uids:
                assert ledger.versions_of(uid), f"{uid} got Success but is not in the ledger"
                assert list(home.joinpath("spool").rglob(f"{uid}.dcm")), f"{uid} not spooled"
            info = wait_for(
                lambda: (i := ledger.series_info(series_uid)).state != SeriesState.RECEIVING
                and i, timeout=60, what="series closed after restart",
            )
            assert info.instance_count >= len(uids)
            assert not [p for p in (home / "tmp").iterdir() if p.is_file()]
        finally:
            assert restarted.stop() == 0


def test_invalid_config_refuses_to_start(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[node]\nport = 70000\nae_title = "THIS AE TITLE IS TOO LONG"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", "serve", "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 1
    assert "node.port" in proc.stderr and "node.ae_title" in proc.stderr
    assert "listening on" not in proc.stdout


def test_sigterm_stops_cleanly(tmp_path: Path, dcmtk: Path) -> None:
    files = write_ct_series(tmp_path / "ct", 5)
    with running_node(tmp_path) as node:
        assert storescu(node.port, files).returncode == 0
        assert node.stop() == 0
        assert not [p for p in (node.home / "tmp").iterdir() if p.is_file()]
        assert len(list(node.spool.rglob("*.dcm"))) == 5
        assert echoscu(node.port).returncode != 0  # no longer listening


def _events(node: RunningNode, name: str) -> list[dict[str, Any]]:
    found = []
    for line in node.log_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == name:
            found.append(entry)
    return found


def test_sighup_reloads_senders_without_dropping_associations(
    tmp_path: Path, dcmtk: Path
) -> None:
    """A sender not yet allowed is rejected; the file is edited and SIGHUP sent while
    another association is open; the new sender is admitted, the open association
    (whose sender the new file no longer lists) completes its stores, and the key
    that cannot change at run time is named. An invalid file then leaves the node
    running with what it had."""
    files = write_ct_series(tmp_path / "ct", 4)
    senders = {"senders": [{"ae_title": "MODALITY1", "host": "127.0.0.1"}]}
    with running_node(tmp_path, tables=senders) as node:
        refused = echoscu(node.port, aet="NEWCT")
        assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
        ae = AE(ae_title="MODALITY1")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="QCNODE")
        assert assoc.is_established
        try:
            assert assoc.send_c_store(pydicom.dcmread(files[0])).Status == 0x0000

            sections = default_sections(node.home, node.port)
            sections["node"]["max_pdu"] = 65536  # bound at start: needs a restart
            write_config(node.config, sections,
                         {"senders": [{"ae_title": "NEWCT", "host": "127.0.0.1"}]})
            node.proc.send_signal(signal.SIGHUP)
            (reloaded,) = wait_for(lambda: _events(node, "config_reloaded"), timeout=30,
                                   what="config_reloaded")
            assert reloaded["changed"] == ["senders"]
            assert reloaded["restart_needed"] == ["node.max_pdu"]

            for path in files[1:]:
                assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
        finally:
            assoc.release()
        assert echoscu(node.port, aet="NEWCT").returncode == 0
        gone = echoscu(node.port, aet="MODALITY1")
        assert "Calling AE Title Not Recognized" in gone.stdout + gone.stderr

        node.config.write_text('[node]\nport = "x"\n[[senders]]\nhots = "127.0.0.1"\n')
        node.proc.send_signal(signal.SIGHUP)
        (failed,) = wait_for(lambda: _events(node, "config_reload_failed"), timeout=30,
                             what="config_reload_failed")
        assert any("node.port" in e for e in failed["errors"])
        assert any("did you mean 'host'" in e for e in failed["errors"])
        assert node.proc.poll() is None
        assert echoscu(node.port, aet="NEWCT").returncode == 0  # the reloaded list stays

        series = pydicom.dcmread(files[0]).SeriesInstanceUID
        with Ledger.open(node.ledger_url) as ledger:
            wait_for(lambda: ledger.series_info(series).instance_count == 4, timeout=30,
                     what="the four images of the open association in the ledger")
    assert node.proc.returncode == 0


def test_systemd_units_reload_with_sighup() -> None:
    """``systemctl reload`` sends what the test above shows ``serve`` handling."""
    units = REPO / "deploy" / "systemd"
    assert "ExecReload=/bin/kill -HUP $MAINPID" in (units / "qcnode.service").read_text()
    worker = (units / "qcnode-worker@.service").read_text()
    check = worker.index("ExecReload=/opt/qcnode/.venv/bin/qcnode config check")
    assert check < worker.index("ExecReload=/bin/kill -HUP $MAINPID")
