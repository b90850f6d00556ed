"""The README's recipe for a new step, followed here: one class and one line in the registry.

The toy step lives only in this test. Nothing else is touched, yet the ledger
records it, the progress display shows it, a rerun resumes around it, and a
skipped step is recorded with its reason.
"""

from __future__ import annotations

import base64
import io
import json
import sqlite3

import pytest
from fixtures_dps import GROUP_PRIMARY

from flasher import pipeline
from flasher.ledger import Ledger
from flasher.progress import JsonReporter
from flasher.steps import Done, Step


class Stamp(Step):
    """A toy step: note the registration id in a file (fails once if asked to)."""

    name = "stamp"
    runs: list[str] = []
    fail_next = False

    def skip_reason(self, board):
        return "no stamping on Mondays" if board.settings.extras.get("DAY") == "monday" else None

    def run(self, board):
        if Stamp.fail_next:
            Stamp.fail_next = False
            raise pipeline.FlasherError("stamp pad is dry")
        Stamp.runs.append(board.registration_id)
        return Done(f"stamped {board.registration_id}", {})


@pytest.fixture
def with_stamp(monkeypatch):
    steps = list(pipeline.STEPS)
    steps.insert([s.name for s in steps].index("register"), Stamp())   # the one registry line
    monkeypatch.setattr(pipeline, "STEPS", steps)
    Stamp.runs, Stamp.fail_next = [], False
    return steps


def settings(emu, tmp_path, **over):
    kw = dict(id_scope="0ne00000001", group_key=base64.b64decode(GROUP_PRIMARY), dps_host=emu.host, ca_cert=str(emu.ca_cert_path),
              out_dir=tmp_path / "h", timeout=30.0, test_message=None)
    kw.update(over)
    return pipeline.Settings(**kw)


def test_a_new_step_is_recorded_shown_and_resumed(with_stamp, sim_boards, dps_emulator, tmp_path):
    sim = sim_boards(1, seed=4242)
    shown = io.StringIO()
    with Ledger(tmp_path / "l.sqlite3") as ledger:
        Stamp.fail_next = True
        [r] = pipeline.provision_boards(sim.ports, settings(dps_emulator, tmp_path), ledger, JsonReporter(shown))
        assert r.status == "failed" and r.failed_step == "stamp" and r.error == "stamp pad is dry"
        rec = ledger.get(r.deveui)
        assert rec.current_step == "stamp" and rec.steps["stamp"] == "failed" and "register" not in rec.steps
        [r] = pipeline.provision_boards(sim.ports, settings(dps_emulator, tmp_path), ledger, JsonReporter(shown))
        assert r.status == "provisioned", r.error
        rec = ledger.get(r.deveui)
        assert rec.steps["stamp"] == "ok" and rec.steps["program"] == "ok" and Stamp.runs == [r.registration_id]
    events = [json.loads(line) for line in shown.getvalue().splitlines()]
    assert {"stamp"} <= {e["step"] for e in events}
    assert any(e["step"] == "stamp" and e["state"] == "ok" and "stamped" in e["detail"] for e in events)


def test_a_new_step_that_does_not_apply_is_recorded_as_skipped_with_its_reason(with_stamp, sim_boards, dps_emulator,
                                                                              tmp_path):
    sim = sim_boards(1, seed=4243)
    with Ledger(tmp_path / "l.sqlite3") as ledger:
        [r] = pipeline.provision_boards(sim.ports, settings(dps_emulator, tmp_path, extras={"DAY": "monday"}), ledger)
        assert r.status == "provisioned", r.error
        assert ledger.get(r.deveui).steps["stamp"] == "skipped" and Stamp.runs == []
    with sqlite3.connect(tmp_path / "l.sqlite3") as db:
        assert db.execute("SELECT detail FROM steps WHERE step = 'stamp'").fetchone()[0] == "no stamping on Mondays"
