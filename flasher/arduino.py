"""Build and upload the firmware sketch through arduino-cli.

arduino-cli does the 1200-baud touch, waits for the bootloader and runs the
core's own bossac. What this adapter adds: the generated header dropped into a
private copy of the sketch, a refusal to run a bossac that would erase the
SAMD21 bootloader (BOSSA >= 1.8 without --offset, shumatech/BOSSA#79), and
following the board through re-enumeration by its USB serial number.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from flasher.errors import FlasherError, InputError
from flasher.files import shipped

log = logging.getLogger("flasher.arduino")

DEFAULT_FQBN = "Seeeduino:samd:rolawan"
DEFAULT_SKETCH = "flasher_otaa"


class ArduinoError(FlasherError):
    pass


def default_sketch() -> Path:
    return Path(str(shipped("firmware") / DEFAULT_SKETCH))


def find_arduino_cli(executable: str | None = None) -> str:
    name = executable or "arduino-cli"
    path = shutil.which(name)
    if path is None:
        raise ArduinoError(f"arduino-cli {name!r}: not found on PATH (install it from arduino.github.io/arduino-cli, "
                           f"or pass --arduino-cli PATH; --upload needs it)")
    return path


def bossac_problem(properties: str) -> str | None:
    """Why this build's upload would erase the bootloader, or None if it is safe."""
    props = dict(line.split("=", 1) for line in properties.splitlines() if "=" in line)
    tool = props.get("upload.tool", props.get("upload.tool.default", ""))
    if "bossac" not in tool:
        return None
    where = " ".join(v for k, v in props.items() if "bossac" in k and k.endswith((".path", ".cmd.path", ".cmd")))
    m = re.search(r"bossac[/\\-]?(\d+)\.(\d+)", where)
    pattern = " ".join(v for k, v in props.items() if k.startswith("tools.bossac") and "pattern" in k)
    if m and (int(m.group(1)), int(m.group(2))) >= (1, 8) and "--offset" not in pattern:
        return (f"bossac {m.group(1)}.{m.group(2)} writes from offset 0 without --offset=0x2000 "
                f"and would erase the SAMD21 bootloader")
    return None


class ArduinoCli:
    def __init__(self, executable: str | None = None, fqbn: str = DEFAULT_FQBN, timeout: float = 300.0):
        self.executable = find_arduino_cli(executable)
        self.fqbn = fqbn
        self.timeout = timeout

    def _run(self, *args: str) -> str:
        cmd = [self.executable, *args]
        log.debug("running %s", " ".join(cmd))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise ArduinoError(f"arduino-cli {args[0]}: no result after {self.timeout:.0f} s") from None
        if proc.returncode != 0:
            last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
            raise ArduinoError(f"arduino-cli {args[0]} failed (exit {proc.returncode}): {last}")
        return proc.stdout

    def build_and_upload(self, sketch: str | Path, header: str | Path, port: str) -> None:
        sketch = Path(sketch)
        ino = sketch / f"{sketch.name}.ino"
        if not ino.is_file():
            raise InputError(f"sketch {str(sketch)!r}: no {sketch.name}.ino in it")
        with tempfile.TemporaryDirectory(prefix="flasher-build-") as tmp:
            work = Path(tmp) / sketch.name
            shutil.copytree(sketch, work)
            shutil.copyfile(header, work / "config.h")
            (work / "config.h").chmod(0o600)
            problem = bossac_problem(self._run("compile", "--fqbn", self.fqbn, "--show-properties", str(work)))
            if problem:
                raise ArduinoError(f"refusing to upload to {port}: {problem}")
            build = Path(tmp) / "build"
            self._run("compile", "--fqbn", self.fqbn, "--output-dir", str(build), str(work))
            self._run("upload", "--fqbn", self.fqbn, "-p", port, "--input-dir", str(build), str(work))


def wait_for_serial_number(serial_number: str, timeout: float = 20.0, bootloader: bool = False) -> str:
    """After an upload the tty may change name: find the board again by its USB serial number."""
    from flasher.ports import find_boards

    deadline = time.monotonic() + timeout
    while True:
        for board in find_boards():
            if board.serial_number == serial_number and bool(getattr(board, "bootloader", False)) == bootloader:
                return board.device
        if time.monotonic() >= deadline:
            raise ArduinoError(f"board with serial number {serial_number!r} did not come back within {timeout:.0f} s")
        time.sleep(0.25)  # USB enumeration has no event to wait on portably
