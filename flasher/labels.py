"""Board labels: a TR005 QR code and the DevEUI in text, as PNG, SVG and a printable PDF sheet.

The operator sticks one on each board as it comes off the bench; a network server's app claims the board by
scanning it. A label is made only from what the ledger holds (DevEUI, JoinEUI, USB serial number) and the settings'
vendor and model ids: no key ever reaches one (see :mod:`flasher.tr005`).

One layout, in millimetres, is drawn three ways: with Pillow for the PNG, as SVG text, and with fpdf2 for the sheet,
so a label looks the same whichever file is printed. segno makes the QR matrix (pure Python); Pillow and fpdf2 come
with the ``labels`` extra and are imported only here, only when a label is made.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

from flasher.errors import InputError
from flasher.eui import EUI64
from flasher.extras import require
from flasher.tr005 import TR005

FORMATS = ("png", "svg")
DEFAULT_SIZE_MM = (63.5, 38.1)   # one cell of the default sheet: the common 21-up A4 label
QR_BORDER = 2                    # quiet modules around the code (scanners manage with 2; the label's edge adds more)
MONO_EM = 0.6                    # a monospaced digit is 0.6 em wide


@dataclass(frozen=True)
class Label:
    """What one board's label shows."""

    code: TR005
    lines: tuple[tuple[str, str], ...] = field(default=())  # (caption, value) below the DevEUI

    @property
    def deveui(self) -> str:
        return self.code.dev_eui.hex

    @property
    def text(self) -> str:
        return self.code.text()


def label_for(dev_eui: EUI64 | str, join_eui: EUI64 | str, *, vendor_id: int = 0, model_id: int = 0,
              serial: str | None = None) -> Label:
    dev, join = EUI64.coerce(dev_eui, "DevEUI"), EUI64.coerce(join_eui, "JoinEUI")
    code = TR005(join, dev, vendor_id, model_id, serial=serial or "")
    lines = [("JoinEUI", join.hex)] + ([("SN", serial)] if serial else [])
    return Label(code, tuple(lines))


@dataclass(frozen=True)
class LabelPlan:
    """``--labels DIR``: where the label step writes, and the ids every label carries."""

    out_dir: Path
    vendor_id: int = 0
    model_id: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))


# --- sheets -------------------------------------------------------------------------------------------------------

PAGES = {"a4": (210.0, 297.0), "letter": (215.9, 279.4)}


@dataclass(frozen=True)
class Sheet:
    """A page of labels: ``cols`` × ``rows`` cells of ``label`` mm, the first at ``origin``, ``pitch`` apart."""

    name: str
    page: tuple[float, float]
    cols: int
    rows: int
    label: tuple[float, float]
    origin: tuple[float, float]
    pitch: tuple[float, float]
    description: str = ""

    def __str__(self) -> str:
        return self.name

    @property
    def per_page(self) -> int:
        return self.cols * self.rows

    def cell(self, i: int) -> tuple[float, float]:
        """Top-left corner of cell ``i`` on its page (row by row)."""
        row, col = divmod(i % self.per_page, self.cols)
        return self.origin[0] + col * self.pitch[0], self.origin[1] + row * self.pitch[1]


SHEETS = {s.name: s for s in [
    Sheet("a4", PAGES["a4"], 3, 7, (63.5, 38.1), (7.25, 15.15), (66.0, 38.1),
          "A4, 21 labels of 63.5 × 38.1 mm (the common 3 × 7 sheet, e.g. Avery L7160)"),
    Sheet("a4-65", PAGES["a4"], 5, 13, (38.1, 21.2), (4.75, 10.7), (40.6, 21.2),
          "A4, 65 labels of 38.1 × 21.2 mm (e.g. Avery L7651)"),
    Sheet("letter", PAGES["letter"], 3, 10, (66.675, 25.4), (4.7625, 12.7), (69.85, 25.4),
          "US Letter, 30 labels of 2⅝ × 1 in (e.g. Avery 5160)"),
]}
_GRID = re.compile(r"(a4|letter):(\d{1,2})x(\d{1,2})")
GRID_MARGIN = 10.0


