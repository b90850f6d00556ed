"""Fixtures for simulated boards (see flasher.sim.board), and an independent RHF76 responder.

``sim_boards(count=..., **kwargs)`` starts a :class:`BoardSimulator` in ``tmp_path``
and stops it (every pty and thread) at teardown, whatever happened.

``MiniModule`` is a second, deliberately separate implementation of the module's
dialect -- written from REFERENCE.md, sharing no code with flasher/sim/board.py,
answering in firmware 2.0.10's style (space-separated key echo, lower-case hex)
-- so the client is not only tested against the simulator its authors wrote.
"""

from __future__ import annotations

import os
import select
import threading
import tty

import pytest

from flasher.sim.board import BoardSimulator, Faults


@pytest.fixture
def sim_boards(tmp_path):
    started: list[BoardSimulator] = []

    def start(count: int = 1, *, state_dir=None, seed: int = 1, faults: Faults | None = None, **kwargs):
        sim = BoardSimulator(count=count, state_dir=state_dir or tmp_path / "boards", seed=seed, faults=faults,
                             **kwargs)
        started.append(sim)
        return sim.start()

    try:
        yield start
    finally:
        for sim in started:
            sim.close()


@pytest.fixture
def sim_env(monkeypatch):
    """Point discovery at a simulator's ports.json."""

    def use(sim: BoardSimulator) -> None:
        monkeypatch.setenv("FLASHER_SIMULATED_PORTS", str(sim.ports_file))

    return use


class MiniModule:
    """A minimal RHF76 on one pty: a dict of values and a chain of ifs. ``lie`` fields are echoed, not kept."""

    def __init__(self, deveui="47:86:c5:8b:00:11:22:33", lie: set[str] = frozenset(), mangle_key_echo=False):
        self.values = {"deveui": deveui, "appeui": "80:00:00:00:00:00:00:06", "devaddr": "00:11:22:33",
                       "mode": "LWABP", "band": "EU868", "dr": "0", "appkey": ""}
        self.lie = set(lie)
        self.mangle_key_echo = mangle_key_echo
        self.received: list[str] = []
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        os.write(self._stop_w, b"!")
        self._thread.join(5)
        for fd in (self.master, self.slave, self._stop_r, self._stop_w):
            os.close(fd)

    def _serve(self):
        pending = b""
        while True:
            ready, _, _ = select.select([self.master, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            pending += os.read(self.master, 1024)
            while b"\n" in pending:
                raw, pending = pending.split(b"\n", 1)
                text = raw.decode("latin-1").strip()
                if text:
                    self.received.append(text)
                    for out in self._answer(text):
                        os.write(self.master, out.encode() + b"\r\n")

    def _answer(self, text: str) -> list[str]:
        v = self.values
        up = text.upper()
        if up == "AT":
            return ["+AT: OK"]
        if up in ("AT+VER", "AT+VER?"):
            return ["+VER: 2.0.10"]
        if up in ("AT+ID", "AT+ID?"):
            return [f"+ID: DevAddr, {v['devaddr']}", f"+ID: DevEui, {v['deveui']}", f"+ID: AppEui, {v['appeui']}"]
        if up == "AT+ID=APPEUI":
            return [f"+ID: AppEui, {v['appeui']}"]
        if up.startswith("AT+ID=APPEUI,"):
            new = text.split(",", 1)[1].strip().strip('"').lower()
            if len(new) != 16:
                return ["+ID: ERROR(-1)"]
            spaced = ":".join(new[i:i + 2] for i in range(0, 16, 2))
            if "appeui" not in self.lie:
                v["appeui"] = spaced
            return [f"+ID: AppEui, {spaced}"]
        if up.startswith("AT+KEY=APPKEY,"):
            key = text.split(",", 1)[1].strip().strip('"').upper()
            if len(key) != 32:
                return ["+KEY: ERROR(-1)"]
            v["appkey"] = key
            shown = ("00" + key[2:]) if self.mangle_key_echo else key
            return ["+KEY: APPKEY " + " ".join(shown[i:i + 2] for i in range(0, 32, 2))]
        if up in ("AT+MODE", "AT+MODE?"):
            return [f"+MODE: {v['mode']}"]
        if up.startswith("AT+MODE="):
            mode = up.split("=", 1)[1]
            if "mode" not in self.lie:
                v["mode"] = mode
            return [f"+MODE: {mode}"]
        if up in ("AT+DR", "AT+DR?"):
            return [f"+DR: DR{v['dr']}", f"+DR: {v['band']} DR{v['dr']}  SF12 BW125K "]
        if up.startswith("AT+DR="):
            arg = up.split("=", 1)[1]
            if arg.startswith("DR"):
                v["dr"] = arg[2:]
                return [f"+DR: {arg}"]
            if "band" not in self.lie:
                v["band"] = arg
            return [f"+DR: {arg}"]
        return ["+AT: ERROR(-10)"]


@pytest.fixture
def mini_module():
    """Factory: ``with``-less; every MiniModule started is stopped at teardown."""
    started: list[MiniModule] = []

    def start(**kwargs) -> MiniModule:
        m = MiniModule(**kwargs).__enter__()
        started.append(m)
        return m

    try:
        yield start
    finally:
        for m in started:
            m.__exit__(None, None, None)
