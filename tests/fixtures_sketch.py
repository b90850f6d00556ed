"""Run the real flasher_otaa sketch on the host, with a simulated board's module as its Serial1.

``host_sketch(sim, i, header_text)`` builds firmware/flasher_otaa (the shipped .ino and otaa_node.h,
unchanged) with host g++ against tests/hostduino -- a stand-in for the Arduino core and for Seeed's
LoRaWan.h, nothing else -- and starts it with board ``i``'s pty as the module. What the host sees on the
board's USB port is the :class:`HostBoard`'s ``usb`` pty. Every process started is stopped at teardown,
by its pid.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import serial

from flasher.arduino import default_sketch
from flasher.eui import EUI64
from flasher.header import build_header_data, render_header

HOSTDUINO = Path(__file__).parent / "hostduino"
APP_KEY = bytes.fromhex("2B7E151628AED2A6ABF7158809CF4F3C")
JOIN_EUI = "70B3D57ED003F06A"


def otaa_header(deveui: str, band: str = "EU868") -> str:
    return render_header(build_header_data(EUI64.parse(deveui), app_key=APP_KEY, app_key_source="given",
                                           join_eui=JOIN_EUI, band=band, id_scope="0ne00000001"), "seeed-lorawan")


def build_host_sketch(header: str, workdir: Path, sketch: Path | None = None) -> Path:
    """The sketch folder with ``header`` as its config.h, compiled for the host; cached by content."""
    sketch = sketch or default_sketch()
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.fail("the host build of the sketch needs g++ (apt-get install g++)")
    sources = sorted(sketch.iterdir()) + sorted(HOSTDUINO.iterdir())
    digest = hashlib.sha256(header.encode() + b"".join(p.read_bytes() for p in sources if p.is_file())).hexdigest()[:16]
    out = workdir / f"{sketch.name}-{digest}"
    binary = out / "sketch"
    if binary.exists():
        return binary
    src = out / sketch.name
    shutil.copytree(sketch, src, dirs_exist_ok=True)
    (src / "config.h").write_text(header)
    cmd = [gxx, "-std=gnu++14", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{HOSTDUINO}", f"-I{src}",
           "-include", "Arduino.h", "-x", "c++", str(src / f"{sketch.name}.ino"), "-x", "none",
           str(HOSTDUINO / "hostduino.cpp"), "-o", str(binary)]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, f"{' '.join(cmd)}\n{built.stderr}"
    return binary


class HostBoard:
    """A host-built sketch running against one simulated module; ``usb`` is what the host opens."""

    def __init__(self, binary: Path, module_port: str, idle_ms: int):
        env = dict(os.environ, HOSTDUINO_IDLE_MS=str(idle_ms))
        self.proc = subprocess.Popen([str(binary), module_port], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, start_new_session=True)
        first = self.proc.stdout.readline() if self.proc.stdout else ""
        assert first.startswith("USB "), f"sketch did not start: {first!r} {self.stop()}"
        self.usb = first.split(None, 1)[1].strip()
        self.seen = ""  # everything read from USB so far

    def read_until(self, pattern: str, timeout: float = 15.0, *, send: bytes = b"") -> re.Match:
        """Read the USB port until ``pattern`` (a regex) matches what was read since the call began.

        Opening the port flushes what the sketch said before; ``send`` is written once it is open."""
        start = len(self.seen)
        deadline = time.monotonic() + timeout
        with serial.Serial(self.usb, timeout=0.05, exclusive=True) as port:
            port.write(send)
            while True:
                self.seen += port.read(4096).decode("ascii", "replace")
                m = re.search(pattern, self.seen[start:], re.DOTALL)
                if m:
                    return m
                assert self.proc.poll() is None, f"sketch exited {self.proc.returncode}: {self.stop()}"
                assert time.monotonic() < deadline, f"no {pattern!r} within {timeout} s; USB said:\n{self.seen[start:]}"

    def stop(self) -> str:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        err = self.proc.stderr.read() if self.proc.stderr else ""
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()
        return err


@pytest.fixture
def host_sketch(tmp_path_factory):
    started: list[HostBoard] = []
    workdir = tmp_path_factory.getbasetemp() / "host-sketches"
    workdir.mkdir(exist_ok=True)

    def start(sim, i: int = 0, header: str | None = None, *, idle_ms: int = 10) -> HostBoard:
        binary = build_host_sketch(header if header is not None else otaa_header(sim.boards[i].deveui), workdir)
        board = HostBoard(binary, sim.ports[i], idle_ms)
        started.append(board)
        return board

    try:
        yield start
    finally:
        for board in started:
            board.stop()
