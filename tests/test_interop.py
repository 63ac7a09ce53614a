"""Interop matrix (issue 16): qcnode's own receive path against senders nobody here wrote.

The node is a real ``qcnode serve`` (one per module, no PACS, every series kept without
assessment); its receive path (``node/acceptor*.py``, ``upperlayer.py``, ``dimse.py``,
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
           max PDU 0; 20 concurrent associations
PixelMed   StorageSOPClassSCU, a mix of samples in one association              wire, content
GDCM       gdcmscu ``--store`` (judged by its stores: it aborts on exit)        wire, content
Orthanc    REST ``/modalities/…/store`` of a study                             wire, content
=========  ===================================================================  =========

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
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, build_role
from pynetdicom.pdu_primitives import (
    AsynchronousOperationsWindowNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import AllStoragePresentationContexts

from tests.support import interop as io
from tests.support.dcmtk import write_ct_series
from tests.support.dicomproxy import Association, RecordingProxy
from tests.support.net import wait_for
from tests.support.node import RunningNode, running_node
from tests.support.orthanc import DEFAULT_AE as ORTHANC_AE
from tests.support.orthanc import running_orthanc

STATUS_SUCCESS = 0x0000
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
Send = Callable[[int, list[Path]], "subprocess.CompletedProcess[str] | None"]


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
        RecordingProxy, subprocess.CompletedProcess[str] | None]:
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
    assert run is not None and run.returncode == 0, run and run.stdout + run.stderr
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
    assert run is not None and run.returncode == 0, run and run.stdout + run.stderr
    assert {w.transfer_syntax for w in only(proxy).stores} == {ExplicitVRBigEndian}
    verify(node, proxy, files, calling_ae=STORESCU_AE)
