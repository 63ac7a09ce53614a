"""MPPS SCP (PS3.4 Annex F.7) and closing series by ended steps.

A real pynetdicom SCU plays the modality (DCMTK 3.6.7 has no MPPS client; its
``echoscu`` checks admission) against :class:`node.receive.mpps.MppsServer` on a free port,
with a real ledger (SQLite; the ledger-only tests also on PostgreSQL) and the real
:class:`~node.store.completion.CompletionMonitor`, passes run with ``check_once``.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from structlog.testing import capture_logs

from node.config import CompletionSettings, MppsSettings, SenderSettings, Settings
from node.ledger import Ledger, SeriesState
from node.ledger.models import utcnow
from node.ledger.mpps import (
    OUTCOME_ALREADY_CLOSED,
    PPS_COMPLETED,
    PPS_IN_PROGRESS,
    TRIGGER_MPPS_COMPLETED,
    TRIGGER_MPPS_DISCONTINUED,
    PerformedSeries,
    StepChange,
)
from node.receive.mpps import (
    COMMENT_MAY_NO_LONGER_BE_UPDATED,
    ERROR_ID_MAY_NO_LONGER_BE_UPDATED,
    STATUS_DUPLICATE_SOP_INSTANCE,
    STATUS_INVALID_ATTRIBUTE_VALUE,
    STATUS_MISSING_ATTRIBUTE,
    STATUS_NO_SUCH_SOP_INSTANCE,
    STATUS_PROCESSING_FAILURE,
    STATUS_SUCCESS,
    MppsServer,
)
from node.status import series_header, series_row
from node.store.completion import CompletionMonitor
from tests.support.mpps import (
    MPPS_AE,
    PATIENT_ID,
    PATIENT_NAME,
    associate,
    complete_step,
    create_attributes,
    modality,
    set_attributes,
)
from tests.support.net import free_port
from tests.test_ledger import make_record

SERIES = "1.2.3.4"
QUIET = 60.0  # long: only an MPPS can close a series within a test


def settings(port: int, senders: tuple[SenderSettings, ...] | None = None) -> Settings:
    base = Settings(
        completion=CompletionSettings(quiet_seconds=QUIET, poll_seconds=0.05),
        mpps=MppsSettings(enabled=True, port=port),
    )
    return base if senders is None else base.model_copy(update={"senders": senders})


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    with Ledger.open(ledger_url) as led:
        yield led


@pytest.fixture
def sqlite_ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger.open(f"sqlite:///{tmp_path / 'ledger.sqlite3'}") as led:
        yield led


@pytest.fixture
def server(sqlite_ledger: Ledger) -> Iterator[MppsServer]:
    with MppsServer(settings(free_port()), sqlite_ledger) as scp:
        yield scp


def receive(ledger: Ledger, count: int, series: str = SERIES, *, first: int = 0,
            close: bool = True, assoc: str = "assoc-1") -> list[str]:
    """Record ``count`` instances of ``series`` as the listener would; their UIDs."""
    ledger.association_opened(assoc, "SCANNER", "127.0.0.1")
    records = [make_record(i, series, assoc=assoc) for i in range(first, first + count)]
    for rec in records:
        ledger.record_instance(rec)
    if close:
        ledger.association_closed(assoc)
    return [r.sop_instance_uid for r in records]


def monitor(ledger: Ledger, port: int = 11113) -> CompletionMonitor:
    return CompletionMonitor(ledger, settings(port), lambda uid, trigger: None,
                             replay_complete=False)


# Closing by an ended step, through the SCP -------------------------------------------
def test_completed_step_closes_its_series_at_once(sqlite_ledger: Ledger,
                                                  server: MppsServer) -> None:
    """Quiet period 60 s: COMPLETED listing every image received closes it now."""
    sops = receive(sqlite_ledger, 5)
    other = receive(sqlite_ledger, 2, "1.2.3.5", assoc="assoc-2")
    watch = monitor(sqlite_ledger)
    assert watch.check_once() == []  # the quiet period alone would wait a minute
    step = complete_step(server.address[1], {SERIES: sops})
    assert watch.check_once() == [(SERIES, TRIGGER_MPPS_COMPLETED)]
    info = sqlite_ledger.series_info(SERIES)
    assert info.state == SeriesState.COMPLETE and info.close_trigger == TRIGGER_MPPS_COMPLETED
    assert any(e.kind == "mpps" and e.detail == f"step {step}"
               for e in sqlite_ledger.series_history(SERIES))
    assert sqlite_ledger.series_info("1.2.3.5").state == SeriesState.RECEIVING, other
    (ref,) = (sqlite_ledger.mpps_step(step) or pytest.fail("step not kept")).series
    assert ref.outcome == TRIGGER_MPPS_COMPLETED and ref.sop_uids == tuple(sorted(sops))


def test_series_closes_when_the_last_listed_image_arrives(sqlite_ledger: Ledger,
                                                          server: MppsServer) -> None:
    """The step lists 4 images, 3 are in: not closed; the 4th arrives: closed, even
    with its association still open."""
    sops = receive(sqlite_ledger, 3, close=False)
    listed = [*sops, f"{SERIES}.3"]
    complete_step(server.address[1], {SERIES: listed})
    watch = monitor(sqlite_ledger)
    assert watch.check_once() == []
    receive(sqlite_ledger, 1, first=3, close=False)
    assert watch.check_once() == [(SERIES, TRIGGER_MPPS_COMPLETED)]


def test_series_listed_at_creation_close_on_a_bare_status_set(sqlite_ledger: Ledger,
                                                              server: MppsServer) -> None:
    """An N-SET without a Performed Series Sequence keeps the N-CREATE's list."""
    sops = receive(sqlite_ledger, 2)
    step = generate_uid()
    with modality(server.address[1]) as scu:
        assert scu.create(step, create_attributes(series={SERIES: sops})).Status \
            == STATUS_SUCCESS
        assert monitor(sqlite_ledger).check_once() == []  # IN PROGRESS closes nothing
        assert scu.set(step, set_attributes("COMPLETED")).Status == STATUS_SUCCESS
    assert monitor(sqlite_ledger).check_once() == [(SERIES, TRIGGER_MPPS_COMPLETED)]


