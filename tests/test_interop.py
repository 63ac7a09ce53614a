"""Interop matrix (issue 16): qcnode's own receive path against senders nobody here wrote.

The node is a real ``qcnode serve`` (one per module, no PACS, every series kept without
assessment); its receive path (``node/receive/acceptor*.py``, ``upperlayer.py``, ``dimse.py``,
``scp.py``) is hand-written, so each sender below is an independent implementation of
the other end. Every association passes through a recording proxy
(:mod:`tests.support.dicomproxy`) that keeps what the sender put on the wire.

=========  ===================================================================  =========
sender     cases                                                                check
=========  ===================================================================  =========
DCMTK      implicit (no ``-R``: 128 contexts), explicit, big endian (config      wire,
storescu   profile), JPEG lossless, JPEG 2000 (lossless and lossy), RLE,         content
           deflated, max PDU 4096 and 128 KiB, ``-R``, user identity ``-rsp``
pynetdicom 300 instances in one association; every sample as it is over 128     wire,
           contexts with role selection, async window and user identity;        file
           max PDU 0 (its own, and the node's); 20 concurrent associations
PixelMed   StorageSOPClassSCU, one syntax per SOP class in an association;      wire, content
           native pixels it sends on a JPEG-LS context are refused (0xC210)
GDCM       gdcmscu ``--store`` (judged by its stores: it aborts on exit)        wire, content
Orthanc    REST ``/modalities/…/store`` of a study                             wire, content
=========  ===================================================================  =========

The last test turns the proxy on qcnode's own sending: concurrent deliveries
(``node/send/scu.py``) each drive their own association, one operation at a time.

Checks (:mod:`tests.support.interop`): **wire** — the spool file's data set is byte for
byte the data set sent, its meta names the accepted transfer syntax, the instance and
the caller; **file** — and it is the sample file's data set, byte for byte (pynetdicom
streams a file given by path unchanged); **content** — where the sender re-encodes
(group lengths dropped, syntax converted), the wire data set decodes to the sample's
elements and pixels.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
)
from pynetdicom import AE, build_role
from pynetdicom import _config as pynetdicom_config
from pynetdicom._globals import DEFAULT_MAX_LENGTH
from pynetdicom.pdu_primitives import (
    AsynchronousOperationsWindowNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import AllStoragePresentationContexts

from node.config import DestinationSettings, Settings
from node.receive.scp import Listener
from node.send.scu import DeliveryError, deliver
from node.store.spool import Spool
from tests.support import interop as io
from tests.support.dcmtk import write_ct_series
from tests.support.dicomproxy import Association, RecordingProxy
from tests.support.net import wait_for
from tests.support.node import RunningNode, running_node
from tests.support.orthanc import DEFAULT_AE as ORTHANC_AE
from tests.support.orthanc import running_orthanc

STATUS_SUCCESS = 0x0000
STATUS_CANNOT_UNDERSTAND = 0xC210
NODE_AE = "QCNODE"
STORESCU_AE, PYNETDICOM_AE, PIXELMED_AE, GDCM_AE = "STORESCU", "PYNETDICOM", "PIXELMED", "GDCMSCU"
#: The node's allow-list: exactly the senders of this module, by AE title.
SENDER_AES = (STORESCU_AE, PYNETDICOM_AE, PIXELMED_AE, GDCM_AE, ORTHANC_AE)
#: pynetdicom's limit, and the one of an A-ASSOCIATE-RQ (PS3.8 §9.3.2.2: odd IDs 1–255).
MAX_CONTEXTS = 128
APPLIED_TIMEOUT = 30.0
DCMTK_ALL_CONTEXTS = 64


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    tmp = tmp_path_factory.mktemp("interop")
    tables = {
        "senders": [{"ae_title": ae, "host": "127.0.0.1"} for ae in SENDER_AES],
        "rules": [{"name": "keep", "action": "store"}],  # receive path only: no pipeline
    }
    with running_node(tmp, tables=tables) as running:
        yield running


# Sending through the proxy and checking what was stored ----------------------------------
Send = Callable[[int, list[Path]], "subprocess.CompletedProcess[str]"]


def _applied(node: RunningNode, uid: str) -> list[Path]:
    return wait_for(lambda: io.spool_files(node.spool, uid), timeout=APPLIED_TIMEOUT,
                    what=f"{uid} applied to the spool")


def verify(node: RunningNode, proxy: RecordingProxy, sources: Sequence[Path], *,
           calling_ae: str, file_identical: bool = False) -> None:
    """Every source crossed the wire once, got Success, and is stored exactly as sent."""
    wait_for(proxy.answered, timeout=APPLIED_TIMEOUT, what="every C-STORE answered")
    errors = [e for a in proxy.associations for e in a.errors]
    assert not errors, errors
    sent = proxy.sent()
    by_uid = {io.sop_instance_uid(p): p for p in sources}
    assert set(sent) == set(by_uid), f"sent {len(sent)} of {len(by_uid)}"
    for uid, wire in sent.items():
        assert wire.status == STATUS_SUCCESS, f"{by_uid[uid].name}: 0x{wire.status:04X}"
        _applied(node, uid)
        stored = io.check_stored(node.spool, wire, calling_ae=calling_ae)
        io.check_same_content(wire, by_uid[uid])
        if file_identical:
            io.check_file_identical(stored, by_uid[uid])


def send_through_proxy(node: RunningNode, send: Send, files: list[Path]) -> tuple[
        RecordingProxy, subprocess.CompletedProcess[str]]:
    with RecordingProxy(node.port) as proxy:
        result = send(proxy.port, files)
        wait_for(proxy.answered, timeout=APPLIED_TIMEOUT, what="every C-STORE answered")
    return proxy, result


def only(proxy: RecordingProxy) -> Association:
    assert len(proxy.associations) == 1, len(proxy.associations)
    return proxy.associations[0]


# DCMTK storescu --------------------------------------------------------------------------
@dataclass(frozen=True)
class DcmtkCase:
    """One storescu association: samples, options, the syntaxes allowed on the wire
    (None: each file's own) and the largest P-DATA-TF the sender may use."""

    samples: tuple[str, ...]
    options: tuple[str, ...]
    on_wire: frozenset[str] | None = None
    max_send_pdu: int | None = None


UNCOMPRESSED = ("ct", "mr", "mr_implicit", "mr_big", "us_rgb", "mf")
#: storescu proposes, besides the list an option selects, a context with a file's own
#: uncompressed syntax and sends the file in it when accepted (no conversion), else it
#: converts; either way the node must store what came.
ANY_UNCOMPRESSED = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                              ExplicitVRBigEndian})
DCMTK_CASES = {
    # no -R: storescu proposes every storage class it knows
    "implicit-all-contexts": DcmtkCase(UNCOMPRESSED, ("-xi",),
                                       frozenset({ImplicitVRLittleEndian})),
    "explicit-all-contexts": DcmtkCase(UNCOMPRESSED, ("-xe",), ANY_UNCOMPRESSED),
    "uncompressed-R": DcmtkCase(UNCOMPRESSED, ("-R", "-xe"), ANY_UNCOMPRESSED),
    "jpeg-lossless": DcmtkCase(("nm_jpeg_ll", "us_jpeg_ll", "sc_rgb_jpeg_ll"), ("-R", "-xs")),
    "jpeg2000-lossless": DcmtkCase(("ct_j2k", "mr_j2k", "cr_j2k", "us_rgb_j2k", "mf_j2k"),
                                   ("-R", "-xv")),
    "jpeg2000": DcmtkCase(("ct_j2k_lossy",), ("-R", "-xw")),
    "rle": DcmtkCase(("mr_rle", "mf_rle", "sc_rgb_rle_2f", "us_palette_rle"), ("-R", "-xr")),
    # the node prefers Deflated when offered: storescu deflates what it sends
    "deflated": DcmtkCase(("deflated", "ct", "mr_implicit"), ("-R", "-xd"),
                          frozenset({DeflatedExplicitVRLittleEndian})),
    "max-pdu-4096": DcmtkCase(("cr", "ct"), ("-R", "--max-pdu", "4096", "--max-send-pdu",
                                            "4096"), ANY_UNCOMPRESSED, 4096),
    "max-pdu-128k": DcmtkCase(("cr", "us_rgb"), ("-R", "--max-pdu", "131072",
                                                 "--max-send-pdu", "131072"),
                              ANY_UNCOMPRESSED, 131072),
    "user-identity": DcmtkCase(("ct", "mr"), ("-R", "--user", "bob", "--password", "secret",
                                              "-rsp"), ANY_UNCOMPRESSED),
}


