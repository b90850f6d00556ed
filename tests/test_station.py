"""`flasher station`: simulated boards plugged in over time on real ptys (hot-plug through the simulator, seen
through the same discovery as `--all`), the real SDK against the DPS emulator, a real SQLite ledger. The tests wait
on the station's own events, each with a deadline, and then check the ledger, the emulator and the event stream."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pyte
import pytest
import zxingcpp
from fixtures_dps import GROUP_PRIMARY, ID_SCOPE
from PIL import Image
from test_progress import Terminal

from flasher.eui import EUI64
from flasher.ledger import Ledger
from flasher.pipeline import Settings, provision_boards
from flasher.progress import BoardEvent, StationEvent, StationJson, StationKind, StationScreen, StationTee, StepState, Tally
from flasher.states import Verdict
from flasher.station import Station, discover
from flasher.tr005 import TR005

JOIN_EUI = "70B3D57ED003F06A"
DEADLINE = 60.0


class Events:
    """Every event the station emits, kept in order; ``wait`` blocks until one matches or the deadline passes."""

    def __init__(self):
        self.events: list = []
        self._cond = threading.Condition()

    def emit(self, event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def close(self) -> None:
        pass

    def wait(self, what: str, match) -> object:
        with self._cond:
            found = self._cond.wait_for(lambda: next((e for e in self.events if match(e)), None), timeout=DEADLINE)
        assert found is not None, f"no {what} within {DEADLINE:.0f} s; events: {self.events[-8:]}"
        return found

    def verdict(self, board, verdict: Verdict) -> StationEvent:
        return self.wait(f"{verdict} for board {board.index}", lambda e: isinstance(e, StationEvent)
                         and e.kind is StationKind.VERDICT and e.serial_number == board.serial_number
                         and e.verdict is verdict)

    def of(self, board, kind: StationKind) -> list[StationEvent]:
        with self._cond:
            return [e for e in self.events if isinstance(e, StationEvent) and e.kind is kind
                    and e.serial_number == board.serial_number]


def settings_for(emu, tmp_path, **over) -> Settings:
    kw = dict(id_scope=ID_SCOPE, group_key=base64.b64decode(GROUP_PRIMARY), dps_host=emu.host,
              ca_cert=str(emu.ca_cert_path), out_dir=tmp_path / "headers", join_eui=EUI64.parse(JOIN_EUI), timeout=30.0)
    kw.update(over)
    return Settings(**kw)


def registrations(emu, reg_id: str) -> int:
    return sum(r.get("registrationId") == reg_id for r in emu.state()["registrations"])


def test_boards_plugged_over_time_each_provisioned_once_an_unplugged_one_resumed(sim_boards, dps_emulator, tmp_path):
    sim = sim_boards(5, seed=1414, plugged=0)
    b = sim.boards
    settings = settings_for(dps_emulator, tmp_path)
    stream = tmp_path / "events.jsonl"
    with Ledger(tmp_path / "l.sqlite3") as ledger, open(stream, "w", encoding="utf-8") as json_out:
        # board 0 was provisioned earlier, by `flasher provision`, and is still plugged in when the station starts
        [first] = provision_boards([sim.plug(0)], settings, ledger)
        assert first.status == "provisioned", first.error
        events = Events()
        bench = Station(settings, ledger, StationTee(events, StationJson(json_out)), settle=0.2, poll=0.05,
                        find=lambda: discover(sim.ports_file), udev=False)
        box: list[Tally] = []
        runner = threading.Thread(target=lambda: box.append(bench.run()), name="test-station")
        runner.start()
        try:
            events.verdict(b[0], Verdict.ALREADY_DONE)
            # three at once; board 3's cable comes out while its module is being programmed
            b[3].faults.unplug_after = 4
            for i in (1, 2, 3):
                sim.plug(i)
            gone = events.verdict(b[3], Verdict.UNPLUGGED)
            assert gone.step == "program" and gone.deveui == b[3].deveui
            row = ledger.get(b[3].deveui)
            assert row.status == "failed" and row.current_step == "program" and row.steps["render"] == "ok"
            sim.replug(3)
            events.verdict(b[3], Verdict.DONE)
            assert "resumes at program" in events.of(b[3], StationKind.PLUGGED)[-1].detail
            events.verdict(b[1], Verdict.DONE)
            events.verdict(b[2], Verdict.DONE)
            # board 4 answers slowly; Ctrl-C while it programs: it finishes that step, then stops
            b[4].faults.latency = 0.25
            sim.plug(4)
            events.wait("board 4 programming", lambda e: isinstance(e, BoardEvent) and e.deveui == b[4].deveui
                        and e.step == "program" and e.state is StepState.RUNNING)
            bench.stop()
            runner.join(DEADLINE)
            assert not runner.is_alive()
        finally:
            bench.stop()
            runner.join(DEADLINE)
        stopped = events.verdict(b[4], Verdict.STOPPED)
        assert box == [Tally(done=3, failed=0, already_done=1, unplugged=0, stopped=1)]
        # the ledger: every board once, board 3 in two attempts, board 0 untouched, board 4 where it stopped
        for board in b[:4]:
            assert ledger.get(board.deveui).status == "provisioned"
            assert registrations(dps_emulator, board.deveui.lower()) == 1, board.index
        assert [ledger.get(board.deveui).attempts for board in b[:4]] == [1, 1, 1, 2]
        assert [ledger.get(board.deveui).serial_number for board in b[1:]] == [board.serial_number for board in b[1:]]
        row = ledger.get(b[4].deveui)
        assert row.steps["program"] == "ok" and row.current_step == stopped.step == "upload" and row.status == "failed"
        assert registrations(dps_emulator, b[4].deveui.lower()) == 0
        assert b[4].state["appeui"] == JOIN_EUI and b[4].state["mode"] == "LWOTAA"   # program was not cut short
    assert [len(events.of(board, StationKind.STARTED)) for board in b] == [1, 1, 1, 2, 1]
    last = events.events[-1]
    assert last.kind is StationKind.TALLY and last.tally == box[0]
    assert not [t.name for t in threading.enumerate() if t.name.startswith("station-board")]
    # the JSON stream says the same, one object per event, each with every key
    objects = [json.loads(line) for line in stream.read_text().splitlines()]
    assert len(objects) == len(events.events)
    assert {frozenset(o) for o in objects if o["event"] != "step"} == \
        {frozenset({"detail", "deveui", "event", "port", "seconds", "serial_number", "step", "tally", "t", "verdict"})}
    assert [(o["deveui"], o["verdict"]) for o in objects if o["event"] == "verdict"] == \
        [(e.deveui, e.verdict.value) for e in events.events if isinstance(e, StationEvent) and e.kind is StationKind.VERDICT]
    assert objects[-1]["event"] == "tally" and objects[-1]["tally"] == box[0].to_dict()


def read_json_lines(pipe, events: Events) -> None:
    for line in pipe:
        events.emit(json.loads(line))


def station_cli(emu, tmp_path, sim, *extra, stderr=subprocess.PIPE, stdout=subprocess.PIPE):
    env = dict(os.environ, FLASHER_GROUP_PRIMARY_KEY=GROUP_PRIMARY, FLASHER_SIMULATED_PORTS=str(sim.ports_file))
    env.pop("FLASHER_APPKEY_MASTER", None)
    args = [sys.executable, "-m", "flasher", "station", "--id-scope", ID_SCOPE, "--dps-host", emu.host,
            "--ca-cert", str(emu.ca_cert_path), "--join-eui", JOIN_EUI, "--ledger", str(tmp_path / "l.sqlite3"),
            "--out-dir", str(tmp_path / "h"), "--settle", "0.2", "--no-udev", *extra]
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, text=True, env=env)


def test_the_command_writes_labels_and_prints_the_tally_on_sigterm(sim_boards, dps_emulator, tmp_path):
    sim = sim_boards(2, seed=1515, plugged=0)
    proc = station_cli(dps_emulator, tmp_path, sim, "--json", "--labels", str(tmp_path / "labels"))
    events = Events()
    reader = threading.Thread(target=read_json_lines, args=(proc.stdout, events))
    reader.start()
    try:
        events.wait("ready", lambda o: o["event"] == "ready")
        for i in (0, 1):
            sim.plug(i)
        for board in sim.boards:
            events.wait(f"board {board.index} done", lambda o, sn=board.serial_number: o["event"] == "verdict"
                        and o["serial_number"] == sn and o["verdict"] == "done")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(DEADLINE)
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert events.events[-1]["event"] == "tally" and events.events[-1]["tally"]["done"] == 2
    assert err.splitlines()[-1] == "station: tally: 2 done, 0 failed, 0 already done"
    with Ledger(tmp_path / "l.sqlite3", readonly=True) as ledger:
        for board in sim.boards:
            row = ledger.get(board.deveui)
            assert row.status == "provisioned" and row.steps["label"] == "ok"
            assert row.serial_number == board.serial_number
            [text] = [r.text for r in zxingcpp.read_barcodes(Image.open(tmp_path / "labels" / f"{board.deveui}.png"))]
            code = TR005.parse(text)
            assert (code.dev_eui.hex, code.join_eui.hex, code.serial) == (board.deveui, row.join_eui, board.serial_number)
            appkey = board.state["appkey"]   # what the module holds; never on a label
            assert appkey and appkey not in text and appkey not in (tmp_path / "labels" / f"{board.deveui}.svg").read_text()
            assert appkey.lower() not in (tmp_path / "labels" / f"{board.deveui}.svg").read_text()


class BellScreen(pyte.Screen):
    def __init__(self, *args):
        super().__init__(*args)
        self.bells = 0

    def bell(self, *args) -> None:
        self.bells += 1


def replay(term: Terminal) -> BellScreen:
    """The pty's bytes through pyte, counting bells."""
    end = term.sync()
    screen = BellScreen(term._sizes[-1][1], term.rows)
    pyte.ByteStream(screen).feed(bytes(term._log[:end]))
    return screen


