"""The RisingHF RHF76 dialect: typed module operations over an :class:`~flasher.at.ATClient`.

Reads are idempotent, so they are retried a bounded number of times when an
answer was garbled or incomplete (never when the port stayed completely silent:
a silent module will not speak up on the second ask, and the user should hear
so within one timeout). Writes are sent once; every write's echo is checked and
whatever the module lets us read is read back, because the module accepting a
command is not the same as the module holding the value.

The identity is trusted only once read twice alike: a line that flips a bit
can turn ``2C:F7:...`` into another well-formed DevEUI, and a board provisioned
under an EUI that is not its own is worse than a board that fails. So
:meth:`RHF76.read_ids` reads ``AT+ID`` until two readable answers in a row agree
(one extra exchange on a clean line), within a bounded number of reads.

Keys are write-only on the module: the echo of ``AT+KEY`` is the only
confirmation. Key values are masked in every log line (see :func:`flasher.at.mask`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from flasher.at import DEFAULT_TIMEOUT, ATClient, ATError, ATTimeout, ProtocolError, where
from flasher.bands import parse_band
from flasher.errors import InputError
from flasher.eui import EUI64
from flasher.secrets import Redactor

log = logging.getLogger("flasher.rhf76")


_ID_LINE = re.compile(r"\s*(DevAddr|DevEui|AppEui)\s*,\s*([0-9A-Fa-f]{2}(?::?[0-9A-Fa-f]{2})*)\s*", re.IGNORECASE)
_KEY_ECHO = re.compile(r"\s*APPKEY\s*,?\s*([0-9A-Fa-f ]+?)\s*", re.IGNORECASE)
_DR = re.compile(r"\s*DR(\d{1,2})\s*", re.IGNORECASE)
_BAND_LINE = re.compile(r"\s*([A-Za-z0-9]+)\b.*", re.DOTALL)
_BUSY = re.compile(r"\s*BUSY\s+(\d{1,3})\s*", re.IGNORECASE)  # flasher_otaa: "+AT: BUSY 18"
MAX_BUSY_WAIT = 60  # seconds; flasher_otaa never holds its module longer (a join: 20 s)
_VERSION = re.compile(r"\s*[Vv]?(\d+\.\d+(?:\.\d+)?[0-9A-Za-z.\-]*)\s*")  # 2.1.19, V2.0.10, 2.1

T = TypeVar("T")


class ModuleVerifyError(ATError):
    """What the module echoed or reads back differs from what was written. ``field`` names it."""

    def __init__(self, message: str, *, port=None, command=None, field: str):
        super().__init__(message, port=port, command=command)
        self.field = field


@dataclass(frozen=True)
class ModuleIds:
    """What ``AT+ID`` reports. ``dev_addr`` is 8 upper-case hex digits, no separators."""

    dev_eui: EUI64
    app_eui: EUI64
    dev_addr: str

    def to_json(self) -> dict:
        return {"deveui": self.dev_eui.hex, "appeui": self.app_eui.hex, "devaddr": self.dev_addr}


@dataclass(frozen=True)
class ModuleSettings:
    """What can be read back after :meth:`RHF76.program`. ``band`` upper case, ``mode`` as the module says it."""

    join_eui: EUI64
    mode: str
    band: str
    data_rate: int | None = None


def check_data_rate(dr: int | None) -> int | None:
    if dr is not None and not (isinstance(dr, int) and 0 <= dr <= 15):
        raise InputError(f"data rate {dr!r}: expected DR0..DR15")
    return dr


# --- parsers (pure, fuzzed) ------------------------------------------------------------

def parse_ids(lines: list[str], port: str = "?") -> ModuleIds:
    """The three ``AT+ID`` lines (any order) -> :class:`ModuleIds`."""
    found: dict[str, str] = {}
    for line in lines:
        m = _ID_LINE.fullmatch(line)
        if not m:
            raise ProtocolError(f"{where(port)}: unexpected AT+ID line {line!r}", port=port, command="AT+ID")
        found[m.group(1).lower()] = m.group(2).replace(":", "").upper()
    missing = [k for k, n in (("deveui", 16), ("appeui", 16), ("devaddr", 8)) if len(found.get(k, "")) != n]
    if missing:
        raise ProtocolError(f"{where(port)}: AT+ID answer lacks a valid {', '.join(missing)}", port=port, command="AT+ID")
    return ModuleIds(EUI64(bytes.fromhex(found["deveui"])), EUI64(bytes.fromhex(found["appeui"])), found["devaddr"])


def parse_id_line(line: str, field: str, port: str = "?") -> str:
    """``AppEui, 70:B3:...`` -> ``70B3...`` after checking the field name."""
    m = _ID_LINE.fullmatch(line)
    if not m or m.group(1).lower() != field.lower():
        raise ProtocolError(f"{where(port)}: expected {field} in {line!r}", port=port, command=f"AT+ID={field}")
    return m.group(2).replace(":", "").upper()


def parse_key_echo(line: str, port: str = "?") -> str:
    """``APPKEY 2B7E...`` or 2.0.10's ``APPKEY 2B 7E ...`` -> 32 upper-case hex digits (never logged)."""
    m = _KEY_ECHO.fullmatch(line)
    digits = m.group(1).replace(" ", "").upper() if m else ""
    if len(digits) != 32:
        raise ProtocolError(f"{where(port)}: AT+KEY echo is not an APPKEY of 16 bytes", port=port, command="AT+KEY")
    return digits