def parse_sheet(text: str, where: str = "--sheet") -> Sheet:
    """A named sheet (:data:`SHEETS`) or ``PAGE:COLSxROWS`` (``a4:2x5``): that grid within 10 mm margins."""
    name = str(text).strip().lower()
    if name in SHEETS:
        return SHEETS[name]
    m = _GRID.fullmatch(name)
    if not m:
        raise InputError(f"{where} {text!r}: expected one of {', '.join(SHEETS)} or PAGE:COLSxROWS (a4:3x8, letter:2x5)")
    page = PAGES[m.group(1)]
    cols, rows = int(m.group(2)), int(m.group(3))
    if not (1 <= cols <= 10 and 1 <= rows <= 20):
        raise InputError(f"{where} {text!r}: 1 to 10 columns and 1 to 20 rows")
    w, h = (page[0] - 2 * GRID_MARGIN) / cols, (page[1] - 2 * GRID_MARGIN) / rows
    return Sheet(name, page, cols, rows, (w, h), (GRID_MARGIN, GRID_MARGIN), (w, h), f"{m.group(1)} {cols} × {rows} grid")


# --- one layout for every renderer ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Text:
    x: float
    baseline: float
    size: float        # font size (em) in mm
    text: str
    bold: bool = False


@dataclass(frozen=True)
class _Layout:
    qr_x: float
    qr_y: float
    module: float      # side of one QR module, mm
    texts: tuple[_Text, ...]


def qr_matrix(text: str) -> list[list[bool]]:
    """The code's modules, quiet zone excluded (True = dark). Error correction M: a scuffed label still scans."""
    segno = require("segno", "labels", "a QR label")
    qr = segno.make(text, error="m", micro=False, boost_error=False)
    return [[bool(v) for v in row] for row in qr.matrix]


def _fit(text: str, width: float, size: float, floor: float = 0.0) -> tuple[str, float]:
    """Shrink a line to ``width``, not below ``floor`` mm; what still does not fit is cut from the left (the end of a
    serial number is what tells boards apart). The DevEUI has no floor: it is always whole."""
    need = len(text) * MONO_EM
    size = min(size, max(floor, width / need if need else size))
    room = int(width / (size * MONO_EM) + 1e-9)
    return (text if len(text) <= room else "…" + text[-(room - 1):] if room > 1 else ""), size


def _layout(label: Label, modules: int, w: float, h: float) -> _Layout:
    margin = min(w, h) * 0.06
    side = h - 2 * margin                                  # the code, square, on the left
    module = side / (modules + 2 * QR_BORDER)
    tx = margin + side + margin * 0.5
    tw = max(1.0, w - tx - margin)
    texts: list[_Text] = []
    big_text, big = _fit(label.deveui, tw, h * 0.16)
    y = margin + big * 0.9
    texts.append(_Text(tx, y, big * 0.55, "DevEUI"))
    y += big * 1.05
    texts.append(_Text(tx, y, big, big_text, bold=True))
    for caption, value in label.lines:
        small_text, small = _fit(value, tw, big * 0.62, floor=big * 0.4)
        y += small * 1.5
        texts.append(_Text(tx, y, small * 0.8, caption))
        y += small * 1.05
        texts.append(_Text(tx, y, small, small_text))
    return _Layout(margin + QR_BORDER * module, margin + QR_BORDER * module, module, tuple(texts))


def _runs(matrix: Sequence[Sequence[bool]]) -> Iterable[tuple[int, int, int]]:
    """(row, first column, length) of each horizontal run of dark modules: few shapes, no hairline seams."""
    for r, row in enumerate(matrix):
        c = 0
        while c < len(row):
            if row[c]:
                start = c
                while c < len(row) and row[c]:
                    c += 1
                yield r, start, c - start
            else:
                c += 1


# --- renderers -----------------------------------------------------------------------------------------------------

def render_svg(label: Label, size_mm: tuple[float, float] = DEFAULT_SIZE_MM) -> str:
    """The label as SVG in millimetres: one path for the code, text in a monospaced font."""
    w, h = size_mm
    matrix = qr_matrix(label.text)
    lay = _layout(label, len(matrix), w, h)
    m = lay.module
    path = "".join(f"M{lay.qr_x + c * m:.4f} {lay.qr_y + r * m:.4f}h{n * m:.4f}v{m:.4f}h{-n * m:.4f}z"
                   for r, c, n in _runs(matrix))
    bold = ' font-weight="bold"'
    texts = "".join(f'<text x="{t.x:.3f}" y="{t.baseline:.3f}" font-size="{t.size:.3f}"{bold if t.bold else ""}>'
                    f"{escape(t.text)}</text>" for t in lay.texts)
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}mm" height="{h}mm" viewBox="0 0 {w} {h}">'
            f"<title>{escape(label.text)}</title>"
            f'<rect width="{w}" height="{h}" fill="#fff"/>'
            f'<path fill="#000" d="{path}"/>'
            f'<g font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" fill="#000">{texts}</g></svg>\n')


