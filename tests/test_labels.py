"""TR005 labels, read back the way a phone would: the PNG decoded by a real QR decoder (zxing-cpp), the SVG drawn
into pixels from its own path and decoded too, the PDF sheet opened with pypdf (pages, text). Boards come from a real
SQLite ledger."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pypdf
import pytest
import zxingcpp
from PIL import Image, ImageDraw

from flasher.labels import SHEETS, label_for, parse_sheet, render_png, render_svg, write_sheet_pdf
from flasher.ledger import Ledger
from flasher.tr005 import TR005

SVG = "{http://www.w3.org/2000/svg}"


def decode_png(path_or_bytes) -> list[str]:
    import io

    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    return [r.text for r in zxingcpp.read_barcodes(Image.open(src))]


def decode_svg(text: str, px_per_mm: float = 12.0) -> list[str]:
    """Draw the SVG's own path (its QR modules) into an image and decode that: the SVG carries the code, not a copy."""
    root = ET.fromstring(text)
    w, h = (float(v) for v in root.get("viewBox").split()[2:])
    img = Image.new("L", (round(w * px_per_mm), round(h * px_per_mm)), 255)
    draw = ImageDraw.Draw(img)
    d = root.find(f"{SVG}path").get("d")
    for x, y, dx, dy in re.findall(r"M([\d.]+) ([\d.]+)h([\d.]+)v([\d.]+)h-[\d.]+z", d):
        x0, y0 = float(x) * px_per_mm, float(y) * px_per_mm
        draw.rectangle((x0, y0, x0 + float(dx) * px_per_mm - 1, y0 + float(dy) * px_per_mm - 1), fill=0)
    return [r.text for r in zxingcpp.read_barcodes(img)]


def svg_texts(text: str) -> list[str]:
    return [t.text for t in ET.fromstring(text).iter(f"{SVG}text")]


@pytest.mark.parametrize("size", [(63.5, 38.1), SHEETS["a4-65"].label, (40.0, 40.0)])
def test_png_and_svg_decode_to_the_tr005_string_and_show_the_deveui(size):
    serial = "79D9D57D432F6A82EF13BF60A7FABFF2"
    label = label_for("2CF7F12024900138", "70B3D57ED003F06A", vendor_id=0x2886, model_id=0x800C, serial=serial)
    want = "LW:D0:70B3D57ED003F06A:2CF7F12024900138:2886800C:S" + serial
    assert decode_png(render_png(label, size)) == [want]
    svg = render_svg(label, size)
    assert decode_svg(svg) == [want]
    assert "2CF7F12024900138" in svg_texts(svg) and "70B3D57ED003F06A" in svg_texts(svg)


def make_ledger(path: Path) -> dict[str, tuple[str, str | None]]:
    """Three provisioned boards (one without a serial number) and one still in progress; DevEUI → (JoinEUI, SN)."""
    boards = {"2CF7F12024900138": ("70B3D57ED003F06A", "AA01"), "47865C8B00112233": ("70B3D57ED003F06A", None),
              "8CF9572000000001": ("0000000000000000", "CC03")}
    with Ledger(path) as ledger:
        for eui, (join, sn) in boards.items():
            ledger.begin(eui, eui.lower(), join_eui=join, serial_number=sn)
            ledger.finish(eui)
        ledger.begin("1111111111111111", "1111111111111111", join_eui="70B3D57ED003F06A")
    return boards


def test_labels_from_the_ledger_decode_to_what_it_recorded(cli, tmp_path):
    boards = make_ledger(tmp_path / "l.sqlite3")
    code, out, err = cli("labels", "--ledger", tmp_path / "l.sqlite3", "-o", tmp_path / "labels",
                         "--pdf", tmp_path / "sheet.pdf", "--sheet", "a4:1x2", "--label-vendor-id", "2886")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == \
        sorted(f"{eui}.{ext}" for eui in boards for ext in ("png", "svg"))   # not the board still in progress
    for eui, (join, sn) in boards.items():
        [text] = decode_png(tmp_path / "labels" / f"{eui}.png")
        read = TR005.parse(text)
        assert (read.dev_eui.hex, read.join_eui.hex, read.serial or None, read.vendor_id) == (eui, join, sn, 0x2886)
        assert decode_svg((tmp_path / "labels" / f"{eui}.svg").read_text()) == [text]
        assert f"{eui}  {text}" in out
    # the sheet: two labels a page, each page carrying its boards' DevEUIs in text, in the ledger's order
    pdf = pypdf.PdfReader(tmp_path / "sheet.pdf")
    assert len(pdf.pages) == 2
    pages = [page.extract_text() for page in pdf.pages]
    order = list(boards)
    assert [e for e in order if e in pages[0]] == order[:2] and [e for e in order if e in pages[1]] == order[2:]
    assert "1111111111111111" not in "".join(pages)
    assert "3 labels on 2 page(s)" in err


