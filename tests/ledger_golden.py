"""What flasher 0.1.0's ``status --json/--csv`` printed, as a view of what this flasher prints.

Columns added since (each an append at the end of EXPORT_FIELDS) must come after the
0.1.0 ones and be empty for a board an old flasher wrote; with them set aside, the
output must be byte for byte what 0.1.0 printed (``data/ledger-v1.status.*``).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

DATA = Path(__file__).parent / "data"
V1_FIELDS = (DATA / "ledger-v1.status.csv").read_text().splitlines()[0].split(",")


def as_0_1_0_json(text: str) -> str:
    out = []
    for line in text.splitlines():
        row = json.loads(line)
        keys = list(row)
        added = keys[len(V1_FIELDS):-1]
        assert keys[:len(V1_FIELDS)] == V1_FIELDS and keys[-1] == "steps", keys
        assert all(row[k] is None for k in added), {k: row[k] for k in added}
        out.append(json.dumps({k: v for k, v in row.items() if k not in added}) + "\n")
    return "".join(out)


def as_0_1_0_csv(text: str) -> str:
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0][:len(V1_FIELDS)] == V1_FIELDS, rows[0]
    assert all(cell == "" for row in rows[1:] for cell in row[len(V1_FIELDS):])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for row in rows:
        writer.writerow(row[:len(V1_FIELDS)])
    return buf.getvalue()
