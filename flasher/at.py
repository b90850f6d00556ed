"""AT transport: send one command over any pyserial port, collect its answer, type its failures.

The RHF76 answers every command with ``+CMD: ...`` lines and says nothing when
it is done, so a response is complete when its *last expected line* has
arrived (one line for most commands, three for ``AT+ID``, two for an ``AT+DR``
query, ``+JOIN: Done`` ...). Waiting a fixed time instead is slow and fragile.
Reads block on the port's own timeout against a ``time.monotonic()`` deadline:
no sleep loops.

Anything that is not a ``+CMD:`` line of the command we sent (boot noise, an
echoed command, ``+INFO: Input timeout``, stray bytes glued to the front of a
line) is skipped, and the input buffer is flushed before every command, which
is how the client gets back in step after garbage.

A device port is opened exclusively (an advisory ``flock``, pyserial's
``exclusive=True``): a second process gets :class:`PortOpenError` "busy" before
a byte is written. URL handlers without a device behind them (``loop://``,
``socket://``) are opened without it.

Every failure is an :class:`ATError` with a one-line message naming the port
and the command (keys masked): :class:`ATTimeout` for silence,
:class:`PortGone` for an unplug or a port that vanished, :class:`ModuleError`
for ``ERROR(-n)`` (with ``.code`` and the module's meaning), and
:class:`ProtocolError` for answers that do not make sense. A path that is not
a serial port at all (``/dev/null``, a file) is the user's mistake:
:class:`NotSerialPort`, an :class:`~flasher.errors.InputError`.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import select
import sys
import time
from collections.abc import Callable

import serial

from flasher.errors import FlasherError, InputError
from flasher.secrets import MASK, Redactor

log = logging.getLogger("flasher.at")

try:  # pyserial lets termios.error through from tcflush on a hung-up tty
    import termios

    _PORT_ERRORS: tuple[type[BaseException], ...] = (serial.SerialException, OSError, termios.error)
except ImportError:  # Windows
    _PORT_ERRORS = (serial.SerialException, OSError)


if sys.platform.startswith("linux"):  # elsewhere (macOS) poll() may not take a tty
    import fcntl

    class _PolledSerial(serial.Serial):  # type: ignore[misc,valid-type]
        """pyserial's POSIX port, waiting with poll() instead of select().

        select() refuses a descriptor numbered 1024 or more, and each open port is five
        (the tty and two abort pipes): a run with a few hundred boards has such numbers.
        Since this port does not need select(), its descriptors move above 1024 where
        the limit on open files allows, leaving the numbers below to the sockets of the
        Azure SDK, whose MQTT client (paho) does wait with select().
        Reads also take their deadline as an argument, so a line reader need not reset
        the port's timeout (a termios round trip) before every read.
        """

        def open(self) -> None:
            super().open()
            for name in ("fd", "pipe_abort_read_r", "pipe_abort_read_w", "pipe_abort_write_r", "pipe_abort_write_w"):
                setattr(self, name, _above_select(getattr(self, name)))

        def read(self, size: int = 1) -> bytes:
            if not self.is_open:
                raise serial.PortNotOpenError()
            return self.read_within(size, self._timeout)

        def read_within(self, size: int, timeout: float | None) -> bytes:
            """Up to ``size`` bytes, returning early with what came within ``timeout`` seconds (None: wait)."""
            deadline = None if timeout is None else time.monotonic() + timeout
            poller = select.poll()
            poller.register(self.fd, select.POLLIN)
            poller.register(self.pipe_abort_read_r, select.POLLIN)
            out = bytearray()
            while len(out) < size:
                ready = dict(poller.poll(_ms(deadline)))
                if self.pipe_abort_read_r in ready:  # cancel_read()
                    os.read(self.pipe_abort_read_r, 1000)
                    break
                if not ready:
                    break
                try:
                    chunk = os.read(self.fd, size - len(out))
                except OSError as exc:
                    if exc.errno in _RETRY:
                        continue
                    raise serial.SerialException(f"read failed: {exc}") from None
                if not chunk:  # as pyserial says it: Linux shows a disconnected device as readable and empty
                    raise serial.SerialException("device reports readiness to read but returned no data "
                                                 "(device disconnected or multiple access on port?)")
                out += chunk
                if deadline is not None and time.monotonic() >= deadline:
                    break
            return bytes(out)

        def write(self, data) -> int:  # type: ignore[override]
            if not self.is_open:
                raise serial.PortNotOpenError()
            view = memoryview(serial.to_bytes(data))
            total, timeout = len(view), self._write_timeout
            deadline = None if timeout is None else time.monotonic() + timeout
            poller = select.poll()
            poller.register(self.fd, select.POLLOUT)
            poller.register(self.pipe_abort_write_r, select.POLLIN)
            while view:
                try:
                    view = view[os.write(self.fd, view):]
                except OSError as exc:
                    if exc.errno not in _RETRY:
                        raise serial.SerialException(f"write failed: {exc}") from None
                if not view or timeout == 0:
                    break
                ready = dict(poller.poll(_ms(deadline)))
                if self.pipe_abort_write_r in ready:  # cancel_write()
                    os.read(self.pipe_abort_write_r, 1000)
                    break
                if not ready:
                    raise serial.SerialTimeoutException("Write timeout")
            return total - len(view)

    _RETRY = (errno.EAGAIN, errno.EALREADY, errno.EWOULDBLOCK, errno.EINPROGRESS, errno.EINTR)

    SELECT_LIMIT = 1024  # FD_SETSIZE: select() takes descriptors below this

    def _above_select(fd: int) -> int:
        """``fd`` renumbered to 1024 or above (and closed where it was), or as it is if the open files limit is lower."""
        try:
            moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, SELECT_LIMIT)
        except OSError:  # EINVAL/EMFILE: no room up there; below is fine for a small run
            return fd
        os.close(fd)
        return moved

    def _ms(deadline: float | None) -> int | None:
        return None if deadline is None else max(0, math.ceil((deadline - time.monotonic()) * 1000))
else:  # pyserial's own
    _PolledSerial = serial.Serial  # type: ignore[misc,assignment]

DEFAULT_TIMEOUT = 2.0
BAUDRATE = 9600  # Serial1 to the module; the SAMD21's USB CDC side ignores it
MAX_COMMAND = 528  # the module's line limit (ERROR(-21) beyond it)
MAX_PENDING = 4096  # bytes without a newline before we drop them as garbage

#: ERROR(-n) codes and what they mean (RHF76 AT command manual, firmware 2.0.x/2.1.x).
ERROR_MEANINGS: dict[int, str] = {
    -1: "invalid parameter",
    -10: "unknown command",
    -11: "wrong command format",
    -12: "command unavailable in the current mode",
    -20: "more than 15 parameters",
    -21: "command line longer than 528 bytes",
    -22: "no <LF> before the input timeout",
    -23: "invalid character in the command",
}

#: Last line of a multi-line answer for commands whose length varies.
JOIN_FINAL = {"done", "not in otaa mode", "joined already", "lorawan modem is busy"}
MSG_FINAL = {"done", "please join network first", "lorawan modem is busy"}
MSG_COMMANDS = {"MSG", "CMSG", "MSGHEX", "CMSGHEX"}

_COMMAND = re.compile(r"\s*AT(?:\+([A-Za-z][A-Za-z0-9_]*))?(.*)", re.IGNORECASE | re.DOTALL)
# ``search``, not ``match``: boot garbage glued to the front of a line is skipped.
_RESPONSE = re.compile(r"\+([A-Za-z][A-Za-z0-9_]{0,31}):[ ]?(.*)", re.DOTALL)
_ERROR = re.compile(r"ERROR\s*\(\s*(-?\d{1,6})\s*\)", re.IGNORECASE)
# APPKEY,"2B7E..." / +KEY: APPKEY 2B 7E ... (2.0.10 echo) / NWKSKEY / APPSKEY
_KEY_VALUE = re.compile(r"((?:APP|NWKS|APPS)KEY\W{0,3})([0-9A-Fa-f]{2}(?:[ :]?[0-9A-Fa-f]{2})*)", re.IGNORECASE)


# --- errors ----------------------------------------------------------------------

class ATError(FlasherError):
    """Any failure talking to a module; the message names the port (and command)."""

    def __init__(self, message: str, *, port: str | None = None, command: str | None = None):
        super().__init__(message)
        self.port = port
        self.command = command


class ATTimeout(ATError):
    """No complete answer in time. ``heard`` counts the bytes that did arrive: 0 means silence."""

    def __init__(self, message: str, *, port=None, command=None, heard: int = 0):
        super().__init__(message, port=port, command=command)
        self.heard = heard


class PortGone(ATError):
    """The port vanished: unplugged, re-enumerated, or an OS error mid-command."""


class PortOpenError(ATError):
    """The port could not be opened (no such device, busy, permission)."""


class NotSerialPort(InputError):
    """The name given as a port is not a serial port (``/dev/null``, a regular file, a directory): exit 2."""

    def __init__(self, message: str, *, port: str):
        super().__init__(message)
        self.port = port


class ModuleError(ATError):
    """The module answered ``+CMD: ERROR(code)``."""

    def __init__(self, message: str, *, port=None, command=None, code: int, meaning: str):
        super().__init__(message, port=port, command=command)
        self.code = code
        self.meaning = meaning


class ProtocolError(ATError):
    """An answer arrived but makes no sense (garbled, wrong shape, unexpected value)."""


# --- pure helpers (shared with the fuzz tests) -------------------------------------

def where(port: str) -> str:
    """How every message names a port: ``port '/dev/ttyACM0'``."""
    return f"port {port!r}"


def check_timeout(value: object, what: str = "timeout") -> float:
    """A timeout in seconds, finite and above 0, else :class:`InputError` naming ``what``.

    Accepts numbers and numeric strings (a config file's ``"2.5"``); refuses nan, inf, 0,
    negatives, booleans and anything else.
    """
    try:
        if isinstance(value, bool):
            raise TypeError
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"{what} {value!r}: expected a number of seconds") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise InputError(f"{what} {value!r}: expected a finite number of seconds above 0")
    return seconds


def mask(text: str) -> str:
    """Mask key values in AT traffic, whatever the spelling, plus every registered secret."""
    return Redactor.scrub(_KEY_VALUE.sub(lambda m: m.group(1) + MASK, text))


def command_name(cmd: str) -> str:
    """``AT+id=DevEui`` -> ``ID``; plain ``AT`` -> ``AT``: the name the module answers with."""
    m = _COMMAND.fullmatch(cmd)
    if not m:
        raise ValueError(f"not an AT command: {cmd!r}")
    return (m.group(1) or "AT").upper()


def is_query(cmd: str) -> bool:
    """``AT+CMD``, ``AT+CMD?`` and ``AT+CMD=?`` all mean "tell me"."""
    m = _COMMAND.fullmatch(cmd)
    return m is not None and m.group(2).strip() in ("", "?", "=?")


Final = Callable[[list[str]], bool]


class _Count:
    """Complete after ``n`` lines; knowing ``n`` lets a garbled line end the wait early."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, lines: list[str]) -> bool:
        return len(lines) >= self.n


def _last_in(words: set[str]) -> Final:
    return lambda lines: bool(lines) and lines[-1].strip().lower() in words


def default_final(cmd: str) -> Final:
    """When is the answer to ``cmd`` complete? Decided per command, from the dialect."""
    name = command_name(cmd)
    if name == "ID" and is_query(cmd):
        return _Count(3)
    if name == "DR" and is_query(cmd):
        return _Count(2)
    if name == "JOIN":
        return _last_in(JOIN_FINAL)
    if name in MSG_COMMANDS:
        return _last_in(MSG_FINAL)
    return _Count(1)


def _printable(text: str) -> bool:
    return all(" " <= c <= "~" or c == "\t" for c in text)


class ResponseCollector:
    """Feed raw lines; keeps the payloads of ``+NAME:`` lines until the answer is complete.

    Pure (no I/O) so the parser can be fuzzed. Raises only :class:`ATError` subclasses.
    """

    def __init__(self, cmd: str, final: Final | int | None = None, *, port: str = "?"):
        self.name = command_name(cmd)
        self.cmd = cmd
        self.port = port
        if final is None:
            final = default_final(cmd)
        elif isinstance(final, int):
            final = _Count(final)
        self.final: Final = final
        self.lines: list[str] = []
        self.skipped = 0
        self.garbled = 0

    def feed(self, raw: bytes) -> bool:
        """One line without its ``\\n``. True when the answer is complete."""
        text = raw.decode("utf-8", "replace").strip("\r\n\x00 ")
        m = _RESPONSE.search(text)
        name = m.group(1).upper() if m else None
        # Unknown commands are answered as "+AT: ERROR(-10)", whatever the name.
        if m and name in (self.name, "AT"):
            data = m.group(2).rstrip("\r")
            err = _ERROR.fullmatch(data.strip())
            if err:
                code = int(err.group(1))
                meaning = ERROR_MEANINGS.get(code, "undocumented error")
                raise ModuleError(f"{where(self.port)}: {mask(self.cmd)} failed: module error {code} ({meaning})",
                                  port=self.port, command=self.cmd, code=code, meaning=meaning)
            if name == self.name:
                if not _printable(data):
                    return self._garbled()
                self.lines.append(data)
                return bool(self.final(self.lines))
        self.skipped += 1
        if "+" in text and not _printable(text[m.start():] if m else text):
            # A response line with mangled bytes (the '+' survived): it took the place of one of
            # ours. Boot junk without a '+', or glued to a well-formed line of another command
            # ("\x01+INFO: Input timeout"), is just skipped.
            return self._garbled()
        return False

    def _garbled(self) -> bool:
        self.garbled += 1
        n = getattr(self.final, "n", None)
        if n is not None and len(self.lines) + self.garbled >= n:
            raise ProtocolError(f"{where(self.port)}: garbled answer to {mask(self.cmd)}", port=self.port,
                                command=self.cmd)
        return False


# --- the client ------------------------------------------------------------------------

class ATClient:
    """Line protocol over an open pyserial port; use :meth:`open` to open one by name or URL."""

    def __init__(self, ser: serial.SerialBase, port: str | None = None, *, timeout: float = DEFAULT_TIMEOUT):
        self._ser = ser
        self.port = port or getattr(ser, "port", None) or "?"
        self.timeout = timeout
        self._buf = bytearray()

    @classmethod
    def open(cls, port: str, *, timeout: float = DEFAULT_TIMEOUT, baudrate: int = BAUDRATE) -> ATClient:
        """Open ``/dev/ttyACM0``, ``COM5``, a pty path or any pyserial URL (``loop://``, ``socket://``).

        A device is opened exclusively: if another process holds it, :class:`PortOpenError`
        ("busy") is raised before anything is written or reconfigured.
        """
        timeout = check_timeout(timeout, "AT timeout")
        try:
            if "://" in port:
                ser = serial.serial_for_url(port, baudrate=baudrate, timeout=timeout, write_timeout=timeout,
                                            do_not_open=True)
            else:  # a device: what serial_for_url would make, waiting with poll() (see _PolledSerial)
                ser = _PolledSerial(None, baudrate=baudrate, timeout=timeout, write_timeout=timeout)
                ser.port = port
            if isinstance(ser, serial.Serial):  # a device (also behind hwgrep://, spy://): lock it
                ser.exclusive = True
            ser.open()
        except (serial.SerialException, OSError, ValueError) as exc:
            raise _open_error(port, exc) from None
        return cls(ser, port, timeout=timeout)

    def close(self) -> None:
        try:
            self._ser.close()
        except _PORT_ERRORS as exc:  # closing an unplugged port
            log.debug("port %s: close: %s", self.port, _why(exc))

    def __enter__(self) -> ATClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------

    def command(self, cmd: str, *, timeout: float | None = None, final: Final | int | None = None) -> list[str]:
        """Send ``cmd`` and return the payloads of its ``+CMD:`` lines once the answer is complete.

        ``final`` overrides completion: a line count or a predicate over the payloads so far.
        """
        if len(cmd) + 2 > MAX_COMMAND:
            raise ProtocolError(f"{where(self.port)}: {mask(cmd[:40])}...: longer than {MAX_COMMAND} bytes",
                                port=self.port, command=cmd)
        try:
            data = cmd.encode("ascii") + b"\r\n"
        except UnicodeEncodeError:
            raise ProtocolError(f"{where(self.port)}: {mask(cmd)!r}: not ASCII", port=self.port, command=cmd) from None
        limit = self.timeout if timeout is None else check_timeout(timeout, "AT timeout")
        collector = ResponseCollector(cmd, final, port=self.port)
        shown = mask(cmd)
        heard = 0
        deadline = time.monotonic() + limit
        try:
            self._ser.reset_input_buffer()  # stale lines of an earlier, abandoned command
            self._buf.clear()
            debug = log.isEnabledFor(logging.DEBUG)  # masking every line costs more than the line itself
            if debug:
                log.debug("%s > %s", self.port, shown)
            self._ser.write(data)
            while True:
                line = self._read_line(deadline)
                if line is None:
                    break
                heard += len(line) + 1
                if debug:
                    log.debug("%s < %s", self.port, mask(line.decode("utf-8", "replace").rstrip("\r")))
                if collector.feed(line):
                    return collector.lines
        except serial.SerialTimeoutException:
            raise ATTimeout(f"{where(self.port)}: could not send {shown} within {limit:g} s (port blocked)",
                            port=self.port, command=cmd) from None
        except _PORT_ERRORS as exc:
            raise PortGone(f"{where(self.port)}: lost during {shown} ({_why(exc)}); was the board unplugged?",
                           port=self.port, command=cmd) from None
        heard += len(self._buf)
        if collector.garbled:
            raise ProtocolError(f"{where(self.port)}: garbled answer to {shown} within {limit:g} s", port=self.port,
                                command=cmd)
        if collector.lines:
            n = len(collector.lines)
            why = f"incomplete answer to {shown} within {limit:g} s ({n} line{'s' if n > 1 else ''})"
        elif heard:
            why = f"no answer to {shown} within {limit:g} s (only unrelated output)"
        else:
            why = f"no answer to {shown} within {limit:g} s (is the pass-through sketch running?)"
        raise ATTimeout(f"{where(self.port)}: {why}", port=self.port, command=cmd, heard=heard)

    def _read_line(self, deadline: float) -> bytes | None:
        """Next line (without ``\\n``) or None at the deadline; blocks on the port's own timeout."""
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[:i])
                del self._buf[: i + 1]
                return line
            if len(self._buf) > MAX_PENDING:
                log.debug("%s: dropping %d bytes without a newline", self.port, len(self._buf))
                self._buf.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            want = max(1, self._ser.in_waiting)
            if hasattr(self._ser, "read_within"):
                chunk = self._ser.read_within(want, remaining)
            else:
                self._ser.timeout = remaining
                chunk = self._ser.read(want)
            self._buf += chunk