def render_png(label: Label, size_mm: tuple[float, float] = DEFAULT_SIZE_MM, dpi: int = 300) -> bytes:
    """The label as a 1-bit PNG at ``dpi`` (300: a thermal label printer's resolution)."""
    Image = require("PIL.Image", "labels", "a PNG label")
    ImageDraw = require("PIL.ImageDraw", "labels", "a PNG label")
    ImageFont = require("PIL.ImageFont", "labels", "a PNG label")
    px = dpi / 25.4
    w, h = size_mm
    matrix = qr_matrix(label.text)
    lay = _layout(label, len(matrix), w, h)
    img = Image.new("L", (round(w * px), round(h * px)), 255)
    draw = ImageDraw.Draw(img)
    m = max(1, int(lay.module * px))  # a whole number of pixels per module: every module the same, edges crisp
    qx, qy = round(lay.qr_x * px), round(lay.qr_y * px)
    for r, c, n in _runs(matrix):
        draw.rectangle((qx + c * m, qy + r * m, qx + (c + n) * m - 1, qy + (r + 1) * m - 1), fill=0)
    for t in lay.texts:
        size = max(6, round(t.size * px))
        font = ImageFont.load_default(size=size)
        room = w * px - t.x * px - 2
        while size > 6 and font.getlength(t.text) > room:  # the default font is a little wider than monospace
            size -= 1
            font = ImageFont.load_default(size=size)
        draw.text((t.x * px, t.baseline * px), t.text, fill=0, font=font, anchor="ls",
                  stroke_width=1 if t.bold and size >= 14 else 0, stroke_fill=0)
    out = io.BytesIO()
    img.convert("1", dither=Image.Dither.NONE).save(out, format="PNG", optimize=True, dpi=(dpi, dpi))
    return out.getvalue()


def write_label_files(label: Label, out_dir: str | os.PathLike, formats: Iterable[str] = FORMATS,
                      size_mm: tuple[float, float] = DEFAULT_SIZE_MM) -> list[Path]:
    """``<out_dir>/<DEVEUI>.png`` and ``.svg``, each written atomically; returns the paths."""
    from flasher.files import atomic_write

    written = []
    for fmt in formats:
        path = Path(out_dir) / f"{label.deveui}.{fmt}"
        data = render_png(label, size_mm) if fmt == "png" else render_svg(label, size_mm)
        atomic_write(path, data, mode=0o644, what="label")
        written.append(path)
    return written


def write_sheet_pdf(labels: Sequence[Label], path: str | os.PathLike, sheet: Sheet) -> int:
    """Every label on ``sheet``-shaped pages, vector QR codes and text; returns the number of pages."""
    fpdf = require("fpdf", "labels", "a PDF label sheet")
    from flasher.files import atomic_write

    if not labels:
        raise InputError("no labels to put on a sheet")
    pdf = fpdf.FPDF(unit="mm", format=sheet.page)
    pdf.set_auto_page_break(False)
    pdf.set_margins(0, 0, 0)
    pdf.set_creator("flasher")
    pdf.set_title(f"flasher labels ({len(labels)} boards, {sheet.name})")
    pdf.set_fill_color(0, 0, 0)
    pt_per_mm = 72 / 25.4
    for i, label in enumerate(labels):
        if i % sheet.per_page == 0:
            pdf.add_page()
        x0, y0 = sheet.cell(i)
        matrix = qr_matrix(label.text)
        lay = _layout(label, len(matrix), *sheet.label)
        m = lay.module
        for r, c, n in _runs(matrix):
            pdf.rect(x0 + lay.qr_x + c * m, y0 + lay.qr_y + r * m, n * m, m, style="F")
        for t in lay.texts:
            pdf.set_font("Courier", "B" if t.bold else "", t.size * pt_per_mm)
            pdf.text(x0 + t.x, y0 + t.baseline, t.text.replace("…", "~"))  # core fonts are Latin-1
    atomic_write(path, bytes(pdf.output()), mode=0o644, what="label sheet")
    return math.ceil(len(labels) / sheet.per_page)
