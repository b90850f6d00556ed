"""Fault matrix: every provisioning step x every fault, through `flasher provision` as a user runs it.

Each possible cell runs the real CLI in a subprocess against its own simulated board
(on a real pty) and one shared DPS + IoT Hub emulator (TLS, the real SDK), injects its
fault at its step, and records: the step where the board stopped, the exit code, the
failure line on stderr, the ledger row, and the outcome of a plain rerun once the
fault is gone. The cells are independent and run concurrently (registrations take
>= 2 s each by SDK design). Impossible cells are marked n/a with the reason, not faked.

Faults are injected deterministically, never by timing: board faults become active
after a given number of AT commands (3 = after ``AT`` and the two ``AT+ID`` reads, i.e. during
programming); DPS faults through the emulator's knobs (429 throttling for one id, a
hub refusing one device), a wrong group key (401) or an address with nothing
listening (unreachable). A kill waits until the ledger (or the simulator) shows the
process inside the step — kept there by answer latency, the SDK's own 2 s
registration wait, or a hub CONNECT the emulator holds — then sends SIGKILL.

``pytest -s`` shows the table; the last test prints it in any case.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fixtures_dps import ENROLLMENTS, GROUP_PRIMARY, ID_SCOPE, free_loopback, group_device_key

from flasher.ledger import Ledger
from flasher.pipeline import STEPS as PIPELINE_STEPS
from flasher.sim.board import BoardSimulator, Faults
from flasher.sim.dps import DpsEmulator

STEPS = tuple(step.name for step in PIPELINE_STEPS)   # the pipeline's own list: a new step gets a row here
FAULTS = ("unplug", "silent", "corrupt", "dps-401", "dps-429", "dps-unreachable", "hub-refusing", "killed")
AT_STEPS = tuple(step.name for step in PIPELINE_STEPS if step.needs_module)
IDENTIFY_COMMANDS = 3  # AT, then AT+ID until two reads agree: board faults set after these hit "program"
JOIN_EUI = "70B3D57ED003F06A"
WRONG_KEY = base64.b64encode(b"\x5a" * 64).decode()

NA_PURE = "no I/O: the step is a computation between two ledger writes; nothing can fail or be caught inside it"
NA_UPLOAD = ("only with --upload: arduino-cli and a SAMD bootloader cannot run here (tests/test_upload.py covers the "
             "step with a stand-in)")
NA_NO_BOARD = "the board is closed after programming; a board fault cannot reach this step"
NA_NO_DPS = "no DPS or hub traffic happens in this step"
NA_LABEL = ("only with --labels: two files written from values earlier steps recorded, no board, DPS or hub "
            "traffic (tests/test_labels.py and tests/test_station.py cover it)")
NA = {}
for f in FAULTS:
    NA[("derive", f)] = NA_PURE
    NA[("render", f)] = NA_PURE
    NA[("upload", f)] = NA_UPLOAD
    NA[("label", f)] = NA_LABEL
for s in ("identify", "program"):
    for f in ("dps-401", "dps-429", "dps-unreachable", "hub-refusing"):
        NA[(s, f)] = NA_NO_DPS
for s in ("register", "message"):
    for f in ("unplug", "silent", "corrupt"):
        NA[(s, f)] = NA_NO_BOARD
NA_NETWORK = ("only with --tts-app; the matrix provisions without it (the step is skipped): "
              "tests/test_tts_pipeline.py gives The Things Stack's faults (401/403, 429/503, a refusing server, a "
              "kill between servers) through its emulator")
for f in FAULTS:
    NA[("network", f)] = NA_NETWORK
NA[("register", "hub-refusing")] = "registration talks to DPS only; the hub is first contacted in the message step"
NA[("message", "dps-401")] = "the hub's refusal of the device's credentials is the hub-refusing column"
NA[("message", "dps-429")] = "DPS is not contacted in the message step (the hub does not throttle in the emulator)"
NA[("message", "dps-unreachable")] = "DPS is not contacted in the message step; an unreachable hub is reported " \
                                     "like an unreachable DPS (same classifier, flasher.dps._classify)"
CELLS = [(s, f) for s in STEPS for f in FAULTS if (s, f) not in NA]


class StepFaults:
    """Duck-types :class:`Faults`: silence or corruption that starts after ``after`` commands."""

    def __init__(self, board, after: int, *, silent: bool = False, corrupt: bool = False):
        self._board, self._after, self._silent, self._corrupt = board, after, silent, corrupt
        self.latency, self.boot_noise, self.echo, self.unplug_after, self.flip_rate = 0.0, False, False, None, 0.0

    def _active(self) -> bool:
        return self._board.commands > self._after

    @property
    def silent(self) -> bool:
        return self._silent and self._active()

    @property
    def corrupt(self) -> int:
        return -1 if self._corrupt and self._active() else 0

    @corrupt.setter
    def corrupt(self, value) -> None:  # the simulator counts down positive values; -1 never changes
        pass


class HoldingEmulator(DpsEmulator):
    """The emulator, plus one test knob: hold a device's hub CONNECT until released (to catch a kill there)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.holds: dict[str, threading.Event] = {}

    async def on_connect(self, conn, req):
        parts = (req.username or "").split("/")
        if len(parts) >= 2 and parts[0].lower() == self.hub_name.lower():
            gate = self.holds.get(parts[1])
            end = time.monotonic() + 60
            while gate is not None and not gate.is_set() and time.monotonic() < end:
                await asyncio.sleep(0.02)
        return await super().on_connect(conn, req)


