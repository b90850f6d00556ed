"""Showing boards move through their steps.

The pipeline emits one ``BoardEvent`` each time a board's step changes state; a ``Reporter`` shows them. On a
terminal: a live table, one row per board, redrawn in place and cropped to the terminal so it always occupies exactly
the lines it counts. On a pipe or a file: one plain line per step outcome, so a log still tells the story without escape
codes. For machines: one JSON object per event. Whichever, it goes to stderr; stdout is for data.

Events arrive from many board threads at once, so every reporter serialises its writes. A reporter whose stream breaks
(a closed pipe, a hung-up terminal) goes quiet instead of failing the board that happened to be reporting.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import unicodedata
from collections import deque
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Protocol, TextIO

from flasher.states import Verdict

DONE = "done"  # the step name of a board's last event


class StepState(StrEnum):
    RUNNING = "running"
    OK = "ok"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class BoardEvent:
    """One board's step changed state. Immutable because it crosses threads."""

    port: str
    deveui: str | None
    step: str  # a pipeline step name, or "done" when the board finished
    state: StepState
    detail: str = ""

    def __post_init__(self) -> None:
        # "ok" and StepState.OK are the same event; a typo ("sucess") fails here, where it was made.
        object.__setattr__(self, "state", StepState(self.state))


class Reporter(Protocol):
    def emit(self, event: BoardEvent) -> None: ...

    def close(self) -> None: ...


STATE_MARK = {StepState.RUNNING: "…", StepState.OK: "ok", StepState.SKIPPED: "–", StepState.FAILED: "FAILED"}


class _Base:
    """What every reporter shares: a write that cannot fail a board."""

    stream: TextIO
    _dead = False

    def emit(self, event: BoardEvent) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def _write(self, text: str) -> None:
        if self._dead:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # the reader went away (EPIPE, EIO, closed file): showing progress is over
            self._dead = True


class NullReporter(_Base):
    """``--quiet``: nothing at all."""

    def emit(self, event: BoardEvent) -> None:
        pass


class LineReporter(_Base):
    """The pipe-friendly form: one line per step outcome (running steps are not outcomes)."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()

    def emit(self, event: BoardEvent) -> None:
        if event.state is StepState.RUNNING:
            return
        line = f"{event.deveui or event.port}: {event.step}: {event.state}{': ' + event.detail if event.detail else ''}\n"
        with self._lock:
            self._write(line)


class JsonReporter(_Base):
    """One JSON object per event, running ones included, with ``t`` in seconds since the reporter started."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()
        self._t0 = time.monotonic()

    def emit(self, event: BoardEvent) -> None:
        with self._lock:  # taken before the clock, so ``t`` never goes backwards between lines
            t = round(time.monotonic() - self._t0, 3)
            self._write(json.dumps({"port": event.port, "deveui": event.deveui, "step": event.step,
                                    "state": event.state.value, "detail": event.detail, "t": t}) + "\n")


# --- fitting text to a terminal --------------------------------------------------------------------------------------

def _terminal_size(stream: TextIO) -> tuple[int, int]:
    """(columns, lines) of the terminal behind ``stream`` itself (stdout may be a pipe while stderr is the terminal).

    80×24 when it is not a terminal or reports 0 (a pty nobody sized).
    """
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError):
        return 80, 24
    return size.columns or 80, size.lines or 24


def _char_width(ch: str) -> int:
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in "WF" else 1


def _text_width(text: str) -> int:
    return sum(_char_width(c) for c in text)


def _clean(text: str) -> str:
    """One line of printable text: a newline or escape in an error message must not move the cursor."""
    return "".join(" " if unicodedata.category(c)[0] == "C" else c for c in text)


def _fit(text: str, width: int, *, mark: str = "…", keep_end: bool = False) -> str:
    """``text`` cleaned and cut to ``width`` columns; ``mark`` shows where it was cut (at the start if ``keep_end``)."""
    text = _clean(text)
    if _text_width(text) <= width:
        return text
    room = width - _text_width(mark)
    if room < 0:
        return ""
    kept: list[str] = []
    for ch in reversed(text) if keep_end else text:
        room -= _char_width(ch)
        if room < 0:
            break
        kept.append(ch)
    return mark + "".join(reversed(kept)) if keep_end else "".join(kept) + mark


def _cell(text: str, width: int, *, keep_end: bool = False, right: bool = False) -> str:
    text = _fit(text, width, keep_end=keep_end)
    pad = " " * (width - _text_width(text))
    return pad + text if right else text + pad