def row_of(screen: pyte.Screen, text: str) -> int:
    rows = [y for y, line in enumerate(screen.display) if text in line]
    assert rows, "\n".join(screen.display)
    return rows[0]


def test_the_screen_on_a_real_terminal_shows_verdicts_in_colour_and_rings(sim_boards, dps_emulator, tmp_path):
    sim = sim_boards(2, seed=1616, plugged=0)
    sim.boards[1].faults.silent = True   # never answers: fails at identify (after one more try)
    term = Terminal(110, 16)
    (tmp_path / "flasher.toml").write_text("at_timeout = 0.4\n")   # the silent board fails sooner
    proc = station_cli(dps_emulator, tmp_path, sim, "--json", "--config", str(tmp_path / "flasher.toml"),
                       stderr=term.slave)
    events = Events()
    reader = threading.Thread(target=read_json_lines, args=(proc.stdout, events))
    reader.start()
    try:
        events.wait("ready", lambda o: o["event"] == "ready")
        sim.plug(0)
        sim.plug(1)
        for board, verdict in ((sim.boards[0], "done"), (sim.boards[1], "failed")):
            events.wait(f"{verdict} for board {board.index}", lambda o, sn=board.serial_number, v=verdict:
                        o["event"] == "verdict" and o["serial_number"] == sn and o["verdict"] == v)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(DEADLINE) == 1   # a board failed
        screen = replay(term)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(DEADLINE)
        proc.stdout.close()
        term.close()
    lines = [line.rstrip() for line in screen.display]
    assert lines[0].startswith("flasher station · 1 done · 1 failed · 0 already done"), "\n".join(lines)
    done, failed = row_of(screen, sim.boards[0].deveui), row_of(screen, sim.boards[1].port)
    assert lines[done].split()[:2] == ["DONE", sim.boards[0].port] and lines[failed].split()[0] == "FAILED"
    assert screen.buffer[done][1].data == "D" and screen.buffer[done][1].bg == "green"
    assert screen.buffer[failed][1].bg == "red" and screen.buffer[failed][1].fg == "brightwhite"
    assert screen.buffer[done][20].bg == "default"   # only the verdict block is coloured
    assert "last finished:" in lines and lines[-1] == "" and "station: 1 done, 1 failed, 0 already done" in lines
    assert all(len(line) < 110 for line in lines)
    assert screen.bells == 1 + 3   # one for done, three for failed


