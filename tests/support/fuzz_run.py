"""Sending fuzz cases to a real node and judging what came back (issue 16).

Each case is one TCP connection to the node: its bytes are sent whole, or slowly in
small chunks, then the socket is half-closed (``shutdown(SHUT_WR)``: the node must see
the end of the stream and close; no close within :data:`HANG_SECONDS` is a hang) or,
for some cases, read until quiet and closed. The oracle: every C-STORE-RSP with status
Success (PS3.4 B.2.3) must answer a C-STORE whose data set, as the fuzzer's reference
parser (PS3.8 §9.3.5, Annex E) reads the bytes sent, is the captured original or one
pydicom reads completely with the command's SOP Class and Instance UIDs.
"""

from __future__ import annotations

import random
import socket
import statistics
import struct
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.support.fuzz_dataset import read_data_set
from tests.support.fuzz_streams import P_DATA_TF, Captured, Case, mutate

#: After a half-close, the node must have closed the connection within this.
HANG_SECONDS = 10.0
#: Cases read until the node is quiet this long, then closed (no half-close).
QUIET_SECONDS = 0.2
A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_RELEASE_RP, A_ABORT = 0x02, 0x03, 0x06, 0x07
C_STORE_RQ, C_STORE_RSP, C_ECHO_RSP = 0x0001, 0x8001, 0x8030
STATUS_SUCCESS = 0x0000
NO_DATA_SET = 0x0101
_PDU = struct.Struct(">BBL")


@dataclass
class Outcome:
    """What one case got: outcome classes and oracle violations."""

    case: Case
    mode: str
    classes: set[str] = field(default_factory=set)
    violations: list[str] = field(default_factory=list)


def _pdus(data: bytes) -> Iterable[tuple[int, bytes]]:
    """``(type, body)`` of the complete PDUs in ``data``; stops at the first that is not."""
    pos = 0
    while pos + 6 <= len(data):
        kind, _, length = _PDU.unpack_from(data, pos)
        if pos + 6 + length > len(data):
            return
        yield kind, data[pos + 6:pos + 6 + length]
        pos += 6 + length


def _pdv_stream(data: bytes) -> Iterable[tuple[int, int, bytes]]:
    """``(context id, control, value)`` of the PDVs in a stream, in order, each as soon as
    it is complete and lies within its PDU's length (PS3.8 §9.3.5) — as a streaming
    receiver acts on them, before the rest of the PDU arrived; stops at the first PDU
    or PDV that is malformed or incomplete. Other PDUs are skipped by their length."""
    pos = 0
    while pos + 6 <= len(data):
        kind, _, length = _PDU.unpack_from(data, pos)
        pos += 6
        if kind != P_DATA_TF:
            pos += length
            continue
        end = pos + length
        while pos < end:
            if pos + 6 > min(end, len(data)):
                return
            pdv_len = int.from_bytes(data[pos:pos + 4], "big")
            if pdv_len < 2 or pos + 4 + pdv_len > end or pos + 4 + pdv_len > len(data):
                return
            yield data[pos + 4], data[pos + 5], data[pos + 6:pos + 4 + pdv_len]
            pos += 4 + pdv_len


def command_fields(raw: bytes) -> dict[int, bytes] | None:
    """Element number → value of an Implicit VR LE group-0000 command set (PS3.7 §6.3)."""
    values, pos = {}, 0
    while pos < len(raw):
        if pos + 8 > len(raw):
            return None
        group, element, length = struct.unpack_from("<HHL", raw, pos)
        if group != 0 or pos + 8 + length > len(raw):
            return None
        values[element] = raw[pos + 8:pos + 8 + length]
        pos += 8 + length
    return values


def _us(values: dict[int, bytes], element: int) -> int | None:
    value = values.get(element)
    return struct.unpack("<H", value)[0] if value is not None and len(value) == 2 else None


def _ui(values: dict[int, bytes], element: int) -> str:
    return values.get(element, b"").decode("ascii", "replace").strip("\0 ")


def _messages(data: bytes) -> Iterable[tuple[dict[int, bytes], int, bytes | None]]:
    """``(command, context id, data set)`` of each complete DIMSE message in a stream."""
    command, data_set, pcid = bytearray(), bytearray(), 0
    pending: dict[int, bytes] | None = None
    for ctx, control, value in _pdv_stream(data):
        if control & 1:
            if pending is not None:
                return  # a command before the data set ended
            command += value
            if not control & 2:
                continue
            fields = command_fields(bytes(command))
            command = bytearray()
            if fields is None:
                return
            if _us(fields, 0x0800) == NO_DATA_SET:
                yield fields, ctx, None
            else:
                pending, pcid, data_set = fields, ctx, bytearray()
        elif pending is not None and ctx == pcid:
            data_set += value
            if control & 2:
                yield pending, pcid, bytes(data_set)
                pending = None
        else:
            return


def _accepted(received: bytes) -> set[int]:
    """Context IDs the node's A-ASSOCIATE-AC accepted (PS3.8 §9.3.3.2)."""
    for kind, body in _pdus(received):
        if kind != A_ASSOCIATE_AC:
            continue
        out, pos = set(), 68
        while pos + 4 <= len(body):
            item, length = body[pos], struct.unpack_from(">H", body, pos + 2)[0]
            if item == 0x21 and body[pos + 6] == 0:
                out.add(body[pos + 4])
            pos += 4 + length
        return out
    return set()