@dataclass
class Outcome:
    step: str
    fault: str
    stopped: str | None = None        # failed_step from --json, or where the kill landed
    exit_code: int | None = None
    message: str = ""                 # the failure line on stderr ("" for a kill)
    json_error: str | None = None
    ledger: str = ""                  # status/current_step, or "no row"
    ledger_error: str | None = None
    attempts: int | None = None
    rerun_exit: int | None = None
    rerun_status: str | None = None
    rerun_ledger: str = ""
    rerun_attempts: int | None = None
    consistent: bool | None = None    # after the rerun: header AppKey == module AppKey, module in OTAA, mode 0600
    header_device_key_ok: bool | None = None
    registrations_before_rerun: int | None = None
    registrations_after_rerun: int | None = None
    deveui_or_port: str | None = None
    problems: list = field(default_factory=list)


def _ledger_row(path: Path, deveui: str) -> tuple[str | None, str | None, str | None, int | None]:
    """(status, current_step, last_error, attempts) read by a separate connection; Nones if no row yet."""
    if not path.exists():
        return None, None, None, None
    try:
        db = sqlite3.connect(path, timeout=5)
        try:
            row = db.execute("SELECT status, current_step, last_error, attempts FROM boards WHERE deveui = ?",
                             (deveui,)).fetchone()
        finally:
            db.close()
    except sqlite3.OperationalError:
        return None, None, None, None
    return row if row else (None, None, None, None)


