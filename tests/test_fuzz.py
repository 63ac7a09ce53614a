"""Protocol fuzzing of the node's own DICOM receive path against a real ``qcnode serve``.

Streams pynetdicom really sends (association + C-ECHO + release; association + C-STORE
of a small CT + release) are captured once through a recording proxy, then sent with
seeded mutations (:mod:`tests.support.fuzz_streams`): a bounded run here,
``bench/fuzz.py`` for ≥ 100,000 cases. After every batch the node must answer a C-ECHO
within 2 s and its RSS stay within 50 MiB of the first batch's; no Success may answer a
data set pydicom cannot read (:func:`tests.support.fuzz_run.judge`).
"""

from __future__ import annotations

import random
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from tests.support.fuzz_dataset import elements
from tests.support.fuzz_run import (
    Outcome,
    Report,
    echo_seconds,
    rss_kib,
    run,
    send_case,
    undecodable,
)
from tests.support.fuzz_streams import Captured, Case, capture, mutate, reframe
from tests.support.net import wait_for
from tests.support.node import RunningNode, running_node

SEED = 16
CASES = 2000
ECHO_LIMIT_SECONDS = 2.0
RSS_GROWTH_KIB = 50 << 10
STATUS_CANNOT_UNDERSTAND = 0xC210
IDLE_CONNECTIONS = 300


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    tmp = tmp_path_factory.mktemp("fuzz")
    # the fuzzer and the legitimate sender on 127.0.0.1; the idle connections come from
    # 127.0.0.2… — hosts no [[senders]] entry names, the slowloris threat (issue 16)
    senders = [{"ae_title": "*", "host": "127.0.0.1"}]
    with running_node(tmp, tables={"senders": senders}) as running:
        yield running


@pytest.fixture(scope="module")
def streams(node: RunningNode, tmp_path_factory: pytest.TempPathFactory) -> list[Captured]:
    return capture(node.port, tmp_path_factory.mktemp("capture"))


def _store(streams: list[Captured]) -> Captured:
    return next(s for s in streams if s.name == "store")


def _with_vr(data_set: bytes, tag: int, vr: bytes) -> bytes:
    """The data set with the explicit VR of top-level element ``tag`` replaced."""
    pos = next(p for p, t, _ in elements(data_set) if t == tag)
    return data_set[:pos + 4] + vr + data_set[pos + 6:]


def _send(node: RunningNode, stream: Captured, data_set: bytes, name: str) -> Outcome:
    case = Case(0, "store", name, reframe(stream, data_set, 1), True)
    return send_case(node.port, case, random.Random(0), stream.data_set)


def test_captured_streams_stored_unmutated(node: RunningNode, streams: list[Captured]) -> None:
    """The positive control: the captured store, resent as is, gets Success."""
    outcome = _send(node, _store(streams), _store(streams).data_set, "none")
    assert {"accepted", "store_success", "released"} <= outcome.classes, outcome
    assert not outcome.violations


def test_cases_reproducible_from_seed_and_index(streams: list[Captured]) -> None:
    """A reported case (seed, index) is the same bytes when replayed."""
    for index in range(200):
        stream = streams[index % len(streams)]
        assert mutate(stream, index, SEED)[0] == mutate(stream, index, SEED)[0]
    assert mutate(streams[0], 0, SEED)[0] != mutate(streams[0], 0, SEED + 1)[0]


def test_fuzz_bounded(node: RunningNode, streams: list[Captured]) -> None:
    """2,000 seeded cases in batches of 200; after each: C-ECHO, RSS, the oracle."""
    report = Report()
    for report in run(node.port, node.proc.pid, streams, seed=SEED, cases=CASES):
        assert report.echo[-1] < ECHO_LIMIT_SECONDS, report.summary()
        assert report.rss[-1] - report.rss[0] < RSS_GROWTH_KIB, report.summary()
    assert report.violations == [], report.summary()
    # The mutations reached every stage: refused at association, aborted, stored,
    # refused data sets, released.
    for seen in ("rejected", "aborted", "store_success", "store_0xC210", "released",
                 "echo_success"):
        assert report.counts[seen] > 0, report.summary()
    assert report.counts["hang"] == 0, report.summary()


def test_every_spooled_instance_decodes(node: RunningNode) -> None:
    """The second oracle: whatever the bounded run got stored (mutations the node
    accepted) pydicom reads whole, pixels decoded — as the quality engine will. Before
    the Image Pixel checks, 5 of 84 spooled versions did not (Bits Allocated 0, Bits
    Stored or Photometric Interpretation missing or misspelt, Bits Stored as text)."""
    wait_for(lambda: list(node.spool.rglob("*.dcm")), what="spooled files")
    assert undecodable(node.spool) == []


# Regressions found by the fuzzer (seed 1 of bench/fuzz.py; data set mutation ds_wrong_vr).
def test_pixel_data_with_vr_sq_refused(node: RunningNode, streams: list[Captured]) -> None:
    """Seed 1 case 2909: Pixel Data sent as SQ (defined length) got Success; pydicom
    reads a sequence there, not the 512 bytes of pixels (PS3.5 §8.2: OB or OW)."""
    stream = _store(streams)
    outcome = _send(node, stream, _with_vr(stream.data_set, 0x7FE00010, b"SQ"), "pixel SQ")
    assert f"store_0x{STATUS_CANNOT_UNDERSTAND:04X}" in outcome.classes, outcome
    assert not outcome.violations