def _why(exc: BaseException) -> str:
    """The OS's words, on one line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    return text


def _errno(exc: BaseException) -> int | None:
    """The OS error number behind a pyserial exception (it wraps termios.error without one)."""
    for e in (exc, exc.__cause__, exc.__context__):
        if e is None:
            continue
        code = getattr(e, "errno", None)
        if isinstance(code, int):
            return code
        if e.args and isinstance(e.args[0], int):  # termios.error(25, 'Inappropriate ioctl for device')
            return e.args[0]
    return None


def _open_error(port: str, exc: BaseException) -> PortOpenError | NotSerialPort:
    """pyserial wraps the OS error in its own words twice over; say what the user can act on."""
    code = _errno(exc)
    if code in (errno.ENOTTY, errno.EISDIR, errno.ENOTDIR):
        what = "a directory" if code == errno.EISDIR else "not a terminal device"
        return NotSerialPort(f"{where(port)}: not a serial port ({what}); see `flasher ports`", port=port)
    if code in (errno.EBUSY, errno.EAGAIN, errno.EWOULDBLOCK):
        return PortOpenError(f"{where(port)}: busy (another process has it open)", port=port)
    if code == errno.ENOENT:
        why = "no such device; see `flasher ports`"
    elif code in (errno.EACCES, errno.EPERM):
        why = "permission denied; on Linux join the dialout group"
    else:
        why = _why(exc)
    return PortOpenError(f"{where(port)}: cannot open ({why})", port=port)