@pytest.mark.parametrize("case", DCMTK_CASES.values(), ids=DCMTK_CASES.keys())
def test_dcmtk_storescu(node: RunningNode, tmp_path: Path, case: DcmtkCase) -> None:
    files = list(io.fresh_copies(case.samples, tmp_path).values())
    proxy, run = send_through_proxy(
        node, lambda port, f: io.run_storescu(port, f, case.options, aet=STORESCU_AE), files)
    assert run.returncode == 0, run.stdout + run.stderr
    assoc = only(proxy)
    for wire in assoc.stores:
        source = files[[io.sop_instance_uid(f) for f in files].index(wire.sop_instance_uid)]
        own = str(pydicom.dcmread(source, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        allowed = case.on_wire or {own}
        assert wire.transfer_syntax in allowed, (source.name, wire.transfer_syntax)
    if "-R" not in case.options:  # storescu 3.6.7 -xi: 64 storage classes, one context each
        assert len(assoc.proposed) >= DCMTK_ALL_CONTEXTS, len(assoc.proposed)
    if case.max_send_pdu is not None:
        assert assoc.requestor_max_pdu == case.max_send_pdu
        assert max(assoc.pdata_lengths) <= case.max_send_pdu
        cr = io.sample("cr").stat().st_size
        assert len(assoc.pdata_lengths) > cr // case.max_send_pdu
    verify(node, proxy, files, calling_ae=STORESCU_AE)


def test_dcmtk_storescu_big_endian(node: RunningNode, tmp_path: Path) -> None:
    """Explicit VR Big Endian on the wire: a storescu profile proposing only it (the
    node prefers Explicit VR Little Endian when offered both); DCMTK converts the
    little-endian samples, the big-endian ones travel as they are."""
    files = list(io.fresh_copies(("mr_big", "us_rgb_big", "mf_big", "ct", "mr_implicit"),
                                 tmp_path / "files").values())
    classes = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files]
    profile = io.storescu_profile(tmp_path / "storescu.cfg", ExplicitVRBigEndian, classes)
    options = ("-xf", str(profile), "ONLY")
    proxy, run = send_through_proxy(
        node, lambda port, f: io.run_storescu(port, f, options, aet=STORESCU_AE), files)
    assert run.returncode == 0, run.stdout + run.stderr
    assert {w.transfer_syntax for w in only(proxy).stores} == {ExplicitVRBigEndian}
    verify(node, proxy, files, calling_ae=STORESCU_AE)


# pynetdicom ------------------------------------------------------------------------------
#: A pynetdicom requestor sometimes never sees a response the node sent: its
#: association reactor takes the C-STORE-RSP off the queue and drops it (a race; see
#: docs/benchmarks.md). The sender then waits this long, aborts, and the helper below
#: sends the rest (and that instance again) on a new association.
PYNETDICOM_DIMSE_TIMEOUT = 5.0
UNEXPECTED_RESPONSE = "Received unexpected C-STORE service message"


@dataclass
class PynetdicomRun:
    """What a pynetdicom sender saw: statuses by SOP Instance UID, and its stalls."""

    statuses: dict[str, int]
    stalled: list[str]
    associations: int


def pynetdicom_send(port: int, items: Sequence[Path | pydicom.Dataset],
                    make_ae: Callable[[], AE], *, ext_neg: list[Any] | None = None,
                    max_pdu: int = DEFAULT_MAX_LENGTH) -> PynetdicomRun:
    """Send ``items`` (paths or data sets) in one association; after a stall (no
    response within the DIMSE timeout: pynetdicom aborts) go on in a new one."""
    statuses: dict[str, int] = {}
    stalled: list[str] = []
    associations, pending = 0, list(items)
    while pending:
        assoc = make_ae().associate("127.0.0.1", port, ae_title=NODE_AE, ext_neg=ext_neg,
                                    max_pdu=max_pdu)
        associations += 1
        assert assoc.is_established, "association not established"
        try:
            while pending:
                item = pending[0]
                uid = io.sop_instance_uid(item) if isinstance(item, Path) else str(
                    item.SOPInstanceUID)
                rsp = assoc.send_c_store(item)
                if "Status" not in rsp:
                    stalled.append(uid)
                    break
                statuses[uid] = int(rsp.Status)
                pending.pop(0)
        finally:
            if assoc.is_established:
                assoc.release()
    return PynetdicomRun(statuses, stalled, associations)


def pynetdicom_ae(contexts: Sequence[tuple[str, Sequence[str]]]) -> AE:
    ae = AE(ae_title=PYNETDICOM_AE)
    ae.dimse_timeout = PYNETDICOM_DIMSE_TIMEOUT
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, list(syntaxes))
    return ae


