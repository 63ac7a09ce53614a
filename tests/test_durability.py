"""Durability proven, not assumed: the record's flush precedes its Success (issue 13).

A "crash" by closing descriptors or SIGKILL leaves the page cache intact, so the
journal tests pass with ``fdatasync`` replaced by a no-op. Here the listener runs
under ``strace`` and the order of its system calls is checked instead: for every
Success a C-STORE-RSP carries, the journal record of that very instance (found by the
SOP Instance UID in the record's meta) was written, then ``fdatasync`` of its segment
began after that write and returned before the response's first byte was sent — on
the inline path (one connection: the loop thread flushes) and on the pool path (more
connections: a pool thread flushes, the loop thread answers). A flush made a no-op,
skipped, or moved after the answer fails the test.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from node.receive.scp import STATUS_SUCCESS, VERIFICATION_SOP_CLASS
from tests.support.dcmtk import storescu, successes, write_ct_series
from tests.support.node import REPO
from tests.support.strace import STRACE, Call, parse

pytestmark = pytest.mark.skipif(shutil.which("strace") is None,
                                reason="strace not installed (make system-deps)")

#: A listener (no ledger: the receive path alone) on a free port; stops when stdin closes.
RUNNER = """
import sys
from pathlib import Path
from node.config import Settings
from node.receive.scp import Listener
from node.store.spool import Spool
home = Path(sys.argv[1])
settings = Settings.model_validate({
    "node": {"ae_title": "QCNODE", "host": "127.0.0.1", "port": 0, "home": str(home),
             "acse_timeout": 5.0, "network_timeout": 60.0},
    "senders": [{"ae_title": "*", "host": "127.0.0.1"}],
    "spool": {"min_free_bytes": 0, "min_free_percent": 0.0, "journal_segments": 4},
})
listener = Listener(settings, Spool(settings.spool_dir, home), None)
listener.start()
print("PORT", listener.address[1], flush=True)
sys.stdin.read()
listener.stop(10.0)
"""
C_STORE_RSP = 0x8001
_META_SOP = re.compile(rb'"sop":"([0-9.]+)"')


def _response(data: bytes) -> tuple[str, int] | None:
    """(Affected SOP Instance UID, Status) of a C-STORE-RSP P-DATA-TF PDU, else None."""
    if len(data) < 12 or data[0] != 0x04 or not data[11] & 0x01:
        return None
    command, pos, fields = data[12:], 0, {}
    while pos + 8 <= len(command):
        _, element, length = struct.unpack_from("<HHL", command, pos)
        fields[element] = command[pos + 8 : pos + 8 + length]
        pos += 8 + length
    if struct.unpack("<H", fields.get(0x0100, b"\0\0"))[0] != C_STORE_RSP:
        return None
    uid = fields[0x1000].rstrip(b"\0").decode()
    return uid, struct.unpack("<H", fields[0x0900])[0]


def _flush_before_answer(calls: list[Call], uid: str, answer: Call) -> Call:
    """The ``fdatasync`` that made ``uid``'s record durable before ``answer`` began."""
    metas = [c for c in calls if c.name == "pwrite64" and "/journal/seg-" in c.path
             and (m := _META_SOP.search(c.data)) and m.group(1).decode() == uid]
    assert len(metas) == 1, f"{uid}: {len(metas)} journal record(s)"
    meta = metas[0]
    head = next(c for c in calls if c.name == "pwrite64" and c.tid == meta.tid
                and c.path == meta.path and c.entry > meta.exit)  # the record header
    flushes = [c for c in calls if c.name == "fdatasync" and c.path == meta.path
               and c.result == 0 and head.exit < c.entry and c.exit < answer.entry]
    assert flushes, f"{uid}: no fdatasync of {meta.path} between its record and its Success"
    return flushes[-1]


def test_every_success_follows_the_flush_of_its_record(tmp_path: Path) -> None:
    trace = tmp_path / "strace.txt"
    command = [*STRACE, "-s", "400", "-e", "trace=pwrite64,fdatasync,sendto,sendmsg",
               "-o", str(trace), sys.executable, "-c", RUNNER, str(tmp_path / "home")]
    proc = subprocess.Popen(command, cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    inline = write_ct_series(tmp_path / "inline", 4)
    pool = write_ct_series(tmp_path / "pool", 4)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # log lines, then PORT once bound ("" if it exits)
        while line and not line.startswith("PORT "):
            line = proc.stdout.readline()
        assert line.startswith("PORT "), "the listener exited before listening"
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # its log lines
        port = int(line.split()[1])
        run = storescu(port, inline)  # the only connection: stores run inline
        assert len(successes(run.stdout + run.stderr)) == 4, run.stdout + run.stderr
        ae = AE(ae_title="IDLE")
        ae.add_requested_context(VERIFICATION_SOP_CLASS, [ExplicitVRLittleEndian])
        idle = ae.associate("127.0.0.1", port, ae_title="QCNODE")  # a second connection
        assert idle.is_established
        try:
            run = storescu(port, pool)  # stores now run in the pool threads
        finally:
            idle.release()
        assert len(successes(run.stdout + run.stderr)) == 4, run.stdout + run.stderr
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(60)
    calls = parse(trace)
    answers = {}
    for call in calls:
        if call.name in ("sendto", "sendmsg") and (rsp := _response(call.data)):
            assert rsp[1] == STATUS_SUCCESS
            answers[rsp[0]] = call
    for paths, same_thread in ((inline, True), (pool, False)):
        for path in paths:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            answer = answers[uid]
            flush = _flush_before_answer(calls, uid, answer)
            assert (flush.tid == answer.tid) is same_thread, (
                "inline: the loop thread flushes and answers" if same_thread
                else "pool: a pool thread flushes, the loop thread answers")
