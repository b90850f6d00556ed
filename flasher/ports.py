"""Find Seeeduino LoRaWAN boards among the host's serial ports.

A board is recognised by its USB ids (Seeed's ``boards.txt``, board ``rolawan``):
vendor 0x2886, product 0x800C while a sketch runs, 0x000C in the bootloader.
Tty names change when a board re-enumerates (an upload, a replug), so a board
is best picked by its USB serial number (``--serial-number``). Only a running
sketch has one (the SAMD21's chip id); the bootloader's descriptor has none, so
through an upload a board is followed by its USB location (:func:`usb_port_path`).

Recognition is a pure function of ``comports()``-shaped records, so it is tested
against recorded output from several operating systems, without hardware.

Testing aid: simulated boards live on pseudo-terminals, which are not USB
devices. When the environment variable ``FLASHER_SIMULATED_PORTS`` names a
JSON file (``flasher simulate boards`` writes one: ``<state>/ports.json``, a list
of ``{"device", "serial_number", "vid", "pid", ...}``), its entries are merged
into discovery so ``--all`` and ``--serial-number`` work against the simulator.
A variable naming a missing, unreadable or malformed file is an
:class:`~flasher.errors.InputError`, never silently ignored: a test or a
demo that meant to use the simulator must not quietly run against nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from flasher.errors import FlasherError, InputError

SEEED_VID = 0x2886
APP_PID = 0x800C
BOOTLOADER_PID = 0x000C
SIMULATED_PORTS_ENV = "FLASHER_SIMULATED_PORTS"

APP = "app"
BOOTLOADER = "bootloader"


@dataclass(frozen=True)
class PortInfo:
    """One serial port; ``board`` is ``"app"``, ``"bootloader"`` or None for anything else."""

    device: str
    vid: int | None = None
    pid: int | None = None
    serial_number: str | None = None
    location: str | None = None
    description: str | None = None
    board: str | None = None
    simulated: bool = False

    @property
    def bootloader(self) -> bool:
        return self.board == BOOTLOADER

    def to_json(self) -> dict:
        d = asdict(self)
        d["vid"] = f"{self.vid:04X}" if self.vid is not None else None
        d["pid"] = f"{self.pid:04X}" if self.pid is not None else None
        return d


def usb_port_path(location: str | None) -> str | None:
    """The physical place on the bus: ``1-1.2:1.0`` -> ``1-1.2`` (pyserial adds the interface after ``:``).

    A board keeps it through the bootloader, whose USB descriptor has no serial number, so it is how a
    board is followed from its sketch into the bootloader; the serial number finds it once the sketch is back.
    """
    return location.split(":", 1)[0] if location else None


def board_kind(vid: int | None, pid: int | None) -> str | None:
    if vid != SEEED_VID or pid is None:
        return None
    return {APP_PID: APP, BOOTLOADER_PID: BOOTLOADER}.get(pid)


def _int(v) -> int | None:
    if v is None or v == "":
        return None
    if isinstance(v, int):
        return v
    try:
        return int(str(v), 16) if not str(v).lower().startswith("0x") else int(str(v), 0)
    except ValueError:
        return None


def classify(ports: Iterable[object], *, simulated: bool = False) -> list[PortInfo]:
    """``comports()``-like objects (or dicts) -> :class:`PortInfo`, boards recognised. Pure."""
    out = []
    for p in ports:
        get = p.get if isinstance(p, dict) else (lambda k, _p=p: getattr(_p, k, None))
        device = get("device")
        if not device:
            continue
        vid, pid = _int(get("vid")), _int(get("pid"))
        sn = get("serial_number")
        out.append(PortInfo(device=str(device), vid=vid, pid=pid, serial_number=str(sn) if sn else None,
                            location=get("location"), description=get("description"),
                            board=board_kind(vid, pid), simulated=simulated or bool(get("simulated"))))
    return out


def load_simulated(path: str | os.PathLike | None = None) -> list[PortInfo]:
    """Entries of the simulator's ports file; ones whose device has gone are left out.

    ``path`` defaults to ``$FLASHER_SIMULATED_PORTS``; unset or empty means no simulated
    ports. A file that is missing, unreadable or not the simulator's shape is an
    :class:`InputError` naming the variable and the file.
    """
    path = path if path is not None else os.environ.get(SIMULATED_PORTS_ENV)
    if not path:
        return []
    name = f"{SIMULATED_PORTS_ENV}={os.fspath(path)}"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise InputError(f"{name}: no such file (is `flasher simulate boards` running?)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{name}: cannot read ({_reason(exc)})") from None
    try:
        entries = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{name}: not valid JSON ({_reason(exc)})") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InputError(f"{name}: expected a JSON list of objects")
    for n, e in enumerate(entries, 1):
        problem = _entry_problem(e)
        if problem:
            raise InputError(f"{name}: entry {n}: {problem}")
    live = [e for e in entries if not e["device"].startswith("/") or os.path.exists(e["device"])]
    return classify(live, simulated=True)


def _entry_problem(e: dict) -> str | None:
    """What is wrong with one ports-file entry, or None."""
    if not isinstance(e.get("device"), str) or not e["device"]:
        return '"device" must be a non-empty string'
    for key in ("vid", "pid"):
        v = e.get(key)
        if v is not None and (isinstance(v, bool) or _int(v) is None):
            return f"{key!r} {v!r} is not a USB id"
    for key in ("serial_number", "location", "description"):
        if e.get(key) is not None and not isinstance(e[key], str):
            return f"{key!r} must be a string"
    return None


def _reason(exc: BaseException) -> str:
    return (getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__).splitlines()[0]


def list_ports() -> list[PortInfo]:
    """Every serial port on the host, plus simulated ones (see the module docstring)."""
    from serial.tools import list_ports as lp

    return classify(lp.comports()) + load_simulated()


def find_boards(ports: list[PortInfo] | None = None) -> list[PortInfo]:
    """Recognised boards (app and bootloader), in discovery order."""
    return [p for p in (list_ports() if ports is None else ports) if p.board]


def resolve_targets(ports: list[str], serial_numbers: list[str], all_boards: bool,
                    *, available: list[PortInfo] | None = None) -> list[str]:
    """The devices to talk to, from ``--port``, ``--serial-number`` and ``--all``; duplicates dropped.

    ``--port`` is taken as given (any path or pyserial URL); serial numbers and
    ``--all`` are looked up among boards running a sketch. ``available`` replaces
    discovery (tests). Never prompts.
    """
    ports, serial_numbers = list(ports or []), list(serial_numbers or [])
    if not (ports or serial_numbers or all_boards):
        raise InputError("no board selected: give --port, --serial-number or --all (see `flasher ports`)")
    targets: list[str] = list(ports)
    if serial_numbers or all_boards:
        boards = find_boards(available if available is not None else list_ports())
        for sn in serial_numbers:
            apps = [b for b in boards if b.board == APP and b.serial_number
                    and b.serial_number.lower() == sn.strip().lower()]
            if not apps:
                # A board in its bootloader has no serial number (only a running sketch reports one, from
                # the chip id): it may be one of these, but nothing says which.
                waiting = [b for b in boards if b.board == BOOTLOADER]
                if waiting:
                    where = ", ".join(f"{b.device}" + (f" (USB {usb_port_path(b.location)})" if b.location else "")
                                      for b in waiting)
                    raise FlasherError(f"serial number {sn}: no board running a sketch has it; {len(waiting)} "
                                       f"board(s) in their bootloader at {where} report no serial number until a "
                                       "sketch runs: upload the pass-through sketch (or wait for an upload to end)")
                raise InputError(f"serial number {sn}: no such board connected (see `flasher ports`)")
            if len({b.device for b in apps}) > 1:
                raise InputError(f"serial number {sn}: matches several ports ({', '.join(b.device for b in apps)})")
            targets.append(apps[0].device)
        if all_boards:
            running = [b.device for b in boards if b.board == APP]
            if not running:
                raise InputError("--all: no Seeeduino LoRaWAN board running a sketch found (see `flasher ports`)")
            targets.extend(running)
    return list(dict.fromkeys(targets))