def check_pynetdicom_run(run: PynetdicomRun, proxy: RecordingProxy, count: int) -> None:
    """Every instance got Success; each stall was pynetdicom's: the node had answered."""
    assert len(run.statuses) == count
    assert set(run.statuses.values()) == {STATUS_SUCCESS}
    answered = {s.sop_instance_uid: s for a in proxy.associations for s in a.stores
                if s.status is not None}
    for uid in run.stalled:
        assert answered[uid].status == STATUS_SUCCESS, uid


@pytest.fixture()
def stream_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom's documented switch (``_config.STORE_SEND_CHUNKED_DATASET``): a file
    given by path is sent as it is, its data set bytes unchanged (exact context)."""
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)


def _file_context(path: Path) -> tuple[str, str]:
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)


def test_pynetdicom_300_instances_in_one_association(node: RunningNode, tmp_path: Path) -> None:
    """Data sets re-encoded by pydicom (pynetdicom's default), 300 in one association."""
    files = write_ct_series(tmp_path / "ct", 300)
    datasets = [pydicom.dcmread(f) for f in files]
    make = lambda: pynetdicom_ae([(CTImageStorage, [ExplicitVRLittleEndian])])  # noqa: E731
    with RecordingProxy(node.port) as proxy:
        run = pynetdicom_send(proxy.port, datasets, make)
        verify(node, proxy, files, calling_ae=PYNETDICOM_AE)
    check_pynetdicom_run(run, proxy, 300)
    assert run.associations == 1 + len(run.stalled)


@pytest.mark.usefixtures("stream_files")
def test_pynetdicom_every_sample_as_is_over_128_contexts(node: RunningNode,
                                                         tmp_path: Path) -> None:
    """Each sample in its own syntax (file data set bytes unchanged), 128 presentation
    contexts, SCP/SCU role selection for every class, an asynchronous operations
    window of 5 and a user identity asking for a positive response."""
    files = list(io.fresh_copies(list(io.SAMPLES), tmp_path).values())
    wanted = list(dict.fromkeys(_file_context(f) for f in files))
    fill = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts
            if str(cx.abstract_syntax) not in {c for c, _ in wanted}]
    contexts = [(c, [ts]) for c, ts in wanted]
    contexts += [(c, [ExplicitVRLittleEndian]) for c in fill[:MAX_CONTEXTS - len(contexts)]]
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 5
    window.maximum_number_operations_performed = 5
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 2
    identity.primary_field, identity.secondary_field = b"bob", b"secret"
    identity.positive_response_requested = True
    roles = [build_role(c, scu_role=True, scp_role=True) for c in dict(wanted)]
    with RecordingProxy(node.port) as proxy:
        run = pynetdicom_send(proxy.port, files, lambda: pynetdicom_ae(contexts),
                              ext_neg=[window, identity, *roles])
        verify(node, proxy, files, calling_ae=PYNETDICOM_AE, file_identical=True)
    check_pynetdicom_run(run, proxy, len(files))
    first = proxy.associations[0]
    assert len(first.proposed) == MAX_CONTEXTS
    assert len(first.accepted) == MAX_CONTEXTS


