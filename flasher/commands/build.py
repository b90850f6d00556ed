"""``flasher build``: the firmware sketch with one header, built for the real board (no board needed)."""

from __future__ import annotations

import click

from flasher.commands.options import config_option, setting_option


@click.command("build")
@click.argument("header", type=click.Path(dir_okay=False, exists=True))
@setting_option("--sketch", name="sketch", type=click.Path(file_okay=False))
@setting_option("--fqbn", name="fqbn")
@setting_option("--builder", name="builder", type=click.Choice(["arduino-cli", "arduino-builder"]))
@setting_option("--arduino-cli", name="arduino_cli", metavar="PATH")
@setting_option("--samd-core", name="samd_core", metavar="DIR", type=click.Path(file_okay=False))
@click.option("-o", "--output-dir", type=click.Path(file_okay=False),
              help="Copy the .bin/.hex/.elf here (0600: they hold the header's keys).")
@config_option
def build_cmd(header, output_dir, **_options):
    """Build the sketch with HEADER as its config.h for the board; print its flash size.

    Prints SKETCH<TAB>BYTES<TAB>MAXIMUM<TAB>BUILDER. The build runs in a private folder beside HEADER,
    removed afterwards; with -o the images are kept.

    \b
    Example:
      flasher header 2CF7F12024900138 --app-key-file appkey.txt -o 2CF7F12024900138.h
      flasher build 2CF7F12024900138.h --builder arduino-builder --samd-core ../shared/arduino-samd
    """
    from pathlib import Path

    from flasher.arduino import FLASH_MAX, default_sketch, make_builder
    from flasher.settings import from_click

    s = from_click(["sketch", "fqbn", "builder", "arduino_cli", "samd_core"])
    tool = make_builder(s.builder, fqbn=s.fqbn, arduino_cli=s.arduino_cli, samd_core=s.samd_core)
    sketch = Path(s.sketch or default_sketch())
    size = tool.build(sketch, header, output_dir=output_dir)
    click.echo(f"{sketch.name}\t{size if size is not None else '?'}\t{FLASH_MAX}\t{tool.name}")
    return 0