def test_step_listing_no_images_waits_for_the_senders(sqlite_ledger: Ledger,
                                                      server: MppsServer) -> None:
    receive(sqlite_ledger, 3, close=False)
    complete_step(server.address[1], {SERIES: []})
    watch = monitor(sqlite_ledger)
    assert watch.check_once() == []
    sqlite_ledger.association_closed("assoc-1")
    assert watch.check_once() == [(SERIES, TRIGGER_MPPS_COMPLETED)]


def test_discontinued_step_closes_with_its_trigger(sqlite_ledger: Ledger,
                                                   server: MppsServer) -> None:
    sops = receive(sqlite_ledger, 2)
    complete_step(server.address[1], {SERIES: sops}, status="DISCONTINUED")
    assert monitor(sqlite_ledger).check_once() == [(SERIES, TRIGGER_MPPS_DISCONTINUED)]
    assert sqlite_ledger.series_info(SERIES).close_trigger == TRIGGER_MPPS_DISCONTINUED


def test_step_for_a_series_never_received_is_harmless(sqlite_ledger: Ledger,
                                                      server: MppsServer) -> None:
    """Nothing closes; if the series turns up later, it closes once whole."""
    receive(sqlite_ledger, 2)
    complete_step(server.address[1], {"9.9.9": ["9.9.9.1", "9.9.9.2"]})
    watch = monitor(sqlite_ledger)
    assert watch.check_once() == []
    assert sqlite_ledger.series_info(SERIES).state == SeriesState.RECEIVING
    receive(sqlite_ledger, 1, "9.9.9", first=1, assoc="assoc-9")
    assert watch.check_once() == []
    receive(sqlite_ledger, 1, "9.9.9", first=2, assoc="assoc-10")
    assert watch.check_once() == [("9.9.9", TRIGGER_MPPS_COMPLETED)]