@pytest.mark.usefixtures("stream_files")
def test_pynetdicom_max_pdu_0(node: RunningNode, tmp_path: Path) -> None:
    """A requestor's Maximum Length 0 (no limit, PS3.8 §D.1): the node's responses
    are not fragmented, and the 6 MB CR crosses in the node's 4 MiB PDUs."""
    files = list(io.fresh_copies(("cr", "us_rgb", "ct"), tmp_path).values())
    contexts = list(dict.fromkeys(_file_context(f) for f in files))
    with RecordingProxy(node.port) as proxy:
        run = pynetdicom_send(proxy.port, files,
                              lambda: pynetdicom_ae([(c, [t]) for c, t in contexts]), max_pdu=0)
        verify(node, proxy, files, calling_ae=PYNETDICOM_AE, file_identical=True)
    check_pynetdicom_run(run, proxy, len(files))
    assoc = proxy.associations[0]
    assert assoc.requestor_max_pdu == 0
    assert max(assoc.pdata_lengths) <= assoc.acceptor_max_pdu


@pytest.mark.usefixtures("stream_files")
def test_pynetdicom_to_a_node_announcing_max_pdu_0(tmp_path: Path) -> None:
    """The node's own Maximum Length 0 (``[node] max_pdu = 0``: no limit): pynetdicom
    sends each data set as one PDV in one P-DATA-TF (6 MB for the CR), which the
    acceptor streams through its 256 KiB buffer. The listener runs in-process here (the
    same receive path as ``qcnode serve``, without the ledger)."""
    settings = Settings.model_validate({
        "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": 0, "max_pdu": 0,
                 "home": str(tmp_path / "home")},
        "senders": [{"ae_title": PYNETDICOM_AE, "host": "127.0.0.1"}],
        "rules": [{"name": "keep", "action": "store"}],
        "spool": {"min_free_bytes": 0, "min_free_percent": 0.0,
                  "journal_segment_bytes": 8 << 20, "journal_segments": 2},
    })
    listener = Listener(settings, Spool(settings.spool_dir, settings.node.home), None)
    listener.start()
    try:
        files = list(io.fresh_copies(("cr", "mf_j2k", "ct"), tmp_path / "files").values())
        contexts = [(c, [t]) for c, t in dict.fromkeys(_file_context(f) for f in files)]
        with RecordingProxy(listener.address[1]) as proxy:
            run = pynetdicom_send(proxy.port, files, lambda: pynetdicom_ae(contexts))
            wait_for(proxy.answered, timeout=APPLIED_TIMEOUT, what="every C-STORE answered")
        check_pynetdicom_run(run, proxy, len(files))
        assoc = proxy.associations[0]
        assert assoc.acceptor_max_pdu == 0
        assert len(assoc.pdata_lengths) == 2 * len(files)  # command, then data: one PDV each
        assert max(assoc.pdata_lengths) > io.sample("cr").stat().st_size - 4096
        for path in files:
            wire = proxy.sent()[io.sop_instance_uid(path)]
            uid = wire.sop_instance_uid
            wait_for(partial(io.spool_files, listener.spool.root, uid),
                     timeout=APPLIED_TIMEOUT, what="applied to the spool")
            stored = io.check_stored(listener.spool.root, wire, calling_ae=PYNETDICOM_AE)
            io.check_file_identical(stored, path)
    finally:
        listener.stop(5.0)


