"""What `flasher status` printed for ``data/ledger-v1.sqlite3`` in 0.1.0, with the fields added since.

Output fields are only ever appended (EXPORT_FIELDS), so for an old ledger today's
export is 0.1.0's, byte for byte, with each newer field appended as null (JSON, before
"steps") or empty (CSV). The 0.1.0 fields must stay first and in their order.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from flasher.ledger import EXPORT_FIELDS

DATA = Path(__file__).parent / "data"


def golden(kind: str) -> str:
    """The golden export of the v1 ledger ("jsonl" or "csv") as this flasher prints it."""
    text = (DATA / f"ledger-v1.status.{kind}").read_text()
    if kind == "jsonl":
        out = []
        for line in text.splitlines():
            old = json.loads(line)
            kept = [k for k in old if k != "steps"]
            assert kept == list(EXPORT_FIELDS[:len(kept)]), "0.1.0's fields must stay first, in their order"
            out.append(json.dumps({**{f: old.get(f) for f in EXPORT_FIELDS}, "steps": old["steps"]}) + "\n")
        return "".join(out)
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == list(EXPORT_FIELDS[:len(rows[0])]), "0.1.0's columns must stay first, in their order"
    added = len(EXPORT_FIELDS) - len(rows[0])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(EXPORT_FIELDS)
    for row in rows[1:]:
        w.writerow(row + [""] * added)
    return buf.getvalue()
