"""Two `flasher provision` runs at once on overlapping boards: every board is done once, by one of them.

Run A takes boards 0 and 1, run B (started while A works) boards 1 and 2, on the
same ledger (a SQLite file, or a database on a PostgreSQL server). A holds board 1's
port for the board's whole run, so B cannot talk to it; B's other board is its own. Afterwards DPS has exactly one registration
attempt and the hub exactly one message per board, and B's rerun finds board 1
already provisioned. With two ledgers the port lock alone keeps B away while A works.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter

import pytest
from fixtures_dps import GROUP_PRIMARY, ID_SCOPE

from flasher.ledger import Ledger


def start(ports, emu, ledger, out_dir):
    args = [sys.executable, "-m", "flasher", "provision", *[a for p in ports for a in ("--port", p)], "--id-scope",
            ID_SCOPE, "--dps-host", emu.host, "--ca-cert", str(emu.ca_cert_path), "--ledger", str(ledger),
            "--out-dir", str(out_dir), "--json", "-q"]
    env = dict(os.environ, FLASHER_GROUP_PRIMARY_KEY=GROUP_PRIMARY)
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc):
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, {r["port"]: r for r in map(json.loads, out.splitlines())}, err


@pytest.mark.parametrize("ledgers", ["one-ledger", "two-ledgers", "one-postgres-ledger"])
def test_overlapping_runs_do_each_board_once(sim_boards, make_dps_emulator, tmp_path, request, ledgers):
    emu = make_dps_emulator(assign_delay=120.0)  # DPS holds A's registrations (and so A its ports) until B is done
    sim = sim_boards(3, seed=2024)
    shared_ledger = ledgers != "two-ledgers"
    if ledgers == "one-postgres-ledger":
        ledger_a = ledger_b = request.getfixturevalue("pg_url")
    else:
        ledger_a = str(tmp_path / "a.sqlite3")
        ledger_b = ledger_a if shared_ledger else str(tmp_path / "b.sqlite3")
    a = start(sim.ports[:2], emu, ledger_a, tmp_path / "ha")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and emu.state()["stats"]["register_requests"] < 2:
            time.sleep(0.05)   # A is registering both of its boards: it has programmed them and holds their ports
        emu.assign_delay = 0.0   # B's own board registers at once
        code_b, results_b, err_b = finish(start(sim.ports[1:], emu, ledger_b, tmp_path / "hb"))
    finally:
        emu.assign_now()         # A finishes
    code_a, results_a, err_a = finish(a)
    assert code_a == 0, err_a
    assert [results_a[p]["status"] for p in sim.ports[:2]] == ["provisioned", "provisioned"]
    assert results_b[sim.ports[2]]["status"] == "provisioned", err_b
    contested = results_b[sim.ports[1]]
    assert code_b == 1 and contested["status"] == "failed" and "busy" in contested["error"], contested
    state = emu.state()
    attempts = {r["registrationId"]: r["attempts"] for r in state["registrations"]}
    assert sorted(attempts) == sorted(b.deveui.lower() for b in sim.boards)
    assert set(attempts.values()) == {1}, attempts
    assert set(Counter(m["device_id"] for m in state["messages"]).values()) == {1}
    if shared_ledger:   # B's rerun: board 1 is A's, and done
        code, results, err = finish(start(sim.ports[1:2], emu, ledger_b, tmp_path / "hb"))
        assert code == 0 and results[sim.ports[1]]["status"] == "already_provisioned", err
        with Ledger(ledger_a, readonly=True, create=False) as ledger:
            assert [r.status for r in ledger.all()] == ["provisioned"] * 3
