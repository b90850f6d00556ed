"""Build and upload the firmware sketch: through arduino-cli, or offline with Debian's arduino-builder.

arduino-cli does the 1200-baud touch, waits for the bootloader and runs the core's own bossac.
:class:`ArduinoBuilder` builds the same sketch with arduino-builder and the Seeed SAMD core (a folder laid
out like ``shared/arduino-samd``: ``hardware/Seeeduino/samd``, ``tools/CMSIS-5.7.0``, ``tools/CMSIS-Atmel``),
then does what arduino-cli does itself: the touch, the bootloader found by its USB location (its descriptor
has no serial number), and the core's own upload recipe (``tools.<upload.tool>.upload.pattern``) with the
bossac you give it. What this adapter adds either way: the generated header dropped into a private copy of
the sketch, and a refusal to run a bossac that would erase the SAMD21 bootloader (BOSSA >= 1.8 without
``--offset``, shumatech/BOSSA#79), judged on the tool the selected board actually uses.

The copy holds the board's keys (config.h), so it lives in a private folder
(0700) under a parent the caller chooses, ``<parent>/.flasher-build/<pid>-<random>/``
(by default beside the header), and is removed on every way out: success, an
error, Ctrl-C, or a SIGTERM the caller turns into an exception. A run killed
outright (SIGKILL) leaves it behind; :func:`clean_stale_builds`, called at the
start of every build, removes the folders of runs whose process is gone, and
stops any builder they orphaned. Every tool runs in its own process group with
a scrubbed environment (:func:`flasher.childenv.child_env`); when we are
interrupted its whole group is terminated, then killed after a grace period.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shlex
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
FLASH_MAX = 262144  # Seeed's boards.txt, rolawan.upload.maximum_size
BUILD_CACHE_ENV = "FLASHER_BUILD_CACHE"  # arduino-builder: a folder to keep the compiled core (core.a) in
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
                           f"or pass --arduino-cli PATH; --upload needs it, or --builder arduino-builder)")
    return path


def make_builder(builder: str = "arduino-cli", *, fqbn: str = DEFAULT_FQBN, arduino_cli: str | None = None,
                 samd_core: str | None = None, bossac: str | None = None) -> ArduinoCli | ArduinoBuilder:
    """The builder a ``--builder`` setting names, checked (tools found, core present) before any board."""
    if builder == "arduino-builder":
        return ArduinoBuilder(samd_core, fqbn, bossac=bossac, cache=os.environ.get(BUILD_CACHE_ENV) or None)
    return ArduinoCli(arduino_cli, fqbn)


def parse_properties(text: str) -> dict[str, str]:
    """``key=value`` lines (arduino-cli ``--show-properties``, arduino-builder ``-dump-prefs``, platform.txt)."""
    props: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def expand(value: str, props: dict[str, str], extra: dict[str, str] | None = None) -> str:
    """Replace ``{key}`` by its property (``extra`` first), repeatedly; unknown keys stay as they are."""
    table = {**props, **(extra or {})}
    for _ in range(10):
        new = re.sub(r"\{([A-Za-z0-9_.\-]+)\}", lambda m: table.get(m.group(1), m.group(0)), value)
        if new == value:
            break
        value = new
    return value


def upload_tool(props: dict[str, str]) -> str | None:
    """The tool the board uploads with (``upload.tool``; newer cores say ``upload.tool.default``)."""
    return props.get("upload.tool") or props.get("upload.tool.serial") or props.get("upload.tool.default")


def _version_tuple(version: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def tool_version(props: dict[str, str], tool: str) -> str | None:
    """The version of ``tool`` these properties point at: the ``runtime.tools.<name>-<version>.path`` its
    ``path`` names, or a ``bossac/<version>`` folder in the expanded path."""
    raw = props.get(f"tools.{tool}.path") or f"{{runtime.tools.{tool}.path}}"
    m = re.search(r"runtime\.tools\.[A-Za-z]+-(\d+\.\d+[^}]*)\.path", raw)
    if m:
        return m.group(1)
    m = re.search(r"bossac[/\\-](\d+\.\d+[\w.\-]*)", expand(raw, props))
    return m.group(1) if m else None


def bossac_problem(properties: str | dict[str, str], version: str | None = None) -> str | None:
    """Why the selected board's upload would erase the SAMD21 bootloader, or None if it would not.

    Judged on the tool the board uses (``upload.tool`` -> ``tools.<tool>.cmd/path/upload.pattern``), not on
    any bossac the platform mentions. ``version`` is the bossac that will actually run (its ``--help``),
    else the one the properties point at. BOSSA >= 1.8 writes from offset 0 unless its pattern gives a
    non-zero ``--offset``. A version that cannot be told is not refused (the core's own tool is 1.7).
    """
    props = parse_properties(properties) if isinstance(properties, str) else properties
    tool = upload_tool(props)
    if not tool or "bossac" not in (props.get(f"tools.{tool}.cmd") or tool).lower():
        return None
    version = version or tool_version(props, tool)
    v = _version_tuple(version) if version else None
    if v is None:
        log.info("upload tool %s: bossac version unknown; not judged", tool)
        return None
    if v < (1, 8):
        return None
    pattern = expand(props.get(f"tools.{tool}.upload.pattern", ""), props)
    offset = re.search(r"--offset[= ]\"?([^\s\"]*)", pattern)
    try:
        if offset and int(offset.group(1), 0) != 0:
            return None
    except ValueError:  # "--offset={upload.offset}" with nothing to put there
        pass
    return (f"upload tool {tool!r} is bossac {version}, and its upload pattern has no --offset=0x2000: it would "
            f"write from offset 0 and erase the SAMD21 bootloader (use the core's bossac 1.7.0-arduino3)")


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


# --- running tools --------------------------------------------------------------------

def _stop(proc: subprocess.Popen, grace: float, label: str) -> None:
    """Terminate a tool's whole process group, then kill it after the grace period."""
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop within %.0f s of SIGTERM: killing it", label, grace)
    _signal_group(proc.pid, signal.SIGKILL)  # the leader if it is still there, and whatever it started
    proc.wait()


def run_tool(cmd: list[str], label: str, *, timeout: float, grace: float = 5.0,
             cancel: threading.Event | None = None, folder: Path | None = None) -> str:
    """Run ``cmd`` in its own session with a scrubbed environment; its stdout, or :class:`ArduinoError`
    naming ``label`` ("arduino-cli compile") and its last line of output. ``cancel`` set stops it."""
    log.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=child_env(), start_new_session=True)
    except OSError as exc:
        raise ArduinoError(f"{label}: cannot run {cmd[0]!r} ({exc.strerror or exc})") from None
    deadline = time.monotonic() + timeout
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
                    raise ArduinoError(f"{label}: interrupted") from None
                if time.monotonic() >= deadline:
                    raise ArduinoError(f"{label}: no result after {timeout:.0f} s") from None
    except BaseException:
        _stop(proc, grace, label)
        raise
    if proc.returncode != 0:
        lines = (err.strip() or out.strip() or "no output").splitlines()
        # A compiler's first "error:" says more than the builder's closing "exit status 1".
        first_error = next((line.strip() for line in (err + "\n" + out).splitlines() if "error:" in line), None)
        raise ArduinoError(f"{label} failed (exit {proc.returncode}): {first_error or lines[-1]}")
    return out


