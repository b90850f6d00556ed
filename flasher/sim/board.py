"""Simulated Seeeduino LoRaWAN boards on pseudo-terminals.

Each board answers the RHF76 AT dialect the way the real module does (response
lines, ``ERROR(-n)`` codes, multi-line answers, a fast ``AT+JOIN``), keeps its
"EEPROM" in a JSON file per board (``board-<n>.json``, written atomically,
reloaded on restart), and can misbehave on demand (:class:`Faults`): boot noise,
latency, silence, an unplug after N commands, corrupted bytes, bit flips on a
share of the bytes, echo. A state file that cannot be used (not JSON, not a
board's shape) is an :class:`~flasher.errors.InputError` naming the file.

Answers are decided by command, never popped off a list, so the client is
exercised the way hardware would exercise it. One background thread runs one
``select`` loop for every board; faults can be changed at any time.

An unplug closes the pty master: a reader on the slave gets EIO/EOF, as pyserial
does when a USB CDC device disappears. :meth:`BoardSimulator.replug` brings the
board back on a new pty (a new path, like USB re-enumeration) with the same
serial number and EEPROM.

The simulator writes ``ports.json`` in its state directory for
``FLASHER_SIMULATED_PORTS`` (see :mod:`flasher.ports`), atomically, each time a
board is plugged or unplugged, so discovery sees boards come and go as on a USB hub.

Hot-plug, for ``flasher station``: boards may start unplugged (``plugged=``), arrive
one by one on a schedule (``plug_every=`` seconds: each board not yet seen, in order),
or be plugged and unplugged from another process through the control socket
``<state>/control.sock`` (``control=True``; one JSON line in, one out, see
:data:`CONTROL_COMMANDS` and ``flasher simulate plug|unplug``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import select
import shutil
import socket
import tempfile
import termios
import threading
import time
import tty
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from flasher.bands import BANDS as _FLASHER_BANDS
from flasher.errors import InputError
from flasher.files import atomic_write

log = logging.getLogger("flasher.sim.board")

VID, PID = 0x2886, 0x800C
FACTORY_APPEUI = "8000000000000006"
DEFAULT_VERSION = "2.1.19"
MAX_LINE = 528
BANDS = tuple(_FLASHER_BANDS)  # every band Seeed's LoRaWan library can select, CN779 and AU915OLD included
# The factory channel plan the module reports for AT+CH (EU868's three join channels).
DEFAULT_CHANNELS = {0: (868100000, 0, 5), 1: (868300000, 0, 5), 2: (868500000, 0, 5)}
BOOT_NOISE = b"\x00\xf0\xff\r\nRisingHF RHF76-052 LoRaWAN modem\r\n+INFO: Input timeout\r\n\xfe\xff"
PORTS_FILE = "ports.json"
CONTROL_FILE = "control.sock"
CONTROL_COMMANDS = ("plug", "unplug", "list")
MAX_BOARDS = 256  # a fleet benchmark's worth; the loop polls (select() stops at descriptor 1024)
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path, less its NUL
BOOTLOADER_PID = 0x000C
FIRMWARES = ("at_passthrough", "flasher_otaa")
# What a flasher_otaa image says first on USB; the simulator reads the header's DevEUI from the image.
OTAA_BANNER = re.compile(rb"flasher_otaa: for DevEUI ([0-9A-Fa-f]{16}), band ([A-Z0-9]+)")
TOUCH_POLL = 0.05  # seconds between looks at each port's baud rate (the 1200-baud touch)


@dataclass
class Faults:
    """Ways a board misbehaves. Change any field at runtime (``sim.boards[i].faults.silent = True``).

    latency: seconds before every answer. boot_noise: banner and garbage before the
    first answer after a (re)plug or ``AT+RESET``. silent: read commands, answer
    nothing. unplug_after: answer N commands, then vanish on the next one (cleared
    by the unplug). corrupt: mangle the next N answers (-1: every answer). flip_rate:
    the share of answered bytes (0..1) that each get one random bit flipped, as line
    noise would -- a hex digit may become another hex digit. echo: send each command
    line back before the answer.
    """

    latency: float = 0.0
    boot_noise: bool = False
    silent: bool = False
    unplug_after: int | None = None
    corrupt: int = 0
    flip_rate: float = 0.0
    echo: bool = False


@dataclass
class Eeprom:
    """What the module keeps across resets and restarts. Hex strings upper case, no separators."""

    serial_number: str
    deveui: str
    factory_deveui: str
    appeui: str = FACTORY_APPEUI
    devaddr: str = ""
    appkey: str | None = None
    nwkskey: str | None = None
    appskey: str | None = None
    mode: str = "LWABP"
    band: str = "EU868"
    dr: int = 0
    class_: str = "A"
    adr: bool = True
    port: int = 8
    power: int = 14
    version: str = DEFAULT_VERSION
    # Not the module's: what the SAMD21 runs (its flash), kept in the same file so it survives restarts.
    firmware: str = "at_passthrough"
    firmware_deveui: str | None = None  # flasher_otaa: the DevEUI its config.h was generated for

    def to_json(self) -> dict:
        d = asdict(self)
        d["class"] = d.pop("class_")
        return d

    @classmethod
    def from_json(cls, d: object) -> Eeprom:
        """Unknown keys are ignored; anything missing or of the wrong shape is a ValueError saying which."""
        if not isinstance(d, dict):
            raise ValueError("expected a JSON object")
        d = dict(d)
        if "class" in d:
            d["class_"] = d.pop("class")
        missing = [k for k in ("serial_number", "deveui", "factory_deveui") if k not in d]
        if missing:
            raise ValueError(f"{', '.join(missing)} missing")
        known = {f.name for f in fields(cls)}
        e = cls(**{k: v for k, v in d.items() if k in known})
        problem = e._problem()
        if problem:
            raise ValueError(problem)
        return e

    def _problem(self) -> str | None:
        def hexes(v: object, n: int) -> bool:
            return isinstance(v, str) and re.fullmatch(f"[0-9A-Fa-f]{{{n}}}", v) is not None

        checks = [
            ("serial_number", isinstance(self.serial_number, str) and self.serial_number != ""),
            ("deveui", hexes(self.deveui, 16)), ("factory_deveui", hexes(self.factory_deveui, 16)),
            ("appeui", hexes(self.appeui, 16)), ("devaddr", hexes(self.devaddr, 8)),
            ("appkey", self.appkey is None or hexes(self.appkey, 32)),
            ("nwkskey", self.nwkskey is None or hexes(self.nwkskey, 32)),
            ("appskey", self.appskey is None or hexes(self.appskey, 32)),
            ("mode", self.mode in ("LWABP", "LWOTAA", "TEST")), ("band", self.band in BANDS),
            ("dr", isinstance(self.dr, int) and not isinstance(self.dr, bool) and 0 <= self.dr <= 15),
            ("class", self.class_ in ("A", "B", "C")), ("adr", isinstance(self.adr, bool)),
            ("port", isinstance(self.port, int) and not isinstance(self.port, bool) and 1 <= self.port <= 255),
            ("power", isinstance(self.power, int) and not isinstance(self.power, bool) and 0 <= self.power <= 30),
            ("version", isinstance(self.version, str) and self.version != ""),
            ("firmware", self.firmware in FIRMWARES),
            ("firmware_deveui", self.firmware_deveui is None or hexes(self.firmware_deveui, 16)),
        ]
        bad = [name for name, ok in checks if not ok]
        return f"bad value for {', '.join(bad)}" if bad else None


def _colon(hexstr: str) -> str:
    return ":".join(hexstr[i:i + 2] for i in range(0, len(hexstr), 2))


_CMD = re.compile(r"AT(?:\+([A-Za-z][A-Za-z0-9]*))?(\?|=\?|=(.*))?", re.IGNORECASE | re.DOTALL)


class SimulatedBoard:
    """One board: its EEPROM, its faults, and the dialect. :meth:`respond` is pure of I/O."""

    def __init__(self, index: int, state_path: Path, rng: random.Random, faults: Faults,
                 version: str = DEFAULT_VERSION, join_delay: float = 0.05):
        self.index = index
        self.state_path = state_path
        self.faults = faults
        self.join_delay = join_delay
        self._rng = rng
        if state_path.exists():
            self.eeprom = _load_eeprom(state_path)
        else:
            deveui = rng.randbytes(8).hex().upper()
            self.eeprom = Eeprom(serial_number=rng.randbytes(16).hex().upper(), deveui=deveui,
                                 factory_deveui=deveui, devaddr=deveui[8:], version=version)
            self.save()
        self.joined = False
        self.join_attempts = 0  # AT+JOIN commands that reached the network stage
        self.join_accept_after = 0  # the network answers only joins after this many attempts (no coverage before)
        # "terse": no "+JOIN: Network joined" line, as some firmware answers; "silent": nothing after NORMAL;
        # "busy": "+JOIN: LoRaWAN modem is busy" (its duty-cycle limiter)
        self.join_style = "full"
        self.channels = dict(DEFAULT_CHANNELS)
        self.duty_cycle = self.join_duty_cycle = True
        self.received: deque[str] = deque(maxlen=1000)  # command lines as received, for tests to inspect
        # The SAMD21 side: its bootloader (after a 1200-baud touch) and what flasher_otaa is doing.
        self.bootloader = False
        self.image = bytearray()  # what the bootloader was sent (SAM-BA "S" writes), read at the next boot
        self.image_pending = 0  # bytes of an "S" write still to come
        self.busy_until = 0.0  # flasher_otaa holds the module (a join) until then
        self.told_busy = False
        self.maintenance_until = 0.0  # flasher_otaa forwards host lines until then
        self.maintenance_idle = 60.0  # seconds of host silence that end its maintenance pass-through
        self.nag: tuple[float, bytes] | None = None  # (next time, text): flasher_otaa repeating its refusal
        self.nag_every = 1.0
        self.port: str | None = None  # the pty path while plugged in
        self.arrived = False  # plugged in at least once (a schedule plugs only boards that never were)
        self.commands = 0  # commands received since the last (re)plug
        self.booting = True  # next answer preceded by boot noise (if that fault is on)

    @property
    def serial_number(self) -> str:
        return self.eeprom.serial_number

    @property
    def deveui(self) -> str:
        return self.eeprom.deveui

    @property
    def state(self) -> dict:
        return self.eeprom.to_json()

    def save(self) -> None:
        atomic_write(self.state_path, json.dumps(self.eeprom.to_json(), indent=2) + "\n", mode=0o644)

    # --- the dialect --------------------------------------------------------------------

    def respond(self, raw: bytes) -> list[tuple[float, str]]:
        """One command line (without ``\\n``) -> [(delay in seconds, answer line without CRLF)]."""
        line = raw.rstrip(b"\r")
        if not line.strip():
            return []
        if len(line) > MAX_LINE:
            return [(0, "+AT: ERROR(-21)")]
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            return [(0, "+AT: ERROR(-23)")]
        if any(not (" " <= c <= "~") for c in text):
            return [(0, "+AT: ERROR(-23)")]
        self.received.append(text)
        m = _CMD.fullmatch(text.strip())
        if not m:
            return [(0, "+AT: ERROR(-10)")]
        name = (m.group(1) or "AT").upper()
        query = m.group(3) is None
        arg = (m.group(3) or "").strip()
        handler = getattr(self, f"_cmd_{name.lower()}", None)
        if handler is None:
            return [(0, "+AT: ERROR(-10)")]
        out = handler(query, arg)
        return [(0, f"+{name}: {x}") if isinstance(x, str) else (x[0], f"+{name}: {x[1]}") for x in out]

    @staticmethod
    def _unquote(s: str) -> str:
        s = s.strip()
        return s[1:-1] if len(s) >= 2 and s[0] == s[-1] == '"' else s

    def _cmd_at(self, query, arg):
        return ["OK"] if query else ["ERROR(-11)"]

    def _cmd_ver(self, query, arg):
        return [self.eeprom.version] if query else ["ERROR(-11)"]

    def _id_line(self, field: str) -> str:
        e = self.eeprom
        value = {"devaddr": e.devaddr, "deveui": e.deveui, "appeui": e.appeui}[field.lower()]
        proper = {"devaddr": "DevAddr", "deveui": "DevEui", "appeui": "AppEui"}[field.lower()]
        return f"{proper}, {_colon(value)}"

    def _cmd_id(self, query, arg):
        if query:
            return [self._id_line(f) for f in ("DevAddr", "DevEui", "AppEui")]
        parts = [p.strip() for p in arg.split(",")]
        field_ = parts[0].lower()
        if field_ not in ("devaddr", "deveui", "appeui") or len(parts) > 2:
            return ["ERROR(-1)"]
        if len(parts) == 1:
            return [self._id_line(field_)]
        value = self._unquote(parts[1])
        size = 8 if field_ == "devaddr" else 16
        if not re.fullmatch(f"[0-9A-Fa-f]{{{size}}}", value):  # plain hex only, like real firmware
            return ["ERROR(-1)"]
        setattr(self.eeprom, field_, value.upper())
        self.save()
        return [self._id_line(field_)]

    def _cmd_key(self, query, arg):
        if query:
            return ["ERROR(-11)"]  # keys are write-only
        parts = [p.strip() for p in arg.split(",")]
        if len(parts) != 2 or parts[0].upper() not in ("APPKEY", "NWKSKEY", "APPSKEY"):
            return ["ERROR(-1)"]
        value = self._unquote(parts[1])
        if not re.fullmatch(r"[0-9A-Fa-f]{32}", value):
            return ["ERROR(-1)"]
        value = value.upper()
        setattr(self.eeprom, parts[0].lower(), value)
        self.save()
        shown = " ".join(value[i:i + 2] for i in range(0, 32, 2)) if self.eeprom.version.startswith("2.0.") else value
        return [f"{parts[0].upper()} {shown}"]

    def _cmd_mode(self, query, arg):
        if query:
            return [self.eeprom.mode]
        mode = arg.upper()
        if mode not in ("LWABP", "LWOTAA", "TEST"):
            return ["ERROR(-1)"]
        self.eeprom.mode = mode
        self.joined = False
        self.save()
        return [mode]

    def _cmd_dr(self, query, arg):
        e = self.eeprom
        if query:
            sf = f"SF{12 - e.dr} BW125K" if e.dr <= 5 else ("SF7 BW250K" if e.dr == 6 else "FSK 50kbps")
            return [f"DR{e.dr}", f"{e.band} DR{e.dr}  {sf} "]
        a = arg.upper()
        if a in BANDS:
            e.band, e.dr = a, 0
            self.save()
            return [a]
        m = re.fullmatch(r"(?:DR)?(\d{1,2})", a)
        if not m or int(m.group(1)) > 15:
            return ["ERROR(-1)"]
        e.dr = int(m.group(1))
        self.save()
        return [f"DR{e.dr}"]

    def _cmd_class(self, query, arg):
        if query:
            return [self.eeprom.class_]
        if arg.upper() not in ("A", "B", "C"):
            return ["ERROR(-1)"]
        self.eeprom.class_ = arg.upper()
        self.save()
        return [self.eeprom.class_]

    def _cmd_adr(self, query, arg):
        if query:
            return ["ON" if self.eeprom.adr else "OFF"]
        if arg.upper() not in ("ON", "OFF"):
            return ["ERROR(-1)"]
        self.eeprom.adr = arg.upper() == "ON"
        self.save()
        return [arg.upper()]

    def _set_int(self, attr: str, query: bool, arg: str, low: int, high: int) -> list:
        """``AT+PORT``/``AT+POWER``: query, or set a whole number in range (the library sends ``=%d``)."""
        if not query:
            if not re.fullmatch(r"-?\d{1,3}", arg) or not low <= int(arg) <= high:
                return ["ERROR(-1)"]
            setattr(self.eeprom, attr, int(arg))
            self.save()
        return [str(getattr(self.eeprom, attr))]

    def _cmd_port(self, query, arg):
        return self._set_int("port", query, arg, 1, 255)

    def _cmd_power(self, query, arg):
        return self._set_int("power", query, arg, 0, 30)

    def _cmd_ch(self, query, arg):
        """``AT+CH`` lists the enabled channels; ``AT+CH=n,freq[,dr[,drmax]]`` sets one (freq 0 disables it).

        The library sends the frequency as ``MHz.tenths`` (``AT+CH=3,867.1,0,5``)."""
        def line(n: int) -> str:
            hz, lo, hi = self.channels[n]
            return f"{n},{hz},DR{lo}" + (f",DR{hi}" if hi != lo else "")

        if query:
            return ["; ".join([str(len(self.channels))] + [line(n) for n in sorted(self.channels)])]
        parts = [p.strip() for p in arg.split(",")]
        try:
            n = int(parts[0])
            mhz = float(parts[1]) if len(parts) > 1 else None
            drs = [int(p.upper().removeprefix("DR")) for p in parts[2:]]
        except (ValueError, IndexError):
            return ["ERROR(-1)"]
        if not 0 <= n <= 71 or len(parts) > 4 or any(not 0 <= d <= 15 for d in drs):
            return ["ERROR(-1)"]
        if mhz is None:
            return [line(n)] if n in self.channels else [f"{n},0"]
        if mhz == 0:
            self.channels.pop(n, None)
            return [f"{n},0"]
        lo, hi = (drs + [0, 5])[:2] if drs else (0, 5)
        if len(drs) == 1:
            hi = lo
        self.channels[n] = (round(mhz * 1e6), lo, hi)
        return [line(n)]

    def _cmd_lw(self, query, arg):
        """``AT+LW=DC, ON`` / ``AT+LW=JDC,OFF`` (duty cycle, join duty cycle); the name alone reads it."""
        parts = [p.strip().upper() for p in arg.split(",")]
        if query or parts[0] not in ("DC", "JDC") or len(parts) > 2:
            return ["ERROR(-1)"]
        attr = "duty_cycle" if parts[0] == "DC" else "join_duty_cycle"
        if len(parts) == 2:
            if parts[1] not in ("ON", "OFF"):
                return ["ERROR(-1)"]
            setattr(self, attr, parts[1] == "ON")
        return [f"{parts[0]}, {'ON' if getattr(self, attr) else 'OFF'}"]

    def _cmd_delay(self, query, arg):
        """``AT+DELAY=RX1,1000`` (also RX2, JRX1, JRX2), milliseconds."""
        parts = [p.strip().upper() for p in arg.split(",")]
        if query or len(parts) != 2 or parts[0] not in ("RX1", "RX2", "JRX1", "JRX2") or not parts[1].isdigit():
            return ["ERROR(-1)"]
        return [f"{parts[0]}, {int(parts[1])}"]

    def _repeat(self, query, arg):
        if query:
            return ["1"]
        return [str(int(arg))] if arg.isdigit() and 1 <= int(arg) <= 15 else ["ERROR(-1)"]

    _cmd_rept = _cmd_retry = _repeat

    def _rxwin(self, query, arg):
        parts = [p.strip() for p in arg.split(",")]
        if query or not parts[0]:
            return ["ERROR(-1)"]
        return [", ".join(parts)]

    _cmd_rxwin1 = _cmd_rxwin2 = _rxwin

    def _cmd_lowpower(self, query, arg):
        return ["SLEEP"]

    def _cmd_reset(self, query, arg):
        self.joined = False
        self.booting = True
        return ["OK"]

    def _cmd_fdefault(self, query, arg):
        if not query and arg.upper() != "RISINGHF":
            return ["ERROR(-1)"]
        e = self.eeprom
        self.eeprom = Eeprom(serial_number=e.serial_number, deveui=e.factory_deveui, factory_deveui=e.factory_deveui,
                             devaddr=e.factory_deveui[8:], version=e.version, firmware=e.firmware,
                             firmware_deveui=e.firmware_deveui)
        self.joined = False
        self.channels = dict(DEFAULT_CHANNELS)
        self.duty_cycle = self.join_duty_cycle = True
        self.save()
        return ["OK"]

    def _cmd_join(self, query, arg):
        e = self.eeprom
        if e.mode == "TEST":
            return ["ERROR(-12)"]
        if e.mode != "LWOTAA":
            return ["Not in OTAA mode"]
        if self.joined and arg.upper() != "FORCE":
            return ["Joined already"]
        d = self.join_delay
        if self.join_style == "busy":
            return ["LoRaWAN modem is busy"]
        self.join_attempts += 1
        if self.join_style == "silent":  # the join-accept window passes and the module never says Done
            return ["Starting", "NORMAL"]
        # No AppKey, or no network in reach yet (join_accept_after): the join-accept never comes.
        if not e.appkey or self.join_attempts <= self.join_accept_after:
            return ["Starting", "NORMAL", (d, "Join failed"), (d, "Done")]
        self.joined = True
        e.devaddr = self._rng.randbytes(4).hex().upper()
        self.save()
        joined = [] if self.join_style == "terse" else [(d, "Network joined")]  # some firmware omits the line
        return ["Starting", "NORMAL", *joined, (d, f"NetID 000013 DevAddr {_colon(e.devaddr)}"), (d, "Done")]

    def _msg(self, query, arg):
        if self.eeprom.mode == "TEST":
            return ["ERROR(-12)"]
        if query:
            return ["ERROR(-11)"]
        if self.eeprom.mode == "LWOTAA" and not self.joined:
            return ["Please join network first"]
        return ["Start", "FPENDING", (self.join_delay, "Done")]

    _cmd_msg = _cmd_cmsg = _cmd_msghex = _cmd_cmsghex = _msg


def _load_eeprom(path: Path) -> Eeprom:
    """A board's state file, or one line naming the file and what is wrong with it."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"board state {str(path)!r}: cannot read ({_reason(exc)})") from None
    try:
        return Eeprom.from_json(json.loads(text))
    except ValueError as exc:  # JSONDecodeError is one
        raise InputError(f"board state {str(path)!r}: not a simulated board's state ({_reason(exc)}); "
                         "fix it or delete it for a new board") from None


