"""Association negotiation micro-benchmark: decode the A-ASSOCIATE-RQ, negotiate, encode.

Run ``.venv/bin/python bench/negotiation.py``. Times what the listener does between
receiving an A-ASSOCIATE-RQ and sending its A-ASSOCIATE-AC (:mod:`node.receive.negotiation`:
pynetdicom's PDU classes and ``negotiate_as_acceptor`` over the node's 209 supported
contexts), per association, best of five, for two requests as pynetdicom encodes them:
a modality's (CT with three transfer syntaxes + Verification) and a PACS forwarding a
study with 127 storage contexts (pynetdicom's StoragePresentationContexts, two
transfer syntaxes each).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable

from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import (
    PresentationContext,
    StoragePresentationContexts,
    build_context,
)

from node.config import Settings
from node.receive.scp import Listener
from node.store.spool import Spool

ROUNDS = 5


def request(contexts: list[PresentationContext]) -> bytes:
    """An A-ASSOCIATE-RQ proposing ``contexts``, encoded by pynetdicom."""
    rq = A_ASSOCIATE()
    rq.application_context_name = "1.2.840.10008.3.1.1.1"
    rq.calling_ae_title, rq.called_ae_title = "MODALITY", "QCNODE"
    for i, cx in enumerate(contexts):
        cx.context_id = 2 * i + 1
    rq.presentation_context_definition_list = contexts
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    uid = ImplementationClassUIDNotification()
    uid.implementation_class_uid = "1.2.3.4"
    rq.user_information = [length, uid]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(rq)
    return pdu.encode()


def best_of(call: Callable[[], object], count: int) -> float:
    """Seconds per call, best of :data:`ROUNDS` runs of ``count`` calls."""
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(count):
            call()
        best = min(best, (time.perf_counter() - start) / count)
    return best


def main() -> None:
    home = tempfile.mkdtemp(prefix="qcnode-bench-")
    settings = Settings.model_validate({
        "node": {"ae_title": "QCNODE", "home": home},
        "senders": [{"ae_title": "*", "host": "127.0.0.1"}],
    })
    config = Listener(settings, Spool(settings.spool_dir, settings.node.home),
                      None).acceptor_config()
    start = time.perf_counter()
    negotiator = config.negotiator
    print(f"supported contexts built once: {(time.perf_counter() - start) * 1e3:.1f} ms")
    modality = request([
        build_context(CTImageStorage,
                      [JPEG2000Lossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
        build_context("1.2.840.10008.1.1"),
    ])
    forwarder = request([
        build_context(str(cx.abstract_syntax), [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        for cx in StoragePresentationContexts[:127]
    ])
    for name, raw, count in (("modality", modality, 500), ("127 contexts", forwarder, 20)):
        def once(raw: bytes = raw) -> object:
            return negotiator.accept(negotiator.decode(raw))

        seconds = best_of(once, count)
        print(f"{name}: {len(raw)} bytes, {seconds * 1e6:.0f} µs per association")


if __name__ == "__main__":
    main()