# Ledger: persistence, settling, both databases ------------------------------------
def test_step_outlives_the_ledger_connection(ledger_url: str) -> None:
    """A step created before a restart takes its N-SET after it."""
    with Ledger.open(ledger_url) as led:
        assert led.mpps_create("1.9.1", "SCANNER", PPS_IN_PROGRESS)
        assert not led.mpps_create("1.9.1", "SCANNER", PPS_IN_PROGRESS)
    with Ledger.open(ledger_url) as led:
        ref = PerformedSeries(SERIES, (f"{SERIES}.0",))
        assert led.mpps_set("1.9.1", PPS_COMPLETED, [ref]) == StepChange.UPDATED
        assert led.mpps_set("1.9.1", PPS_COMPLETED, None) == StepChange.FINAL
        assert led.mpps_set("1.9.2", PPS_COMPLETED, None) == StepChange.NO_SUCH_STEP
        step = led.mpps_step("1.9.1")
        assert step is not None and step.status == PPS_COMPLETED and step.ended_at
        assert [s.series_uid for s in step.series] == [SERIES]
        assert led.mpps_due() == {}  # the series has not arrived
        receive(led, 1, close=False)
        (due,) = led.mpps_due().values()
        assert (due.series_uid, due.trigger, due.step_uids) \
            == (SERIES, TRIGGER_MPPS_COMPLETED, ("1.9.1",))
        assert led.close_series_by_mpps(due, 1)
        assert led.mpps_due() == {}


def test_step_ending_after_the_quiet_period_is_settled(ledger: Ledger) -> None:
    sops = receive(ledger, 2)
    watch = monitor(ledger)
    assert watch.check_once(now=utcnow() + dt.timedelta(seconds=QUIET + 1)) \
        == [(SERIES, "quiet")]
    ledger.mpps_create("1.9.3", "SCANNER", PPS_IN_PROGRESS)
    ledger.mpps_set("1.9.3", PPS_COMPLETED, [PerformedSeries(SERIES, tuple(sops))])
    step = ledger.mpps_step("1.9.3")
    assert step is not None and step.series[0].outcome == OUTCOME_ALREADY_CLOSED
    assert ledger.mpps_due() == {}


