"""Board commands end to end: flasher.cli.main against simulated boards on real ptys."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from flasher.sim.board import Faults

JOIN_EUI = "70B3D57ED003F06A"
APP_KEY = bytes.fromhex("2B7E151628AED2A6ABF7158809CF4F3C")


def test_ports_lists_simulated_boards(cli, sim_boards, sim_env):
    sim = sim_boards(2)
    sim_env(sim)
    code, out, _ = cli("ports", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    mine = [r for r in rows if r["simulated"]]
    assert code == 0
    assert [(r["device"], r["serial_number"], r["board"]) for r in mine] == \
        [(b.port, b.serial_number, "app") for b in sim.boards]
    code, out, _ = cli("ports")
    assert f"{sim.ports[0]}\tapp\t{sim.boards[0].serial_number}" in out


def test_eui_single_port_prints_just_the_deveui(cli, sim_boards):
    sim = sim_boards(1)
    assert cli("eui", "--port", sim.ports[0]) == (0, sim.boards[0].deveui + "\n", "")


def test_eui_all_and_json(cli, sim_boards, sim_env):
    sim = sim_boards(3)
    sim_env(sim)
    code, out, _ = cli("eui", "--all")
    assert code == 0 and out.splitlines() == [f"{b.deveui}\t{b.port}" for b in sim.boards]
    code, out, _ = cli("eui", "--serial-number", sim.boards[2].serial_number, "--port", sim.ports[0], "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["port"] for r in rows] == [sim.ports[0], sim.ports[2]]
    r = rows[1]
    assert set(r) == {"port", "deveui", "appeui", "devaddr", "version"}
    assert (r["deveui"], r["appeui"], r["devaddr"], r["version"]) == \
        (sim.boards[2].deveui, "8000000000000006", sim.boards[2].deveui[8:], "2.1.19")


def test_eui_against_the_independent_module(cli, mini_module):
    mod = mini_module()
    code, out, _ = cli("eui", "--port", mod.path, "--json")
    assert code == 0 and json.loads(out)["deveui"] == "4786C58B00112233"


def test_selection_errors_are_usage_errors(cli, sim_boards, sim_env, monkeypatch):
    monkeypatch.delenv("FLASHER_SIMULATED_PORTS", raising=False)
    code, out, err = cli("eui")
    assert code == 2 and out == "" and err.startswith("error: no board selected")
    sim_env(sim_boards(1))
    code, _, err = cli("eui", "--serial-number", "NOPE")
    assert code == 2 and err == "error: serial number NOPE: no such board connected (see `flasher ports`)\n"


@pytest.mark.parametrize("faults,fix", [
    (Faults(silent=True), "no answer to AT within 0.3 s"),
    (Faults(latency=1.0), "no answer to AT within 0.3 s"),
    (Faults(unplug_after=1), "lost during AT+ID"),
    (Faults(unplug_after=0), "lost during AT"),
    (Faults(corrupt=-1), "garbled answer to AT"),
])
def test_every_fault_mode_is_one_line_and_exit_1(cli, sim_boards, faults, fix):
    sim = sim_boards(1, faults=faults)
    port = sim.ports[0]
    t0 = time.monotonic()
    code, out, err = cli("eui", "--port", port, "--timeout", "0.3")
    assert time.monotonic() - t0 < 10  # hang guard
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: port {port!r}: ") and fix in err
    assert "Traceback" not in err


@pytest.mark.parametrize("faults", [Faults(boot_noise=True), Faults(echo=True), Faults(latency=0.1),
                                    Faults(corrupt=2), Faults(boot_noise=True, echo=True, corrupt=1)])
def test_recoverable_faults_still_read(cli, sim_boards, faults):
    sim = sim_boards(1, faults=faults)
    assert cli("eui", "--port", sim.ports[0]) == (0, sim.boards[0].deveui + "\n", "")


def test_one_bad_board_does_not_hide_the_others(cli, sim_boards):
    sim = sim_boards(3)
    sim.boards[1].faults.silent = True
    code, out, err = cli("eui", *sum((["--port", p] for p in sim.ports), []), "--timeout", "0.3")
    assert code == 1
    assert out.splitlines() == [f"{sim.boards[0].deveui}\t{sim.ports[0]}", f"{sim.boards[2].deveui}\t{sim.ports[2]}"]
    assert err.splitlines() == [f"error: port {sim.ports[1]!r}: no answer to AT within 0.3 s "
                                "(is the pass-through sketch running?)"]


def test_verify_deveuis(cli, sim_boards, tmp_path):
    sim = sim_boards(2)
    a, b = sim.boards
    code, out, _ = cli("verify", "--port", a.port, "--port", b.port, "--expect", a.deveui.lower())
    assert code == 1
    assert out.splitlines() == [f"ok\t{a.port}\t{a.deveui}", f"FAIL\t{b.port}\t{b.deveui}\tDevEUI {b.deveui} not expected"]
    f = tmp_path / "expected.txt"
    colon = ":".join(b.deveui[i:i + 2] for i in range(0, 16, 2))
    f.write_text(f"# the batch\n{a.deveui}\n\n{colon}  # spelled the module's way\n")
    code, out, _ = cli("verify", "--port", a.port, "--port", b.port, "--expect-file", f, "--json")
    assert code == 0 and [json.loads(x)["ok"] for x in out.splitlines()] == [True, True]


def test_verify_settings_after_programming(cli, sim_boards):
    from flasher.eui import EUI64
    from flasher.rhf76 import open_module

    sim = sim_boards(2)
    with open_module(sim.ports[0]) as m:
        m.program(EUI64.parse(JOIN_EUI), APP_KEY, band="EU868")
    code, out, _ = cli("verify", "--port", sim.ports[0], "--port", sim.ports[1], "--join-eui", JOIN_EUI,
                       "--band", "eu868", "--json")
    v = [json.loads(x) for x in out.splitlines()]
    assert code == 1
    assert v[0] == {"port": sim.ports[0], "deveui": sim.boards[0].deveui, "ok": True, "problems": []}
    assert v[1]["problems"] == [f"JoinEUI 8000000000000006, expected {JOIN_EUI}", "mode LWABP, expected LWOTAA"]


def test_verify_unreadable_board_is_a_failed_verdict(cli, sim_boards):
    sim = sim_boards(1, faults=Faults(silent=True))
    code, out, _ = cli("verify", "--port", sim.ports[0], "--expect", "0011223344556677", "--timeout", "0.2")
    assert code == 1 and out.startswith(f"FAIL\t{sim.ports[0]}\t-\tunreadable: port {sim.ports[0]!r}: no answer")


def test_verify_needs_something_to_compare(cli, sim_boards, tmp_path):
    sim = sim_boards(1)
    code, _, err = cli("verify", "--port", sim.ports[0])
    assert code == 2 and "nothing to verify against" in err
    code, _, err = cli("verify", "--port", sim.ports[0], "--expect", "12345")
    assert code == 2 and "--expect '12345'" in err
    bad = tmp_path / "bad.txt"
    bad.write_text("0011223344556677\nzz\n")
    code, _, err = cli("verify", "--port", sim.ports[0], "--expect-file", bad)
    assert code == 2 and "line 2" in err


# --- ports that cannot be used ------------------------------------------------------------

@pytest.mark.parametrize("argv", [["eui"], ["eui", "--json"], ["verify", "--expect", "0011223344556677"]])
def test_a_port_that_is_not_a_serial_port_is_one_line(cli, argv):
    code, out, err = cli(*argv, "--port", "/dev/null")
    assert (code, out) == (2, "")
    assert err == "error: port '/dev/null': not a serial port (not a terminal device); see `flasher ports`\n"


@pytest.fixture
def holder():
    """A second process holding a port open the way flasher does (exclusively), until the test ends."""
    procs = []

    def hold(port: str) -> subprocess.Popen:
        code = ("import sys\nfrom flasher.at import ATClient\n"
                f"with ATClient.open({port!r}):\n    print('holding', flush=True)\n    sys.stdin.read()\n")
        p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline() == "holding\n", p.stderr.read()
        return p

    try:
        yield hold
    finally:
        for p in procs:
            p.stdin.close()  # lets it leave the with-block and exit
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            p.stdout.close()
            p.stderr.close()


def test_a_port_another_process_has_open_is_busy_and_untouched(cli, sim_boards, holder):
    sim = sim_boards(2)
    port = sim.ports[0]
    holder(port)
    code, out, err = cli("eui", "--port", port, "--port", sim.ports[1])
    assert code == 1 and out == f"{sim.boards[1].deveui}\t{sim.ports[1]}\n"
    assert err == f"error: port {port!r}: busy (another process has it open)\n"
    assert sim.boards[0].commands == 0  # not one byte reached the board


def test_a_board_whose_deveui_reads_disagree_is_one_line(cli, mini_module):
    mod = mini_module(id_deveuis=["2c:f7:f1:20:24:90:01:38", "2a:f7:f1:20:b9:02:43:95"] * 3)
    code, out, err = cli("eui", "--port", mod.path)
    assert (code, out) == (1, "")
    assert err == (f"error: port {mod.path!r}: DevEUI reads disagree (2CF7F12024900138, 2AF7F120B9024395); "
                   "check the cable/baud\n")


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_timeout_that_is_not_finite_is_one_line(cli, sim_boards, value):
    sim = sim_boards(1)
    code, out, err = cli("eui", "--port", sim.ports[0], "--timeout", value)
    assert (code, out) == (2, "")
    assert err == f"error: --timeout {value!r}: must be a number of seconds from 0.05 to 600\n"
    assert sim.boards[0].commands == 0


# --- the simulator as a process ---------------------------------------------------------

@pytest.fixture
def sim_process(tmp_path):
    procs = []

    def start(*args):
        p = subprocess.Popen([sys.executable, "-m", "flasher", "simulate", "boards", *args],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(p)
        return p

    try:
        yield start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=10)


def test_simulate_boards_process(sim_process, tmp_path):
    state = tmp_path / "state"
    p = sim_process("--count", "2", "--state", state, "--seed", "4", "--json", "--boot-noise", "--echo")
    rows = [json.loads(p.stdout.readline()) for _ in range(2)]
    assert all(os.path.exists(r["port"]) for r in rows)
    env = dict(os.environ, FLASHER_SIMULATED_PORTS=str(state / "ports.json"))
    r = subprocess.run([sys.executable, "-m", "flasher", "eui", "--all", "--json"], env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["deveui"] for x in r.stdout.splitlines()] == [x["deveui"] for x in rows]
    r = subprocess.run([sys.executable, "-m", "flasher", "verify", "--serial-number", rows[1]["serial_number"],
                        "--expect", rows[1]["deveui"]], env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("ok\t"), r.stderr
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=20)
    assert p.returncode == 0 and "stopping" in err
    assert not (state / "ports.json").exists() and (state / "board-0.json").exists()
    assert not any(os.path.exists(r["port"]) for r in rows)
    p2 = sim_process("--count", "2", "--state", state, "--seed", "999", "--json")  # the EEPROM survives
    again = [json.loads(p2.stdout.readline()) for _ in range(2)]
    assert [x["deveui"] for x in again] == [x["deveui"] for x in rows]
    p2.send_signal(signal.SIGINT)
    p2.communicate(timeout=20)
    assert p2.returncode == 0


def test_no_prompt_without_a_terminal(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FLASHER_SIMULATED_PORTS"}
    r = subprocess.run([sys.executable, "-m", "flasher", "verify", "--expect", "0011223344556677"], env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.startswith("error: no board selected")


# --- verify as a library (the ledger hook) ---------------------------------------------

def test_compare_is_pure_and_names_each_problem():
    from flasher.eui import EUI64
    from flasher.rhf76 import ModuleIds, ModuleSettings
    from flasher.verify import Expectation, compare

    ids = ModuleIds(EUI64.parse("2CF7F12024900138"), EUI64.parse("8000000000000006"), "24900138")
    good = ModuleSettings(EUI64.parse(JOIN_EUI), "LWOTAA", "EU868")
    exp = Expectation(join_eui=EUI64.parse(JOIN_EUI), band="EU868")
    assert compare("p", ids, good, expected_deveuis={ids.dev_eui}, expectation=exp).ok
    v = compare("p", ids, ModuleSettings(EUI64.parse(JOIN_EUI), "LWABP", "US915"), expected_deveuis=set(),
                expectation=exp)
    assert not v.ok and v.problems == ["DevEUI 2CF7F12024900138 not expected", "mode LWABP, expected LWOTAA",
                                       "band US915, expected EU868"]
    assert compare("p", ids, None, expectation=exp).problems == ["settings not read"]


def test_verify_board_with_a_ledger_mapping(sim_boards):
    from flasher.eui import EUI64
    from flasher.rhf76 import open_module
    from flasher.verify import Expectation, verify_board

    sim = sim_boards(2)
    with open_module(sim.ports[0]) as m:
        m.program(EUI64.parse(JOIN_EUI), APP_KEY, band="AS923")
    ledger = {EUI64.parse(sim.boards[0].deveui): Expectation(join_eui=EUI64.parse(JOIN_EUI), band="AS923")}
    assert verify_board(sim.ports[0], provisioned=ledger).ok
    other = verify_board(sim.ports[1], provisioned=ledger)
    assert not other.ok and other.problems == [f"DevEUI {sim.boards[1].deveui} not expected"]
    ledger[EUI64.parse(sim.boards[0].deveui)] = Expectation(join_eui=EUI64.parse(JOIN_EUI), band="EU868")
    assert verify_board(sim.ports[0], provisioned=ledger).problems == ["band AS923, expected EU868"]