def _clock(secs: float) -> str:
    if secs < 999.95:
        return f"{secs:.1f}s"
    if secs < 6000:
        return f"{int(secs // 60)}m{int(secs % 60):02d}s"
    return f"{secs / 3600:.1f}h"


# --- the live table ----------------------------------------------------------------------------------------------------

@dataclass(slots=True)
class _Row:
    deveui: str | None
    step: str
    state: StepState
    detail: str
    t0: float
    t1: float | None = None  # set when the board finished (done or failed): its clock stops

    def rank(self) -> int:
        """Which rows to keep when the terminal is too short: active, then failed, then finished."""
        if self.t1 is None:
            return 0
        return 1 if self.state is StepState.FAILED else 2


class TableReporter(_Base):
    """The live table on a terminal: one row per board, redrawn in place.

    Every line is cut to one column less than the terminal's current width (so no terminal wraps it, whatever it does
    in its last column) and the live table is cut to the terminal's height, so moving the cursor up by the number of
    lines drawn always lands on the header. A ticker thread redraws while a board is active, so the clocks move, and
    whenever the terminal's size changed: SIGWINCH only reaches the main thread, so asking on each tick is the portable
    way. The final draw on ``close`` shows every board and leaves the cursor on a fresh line below the table.
    """

    STEP_W, STATE_W, TIME_W, EUI_W = 8, 6, 6, 16
    FIXED = EUI_W + STEP_W + STATE_W + TIME_W + 6  # the columns besides port and detail, separators included
    MIN_DETAIL, MIN_PORT = 20, 8

    def __init__(self, stream: TextIO | None = None, *, tick: float = 0.25):
        self.stream = stream or sys.stderr
        self.tick = tick  # seconds between the ticker's looks at the clocks and the terminal size
        self._rows: dict[str, _Row] = {}
        self._lock = threading.Lock()
        self._drawn = 0  # lines the last draw occupies, the cursor being on the line below them
        self._size: tuple[int, int] | None = None  # the terminal size the last draw was made for
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._closed = False

    def emit(self, event: BoardEvent) -> None:
        with self._lock:
            if self._closed:
                return
            now = time.monotonic()
            row = self._rows.get(event.port)
            if row is None:
                row = self._rows[event.port] = _Row(event.deveui, event.step, event.state, event.detail, now)
            row.deveui = event.deveui or row.deveui
            row.step, row.state, row.detail = event.step, event.state, event.detail
            row.t1 = now if event.step == DONE or event.state is StepState.FAILED else None
            self._draw()
            if self._ticker is None:
                self._ticker = threading.Thread(target=self._run_ticker, name="progress-table", daemon=True)
                self._ticker.start()

    def close(self) -> None:
        """Stop and join the ticker, then leave the final screen (once, however often it is called)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            ticker = self._ticker
        self._stop.set()
        if ticker is not None:
            ticker.join()
        with self._lock:
            self._final_draw()

    def _final_draw(self) -> None:
        if self._rows:
            self._draw(final=True)

    def _moving(self) -> bool:
        """Whether a clock on screen is running, so the ticker must redraw."""
        return any(r.t1 is None for r in self._rows.values())

    def _run_ticker(self) -> None:
        while not self._stop.wait(self.tick):
            with self._lock:
                if self._dead:
                    return
                if self._moving() or _terminal_size(self.stream) != self._size:
                    self._draw()

    def _draw(self, final: bool = False) -> None:
        size = _terminal_size(self.stream)
        lines = self._lines(*size, final=final)
        out = []
        if self._drawn:
            out.append(f"\x1b[{self._drawn}F")
            if size != self._size or len(lines) < self._drawn:
                out.append("\x1b[J")  # the old lines were laid out for another size: clear them all
        out.extend(f"\x1b[2K{line}\n" for line in lines)
        self._write("".join(out))
        self._drawn, self._size = len(lines), size

    def _lines(self, columns: int, height: int, *, final: bool) -> list[str]:
        width = max(1, columns - 1)
        now = time.monotonic()
        rows = sorted(self._rows.items())
        port_w = max(self.MIN_PORT, min(max(len(p) for p, _ in rows), width - self.FIXED - self.MIN_DETAIL))
        detail_w = width - self.FIXED - port_w
        header = (f"{_cell('PORT', port_w)} {_cell('DEVEUI', self.EUI_W)} {_cell('STEP', self.STEP_W)} "
                  f"{_cell('STATE', self.STATE_W)} {_cell('TIME', self.TIME_W, right=True)}  DETAIL")
        hidden: list[_Row] = []
        room = max(0, height - 2)  # rows that fit beside the header, leaving the cursor's line
        if not final and len(rows) > room:  # keep the rows that matter most, in port order; count the rest
            keep = set(sorted(range(len(rows)), key=lambda i: (rows[i][1].rank(), i))[:max(0, room - 1)])
            hidden = [r for i, (_, r) in enumerate(rows) if i not in keep]
            rows = [pr for i, pr in enumerate(rows) if i in keep]
        lines = [header]
        for port, row in rows:
            line = (f"{_cell(port, port_w, keep_end=True)} {_cell(row.deveui or '?', self.EUI_W)} "
                    f"{_cell(row.step, self.STEP_W)} {_cell(STATE_MARK[row.state], self.STATE_W)} "
                    f"{_cell(_clock((row.t1 or now) - row.t0), self.TIME_W, right=True)}")
            if row.detail and detail_w > 0:
                line += "  " + _fit(row.detail, detail_w)
            lines.append(line)
        if hidden:
            counts = [(sum(r.rank() == k for r in hidden), name) for k, name in ((0, "active"), (1, "failed"), (2, "finished"))]
            lines.append(f"+{len(hidden)} more: " + ", ".join(f"{n} {name}" for n, name in counts if n))
        return [_fit(line, width, mark="").rstrip() for line in lines]


# --- station mode ------------------------------------------------------------------------------------------------------

class StationKind(StrEnum):
    READY = "ready"            # watching for boards
    PLUGGED = "plugged"        # a board's port appeared (it starts once the port has settled)
    STARTED = "started"        # its run through the pipeline began
    UNPLUGGED = "unplugged"    # its port went away
    VERDICT = "verdict"        # the station is done with it: see ``verdict``
    STOPPING = "stopping"      # Ctrl-C/SIGTERM: boards finish their current step
    TALLY = "tally"            # the last event: the boards' final count


@dataclass(frozen=True, slots=True)
class Tally:
    """Boards by their last verdict: a board that failed, was replugged and then finished counts once, as done."""

    done: int = 0
    failed: int = 0
    already_done: int = 0
    unplugged: int = 0
    stopped: int = 0

    @property
    def ok(self) -> bool:
        return not (self.failed or self.unplugged or self.stopped)

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        parts = [f"{self.done} done", f"{self.failed} failed", f"{self.already_done} already done"]
        parts += [f"{self.unplugged} unplugged mid-way"] if self.unplugged else []
        parts += [f"{self.stopped} stopped"] if self.stopped else []
        return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class StationEvent:
    """Something the station saw or decided about one board (or, with ``port`` None, about the whole bench)."""

    kind: StationKind
    port: str | None = None
    serial_number: str | None = None
    deveui: str | None = None
    verdict: Verdict | None = None
    step: str | None = None      # where the board stopped or failed
    detail: str = ""
    seconds: float | None = None
    tally: Tally | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", StationKind(self.kind))
        if self.verdict is not None:
            object.__setattr__(self, "verdict", Verdict(self.verdict))

    @property
    def who(self) -> str:
        return self.deveui or self.port or "station"


class StationReporter(Protocol):
    def emit(self, event: BoardEvent | StationEvent) -> None: ...

    def close(self) -> None: ...


class StationLines(_Base):
    """Without a terminal: one line per event, ``<DevEUI or port>: <what>: <detail>``, for a log or a stack light."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()

    def emit(self, event: BoardEvent | StationEvent) -> None:
        if isinstance(event, BoardEvent):
            if event.state is StepState.RUNNING:
                return
            line = f"{event.deveui or event.port}: {event.step}: {event.state}{': ' + event.detail if event.detail else ''}"
        elif event.kind is StationKind.VERDICT:
            assert event.verdict is not None
            what = [str(event.verdict)] + ([event.step] if event.step and event.verdict is not Verdict.DONE else [])
            line = f"{event.who}: verdict: {': '.join(what)}{': ' + event.detail if event.detail else ''}"
        elif event.kind is StationKind.TALLY:
            assert event.tally is not None
            line = f"station: tally: {event.tally.text()}"
        else:
            line = f"{event.who}: {event.kind}{': ' + event.detail if event.detail else ''}"
        with self._lock:
            self._write(_clean(line) + "\n")