class _PrivateBuild:
    """``with _PrivateBuild(sketch, header, parent) as work:`` a copy of the sketch with ``header`` as its
    config.h (0600) in a new private folder under ``parent``, removed on every way out."""

    def __init__(self, sketch: str | Path, header: str | Path, parent: str | os.PathLike | None):
        self.sketch = Path(sketch)
        if not (self.sketch / f"{self.sketch.name}.ino").is_file():
            raise InputError(f"sketch {str(sketch)!r}: no {self.sketch.name}.ino in it")
        self.header = Path(header)
        self.parent = Path(parent) if parent is not None else self.header.resolve().parent

    def __enter__(self) -> Path:
        clean_stale_builds(self.parent)
        try:
            self.folder = _new_build_folder(self.parent)
        except OSError as exc:
            raise ArduinoError(f"build folder under {str(self.parent)!r}: cannot create "
                               f"({exc.strerror or exc.__class__.__name__})") from None
        try:
            work = self.folder / self.sketch.name
            shutil.copytree(self.sketch, work)
            shutil.copyfile(self.header, work / "config.h")
            (work / "config.h").chmod(0o600)
        except BaseException:
            _drop_build_folder(self.folder)
            raise
        return work

    def __exit__(self, *exc) -> None:
        _drop_build_folder(self.folder)


