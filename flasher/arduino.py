"""Build and upload the firmware sketch through arduino-cli.

arduino-cli does the 1200-baud touch, waits for the bootloader and runs the
core's own bossac. What this adapter adds: the generated header dropped into a
private copy of the sketch, a refusal to run a bossac that would erase the
SAMD21 bootloader (BOSSA >= 1.8 without --offset, shumatech/BOSSA#79), and
following the board through re-enumeration by its USB serial number.

The copy holds the board's keys (config.h), so it lives in a private folder
(0700) under a parent the caller chooses, ``<parent>/.flasher-build/<pid>-<random>/``
(by default beside the header), and is removed on every way out: success, an
error, Ctrl-C, or a SIGTERM the caller turns into an exception. A run killed
outright (SIGKILL) leaves it behind; :func:`clean_stale_builds`, called at the
start of every build, removes the folders of runs whose process is gone, and
stops any builder they orphaned. arduino-cli runs in its own process group with
a scrubbed environment (:func:`flasher.childenv.child_env`); when we are
interrupted its whole group is terminated, then killed after a grace period.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from flasher.childenv import child_env
from flasher.errors import FlasherError, InputError
from flasher.files import make_private_dirs, shipped

log = logging.getLogger("flasher.arduino")

DEFAULT_FQBN = "Seeeduino:samd:rolawan"
DEFAULT_SKETCH = "flasher_otaa"
BUILD_FOLDER = ".flasher-build"
BUILDERS_FILE = ".builders"  # in a build folder: the pid of each arduino-cli started for it
_BUILD_NAME = re.compile(r"(\d+)-[A-Za-z0-9_-]+")


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


# --- build folders ------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _session_of(proc_entry: Path) -> tuple[int, int]:
    """``(process group, session)`` of a /proc/<pid> entry."""
    fields = (proc_entry / "stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[2]), int(fields[3])


def _kill_orphans_of(folder: Path) -> None:
    """SIGKILL what a killed flasher left building in ``folder`` (Linux, through /proc).

    Every arduino-cli flasher starts leads a session of its own, and its pid is noted in
    the folder (``.builders``). A session is stopped only if its id is one of those pids
    *and* one of its processes names the folder on its command line, so a pid reused
    since by an unrelated session is left alone. Our own process group never qualifies.
    """
    try:
        recorded = {int(x) for x in (folder / BUILDERS_FILE).read_text().split()}
    except (FileNotFoundError, ValueError):
        return
    proc = Path("/proc")
    if not recorded or not proc.is_dir():
        return
    needle = os.fsencode(str(folder))
    groups: dict[int, set[int]] = {}
    named: set[int] = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            pgrp, sid = _session_of(entry)
            if sid not in recorded:
                continue
            groups.setdefault(sid, set()).add(pgrp)
            if needle in (entry / "cmdline").read_bytes():
                named.add(sid)
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
    for sid in sorted(named):
        for pgrp in sorted(groups[sid] - {os.getpgrp()}):
            log.warning("stopping process group %s left running on stale build folder %s", pgrp, folder)
            _signal_group(pgrp, signal.SIGKILL)


def _remove_tree(path: Path) -> None:
    def report(_func, p, exc_info):
        log.warning("could not remove %s: %s", p, exc_info[1])

    shutil.rmtree(path, onerror=report)


def clean_stale_builds(parent: str | os.PathLike) -> list[Path]:
    """Remove the build folders under ``<parent>/.flasher-build`` whose owning process is gone.

    A folder is named ``<pid>-<random>``; it is stale when no process has that pid
    (a run killed with SIGKILL, or a power cut). Folders of live processes, and
    anything not named like a build folder, are left alone. Returns what was removed.
    """
    root = Path(parent) / BUILD_FOLDER
    removed: list[Path] = []
    try:
        entries = list(root.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        m = _BUILD_NAME.fullmatch(entry.name)
        if not m or entry.is_symlink() or not entry.is_dir() or _pid_alive(int(m.group(1))):
            continue
        _kill_orphans_of(entry)
        _remove_tree(entry)
        log.info("removed stale build folder %s", entry)
        removed.append(entry)
    return removed


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # nobody left in the group
        return False
    return True


def _new_build_folder(parent: Path) -> Path:
    root = make_private_dirs(parent / BUILD_FOLDER)
    folder = root / f"{os.getpid()}-{secrets.token_hex(6)}"
    os.mkdir(folder, 0o700)
    os.chmod(folder, 0o700)  # whatever the umask
    return folder


def _drop_build_folder(folder: Path) -> None:
    _remove_tree(folder)
    try:
        folder.parent.rmdir()  # .flasher-build itself, once no build is left in it
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
            log.warning("could not remove %s: %s", folder.parent, exc)


# --- arduino-cli ---------------------------------------------------------------------

class ArduinoCli:
    def __init__(self, executable: str | None = None, fqbn: str = DEFAULT_FQBN, timeout: float = 300.0,
                 *, grace: float = 5.0):
        self.executable = find_arduino_cli(executable)
        self.fqbn = fqbn
        self.timeout = timeout
        self.grace = grace

    def _stop(self, proc: subprocess.Popen) -> None:
        """Terminate arduino-cli's whole process group, then kill it after the grace period."""
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(self.grace)
        except subprocess.TimeoutExpired:
            log.warning("arduino-cli did not stop within %.0f s of SIGTERM: killing it", self.grace)
        _signal_group(proc.pid, signal.SIGKILL)  # the leader if it is still there, and whatever it started
        proc.wait()

    def _run(self, *args: str, cancel: threading.Event | None = None, folder: Path | None = None) -> str:
        cmd = [self.executable, *args]
        log.debug("running %s", " ".join(cmd))
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=child_env(), start_new_session=True)
        deadline = time.monotonic() + self.timeout
        try:
            if folder is not None:  # so that a later run can stop it if we are killed outright
                with open(folder / BUILDERS_FILE, "a") as f:
                    f.write(f"{proc.pid}\n")
            while True:
                try:
                    out, err = proc.communicate(timeout=max(0.0, min(0.25, deadline - time.monotonic())))
                    break
                except subprocess.TimeoutExpired:
                    if cancel is not None and cancel.is_set():
                        raise ArduinoError(f"arduino-cli {args[0]}: interrupted") from None
                    if time.monotonic() >= deadline:
                        raise ArduinoError(f"arduino-cli {args[0]}: no result after {self.timeout:.0f} s") from None
        except BaseException:
            self._stop(proc)
            raise
        if proc.returncode != 0:
            last = (err.strip() or out.strip() or "no output").splitlines()[-1]
            raise ArduinoError(f"arduino-cli {args[0]} failed (exit {proc.returncode}): {last}")
        return out

    def build_and_upload(self, sketch: str | Path, header: str | Path, port: str, *,
                         build_parent: str | os.PathLike | None = None, cancel: threading.Event | None = None) -> None:
        """Copy ``sketch`` with ``header`` as its config.h into a private build folder under
        ``build_parent`` (default: the header's folder), build it, check the uploader, upload
        it to ``port``; the folder is removed whatever happens. ``cancel`` set stops arduino-cli."""
        sketch = Path(sketch)
        ino = sketch / f"{sketch.name}.ino"
        if not ino.is_file():
            raise InputError(f"sketch {str(sketch)!r}: no {sketch.name}.ino in it")
        parent = Path(build_parent) if build_parent is not None else Path(header).resolve().parent
        clean_stale_builds(parent)
        try:
            folder = _new_build_folder(parent)
        except OSError as exc:
            raise ArduinoError(f"build folder under {str(parent)!r}: cannot create "
                               f"({exc.strerror or exc.__class__.__name__})") from None
        try:
            work = folder / sketch.name
            shutil.copytree(sketch, work)
            shutil.copyfile(header, work / "config.h")
            (work / "config.h").chmod(0o600)
            problem = bossac_problem(self._run("compile", "--fqbn", self.fqbn, "--show-properties", str(work),
                                               cancel=cancel, folder=folder))
            if problem:
                raise ArduinoError(f"refusing to upload to {port}: {problem}")
            build = folder / "build"
            self._run("compile", "--fqbn", self.fqbn, "--output-dir", str(build), str(work), cancel=cancel,
                      folder=folder)
            self._run("upload", "--fqbn", self.fqbn, "-p", port, "--input-dir", str(build), str(work), cancel=cancel,
                      folder=folder)
        finally:
            _drop_build_folder(folder)


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
