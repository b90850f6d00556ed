"""Several stations, one PostgreSQL ledger: real `flasher provision` processes, a real server, the DPS emulator.

Two stations never see one physical board at once, but they do see one DevEUI: a
board carried from a bench whose run died, a cloned DevEUI. Two board simulators
with the same seed stand for that: the same DevEUIs on different ports.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

from fixtures_dps import GROUP_PRIMARY, ID_SCOPE

from flasher.errors import FlasherError
from flasher.ledger import Ledger


def station(name, ports, emu, ledger, out_dir, *extra):
    args = [sys.executable, "-m", "flasher", "provision", *[a for p in ports for a in ("--port", p)], "--id-scope",
            ID_SCOPE, "--dps-host", emu.host, "--ca-cert", str(emu.ca_cert_path), "--ledger", ledger,
            "--out-dir", str(out_dir), "--station-id", name, "--json", "-q", *extra]
    env = dict(os.environ, FLASHER_GROUP_PRIMARY_KEY=GROUP_PRIMARY)
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=90):
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, {r["deveui"]: r for r in map(json.loads, out.splitlines())}, err


def stop(proc) -> None:
    """Whatever happened in the test, the station is gone afterwards (killed by pid)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    for pipe in (proc.stdout, proc.stderr):
        pipe.close()


def cli(*args, env_extra=None):
    return subprocess.run([sys.executable, "-m", "flasher", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env_extra or {})})