_SIZE = re.compile(r"Sketch uses (\d+) bytes")


def flash_size(output: str) -> int | None:
    """The program size the builder reported ("Sketch uses 55376 bytes (21%) of program storage space")."""
    m = _SIZE.search(output)
    return int(m.group(1)) if m else None


# --- arduino-cli ---------------------------------------------------------------------

class ArduinoCli:
    name = "arduino-cli"

    def __init__(self, executable: str | None = None, fqbn: str = DEFAULT_FQBN, timeout: float = 300.0,
                 *, grace: float = 5.0):
        self.executable = find_arduino_cli(executable)
        self.fqbn = fqbn
        self.timeout = timeout
        self.grace = grace

    def _run(self, *args: str, cancel: threading.Event | None = None, folder: Path | None = None) -> str:
        return run_tool([self.executable, *args], f"arduino-cli {args[0]}", timeout=self.timeout, grace=self.grace,
                        cancel=cancel, folder=folder)

    def build(self, sketch: str | Path, header: str | Path, *, output_dir: str | os.PathLike | None = None,
              build_parent: str | os.PathLike | None = None, cancel: threading.Event | None = None) -> int | None:
        """Build ``sketch`` with ``header``; copy the .bin/.hex/.elf to ``output_dir`` (0600) if given.
        Returns the program size arduino-cli reported."""
        with _PrivateBuild(sketch, header, build_parent) as work:
            build = work.parent / "build"
            out = self._run("compile", "--fqbn", self.fqbn, "--output-dir", str(build), str(work), cancel=cancel,
                            folder=work.parent)
            _copy_outputs(build, output_dir)
            return flash_size(out)

    def build_and_upload(self, sketch: str | Path, header: str | Path, port: str, *,
                         build_parent: str | os.PathLike | None = None, cancel: threading.Event | None = None,
                         location: str | None = None) -> None:
        """Copy ``sketch`` with ``header`` as its config.h into a private build folder under
        ``build_parent`` (default: the header's folder), build it, check the uploader, upload
        it to ``port``; the folder is removed whatever happens. ``cancel`` set stops arduino-cli.
        arduino-cli follows the board into its bootloader itself (``location`` is not needed)."""
        with _PrivateBuild(sketch, header, build_parent) as work:
            folder = work.parent
            problem = bossac_problem(self._run("compile", "--fqbn", self.fqbn, "--show-properties", str(work),
                                               cancel=cancel, folder=folder))
            if problem:
                raise ArduinoError(f"refusing to upload to {port}: {problem}")
            build = folder / "build"
            self._run("compile", "--fqbn", self.fqbn, "--output-dir", str(build), str(work), cancel=cancel,
                      folder=folder)
            self._run("upload", "--fqbn", self.fqbn, "-p", port, "--input-dir", str(build), str(work), cancel=cancel,
                      folder=folder)


def _copy_outputs(build: Path, output_dir: str | os.PathLike | None) -> None:
    """The built images (they hold the board's keys) into ``output_dir``, each 0600."""
    if output_dir is None:
        return
    out = make_private_dirs(Path(output_dir))
    for f in sorted(build.glob("*.ino.*")):
        if f.suffix in (".bin", ".hex", ".elf"):
            target = out / f.name
            shutil.copyfile(f, target)
            target.chmod(0o600)


# --- arduino-builder (offline) -------------------------------------------------------

SAMD_CORE_ENV = "FLASHER_ARDUINO_SAMD"
# Menu options arduino-builder needs spelled out (the first of each menu is the IDE's default).
_ROLAWAN_MENUS = "usbstack=arduino,debug=off"


def find_samd_core(given: str | os.PathLike | None, fqbn: str = DEFAULT_FQBN) -> Path:
    """The folder holding ``hardware/<vendor>/<arch>/platform.txt`` for ``fqbn`` (``--samd-core``,
    ``$FLASHER_ARDUINO_SAMD``), or :class:`InputError` saying what is missing."""
    where = given or os.environ.get(SAMD_CORE_ENV)
    if not where:
        raise InputError(f"--builder arduino-builder needs the Seeed SAMD core: pass --samd-core DIR or set "
                         f"${SAMD_CORE_ENV} (a folder with hardware/Seeeduino/samd, tools/CMSIS-5.7.0, tools/CMSIS-Atmel)")
    vendor, arch = (fqbn.split(":") + ["", ""])[:2]
    platform = Path(where) / "hardware" / vendor / arch / "platform.txt"
    if not platform.is_file():
        raise InputError(f"SAMD core {str(where)!r}: no hardware/{vendor}/{arch}/platform.txt in it")
    return Path(where)