def parse_dr_query(lines: list[str], port: str = "?") -> tuple[int, str]:
    """``DR0`` / ``EU868 DR0  SF12 BW125K `` -> (0, "EU868")."""
    if len(lines) < 2:
        raise ProtocolError(f"{where(port)}: AT+DR answered {len(lines)} line(s), expected 2", port=port, command="AT+DR")
    m, b = _DR.fullmatch(lines[0]), _BAND_LINE.fullmatch(lines[1])
    if not m or not b:
        raise ProtocolError(f"{where(port)}: unexpected AT+DR answer {lines[:2]!r}", port=port, command="AT+DR")
    return int(m.group(1)), b.group(1).upper()


def parse_version(line: str, port: str = "?") -> str:
    m = _VERSION.fullmatch(line)
    if not m:
        raise ProtocolError(f"{where(port)}: unexpected AT+VER answer {line!r}", port=port, command="AT+VER")
    return m.group(1)


# --- the module ---------------------------------------------------------------------------

class RHF76:
    """One RHF76 behind a pass-through sketch. Takes an open client; :func:`open_module` opens one."""

    def __init__(self, at: ATClient, *, retries: int = 2):
        self.at = at
        self.retries = retries

    @property
    def port(self) -> str:
        return self.at.port

    def _read(self, cmd: str, parse: Callable[[list[str]], T], *, timeout: float | None = None) -> T:
        """Run an idempotent query, retrying garbled or incomplete answers ``retries`` times."""
        attempt = 0
        while True:
            try:
                return parse(self.at.command(cmd, timeout=timeout))
            except (ATTimeout, ProtocolError) as exc:
                silent = isinstance(exc, ATTimeout) and exc.heard == 0
                if silent or attempt >= self.retries:
                    raise
                attempt += 1
                log.info("port %s: %s; retrying (%d/%d)", self.port, exc, attempt, self.retries)

    def _write(self, cmd: str, *, timeout: float | None = None) -> str:
        return self.at.command(cmd, timeout=timeout)[0].strip()

    def _differs(self, field: str, cmd: str, wrote: str, got: str, how: str = "echoed") -> ModuleVerifyError:
        return ModuleVerifyError(f"{where(self.port)}: {field} {how} {got}, wrote {wrote}", port=self.port,
                                 command=cmd, field=field)

    # --- reads -------------------------------------------------------------------

    def ping(self) -> None:
        """``AT`` -> ``+AT: OK``; retried only if something (garbled) came back.

        A board running ``flasher_otaa`` that is busy with its module (a join takes up to 20 s)
        answers ``+AT: BUSY <seconds>`` and forwards our next line once it is free: ask once more
        and wait that long (at most :data:`MAX_BUSY_WAIT`).
        """
        def ok(lines: list[str]) -> int | None:
            busy = _BUSY.fullmatch(lines[0])
            if busy:
                return int(busy.group(1))
            if lines[0].strip().upper() != "OK":
                raise ProtocolError(f"{where(self.port)}: AT answered {lines[0]!r}, expected OK", port=self.port,
                                    command="AT")
            return None

        busy_for = self._read("AT", ok)
        if busy_for is not None:
            wait = min(busy_for, MAX_BUSY_WAIT) + self.at.timeout
            log.info("port %s: flasher_otaa is busy with its module for up to %d s; waiting", self.port, busy_for)
            if self._read("AT", ok, timeout=wait) is not None:
                raise ProtocolError(f"{where(self.port)}: board still busy with its module after {wait:g} s",
                                    port=self.port, command="AT")

    def read_ids(self) -> ModuleIds:
        """``AT+ID``, read until two readable answers in a row agree on DevEUI, JoinEUI and DevAddr.

        A clean line costs two exchanges. Garbled or incomplete answers are re-read,
        ``retries`` of them at most (``retries + 2`` reads in all); silence is not re-read.
        Raises :class:`ProtocolError` when the reads never agree ("DevEUI reads disagree
        (A, B); check the cable/baud") or when fewer than two answers were readable.
        """
        reads = self.retries + 2
        readable: list[ModuleIds] = []
        last_error: ATError | None = None
        n = 0
        while n < reads and reads - n >= (1 if readable else 2):  # stop once agreement is out of reach
            n += 1
            try:
                ids = parse_ids(self.at.command("AT+ID"), self.port)
            except (ATTimeout, ProtocolError) as exc:
                if isinstance(exc, ATTimeout) and exc.heard == 0:
                    raise  # silence: a second ask will not be answered either
                last_error = exc
                log.info("port %s: AT+ID read %d/%d: %s", self.port, n, reads, exc)
                continue
            if readable and ids == readable[-1]:
                return ids
            if readable:
                log.info("port %s: AT+ID read %d/%d disagrees with the one before", self.port, n, reads)
            readable.append(ids)
        if len(readable) > 1:
            raise ProtocolError(f"{where(self.port)}: {_disagreement(readable)}; check the cable/baud",
                                port=self.port, command="AT+ID")
        if readable:
            raise ProtocolError(f"{where(self.port)}: DevEUI {readable[0].dev_eui.hex} read once, not confirmed "
                                f"({n - 1} of {n} AT+ID answers unreadable); check the cable/baud",
                                port=self.port, command="AT+ID")
        assert last_error is not None  # n >= 1 reads, none readable
        raise last_error

    def version(self) -> str:
        return self._read("AT+VER", lambda lines: parse_version(lines[0], self.port))

    def read_app_eui(self) -> EUI64:
        return self._read("AT+ID=AppEui",
                          lambda lines: EUI64(bytes.fromhex(_check16(parse_id_line(lines[0], "AppEui", self.port),
                                                                       self.port))))

    def read_mode(self) -> str:
        return self._read("AT+MODE", lambda lines: _word(lines[0], "AT+MODE", self.port))

    def read_data_rate(self) -> tuple[int, str]:
        """(data rate, band) from the two-line ``AT+DR`` query."""
        return self._read("AT+DR", lambda lines: parse_dr_query(lines, self.port))

    def read_settings(self) -> ModuleSettings:
        dr, band = self.read_data_rate()
        return ModuleSettings(join_eui=self.read_app_eui(), mode=self.read_mode(), band=band, data_rate=dr)

    # --- writes ------------------------------------------------------------------

    def program(self, join_eui: EUI64, app_key: bytes, band: str = "EU868", data_rate: int | None = None) -> None:
        """Write JoinEUI, AppKey, OTAA mode, band and data rate; check every echo; read back what can be read.

        Raises :class:`ModuleVerifyError` naming the first field that differs.
        """
        join_eui = EUI64.coerce(join_eui, "JoinEUI")
        if not isinstance(app_key, (bytes, bytearray)) or len(app_key) != 16:
            raise InputError("AppKey: expected 16 bytes")
        band = parse_band(band)
        check_data_rate(data_rate)
        Redactor.add(bytes(app_key))
        key_hex = bytes(app_key).hex().upper()

        cmd = f'AT+ID=AppEui,"{join_eui.hex}"'
        got = parse_id_line(self._write(cmd), "AppEui", self.port)
        if got != join_eui.hex:
            raise self._differs("JoinEUI", cmd, join_eui.hex, got)

        cmd = f'AT+KEY=APPKEY,"{key_hex}"'
        if parse_key_echo(self._write(cmd), self.port) != key_hex:
            raise ModuleVerifyError(f"{where(self.port)}: AppKey echo differs from the key written", port=self.port,
                                    command=cmd, field="AppKey")

        for field, cmd, want in (("mode", "AT+MODE=LWOTAA", "LWOTAA"), ("band", f"AT+DR={band}", band)):
            got = _word(self._write(cmd), cmd, self.port)
            if got != want:
                raise self._differs(field, cmd, want, got)
        if data_rate is not None:
            cmd = f"AT+DR=DR{data_rate}"
            m = _DR.fullmatch(self._write(cmd))
            if not m or int(m.group(1)) != data_rate:
                raise self._differs("data rate", cmd, f"DR{data_rate}", m.group(0).strip() if m else "something else")

        s = self.read_settings()
        for field, want, got in (("JoinEUI", join_eui.hex, s.join_eui.hex), ("mode", "LWOTAA", s.mode),
                                 ("band", band, s.band)):
            if want != got:
                raise self._differs(field, "read back", want, got, how="reads back")
        if data_rate is not None and s.data_rate != data_rate:
            raise self._differs("data rate", "AT+DR", f"DR{data_rate}", f"DR{s.data_rate}", how="reads back")
        log.info("port %s: programmed JoinEUI %s, AppKey %s, LWOTAA, %s%s", self.port, join_eui.hex, "********",
                 band, f" DR{data_rate}" if data_rate is not None else "")


