"""Faults end to end: PACS down, worker killed, node killed, permanent rejection.

Real ``qcnode serve`` processes with their embedded workers (SQLite broker), real
Orthanc, DCMTK storescu; conditions are awaited with deadlines. In every case the PACS
ends up with exactly one SR for the series, or the failure is dead-lettered, visible
in ``qcnode status`` and re-queued by ``qcnode retry``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.ledger import DeliveryState, JobState, SeriesState
from tests.support.e2e import (
    NODE_AE,
    NodeSite,
    kill_tree,
    series_uid_of,
    storescu,
    synth_series,
)
from tests.support.net import wait_for
from tests.support.orthanc import Orthanc, running_orthanc

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
TIMEOUT = 180.0


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 slices of 256²; assessing all of them takes a few seconds (a window to kill in)."""
    return synth_series(tmp_path_factory.mktemp("synth"), slices=40, size=256, seed=3)


@pytest.fixture()
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path / "orthanc", {NODE_AE: 104}) as server:
        yield server


def qcnode(site: NodeSite, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", *args, "--config",
                           str(site.config)], capture_output=True, text=True, timeout=120,
                          check=False)


def one_sr(site: NodeSite, series_uid: str) -> None:
    """The series is delivered and the PACS holds exactly one SR instance, the job's."""
    job = site.job(series_uid)
    assert job.state == JobState.DONE and job.sr_uid is not None
    assert len(site.pacs.find_sop(job.sr_uid)) == 1
    assert len(site.pacs.find_modality("SR")) == 1


def test_pacs_down_first_then_up(tmp_path: Path, pacs: Orthanc, series_dir: Path) -> None:
    pacs.stop()
    site = NodeSite(tmp_path / "home", pacs)
    try:
        site.start()
        storescu(series_dir, site.port)
        uid = series_uid_of(series_dir)
        wait_for(lambda: any(d.state == DeliveryState.FAILED
                             for j in site.ledger.jobs_of_series(uid)
                             for d in site.ledger.deliveries_of(j.id)),
                 timeout=TIMEOUT, what=f"a refused delivery attempt\n{site.logs()}")
        pacs.start()
        site.wait_state(uid, SeriesState.DELIVERED, timeout=TIMEOUT)
        one_sr(site, uid)
        (delivery,) = site.ledger.deliveries_of(site.job(uid).id)
        assert delivery.attempts >= 2
    finally:
        site.stop()


def test_worker_killed_mid_assessment(tmp_path: Path, pacs: Orthanc, series_dir: Path) -> None:
    """SIGKILL of the gpu worker (and its pool) while it assesses.

    The SQLite transport deleted the message when the worker fetched it (see
    ``test_pipeline.test_sqlite_broker_does_not_redeliver_after_sigkill``), so nothing
    comes back from the broker: the node notices the worker's death, replaces it and
    re-dispatches the assessing series from the ledger. The series is assessed a
    second time and exactly one SR arrives.
    """
    site = NodeSite(tmp_path / "home", pacs, engine='name = "physics"\nslices = 40')
    try:
        site.start()
        victim = site.embedded_worker("gpu")
        storescu(series_dir, site.port)
        uid = series_uid_of(series_dir)
        site.wait_state(uid, SeriesState.ASSESSING, timeout=TIMEOUT)
        kill_tree(victim)
        site.wait_state(uid, SeriesState.DELIVERED, timeout=TIMEOUT)
        one_sr(site, uid)
        assert site.job(uid).attempts == 2, "assessed once more after the kill"
        events = [json.loads(line) for line in site.log(chars=1_000_000).splitlines()
                  if line.startswith("{")]
        assert any(e["event"] == "worker_exited" and e["queue"] == "gpu" for e in events)
        assert any(e["event"] == "redispatched" and e["stage"] == "gpu" and e["series"] == 1
                   for e in events)
    finally:
        site.stop()


