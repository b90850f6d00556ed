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
    """A minimal RHF76 on one pty: a dict of values and a chain of ifs. ``lie`` fields are echoed, not kept.

    The style knobs are the variations REFERENCE.md allows a real (or another independent) module:
    ``sep`` after the id name (``", "`` or ``","``), ``upper_hex``/``plain_hex`` for EUIs, ``key_echo``
    (``"spaced"`` as 2.0.10, ``"plain"``, ``"comma"``), ``eol`` (``"\\r\\n"`` or ``"\\n"``), ``trailing``
    blanks after every line, ``info`` (``+INFO: Input timeout`` before every answer), ``echo`` of the
    command, ``boot_noise`` before the first answer, ``double_ok`` (the ping answered twice), ``latency``
    seconds before every answer, ``dribble`` (answers written a few bytes at a time), ``lower_names``
    (``+id:`` instead of ``+ID:``), ``upper_fields`` (``DEVEUI`` instead of ``DevEui``) and ``lower_values``
    (``+MODE: lwotaa``, ``+DR: eu868 ...``). ``id_deveuis`` plays a bad line: successive ``AT+ID`` queries
    report these DevEUIs in turn, the last one repeating.
    """

    def __init__(self, deveui="47:86:c5:8b:00:11:22:33", lie: set[str] = frozenset(), mangle_key_echo=False, *,
                 version="2.0.10", sep=", ", upper_hex=False, plain_hex=False, key_echo="spaced", eol="\r\n",
                 trailing="", info=False, echo=False, boot_noise=False, double_ok=False, latency=0.0,
                 dribble=False, lower_names=False, upper_fields=False, lower_values=False, id_deveuis=()):
        self.values = {"deveui": deveui, "appeui": "80:00:00:00:00:00:00:06", "devaddr": "00:11:22:33",
                       "mode": "LWABP", "band": "EU868", "dr": "0", "appkey": ""}
        self.lie = set(lie)
        self.mangle_key_echo = mangle_key_echo
        self.version, self.sep, self.upper_hex, self.plain_hex = version, sep, upper_hex, plain_hex
        self.key_echo, self.eol, self.trailing, self.info, self.echo = key_echo, eol, trailing, info, echo
        self.boot_noise, self.double_ok, self.latency, self.dribble = boot_noise, double_ok, latency, dribble
        self.lower_names, self.upper_fields, self.lower_values = lower_names, upper_fields, lower_values
        self.id_deveuis = list(id_deveuis)
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
                if not text:
                    continue
                self.received.append(text)
                out = []
                if self.echo:
                    out.append(raw.rstrip(b"\r") + b"\r\n")
                if self.boot_noise:
                    self.boot_noise = False
                    out.append(b"\x00\xfe\r\nRHF76-052 boot\r\n\x01\x02")
                if self.info:
                    out.append(b"+INFO: Input timeout" + self.eol.encode())
                for line in self._answer(text):
                    if self.upper_fields and line.startswith("+ID: "):
                        line = "+ID: " + line[5:].upper()
                    if self.lower_values and line.startswith(("+MODE: ", "+DR: ")):
                        name, rest = line.split(":", 1)
                        line = name + ":" + rest.lower()
                    if self.lower_names and line.startswith("+"):
                        name, rest = line.split(":", 1)
                        line = name.lower() + ":" + rest
                    out.append((line + self.trailing + self.eol).encode())
                if self.latency and select.select([self._stop_r], [], [], self.latency)[0]:
                    return
                data = b"".join(out)
                step = 3 if self.dribble else len(data)
                for i in range(0, len(data), step):
                    os.write(self.master, data[i:i + step])

    def _eui(self, value: str) -> str:
        digits = value.replace(":", "")
        digits = digits.upper() if self.upper_hex else digits.lower()
        return digits if self.plain_hex else ":".join(digits[i:i + 2] for i in range(0, len(digits), 2))

    def _answer(self, text: str) -> list[str]:
        v = self.values
        up = text.upper()
        if up == "AT":
            return ["+AT: OK", "+AT: OK"] if self.double_ok else ["+AT: OK"]
        if up in ("AT+VER", "AT+VER?"):
            return [f"+VER: {self.version}"]
        if up in ("AT+ID", "AT+ID?"):
            ids = dict(v, deveui=self.id_deveuis.pop(0) if len(self.id_deveuis) > 1 else
                       (self.id_deveuis or [v["deveui"]])[0])
            return [f"+ID: {name}{self.sep}{self._eui(ids[name.lower()])}" for name in ("DevAddr", "DevEui", "AppEui")]
        if up in ("AT+ID=APPEUI", "AT+ID=DEVEUI", "AT+ID=DEVADDR"):
            name = {"APPEUI": "AppEui", "DEVEUI": "DevEui", "DEVADDR": "DevAddr"}[up.split("=", 1)[1]]
            return [f"+ID: {name}{self.sep}{self._eui(v[name.lower()])}"]
        if up.startswith("AT+ID=APPEUI,"):
            new = text.split(",", 1)[1].strip().strip('"').lower()
            if len(new) != 16:
                return ["+ID: ERROR(-1)"]
            spaced = ":".join(new[i:i + 2] for i in range(0, 16, 2))
            if "appeui" not in self.lie:
                v["appeui"] = spaced
            return [f"+ID: AppEui{self.sep}{self._eui(new)}"]
        if up.startswith("AT+KEY=APPKEY,"):
            key = text.split(",", 1)[1].strip().strip('"').upper()
            if len(key) != 32:
                return ["+KEY: ERROR(-1)"]
            v["appkey"] = key
            shown = ("00" + key[2:]) if self.mangle_key_echo else key
            if self.key_echo == "plain":
                return ["+KEY: APPKEY " + shown]
            if self.key_echo == "comma":
                return ["+KEY: APPKEY, " + shown.lower()]
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
