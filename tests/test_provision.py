"""`flasher provision` end to end: simulated boards on real ptys, the DPS emulator over TLS
through the real SDK, a real ledger, headers compiled with the real gcc.

Every test runs twice (the ``ledger_place`` fixture): with SQLite ledger files, and with
ledgers in fresh databases on a real PostgreSQL server, which the CLI runs reach by URL
(the password from PGPASSFILE, as a station's ~/.pgpass)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures_dps import GROUP_PRIMARY, ID_SCOPE

from flasher.errors import FlasherError
from flasher.eui import EUI64
from flasher.ledger import Ledger
from flasher.pipeline import Settings, provision_boards

GROUP_KEY = base64.b64decode(GROUP_PRIMARY)
JOIN_EUI = "70B3D57ED003F06A"


@pytest.fixture
def sim_boards(sim_boards, ledger_place):
    """Other DevEUIs for each ledger kind: the session's DPS emulator must not meet a board twice."""
    offset = 0 if ledger_place.kind == "sqlite" else 10_000

    def start(count: int = 1, *, seed: int = 1, **kwargs):
        return sim_boards(count, seed=seed + offset, **kwargs)

    return start


def settings_for(emu, tmp_path, **over) -> Settings:
    kw = dict(id_scope=ID_SCOPE, group_key=GROUP_KEY, dps_host=emu.host, ca_cert=str(emu.ca_cert_path),
              out_dir=tmp_path / "headers", join_eui=EUI64.parse(JOIN_EUI), timeout=30.0)
    kw.update(over)
    return Settings(**kw)


