"""A canary patient through every failure path: no log line or state file may name it.

One real ``qcnode serve`` (embedded SQLite broker and workers, DEBUG logging) receives
series whose Patient's Name, Patient ID, Patient's Birth Date and Accession Number are
distinctive canary strings, and is driven through the failure paths the other tests
provoke one by one:

- malformed input: a CT image whose Pixel Data is cut short (refused, quarantined);
- engine failure: a series the physics engine cannot assess (no soft tissue: dead-letter);
- worker killed: the ``gpu`` worker and its pool SIGKILLed mid-assessment (replaced,
  series re-dispatched);
- PACS down: four refused deliveries in a row (a Celery task retried past its
  default limit of three, where Celery's own MaxRetriesExceededError quotes the task's
  arguments: the series' headers, base64);
- commitment failure: a PACS that accepts the storage commitment request but cannot
  deliver its N-EVENT-REPORT (PS3.4 J.3.3) to the node.

Then every log stream (the node's stdout and stderr with its workers', one file) and
every state file under the node's home (``journal/state.json``, quarantine reasons),
and what ``qcnode status`` prints, are searched for each canary: as text, as hex, and
base64-encoded at each of the three byte alignments. No line may exceed the log
line cap (:data:`node.logs.MAX_LINE_CHARS`).
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from node.config import load_settings
from node.ledger import SeriesState
from node.logs import MAX_LINE_CHARS
from tests.support.dcmtk import storescu as dcmtk_storescu
from tests.support.dcmtk import write_ct_series
from tests.support.e2e import NODE_AE, NodeSite, kill_tree, series_uid_of, storescu, synth_series
from tests.support.net import free_port, wait_for
from tests.support.orthanc import Orthanc, running_orthanc

TIMEOUT = 180.0
CANARY_FAMILY, CANARY_GIVEN = "Xqzcanaryfam", "Wvkcanarygiv"
CANARY = {
    "PatientName": f"{CANARY_FAMILY}^{CANARY_GIVEN}",
    "PatientID": "XQZCANID8841",
    "PatientBirthDate": "19020304",
    "AccessionNumber": "XQZACC5530",
}
#: Text to look for: each name part on its own, the other values whole.
NEEDLES = (CANARY_FAMILY, CANARY_GIVEN, CANARY["PatientID"], CANARY["PatientBirthDate"],
           CANARY["AccessionNumber"])
COMMIT_DESCRIPTION = "canary commitment"
STATE_SUFFIXES = (".log", ".json", ".reason")


def encodings(text: str) -> dict[str, re.Pattern[str]]:
    """Patterns of ``text`` as it may appear: plain, hex, base64 at offsets 0, 1, 2.

    A value at byte offset ``p`` of an encoded stream shows its bytes from ``i`` on
    (``(p + i) % 3 == 0``) as ``b64encode(value[i:i + 3k])``, whatever surrounds it.
    Plain digits (a birth date) must not be part of a longer number (a UID).
    """
    raw = text.encode("ascii")
    plain = re.escape(text)
    if text.isdigit():
        plain = rf"(?<![0-9]){plain}(?![0-9])"
    found = {"plain": re.compile(plain, re.IGNORECASE),
             "hex": re.compile(re.escape(raw.hex()), re.IGNORECASE)}
    for offset in range(3):
        chunk = raw[offset:]
        chunk = chunk[: len(chunk) - len(chunk) % 3]
        found[f"base64+{offset}"] = re.compile(re.escape(base64.b64encode(chunk).decode()))
    return found


def leaks(name: str, text: str) -> list[str]:
    """Where any canary appears in ``text`` (``name``: the file or stream)."""
    found = []
    for needle in NEEDLES:
        for form, pattern in encodings(needle).items():
            match = pattern.search(text)
            if match:
                line = text[text.rfind("\n", 0, match.start()) + 1:][:200]
                found.append(f"{name}: {needle!r} as {form}: {line}")
    return found


def canary(ds: pydicom.Dataset) -> pydicom.Dataset:
    for keyword, value in CANARY.items():
        setattr(ds, keyword, value)
    return ds


def rewrite(files: list[Path], *, series_uid: str | None = None,
            description: str | None = None) -> None:
    """Put the canary patient into ``files`` (optionally as a new series)."""
    for path in files:
        ds = canary(pydicom.dcmread(path))
        if series_uid is not None:
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if description is not None:
            ds.SeriesDescription = description
        ds.save_as(path, enforce_file_format=True)


def copy_series(source: Path, out: Path, count: int, description: str) -> Path:
    """The first ``count`` files of ``source`` as a new canary series in ``out``."""
    out.mkdir(parents=True)
    files = []
    for path in sorted(source.glob("*.dcm"))[:count]:
        files.append(out / path.name)
        files[-1].write_bytes(path.read_bytes())
    rewrite(files, series_uid=generate_uid(), description=description)
    return out


@pytest.fixture()
def pacs_down(tmp_path: Path) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path / "orthanc-down", {NODE_AE: 104}) as server:
        server.stop()
        yield server


@pytest.fixture()
def no_report_back(tmp_path: Path) -> Iterator[Orthanc]:
    """A PACS that sends its N-EVENT-REPORT to a port where nothing listens."""
    with running_orthanc(tmp_path / "orthanc-commit", {NODE_AE: free_port()}) as server:
        yield server


def site_with_two_pacs(home: Path, pacs_down: Orthanc, commit: Orthanc) -> NodeSite:
    """Series described ``canary commitment`` go to ``commit`` (storage commitment that
    never reports back), other CT series to ``pacs`` (down); DEBUG logging."""
    # 40 slices assessed: a window to kill the worker in (as in test_e2e_faults).
    site = NodeSite(home, pacs_down, engine='name = "physics"\nslices = 40', max_attempts=5)
    text = site.config.read_text().replace('level = "INFO"', 'level = "DEBUG"')
    text += f"""