def test_no_bell_and_a_narrow_short_terminal(tmp_path):
    term = Terminal(50, 8)
    try:
        for bell in (True, False):
            screen = StationScreen(term.stream, bell=bell, tick=3600)
            tally = Tally()
            for i in range(6):
                port = f"/dev/serial/by-id/usb-Seeed_Seeeduino_LoRaWAN_{i:08X}-if00"
                screen.emit(StationEvent(StationKind.PLUGGED, port, f"SN{i}", tally=tally))
                screen.emit(StationEvent(StationKind.STARTED, port, f"SN{i}", tally=tally))
                if i < 3:
                    tally = Tally(done=tally.done + 1)
                    screen.emit(StationEvent(StationKind.VERDICT, port, f"SN{i}", f"2CF7F120249000{i:02X}",
                                             Verdict.DONE, detail="ok\x1b[2J\r\n", seconds=2.5, tally=tally))
            screen.emit(StationEvent(StationKind.TALLY, tally=tally))
            screen.close()
            shown = replay(term)
            assert shown.bells == (3 if bell else 0)
            lines = [line.rstrip() for line in shown.display]
            assert all(len(line) < 50 for line in lines)
            assert lines[-2] == "station: 3 done, 0 failed, 0 already done"
            term.close()
            term = Terminal(50, 8)
    finally:
        term.close()


