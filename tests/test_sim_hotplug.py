"""The board simulator's hot-plug: boards that arrive on a schedule and are plugged and unplugged from another
process through its control socket, with ports.json (what discovery reads) following each change."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

from flasher.ports import load_simulated
from flasher.sim.board import BoardSimulator

DEADLINE = 30.0


def test_a_schedule_plugs_each_board_once_in_order(tmp_path):
    seen: list[tuple[int, str | None]] = []
    arrived = threading.Condition()

    def changed(i, port):
        with arrived:
            seen.append((i, port))
            arrived.notify_all()

    with BoardSimulator(3, tmp_path / "b", plugged=1, plug_every=0.05, on_change=changed) as sim:
        assert [b.port is not None for b in sim.boards] == [True, False, False]
        with arrived:
            assert arrived.wait_for(lambda: len(seen) == 2, DEADLINE)
        assert [i for i, _ in seen] == [1, 2] and all(port for _, port in seen)
        sim.unplug(1)   # the schedule is over: an unplugged board stays unplugged
        assert [p.serial_number for p in load_simulated(sim.ports_file)] == \
            [sim.boards[0].serial_number, sim.boards[2].serial_number]
        assert seen[-1] == (1, None)


def wait_for_ports(path, count: int, proc) -> list:
    """ports.json, once it lists ``count`` boards (the simulator rewrites it atomically on every change)."""
    import time

    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        if path.exists():
            ports = json.loads(path.read_text())
            if len(ports) == count:
                return ports
        time.sleep(0.02)
    raise AssertionError(f"ports.json never listed {count} boards")


def test_plug_and_unplug_from_another_process(cli, tmp_path):
    state = tmp_path / "b"
    sim = subprocess.Popen([sys.executable, "-m", "flasher", "simulate", "boards", "--count", "2", "--state",
                            str(state), "--plug-every", "0.05", "--json"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        before = wait_for_ports(state / "ports.json", 2, sim)
        code, out, err = cli("simulate", "unplug", "--state", state, "0")
        assert code == 0, err
        gone = json.loads(out)
        assert gone["board"] == 0 and gone["port"] is None and gone["serial_number"] == before[0]["serial_number"]
        assert not os.path.exists(before[0]["device"]) or before[0]["device"] == before[1]["device"]
        assert [e["serial_number"] for e in wait_for_ports(state / "ports.json", 1, sim)] == \
            [before[1]["serial_number"]]
        code, out, _ = cli("simulate", "plug", "--state", state)   # the first unplugged board comes back
        assert code == 0 and json.loads(out)["serial_number"] == before[0]["serial_number"]
        code, out, _ = cli("simulate", "plug", "--state", state)   # none unplugged: a new board
        new = json.loads(out)
        assert code == 0 and new["board"] == 2 and new["serial_number"] not in {e["serial_number"] for e in before}
        assert len(wait_for_ports(state / "ports.json", 3, sim)) == 3
        code, out, err = cli("simulate", "unplug", "--state", state, "7")
        assert code == 2 and err == "error: simulator: no board '7' (boards 0 to 2)\n"
        sim.send_signal(signal.SIGTERM)
        assert sim.wait(DEADLINE) == 0
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.wait()
    err = sim.stderr.read()
    sim.stdout.close()
    sim.stderr.close()
    assert "board 0 plugged in at" in err and "board 0 unplugged" in err and "board 2 plugged in at" in err
    assert not (state / "control.sock").exists() and not (state / "ports.json").exists()
    code, _, err = cli("simulate", "plug", "--state", state)
    assert code == 2 and "is `flasher simulate boards --state` running" in err and len(err.splitlines()) == 1
