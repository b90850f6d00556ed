"""``flasher keys``: the group-key tool, streaming any number of ids."""

from __future__ import annotations

import re
import sys

import click

from flasher.commands.options import config_option, err, group_key_options, id_format_option
from flasher.errors import EXIT_FAILURE, InputError

MAX_LINE = 4096                       # no id is longer than 128 characters; a longer line is not an id list
_EUI_TYPO = re.compile(r"[0-9A-Fa-f]{12,20}")


def _lines(stream, name: str):
    """``(where, text)`` for each non-blank line of a binary stream: UTF-8 (a BOM is fine), bounded lines.

    Read in 1 MiB chunks and decoded a chunk at a time (a newline never falls inside a
    UTF-8 sequence), so 100,000 ids cost little more than the HMACs, and one endless
    line costs at most MAX_LINE bytes before it is refused.
    """
    n, tail, first = 0, b"", True
    read = getattr(stream, "read1", stream.read)   # what is there now: a pipe streams, it does not wait for 1 MiB
    while True:
        chunk = read(1 << 20)
        data = tail + chunk
        if first and data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        first = False
        if not chunk:
            tail, lines = b"", ([data] if data else [])
        else:
            lines = data.split(b"\n")
            tail = lines.pop()
            if len(tail) > MAX_LINE:
                raise InputError(f"--input {name}: line {n + len(lines) + 1} is longer than {MAX_LINE} bytes "
                                 f"(not a list of ids)")
        if not lines:
            if not chunk:
                return
            continue
        block = b"\n".join(lines)
        if b"\0" in block:
            line = n + block[:block.index(b"\0")].count(b"\n") + 1
            raise InputError(f"--input {name}: line {line} holds a NUL byte (binary or UTF-16? expected UTF-8 text)")
        try:
            texts = block.decode("utf-8").split("\n")
        except UnicodeDecodeError as exc:
            line = n + block[:exc.start].count(b"\n") + 1
            raise InputError(f"--input {name}: line {line} is not UTF-8 text") from None
        for text in texts:
            n += 1
            if len(text) > MAX_LINE:
                raise InputError(f"--input {name}: line {n} is longer than {MAX_LINE} bytes (not a list of ids)")
            if text.strip():
                yield f"line {n}", text
        if not chunk:
            return


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
            yield from _lines(input_file, getattr(input_file, "name", "-"))

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
