"""Lists of ids from a file or stdin: one per line, or a column of a CSV file with a header.

Streamed: any number of ids in the memory of one chunk. Input is untrusted: bytes that
are not UTF-8 text, NULs and endless lines are refused with the line they are on.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from typing import BinaryIO

from flasher.errors import InputError

MAX_LINE = 4096                       # no id is longer than 128 characters; a longer line is not an id list
ID_COLUMNS = ("registration_id", "deveui")   # what `flasher keys --format csv` and `flasher status --csv` write


def read_lines(stream, name: str):
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


def read_ids(stream: BinaryIO, name: str, column: str | None = None) -> Iterator[tuple[str, str]]:
    """``(where, id)`` for each id: a line each, or ``column`` of a CSV file whose first line is its header.

    Without ``column``, a first line that holds a comma, or is just ``registration_id`` or
    ``deveui``, is a CSV header, and the first of :data:`ID_COLUMNS` it has is used.
    """
    lines = read_lines(stream, name)
    first = next(lines, None)
    if first is None:
        return
    where, text = first
    header = [h.strip() for h in next(csv.reader([text]))]
    if column is None and "," not in text and text.strip() not in ID_COLUMNS:
        yield where, text.strip()
        yield from ((w, t.strip()) for w, t in lines)
        return
    wanted = [column] if column is not None else [c for c in ID_COLUMNS if c in header]
    if not wanted or wanted[0] not in header:
        raise InputError(f"--input {name}: {where}: " + (
            f"the header has no column {column!r} (it has {', '.join(map(repr, header))})" if column is not None else
            f"a CSV header without a {' or '.join(ID_COLUMNS)} column: name the column with --column"))
    index = header.index(wanted[0])
    for where, text in lines:
        row = next(csv.reader([text]))
        if index >= len(row) or not row[index].strip():
            raise InputError(f"--input {name}: {where}: no value in column {wanted[0]!r}")
        yield where, row[index].strip()
