"""Real-viewer test (issue 4): what a radiologist sees of qcnode's reports in OHIF v3.

A small CT series, its TID 1500 SR, the Basic Text SR and the PDF quality card (all from
``sr_writer``) go into a real Orthanc with Debian's DICOMweb plugin; npm's OHIF v3 built
viewer opens the study in Debian's headless Chromium, driven by playwright-core
(``drive.mjs``). Asserted: the SR opens with no OHIF error, the score is drawn on the
worst slice, the explanation is readable in the text companion, and the PDF card reaches
the viewer intact. Screenshots go to ``test-artifacts/viewer/``.

Needs ``make system-deps viewer-deps`` (fails, never skips, without them).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmwrite
from pydicom.dataset import Dataset

from inference.result import (
    AssessmentResult,
    EngineInfo,
    Finding,
    FindingKind,
    Measurement,
    Region,
    Severity,
    SliceScore,
)
from sr_writer import build_pdf, build_sr, build_text_sr, extract_pdf
from sr_writer.pdf import PDF_SERIES_DESCRIPTION
from sr_writer.text_sr import TEXT_SERIES_DESCRIPTION
from sr_writer.tid1500 import SERIES_DESCRIPTION
from tests.support.ohif import DICOMWEB_SAME_ORIGIN, OhifServer, chromium_path, ohif_dist
from tests.support.orthanc import Orthanc, running_orthanc
from tests.viewer.ct import ct_series

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "viewer"
DRIVER = Path(__file__).with_name("drive.mjs")
PLAYWRIGHT = REPO / "viewer" / "node_modules" / "playwright-core" / "package.json"
STEP_TIMEOUT_MS = 60_000  # per wait, generous for 2 busy cores
DRIVER_TIMEOUT_S = 300
WORST = 2  # index of the slice with streaks (InstanceNumber 3)
EXPLANATION = (
    "Moderate noise (σ ≈ 18 HU in soft tissue) across the series; "
    "radial streaks degrade slice 3 (Streifenartefakte)."
)
#: OHIF's hydration dialog is not an error; an error toast (sonner) is.
ERROR_TOAST = '[data-sonner-toast][data-type="error"]'
#: Keep OHIF's onboarding tour from covering the viewport.
TOUR_DONE = {"shownTours": json.dumps(["basicViewerTour"])}


@dataclass(frozen=True)
class Loaded:
    """The study in Orthanc and the viewer in front of it."""

    ohif: OhifServer
    pacs: Orthanc
    cts: list[Dataset]
    result: AssessmentResult
    pdf_bytes: bytes
    workdir: Path

    @property
    def url(self) -> str:
        return self.ohif.study_url(str(self.cts[0].StudyInstanceUID))


def _result(cts: list[Dataset]) -> AssessmentResult:
    worst = str(cts[WORST].SOPInstanceUID)
    slices = tuple(
        SliceScore(str(ds.SOPInstanceUID), 1.4 if i == WORST else 3.0, 0.3,
                   region=Region.box(str(ds.SOPInstanceUID), 40, 50, 216, 206))
        for i, ds in enumerate(cts)
    )
    return AssessmentResult(
        study_instance_uid=str(cts[0].StudyInstanceUID),
        series_instance_uid=str(cts[0].SeriesInstanceUID),
        score=2.6, uncertainty=0.4, explanation=EXPLANATION,
        engine=EngineInfo("physics", "0.1.0"),
        slices=slices,
        findings=(Finding(FindingKind.STREAK_ARTIFACT, Severity.MODERATE, "radial streaks",
                          worst, Region.box(worst, 80, 80, 176, 176)),),
        evidence=(Measurement("noise_hu", 18.0, "[hnsf'U]", "soft tissue", worst,
                              Region.box(worst, 150, 110, 190, 140)),),
    )


def _upload(pacs: Orthanc, ds: Dataset) -> None:
    """Store one instance through Orthanc's REST API (POST /instances)."""
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    req = urllib.request.Request(pacs.url + "/instances", data=buf.getvalue(), method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        status = json.load(resp).get("Status")
    assert status == "Success", f"Orthanc refused {ds.SOPClassUID}: {status}"


def _check_tools() -> None:
    missing = []
    if shutil.which("node") is None:
        missing.append("node (Node.js)")
    if not PLAYWRIGHT.is_file():
        missing.append(f"playwright-core ({PLAYWRIGHT.parent})")
    for check in (chromium_path, ohif_dist):
        try:
            check()
        except FileNotFoundError as exc:
            missing.append(str(exc))
    if missing:
        pytest.fail("viewer test needs: " + "; ".join(missing)
                    + " (run `make system-deps viewer-deps`)")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    """CT + SR + text SR + PDF in a real Orthanc, OHIF served in front of it."""
    _check_tools()
    workdir = tmp_path_factory.mktemp("viewer")
    cts = ct_series()
    result = _result(cts)
    key = f"{result.series_instance_uid}|{result.engine.key}"
    sr = build_sr(cts, result, job_key=key)
    text_sr = build_text_sr(cts, result, job_key=key)
    pdf = build_pdf(cts, result, job_key=key)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with running_orthanc(workdir / "orthanc", dicomweb=True, extra=DICOMWEB_SAME_ORIGIN) as pacs, \
            OhifServer(pacs.http_port) as ohif:
        for ds in [*cts, sr, text_sr, pdf]:
            _upload(pacs, ds)
        yield Loaded(ohif, pacs, cts, result, extract_pdf(pdf), workdir)


def _drive(loaded: Loaded, name: str, steps: list[dict[str, Any]],
           *, attempts: int = 1) -> dict[str, Any]:
    """Open the study in a fresh Chromium profile, run ``steps``, return the report.

    ``attempts`` > 1: a failed run is repeated in a new profile (the failure's report
    and screenshot are kept under ``<name>-attempt<N>``).
    """
    for attempt in range(1, attempts):
        report = _drive_once(loaded, f"{name}-attempt{attempt}", steps, fail=False)
        if not report["error"]:
            return report
    return _drive_once(loaded, name, steps, fail=True)


def _drive_once(loaded: Loaded, name: str, steps: list[dict[str, Any]],
                *, fail: bool) -> dict[str, Any]:
    plan = {
        "timeoutMs": STEP_TIMEOUT_MS,
        "userDataDir": str(loaded.workdir / f"chromium-{name}"),
        "executablePath": str(chromium_path()),
        "localStorage": TOUR_DONE,
        "failureScreenshot": str(ARTIFACTS / f"{name}-failure.png"),
        "steps": [{"goto": loaded.url}, {"waitCanvas": True}, *steps],
    }
    proc = subprocess.run(
        ["node", str(DRIVER)], input=json.dumps(plan).encode(), capture_output=True,
        timeout=DRIVER_TIMEOUT_S, check=False,
    )
    assert proc.returncode == 0, f"driver failed: {proc.stderr.decode(errors='replace')[-3000:]}"
    report: dict[str, Any] = json.loads(proc.stdout)
    (ARTIFACTS / f"{name}-report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    if report["error"] and fail:
        pytest.fail(
            f"OHIF step {report['error']['step']} failed: {report['error']['message']}\n"
            f"page errors: {report['pageErrors']}\nconsole: {report['console']}\n"
            f"orthanc log tail:\n{loaded.pacs.log_tail(1500)}"
        )
    return report


def _assert_no_ohif_error(report: dict[str, Any]) -> None:
    """No uncaught exception, no console error (e.g. "Cannot read properties …"), no toast."""
    assert report["pageErrors"] == [], report["pageErrors"]
    errors = [c["text"] for c in report["console"] if c["type"] == "error"]
    assert errors == [], errors
    assert report["counts"].get("error toasts", 0) == 0, "OHIF showed an error toast"


def _label(score: float) -> str:
    """OHIF's overlay label of a TID 1410 NUM: concept meaning, value (2 d.p.), UCUM code."""
    return f"Image Quality Rating: {score:.2f} {{score}}"


class _LabelParser(HTMLParser):
    """Text boxes cornerstone draws in the viewport's SVG layer: ``<g transform=
    "translate(x y)"><text font-size="15px"><tspan dy="1.2em">line</tspan>…``."""

    def __init__(self) -> None:
        super().__init__()
        self.groups: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        move = re.fullmatch(r"translate\(([-\d.e]+)[ ,]+([-\d.e]+)\)", a.get("transform") or "")
        if tag == "g" and "data-annotation-uid" in a and move:
            self._open = {"x": float(move[1]), "y": float(move[2]), "size": 0.0, "lines": []}
            self.groups.append(self._open)
        elif tag == "text" and self._open is not None:
            self._open["size"] = float((a.get("font-size") or "0").removesuffix("px"))
        elif tag == "tspan" and self._open is not None:
            self._open["lines"].append("")

    def handle_data(self, data: str) -> None:
        if self._open is not None and self._open["lines"]:
            self._open["lines"][-1] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "g":
            self._open = None


def _label_boxes(html: str) -> dict[str, tuple[float, float, float]]:
    """Each label line → (left, top, bottom) of its text box in viewport pixels (lines
    are 1.2 em apart, as cornerstone writes them)."""
    parser = _LabelParser()
    parser.feed(html)
    boxes = {}
    for g in parser.groups:
        height = 1.2 * g["size"] * len(g["lines"])
        for line in g["lines"]:
            boxes[line] = (g["x"], g["y"], g["y"] + height)
    return boxes


def test_sr_opens_with_the_score_on_the_worst_slice(loaded: Loaded) -> None:
    worst = loaded.result.worst_slice
    assert worst is not None
    overlay = "svg tspan:has-text({!r})"
    # Seen once in ~10 clean runs: OHIF 3.13 opened the SR on the right slice but never
    # drew its annotations (frame requests aborted while the SR viewport reloaded); a
    # second run in a fresh profile then draws them. Everything below is still asserted.
    report = _drive(loaded, "ohif-sr-worst-slice", attempts=2, steps=[
        {"dblclick": f'text="{SERIES_DESCRIPTION}"'},
        {"waitSelector": overlay.format(_label(worst.score))},
        {"waitSelector": overlay.format(_label(loaded.result.score))},
        {"text": "instance", "selector": '[data-cy="viewport-overlay-bottom-right"]'},
        {"count": "error toasts", "selector": ERROR_TOAST},
        {"screenshot": str(ARTIFACTS / "ohif-sr-worst-slice.png")},
        {"bodyText": "page"},
        {"saveHtml": str(ARTIFACTS / "ohif-sr-worst-slice.html")},
    ])
    _assert_no_ohif_error(report)
    shown = report["texts"]["instance"].replace("\n", "")
    expected = int(loaded.cts[WORST].InstanceNumber)
    assert shown.startswith(f"I:{expected} "), f"OHIF shows {shown!r}, not the worst slice"
    assert "Cannot read properties" not in report["texts"]["page"]
    html = (ARTIFACTS / "ohif-sr-worst-slice.html").read_text(encoding="utf-8")
    boxes = _label_boxes(html)
    series, worst_label = _label(loaded.result.score), _label(worst.score)
    assert series in boxes and worst_label in boxes, sorted(boxes)
    (_, top_a, bottom_a), (_, top_b, bottom_b) = boxes[series], boxes[worst_label]
    assert bottom_a <= top_b or bottom_b <= top_a, (
        f"series label {boxes[series]} overlaps the worst slice's {boxes[worst_label]}")
    assert min(top_a, top_b) >= 0 and min(boxes[series][0], boxes[worst_label][0]) >= 0


def test_text_sr_shows_the_explanation(loaded: Loaded) -> None:
    report = _drive(loaded, "ohif-text-sr", [
        {"dblclick": f'text="{TEXT_SERIES_DESCRIPTION}"'},
        {"waitText": EXPLANATION, "timeoutMs": 30_000},
        {"count": "error toasts", "selector": ERROR_TOAST},
        {"screenshot": str(ARTIFACTS / "ohif-text-sr.png")},
        {"bodyText": "page"},
    ])
    _assert_no_ohif_error(report)
    page = report["texts"]["page"]
    assert EXPLANATION in page
    shown = f"Series quality {loaded.result.score:.1f} "  # one decimal for people
    assert shown in page, "the series score is not in the text view"


def test_pdf_card_reaches_the_viewer(loaded: Loaded) -> None:
    pdf_object = 'object[type="application/pdf"]'
    report = _drive(loaded, "ohif-pdf-card", [
        {"dblclick": f'text="{PDF_SERIES_DESCRIPTION}"'},
        {"waitSelector": pdf_object, "state": "attached"},
        {"fetchAttr": "pdf", "selector": pdf_object, "attr": "data"},
        {"count": "error toasts", "selector": ERROR_TOAST},
        {"screenshot": str(ARTIFACTS / "ohif-pdf-card.png")},
    ])
    _assert_no_ohif_error(report)
    fetched = report["fetched"]["pdf"]
    assert fetched["head"].startswith("%PDF-")
    # Orthanc may serve the even-length padded value (PS3.5 7.1.1): one NUL at most.
    assert fetched["length"] in (len(loaded.pdf_bytes), len(loaded.pdf_bytes) + 1)
