"""``qcnode serve`` as a process: access control, watermark, crash recovery, config, stop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom

from node.ledger import Ledger, SeriesState
from tests.support.dcmtk import echoscu, storescu, storescu_popen, successes, write_ct_series
from tests.support.net import free_port, wait_for
from tests.support.node import REPO, default_sections, running_node, start_node, write_config


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
