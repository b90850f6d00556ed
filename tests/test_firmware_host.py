"""flasher_otaa's logic, run on the host: the shipped sketch compiled with g++ against a stand-in Arduino core
(tests/hostduino), its Serial1 wired to a simulated RHF76 on a real pty, its SerialUSB a pty that flasher
opens with pyserial. The simulator answers by command, so the sketch is judged by what it sends and what it
concludes from real answers: the DevEUI check, the join verdict, the back-off, the maintenance pass-through.
"""

from __future__ import annotations

import re
import time

import pytest
from fixtures_sketch import APP_KEY, HOSTDUINO, JOIN_EUI, otaa_header
from test_provision import run_cli

from flasher.rhf76 import open_module


def commands(sim, i=0) -> list[str]:
    return list(sim.boards[i].received)


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_header_for_another_board_is_refused_before_anything_is_written(sim_boards, host_sketch):
    sim = sim_boards(1, seed=301)
    b = sim.boards[0]
    board = host_sketch(sim, header=otaa_header("2CF7F12024900138"))
    m = board.read_until(r"REFUSING TO JOIN: config.h was generated for DevEUI (\w+), but this board's module has "
                         r"DevEUI (\w+)\r\n.*flasher header (\w+)")
    assert m.groups() == ("2CF7F12024900138", b.deveui, b.deveui)
    board.read_until("REFUSING TO JOIN")  # it keeps saying so (every 30 s) for a serial monitor opened late
    # The DevEUI was read first and nothing was written: no join, no key, the factory DevEUI kept.
    assert set(commands(sim)) == {"AT+ID=DevEui"}
    assert b.eeprom.deveui == b.eeprom.factory_deveui and b.eeprom.appkey is None and not b.joined


def test_joins_only_on_the_modules_word_then_sends(sim_boards, host_sketch):
    sim = sim_boards(1, seed=302)
    b = sim.boards[0]
    board = host_sketch(sim)
    devaddr = board.read_until(r"joined, DevAddr (\w{8})").group(1)
    assert devaddr == b.eeprom.devaddr and b.joined
    board.read_until(r"uplink 0 sent")
    sent = commands(sim)
    assert sent[:8] == ["AT+ID=DevEui", f'AT+ID=AppEui,"{JOIN_EUI}"', f'AT+KEY=APPKEY,"{APP_KEY.hex().upper()}"',
                        "AT+MODE=LWOTAA", "AT+DR=EU868", "AT+DR=DR0", "AT+ADR=ON", "AT+JOIN"]
    assert sent[8] == 'AT+MSG="flasher 0"'
    assert not any(c.startswith("AT+ID=DevEui,") for c in sent)  # the factory DevEUI is never overwritten
    assert b.eeprom.appkey == APP_KEY.hex().upper() and b.eeprom.mode == "LWOTAA" and b.eeprom.appeui == JOIN_EUI
    assert "+" not in board.seen  # nothing the sketch says can pass for a module answer


def test_a_module_that_omits_network_joined_still_joins(sim_boards, host_sketch):
    sim = sim_boards(1, seed=303)
    sim.boards[0].join_style = "terse"
    board = host_sketch(sim)
    assert board.read_until(r"joined, DevAddr (\w{8})").group(1) == sim.boards[0].eeprom.devaddr


@pytest.mark.parametrize("style,said", [
    ("full", r"Join failed"),                 # no coverage: the old sketch's library call caught only this one
    ("silent", r"incomplete answer"),         # Starting, NORMAL, then nothing: the library read it as joined
    ("busy", r"LoRaWAN modem is busy"),
])
def test_a_join_that_does_not_end_in_a_devaddr_is_retried_with_back_off(sim_boards, host_sketch, style, said):
    sim = sim_boards(1, seed=304, join_delay=0.01)
    b = sim.boards[0]
    b.join_style, b.join_accept_after = style, 2 if style == "full" else 0
    board = host_sketch(sim)
    waits = []
    for attempt in (1, 2):
        m = board.read_until(rf"join attempt {attempt}\r\n.*?join failed \(({said}[^)]*)\); next attempt in (\d+)",
                             timeout=30)
        waits.append(int(m.group(2)))
        assert "joined" not in board.seen
    # 150 s doubling, plus up to 25 % jitter: a 1 % duty cycle after a 1.5 s SF12 join-request.
    assert 150 <= waits[0] <= 187 and 300 <= waits[1] <= 375, waits
    if style != "full":
        b.join_style = "full"  # the network comes back
    assert board.read_until(r"join attempt 3\r\n.*?joined, DevAddr (\w{8})", timeout=30).group(1) == b.eeprom.devaddr
    assert commands(sim).count("AT+JOIN") == 3


def test_a_silent_module_never_reads_as_joined(sim_boards, host_sketch):
    sim = sim_boards(1, seed=305)
    sim.boards[0].faults.silent = True
    board = host_sketch(sim)
    board.read_until(r"cannot read the module's DevEUI \(no answer from the module\); not joining")
    board.read_until(r"cannot read the module's DevEUI")
    assert "joined" not in board.seen and "join attempt" not in board.seen


