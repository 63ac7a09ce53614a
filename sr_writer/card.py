"""The one-page "quality card" PDF (reportlab): score, findings, explanation, worst slice.

Fonts are embedded (subset) so that the card reads the same everywhere: a TrueType font
with wide Latin coverage (DejaVu Sans where installed, reportlab's bundled Vera
otherwise) and, for runs of CJK characters, VL PGothic (Debian ``fonts-vlgothic``, in the
Makefile's SYSTEM_PKGS; IPA or Takao Gothic also work). Noto CJK is not usable: reportlab
embeds TrueType outlines only, not CFF/OpenType. Without any of these files the card
falls back to reportlab's built-in Japanese CID font (HeiseiKakuGo-W5), which is *not*
embedded: a PDF reader without Japanese fonts then shows no Japanese text.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Final
from xml.sax.saxutils import escape

import numpy as np
import reportlab
from PIL import Image
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.lib.utils import ImageReader
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.cidfonts import UnicodeCIDFont
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import Frame, KeepInFrame, Paragraph

from inference.result import AssessmentResult, Region
from sr_writer import prose

FONT: Final = "QcnodeSans"
CJK_FONT: Final = "QcnodeCJK"
#: Not embedded: used only when none of CJK_FONT_CANDIDATES is installed.
CJK_FALLBACK: Final = "HeiseiKakuGo-W5"
FONT_CANDIDATES: Final = (
    Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
    Path(reportlab.__file__).parent / "fonts" / "Vera.ttf",
)
CJK_FONT_CANDIDATES: Final = (
    Path("/usr/share/fonts/truetype/vlgothic/VL-PGothic-Regular.ttf"),
    Path("/usr/share/fonts/truetype/vlgothic/VL-Gothic-Regular.ttf"),
    Path("/usr/share/fonts/opentype/ipafont-gothic/ipagp.ttf"),
    Path("/usr/share/fonts/truetype/takao-gothic/TakaoPGothic.ttf"),
)
#: U+2E80, start of the CJK Radicals Supplement: from here on, text uses the CJK font.
CJK_FIRST_CODEPOINT: Final = 0x2E80
#: Longest explanation put on the card; the SR holds the full text.
MAX_EXPLANATION: Final = 2500
IMAGE_SIZE: Final = 80 * mm


def cjk_font_file() -> Path | None:
    """The embeddable CJK TrueType font in use, or None (then the CID fallback)."""
    return next((p for p in CJK_FONT_CANDIDATES if p.exists()), None)


def _cjk_font() -> str:
    return CJK_FONT if CJK_FONT in pdfmetrics.getRegisteredFontNames() else CJK_FALLBACK


def _register_fonts() -> None:
    if FONT in pdfmetrics.getRegisteredFontNames():
        return
    path = next(p for p in FONT_CANDIDATES if p.exists())
    pdfmetrics.registerFont(TTFont(FONT, str(path)))
    cjk = cjk_font_file()
    if cjk is not None:
        pdfmetrics.registerFont(TTFont(CJK_FONT, str(cjk)))
    else:
        pdfmetrics.registerFont(UnicodeCIDFont(CJK_FALLBACK))


def _is_cjk(ch: str) -> bool:
    return ord(ch) >= CJK_FIRST_CODEPOINT


def markup(text: str) -> str:
    """Escape ``text`` for a Paragraph and switch CJK runs to the CJK font."""
    font = _cjk_font()
    out, run, cjk = [], "", False
    for ch in text:
        if run and _is_cjk(ch) != cjk:
            out.append(f'<font name="{font}">{escape(run)}</font>' if cjk else escape(run))
            run = ""
        cjk = _is_cjk(ch)
        run += ch
    if run:
        out.append(f'<font name="{font}">{escape(run)}</font>' if cjk else escape(run))
    return "".join(out).replace("\n", "<br/>")


def _rgb(image: np.ndarray) -> Image.Image:
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError("the card image must be a uint8 H×W or H×W×3 array")
    return Image.fromarray(image).convert("RGB")


def _outline(
    canvas: Canvas, region: Region, x0: float, y0: float, scale: tuple[float, float],
    height: float,
) -> None:
    """Draw ``region`` (pixel column/row) onto the image placed at (x0, y0)."""
    sx, sy = scale
    pts = [(x0 + c * sx, y0 + height - r * sy) for c, r in region.points]
    canvas.setStrokeColor(colors.red)
    canvas.setLineWidth(1.5)
    if region.graphic_type in ("POLYLINE", "POLYGON"):
        path = canvas.beginPath()
        path.moveTo(*pts[0])
        for p in pts[1:]:
            path.lineTo(*p)
        canvas.drawPath(path, stroke=1, fill=0)
    elif region.graphic_type == "CIRCLE":
        (cx, cy), (px, py) = pts[0], pts[1]
        canvas.circle(cx, cy, float(np.hypot(px - cx, py - cy)), stroke=1, fill=0)
    elif region.graphic_type == "ELLIPSE":
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        canvas.ellipse(min(xs), min(ys), max(xs), max(ys), stroke=1, fill=0)
    else:
        canvas.circle(pts[0][0], pts[0][1], 3, stroke=1, fill=0)


def _draw_image(
    canvas: Canvas, image: np.ndarray, region: Region | None, grid: tuple[int, int],
    x0: float, y0: float,
) -> None:
    """The worst slice, scaled into a square box, with its region outlined."""
    pil = _rgb(image)
    w, h = pil.size
    k = IMAGE_SIZE / max(w, h)
    dw, dh = w * k, h * k
    canvas.drawImage(ImageReader(pil), x0, y0, dw, dh)
    if region is not None:
        rows, cols = grid
        _outline(canvas, region, x0, y0, (dw / cols, dh / rows), dh)


def card_lines(result: AssessmentResult, numbers: prose.Numbers) -> list[str]:
    """The lines beside the image: score, scale, algorithm, worst slice, findings and
    measurements (slices by Instance Number: ``numbers`` from
    :func:`sr_writer.prose.instance_numbers`)."""
    lines = [prose.series_label(result), prose.scale_line(), prose.engine_line(result.engine)]
    worst = result.worst_slice
    if worst is not None:
        lines.append(prose.slice_label(worst, numbers) + " – worst slice, shown")
    lines += [f"Finding: {prose.finding_line(f, numbers)}"
              for f in result.findings] or ["Findings: none"]
    lines += [f"Measured: {prose.evidence_line(m, numbers)}" for m in result.evidence]
    return lines


def render_card(
    result: AssessmentResult,
    header: Sequence[str],
    image: np.ndarray | None = None,
    grid: tuple[int, int] | None = None,
    numbers: prose.Numbers | None = None,
) -> bytes:
    """The card as PDF bytes (one A4 page).

    Parameters
    ----------
    result
        The assessment.
    header
        Identity lines printed at the top (patient, study).
    image
        The worst slice rendered (uint8 H×W or H×W×3), or None.
    grid
        (rows, columns) of the source image the region coordinates refer to.
    numbers
        SOP Instance UID → Instance Number of the assessed images, to name slices by
        (:func:`sr_writer.prose.instance_numbers`).
    """
    _register_fonts()
    buf = io.BytesIO()
    # invariant: no creation time or random ID in the PDF, so equal inputs give equal bytes
    canvas = Canvas(buf, pagesize=A4, pageCompression=1, invariant=1)
    canvas.setTitle("CT image quality card")
    width, height = A4
    body = ParagraphStyle("body", fontName=FONT, fontSize=9, leading=11.5)
    title = ParagraphStyle("title", parent=body, fontSize=16, leading=20)
    big = ParagraphStyle("big", parent=body, fontSize=13, leading=16)
    top = height - 15 * mm
    story = [
        Paragraph("CT image quality card — algorithm output, not verified", title),
        *[Paragraph(markup(h), body) for h in header],
        Paragraph(markup(f"{result.score:.1f} / 4 ({result.label})"), big),
    ]
    Frame(15 * mm, top - 45 * mm, width - 30 * mm, 45 * mm, showBoundary=0).addFromList(
        [KeepInFrame(width - 30 * mm, 45 * mm, story, mode="truncate")], canvas
    )
    y_img = top - 45 * mm - IMAGE_SIZE
    if image is not None:
        worst = result.worst_slice
        _draw_image(canvas, image, worst.region if worst else None,
                    grid or image.shape[:2], 15 * mm, y_img)
    side = [Paragraph(markup(line), body) for line in card_lines(result, numbers or {})]
    side_w = width - 30 * mm - IMAGE_SIZE - 5 * mm
    Frame(15 * mm + IMAGE_SIZE + 5 * mm, y_img, side_w, IMAGE_SIZE).addFromList(
        [KeepInFrame(side_w, IMAGE_SIZE, side, mode="truncate")], canvas
    )
    text = result.explanation or "(no explanation)"
    if len(text) > MAX_EXPLANATION:
        text = text[:MAX_EXPLANATION] + " … (shortened; the full text is in the report)"
    rest_h = y_img - 15 * mm - 5 * mm
    story = [Paragraph("Explanation", big), Paragraph(markup(text), body)]
    Frame(15 * mm, 15 * mm, width - 30 * mm, rest_h).addFromList(
        [KeepInFrame(width - 30 * mm, rest_h, story, mode="truncate")], canvas
    )
    canvas.showPage()
    canvas.save()
    return buf.getvalue()