def test_labels_for_deveuis_use_the_ledger_when_it_knows_them(cli, tmp_path):
    make_ledger(tmp_path / "l.sqlite3")
    (tmp_path / "list.csv").write_text("deveui\n# a comment\n47-86-5C-8B-00-11-22-33,extra column\n")
    code, out, err = cli("labels", "0x0102030405060708", "--input", tmp_path / "list.csv", "--ledger",
                         tmp_path / "l.sqlite3", "--join-eui", "1122334455667788", "--json", "-o", tmp_path / "o",
                         "--format", "svg")
    assert code == 2 and "DevEUI (--input line 1) 'deveui'" in err and not (tmp_path / "o").exists()
    (tmp_path / "list.csv").write_text("# DevEUIs\n47-86-5C-8B-00-11-22-33,extra column\n")
    code, out, err = cli("labels", "0x0102030405060708", "--input", tmp_path / "list.csv", "--ledger",
                         tmp_path / "l.sqlite3", "--join-eui", "1122334455667788", "--json", "-o", tmp_path / "o",
                         "--format", "svg")
    assert code == 0, err
    import json

    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["deveui"], r["join_eui"]) for r in rows] == [("0102030405060708", "1122334455667788"),
                                                           ("47865C8B00112233", "70B3D57ED003F06A")]
    assert [Path(f).suffix for r in rows for f in r["files"]] == [".svg", ".svg"]


@pytest.mark.parametrize("args, message", [
    (["0102030405060708"], "say where the labels go"),
    (["0102030405060708", "-o", "{tmp}/o", "--sheet", "a3"], "--sheet 'a3': expected one of"),
    (["0102030405060708", "-o", "{tmp}/o", "--sheet", "a4:0x3"], "1 to 10 columns"),
    (["0102030405060708", "-o", "{tmp}/o", "--label-vendor-id", "Seeed"], "--label-vendor-id 'Seeed': must be 4 hex"),
    (["01020304050607", "-o", "{tmp}/o"], "expected 16 hex digits"),
    (["-o", "{tmp}/o", "--ledger", "{tmp}/none.sqlite3"], "no such file"),
])
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(cli, tmp_path, args, message):
    code, out, err = cli("labels", *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists() and out == ""


@pytest.mark.parametrize("name, size", [("a4:2x2", [595, 842]), ("letter:1x4", [612, 792])])
def test_a_sheet_has_as_many_pages_as_it_needs(tmp_path, name, size):
    sheet = parse_sheet(name)
    labels = [label_for(f"{i:016X}", "70B3D57ED003F06A") for i in range(1, 6)]
    assert write_sheet_pdf(labels, tmp_path / "s.pdf", sheet) == 2
    pdf = pypdf.PdfReader(tmp_path / "s.pdf")
    assert len(pdf.pages) == 2 == math.ceil(5 / sheet.per_page)
    assert [round(float(v)) for v in pdf.pages[0].mediabox[2:]] == size   # the page, in points
    assert pdf.pages[0].extract_text().count("DevEUI") == 4 and pdf.pages[1].extract_text().count("DevEUI") == 1
    assert f"{5:016X}" in pdf.pages[1].extract_text() and f"{5:016X}" not in pdf.pages[0].extract_text()


def test_named_sheets_fit_their_page():
    for sheet in SHEETS.values():
        right, bottom = sheet.cell(sheet.per_page - 1)
        assert 0 < right + sheet.label[0] <= sheet.page[0] + 0.01 and 0 < bottom + sheet.label[1] <= sheet.page[1] + 0.01
        assert sheet.cell(sheet.per_page) == sheet.cell(0)   # the next page starts over


BLOCK_SEGNO = "import sys; sys.modules['segno'] = None\nfrom flasher.cli import main\nmain(sys.argv[1:])\n"


def test_without_the_labels_extra_it_says_which_extra_before_touching_a_board(sim_boards, tmp_path):
    sim = sim_boards(1, seed=77)
    before = sim.boards[0].state
    env = dict(os.environ, FLASHER_GROUP_PRIMARY_KEY="a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5")
    for args in (["labels", "0102030405060708", "-o", str(tmp_path / "o")],
                 ["provision", "--port", sim.ports[0], "--id-scope", "0ne00000001", "--labels", str(tmp_path / "o"),
                  "--ledger", str(tmp_path / "l.sqlite3"), "--out-dir", str(tmp_path / "h")]):
        p = subprocess.run([sys.executable, "-c", BLOCK_SEGNO, *args], capture_output=True, text=True, env=env,
                           timeout=60)
        assert p.returncode == 2, p.stderr
        assert p.stderr.splitlines() == [p.stderr.strip()] and "pip install 'flasher[labels]'" in p.stderr
    assert sim.boards[0].state == before and sim.boards[0].commands == 0
    assert not (tmp_path / "o").exists() and not (tmp_path / "l.sqlite3").exists() and not (tmp_path / "h").exists()
