"""The speculator's cache is bounded and never outlives a series' dispatch.

Regression for the serve process growing ≈ 15 MB per assessed series (up to 8 series):
a speculative preparation that finished after its series had been dispatched stayed
cached. The preparation here is real (:func:`inference.prepare.prepare_series` on
small CT files) behind a gate the test opens, so the ordering is forced, not timed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom

from inference.prepare import PreparedSeries, prepare_series
from node.ledger import Ledger
from node.pipeline.speculate import MAX_CACHED, Ready, Speculator
from tests.support.net import wait_for
from tests.test_pipeline import record_instances, write_ct_series

TIMEOUT = 60.0


class GatedPrepare:
    """``prepare_series`` that signals it started and waits until ``gate`` is set."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.gate = threading.Event()
        self.calls = 0

    def __call__(self, paths: list[Path]) -> PreparedSeries:
        self.calls += 1
        self.started.set()
        assert self.gate.wait(TIMEOUT), "the test never opened the gate"
        return prepare_series(paths, k=2)


@contextmanager
def speculating(tmp: Path, prepare: GatedPrepare,
                series: int = 1) -> Iterator[tuple[Ledger, Speculator, list[str]]]:
    spool = tmp / "spool"
    with Ledger.open(f"sqlite:///{tmp / 'ledger.sqlite3'}") as ledger:
        uids = []
        for seed in range(series):
            paths = write_ct_series(spool, n=3, size=32, seed=seed + 11)
            record_instances(ledger, spool, paths)
            uids.append(str(pydicom.dcmread(paths[0], stop_before_pixels=True)
                            .SeriesInstanceUID))
        with Speculator(ledger, spool, prepare, quiet_seconds=0.2) as speculator:
            yield ledger, speculator, uids
        prepare.gate.set()


def test_preparation_finishing_after_dispatch_is_not_kept(tmp_path: Path) -> None:
    """Dispatched (taken) while still being prepared: the result is dropped, not cached."""
    prepare = GatedPrepare()
    with speculating(tmp_path, prepare) as (ledger, speculator, (uid,)):
        assert prepare.started.wait(TIMEOUT)
        assert ledger.close_series(uid, 1, "quiet")
        assert speculator.take(uid, speculator.key(uid), wait=0) is None
        prepare.gate.set()
        wait_for(lambda: speculator.idle, timeout=TIMEOUT, what="the preparation to end")
        assert len(speculator) == 0, "a dispatched series' preparation stayed cached"


def test_take_waits_for_the_running_preparation(tmp_path: Path) -> None:
    """Taken while its files are being prepared: the dispatcher gets that result."""
    prepare = GatedPrepare()
    with speculating(tmp_path, prepare) as (ledger, speculator, (uid,)):
        assert prepare.started.wait(TIMEOUT)
        assert ledger.close_series(uid, 1, "quiet")
        got: list[Ready | None] = []
        taker = threading.Thread(target=lambda: got.append(
            speculator.take(uid, speculator.key(uid), wait=TIMEOUT)))
        taker.start()
        prepare.gate.set()
        taker.join(TIMEOUT)
        assert got and got[0] is not None, "the running preparation was not handed over"
        assert len(got[0][0].slices) == 2
        wait_for(lambda: speculator.idle, timeout=TIMEOUT, what="the speculator to go idle")
        assert len(speculator) == 0
        assert prepare.calls == 1, "a closed series must not be prepared again"


def test_cache_holds_at_most_max_cached_series(tmp_path: Path) -> None:
    """More quiet open series than the bound: never more than MAX_CACHED entries."""
    prepare = GatedPrepare()
    prepare.gate.set()
    count = MAX_CACHED + 2
    with speculating(tmp_path, prepare, series=count) as (ledger, speculator, uids):
        seen: list[int] = []

        def all_prepared_once() -> bool:
            seen.append(len(speculator))
            return prepare.calls >= count and speculator.idle

        wait_for(all_prepared_once, timeout=TIMEOUT, what=f"{count} preparations")
        assert max(seen) <= MAX_CACHED
        assert len(speculator) == MAX_CACHED
        for uid in uids:  # dispatched: closed, then taken
            assert ledger.close_series(uid, 1, "quiet")
        wait_for(lambda: speculator.idle, timeout=TIMEOUT, what="the speculator to go idle")
        for uid in uids:
            speculator.take(uid, speculator.key(uid), wait=TIMEOUT)
        assert len(speculator) == 0


def test_free_memory_is_given_back_on_glibc() -> None:
    """The dispatcher trims glibc's heap after each series (this machine runs glibc)."""
    from node.pipeline import dispatch

    assert dispatch._TRIM is not None, "malloc_trim not found: RSS would keep ≈ 90 MiB"
    dispatch.release_free_memory()
