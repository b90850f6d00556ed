"""`flasher register --input`: pre-registering a fleet from a file, paced to the quota, resumable through the ledger.

Real processes against the real DPS emulator over TLS with the real SDK, and a real SQLite ledger.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from fixtures_dps import GROUP_PRIMARY, ID_SCOPE

FLASHER = [sys.executable, "-m", "flasher"]
GROUP = {"FLASHER_GROUP_PRIMARY_KEY": GROUP_PRIMARY}


def env(extra=None):
    e = {k: v for k, v in os.environ.items() if not k.startswith("FLASHER_")}
    e.update(GROUP)
    e.update(extra or {})
    return e


def run(args, cwd, stdin=None, timeout=120):
    return subprocess.run(FLASHER + args, capture_output=True, text=True, env=env(), timeout=timeout, cwd=cwd,
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL)


def target(emu):
    return ["--id-scope", ID_SCOPE, "--dps-host", emu.host, "--ca-cert", str(emu.ca_cert_path)]


def euis(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:04X}" for i in range(n)]


def attempts(emu, ids) -> dict[str, int]:
    """How many times the emulator assigned each id (its own count, not ours)."""
    want = {i.lower() for i in ids}
    return {r["registrationId"]: r["attempts"] for r in emu.state()["registrations"] if r["registrationId"] in want}


def ledger_rows(path) -> list[tuple]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT registration_id, status, message_sent, attempts FROM registrations "
                          "ORDER BY registration_id").fetchall()
    finally:
        db.close()


def recorded(path) -> int:
    try:
        return len(ledger_rows(path))
    except sqlite3.OperationalError:   # the ledger is not made yet (no file, or no table yet)
        return 0


def test_a_file_of_deveuis_is_registered_recorded_and_a_rerun_skips_every_one(dps_emulator, tmp_path):
    ids = euis("2CF7F1202495", 24)
    (tmp_path / "fleet.txt").write_text("\n".join(ids) + "\n\n")
    p = run(["register", "--input", "fleet.txt", *target(dps_emulator), "--no-test-message", "--json"], tmp_path)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert sorted(r["registration_id"] for r in rows) == sorted(i.lower() for i in ids)
    assert all(r["ok"] and r["status"] == "assigned" for r in rows)
    assert [r[:3] for r in ledger_rows(tmp_path / "flasher-ledger.sqlite3")] == [(i.lower(), "assigned", 0)
                                                                                    for i in sorted(ids)]
    again = run(["register", "--input", "fleet.txt", *target(dps_emulator), "--no-test-message", "--json"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert [json.loads(line)["status"] for line in again.stdout.splitlines()] == ["already_registered"] * 24
    assert set(attempts(dps_emulator, ids).values()) == {1}
    assert GROUP_PRIMARY not in p.stdout + p.stderr + again.stdout + again.stderr


def test_ids_registered_without_a_message_are_proved_on_a_rerun_that_wants_one(dps_emulator, tmp_path):
    ids = euis("2CF7F1202496", 3)
    (tmp_path / "fleet.txt").write_text("\n".join(ids))
    assert run(["register", "--input", "fleet.txt", *target(dps_emulator), "--no-test-message"], tmp_path).returncode == 0
    p = run(["register", "--input", "fleet.txt", *target(dps_emulator)], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "3 ids: 3 registered, 0 already were (ledger), 0 failed" in p.stderr
    assert [r[2] for r in ledger_rows(tmp_path / "flasher-ledger.sqlite3")] == [1, 1, 1]
    sent = {m["device_id"] for m in dps_emulator.state()["messages"] if m["payload"] == "TestMessage"}
    assert {i.lower() for i in ids} <= sent


def test_a_csv_column_from_stdin(dps_emulator, tmp_path):
    ids = euis("2CF7F1202497", 4)
    csv_text = "deveui,registration_id,status\n" + "".join(f"{i},sn-{i.lower()},provisioned\n" for i in ids)
    p = run(["register", "--input", "-", "--column", "registration_id", *target(dps_emulator), "--no-test-message",
             "--json"], tmp_path, stdin=csv_text)
    assert p.returncode == 0, p.stderr
    assert sorted(json.loads(line)["registration_id"] for line in p.stdout.splitlines()) == [f"sn-{i.lower()}"
                                                                                           for i in ids]
    # without --column a header's registration_id column is the one used; deveui when it has none
    p = run(["register", "--input", "-", *target(dps_emulator), "--no-test-message", "--json"], tmp_path,
            stdin="deveui\n" + "\n".join(ids))
    assert p.returncode == 0, p.stderr
    assert sorted(json.loads(line)["registration_id"] for line in p.stdout.splitlines()) == [i.lower() for i in ids]


@pytest.mark.parametrize("args,content,message", [
    (["--input", "fleet.txt"], "2CF7F1202498AAAA\nbad id with spaces\n", "--input fleet.txt: line 2: "),
    (["--input", "fleet.txt"], "deveui,port\n2CF7F1202498AAAB,/dev/ttyACM0\n,x\n", "--input fleet.txt: line 3: no value"),
    (["--input", "fleet.txt", "--column", "eui"], "deveui\n2CF7F1202498AAAC\n", "has no column 'eui'"),
    (["--input", "fleet.txt"], "port,serial\n/dev/ttyACM0,1\n", "name the column with --column"),
    (["--input", "fleet.txt"], "2CF7F1202498AAAD\n\0\n", "NUL byte"),
    (["--input", "fleet.txt", "--dps-rate", "fast"], "2CF7F1202498AAAE\n", "--dps-rate 'fast'"),
    (["--input", "fleet.txt", "--hub-rate", "0/s"], "2CF7F1202498AAAE\n", "--hub-rate '0/s'"),
    (["--input", "fleet.txt", "--enrollment", "individual"], "2CF7F1202498AAAF\n", "takes one id"),
    (["2CF7F1202498AAB0", "--column", "deveui"], "", "--column is for --input"),
])
def test_bad_input_is_one_line_before_anything_is_registered_or_recorded(dps_emulator, tmp_path, args, content, message):
    (tmp_path / "fleet.txt").write_text(content)
    before = len(dps_emulator.state()["registrations"])
    p = run(["register", *args, *target(dps_emulator)], tmp_path)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], p.stderr
    assert len(dps_emulator.state()["registrations"]) == before
    assert not (tmp_path / "flasher-ledger.sqlite3").exists()


def test_a_429_slows_the_run_and_every_id_still_registers(make_dps_emulator, tmp_path):
    emu = make_dps_emulator()
    emu.throttle(6, retry_after=1)
    ids = euis("2CF7F1202499", 12)
    (tmp_path / "fleet.txt").write_text("\n".join(ids))
    p = run(["register", "--input", "fleet.txt", *target(emu), "--no-test-message", "--dps-rate", "50/s"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "12 ids: 12 registered" in p.stderr and "DPS throttled" in p.stderr
    assert emu.state()["stats"]["throttled"] == 6
    assert set(attempts(emu, ids).values()) == {1}


def test_sigterm_halfway_then_a_rerun_registers_each_id_exactly_once(make_dps_emulator, tmp_path):
    emu = make_dps_emulator(assign_delay=0.2)
    ids = euis("2CF7F120249A", 150)
    (tmp_path / "fleet.txt").write_text("\n".join(ids))
    ledger = tmp_path / "flasher-ledger.sqlite3"
    args = ["register", "--input", "fleet.txt", *target(emu), "--no-test-message", "--dps-rate", "15/s"]
    proc = subprocess.Popen(FLASHER + args, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if recorded(ledger) >= 40:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        out, errs = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, errs
    assert "error: stopped by SIGTERM" in errs
    first = ledger_rows(ledger)
    assert 40 <= len(first) < 150 and all(r[1] == "assigned" for r in first)
    assert len(out.splitlines()) == len(first)                     # what was reported is what was recorded
    assert set(attempts(emu, ids)) == {r[0] for r in first}        # and nothing registered went unrecorded
    p = run(args, tmp_path)
    assert p.returncode == 0, p.stderr
    assert f"150 ids: {150 - len(first)} registered, {len(first)} already were (ledger), 0 failed" in p.stderr
    assert len(ledger_rows(ledger)) == 150
    assert attempts(emu, ids) == {i.lower(): 1 for i in ids}


def test_sigkill_halfway_then_a_rerun_asks_dps_about_the_ids_in_flight_and_registers_each_once(make_dps_emulator,
                                                                                                  tmp_path):
    """No chance to finish anything: the ids the killed run had sent are left 'registering' in the ledger, and the
    rerun asks DPS's status lookup about each before registering it, so none is registered twice."""
    emu = make_dps_emulator(assign_delay=0.5, websocket_port=443)   # DPS's HTTPS API, where the lookup is
    ids = euis("2CF7F120249B", 120)
    (tmp_path / "fleet.txt").write_text("\n".join(ids))
    ledger = tmp_path / "flasher-ledger.sqlite3"
    args = ["register", "--input", "fleet.txt", *target(emu), "--no-test-message", "--dps-rate", "20/s"]
    proc = subprocess.Popen(FLASHER + args, cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if sum(1 for r in ledger_rows(ledger) if r[1] == "assigned") >= 30 if recorded(ledger) else False:
                break
            time.sleep(0.1)
        assert proc.poll() is None
    finally:
        proc.kill()   # SIGKILL
        proc.wait()
    killed = ledger_rows(ledger)
    in_flight = {r[0] for r in killed if r[1] == "registering"}
    assert in_flight and len(killed) < 120, killed
    before = emu.state()["stats"]
    p = run(args, tmp_path)
    assert p.returncode == 0, p.stderr
    after = emu.state()["stats"]
    assert after["status_lookups"] - before["status_lookups"] == len(in_flight)
    assert attempts(emu, ids) == {i.lower(): 1 for i in ids}   # each id assigned once, the killed run's included
    assert all(r[1] == "assigned" for r in ledger_rows(ledger)) and len(ledger_rows(ledger)) == 120


def test_status_lists_the_pre_registrations(cli, tmp_path):
    """`status --registrations`: what `register --input` recorded, as a table, JSON lines or CSV; never a key."""
    import csv
    import io
    import shutil
    from pathlib import Path

    from flasher.ledger import REGISTRATION_LIST, Ledger

    scope, host = "0ne0001A2B3", "global.azure-devices-provisioning.net"
    target = tmp_path / "bench.sqlite3"
    with Ledger(target, station="bench-1") as led:
        led.record_registration("2cf7f1202490b001", id_scope=scope, dps_host=host, status="assigned",
                                device_key_check="c0ffee", assigned_hub="hub-1", device_id="2cf7f1202490b001",
                                message_sent=True)
        led.record_registration("2cf7f1202490b002", id_scope=scope, dps_host=host, status="failed",
                                error="DPS answered 401")
        led.registering("2cf7f1202490b003", id_scope=scope, dps_host=host)
    code, out, err = cli("status", "--ledger", target, "--registrations")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["REGISTRATION", "ID", "STATUS"] and len(lines) == 4
    assert lines[1].split()[:5] == ["2cf7f1202490b001", "assigned", scope, "hub-1", "2cf7f1202490b001"]
    assert lines[2].split()[:2] == ["2cf7f1202490b002", "failed"] and lines[2].endswith("DPS answered 401")
    assert lines[3].split()[:2] == ["2cf7f1202490b003", "registering"]
    code, out, _ = cli("status", "--ledger", target, "--registrations", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["registration_id"], r["status"], r["message_sent"]) for r in rows] == [
        ("2cf7f1202490b001", "assigned", True), ("2cf7f1202490b002", "failed", False),
        ("2cf7f1202490b003", "registering", False)]
    assert set(rows[0]) == set(REGISTRATION_LIST) and rows[0]["station"] == "bench-1"
    code, out, _ = cli("status", "--ledger", target, "--registrations", "--csv", "--station", "bench-2")
    assert out == ",".join(REGISTRATION_LIST) + "\n"   # another station's: none
    code, out, _ = cli("status", "--ledger", target, "--registrations", "--csv")
    table = list(csv.DictReader(io.StringIO(out)))
    assert [r["status"] for r in table] == ["assigned", "failed", "registering"] and table[0]["attempts"] == "1"
    old = tmp_path / "v1.sqlite3"
    shutil.copyfile(Path(__file__).parent / "data" / "ledger-v1.sqlite3", old)   # as flasher 0.1.0 wrote it
    code, out, _ = cli("status", "--ledger", old, "--registrations", "--json")
    assert (code, out) == (0, "")   # from before pre-registrations: none, and the file is not migrated