def bossac_version(executable: str) -> str | None:
    """What ``bossac --help`` says it is ("... (BOSSA) Version 1.9.1"), or None."""
    try:
        done = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=10, env=child_env(),
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"Version (\d+\.\d+[\w.\-]*)", done.stdout + done.stderr)
    return m.group(1) if m else None


class ArduinoBuilder:
    """The offline path: Debian's arduino-builder with the Seeed SAMD core; the core's own upload recipe."""

    name = "arduino-builder"

    def __init__(self, samd_core: str | os.PathLike | None = None, fqbn: str = DEFAULT_FQBN, *,
                 bossac: str | None = None, executable: str | None = None, timeout: float = 300.0,
                 grace: float = 5.0, cache: str | os.PathLike | None = None):
        self.kit = find_samd_core(samd_core, fqbn)
        exe = shutil.which(executable or "arduino-builder")
        gcc = shutil.which("arm-none-eabi-gcc")
        if exe is None or gcc is None:
            raise ArduinoError("--builder arduino-builder needs arduino-builder and arm-none-eabi-gcc on PATH (Debian: "
                               "apt-get install arduino-builder gcc-arm-none-eabi libnewlib-arm-none-eabi "
                               "libstdc++-arm-none-eabi-newlib)")
        self.executable, self.gcc_root = exe, str(Path(gcc).resolve().parent.parent)
        self.fqbn = fqbn if fqbn.count(":") > 2 or fqbn != DEFAULT_FQBN else f"{fqbn}:{_ROLAWAN_MENUS}"
        self.bossac = bossac
        self.timeout, self.grace = timeout, grace
        self.cache = Path(cache) if cache is not None else None  # core.a reused across builds (no secrets)

    def _args(self, build: Path, bossac: str | None = None) -> list[str]:
        kit = self.kit
        args = [self.executable, "-logger=human", "-warnings=all", "-hardware", "/usr/share/arduino-builder",
                "-hardware", str(kit / "hardware"), "-tools", "/usr/share/arduino-builder", "-fqbn", self.fqbn,
                "-build-path", str(build), "-core-api-version", "10819",
                f"-prefs=runtime.tools.arm-none-eabi-gcc-7-2017q4.path={self.gcc_root}",
                f"-prefs=runtime.tools.CMSIS-5.7.0.path={kit / 'tools' / 'CMSIS-5.7.0'}",
                f"-prefs=runtime.tools.CMSIS-Atmel-1.2.1.path={kit / 'tools' / 'CMSIS-Atmel'}"]
        if bossac:  # the core's bossac tool points here (tools.bossac.path={runtime.tools.bossac-...path})
            args.append(f"-prefs=runtime.tools.bossac-1.7.0-arduino3.path={Path(bossac).parent}")
        if (kit / "libraries").is_dir():  # e.g. MCCI arduino-lmic
            args += ["-libraries", str(kit / "libraries")]
        if self.cache is not None:
            self.cache.mkdir(parents=True, exist_ok=True)
            args += ["-build-cache", str(self.cache)]
        return args

    def _compile(self, work: Path, cancel: threading.Event | None) -> tuple[Path, str]:
        build = work.parent / "build"
        build.mkdir()
        out = run_tool([*self._args(build), "-compile", str(work / f"{work.name}.ino")], "arduino-builder compile",
                       timeout=self.timeout, grace=self.grace, cancel=cancel, folder=work.parent)
        return build, out

    def build(self, sketch: str | Path, header: str | Path, *, output_dir: str | os.PathLike | None = None,
              build_parent: str | os.PathLike | None = None, cancel: threading.Event | None = None) -> int | None:
        """Build ``sketch`` with ``header`` for the real SAMD21; returns the program size it reported."""
        with _PrivateBuild(sketch, header, build_parent) as work:
            build, out = self._compile(work, cancel)
            _copy_outputs(build, output_dir)
            return flash_size(out)

    def build_and_upload(self, sketch: str | Path, header: str | Path, port: str, *,
                         build_parent: str | os.PathLike | None = None, cancel: threading.Event | None = None,
                         location: str | None = None) -> None:
        """Build, check the uploader, then upload as arduino-cli would: the 1200-baud touch on ``port``,
        the bootloader found at the same USB ``location``, the core's upload recipe on it."""
        bossac = shutil.which(self.bossac or "bossac")
        if bossac is None:
            raise ArduinoError(f"bossac {self.bossac or 'bossac'!r}: not found (--bossac PATH; the Seeed core "
                               "uploads with bossac 1.7.0-arduino3 from Arduino's tools)")
        if location is None:
            raise ArduinoError(f"port {port!r}: no USB location known, so the board cannot be followed into its "
                               "bootloader (pick it by --serial-number or --all)")
        with _PrivateBuild(sketch, header, build_parent) as work:
            build, _ = self._compile(work, cancel)
            props = parse_properties(run_tool([*self._args(build, bossac), "-dump-prefs",
                                               str(work / f"{work.name}.ino")], "arduino-builder -dump-prefs",
                                              timeout=self.timeout, grace=self.grace, cancel=cancel,
                                              folder=work.parent))
            version = bossac_version(bossac)
            problem = bossac_problem(props, version)
            if problem:
                raise ArduinoError(f"refusing to upload to {port}: {problem}")
            tool = upload_tool(props) or "bossac"
            if props.get("upload.use_1200bps_touch") == "true":
                touch(port)
            boot = wait_for_bootloader(location) if props.get("upload.wait_for_upload_port") == "true" else port
            cmdline = expand(props.get(f"tools.{tool}.upload.pattern", ""), props, {
                "path": str(Path(bossac).parent), "cmd": Path(bossac).name,
                "upload.verbose": props.get(f"tools.{tool}.upload.params.quiet", ""),
                "serial.port": boot, "serial.port.file": _port_file(boot), "build.path": str(build)})
            if "{" in cmdline:
                raise ArduinoError(f"upload tool {tool!r}: recipe not fully resolved: {cmdline}")
            run_tool(shlex.split(cmdline), f"{Path(bossac).name} upload", timeout=self.timeout, grace=self.grace,
                     cancel=cancel, folder=work.parent)