[[destinations]]
name = "commit"
ae_title = "{commit.ae_title}"
host = "127.0.0.1"
port = {commit.dicom_port}
confirm = "commitment"
commitment_port = {free_port()}
timeout = 2.0

[[rules]]
name = "commit"
modalities = ["CT"]
series_description = "^{COMMIT_DESCRIPTION}$"
destinations = ["commit"]

[[rules]]
name = "ct"
modalities = ["CT"]
destinations = ["pacs"]
"""
    site.config.write_text(text)
    site.settings = load_settings(site.config)
    return site


def delivery_attempts(site: NodeSite, series_uid: str) -> int:
    return sum(d.attempts for j in site.ledger.jobs_of_series(series_uid)
               for d in site.ledger.deliveries_of(j.id))


def status_outputs(site: NodeSite) -> dict[str, str]:
    """What ``qcnode status`` and ``qcnode status --json`` print (stdout and stderr)."""
    out = {}
    for args in (["status"], ["status", "--json"]):
        run = subprocess.run([sys.executable, "-m", "node.cli", *args, "--config",
                              str(site.config)], capture_output=True, text=True,
                             timeout=120, check=False)
        assert run.returncode == 0, run.stderr
        out[f"qcnode {' '.join(args)}"] = run.stdout + run.stderr
    return out


def test_canary_patient_in_no_log_line_or_state_file(
        tmp_path: Path, pacs_down: Orthanc, no_report_back: Orthanc) -> None:
    big = synth_series(tmp_path / "synth", slices=40, size=256, seed=5)
    rewrite(sorted(big.glob("*.dcm")))
    commit_dir = copy_series(big, tmp_path / "commit-series", 6, COMMIT_DESCRIPTION)
    engine_files = write_ct_series(tmp_path / "air", 4)  # all air: nothing to measure
    rewrite(engine_files)
    truncated = write_ct_series(tmp_path / "bad", 1, truncate_pixels=True)
    rewrite(truncated)
    site = site_with_two_pacs(tmp_path / "home", pacs_down, no_report_back)
    try:
        site.start()
        # Malformed input: refused with 0xC210 and quarantined with its reason.
        result = dcmtk_storescu(site.port, truncated, aec=NODE_AE)
        assert "Error: CannotUnderstand" in result.stdout + result.stderr
        wait_for(lambda: list((site.home / "quarantine").glob("*.reason")), timeout=30,
                 what="a quarantine reason")
        # Engine failure: dead-lettered.
        assert dcmtk_storescu(site.port, engine_files, aec=NODE_AE).returncode == 0
        site.wait_state(str(pydicom.dcmread(engine_files[0]).SeriesInstanceUID),
                        SeriesState.FAILED, timeout=TIMEOUT)
        # Commitment failure (runs on the io worker while the rest goes on).
        storescu(commit_dir, site.port)
        commit_uid = series_uid_of(commit_dir)
        # Worker killed mid-assessment, then the PACS is down for four attempts.
        victim = site.embedded_worker("gpu")
        storescu(big, site.port)
        big_uid = series_uid_of(big)
        site.wait_state(big_uid, SeriesState.ASSESSING, timeout=TIMEOUT)
        kill_tree(victim)
        wait_for(lambda: delivery_attempts(site, big_uid) >= 4
                 or site.state(big_uid) == SeriesState.FAILED, timeout=TIMEOUT,
                 what=f"four refused deliveries\n{site.logs()}")
        wait_for(lambda: delivery_attempts(site, commit_uid) >= 2
                 or site.state(commit_uid) == SeriesState.FAILED, timeout=TIMEOUT,
                 what=f"unconfirmed commitments\n{site.logs()}")
        assert site.job(big_uid).attempts == 2, "assessed again after the kill"
        streams = status_outputs(site)
    finally:
        site.stop()  # warm shutdown: a running task finishes and logs its outcome
    files = [p for p in site.home.rglob("*") if p.is_file() and p.suffix in STATE_SUFFIXES]
    assert any(p.name == "serve.log" for p in files)
    assert any(p.name == "state.json" for p in files)
    streams.update({str(p.relative_to(site.home)): p.read_text(errors="replace")
                    for p in files})
    found = [leak for name, text in streams.items() for leak in leaks(name, text)]
    assert not found, "canary patient data found:\n" + "\n".join(found[:20])
    long_lines = [(name, len(line)) for name, text in streams.items()
                  if name.endswith(".log") for line in text.splitlines()
                  if len(line) > MAX_LINE_CHARS]
    assert not long_lines, f"log lines over {MAX_LINE_CHARS} characters: {long_lines[:10]}"
