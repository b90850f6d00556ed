"""Make ``ledger-v1.sqlite3``: a ledger exactly as flasher 0.1.0 (commit 5badb68) writes it.

Run with flasher 0.1.0 / commit 5badb68 installed, never with a later flasher,
since the point is to keep a real old ledger for the migration tests:

    git worktree add /tmp/f010 5badb68 && cd /tmp/f010 && pip install -e . &&
    python tests/data/make_ledger_v1.py tests/data/ledger-v1.sqlite3

The clock is fixed (one second per write from 1_700_000_000) so reruns give the
same rows. The WAL is checkpointed and removed, so the result is one file. Beside
it go ``ledger-v1.status.jsonl`` and ``ledger-v1.status.csv``: what
``flasher status --json/--csv`` printed for it, which later versions must keep.
"""

from __future__ import annotations

import sqlite3
import sys
import time
from pathlib import Path
from unittest import mock

from flasher.ledger import Ledger, export_csv, export_json

STEPS = ("derive", "render", "program", "upload", "register", "message")
FINGERPRINT = {"join_eui": "0000000000000000", "band": "EU868", "app_key_source": "derived", "id_scope": "0ne0001A2B3"}


def make(path: Path) -> None:
    clock = iter(range(1_700_000_000, 1_700_001_000))
    with mock.patch.object(time, "time", lambda: float(next(clock))), Ledger(path) as led:
        # provisioned: every step ok, upload skipped (no --upload)
        eui = "2CF7F12024900001"
        led.begin(eui, eui.lower(), port="/dev/ttyACM0", serial_number="8A5E3F2B51524B", device_key_check="3f1c0a9e5b7d2e44",
                  **FINGERPRINT)
        for step in STEPS:
            led.step_started(eui, step)
            if step == "upload":
                led.step_finished(eui, step, "skipped", "--upload not given")
            elif step == "render":
                led.step_finished(eui, step, "ok", f"headers/{eui}.h", header_path=f"headers/{eui}.h",
                                  header_sha256="9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08")
            elif step == "register":
                led.step_finished(eui, step, "ok", f"{eui.lower()}@hub-1.azure-devices.net",
                                  assigned_hub="hub-1.azure-devices.net", device_id=eui.lower())
            else:
                led.step_finished(eui, step)
        led.finish(eui)

        # failed at register, with the error kept
        eui = "2CF7F12024900002"
        led.begin(eui, eui.lower(), port="/dev/ttyACM1", device_key_check="77aa01c4d2e9f310", **FINGERPRINT)
        for step in STEPS[:4]:
            led.step_started(eui, step)
            led.step_finished(eui, step, "skipped" if step == "upload" else "ok")
        led.step_started(eui, "register")
        led.step_finished(eui, "register", "failed", "DPS refused the registration: 401 Unauthorized (wrong group key?)")

        # in progress: killed while programming
        eui = "2CF7F12024900003"
        led.begin(eui, eui.lower(), port="/dev/ttyACM2", device_key_check="0b3d5f7a9c1e2a4b", **FINGERPRINT)
        for step in STEPS[:2]:
            led.step_started(eui, step)
            led.step_finished(eui, step)
        led.step_started(eui, "program")

        # second attempt after a failure, now in progress at register (attempts = 2)
        eui = "2CF7F12024900004"
        led.begin(eui, "board-" + eui.lower(), port="/dev/ttyACM3", **FINGERPRINT)
        led.step_started(eui, "derive")
        led.step_finished(eui, "derive", "failed", "port '/dev/ttyACM3': unplugged")
        led.begin(eui, "board-" + eui.lower(), port="/dev/ttyACM4")
        for step in STEPS[:4]:
            led.step_started(eui, step)
            led.step_finished(eui, step)
        led.step_started(eui, "register")
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    with Ledger(path, create=False) as led:
        records = led.all()
    path.with_suffix(".status.jsonl").write_text(export_json(records))
    path.with_suffix(".status.csv").write_text(export_csv(records))
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("ledger-v1.sqlite3"))
    out.unlink(missing_ok=True)
    make(out)
    print(out)