def test_columns_with_vr_ds_refused(node: RunningNode, streams: list[Captured]) -> None:
    """Seed 1 case 2207: Columns (0028,0011) sent as DS got Success — the node read two
    bytes of a decimal string as the US value; pydicom reads a string."""
    stream = _store(streams)
    outcome = _send(node, stream, _with_vr(stream.data_set, 0x00280011, b"DS"), "columns DS")
    assert f"store_0x{STATUS_CANNOT_UNDERSTAND:04X}" in outcome.classes, outcome
    assert not outcome.violations


@pytest.mark.parametrize("vr", [b"US", b"AT"])
def test_photometric_interpretation_with_a_numeric_vr_refused(
        node: RunningNode, streams: list[Captured], vr: bytes) -> None:
    """Seed 3 of bench/fuzz.py, the spool oracle: Photometric Interpretation sent as US
    (or AT) got Success — its bytes still read "MONOCHROME2" to the node, while pydicom
    reads numbers there and could not decode the stored image (``TypeError: unhashable
    type: 'list'`` / ``'MultiValue'``)."""
    stream = _store(streams)
    data_set = _with_vr(stream.data_set, 0x00280004, vr)
    outcome = _send(node, stream, data_set, f"photometric {vr.decode()}")
    assert f"store_0x{STATUS_CANNOT_UNDERSTAND:04X}" in outcome.classes, outcome
    assert not outcome.violations


def test_columns_with_several_values_refused(node: RunningNode,
                                             streams: list[Captured]) -> None:
    """Seed 1 case 83463: a bit flip made Columns 18 bytes long (it swallowed Pixel
    Spacing); the node read its first value and answered Success; pydicom reads nine
    values for an attribute of VM 1 (PS3.3 C.7.6.3)."""
    stream = _store(streams)
    pos = next(p for p, t, _ in elements(stream.data_set) if t == 0x00280011)
    data_set = stream.data_set[:pos + 6] + struct.pack("<H", 18) + stream.data_set[pos + 8:]
    outcome = _send(node, stream, data_set, "columns VM 9")
    assert f"store_0x{STATUS_CANNOT_UNDERSTAND:04X}" in outcome.classes, outcome
    assert not outcome.violations


def test_image_without_samples_per_pixel_refused(node: RunningNode,
                                                 streams: list[Captured]) -> None:
    """bench/fuzz.py seed 3: 33 of 3,435 spooled versions lacked Samples per Pixel (Type 1,
    PS3.3 C.7.6.3), which pydicom needs to decode; the node had assumed 1."""
    stream = _store(streams)
    pos, _, start = next(e for e in elements(stream.data_set) if e[1] == 0x00280002)
    data_set = stream.data_set[:pos] + stream.data_set[start + 2:]
    outcome = _send(node, stream, data_set, "no samples per pixel")
    assert f"store_0x{STATUS_CANNOT_UNDERSTAND:04X}" in outcome.classes, outcome


# Idle connections ---------------------------------------------------------------------------
def _idle(stack: ExitStack, port: int, count: int, payload: bytes) -> list[socket.socket]:
    """``count`` connections from 127.0.0.2, 127.0.0.3, … (30 each) sending ``payload``."""
    socks = []
    for i in range(count):
        sock = stack.enter_context(socket.socket())
        sock.bind((f"127.0.0.{2 + i // 30}", 0))
        sock.connect(("127.0.0.1", port))
        if payload:
            sock.sendall(payload)
        socks.append(sock)
    return socks


def test_idle_connections_within_the_limits_leave_room(node: RunningNode) -> None:
    """30 silent connections and 30 with half a PDU header (two hosts, per-host limit 32,
    global 64 leaves 4): a C-ECHO still gets through at once, RSS flat."""
    before = rss_kib(node.proc.pid)
    with ExitStack() as stack:
        _idle(stack, node.port, 30, b"")
        _idle(stack, node.port, 30, struct.pack(">BBH", 1, 0, 0))
        assert echo_seconds(node.port) < ECHO_LIMIT_SECONDS
    assert rss_kib(node.proc.pid) - before < RSS_GROWTH_KIB


def test_hundreds_of_idle_connections_do_not_lock_out_a_sender(node: RunningNode) -> None:
    """300 connections that send nothing or half a PDU header: a C-ECHO still succeeds
    within 2 s while they stay open."""
    with ExitStack() as stack:
        _idle(stack, node.port, IDLE_CONNECTIONS // 2, b"")
        _idle(stack, node.port, IDLE_CONNECTIONS // 2, b"\x01\x00")
        assert echo_seconds(node.port) < ECHO_LIMIT_SECONDS


def test_node_recovers_after_idle_connections(node: RunningNode) -> None:
    """Whatever the idle tests left: once they are gone, C-ECHO is prompt again."""
    assert echo_seconds(node.port) < ECHO_LIMIT_SECONDS


def test_slow_associate_rq_closed_at_the_acse_timeout(
        node: RunningNode, streams: list[Captured]) -> None:
    """An A-ASSOCIATE-RQ trickled one byte per 0.4 s: the node closes the connection
    within the ACSE timeout (2 s in the test config, PS3.8 §9.1.5 ARTIM) plus slack."""
    rq = streams[0].pdus[0].encode()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.settimeout(0.4)  # the trickle's pace
        for byte in rq[:20]:
            try:
                sock.send(bytes([byte]))
                if sock.recv(1024) == b"":
                    break
            except TimeoutError:
                continue
            except OSError:
                break
    assert time.monotonic() - started < 2.0 + 1.5