def test_backoff_doubles_from_150_s_to_a_six_hour_cap_with_jitter(tmp_path):
    """joinBackoffMs itself, compiled from the shipped otaa_node.h: every attempt, the least and the most jitter."""
    import subprocess

    from flasher.arduino import default_sketch

    program = tmp_path / "backoff.cpp"
    program.write_text('#include "otaa_node.h"\nint main() {\n  for (unsigned n = 1; n <= 14; n++)\n'
                       '    printf("%lu %lu %lu\\n", otaa::joinBackoffMs(n, 0), otaa::joinBackoffMs(n, 1),\n'
                       '           otaa::joinBackoffMs(n, 0x7FFFFFFFUL));\n  return 0;\n}\n')
    exe = tmp_path / "backoff"
    subprocess.run(["g++", "-std=gnu++14", "-Wall", "-Wextra", "-Werror", f"-I{HOSTDUINO}", f"-I{default_sketch()}",
                    "-include", "Arduino.h", str(program), str(HOSTDUINO / "hostduino.cpp"), "-DHOSTDUINO_NO_MAIN",
                    "-o", str(exe)], check=True, capture_output=True)
    rows = [tuple(map(int, line.split())) for line in subprocess.run([str(exe)], capture_output=True, text=True,
                                                                     check=True).stdout.splitlines()]
    cap = 6 * 3600 * 1000
    for n, (least, one, most) in enumerate(rows):
        base = min(150_000 * 2 ** n, cap)
        assert least == base and one == base + 1 and base < most <= base + base // 4, (n, least, most)
    assert rows[8][0] == cap and rows[7][0] < cap  # 150 s * 2^8 passes 6 h: capped from the 9th wait on
    # LoRaWAN 1.0.x join back-off: at most 36 s of join airtime (24 SF12 joins) in the first hour, 36 s in the next
    # ten, 8.7 s (5 joins) in any day after. Worst case: no jitter, each join 1.483 s on air.
    starts, t = [0], 0
    for least, _, _ in rows:
        t += least
        starts.append(t)
    hour = 3600_000
    assert sum(s < hour for s in starts) * 1.483 <= 36
    assert sum(hour <= s < 11 * hour for s in starts) * 1.483 <= 36
    day_after = [s for s in starts if s >= 11 * hour]
    assert all(sum(d <= s < d + 24 * hour for s in day_after) * 1.483 <= 8.7 for d in day_after)


# --- the maintenance pass-through -----------------------------------------------------------

def test_flasher_eui_and_verify_work_on_a_board_running_flasher_otaa(sim_boards, host_sketch):
    sim = sim_boards(1, seed=307)
    b = sim.boards[0]
    board = host_sketch(sim)
    board.read_until(r"uplink 0 sent")
    eui = run_cli("eui", "--port", board.usb)
    assert eui.returncode == 0 and eui.stdout.strip() == b.deveui, eui.stderr
    ok = run_cli("verify", "--port", board.usb, "--expect", b.deveui, "--join-eui", JOIN_EUI, "--band", "EU868")
    assert ok.returncode == 0 and ok.stdout.startswith("ok\t"), ok.stdout + ok.stderr
    # After a minute without the host it checks the module again and carries on.
    board.read_until(r"maintenance over; checking the module again\r\n.*DevEUI \w+ matches config.h\r\n"
                     r".*joined, DevAddr", timeout=30)


def test_the_host_is_answered_busy_during_a_join_and_served_after_it(sim_boards, host_sketch):
    sim = sim_boards(1, seed=308, join_delay=1.0)  # the join-accept takes 2-3 s
    b = sim.boards[0]
    board = host_sketch(sim, idle_ms=2)  # the sketch's 20 s join timeout: about 7 s of wall time
    wait_for(lambda: "AT+JOIN" in commands(sim), 20, "the sketch never joined")
    t0 = time.monotonic()
    with open_module(board.usb, timeout=2.0) as module:  # its ping is answered BUSY, then forwarded
        assert module.read_ids().dev_eui.hex == b.deveui
    assert time.monotonic() - t0 > 0.5  # it did wait for the join to end
    assert commands(sim).count("AT") == 1  # the BUSY-answered ping never reached the module; the second did


def test_a_line_not_starting_with_at_gets_a_hint_not_the_module(sim_boards, host_sketch):
    sim = sim_boards(1, seed=309)
    board = host_sketch(sim)
    board.read_until(r"uplink 0 sent")
    board.read_until(r"send a line starting with AT to talk to the module", send=b"hello\r\n")
    assert "hello" not in " ".join(commands(sim))


def test_the_stand_in_library_enums_are_the_real_ones():
    from samd_kit import core_dir

    real = (core_dir() / "libraries" / "LoRaWan" / "LoRaWan.h").read_text()
    ours = (HOSTDUINO / "LoRaWan.h").read_text()
    enums = re.findall(r"^enum .*$", ours, re.MULTILINE)
    assert len(enums) == 4 and all(e in real for e in enums)