def judge(outcome: Outcome, sent: bytes, received: bytes, original: bytes) -> None:
    """Classify ``received`` and check the Success oracle against ``sent``."""
    kinds = {kind for kind, _ in _pdus(received)}
    names = {A_ASSOCIATE_AC: "accepted", A_ASSOCIATE_RJ: "rejected",
             A_RELEASE_RP: "released", A_ABORT: "aborted"}
    outcome.classes |= {name for kind, name in names.items() if kind in kinds}
    accepted = _accepted(received)
    stores: dict[int | None, tuple[dict[int, bytes], bytes]] = {}
    for fields, pcid, data_set in _messages(sent):
        if pcid in accepted and _us(fields, 0x0100) == C_STORE_RQ and data_set is not None:
            stores.setdefault(_us(fields, 0x0110), (fields, data_set))
    for fields, _, _ in _messages(received):
        field_, status = _us(fields, 0x0100), _us(fields, 0x0900)
        if field_ == C_ECHO_RSP:
            outcome.classes.add("echo_success" if status == STATUS_SUCCESS else "echo_other")
        if field_ != C_STORE_RSP:
            continue
        if status != STATUS_SUCCESS:
            outcome.classes.add(f"store_0x{status or 0:04X}")
            continue
        outcome.classes.add("store_success")
        sent_store = stores.get(_us(fields, 0x0120))
        if sent_store is None:
            outcome.violations.append("Success for a C-STORE the reference parser did not "
                                      "find complete in the bytes sent")
            continue
        request, data_set = sent_store
        if data_set != original and not read_data_set(
                data_set, _ui(request, 0x0002), _ui(request, 0x1000)):
            outcome.violations.append("Success for a data set pydicom cannot read or whose "
                                      "UIDs are not the command's")


def send_case(port: int, case: Case, rng: random.Random, original: bytes) -> Outcome:
    """Send one case; read the answers; judge them."""
    mode = rng.choices(["half_close", "close", "slow"], [75, 15, 10])[0]
    outcome = Outcome(case, mode)
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_SECONDS) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if mode == "slow":
                pos = 0
                while pos < len(case.data):
                    step = rng.randint(1, max(1, len(case.data) // 8))
                    sock.sendall(case.data[pos:pos + step])
                    pos += step
                    time.sleep(rng.uniform(0, 0.01))  # the pace is what is tested
            else:
                sock.sendall(case.data)
            if mode != "close":
                sock.shutdown(socket.SHUT_WR)
            else:
                sock.settimeout(QUIET_SECONDS)
            while data := sock.recv(65536):
                received += data
            outcome.classes.add("closed_by_node")
        except TimeoutError:
            if mode != "close":
                outcome.classes.add("hang")
                outcome.violations.append(f"no close within {HANG_SECONDS}s of a half-close")
        except OSError as exc:  # reset: the node closed while we were still sending
            outcome.classes.add(f"os_{type(exc).__name__}")
    judge(outcome, case.data, bytes(received), original)
    return outcome


def echo_seconds(port: int, ae_title: str = "QCNODE") -> float:
    """Seconds a pynetdicom C-ECHO takes (association to release); inf on failure."""
    ae = AE(ae_title="FUZZECHO")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    start = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        return float("inf")
    status = assoc.send_c_echo()
    assoc.release()
    ok = status and status.Status == STATUS_SUCCESS
    return time.monotonic() - start if ok else float("inf")


def undecodable(spool: Path) -> list[str]:
    """The spooled instances pydicom cannot read whole, pixels decoded (as the quality
    engine reads them): ``name: error`` each."""
    failed = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(spool.rglob("*.dcm")):
            try:
                ds = pydicom.dcmread(path)
                for element in ds.iterall():
                    _ = element.value
                _ = ds.pixel_array
            except Exception as exc:
                failed.append(f"{path.name}: {type(exc).__name__}: {str(exc)[:100]}")
    return failed


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (/proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


@dataclass
class Report:
    """Outcome counts, oracle violations, echo latencies and RSS over a run."""

    cases: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    echo: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)

    def add(self, outcome: Outcome, seed: int) -> None:
        self.cases += 1
        self.counts.update(outcome.classes or {"nothing"})
        for text in outcome.violations:
            c = outcome.case
            self.violations.append(f"seed {seed} case {c.index} {c.stream} "
                                   f"{c.mutation} ({outcome.mode}): {text}")

    def percentile(self, q: float) -> float:
        ordered = sorted(self.echo)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0

    def summary(self) -> str:
        return (f"{self.cases} cases, {len(self.violations)} violations; outcomes "
                f"{dict(sorted(self.counts.items()))}; echo p50 {self.percentile(0.5):.3f} s "
                f"p99 {self.percentile(0.99):.3f} s max {max(self.echo, default=0):.3f} s "
                f"(median {statistics.median(self.echo) if self.echo else 0:.3f}); "
                f"RSS {self.rss[0] if self.rss else 0} → {self.rss[-1] if self.rss else 0} KiB")


def run(port: int, pid: int, streams: Sequence[Captured], *, seed: int, cases: int,
        batch: int = 200, workers: int = 8, start: int = 0) -> Iterable[Report]:
    """Run ``cases`` cases in batches; after each, C-ECHO and RSS. Yields the report
    after every batch (the caller asserts on it)."""
    report = Report()
    originals = {s.name: s.data_set for s in streams}
    with ThreadPoolExecutor(workers) as pool:
        for first in range(start, start + cases, batch):
            jobs = []
            for index in range(first, min(first + batch, start + cases)):
                stream = streams[index % len(streams)]
                case, rng = mutate(stream, index, seed)
                jobs.append(pool.submit(send_case, port, case, rng, originals[stream.name]))
            for job in jobs:
                report.add(job.result(), seed)
            report.echo.append(echo_seconds(port))
            report.rss.append(rss_kib(pid))
            yield report


def replay(port: int, stream: Captured, seed: int, index: int) -> Outcome:
    """Send case ``index`` of ``seed`` again (a reported violation's reproduction)."""
    case, rng = mutate(stream, index, seed)
    return send_case(port, case, rng, stream.data_set)