def test_node_killed_after_sr_sent_before_delivery_recorded(
        tmp_path: Path, series_dir: Path) -> None:
    """The PACS stores the SR but the node cannot confirm it; the node is then SIGKILLed.

    Orthanc first lacks qcnode in its modality table: it accepts the C-STORE
    (``DicomAlwaysAllowStore``) but refuses the confirming C-FIND, so the SR is in the
    PACS while the ledger still has the delivery unconfirmed. After ``kill -9`` and a
    restart (Orthanc now knows qcnode), the node re-sends the same SR (same UIDs, same
    content time): the PACS still holds one.
    """
    with running_orthanc(tmp_path / "orthanc", {}) as pacs:
        site = NodeSite(tmp_path / "home", pacs)
        try:
            site.start()
            storescu(series_dir, site.port)
            uid = series_uid_of(series_dir)

            def stored_unconfirmed() -> bool:
                jobs = site.ledger.jobs_of_series(uid)
                if not jobs or jobs[0].sr_uid is None:
                    return False
                failed = [d for d in site.ledger.deliveries_of(jobs[0].id)
                          if d.state == DeliveryState.FAILED]
                return bool(failed) and len(pacs.find_sop(jobs[0].sr_uid)) == 1

            wait_for(stored_unconfirmed, timeout=TIMEOUT,
                     what=f"SR stored but unconfirmed\n{site.logs()}")
            first = pacs.instance_file(pacs.find_modality("SR")[0])
            site.kill_node()
            assert site.state(uid) == SeriesState.REPORTING
            pacs.stop()
            pacs.reconfigure(peers={NODE_AE: site.port})
            pacs.start()
            site.start()
            site.wait_state(uid, SeriesState.DELIVERED, timeout=TIMEOUT)
            one_sr(site, uid)
            assert pacs.instance_file(pacs.find_modality("SR")[0]) == first
            assert "redispatched" in site.log(chars=1_000_000)
        finally:
            site.stop()


def status(site: NodeSite) -> dict[str, Any]:
    run = qcnode(site, "status", "--json")
    assert run.returncode == 0, run.stderr
    report: dict[str, Any] = json.loads(run.stdout)
    return report


def delivery_failures(site: NodeSite, job_id: int) -> list[dict[str, Any]]:
    """The ``delivery_failed`` log events of one job, oldest first (JSON log lines)."""
    events = [json.loads(line)
              for path in site.home.glob("*.log")
              for line in path.read_text(errors="replace").splitlines()
              if '"delivery_failed"' in line]
    return sorted((e for e in events if e.get("job_id") == job_id),
                  key=lambda e: str(e["timestamp"]))


def test_permanent_rejection_dead_letter_then_retry(tmp_path: Path, series_dir: Path) -> None:
    """A PACS that rejects the called AE title: dead-letter, then ``qcnode retry`` after a fix."""
    with running_orthanc(tmp_path / "orthanc", {NODE_AE: 104}, ae_title="NOTORTHANC") as pacs:
        site = NodeSite(tmp_path / "home", pacs)
        try:
            site.start()
            storescu(series_dir, site.port)
            uid = series_uid_of(series_dir)
            site.wait_state(uid, SeriesState.FAILED, timeout=TIMEOUT)
            job = site.job(uid)
            assert job.state == JobState.DEAD
            (delivery,) = site.ledger.deliveries_of(job.id)
            # No retry after a permanent failure: it is the last attempt. (A transient one
            # before it, e.g. Orthanc aborting an association request under load, is retried.)
            failures = delivery_failures(site, job.id)
            permanent = [f for f in failures if not f["transient"]]
            assert len(permanent) == 1 and failures[-1] == permanent[0], failures
            assert delivery.state == DeliveryState.DEAD
            assert delivery.attempts == len(failures) == permanent[0]["attempt"]
            report = status(site)
            (failure,) = [f for f in report["failures"] if f["destination"] == "pacs"]
            assert failure["state"] == "dead" and failure["series_instance_uid"] == uid
            assert "called AE" in failure["last_error"]
            text = qcnode(site, "status").stdout
            assert uid in text and "called AE" in text
            pacs.stop()
            pacs.reconfigure(ae_title="ORTHANC")
            pacs.start()
            run = qcnode(site, "retry", uid)
            assert run.returncode == 0, run.stderr
            assert f"re-queued {uid}" in run.stdout
            site.wait_state(uid, SeriesState.DELIVERED, timeout=TIMEOUT)
            one_sr(site, uid)
            assert status(site)["failures"] == []
            assert qcnode(site, "retry", "--failed").returncode == 1, "nothing left to retry"
        finally:
            site.stop()