class _Warnings(logging.Handler):
    """Counts pynetdicom's "unexpected C-STORE" warnings (a dropped response)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        if UNEXPECTED_RESPONSE in record.getMessage():
            self.dropped += 1


def test_pynetdicom_20_concurrent_associations(node: RunningNode, tmp_path: Path) -> None:
    """20 threads, one association each, 15 instances each. Where pynetdicom stalls,
    the proxy shows the node had answered Success, and pynetdicom logged that its
    reactor took the response as an unexpected request (the race, not the node)."""
    threads_n, per_thread = 20, 15
    series = [write_ct_series(tmp_path / f"s{i}", per_thread) for i in range(threads_n)]
    runs: list[PynetdicomRun] = []
    failures: list[BaseException] = []
    counter = _Warnings()
    logging.getLogger("pynetdicom").addHandler(counter)
    make = lambda: pynetdicom_ae([(CTImageStorage, [ExplicitVRLittleEndian])])  # noqa: E731

    def send(files: list[Path]) -> None:
        try:
            runs.append(pynetdicom_send(proxy.port, files, make))
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    try:
        with RecordingProxy(node.port) as proxy:
            workers = [threading.Thread(target=send, args=(s,)) for s in series]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(120)
            assert not failures, failures
            files = [f for s in series for f in s]
            verify(node, proxy, files, calling_ae=PYNETDICOM_AE)
    finally:
        logging.getLogger("pynetdicom").removeHandler(counter)
    assert len(runs) == threads_n
    for run in runs:
        check_pynetdicom_run(run, proxy, per_thread)
    stalls = sum(len(r.stalled) for r in runs)
    assert counter.dropped >= stalls, (counter.dropped, stalls)
    slowest = max(s.answer_seconds or 0.0 for a in proxy.associations for s in a.stores)
    assert slowest < PYNETDICOM_DIMSE_TIMEOUT, slowest


# PixelMed, GDCM, Orthanc -------------------------------------------------------------------
#: One association's worth of everything: CT, MR, CR, US RGB, multi-frame, big endian,
#: implicit, the compressed syntaxes and deflate.
MIX = ("ct", "mr", "mr_implicit", "mr_big", "cr_j2k", "us_rgb", "us_rgb_j2k", "mf",
       "mf_rle", "nm_jpeg_ll", "mr_jls", "deflated")


#: PixelMed picks a presentation context by SOP class alone: with one class in several
#: syntaxes it sends some files in another file's syntax without converting the pixel
#: data (native pixels under a JPEG-LS or JPEG 2000 context). One syntax per class here
#: (two associations); the mismatch is the next test's subject.
PIXELMED_RUNS = (("ct", "mr_big", "cr_j2k", "us_rgb", "mf_rle", "nm_jpeg_ll"),
                 ("mr_implicit", "us_rgb_j2k", "mf", "deflated"))


@pytest.mark.parametrize("names", PIXELMED_RUNS, ids=("run1", "run2"))
def test_pixelmed_storage_scu(node: RunningNode, tmp_path: Path, names: tuple[str, ...]) -> None:
    files = list(io.fresh_copies(names, tmp_path).values())
    proxy, run = send_through_proxy(
        node, lambda port, f: io.run_pixelmed(port, f, aet=PIXELMED_AE), files)
    assert "Exception" not in run.stderr, run.stderr[-3000:]
    assert len(proxy.associations) == 1
    verify(node, proxy, files, calling_ae=PIXELMED_AE)


def test_pixelmed_native_pixels_under_a_compressed_syntax_refused(
        node: RunningNode, tmp_path: Path) -> None:
    """PixelMed sends MR_small (native pixels) on the JPEG-LS context it proposed for
    MR_small_jpeg_ls_lossless: a data set its transfer syntax cannot describe (PS3.5
    §A.4: pixel data of a compressed syntax is encapsulated). Before: Success, and a
    spool file no reader decodes. Now: 0xC210, quarantined, nothing spooled."""
    copies = io.fresh_copies(("mr_jls", "mr"), tmp_path)
    proxy, _ = send_through_proxy(
        node, lambda port, f: io.run_pixelmed(port, f, aet=PIXELMED_AE), list(copies.values()))
    sent = proxy.sent()
    good, bad = sent[io.sop_instance_uid(copies["mr_jls"])], sent[
        io.sop_instance_uid(copies["mr"])]
    assert bad.transfer_syntax == JPEGLSLossless, "PixelMed chose the right context now"
    assert not io.decode(bad.data, ExplicitVRLittleEndian)["PixelData"].is_undefined_length
    assert good.status == STATUS_SUCCESS
    _applied(node, good.sop_instance_uid)
    io.check_stored(node.spool, good, calling_ae=PIXELMED_AE)
    assert bad.status == STATUS_CANNOT_UNDERSTAND, f"0x{bad.status or 0:04X}"
    assert not io.spool_files(node.spool, bad.sop_instance_uid)


def test_gdcmscu_store(node: RunningNode, tmp_path: Path) -> None:
    """Judged by its stores: gdcmscu 3.0.21 aborts on exit against every SCP."""
    files = list(io.fresh_copies(MIX, tmp_path).values())
    proxy, run = send_through_proxy(
        node, lambda port, f: io.run_gdcmscu(port, f, aet=GDCM_AE), files)
    assert run.returncode in (0, io.GDCM_ABORT_EXIT), run.stderr[-3000:]
    verify(node, proxy, files, calling_ae=GDCM_AE)


def test_orthanc_pushes_a_study(node: RunningNode, tmp_path: Path) -> None:
    """Orthanc stores a study (files as uploaded), then pushes it over DICOM with REST
    ``POST /modalities/{name}/store``, in each file's own syntax (the node accepts them
    all), re-encoded by Orthanc's DCMTK."""
    study_uid = pydicom.uid.generate_uid()
    files = []
    for path in io.fresh_copies(MIX, tmp_path / "files").values():
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.PatientID = study_uid, "INTEROP"  # Orthanc: one study
        ds.save_as(path)
        files.append(path)
    with RecordingProxy(node.port) as proxy, \
            running_orthanc(tmp_path / "orthanc", {NODE_AE: proxy.port}) as orthanc:
        studies = {orthanc.upload(f.read_bytes())["ParentStudy"] for f in files}
        assert len(studies) == 1
        job = orthanc.post_json("/modalities/peer0/store",
                                {"Resources": list(studies), "Synchronous": True})
        assert job.get("FailedInstancesCount", 0) == 0, job
        verify(node, proxy, files, calling_ae=ORTHANC_AE)
    for wire in proxy.sent().values():
        source = next(f for f in files if io.sop_instance_uid(f) == wire.sop_instance_uid)
        assert wire.transfer_syntax == _file_context(source)[1], source.name


