"""What ``flasher status`` must print for ``data/ledger-v1.sqlite3``: exactly what 0.1.0 printed
(``data/ledger-v1.status.*``), plus, at the end of each row, the columns added since (empty for
a board 0.1.0 provisioned). Taken from EXPORT_FIELDS, so a branch that adds a column changes no test.
"""

from __future__ import annotations

import json
from pathlib import Path

from flasher.ledger import EXPORT_FIELDS

DATA = Path(__file__).parent / "data"
V1_FIELDS = EXPORT_FIELDS[:EXPORT_FIELDS.index("updated_at") + 1]  # what 0.1.0 exported, in its order
ADDED = EXPORT_FIELDS[len(V1_FIELDS):]


def v1_status(kind: str) -> str:
    """The expected ``status --json`` ("jsonl") or ``--csv`` ("csv") output for the v1 fixture."""
    text = (DATA / f"ledger-v1.status.{kind}").read_text()
    if kind == "csv":
        header, *rows = text.splitlines()
        assert header.split(",") == list(V1_FIELDS)
        return ",".join(EXPORT_FIELDS) + "\n" + "".join(row + "," * len(ADDED) + "\n" for row in rows)
    out = []
    for line in text.splitlines():
        old = json.loads(line)
        steps = old.pop("steps")
        assert list(old) == list(V1_FIELDS)
        out.append(json.dumps({**old, **dict.fromkeys(ADDED), "steps": steps}) + "\n")
    return "".join(out)
