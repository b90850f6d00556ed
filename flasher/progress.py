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
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, TextIO

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
        with self._lock:
            if self._closed:
                return
            self._closed = True
            ticker = self._ticker
        self._stop.set()
        if ticker is not None:
            ticker.join()
        with self._lock:
            if self._rows:
                self._draw(final=True)

    def _run_ticker(self) -> None:
        while not self._stop.wait(self.tick):
            with self._lock:
                if self._dead:
                    return
                if any(r.t1 is None for r in self._rows.values()) or _terminal_size(self.stream) != self._size:
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
    line that wraps can no longer be rewritten by a carriage return."""

    def __init__(self, total: int, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.on = self.stream.isatty()
        self.total, self.done = total, 0
        self.phases: dict[str, str] = {}
        self._lock = threading.Lock()

    def phase(self, reg_id: str, name: str) -> None:
        with self._lock:
            self.phases[reg_id] = name
            self._draw()

    def finished(self, reg_id: str, line: str | None = None, to_err: bool = False) -> None:
        with self._lock:
            self.phases.pop(reg_id, None)
            self.done += 1
            self._clear()
            if line is not None:
                print(line, file=self.stream if to_err else sys.stdout, flush=True)
            self._draw()

    def close(self) -> None:
        with self._lock:
            self._clear()
            self.on = False

    def _clear(self) -> None:
        if self.on:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def _draw(self) -> None:
        if not self.on or not self.phases:
            return
        shown = ", ".join(f"{r}: {p}" for r, p in list(self.phases.items())[:3])
        more = f" +{len(self.phases) - 3}" if len(self.phases) > 3 else ""
        width = max(1, _terminal_size(self.stream)[0] - 1)
        self.stream.write("\r\x1b[K" + _fit(f"[{self.done}/{self.total}] {shown}{more}", width))
        self.stream.flush()