class Cell:
    """One (step, fault) experiment: its own board, ledger and header folder."""

    def __init__(self, step: str, fault: str, emu: HoldingEmulator, base: Path, seed: int):
        self.step, self.fault, self.emu = step, fault, emu
        self.dir = base / f"{step}-{fault}"
        self.dir.mkdir(parents=True)
        self.sim = BoardSimulator(count=1, state_dir=self.dir / "boards", seed=seed).start()
        self.board = self.sim.boards[0]
        self.deveui = self.board.deveui
        self.reg_id = self.deveui.lower()
        self.ledger_path = self.dir / "ledger.sqlite3"
        self.out = Outcome(step, fault)

    def close(self) -> None:
        self.sim.close()

    def argv(self, *, host: str | None = None, timeout: float = 20.0) -> list[str]:
        return [sys.executable, "-m", "flasher", "provision", "--port", self.sim.ports[0], "--id-scope", ID_SCOPE,
                "--dps-host", host or self.emu.host, "--ca-cert", str(self.emu.ca_cert_path), "--join-eui", JOIN_EUI,
                "--ledger", str(self.ledger_path), "--out-dir", str(self.dir / "headers"), "--json",
                "--timeout", str(timeout)]

    @staticmethod
    def env(key: str = GROUP_PRIMARY) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHER_")}
        env["FLASHER_GROUP_PRIMARY_KEY"] = key
        return env

    def registrations(self) -> int:
        return sum(r.get("attempts", 1) for r in self.emu.state()["registrations"] if r["registrationId"] == self.reg_id)

    # --- the experiment ---------------------------------------------------------------
    def run(self) -> Outcome:
        o = self.out
        try:
            if self.fault == "killed":
                self._killed_run()
            else:
                self._faulty_run()
            status, current, last_error, attempts = _ledger_row(self.ledger_path, self.deveui)
            o.ledger = f"{status}/{current}" if status else "no row"
            o.ledger_error, o.attempts = last_error, attempts
            self._heal()
            o.registrations_before_rerun = self.registrations()
            self._rerun()
        except Exception as exc:  # recorded, asserted by the tests below
            o.problems.append(f"{exc.__class__.__name__}: {exc}")
        return o

    def _faulty_run(self) -> None:
        o, b, f = self.out, self.board, self.fault
        host, env, timeout = None, self.env(), 20.0
        if f == "unplug":
            b.faults.unplug_after = 0 if self.step == "identify" else IDENTIFY_COMMANDS
        elif f == "silent":
            b.faults = StepFaults(b, 0 if self.step == "identify" else IDENTIFY_COMMANDS, silent=True)
        elif f == "corrupt":
            b.faults = StepFaults(b, 0 if self.step == "identify" else IDENTIFY_COMMANDS, corrupt=True)
        elif f == "dps-401":
            env = self.env(WRONG_KEY)
        elif f == "dps-429":
            self.emu.throttle(1000, retry_after=1, registration_id=self.reg_id)
            timeout = 20.0  # gives up after 5 retries (~5 s idle, more on a loaded machine), well before the deadline
        elif f == "dps-unreachable":
            host = free_loopback()  # nothing listens there
        elif f == "hub-refusing":
            self.emu.refuse_hub(self.reg_id)
        proc = subprocess.run(self.argv(host=host, timeout=timeout), env=env, capture_output=True, text=True,
                              timeout=90)
        o.exit_code = proc.returncode
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        o.message = errors[0] if errors else ""
        if len(errors) != 1:
            o.problems.append(f"expected one 'error:' line on stderr, got {len(errors)}")
        results = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        if len(results) == 1:
            o.stopped, o.json_error = results[0].get("failed_step"), results[0].get("error")
            o.deveui_or_port = results[0].get("deveui") or results[0].get("port")
        else:
            o.problems.append(f"expected one JSON result, got {proc.stdout!r}")
        if "Traceback" in proc.stderr:
            o.problems.append("traceback on stderr")

    def _killed_run(self) -> None:
        o, b = self.out, self.board
        if self.step == "identify":
            b.faults.latency = 0.5
            reached = lambda: b.commands >= 1  # noqa: E731  (the AT ping arrived; AT+ID is still to come)
        else:
            if self.step == "program":
                b.faults.latency = 0.3
            elif self.step == "message":
                self.emu.holds[self.reg_id] = threading.Event()
            reached = lambda: _ledger_row(self.ledger_path, self.deveui)[1] == self.step  # noqa: E731
        proc = subprocess.Popen(self.argv(), env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            end = time.monotonic() + 60
            while not reached() and proc.poll() is None and time.monotonic() < end:
                time.sleep(0.01)
            if reached() and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                o.stopped = self.step
            else:
                o.problems.append(f"never caught in {self.step} (exit {proc.poll()})")
            proc.wait(timeout=30)
            o.exit_code = proc.returncode
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
            gate = self.emu.holds.pop(self.reg_id, None)
            if gate is not None:
                gate.set()

    def _heal(self) -> None:
        b = self.board
        b.faults = Faults()
        if b.port is None:
            self.sim.replug(0)  # a new pty path, like USB re-enumeration
        self.emu.throttle(0, registration_id=self.reg_id)
        self.emu.accept_hub(self.reg_id)

    def _rerun(self) -> None:
        o = self.out
        proc = subprocess.run(self.argv(), env=self.env(), capture_output=True, text=True, timeout=90)
        o.rerun_exit = proc.returncode
        results = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        o.rerun_status = results[0]["status"] if len(results) == 1 else None
        if proc.returncode != 0:
            o.problems.append(f"rerun: {proc.stderr.strip()[-300:]}")
        o.registrations_after_rerun = self.registrations()
        with Ledger(self.ledger_path, create=False) as ledger:
            rec = ledger.get(self.deveui)
        o.rerun_ledger = f"{rec.status}/{rec.current_step}" if rec else "no row"
        o.rerun_attempts = rec.attempts if rec else None
        if rec and rec.header_path:
            header = Path(rec.header_path)
            text = header.read_text()
            eeprom = self.board.state
            o.consistent = (f'"{eeprom["appkey"]}"' in text and eeprom["mode"] == "LWOTAA"
                            and eeprom["appeui"] == JOIN_EUI and header.stat().st_mode & 0o777 == 0o600)
            m = re.search(r'FLASHER_DPS_DEVICE_KEY\s+"([^"]+)"', text)
            o.header_device_key_ok = bool(m) and m.group(1) == group_device_key(self.reg_id)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    base = tmp_path_factory.mktemp("fault-matrix")
    with HoldingEmulator(ENROLLMENTS, host=free_loopback(), cert_dir=base / "certs") as emu:
        cells = []
        try:
            for n, (step, fault) in enumerate(CELLS):
                cells.append(Cell(step, fault, emu, base, seed=9000 + n))
            with ThreadPoolExecutor(max_workers=len(cells)) as pool:
                outcomes = list(pool.map(lambda c: c.run(), cells))
        finally:
            for c in cells:
                c.close()
            for gate in emu.holds.values():
                gate.set()
        yield {(o.step, o.fault): o for o in outcomes}


# What each cell must show: (exit code, words in the message, ledger after the fault)
EXPECTED = {
    ("identify", "unplug"): (1, ("lost during", "unplugged"), "no row"),
    ("identify", "silent"): (1, ("no answer", "pass-through sketch"), "no row"),
    ("identify", "corrupt"): (1, ("garbled",), "no row"),
    ("identify", "killed"): (-signal.SIGKILL, (), "no row"),
    ("program", "unplug"): (1, ("lost during", "unplugged"), "failed/program"),
    ("program", "silent"): (1, ("no answer",), "failed/program"),
    ("program", "corrupt"): (1, ("garbled",), "failed/program"),
    ("program", "killed"): (-signal.SIGKILL, (), "in_progress/program"),
    ("register", "dps-401"): (1, ("401",), "failed/register"),
    ("register", "dps-429"): (1, ("429",), "failed/register"),
    ("register", "dps-unreachable"): (1, ("cannot connect",), "failed/register"),
    ("register", "killed"): (-signal.SIGKILL, (), "in_progress/register"),
    ("message", "hub-refusing"): (1, ("refused",), "failed/message"),
    ("message", "killed"): (-signal.SIGKILL, (), "in_progress/message"),
}


def test_every_cell_is_either_run_or_explained():
    assert set(EXPECTED) == set(CELLS)
    assert all((s, f) in NA or (s, f) in EXPECTED for s in STEPS for f in FAULTS)


@pytest.mark.parametrize("step,fault", CELLS, ids=[f"{s}-{f}" for s, f in CELLS])
def test_fault_stops_at_its_step_with_one_line(matrix, step, fault):
    o = matrix[(step, fault)]
    code, words, ledger = EXPECTED[(step, fault)]
    assert not [p for p in o.problems if not p.startswith("rerun")], o.problems
    assert o.stopped == step
    assert o.exit_code == code
    assert o.ledger == ledger
    if fault != "killed":
        assert o.json_error and "\n" not in o.json_error
        assert o.message == f"error: {o.deveui_or_port}: {step}: {o.json_error}"
        assert all(w in o.json_error for w in words), o.json_error
        if ledger != "no row":
            assert o.ledger_error == o.json_error


@pytest.mark.parametrize("step,fault", CELLS, ids=[f"{s}-{f}" for s, f in CELLS])
def test_rerun_completes_and_module_matches_header(matrix, step, fault):
    o = matrix[(step, fault)]
    assert o.rerun_exit == 0, o.problems
    assert o.rerun_status == "provisioned"
    assert o.rerun_ledger == "provisioned/None"
    assert o.consistent is True
    assert o.rerun_attempts == (1 if o.ledger == "no row" else 2)


@pytest.mark.parametrize("step,fault", [c for c in CELLS if c[0] == "message"], ids=lambda c: str(c))
def test_rerun_after_a_message_failure_does_not_register_again(matrix, step, fault):
    o = matrix[(step, fault)]
    assert o.registrations_before_rerun >= 1
    assert o.registrations_after_rerun == o.registrations_before_rerun


@pytest.mark.parametrize("step,fault", CELLS, ids=[f"{s}-{f}" for s, f in CELLS])
def test_header_carries_the_registered_device_key_after_the_rerun(matrix, step, fault):
    assert matrix[(step, fault)].header_device_key_ok is True


def _short(text: str | None, n: int) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= n else text[: n - 1] + "…"


def render_table(matrix: dict) -> str:
    lines = ["", "Fault matrix: `flasher provision` (CLI, subprocess) per step x fault; rerun after the fault is gone",
             f"{'step':<9} {'fault':<16} {'stopped':<9} {'exit':>4}  {'ledger after fault':<21} {'rerun':<24} message",
             "-" * 150]
    for s in STEPS:
        for f in FAULTS:
            if (s, f) in NA:
                lines.append(f"{s:<9} {f:<16} {'n/a':<9} {'':>4}  {'':<21} {'':<24} ({_short(NA[(s, f)], 80)})")
                continue
            o = matrix[(s, f)]
            rerun = f"exit {o.rerun_exit} {o.rerun_status or '?'} ({o.rerun_attempts} att.)"
            msg = "SIGKILL while in step" if f == "killed" else _short(o.json_error, 80)
            lines.append(f"{s:<9} {f:<16} {o.stopped or '?':<9} {o.exit_code!s:>4}  {o.ledger:<21} {rerun:<24} {msg}")
    grid = [f"{'':<9} " + " ".join(f"{f:<15}" for f in FAULTS)]
    for s in STEPS:
        row = []
        for f in FAULTS:
            if (s, f) in NA:
                row.append("n/a")
            else:
                o = matrix[(s, f)]
                ok = o.rerun_exit == 0 and o.stopped == s
                row.append(f"{o.exit_code} {'→ rerun ok' if ok else '→ PROBLEM'}")
        grid.append(f"{s:<9} " + " ".join(f"{c:<15}" for c in row))
    return "\n".join(lines + ["", *grid, ""])


def test_print_the_matrix(matrix, capsys):
    table = render_table(matrix)
    assert table.count("\n") > len(STEPS) * len(FAULTS)
    with capsys.disabled():
        print(table)