def run_cli(*args, env_extra=None, cwd=None, timeout=120):
    env = dict(os.environ, FLASHER_GROUP_PRIMARY_KEY=GROUP_PRIMARY)
    env.pop("FLASHER_APPKEY_MASTER", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "flasher", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def registrations_of(emu, reg_id):
    return [r for r in emu.state()["registrations"] if r.get("registrationId") == reg_id]


def compile_header(header: Path, tmp_path: Path) -> str:
    """Compile a host program around the header; return what it prints (DevEUI and AppEUI)."""
    gcc = shutil.which("gcc")
    assert gcc, "gcc is part of the test environment"
    src = tmp_path / "main.c"
    src.write_text(f'#include <stdio.h>\n#include "{header}"\n'
                   'int main(void) { printf("%s %s\\n", FLASHER_DEV_EUI, FLASHER_APP_EUI); return 0; }\n')
    exe = tmp_path / "main"
    subprocess.run([gcc, "-std=c99", "-Wall", "-Werror", str(src), "-o", str(exe)], check=True, capture_output=True)
    return subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.strip()


def test_three_boards_end_to_end_via_cli(sim_boards, dps_emulator, ledger_place, tmp_path):
    sim = sim_boards(3, seed=11)
    ledger = ledger_place.target()
    ports = [a for p in sim.ports for a in ("--port", p)]
    common = ["--id-scope", ID_SCOPE, "--dps-host", dps_emulator.host, "--ca-cert", str(dps_emulator.ca_cert_path),
              "--join-eui", JOIN_EUI, "--ledger", ledger, "--out-dir", str(tmp_path / "h")]
    proc = run_cli("provision", *ports, *common, "--json")
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(r["deveui"] for r in results) == sorted(b.deveui for b in sim.boards)
    for r in results:
        assert {"deveui", "registration_id", "status", "assigned_hub", "device_id", "header", "error"} <= set(r)
        assert r["status"] == "provisioned" and r["error"] is None
        assert r["registration_id"] == r["deveui"].lower() == r["device_id"]
        assert r["assigned_hub"] == dps_emulator.host
        # the module was programmed: JoinEUI, OTAA, band, and the AppKey the header carries
        board = next(b for b in sim.boards if b.deveui == r["deveui"])
        state = board.state
        assert state["appeui"] == JOIN_EUI and state["mode"] == "LWOTAA" and state["band"] == "EU868"
        header = Path(r["header"])
        assert f'"{state["appkey"]}"' in header.read_text()
        assert oct(header.stat().st_mode & 0o777) == "0o600"
        assert compile_header(header, tmp_path) == f"{r['deveui']} {JOIN_EUI}"
        # DPS knows the DevEUI-derived identity and the hub got the proof message
        assert any(x.get("status") == "assigned" for x in registrations_of(dps_emulator, r["registration_id"]))
        assert any(m["device_id"] == r["device_id"] and m["payload"] == "TestMessage"
                   for m in dps_emulator.state()["messages"])
    # the ledger agrees, and rerunning is a no-op
    before = len(dps_emulator.state()["registrations"])
    again = run_cli("provision", *ports, *common, "--json")
    assert again.returncode == 0, again.stderr
    assert {json.loads(line)["status"] for line in again.stdout.splitlines()} == {"already_provisioned"}
    assert len(dps_emulator.state()["registrations"]) == before
    status = run_cli("status", "--ledger", ledger, "--json")
    rows = [json.loads(line) for line in status.stdout.splitlines()]
    assert len(rows) == 3 and all(r["status"] == "provisioned" and r["attempts"] == 1 for r in rows)
    assert all(r["steps"]["upload"] == "skipped" and r["steps"]["message"] == "ok" for r in rows)
    csv_out = run_cli("status", "--ledger", ledger, "--csv").stdout.splitlines()
    assert csv_out[0].startswith("deveui,registration_id,status") and len(csv_out) == 4


def wait_for_step(place, step: str, timeout: float = 30.0) -> str | None:
    """Watch the ledger (as another reader would) until a board's current step is ``step``; the last one seen."""
    deadline, seen, reader = time.monotonic() + timeout, None, None
    try:
        while time.monotonic() < deadline:
            try:  # until the run has made the ledger, there is nothing to open
                reader = reader or place.open(create=False, readonly=True)
                seen = next((r.current_step for r in reader.all()), None)
            except FlasherError:
                reader = None
            if seen == step:
                break
            time.sleep(0.05)
    finally:
        if reader is not None:
            reader.close()
    return seen


def _steps(ledger: Ledger, eui: str) -> dict:
    return ledger.get(eui).steps


def test_unplug_during_program_then_resume(sim_boards, dps_emulator, ledger_place, tmp_path):
    sim = sim_boards(1, seed=21)
    board = sim.boards[0]
    board.faults.unplug_after = 3  # AT and AT+ID twice answered, then the cable goes during programming
    with ledger_place.open() as ledger:
        [r] = provision_boards(sim.ports, settings_for(dps_emulator, tmp_path), ledger)
        assert r.status == "failed" and r.failed_step == "program"
        assert r.error and "\n" not in r.error
        rec = ledger.get(board.deveui)
        assert rec.status == "failed" and rec.current_step == "program" and rec.last_error == r.error
        assert _steps(ledger, board.deveui)["render"] == "ok" and _steps(ledger, board.deveui)["program"] == "failed"
        assert not registrations_of(dps_emulator, board.deveui.lower())
        port = sim.replug(0)
        [r] = provision_boards([port], settings_for(dps_emulator, tmp_path), ledger)
        assert r.status == "provisioned", r.error
        rec = ledger.get(board.deveui)
        assert rec.status == "provisioned" and rec.attempts == 2
        assert board.state["mode"] == "LWOTAA"
        assert f'"{board.state["appkey"]}"' in Path(rec.header_path).read_text()


def test_dps_failure_resumes_at_register_without_reprogramming(sim_boards, dps_emulator, ledger_place, tmp_path):
    sim = sim_boards(1, seed=31)
    board = sim.boards[0]
    with ledger_place.open() as ledger:
        [r] = provision_boards(sim.ports, settings_for(dps_emulator, tmp_path, dps_host="127.0.0.254", timeout=5.0),
                               ledger)
        assert r.status == "failed" and r.failed_step == "register"
        programmed_key = board.state["appkey"]
        header_sha = ledger.get(board.deveui).header_sha256
        [r] = provision_boards(sim.ports, settings_for(dps_emulator, tmp_path), ledger)
        assert r.status == "provisioned", r.error
        assert board.state["appkey"] == programmed_key  # random AppKey: a reprogram would have changed it
        rec = ledger.get(board.deveui)
        assert rec.header_sha256 == header_sha and rec.attempts == 2
        assert rec.assigned_hub == dps_emulator.host


def test_wrong_group_key_then_right_one_renders_the_header_again(sim_boards, dps_emulator, ledger_place, tmp_path):
    from flasher.keys import derive_device_key

    sim = sim_boards(1, seed=32)
    board = sim.boards[0]
    with ledger_place.open() as ledger:
        [r] = provision_boards(sim.ports, settings_for(dps_emulator, tmp_path, group_key=os.urandom(64)), ledger)
        assert r.status == "failed" and r.failed_step == "register"
        assert "401" in r.error or "unauthorized" in r.error.lower()
        [r] = provision_boards(sim.ports, settings_for(dps_emulator, tmp_path), ledger)
        assert r.status == "provisioned", r.error
        # the header now carries the key DPS accepted, not the one derived from the wrong group key
        assert derive_device_key(GROUP_KEY, board.deveui.lower()) in Path(r.header).read_text()
        assert f'"{board.state["appkey"]}"' in Path(r.header).read_text()
        assert GROUP_PRIMARY not in json.dumps(ledger.get(board.deveui).to_dict())


def test_changed_header_after_programming_is_refused(sim_boards, dps_emulator, ledger_place, tmp_path):
    sim = sim_boards(1, seed=41)
    with ledger_place.open() as ledger:
        [r] = provision_boards(sim.ports, settings_for(dps_emulator, tmp_path, dps_host="127.0.0.254", timeout=5.0),
                               ledger)
        assert r.status == "failed" and r.failed_step == "register"
        header, programmed_key = Path(r.header), sim.boards[0].state["appkey"]
        header.write_text("/* edited */\n")
        [r] = provision_boards(sim.ports, settings_for(dps_emulator, tmp_path), ledger)
        assert r.status == "conflict" and "changed since the module was programmed" in r.error
        # deleted is refused just the same, every time: the module keeps its key, the ledger its steps
        header.unlink()
        for _ in range(2):
            [r] = provision_boards(sim.ports, settings_for(dps_emulator, tmp_path), ledger)
            assert r.status == "conflict" and "is missing since the module was programmed" in r.error, r.error
            assert sim.boards[0].state["appkey"] == programmed_key and not header.exists()
            rec = ledger.get(r.deveui)
            assert rec.status == "conflict" and rec.steps["program"] == "ok"
        [r] = provision_boards(sim.ports, settings_for(dps_emulator, tmp_path, force=True), ledger)
        assert r.status == "provisioned", r.error
        assert sim.boards[0].state["appkey"] != programmed_key


def test_a_finished_board_with_other_settings_is_a_conflict_not_redone(sim_boards, dps_emulator, ledger_place, tmp_path):
    sim = sim_boards(1, seed=43)
    with ledger_place.open() as ledger:
        [r] = provision_boards(sim.ports, settings_for(dps_emulator, tmp_path), ledger)
        assert r.status == "provisioned", r.error
        key, sha = sim.boards[0].state["appkey"], ledger.get(r.deveui).header_sha256
        [r] = provision_boards(sim.ports, settings_for(dps_emulator, tmp_path, band="US915"), ledger)
        assert r.status == "conflict" and not r.ok
        assert "band was EU868 (now US915)" in r.error and "--force" in r.error
        assert sim.boards[0].state["appkey"] == key and sim.boards[0].state.get("band", "EU868") != "US915"
        assert ledger.get(r.deveui).header_sha256 == sha
        registrations = [x for x in dps_emulator.state()["registrations"] if x["registrationId"] == r.registration_id]
        assert len(registrations) == 1
        [r] = provision_boards(sim.ports, settings_for(dps_emulator, tmp_path, band="US915", force=True), ledger)
        assert r.status == "provisioned", r.error


def test_one_failing_board_does_not_stop_the_others(sim_boards, dps_emulator, ledger_place, tmp_path):
    sim = sim_boards(4, seed=51)
    sim.boards[2].faults.silent = True
    with ledger_place.open() as ledger:
        results = list(provision_boards(sim.ports, settings_for(dps_emulator, tmp_path, at_timeout=0.5), ledger))
    by_port = {r.port: r for r in results}
    assert by_port[sim.ports[2]].status == "failed" and by_port[sim.ports[2]].failed_step == "identify"
    assert sim.ports[2] in by_port[sim.ports[2]].error
    assert sum(r.status == "provisioned" for r in results) == 3


def test_sixteen_boards_at_once(sim_boards, dps_emulator, ledger_place, tmp_path):
    sim = sim_boards(16, seed=61)
    with ledger_place.open() as ledger:
        results = list(provision_boards(sim.ports, settings_for(dps_emulator, tmp_path), ledger))
        assert [r.status for r in results] == ["provisioned"] * 16, [r.error for r in results if r.error]
        assert len({r.deveui for r in results}) == 16
        assert all(rec.status == "provisioned" for rec in ledger.all())
    ids = {r.registration_id for r in results}
    assert ids <= {x["registrationId"] for x in dps_emulator.state()["registrations"]}


def test_kill_during_register_then_rerun_completes(sim_boards, make_dps_emulator, ledger_place, tmp_path):
    emu = make_dps_emulator(assign_delay=3.0)  # long enough to be caught in the middle of registering
    sim = sim_boards(1, seed=71)
    ledger_path = ledger_place.target()
    args = [sys.executable, "-m", "flasher", "provision", "--port", sim.ports[0], "--id-scope", ID_SCOPE,
            "--dps-host", emu.host, "--ca-cert", str(emu.ca_cert_path), "--ledger", ledger_path,
            "--out-dir", str(tmp_path / "h"), "--json"]
    env = dict(os.environ, FLASHER_GROUP_PRIMARY_KEY=GROUP_PRIMARY)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for_step(ledger_place, "register") == "register"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with ledger_place.open() as ledger:
        rec = ledger.get(sim.boards[0].deveui)
        assert rec.status == "in_progress" and rec.current_step == "register"
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "provisioned"
    with ledger_place.open() as ledger:
        rec = ledger.get(sim.boards[0].deveui)
        assert rec.status == "provisioned" and rec.attempts == 2


def test_config_file_supplies_defaults_and_refuses_inline_secrets(sim_boards, dps_emulator, ledger_place, tmp_path):
    sim = sim_boards(1, seed=81)
    cfg = tmp_path / "flasher.toml"
    ledger = "ledger.sqlite3" if ledger_place.kind == "sqlite" else ledger_place.target()
    cfg.write_text(f'id_scope = "{ID_SCOPE}"\ndps_host = "{dps_emulator.host}"\nca_cert = "{dps_emulator.ca_cert_path}"\n'
                   f'band = "EU868"\njoin_eui = "{JOIN_EUI}"\nledger = "{ledger}"\nout_dir = "headers"\n'
                   f'template = "lmic"\n')
    proc = run_cli("provision", "--port", sim.ports[0], "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["header"].startswith(str(tmp_path / "headers")) and "APPEUI" in Path(out["header"]).read_text()
    with Ledger(tmp_path / ledger if ledger_place.kind == "sqlite" else ledger, create=False) as led:
        assert led.get(out["deveui"]).status == "provisioned"  # the file's ledger, relative to the file
    cfg.write_text(cfg.read_text() + f'group_key = "{GROUP_PRIMARY}"\n')
    proc = run_cli("provision", "--port", sim.ports[0], cwd=tmp_path)
    assert proc.returncode == 2 and "inline" in proc.stderr and GROUP_PRIMARY not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1


def test_verify_against_the_ledger(sim_boards, dps_emulator, ledger_place, tmp_path):
    from flasher.rhf76 import open_module

    sim = sim_boards(2, seed=101)
    ledger = ledger_place.target()
    with Ledger(ledger) as led:
        results = list(provision_boards(sim.ports, settings_for(dps_emulator, tmp_path, test_message=None), led))
    assert all(r.ok for r in results)
    ports = [a for p in sim.ports for a in ("--port", p)]
    proc = run_cli("verify", *ports, "--ledger", ledger, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [json.loads(line)["ok"] for line in proc.stdout.splitlines()] == [True, True]
    # someone reprograms one module's JoinEUI behind our back
    with open_module(sim.ports[1]) as m:
        m.at.command('AT+ID=AppEui,"0102030405060708"')
    proc = run_cli("verify", *ports, "--ledger", ledger, "--json")
    assert proc.returncode == 1
    verdicts = {v["port"]: v for v in map(json.loads, proc.stdout.splitlines())}
    assert verdicts[sim.ports[0]]["ok"] and not verdicts[sim.ports[1]]["ok"]
    assert any("0102030405060708" in p for p in verdicts[sim.ports[1]]["problems"])
    # a board the ledger has never seen is not "verified"
    other = sim_boards(1, seed=102, state_dir=tmp_path / "other")
    proc = run_cli("verify", "--port", other.ports[0], "--ledger", ledger)
    assert proc.returncode == 1 and "FAIL" in proc.stdout


def test_all_finds_simulated_boards_through_discovery(sim_boards, dps_emulator, ledger_place, tmp_path):
    sim = sim_boards(2, seed=111)
    proc = run_cli("provision", "--all", "--id-scope", ID_SCOPE, "--dps-host", dps_emulator.host,
                   "--ca-cert", str(dps_emulator.ca_cert_path), "--ledger", ledger_place.target(),
                   "--out-dir", str(tmp_path / "h"), "--no-test-message", "--json",
                   env_extra={"FLASHER_SIMULATED_PORTS": str(sim.ports_file)})
    assert proc.returncode == 0, proc.stderr
    assert sorted(json.loads(line)["deveui"] for line in proc.stdout.splitlines()) == sorted(b.deveui for b in sim.boards)


def test_progress_is_a_live_table_on_a_terminal_and_plain_lines_on_a_pipe(sim_boards, dps_emulator, ledger_place, tmp_path):
    import pty
    import select

    sim = sim_boards(2, seed=121)
    base = ["provision", *[a for p in sim.ports for a in ("--port", p)], "--id-scope", ID_SCOPE,
            "--dps-host", dps_emulator.host, "--ca-cert", str(dps_emulator.ca_cert_path), "--no-test-message"]
    piped = run_cli(*base, "--ledger", ledger_place.target("a"), "--out-dir", str(tmp_path / "a"))
    assert piped.returncode == 0, piped.stderr
    assert "\x1b[" not in piped.stderr and piped.stdout == ""
    for b in sim.boards:
        assert f"{b.deveui}: register: ok" in piped.stderr and f"{b.deveui}: done: ok" in piped.stderr
    # on a terminal: the table is redrawn in place (cursor movement), and ends with every board done
    master, slave = pty.openpty()
    env = dict(os.environ, FLASHER_GROUP_PRIMARY_KEY=GROUP_PRIMARY)
    proc = subprocess.Popen([sys.executable, "-m", "flasher", *base, "--ledger", ledger_place.target("b"),
                             "--out-dir", str(tmp_path / "b")], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=slave, env=env)
    os.close(slave)
    screen = b""
    try:
        while True:
            r, _, _ = select.select([master], [], [], 60)
            if not r:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed its end
                break
            if not chunk:
                break
            screen += chunk
    finally:
        os.close(master)
        proc.wait(timeout=60)
    assert proc.returncode == 0
    text = screen.decode(errors="replace")
    assert "\x1b[" in text and "DEVEUI" in text and text.count("assigning") >= 1
    final = text.rsplit("DEVEUI", 1)[1]
    assert all(b.deveui in final for b in sim.boards) and final.count(" done ") == 2


# Every signal with SQLite; with PostgreSQL one is enough (what is tested there is the ledger, not the signal).
@pytest.mark.parametrize("sig,code,said,ledger_place", [
    (signal.SIGINT, 130, "interrupted", "sqlite"), (signal.SIGTERM, 143, "SIGTERM", "sqlite"),
    (signal.SIGHUP, 129, "SIGHUP", "sqlite"), (signal.SIGTERM, 143, "SIGTERM", "postgres")], indirect=["ledger_place"])
def test_a_signal_stops_boards_at_the_next_step_and_the_rerun_resumes(sim_boards, make_dps_emulator, ledger_place,
                                                                      tmp_path, sig, code, said):
    """Ctrl-C, SIGTERM (a service manager) and SIGHUP (a closed terminal) all stop cleanly and resumably."""
    # Assigning takes 4 s (two of the SDK's 2 s polls): the signal, sent as the second board's request arrives,
    # must reach the child's main thread before either board finishes registering, even on a loaded machine.
    emu = make_dps_emulator(assign_delay=4.0)
    sim = sim_boards(2, seed=131)
    args = [sys.executable, "-m", "flasher", "provision", *[a for p in sim.ports for a in ("--port", p)],
            "--id-scope", ID_SCOPE, "--dps-host", emu.host, "--ca-cert", str(emu.ca_cert_path),
            "--ledger", ledger_place.target(), "--out-dir", str(tmp_path / "h")]
    env = dict(os.environ, FLASHER_GROUP_PRIMARY_KEY=GROUP_PRIMARY)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and emu.state()["stats"]["register_requests"] < 2:
            time.sleep(0.05)  # both boards are registering (DPS is "assigning" for 4 s)
        proc.send_signal(sig)
        out, errs = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code and said in errs and "Traceback" not in errs, errs
    with ledger_place.open() as ledger:
        for r in ledger.all():  # stopped before the test message, and the ledger names the step it resumes at
            assert r.status == "failed" and r.current_step == "message" and "interrupted" in r.last_error
            assert r.steps["register"] == "ok"
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with ledger_place.open() as ledger:
        assert [r.status for r in ledger.all()] == ["provisioned", "provisioned"]


def test_derived_and_given_app_keys_reach_the_module(sim_boards, dps_emulator, ledger_place, tmp_path):
    from flasher.keys import AppKeyPlan, AppKeySource, derive_app_key
    from flasher.secrets import Secret

    sim = sim_boards(2, seed=141)
    master, given = b"a master secret of 32 bytes....!", bytes.fromhex("2B7E151628AED2A6ABF7158809CF4F3C")
    with ledger_place.open() as ledger:
        [derived] = provision_boards(sim.ports[:1], settings_for(dps_emulator, tmp_path, test_message=None,
                                                                 app_key=AppKeyPlan(AppKeySource.DERIVED,
                                                                                    master=Secret(master))), ledger)
        [fixed] = provision_boards(sim.ports[1:], settings_for(dps_emulator, tmp_path, test_message=None,
                                                               app_key=AppKeyPlan(AppKeySource.GIVEN,
                                                                                  given=Secret(given))), ledger)
        assert derived.ok and fixed.ok
        assert ledger.get(derived.deveui).app_key_source == "derived"
    assert sim.boards[0].state["appkey"] == derive_app_key(master, EUI64.parse(derived.deveui)).hex().upper()
    assert sim.boards[1].state["appkey"] == given.hex().upper()
