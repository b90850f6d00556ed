"""Showing boards move through their steps.

On a terminal: a live table, one row per board, redrawn in place. On a pipe or a
file: one plain line per step outcome, so a log still tells the story without
escape codes. Either way it goes to stderr; stdout is for data.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time

STATE_MARK = {"running": "…", "ok": "ok", "skipped": "–", "failed": "FAILED"}


class LiveTable:
    TICK = 0.25  # seconds between redraws while something runs, so the clocks move

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.rows: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._drawn = 0
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __call__(self, port: str, deveui: str | None, step: str, state: str, detail: str) -> None:
        with self._lock:
            row = self.rows.setdefault(port, {"deveui": "", "step": "", "state": "", "detail": "",
                                              "t0": time.monotonic(), "t1": None})
            row.update(deveui=deveui or row["deveui"], step=step, state=state, detail=detail)
            if step == "done" or state == "failed":
                row["t1"] = time.monotonic()
            self._draw()
            if self._ticker is None:
                self._ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
                self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(self.TICK):
            with self._lock:
                self._draw()

    def _line(self, port: str, row: dict) -> str:
        secs = (row["t1"] or time.monotonic()) - row["t0"]
        detail = row["detail"][:60]
        return f"{port[-22:]:<22} {row['deveui'] or '?':<16} {row['step']:<9} {STATE_MARK.get(row['state'], row['state']):<6} {secs:5.1f}s  {detail}"

    def _draw(self) -> None:
        out = self.stream
        if self._drawn:
            out.write(f"\x1b[{self._drawn}F")
        header = f"{'PORT':<22} {'DEVEUI':<16} {'STEP':<9} {'STATE':<6} {'TIME':>6}  DETAIL"
        lines = [header] + [self._line(p, r) for p, r in sorted(self.rows.items())]
        for line in lines:
            out.write("\x1b[2K" + line + "\n")
        out.flush()
        self._drawn = len(lines)

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        with self._lock:
            if self.rows:
                self._draw()


class StepLines:
    """The pipe-friendly form: one line per finished step."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()

    def __call__(self, port: str, deveui: str | None, step: str, state: str, detail: str) -> None:
        if state == "running":
            return
        with self._lock:
            self.stream.write(f"{deveui or port}: {step}: {state}{': ' + detail if detail else ''}\n")
            self.stream.flush()

    def close(self) -> None:
        pass


class LiveLine:
    """One status line rewritten in place on a terminal (stderr); silent on a pipe."""

    def __init__(self, total: int):
        self.on = sys.stderr.isatty()
        self.total, self.done, self.phases = total, 0, {}
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
                print(line, file=sys.stderr if to_err else sys.stdout, flush=True)
            self._draw()

    def close(self) -> None:
        with self._lock:
            self._clear()
            self.on = False

    def _clear(self) -> None:
        if self.on:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()

    def _draw(self) -> None:
        if not self.on or not self.phases:
            return
        shown = ", ".join(f"{r}: {p}" for r, p in list(self.phases.items())[:3])
        more = f" +{len(self.phases) - 3}" if len(self.phases) > 3 else ""
        width = max(20, shutil.get_terminal_size((80, 24)).columns - 1)
        sys.stderr.write(f"\r\x1b[K[{self.done}/{self.total}] {shown}{more}"[:width + 5])  # +5: the escape sequence takes no columns
        sys.stderr.flush()


def for_stream(stream=None, quiet: bool = False):
    stream = stream or sys.stderr
    if quiet:
        return lambda *a: None
    return LiveTable(stream) if stream.isatty() else StepLines(stream)