@pytest.mark.parametrize("args, env, message", [
    (["--settle", "-1"], {}, "--settle '-1': must be a number of seconds from 0 to 60"),
    (["--labels", "{file}"], {}, "--labels"),
    ([], {"FLASHER_SIMULATED_PORTS": "{tmp}/nowhere.json"}, "no such file"),
    (["--id-scope", "not a scope"], {}, "scope"),
])
def test_bad_input_is_one_line_exit_2_and_no_ledger(tmp_path, args, env, message):
    (tmp_path / "file").write_text("a file, not a folder")
    fill = {"{file}": str(tmp_path / "file"), "{tmp}": str(tmp_path)}

    def sub(text: str) -> str:
        for k, v in fill.items():
            text = text.replace(k, v)
        return text

    full = dict(os.environ, FLASHER_GROUP_PRIMARY_KEY=GROUP_PRIMARY, **{k: sub(v) for k, v in env.items()})
    full.setdefault("FLASHER_SIMULATED_PORTS", "")
    p = subprocess.run([sys.executable, "-m", "flasher", "station", "--id-scope", ID_SCOPE, "--ledger",
                        str(tmp_path / "l.sqlite3"), *[sub(a) for a in args]], capture_output=True, text=True,
                       env=full, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and len(p.stderr.splitlines()) == 1, p.stderr
    assert message in p.stderr and p.stdout == ""
    assert not Path(tmp_path / "l.sqlite3").exists()


def test_station_takes_every_provision_option():
    from flasher.commands.provision import provision
    from flasher.commands.station import station

    mine = {p.name for p in station.params}
    assert {p.name for p in provision.params} - mine == {"ports", "serial_numbers", "all_boards"}
    assert {"station_settle", "udev", "no_bell", "as_json", "labels", "config_path"} <= mine


def test_a_board_that_never_settles_is_never_started(sim_boards, dps_emulator, tmp_path):
    """Debounce: a port that comes and goes within the settle time is not a board to provision."""
    sim = sim_boards(1, seed=1717, plugged=0)
    events = Events()
    with Ledger(tmp_path / "l.sqlite3") as ledger:
        bench = Station(settings_for(dps_emulator, tmp_path), ledger, events, settle=30.0, poll=0.02,
                        find=lambda: discover(sim.ports_file), udev=False)
        runner = threading.Thread(target=bench.run)
        runner.start()
        try:
            events.wait("ready", lambda e: e.kind is StationKind.READY)
            sim.plug(0)
            events.wait("plugged", lambda e: isinstance(e, StationEvent) and e.kind is StationKind.PLUGGED)
            sim.unplug(0)
            events.wait("unplugged", lambda e: isinstance(e, StationEvent) and e.kind is StationKind.UNPLUGGED)
        finally:
            bench.stop()
            runner.join(DEADLINE)
        assert not events.of(sim.boards[0], StationKind.STARTED) and ledger.all() == []
        assert sim.boards[0].commands == 0
    assert events.events[-1].tally == Tally()


def test_boards_from_another_simulator_and_a_ports_file_written_in_place(mini_module, dps_emulator, tmp_path):
    """The station trusts no detail of flasher's own simulator: these boards are the independent MiniModule (another
    dialect implementation), listed by a ports file this test writes itself, in place (readers can catch it half
    written), with integer USB ids and one board without a serial number."""
    ports_file = tmp_path / "ports.json"
    ports_file.write_text("[]")
    mods = [mini_module(deveui="47:86:c5:8b:00:00:00:01"), mini_module(deveui="47:86:c5:8b:00:00:00:02", sep=",")]
    entries = [{"device": mods[0].path, "vid": 0x2886, "pid": 0x800C, "serial_number": "MINI-0001"},
               {"device": mods[1].path, "vid": 0x2886, "pid": 0x800C}]
    events = Events()
    with Ledger(tmp_path / "l.sqlite3") as ledger:
        bench = Station(settings_for(dps_emulator, tmp_path, test_message=None), ledger, events, settle=0.2,
                        poll=0.01, find=lambda: discover(ports_file), udev=False)
        runner = threading.Thread(target=bench.run)
        runner.start()
        try:
            events.wait("ready", lambda e: e.kind is StationKind.READY)
            for n in (1, 2):
                with open(ports_file, "w") as f:   # not atomic: the station polls every 10 ms while this writes
                    for chunk in (json.dumps(entries[:n])[i:i + 7] for i in range(0, 400, 7)):
                        f.write(chunk)
                        f.flush()
            for eui in ("4786C58B00000001", "4786C58B00000002"):
                events.wait(f"{eui} done", lambda e, eui=eui: isinstance(e, StationEvent)
                            and e.kind is StationKind.VERDICT and e.deveui == eui and e.verdict is Verdict.DONE)
        finally:
            bench.stop()
            runner.join(DEADLINE)
        assert events.events[-1].tally == Tally(done=2)
        assert [ledger.get(e).status for e in ("4786C58B00000001", "4786C58B00000002")] == ["provisioned"] * 2
        assert ledger.get("4786C58B00000001").serial_number == "MINI-0001"
    for mod in mods:
        assert mod.values["appeui"].replace(":", "").upper() == JOIN_EUI and mod.values["mode"] == "LWOTAA"
        assert len(mod.values["appkey"]) == 32
    assert not any(isinstance(e, StationEvent) and e.kind is StationKind.UNPLUGGED for e in events.events)