def _port_file(device: str) -> str:
    """What the core's recipes call ``serial.port.file``: the device below /dev (bossac puts /dev/ back)."""
    return device[len("/dev/"):] if device.startswith("/dev/") else device


# --- following a board through an upload ------------------------------------------

def touch(port: str) -> None:
    """Open ``port`` at 1200 baud and close it: a running SAMD21 sketch resets into its bootloader."""
    import serial

    try:
        serial.Serial(port, 1200).close()
    except (serial.SerialException, OSError) as exc:
        raise ArduinoError(f"port {port!r}: 1200-baud touch failed ({exc})") from None


def wait_for_bootloader(location: str, timeout: float = 10.0) -> str:
    """The bootloader's port at USB ``location``: it has no serial number, so its place on the bus is
    the only way to know it is the board we reset."""
    from flasher.ports import find_boards, usb_port_path

    deadline = time.monotonic() + timeout
    while True:
        for board in find_boards():
            if board.bootloader and board.location and usb_port_path(board.location) == usb_port_path(location):
                return board.device
        if time.monotonic() >= deadline:
            raise ArduinoError(f"no bootloader appeared at USB location {location} within {timeout:.0f} s")
        time.sleep(0.1)  # USB enumeration has no event to wait on portably


def wait_for_serial_number(serial_number: str | None, timeout: float = 20.0, *, location: str | None = None) -> str:
    """After an upload the tty may change name: find the board's running sketch again by its USB serial
    number (the chip id, back once the sketch runs), or by its USB location when it has none."""
    from flasher.ports import find_boards, usb_port_path

    if serial_number is None and location is None:
        raise ArduinoError("cannot follow the board: neither its serial number nor its USB location is known")
    deadline = time.monotonic() + timeout
    while True:
        for board in find_boards():
            if board.bootloader:
                continue
            if serial_number is not None and board.serial_number == serial_number:
                return board.device
            if serial_number is None and board.location and usb_port_path(board.location) == usb_port_path(location):
                return board.device
        if time.monotonic() >= deadline:
            what = f"serial number {serial_number!r}" if serial_number else f"USB location {location}"
            raise ArduinoError(f"board with {what} did not come back running its sketch within {timeout:.0f} s")
        time.sleep(0.1)