def test_restart_between_create_and_set_through_the_scp(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    step_uid = generate_uid()
    with Ledger.open(url) as led, MppsServer(settings(free_port()), led) as scp, \
            modality(scp.address[1]) as scu:
        assert scu.create(step_uid, create_attributes()).Status == STATUS_SUCCESS
    with Ledger.open(url) as led, MppsServer(settings(free_port()), led) as scp:
        sops = receive(led, 2)
        with modality(scp.address[1]) as scu:
            reply = scu.set(step_uid, set_attributes("COMPLETED", {SERIES: sops}))
        assert reply.Status == STATUS_SUCCESS
        assert monitor(led).check_once() == [(SERIES, TRIGGER_MPPS_COMPLETED)]


# Statuses (PS3.4 F.7.2) ----------------------------------------------------------------
def test_statuses(server: MppsServer) -> None:
    step = generate_uid()
    with modality(server.address[1]) as scu:
        assert scu.create(step, create_attributes("COMPLETED")).Status \
            == STATUS_INVALID_ATTRIBUTE_VALUE
        no_status = create_attributes()
        del no_status.PerformedProcedureStepStatus
        assert scu.create(step, no_status).Status == STATUS_MISSING_ATTRIBUTE
        assert scu.create(step, create_attributes()).Status == STATUS_SUCCESS
        assert scu.create(step, create_attributes()).Status == STATUS_DUPLICATE_SOP_INSTANCE
        assert scu.set(generate_uid(), set_attributes("COMPLETED")).Status \
            == STATUS_NO_SUCH_SOP_INSTANCE
        assert scu.set(step, set_attributes("DONE")).Status == STATUS_INVALID_ATTRIBUTE_VALUE
        bad = set_attributes("COMPLETED", {"1.2.x": []})
        assert scu.set(step, bad).Status == STATUS_INVALID_ATTRIBUTE_VALUE
        assert scu.set(step, set_attributes("IN PROGRESS")).Status == STATUS_SUCCESS
        assert scu.set(step, set_attributes("COMPLETED")).Status == STATUS_SUCCESS
        for again in ("COMPLETED", "DISCONTINUED", "IN PROGRESS", None):
            refused = scu.set(step, set_attributes(again, {SERIES: []}))
            assert refused.Status == STATUS_PROCESSING_FAILURE
            assert refused.ErrorID == ERROR_ID_MAY_NO_LONGER_BE_UPDATED
            assert refused.ErrorComment == COMMENT_MAY_NO_LONGER_BE_UPDATED


def test_scp_assigns_a_uid_when_the_modality_gives_none(server: MppsServer,
                                                        sqlite_ledger: Ledger) -> None:
    with capture_logs() as logs, modality(server.address[1]) as scu:
        status, _ = scu.assoc.send_n_create(create_attributes(), "1.2.840.10008.3.1.2.3.3")
    assert status.Status == STATUS_SUCCESS
    (created,) = [e for e in logs if e["event"] == "mpps step created"]
    assert sqlite_ledger.mpps_step(created["step_uid"]) is not None


# Admission ----------------------------------------------------------------------------
def test_unknown_caller_is_rejected(sqlite_ledger: Ledger, dcmtk: Path) -> None:
    senders = (SenderSettings(ae_title="SCANNER", host="127.0.0.1"),)
    with MppsServer(settings(free_port(), senders), sqlite_ledger) as scp:
        port = scp.address[1]
        stranger = associate(port, calling_ae="STRANGER")
        assert stranger.is_rejected and not stranger.is_established
        wrong_called = associate(port, called_ae="NOT_MPPS")
        assert wrong_called.is_rejected
        with modality(port) as scu:
            assert scu.create(generate_uid(), create_attributes()).Status == STATUS_SUCCESS
        # DCMTK's echoscu: the same admission for a C-ECHO.
        echo = [str(dcmtk / "echoscu"), "-aec", MPPS_AE, "127.0.0.1", str(port)]
        assert subprocess.run([*echo, "-aet", "SCANNER"], capture_output=True,
                              timeout=60, check=False).returncode == 0
        refused = subprocess.run([*echo, "-aet", "STRANGER"], capture_output=True,
                                 text=True, timeout=60, check=False)
        assert refused.returncode != 0
        assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
        scp.use_settings(settings(port, (SenderSettings(ae_title="*", host="127.0.0.1"),)))
        assert associate(port, calling_ae="STRANGER").is_established  # reloaded senders


def test_no_patient_data_in_logs(server: MppsServer, sqlite_ledger: Ledger) -> None:
    sops = receive(sqlite_ledger, 2)
    with capture_logs() as logs:
        step = complete_step(server.address[1], {SERIES: sops})
        with modality(server.address[1]) as scu:
            scu.set(step, set_attributes("COMPLETED"))
            scu.create(generate_uid(), create_attributes("COMPLETED"))
    text = repr(logs)
    assert step in text and "mpps step updated" in text
    for phi in (PATIENT_NAME, PATIENT_ID, "Mppstest", "ACC-MPPS-1", "19700101"):
        assert phi not in text


def test_status_listing_keeps_its_columns_for_mpps_triggers() -> None:
    """``qcnode status``: the long trigger names do not shift the columns after them."""
    header = series_header()
    row = series_row({"series_instance_uid": SERIES, "state": "delivered",
                      "instance_count": 12, "trigger": TRIGGER_MPPS_DISCONTINUED,
                      "series_number": 3, "score": 2.5, "description": "chest"})
    assert row.index("chest") == header.index("DESCRIPTION")
    assert row.index(" 2.5") + len(" 2.5") == header.index("SCORE") + len("SCORE")