def wait_until(what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def step_rows(url: str, eui: str) -> dict[str, tuple[str, str]]:
    """step -> (outcome, station), read with plain psycopg."""
    import psycopg

    with psycopg.connect(url) as conn:
        return {s: (o, st) for s, o, st in conn.execute("SELECT step, outcome, station FROM steps WHERE deveui = %s",
                                                         (eui,))}


def test_two_stations_on_overlapping_boards_do_each_once_and_status_shows_both(sim_boards, make_dps_emulator, pg_url,
                                                                              tmp_path):
    emu = make_dps_emulator(assign_delay=120.0)   # DPS holds station A's registrations until B is done
    bench_a = sim_boards(2, seed=4242, state_dir=tmp_path / "a")
    bench_b = sim_boards(3, seed=4242, state_dir=tmp_path / "b")   # boards 0 and 1 carry A's DevEUIs
    x0, x1, x2 = (b.deveui for b in bench_b.boards)
    a = station("bench-a", bench_a.ports, emu, pg_url, tmp_path / "ha")
    try:
        wait_until(lambda: emu.state()["stats"]["register_requests"] >= 2, 60)  # A has claimed and programmed both
        emu.assign_delay = 0.0   # B's own board registers at once
        code_b, results_b, err_b = finish(station("bench-b", bench_b.ports[1:], emu, pg_url, tmp_path / "hb"))
    finally:
        emu.assign_now()         # A finishes
    code_a, results_a, err_a = finish(a)
    assert code_a == 0 and [results_a[e]["status"] for e in (x0, x1)] == ["provisioned"] * 2, err_a
    assert code_b == 1 and results_b[x2]["status"] == "provisioned", err_b
    assert results_b[x1]["status"] == "busy", results_b[x1]
    assert results_b[x1]["error"].startswith("in progress at station bench-a (pid ")
    assert f"error: {x1}: " in err_b and "in progress at station bench-a" in err_b
    assert bench_b.boards[1].state.get("appkey") in (None, "")  # B never touched its copy of the contested board
    state = emu.state()
    attempts = {r["registrationId"]: r["attempts"] for r in state["registrations"]}
    assert attempts == {e.lower(): 1 for e in (x0, x1, x2)}
    assert set(Counter(m["device_id"] for m in state["messages"]).values()) == {1}
    # the fleet view: every station's boards, and each one's
    status = cli("status", "--ledger", pg_url, "--json")
    assert status.returncode == 0, status.stderr
    rows = {r["deveui"]: r for r in map(json.loads, status.stdout.splitlines())}
    assert {e: (r["station"], r["status"]) for e, r in rows.items()} == {
        x0: ("bench-a", "provisioned"), x1: ("bench-a", "provisioned"), x2: ("bench-b", "provisioned")}
    only_b = cli("status", "--ledger", pg_url, "--station", "bench-b", "--csv").stdout.splitlines()
    assert "station" in only_b[0].split(",") and [line.split(",")[0] for line in only_b[1:]] == [x2]
    table = cli("status", "--ledger", pg_url).stdout
    assert "STATION" in table and table.count("bench-a") == 2 and table.count("bench-b") == 1
    assert {st for _, st in step_rows(pg_url, x2).values()} == {"bench-b"}
    assert {st for _, st in step_rows(pg_url, x1).values()} == {"bench-a"}
    # B again, now that A is done: nothing is redone
    code, results, err = finish(station("bench-b", bench_b.ports[1:2], emu, pg_url, tmp_path / "hb"))
    assert code == 0 and results[x1]["status"] == "already_provisioned", err
    assert {r["registrationId"]: r["attempts"] for r in emu.state()["registrations"]}[x1.lower()] == 1


def test_a_killed_stations_board_is_taken_over_after_its_heartbeat_stops(sim_boards, make_dps_emulator, pg_url,
                                                                          tmp_path):
    emu = make_dps_emulator(assign_delay=3.0)
    sim = sim_boards(1, seed=4343)
    eui = sim.boards[0].deveui
    a = station("bench-a", sim.ports, emu, pg_url, tmp_path / "h")
    try:
        with _reader(pg_url) as reader:
            wait_until(lambda: (rec := reader.get(eui)) is not None and rec.current_step == "register")
        programmed = sim.boards[0].state["appkey"]
        os.kill(a.pid, signal.SIGKILL)   # no chance to release its claim or record anything
        killed = time.monotonic()
    finally:
        stop(a)
    # another station at once: bench-a's heartbeat is fresh, so the board is bench-a's (as far as anyone can tell)
    code, results, err = finish(station("bench-b", sim.ports, emu, pg_url, tmp_path / "h", "--claim-timeout", "60"))
    assert code == 1 and results[eui]["status"] == "busy" and "in progress at station bench-a" in results[eui]["error"]
    # once bench-a has been silent for longer than the claim timeout, bench-b takes the board over and resumes it
    time.sleep(max(0.0, killed + 2.5 - time.monotonic()))
    code, results, err = finish(station("bench-b", sim.ports, emu, pg_url, tmp_path / "h", "--claim-timeout", "2"))
    assert code == 0 and results[eui]["status"] == "provisioned", err
    assert sim.boards[0].state["appkey"] == programmed   # random AppKey: a reprogram would have changed it
    steps = step_rows(pg_url, eui)
    assert steps["program"] == ("ok", "bench-a") and steps["render"] == ("ok", "bench-a")
    assert steps["register"] == ("ok", "bench-b") and steps["message"] == ("ok", "bench-b")
    with _reader(pg_url) as reader:
        rec = reader.get(eui)
        assert rec.status == "provisioned" and rec.station == "bench-b" and rec.attempts == 2
    assert any(r["registrationId"] == eui.lower() and r["status"] == "assigned" for r in emu.state()["registrations"])


def _reader(url: str) -> Ledger:
    """A read-only view of the ledger, once the station has made it."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return Ledger(url, readonly=True, create=False)
        except FlasherError:
            assert time.monotonic() < deadline, "the station never made its ledger"
            time.sleep(0.05)


def test_the_server_going_away_mid_run_is_one_line_per_board_and_the_rerun_resumes(sim_boards, make_dps_emulator,
                                                                                     pg_server, pg_url, tmp_path):
    emu = make_dps_emulator(assign_delay=2.0)
    sim = sim_boards(2, seed=4444)
    url = pg_url + "?connect_timeout=2"   # how long to wait for the server before giving up
    run = station("bench-a", sim.ports, emu, url, tmp_path / "h")
    stopped = False
    try:
        wait_until(lambda: emu.state()["stats"]["register_requests"] >= 2)  # both programmed, both registering
        pg_server.stop()
        stopped = True
        code, results, err = finish(run)
    finally:
        stop(run)
        if stopped:
            pg_server.restart()
    assert code == 1 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, err
    for line in errors:
        assert ": register: ledger 'postgresql://flasher@127.0.0.1:" in line and "cannot write (cannot reach the " \
               "server within 2 s: " in line and "Connection refused" in line, line
    assert all(r["status"] == "failed" and r["failed_step"] == "register" for r in results.values())
    # nothing committed was lost: each board still says it was programmed, and where it stopped
    keys = {b.deveui: b.state["appkey"] for b in sim.boards}
    with _reader(pg_url) as reader:
        for rec in reader.all():
            assert rec.current_step == "register" and rec.steps["program"] == "ok" and rec.steps["register"] == "started"
    code, results, err = finish(station("bench-a", sim.ports, emu, url, tmp_path / "h"))
    assert code == 0 and {r["status"] for r in results.values()} == {"provisioned"}, err
    assert {b.deveui: b.state["appkey"] for b in sim.boards} == keys   # resumed at register, not reprogrammed
    with _reader(pg_url) as reader:
        assert [(r.status, r.attempts) for r in reader.all()] == [("provisioned", 2)] * 2
