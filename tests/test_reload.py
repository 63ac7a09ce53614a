"""SIGHUP reaches the embedded workers: a destination added to the file gets the next SR.

A real ``qcnode serve`` with its embedded Celery workers, a real Orthanc; the node starts
with no destination, the file gains one, SIGHUP; the workers are replaced warm (they
read the file), and the next series' SR is delivered to Orthanc — without a restart.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.ledger import DeliveryState, SeriesState
from tests.support.e2e import NODE_AE, NodeSite, series_uid_of, storescu, synth_series
from tests.support.net import wait_for
from tests.support.orthanc import Orthanc, running_orthanc


@pytest.fixture()
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path / "orthanc", {NODE_AE: 104}) as server:
        yield server


def test_sighup_adds_a_destination_for_the_workers(tmp_path: Path, pacs: Orthanc) -> None:
    series = synth_series(tmp_path / "synth", slices=8, size=128)
    site = NodeSite(tmp_path / "home", pacs)
    with_pacs = site.config.read_text()
    site.config.write_text(with_pacs.partition("[[destinations]]")[0])
    try:
        site.start()
        before = site.embedded_worker("io")
        site.config.write_text(with_pacs)
        assert site.serve is not None
        site.serve.send_signal(signal.SIGHUP)
        wait_for(lambda: '"config_reloaded"' in site.log(chars=100_000), timeout=30,
                 what=f"config_reloaded; log:\n{site.log()}")
        assert '"changed": ["destinations"]' in site.log(chars=100_000)

        def replaced() -> bool:
            try:
                return site.embedded_worker("io") != before
            except AssertionError:
                return False  # between the old worker's exit and the new one's start
        wait_for(replaced, timeout=60, what="the io worker replaced")

        storescu(series, site.port)
        uid = series_uid_of(series)
        site.wait_state(uid, SeriesState.DELIVERED, timeout=180)
        job = site.job(uid)
        (delivery,) = site.ledger.deliveries_of(job.id)
        assert (delivery.destination, delivery.state) == ("pacs", DeliveryState.CONFIRMED)
        assert job.sr_uid is not None
        assert site.sr_in_pacs(job.sr_uid).SeriesInstanceUID != uid  # the SR, in Orthanc
    finally:
        site.stop()