class StationJson(_Base):
    """``--json``: one object per event, every key always present. Step events are ``{"event": "step", ...}`` with the
    fields ``provision``'s JSON progress has; station events add ``serial_number``, ``verdict``, ``seconds`` and
    ``tally``."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self._lock = threading.Lock()
        self._t0 = time.monotonic()

    def emit(self, event: BoardEvent | StationEvent) -> None:
        obj: dict[str, object]
        if isinstance(event, BoardEvent):
            obj = {"event": "step", "port": event.port, "deveui": event.deveui, "step": event.step,
                   "state": event.state.value, "detail": event.detail}
        else:
            obj = {"event": event.kind.value, "port": event.port, "serial_number": event.serial_number,
                   "deveui": event.deveui, "verdict": event.verdict.value if event.verdict else None,
                   "step": event.step, "detail": event.detail,
                   "seconds": None if event.seconds is None else round(event.seconds, 3),
                   "tally": event.tally.to_dict() if event.tally else None}
        with self._lock:
            obj["t"] = round(time.monotonic() - self._t0, 3)
            self._write(json.dumps(obj) + "\n")


class StationTee:
    """Every event to several reporters (``--json`` on stdout and the screen on the terminal)."""

    def __init__(self, *reporters: StationReporter):
        self.reporters = reporters

    def emit(self, event: BoardEvent | StationEvent) -> None:
        for r in self.reporters:
            r.emit(event)

    def close(self) -> None:
        for r in self.reporters:
            r.close()


# what a verdict looks like on the screen: a word in a coloured block, readable from across the bench
VERDICT_LOOK = {
    Verdict.DONE: ("DONE", "\x1b[1;30;42m"),           # black on green
    Verdict.ALREADY_DONE: ("ALREADY", "\x1b[1;30;46m"),  # black on cyan
    Verdict.FAILED: ("FAILED", "\x1b[1;97;41m"),        # white on red
    Verdict.UNPLUGGED: ("UNPLUGGED", "\x1b[1;30;43m"),  # black on yellow
    Verdict.STOPPED: ("STOPPED", "\x1b[1;97;45m"),      # white on magenta
}
BELLS = {Verdict.DONE: 1, Verdict.ALREADY_DONE: 1, Verdict.FAILED: 3, Verdict.UNPLUGGED: 0, Verdict.STOPPED: 0}
RESET, BOLD = "\x1b[0m", "\x1b[1m"


@dataclass(slots=True)
class _Attached:
    serial_number: str | None
    deveui: str | None
    step: str
    detail: str
    t0: float
    verdict: Verdict | None = None
    t1: float | None = None


@dataclass(frozen=True, slots=True)
class _Finished:
    at: str          # wall-clock time of the verdict
    who: str
    verdict: Verdict
    step: str | None
    seconds: float | None
    detail: str


class StationScreen(TableReporter):
    """The bench screen: the tally on top, one row per board attached now, then the last boards finished.

    Each row starts with its verdict in a coloured block (green DONE, red FAILED, …) and a finished board rings the
    terminal bell (once when done, three times when it failed) unless ``bell`` is off. Drawn in place like the
    provision table (cut to the terminal's width and height, redrawn on resize), and kept when the station stops.
    """

    VERDICT_W = 11
    LAST = 5

    def __init__(self, stream: TextIO | None = None, *, bell: bool = True, tick: float = 0.25):
        super().__init__(stream, tick=tick)
        self.bell = bell
        self._attached: dict[str, _Attached] = {}
        self._finished: deque[_Finished] = deque(maxlen=self.LAST)
        self._tally = Tally()
        self._banner = "plug boards in; Ctrl-C to stop"
        self._started = False

    def emit(self, event: BoardEvent | StationEvent) -> None:  # type: ignore[override]
        with self._lock:
            if self._closed:
                return
            now = time.monotonic()
            bells = 0
            if isinstance(event, BoardEvent):
                row = self._attached.get(event.port)
                if row is None:  # the last words of a board already unplugged: it is in "last finished" soon
                    return
                row.deveui = event.deveui or row.deveui
                row.step = event.step
                row.detail = event.detail if event.state is not StepState.OK or event.step == DONE else \
                    f"{event.step} ok{': ' + event.detail if event.detail else ''}"
            else:
                bells = self._station_event(event, now)
            self._started = True
            self._draw()
            if bells and self.bell:
                self._write("\a" * bells)
            if self._ticker is None:
                self._ticker = threading.Thread(target=self._run_ticker, name="station-screen", daemon=True)
                self._ticker.start()

    def _station_event(self, event: StationEvent, now: float) -> int:
        kind, port = event.kind, event.port or ""
        if kind is StationKind.PLUGGED:
            self._attached[port] = _Attached(event.serial_number, event.deveui, "settling", event.detail, now)
        elif kind is StationKind.STARTED and port in self._attached:
            row = self._attached[port]
            row.step, row.detail, row.t0, row.verdict, row.t1 = "start", event.detail, now, None, None
        elif kind is StationKind.UNPLUGGED:
            self._attached.pop(port, None)
        elif kind is StationKind.VERDICT:
            assert event.verdict is not None
            ended = self._attached.get(port)
            if ended is not None:
                ended.verdict, ended.t1, ended.detail = event.verdict, now, event.detail
                ended.deveui = event.deveui or ended.deveui
            self._finished.appendleft(_Finished(time.strftime("%H:%M:%S"), event.who, event.verdict, event.step,
                                                event.seconds, event.detail))
            if event.verdict is Verdict.UNPLUGGED:
                self._attached.pop(port, None)
        elif kind is StationKind.STOPPING:
            self._banner = "stopping: each board finishes its current step"
        elif kind is StationKind.TALLY:
            self._banner = "stopped"
        if event.tally is not None:
            self._tally = event.tally
        return BELLS[event.verdict] if kind is StationKind.VERDICT and event.verdict else 0

    def _final_draw(self) -> None:
        if self._started:
            self._draw(final=True)
            if self._banner == "stopped":  # the tally once more, as plain text, for the scrollback and a log
                self._write(f"station: {self._tally.text()}\n")

    def _moving(self) -> bool:
        return any(r.t1 is None for r in self._attached.values())

    def _verdict_cell(self, verdict: Verdict | None, step: str) -> tuple[str, str | None]:
        if verdict is None:
            return _cell("  …", self.VERDICT_W), None
        word, style = VERDICT_LOOK[verdict]
        return _cell(f" {word}", self.VERDICT_W), style

    def _lines(self, columns: int, height: int, *, final: bool) -> list[str]:
        width = max(1, columns - 1)
        now = time.monotonic()
        t = self._tally
        title = f"flasher station · {t.done} done · {t.failed} failed · {t.already_done} already done" + \
            (f" · {t.unplugged} unplugged" if t.unplugged else "") + (f" · {t.stopped} stopped" if t.stopped else "") + \
            f" · {self._banner}"
        out: list[tuple[str, str | None, int]] = [(title, BOLD, width)]  # (text, style, columns the style covers)
        ports = sorted(self._attached)
        port_w = max(self.MIN_PORT, min(max((len(p) for p in ports), default=0), 24))
        out.append((f"{_cell('VERDICT', self.VERDICT_W)} {_cell('PORT', port_w)} {_cell('DEVEUI', self.EUI_W)} "
                    f"{_cell('STEP', self.STEP_W)} {_cell('TIME', self.TIME_W, right=True)}  DETAIL", None, 0))
        room = max(1, height - 1 - len(out) - (0 if final else 0))
        last = list(self._finished)
        keep_last = min(len(last), max(0, room - len(ports) - 2)) if last else 0
        shown = ports if final else ports[:max(0, room - (keep_last + 1 if keep_last else 0) - (1 if len(ports) > room else 0))]
        for port in shown:
            row = self._attached[port]
            cell, style = self._verdict_cell(row.verdict, row.step)
            text = (f"{cell} {_cell(port, port_w, keep_end=True)} {_cell(row.deveui or '?', self.EUI_W)} "
                    f"{_cell(row.step, self.STEP_W)} {_cell(_clock((row.t1 or now) - row.t0), self.TIME_W, right=True)}"
                    + (f"  {row.detail}" if row.detail else ""))
            out.append((text, style, self.VERDICT_W))
        if len(shown) < len(ports):
            out.append((f"+{len(ports) - len(shown)} more attached", None, 0))
        if not ports:
            out.append(("  (no board attached)", None, 0))
        if keep_last or (final and last):
            out.append(("last finished:", BOLD, width))
            for f in last if final else last[:keep_last]:
                cell, style = self._verdict_cell(f.verdict, f.step or "")
                where = f" at {f.step}" if f.step and f.verdict is not Verdict.DONE else ""
                took = f" in {_clock(f.seconds)}" if f.seconds is not None else ""
                out.append((f"{cell} {f.at}  {_cell(f.who, self.EUI_W)}{where}{took}"
                            + (f"  {f.detail}" if f.detail else ""), style, self.VERDICT_W))
        lines = []
        for text, style, span in out:
            text = _fit(text, width, mark="").rstrip()
            if style and text:
                cut = min(span, len(text)) if span else len(text)
                text = f"{style}{text[:cut]}{RESET}{text[cut:]}"
            lines.append(text)
        return lines


def for_station(stream: TextIO | None = None, *, json_stream: TextIO | None = None, bell: bool = True,
                quiet: bool = False) -> StationReporter:
    """The station's reporters: the screen on a terminal (else one line per event) on ``stream`` (stderr), plus JSON
    events on ``json_stream`` (``--json``: stdout) when given. ``quiet``: only the JSON, if any."""
    stream = stream or sys.stderr
    people: list[StationReporter] = []
    if not quiet:
        people.append(StationScreen(stream, bell=bell) if stream.isatty() else StationLines(stream))
    machines: list[StationReporter] = [StationJson(json_stream)] if json_stream is not None else []
    return StationTee(*machines, *people)


def for_stream(stream: TextIO | None = None, *, quiet: bool = False, json: bool = False) -> Reporter:
    """The reporter for ``stream`` (stderr by default): quiet → nothing, json → JSON lines, a terminal → the live table,
    anything else → plain lines."""
    stream = stream or sys.stderr
    if quiet:
        return NullReporter()
    if json:
        return JsonReporter(stream)
    return TableReporter(stream) if stream.isatty() else LineReporter(stream)


class LiveLine:
    """One status line rewritten in place on a terminal (stderr); silent on a pipe. Cut to the terminal's width, since a
    line that wraps can no longer be rewritten by a carriage return.

    It shows how far a run is: ``[done/total done, failed, rate/min, ETA] id: phase ...``; ``total`` is None when
    the ids stream in (stdin), and ids the ledger had done already (:meth:`skipped`) count as done but not in the rate.
    """

    def __init__(self, total: int | None, stream: TextIO | None = None, clock=time.monotonic):
        self.stream = stream or sys.stderr
        self.on = self.stream.isatty()
        self.total, self.done, self.failed, self.skipped_count = total, 0, 0, 0
        self.phases: dict[str, str] = {}
        self._lock = threading.Lock()
        self._clock = clock
        self._started = clock()
        self._drawn = 0.0

    def phase(self, reg_id: str, name: str) -> None:
        with self._lock:
            self.phases[reg_id] = name
            self._draw()

    def skipped(self, count: int = 1) -> None:
        """Ids done in an earlier run: counted, not timed."""
        with self._lock:
            self.done += count
            self.skipped_count += count
            self._draw(force=False)

    def finished(self, reg_id: str, line: str | None = None, to_err: bool = False, failed: bool = False) -> None:
        with self._lock:
            self.phases.pop(reg_id, None)
            self.done += 1
            self.failed += failed
            self._clear()
            if line is not None:
                print(line, file=self.stream if to_err else sys.stdout, flush=True)
            self._draw()

    def rate(self) -> float:
        """Ids finished this run per minute."""
        elapsed = self._clock() - self._started
        worked = self.done - self.skipped_count
        return worked * 60 / elapsed if elapsed > 0 and worked else 0.0

    def counts(self) -> str:
        total = "?" if self.total is None else self.total
        text = f"{self.done}/{total} done, {self.failed} failed"
        per_minute = self.rate()
        if per_minute:
            text += f", {per_minute:.0f}/min"
            if self.total is not None:
                left = max(0, self.total - self.done) / per_minute * 60
                text += f", ETA {int(left) // 3600}:{int(left) % 3600 // 60:02d}:{int(left) % 60:02d}"
        return text

    def close(self) -> None:
        with self._lock:
            self._clear()
            self.on = False

    def _clear(self) -> None:
        if self.on:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def _draw(self, force: bool = True) -> None:
        if not self.on:
            return
        now = self._clock()
        if not force and now - self._drawn < 0.1:   # thousands of skipped ids: at most ten redraws a second
            return
        self._drawn = now
        shown = ", ".join(f"{r}: {p}" for r, p in list(self.phases.items())[:3])
        more = f" +{len(self.phases) - 3}" if len(self.phases) > 3 else ""
        width = max(1, _terminal_size(self.stream)[0] - 1)
        self.stream.write("\r\x1b[K" + _fit(f"[{self.counts()}] {shown}{more}".rstrip(), width))
        self.stream.flush()
