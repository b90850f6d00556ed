"""``flasher keys``: the group-key tool, streaming any number of ids."""

from __future__ import annotations

import re
import sys

import click

from flasher.commands.options import config_option, err, group_key_options, id_format_option
from flasher.errors import EXIT_FAILURE
from flasher.idlist import read_lines

_EUI_TYPO = re.compile(r"[0-9A-Fa-f]{12,20}")


@click.command()
@click.argument("ids", nargs=-1, metavar="[ID_OR_EUI]...")
@click.option("--input", "input_file", type=click.File("rb"), help="Read ids, one per line ('-' for stdin).")
@click.option("--format", "fmt", type=click.Choice(["text", "csv", "json"]), default="text", show_default=True)
@click.option("--on-error", type=click.Choice(["stop", "skip"]), default="stop", show_default=True,
              help="On a bad id: stop at once, or report it and go on. Either way the exit code is 1.")
@id_format_option
@group_key_options
@config_option
def keys(ids, input_file, fmt, on_error, **_options):
    """Derive DPS device keys from the enrollment group's keys.

    Each ID_OR_EUI is a registration id, or a DevEUI that becomes one through
    --registration-id-format. Output streams: any number of ids, constant memory.

    \b
    Example:
      export FLASHER_GROUP_PRIMARY_KEY=...   # never on the command line
      flasher keys 2CF7F12024900138 --format csv
      flasher keys --input deveuis.txt --format json > keys.jsonl
    """
    from flasher.keys import key_rows
    from flasher.settings import from_click

    if not ids and input_file is None:
        raise click.UsageError("give ids as arguments or --input FILE")
    settings = from_click(["registration_id_format"])
    policy = settings.registration_id_format
    primary = settings.secret("group_key", prompt=True, warn=err)
    secondary = settings.secret("secondary_key", required=False, warn=err)
    from flasher.keys import decode_symmetric_key

    primary_raw = decode_symmetric_key(primary.reveal(), "group primary key")
    secondary_raw = decode_symmetric_key(secondary.reveal(), "group secondary key") if secondary else None

    def items():
        for n, a in enumerate(ids, 1):
            if _EUI_TYPO.fullmatch(a.strip()) and len(a.strip()) != 16:
                err(f"warning: argument {n} {a.strip()!r} has {len(a.strip())} hex digits: a mistyped DevEUI? "
                    f"(used as a registration id)")
            yield f"argument {n}", a
        if input_file is not None:
            yield from read_lines(input_file, getattr(input_file, "name", "-"))

    # ids cannot contain ',', quotes or backslashes and keys are base64: no CSV quoting or JSON escaping needed
    if fmt == "csv":
        row = "{1},{2},{3}\n".format
    elif fmt == "json":
        row = '{{"registration_id": "{1}", "primary_device_key": "{2}", "secondary_device_key": {3}}}\n'.format
    else:
        row = "{1}\t{2}\t{3}\n".format if secondary else "{1}\t{2}\n".format
    null = "null" if fmt == "json" else ""
    out, batch, failed = sys.stdout, [], 0
    if fmt == "csv":
        batch.append("registration_id,primary_device_key,secondary_device_key\n")
    for where, rid, p, s, exc in key_rows(items(), policy, primary_raw, secondary_raw):
        if exc is not None:
            out.write("".join(batch))
            batch.clear()
            out.flush()
            failed += 1
            err(f"error: {where}: {exc}")
            if on_error == "stop":
                return EXIT_FAILURE
            continue
        batch.append(row(where, rid, p, (f'"{s}"' if fmt == "json" else s) if s else null))
        if len(batch) >= 1024:  # constant memory, few syscalls; one write of one string encodes fastest
            out.write("".join(batch))
            batch.clear()
    out.write("".join(batch))
    return EXIT_FAILURE if failed else 0