# qcnode as the sender ----------------------------------------------------------------------
def test_deliveries_drive_each_association_from_one_thread(tmp_path: Path) -> None:
    """The sender-side guarantee (node/send/scu.py): a delivery opens its own association
    and issues one operation at a time on it from the calling thread — what a
    pynetdicom association needs (two threads on one association mix up responses; its
    reactor already races the caller, see docs/benchmarks.md). Four deliveries run at
    once (a threaded worker); on the wire each has its own association and never more
    than one request waiting for its final response (C-STOREs, then C-FINDs with their
    pending responses)."""
    count, per_delivery = 4, 5
    series = [[pydicom.dcmread(f) for f in write_ct_series(tmp_path / f"s{i}", per_delivery)]
              for i in range(count)]
    receipts: list[object] = []
    retried: list[DeliveryError] = []

    def delivery(datasets: list[pydicom.Dataset], dest: DestinationSettings) -> None:
        try:
            receipts.append(deliver(datasets, dest, node_ae=NODE_AE))
        except DeliveryError as exc:  # a dropped response (the pynetdicom race): retried
            retried.append(exc)
            receipts.append(deliver(datasets, dest, node_ae=NODE_AE))

    with running_orthanc(tmp_path / "orthanc", {NODE_AE: 1}) as orthanc, \
            RecordingProxy(orthanc.dicom_port) as proxy:
        dest = DestinationSettings(name="pacs", ae_title=orthanc.ae_title, host="127.0.0.1",
                                   port=proxy.port, confirm="find", timeout=10.0)
        workers = [threading.Thread(target=delivery, args=(d, dest)) for d in series]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
    assert len(receipts) == count
    assert all(exc.transient for exc in retried), retried
    assert len(proxy.associations) == count + len(retried)
    for assoc in proxy.associations:
        assert all(s.status == STATUS_SUCCESS for s in assoc.stores)
        assert assoc.most_outstanding() == 1, assoc.commands