def _word(line: str, cmd: str, port: str) -> str:
    """The first word of an answer: ``+DR: EU868`` and ``+DR: EU868 DR0  SF12 BW125K`` both mean EU868."""
    w = (line.split() or [""])[0].upper()
    if not re.fullmatch(r"[A-Z0-9]+", w):
        raise ProtocolError(f"{where(port)}: unexpected answer {line!r} to {cmd}", port=port, command=cmd)
    return w


def _disagreement(reads: list[ModuleIds]) -> str:
    """``DevEUI reads disagree (2CF7..., 2AF7...)``: the first field that differs, values in read order."""
    for field, value in (("DevEUI", lambda i: i.dev_eui.hex), ("JoinEUI", lambda i: i.app_eui.hex),
                         ("DevAddr", lambda i: i.dev_addr)):
        values = list(dict.fromkeys(value(i) for i in reads))
        if len(values) > 1:
            return f"{field} reads disagree ({', '.join(values)})"
    return "AT+ID reads disagree"


def _check16(digits: str, port: str) -> str:
    if len(digits) != 16:
        raise ProtocolError(f"{where(port)}: AppEui {digits!r} is not 8 bytes", port=port, command="AT+ID=AppEui")
    return digits


@contextmanager
def open_module(port: str, timeout: float = DEFAULT_TIMEOUT, retries: int = 2) -> Iterator[RHF76]:
    """Open ``port`` (a device path or pyserial URL), check a module answers ``AT``, yield it, close it."""
    with ATClient.open(port, timeout=timeout) as at:
        module = RHF76(at, retries=retries)
        module.ping()
        yield module


def each_board(ports: list[str], fn: Callable[[str], T], *, workers: int = 8) -> list[tuple[str, T | None, ATError | None]]:
    """Run ``fn(port)`` for every port in parallel; (port, result, error) in the order given.

    Only :class:`ATError` is captured per board; anything else is a bug and propagates.
    """
    def one(port: str):
        try:
            return port, fn(port), None
        except ATError as exc:
            return port, None, exc

    if len(ports) <= 1:
        return [one(p) for p in ports]
    with ThreadPoolExecutor(max_workers=min(workers, len(ports))) as pool:
        return list(pool.map(one, ports))
