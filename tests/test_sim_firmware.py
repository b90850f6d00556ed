"""The board simulator's SAMD21 side: a board "running flasher_otaa" (its USB protocol, modelled on
otaa_node.h and checked against the real sketch built for the host), the 1200-baud touch, the bootloader
(no serial number, same USB location) and the SAM-BA subset a stand-in bossac speaks.
Everything over real ptys with pyserial; flasher's own commands run as real child processes.
"""

from __future__ import annotations

import json
import time

import pytest
import serial
from fixtures_dps import ID_SCOPE
from fixtures_sketch import JOIN_EUI, otaa_header
from test_provision import run_cli

from flasher.ports import load_simulated
from flasher.rhf76 import open_module


def running(sim, backend, host_sketch, i=0, deveui=None):
    """A board running flasher_otaa, as ``backend``: the simulator's model, or the real sketch built for the host."""
    b = sim.boards[i]
    if backend == "model":
        return sim.flash(i, "flasher_otaa", deveui=deveui)
    return host_sketch(sim, i, header=otaa_header(deveui or b.deveui), idle_ms=2).usb


def read_for(port: str, seconds: float) -> str:
    seen = b""
    deadline = time.monotonic() + seconds
    with serial.Serial(port, timeout=0.05) as s:
        while time.monotonic() < deadline:
            seen += s.read(4096)
    return seen.decode("ascii", "replace")


@pytest.mark.parametrize("backend", ["model", "sketch"])
def test_eui_and_verify_through_the_maintenance_pass_through(sim_boards, host_sketch, backend):
    sim = sim_boards(1, seed=401)
    b = sim.boards[0]
    b.eeprom.mode, b.eeprom.appkey = "LWOTAA", "2B7E151628AED2A6ABF7158809CF4F3C"  # as `program` left it
    port = running(sim, backend, host_sketch)
    eui = run_cli("eui", "--port", port, "--json")
    assert eui.returncode == 0, eui.stderr
    assert json.loads(eui.stdout)["deveui"] == b.deveui
    b.eeprom.appeui = JOIN_EUI
    ok = run_cli("verify", "--port", port, "--expect", b.deveui, "--join-eui", JOIN_EUI, "--band", "EU868")
    assert ok.returncode == 0 and ok.stdout.startswith("ok\t"), ok.stdout + ok.stderr


@pytest.mark.parametrize("backend", ["model", "sketch"])
def test_a_board_refusing_its_header_still_answers_eui(sim_boards, host_sketch, backend):
    sim = sim_boards(1, seed=402)
    port = running(sim, backend, host_sketch, deveui="2CF7F12024900138")
    said = read_for(port, 1.5)
    assert "REFUSING TO JOIN: config.h was generated for DevEUI 2CF7F12024900138" in said
    eui = run_cli("eui", "--port", port)
    assert eui.returncode == 0 and eui.stdout.strip() == sim.boards[0].deveui, eui.stderr
    assert "AT+JOIN" not in sim.boards[0].received


@pytest.mark.parametrize("backend", ["model", "sketch"])
def test_busy_during_a_join_then_served(sim_boards, host_sketch, backend):
    sim = sim_boards(1, seed=403, join_delay=0.8)
    b = sim.boards[0]
    b.eeprom.mode, b.eeprom.appkey = "LWOTAA", "2B7E151628AED2A6ABF7158809CF4F3C"
    port = running(sim, backend, host_sketch)
    deadline = time.monotonic() + 20
    while "AT+JOIN" not in b.received:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with open_module(port, timeout=1.0) as module:  # < the join: only the BUSY answer lets this succeed
        assert module.read_ids().dev_eui.hex == b.deveui


def test_a_resumed_provision_works_on_a_board_running_flasher_otaa(sim_boards, sim_env, dps_emulator, tmp_path):
    sim = sim_boards(1, seed=404)
    sim_env(sim)
    common = ["--id-scope", ID_SCOPE, "--dps-host", dps_emulator.host, "--ca-cert", str(dps_emulator.ca_cert_path),
              "--ledger", str(tmp_path / "l.sqlite3"), "--out-dir", str(tmp_path / "h"), "--join-eui", JOIN_EUI,
              "--json"]
    first = run_cli("provision", "--all", *common)
    assert first.returncode == 0, first.stderr
    port = sim.flash(0, "flasher_otaa")  # what --upload leaves behind
    again = run_cli("provision", "--all", *common)
    assert again.returncode == 0 and json.loads(again.stdout)["status"] == "already_provisioned", again.stderr
    forced = run_cli("provision", "--serial-number", sim.boards[0].serial_number, "--force", *common)
    assert forced.returncode == 0, forced.stderr
    r = json.loads(forced.stdout)
    assert (r["status"], r["port"], r["deveui"]) == ("provisioned", port, sim.boards[0].deveui)
    assert sim.boards[0].received.count('AT+ID=AppEui,"' + JOIN_EUI + '"') == 2  # programmed twice, through it


# --- the upload path: touch, bootloader, SAM-BA -----------------------------------------------

def test_touch_bootloader_and_samba_boot_the_image_it_was_sent(sim_boards):
    sim = sim_boards(2, seed=405)
    b = sim.boards[1]
    before = {p.device: p for p in load_simulated(sim.ports_file)}[sim.ports[1]]
    with serial.Serial(sim.ports[1], 1200):  # the 1200-baud touch
        pass
    deadline = time.monotonic() + 10

    def bootloader_listed():
        """The flag flips first; discovery sees the bootloader once ports.json is rewritten: wait for both."""
        return b.bootloader and any(p.location == "sim-1" and p.board == "bootloader"
                                    for p in load_simulated(sim.ports_file))

    while not bootloader_listed():
        assert time.monotonic() < deadline, "no reset into the bootloader"
        time.sleep(0.01)
    boot = {p.location: p for p in load_simulated(sim.ports_file)}["sim-1"]
    assert (boot.board, boot.serial_number, boot.pid, boot.location) == ("bootloader", None, 0x000C, before.location)
    assert sim.boards[0].port == sim.ports[0]  # the other board is untouched (a tty name may be reused: not checked)
    image = b"\x00" * 100 + f"flasher_otaa: for DevEUI {b.deveui}, band EU868\r\n".encode() + b"\xff" * 50
    with serial.Serial(boot.device, timeout=2) as s:
        s.write(b"N#")
        assert s.read(2) == b"\n\r"
        s.write(b"V#")
        assert s.read_until(b"\n\r").startswith(b"v2.0 [Arduino:XYZ]")
        s.write(f"S00002000,{len(image):X}#".encode() + image + b"G00002000#")
        deadline = time.monotonic() + 5
        while b.bootloader or not any(p.board == "app" for p in load_simulated(sim.ports_file) if p.location == "sim-1"):
            assert time.monotonic() < deadline, "never left the bootloader"
            time.sleep(0.01)
    app = [p for p in load_simulated(sim.ports_file) if p.location == "sim-1"]
    assert [(p.board, p.serial_number) for p in app] == [("app", b.serial_number)]
    assert (b.eeprom.firmware, b.eeprom.firmware_deveui) == ("flasher_otaa", b.deveui)
    eui = run_cli("eui", "--port", app[0].device)
    assert eui.returncode == 0 and eui.stdout.strip() == b.deveui, eui.stderr
