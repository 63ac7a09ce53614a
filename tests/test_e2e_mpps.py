"""MPPS end to end: DCMTK storescu → ``qcnode serve`` (60 s quiet period) → MPPS → SR in Orthanc.

The modality is DCMTK's storescu for the images and a pynetdicom SCU for the MPPS
(DCMTK 3.6.7 has no MPPS client). With a quiet period of a minute, only the ended step
can close the series this soon: COMPLETED closes it with trigger ``mpps_completed`` and
its SR is in the PACS within seconds; a step created before a restart takes its N-SET
after it, and DISCONTINUED closes the next series with ``mpps_discontinued`` (shown by
``qcnode status``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from node.config import load_settings
from node.ledger import SeriesState
from node.ledger.mpps import TRIGGER_MPPS_COMPLETED, TRIGGER_MPPS_DISCONTINUED
from node.receive.mpps import (
    ERROR_ID_MAY_NO_LONGER_BE_UPDATED,
    STATUS_NO_SUCH_SOP_INSTANCE,
    STATUS_PROCESSING_FAILURE,
    STATUS_SUCCESS,
)
from tests.support.e2e import NODE_AE, NodeSite, series_uid_of, storescu, synth_series
from tests.support.mpps import (
    PATIENT_ID,
    PATIENT_NAME,
    associate,
    complete_step,
    create_attributes,
    modality,
    set_attributes,
)
from tests.support.net import free_port, wait_for
from tests.support.orthanc import Orthanc, running_orthanc
from tests.test_e2e import check_delivered, status_json

QUIET = 60.0
#: The SR must be in the PACS well before the quiet period could have closed the series.
WITHIN = 30.0
MPPS_TOML = """
[mpps]
enabled = true
port = {port}

[[senders]]
ae_title = "SCANNER"
host = "127.0.0.1"
"""


@pytest.fixture()
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path / "orthanc", {NODE_AE: 104}) as server:
        yield server


def sop_uids(folder: Path) -> list[str]:
    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in sorted(folder.glob("*.dcm"))]


def mpps_site(home: Path, pacs: Orthanc) -> tuple[NodeSite, int]:
    site = NodeSite(home, pacs, quiet=QUIET)
    port = free_port()
    site.config.write_text(site.config.read_text() + MPPS_TOML.format(port=port))
    site.settings = load_settings(site.config)
    return site, port


def test_mpps_closes_series_without_the_quiet_period(tmp_path: Path, pacs: Orthanc) -> None:
    first = synth_series(tmp_path / "synth1", slices=12, size=256, seed=1)
    second = synth_series(tmp_path / "synth2", slices=12, size=256, seed=2)
    site, port = mpps_site(tmp_path / "home", pacs)
    try:
        site.start()
        wait_for(lambda: "mpps listening" in site.log(chars=10**8), timeout=30, what="MPPS SCP")
        # COMPLETED right after the last image: closed at once, SR delivered.
        storescu(first, site.port)
        uid = series_uid_of(first)
        sent = time.monotonic()
        step = complete_step(port, {uid: sop_uids(first)})
        check_delivered(site, uid, timeout=WITHIN)
        assert time.monotonic() - sent < WITHIN
        assert site.ledger.series_info(uid).close_trigger == TRIGGER_MPPS_COMPLETED
        # The ended step may no longer be updated; an unknown step does not exist;
        # an unknown caller is rejected. A second step starts before a restart.
        later = generate_uid()
        with modality(port) as scu:
            refused = scu.set(step, set_attributes("DISCONTINUED"))
            assert refused.Status == STATUS_PROCESSING_FAILURE
            assert refused.ErrorID == ERROR_ID_MAY_NO_LONGER_BE_UPDATED
            assert scu.set(generate_uid(), set_attributes("COMPLETED")).Status \
                == STATUS_NO_SUCH_SOP_INSTANCE
            assert scu.create(later, create_attributes()).Status == STATUS_SUCCESS
        assert associate(port, calling_ae="STRANGER").is_rejected
        site.stop()
        site.start()
        wait_for(lambda: site.log(chars=10**8).count("mpps listening") >= 2, timeout=30,
                 what="MPPS SCP after the restart")
        # After the restart: DISCONTINUED closes the next series with its trigger.
        storescu(second, site.port)
        uid2 = series_uid_of(second)
        sent = time.monotonic()
        with modality(port) as scu:
            ended = scu.set(later, set_attributes("DISCONTINUED", {uid2: sop_uids(second)}))
            assert ended.Status == STATUS_SUCCESS
        assert uid2 != uid
        site.wait_state(uid2, SeriesState.DELIVERED, timeout=WITHIN)
        assert time.monotonic() - sent < WITHIN
        report = {s["series_instance_uid"]: s for s in status_json(site)["series"]}
        assert report[uid2]["trigger"] == TRIGGER_MPPS_DISCONTINUED
        assert report[uid]["trigger"] == TRIGGER_MPPS_COMPLETED
        logs = "".join(p.read_text(errors="replace") for p in site.home.glob("*.log"))
        assert step in logs and later in logs
        assert PATIENT_NAME not in logs and PATIENT_ID not in logs
    finally:
        site.stop()