def _reason(exc: BaseException) -> str:
    return (getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__).splitlines()[0]


# --- the pty loop --------------------------------------------------------------------------

@dataclass
class _Plug:
    """A board's live pty. ``out`` holds (due time, bytes) in due order."""

    master: int
    slave: int
    path: str
    inbuf: bytearray = field(default_factory=bytearray)
    out: list = field(default_factory=list)


def _wait(read: list[int], write: list[int], timeout: float | None) -> tuple[list[int], list[int]]:
    """select() for any number of descriptors: select.select refuses one numbered 1024 or more, which a
    process with a few hundred ptys and sockets open soon has. A hang-up or error counts as readable."""
    poller = select.poll()
    events: dict[int, int] = {}
    for fd in read:
        events[fd] = events.get(fd, 0) | select.POLLIN
    for fd in write:
        events[fd] = events.get(fd, 0) | select.POLLOUT
    for fd, mask in events.items():
        poller.register(fd, mask)
    ready = poller.poll(None if timeout is None else timeout * 1000)
    gone = select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL
    return [fd for fd, ev in ready if ev & gone], [fd for fd, ev in ready if ev & select.POLLOUT]


class BoardSimulator:
    """N simulated boards. A context manager; the pty loop runs in one background thread.

    >>> with BoardSimulator(count=2, state_dir=tmp, seed=1) as sim:
    ...     sim.ports          # ['/dev/pts/5', '/dev/pts/6']
    ...     sim.boards[0].faults.latency = 0.3
    ...     sim.unplug(1); sim.replug(1)
    """

    def __init__(self, count: int = 1, state_dir: str | os.PathLike | None = None, seed: int = 0,
                 faults: Faults | None = None, *, version: str = DEFAULT_VERSION, join_delay: float = 0.05,
                 plugged: int | None = None, plug_every: float | None = None, control: bool = False,
                 on_change=None):
        if not 1 <= count <= MAX_BOARDS:
            raise InputError(f"board count {count}: must be from 1 to {MAX_BOARDS}")
        if plugged is not None and not 0 <= plugged <= count:
            raise InputError(f"plugged {plugged}: must be from 0 to the board count ({count})")
        if plug_every is not None and not plug_every > 0:
            raise InputError(f"plug every {plug_every!r} s: must be a positive number of seconds")
        self.initially_plugged = count if plugged is None else plugged
        self.plug_every = plug_every
        self.on_change = on_change  # called as on_change(index, port or None) from the loop thread
        self._seed, self._version, self._join_delay, self._faults = seed, version, join_delay, faults
        self._own_dir = state_dir is None
        self.state_dir = Path(state_dir) if state_dir is not None else Path(tempfile.mkdtemp(prefix="flasher-sim-"))
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"simulator state {str(self.state_dir)!r}: cannot create ({_reason(exc)})") from None
        try:
            self.boards = [
                SimulatedBoard(i, self.state_dir / f"board-{i}.json", random.Random(f"flasher-sim:{seed}:{i}"),
                               Faults(**asdict(faults)) if faults else Faults(), version=version,
                               join_delay=join_delay)
                for i in range(count)
            ]
        except BaseException:
            if self._own_dir:
                shutil.rmtree(self.state_dir, ignore_errors=True)
            raise
        self._plugs: dict[int, _Plug] = {}
        self._control: socket.socket | None = None
        self._clients: dict[int, tuple[socket.socket, bytearray]] = {}
        self._next_plug: float | None = None
        if control:
            self._control = self._listen()
        self._lock = threading.Lock()
        self._requests: list = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._next_touch_look = 0.0

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def ports_file(self) -> Path:
        return self.state_dir / PORTS_FILE

    @property
    def ports(self) -> list[str | None]:
        return [b.port for b in self.boards]

    @property
    def control_path(self) -> Path:
        return self.state_dir / CONTROL_FILE

    def start(self) -> BoardSimulator:
        for b in self.boards[:self.initially_plugged]:
            self._plug(b)
        self._write_ports()
        if self.plug_every is not None:
            self._next_plug = time.monotonic() + self.plug_every
        self._thread = threading.Thread(target=self._run, name="board-sim", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the loop, close every pty, remove the ports file. Safe to call twice."""
        if self._thread is not None:
            self._stopping = True
            self._wake()
            self._thread.join(timeout=10)
            self._thread = None
        for i in list(self._plugs):
            self._unplug_now(self.boards[i])
        for conn, _ in self._clients.values():
            conn.close()
        self._clients.clear()
        if self._control is not None:
            self._control.close()
            self._control = None
            self.control_path.unlink(missing_ok=True)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1
        try:
            self.ports_file.unlink()
        except FileNotFoundError:
            pass
        if self._own_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> BoardSimulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- control from other threads --------------------------------------------------------

    def unplug(self, i: int) -> None:
        """Pull board ``i``'s cable: its pty master closes, readers get an error. It powers up running its sketch."""
        def job():
            self._unplug_now(self.boards[i])
            self.boards[i].bootloader = False

        self._call(job)

    def flash(self, i: int, firmware: str, deveui: str | None = None) -> str:
        """Put ``firmware`` on board ``i`` as an upload would (``deveui``: the one flasher_otaa's header names,
        by default the module's own), and power-cycle it. Returns its new port."""
        if firmware not in FIRMWARES:
            raise ValueError(f"firmware {firmware!r}: one of {', '.join(FIRMWARES)}")
        b = self.boards[i]

        def job():
            b.eeprom.firmware = firmware
            b.eeprom.firmware_deveui = (deveui or b.deveui).upper() if firmware == "flasher_otaa" else None
            b.save()
            self._unplug_now(b)
            b.bootloader = False
            return self._plug(b)

        return self._call(job)

    def replug(self, i: int) -> str:
        """Plug board ``i`` back in, on a new pty; same serial number and EEPROM. Returns the new path."""
        return self._call(lambda: self._plug(self.boards[i]) if self.boards[i].port is None else self.boards[i].port)

    plug = replug

    def add(self) -> int:
        """A new board (new serial number and DevEUI), plugged in; returns its index."""
        return self._call(self._add_now)

    def _add_now(self) -> int:
        if len(self.boards) >= MAX_BOARDS:
            raise InputError(f"at most {MAX_BOARDS} simulated boards")
        i = len(self.boards)
        self.boards.append(SimulatedBoard(i, self.state_dir / f"board-{i}.json",
                                          random.Random(f"flasher-sim:{self._seed}:{i}"),
                                          Faults(**asdict(self._faults)) if self._faults else Faults(),
                                          version=self._version, join_delay=self._join_delay))
        self._plug(self.boards[i])
        return i

    def _call(self, fn):
        if self._thread is None:
            return fn()
        done = threading.Event()
        box: list = []

        def job():
            try:
                box.append(fn())
            finally:
                done.set()

        with self._lock:
            self._requests.append(job)
        self._wake()
        if not done.wait(10):
            raise RuntimeError("board simulator loop is not responding")
        return box[0] if box else None

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    # --- plugs (loop thread, or before it starts) -------------------------------------------

    def _plug(self, b: SimulatedBoard) -> str:
        master, slave = os.openpty()
        tty.setraw(slave)  # no line discipline: no local echo, no CRLF translation
        os.set_blocking(master, False)
        path = os.ttyname(slave)
        plug = self._plugs[b.index] = _Plug(master, slave, path)
        b.port, b.commands, b.booting, b.arrived = path, 0, True, True
        if self._thread is not None:
            self._write_ports()
            self._changed(b.index, path)
        log.debug("board %d plugged in at %s%s", b.index, path, " (bootloader)" if b.bootloader else "")
        if not b.bootloader and b.eeprom.firmware == "flasher_otaa":
            self._otaa_boot(b, plug)
        return path

    def _changed(self, i: int, port: str | None) -> None:
        if self.on_change is not None:
            try:
                self.on_change(i, port)
            except Exception:  # a caller's display must not stop the boards
                log.exception("board simulator: on_change failed")

    def _unplug_now(self, b: SimulatedBoard) -> None:
        plug = self._plugs.pop(b.index, None)
        if plug is None:
            return
        # State first: whoever sees the port die must also see the board unplugged.
        b.port = None
        b.joined = False
        b.faults.unplug_after = None
        for fd in (plug.master, plug.slave):
            try:
                os.close(fd)
            except OSError:
                pass
        if not self._stopping:
            self._write_ports()
            self._changed(b.index, None)
        log.debug("board %d unplugged", b.index)

    def _write_ports(self) -> None:
        # In its bootloader a board has another product id and, as on real hardware, no serial number:
        # only its USB location says which board it is.
        entries = [{"device": b.port, "serial_number": None if b.bootloader else b.serial_number,
                    "vid": f"{VID:04X}", "pid": f"{BOOTLOADER_PID if b.bootloader else PID:04X}",
                    "description": "Seeeduino LoRaWAN" + (" bootloader" if b.bootloader else "") + " (simulated)",
                    "manufacturer": "Seeed Studio", "location": f"sim-{b.index}", "simulated": True}
                   for b in self.boards if b.port]
        atomic_write(self.ports_file, json.dumps(entries, indent=2) + "\n", mode=0o644)

    # --- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                with self._lock:
                    jobs, self._requests = self._requests, []
                for job in jobs:
                    job()
                now = time.monotonic()
                # Output that is due waits for the pty to be writable (a full buffer means nobody
                # reads); output that is not due yet sets the select timeout. No spinning either way.
                if self._next_plug is not None and now >= self._next_plug:
                    self._scheduled_plug(now)
                ready = [p.master for p in self._plugs.values() if p.out and p.out[0][0] <= now]
                later = [p.out[0][0] for p in self._plugs.values() if p.out and p.out[0][0] > now]
                if self._next_plug is not None:
                    later.append(self._next_plug)
                timeout = max(0.0, min(later) - now) if later else None
                if any(not self.boards[i].bootloader for i in self._plugs):  # watch for a 1200-baud touch
                    timeout = TOUCH_POLL if timeout is None else min(timeout, TOUCH_POLL)
                self._nag(now)
                fds = {p.master: i for i, p in self._plugs.items()}
                control = [self._control.fileno()] if self._control is not None else []
                readable, writable = _wait([self._wake_r, *fds, *control, *self._clients], ready, timeout)
                if self._wake_r in readable:
                    try:
                        os.read(self._wake_r, 512)
                    except BlockingIOError:
                        pass
                for fd in readable:
                    if fd in fds and fds[fd] in self._plugs:
                        self._receive(self.boards[fds[fd]])
                    elif fd in control:
                        self._accept()
                    elif fd in self._clients:
                        self._serve_client(fd)
                self._flush(time.monotonic(), set(writable))
                if time.monotonic() >= self._next_touch_look:  # a tcgetattr per board: not on every wake-up
                    self._look_for_touches()
                    self._next_touch_look = time.monotonic() + TOUCH_POLL
        except BaseException as exc:  # a simulator bug must not look like a silent board
            self._error = exc
            log.exception("board simulator loop died")

    def _scheduled_plug(self, now: float) -> None:
        waiting = [b for b in self.boards if not b.arrived]
        if waiting:
            self._plug(waiting[0])
        assert self.plug_every is not None
        self._next_plug = now + self.plug_every if len(waiting) > 1 else None

    # --- the control socket (loop thread) ------------------------------------------------------

    def _listen(self) -> socket.socket:
        path = self.control_path
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            raise InputError(f"simulator state {str(self.state_dir)!r}: too long a path for its control socket "
                             f"(at most {_SUN_PATH_MAX - len(CONTROL_FILE) - 1} bytes); choose a shorter --state")
        if path.is_socket():
            path.unlink()  # left by a simulator that was killed: its boards are gone with it
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fspath(path))
            os.chmod(path, 0o600)
            sock.listen(8)
        except OSError as exc:
            sock.close()
            raise InputError(f"simulator control socket {str(path)!r}: {_reason(exc)}") from None
        sock.setblocking(False)
        return sock

    def _accept(self) -> None:
        assert self._control is not None
        try:
            conn, _ = self._control.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        self._clients[conn.fileno()] = (conn, bytearray())

    def _serve_client(self, fd: int) -> None:
        conn, buf = self._clients[fd]
        try:
            data = conn.recv(1024)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buf += data
        if b"\n" not in buf and data and len(buf) < 1024:
            return  # the rest of the line is on its way
        del self._clients[fd]
        line = bytes(buf).split(b"\n", 1)[0].decode("utf-8", "replace").strip()
        reply = self._control_command(line) if line else {"ok": False, "error": "empty request"}
        try:
            conn.setblocking(True)
            conn.settimeout(2)
            conn.sendall((json.dumps(reply) + "\n").encode())
        except OSError:
            pass  # the client left without its answer; the change itself is made
        finally:
            conn.close()

    def _describe(self, b: SimulatedBoard) -> dict:
        return {"board": b.index, "port": b.port, "serial_number": b.serial_number, "deveui": b.deveui}

    def _control_command(self, line: str) -> dict:
        """``plug [N]`` (no N: the first board not plugged in, or a new one), ``unplug N``, ``list``."""
        words = line.split()
        verb, args = words[0].lower(), words[1:]
        if verb not in CONTROL_COMMANDS or len(args) > 1 or (verb == "list" and args) or (verb == "unplug" and not args):
            return {"ok": False, "error": f"{line!r}: expected 'plug [N]', 'unplug N' or 'list'"}
        if verb == "list":
            return {"ok": True, "boards": [self._describe(b) for b in self.boards]}
        if args:
            try:
                i = int(args[0])
            except ValueError:
                i = -1
            if not 0 <= i < len(self.boards):
                return {"ok": False, "error": f"no board {args[0]!r} (boards 0 to {len(self.boards) - 1})"}
        elif verb == "plug":
            idle = [b.index for b in self.boards if b.port is None]
            try:
                i = idle[0] if idle else self._add_now()
            except InputError as exc:
                return {"ok": False, "error": str(exc)}
        b = self.boards[i]
        if verb == "plug" and b.port is None:
            self._plug(b)
        elif verb == "unplug":
            self._unplug_now(b)
        return {"ok": True, **self._describe(b)}

    def _receive(self, b: SimulatedBoard) -> None:
        plug = self._plugs[b.index]
        try:
            data = os.read(plug.master, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            return
        plug.inbuf += data
        if b.bootloader:
            self._samba(b, plug)
            return
        while b.index in self._plugs and b"\n" in plug.inbuf:
            i = plug.inbuf.index(b"\n")
            line = bytes(plug.inbuf[:i])
            del plug.inbuf[: i + 1]
            self._command(b, plug, line)
        if len(plug.inbuf) > MAX_LINE * 2:  # no LF for far too long
            plug.inbuf.clear()
            self._queue(b, plug, [(0, "+AT: ERROR(-21)")])

    def _command(self, b: SimulatedBoard, plug: _Plug, line: bytes) -> None:
        f = b.faults
        if not line.rstrip(b"\r").strip():
            return
        if f.unplug_after is not None and b.commands >= f.unplug_after:
            self._unplug_now(b)  # mid-command: the command arrived, no answer ever will
            return
        b.commands += 1
        now = time.monotonic()
        if f.echo:
            self._send(plug, now, self._flip(b, line.rstrip(b"\r") + b"\r\n"))
        if f.silent:
            return
        wait = 0.0
        if b.eeprom.firmware == "flasher_otaa" and now >= b.maintenance_until:
            # flasher_otaa's own protocol (otaa_node.h): a line starting with AT opens the pass-through;
            # during a join it is answered BUSY once, then the next line waits for the join to end.
            if not line.strip()[:2].upper() == b"AT":
                self._send_now(plug, b"flasher_otaa: send a line starting with AT to talk to the module\r\n")
                return
            if now < b.busy_until:
                if not b.told_busy:
                    b.told_busy = True
                    self._send_now(plug, f"+AT: BUSY {int(b.busy_until - now) + 1}\r\n".encode())
                    return
                wait = b.busy_until - now
        if b.eeprom.firmware == "flasher_otaa":
            b.maintenance_until = now + wait + b.maintenance_idle
        self._queue(b, plug, b.respond(line), wait)

    def _queue(self, b: SimulatedBoard, plug: _Plug, answers: list[tuple[float, str]], wait: float = 0.0) -> None:
        if not answers:
            return
        f = b.faults
        start = time.monotonic() + f.latency + wait
        chunks = [(start + d, s.encode("ascii") + b"\r\n") for d, s in answers]
        if f.corrupt:
            k = b._rng.randrange(len(chunks))
            t, data = chunks[k]
            bad = bytearray(data)
            for j in range(1, min(4, len(bad) - 2)):  # the "+NAME:" header: unrecognisable, still a line
                bad[j] = 0x80 | b._rng.randrange(0x80)
            chunks[k] = (t, bytes(bad))
            if f.corrupt > 0:
                f.corrupt -= 1
        if f.boot_noise and b.booting:
            t, data = chunks[0]
            chunks[0] = (t, BOOT_NOISE + data)
        b.booting = False
        for t, data in chunks:
            self._send(plug, t, self._flip(b, data))

    # --- the SAMD21: flasher_otaa, the touch, the bootloader -----------------------------------

    def _otaa_boot(self, b: SimulatedBoard, plug: _Plug) -> None:
        """What flasher_otaa says and does at power-up: its DevEUI check, then one join (answered BUSY)."""
        now = time.monotonic()
        e = b.eeprom
        b.maintenance_until, b.told_busy, b.busy_until = 0.0, False, now
        say = [f"flasher_otaa: for DevEUI {e.firmware_deveui}, band {e.band}"]
        if e.firmware_deveui != e.deveui:
            say += [f"flasher_otaa: REFUSING TO JOIN: config.h was generated for DevEUI {e.firmware_deveui}, "
                    f"but this board's module has DevEUI {e.deveui}"]
            self._send(plug, now, "".join(f"{x}\r\n" for x in say).encode())
            b.nag = (now + b.nag_every, f"{say[-1]}\r\n".encode())  # said again and again, as the sketch does
            return
        b.nag = None
        say += [f"flasher_otaa: DevEUI {e.deveui} matches config.h", "flasher_otaa: join attempt 1"]
        self._send(plug, now, "".join(f"{x}\r\n" for x in say).encode())
        answer = b.respond(b"AT+JOIN")
        b.busy_until = now + sum(d for d, _ in answer)
        devaddr = next((t.rsplit(" ", 1)[1].replace(":", "") for _, t in answer if "DevAddr" in t), None)
        result = (f"flasher_otaa: joined, DevAddr {devaddr}" if devaddr else
                  f"flasher_otaa: join failed ({(answer[-1][1].split(': ', 1)[1] if answer else 'no answer')})")
        self._send(plug, b.busy_until, f"{result}\r\n".encode())

    def _nag(self, now: float) -> None:
        """Spontaneous output that is due (flasher_otaa's refusal), unless the host holds the pass-through."""
        for i, plug in self._plugs.items():
            b = self.boards[i]
            if b.nag is not None and b.nag[0] <= now and not b.bootloader and b.eeprom.firmware == "flasher_otaa":
                if now >= b.maintenance_until:
                    self._send_now(plug, b.nag[1])
                b.nag = (now + b.nag_every, b.nag[1])

    def _look_for_touches(self) -> None:
        """A port opened at 1200 baud and closed resets a running board into its bootloader (Arduino's
        convention, what arduino-cli and bossac uploads start with). A pty shows its baud rate on the master."""
        for i, plug in list(self._plugs.items()):
            b = self.boards[i]
            try:
                touched = not b.bootloader and termios.tcgetattr(plug.master)[4] == termios.B1200
            except termios.error:
                continue
            if touched:
                log.debug("board %d: 1200-baud touch on %s", i, plug.path)
                joined = b.joined  # the RHF76 keeps its power and its session through the SAMD21's reset
                self._unplug_now(b)
                b.joined, b.bootloader, b.image = joined, True, bytearray()
                self._plug(b)

    def _samba(self, b: SimulatedBoard, plug: _Plug) -> None:
        """A subset of the SAM-BA monitor the SAMD21 bootloader speaks: ``N#`` (binary mode), ``V#`` (version),
        ``S<addr>,<size>#`` then <size> bytes (kept as the image), and ``G<addr>#`` or bossac's reset
        (``W<AIRCR>,<SYSRESETREQ>#``), which start the application. Enough for a stand-in bossac, and for
        the simulator to tell which firmware it was sent (flasher_otaa's banner is in its image)."""
        buf = plug.inbuf
        while True:
            if b.image_pending:
                n = min(b.image_pending, len(buf))
                b.image += buf[:n]
                del buf[:n]
                b.image_pending -= n
                if b.image_pending:
                    return
            end = buf.find(b"#")
            if end < 0:
                if len(buf) > 64:
                    buf.clear()
                return
            cmd = bytes(buf[:end]).decode("ascii", "replace").strip().upper()
            del buf[: end + 1]
            now = time.monotonic()
            if cmd == "N":
                self._send(plug, now, b"\n\r")
            elif cmd == "V":
                self._send(plug, now, b"v2.0 [Arduino:XYZ] Dec 20 2016 15:36:43 (flasher simulator)\n\r")
            elif cmd.startswith("S") and re.fullmatch(r"S[0-9A-F]{1,8},[0-9A-F]{1,8}", cmd):
                b.image_pending = int(cmd.split(",")[1], 16)
            elif cmd.startswith("G") or cmd.startswith("WE000ED0C"):
                self._start_application(b)
                return

    def _start_application(self, b: SimulatedBoard) -> None:
        m = OTAA_BANNER.search(bytes(b.image))
        b.eeprom.firmware = "flasher_otaa" if m else "at_passthrough"
        b.eeprom.firmware_deveui = m.group(1).decode().upper() if m else None
        b.save()
        joined = b.joined
        self._unplug_now(b)
        b.joined, b.bootloader, b.image = joined, False, bytearray()
        self._plug(b)

    @staticmethod
    def _flip(b: SimulatedBoard, data: bytes) -> bytes:
        """Line noise: each byte, with probability ``flip_rate``, gets one of its 8 bits flipped."""
        rate = b.faults.flip_rate
        if not rate:
            return data
        out = bytearray(data)
        for i in range(len(out)):
            if b._rng.random() < rate:
                out[i] ^= 1 << b._rng.randrange(8)
        return bytes(out)

    @staticmethod
    def _send_now(plug: _Plug, data: bytes) -> None:
        """Output that overtakes what is queued for later (flasher_otaa's own answer during a join)."""
        now = time.monotonic()
        at = next((k for k, (due, _) in enumerate(plug.out) if due > now), len(plug.out))
        plug.out.insert(at, (now, data))

    @staticmethod
    def _send(plug: _Plug, due: float, data: bytes) -> None:
        if plug.out and plug.out[-1][0] > due:
            due = plug.out[-1][0]  # keep order
        plug.out.append((due, data))

    def _flush(self, now: float, writable: set[int]) -> None:
        for plug in self._plugs.values():
            while plug.master in writable and plug.out and plug.out[0][0] <= now:
                data = plug.out[0][1]
                try:
                    n = os.write(plug.master, data)
                except BlockingIOError:
                    break  # nobody reading; try again later
                except OSError:
                    plug.out.clear()
                    break
                if n < len(data):
                    plug.out[0] = (plug.out[0][0], data[n:])
                    break
                plug.out.pop(0)


def control_request(state_dir: str | os.PathLike, request: str, timeout: float = 10.0) -> dict:
    """Send one control line to the simulator running on ``state_dir``; its JSON answer.

    An answer with ``"ok": false`` is an :class:`InputError` (bad board number, unknown command); no simulator
    listening there is one too, naming the socket.
    """
    path = Path(state_dir) / CONTROL_FILE
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(os.fspath(path))
        sock.sendall(request.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise InputError(f"simulator control socket {str(path)!r}: {_reason(exc)} "
                         "(is `flasher simulate boards --state` running on that folder?)") from None
    finally:
        sock.close()
    try:
        reply = json.loads(data)
    except ValueError:
        raise InputError(f"simulator control socket {str(path)!r}: no answer") from None
    if not reply.get("ok"):
        raise InputError(f"simulator: {reply.get('error')}")
    return reply
