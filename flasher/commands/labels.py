"""``flasher labels``: TR005 QR labels for boards, as PNG/SVG files and a printable PDF sheet."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from flasher.commands.options import config_option, json_line, setting_option
from flasher.errors import FlasherError, InputError

LABEL_SETTINGS = ["ledger", "join_eui", "label_vendor_id", "label_model_id", "label_sheet"]


def _read_euis(args: tuple[str, ...], input_file: str | None) -> list[str]:
    from flasher.eui import EUI64

    lines: list[tuple[str, str]] = [(text, "argument") for text in args]
    if input_file:
        try:
            text = sys.stdin.read() if input_file == "-" else Path(input_file).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"--input {input_file!r}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
        lines += [(line.split(",")[0].strip(), f"--input line {n}") for n, line in enumerate(text.splitlines(), 1)
                  if line.strip() and not line.lstrip().startswith("#")]
    euis = [EUI64.parse(text, f"DevEUI ({where})").hex for text, where in lines]
    return list(dict.fromkeys(euis))


@click.command()
@click.argument("deveuis", nargs=-1, metavar="[DEVEUI]...")
@click.option("--input", "input_file", metavar="FILE", help="DevEUIs, one a line ('-': stdin; a CSV's first column).")
@setting_option("--ledger", name="ledger", type=click.Path(dir_okay=False))
@setting_option("--join-eui", name="join_eui", metavar="EUI",
                help="JoinEUI for DevEUIs the ledger does not know [default: 0000000000000000]")
@setting_option("--label-vendor-id", name="label_vendor_id", metavar="HEX")
@setting_option("--label-model-id", name="label_model_id", metavar="HEX")
@click.option("-o", "--out-dir", "out_dir", type=click.Path(file_okay=False), help="Write <DEVEUI>.png and .svg here.")
@click.option("--format", "formats", type=click.Choice(["png", "svg"]), multiple=True,
              help="Only these file formats (repeatable) [default: png and svg].")
@click.option("--pdf", "pdf_path", type=click.Path(dir_okay=False), help="Also write a printable sheet of every label.")
@setting_option("--sheet", name="label_sheet", metavar="SHEET")
@click.option("--json", "as_json", is_flag=True, help='One object per label: {"deveui", "join_eui", "qr", "files"}.')
@config_option
def labels(deveuis, input_file, out_dir, formats, pdf_path, as_json, **_options):
    """Labels with a LoRa Alliance TR005 QR code and the DevEUI in text, one per board.

    Without DEVEUIs: every provisioned board in the ledger. With DEVEUIs (or
    --input): those boards, with the JoinEUI and USB serial number the ledger
    recorded for them, else --join-eui. A label never carries a key.

    \b
    Example:
      flasher labels -o labels --pdf labels.pdf                 # every provisioned board
      flasher labels 2CF7F12024900138 --join-eui 70B3D57ED003F06A --pdf one.pdf --sheet a4-65
    """
    from flasher.commands.options import open_ledger
    from flasher.extras import require
    from flasher.labels import label_for, write_label_files, write_sheet_pdf
    from flasher.ledger import is_url
    from flasher.settings import from_click

    if not out_dir and not pdf_path:
        raise click.UsageError("say where the labels go: -o DIR and/or --pdf FILE")
    s = from_click(LABEL_SETTINGS)
    wanted = _read_euis(deveuis, input_file)
    require("segno", "labels", "flasher labels")
    require("PIL.Image", "labels", "flasher labels")
    if pdf_path:
        require("fpdf", "labels", "a PDF label sheet")
    known = {}
    if not wanted or is_url(s.ledger) or Path(s.ledger).exists():
        with open_ledger(s, create=False, readonly=True) as ledger:
            if wanted:
                known = {eui: rec for eui in wanted if (rec := ledger.get(eui)) is not None}
            else:
                known = {r.deveui: r for r in ledger.iter_records() if r.status == "provisioned"}
                wanted = list(known)
    if not wanted:
        raise InputError(f"ledger {s.ledger!r}: no provisioned board to label (give DevEUIs to label others)")
    made = []
    for eui in wanted:
        rec = known.get(eui)
        join = rec.join_eui if rec is not None and rec.join_eui else s.join_eui
        made.append(label_for(eui, join, vendor_id=int(s.label_vendor_id, 16), model_id=int(s.label_model_id, 16),
                              serial=rec.serial_number if rec is not None else None))
    if out_dir:
        from flasher.files import make_private_dirs

        try:
            make_private_dirs(out_dir)
        except OSError as exc:
            raise InputError(f"--out-dir {out_dir!r}: cannot make the folder ({exc.strerror or exc})") from None
    try:
        for label in made:
            files = [str(p) for p in write_label_files(label, out_dir, formats or ("png", "svg"))] if out_dir else []
            if as_json:
                json_line({"deveui": label.deveui, "join_eui": label.code.join_eui.hex, "qr": label.text, "files": files})
            else:
                click.echo(f"{label.deveui}  {label.text}" + (f"  {' '.join(files)}" if files else ""))
        pages = write_sheet_pdf(made, pdf_path, s.label_sheet) if pdf_path else 0
    except OSError as exc:
        raise FlasherError(f"labels: cannot write {getattr(exc, 'filename', None) or ''!s} "
                           f"({exc.strerror or exc})") from None
    if pdf_path:
        click.echo(f"{pdf_path}: {len(made)} labels on {pages} page(s) ({s.label_sheet.description})", err=True)
    return 0
