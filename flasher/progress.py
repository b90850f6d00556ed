"""Showing boards move through their steps.

On a terminal: a live table, one row per board, redrawn in place. On a pipe or a
file: one plain line per step outcome, so a log still tells the story without
escape codes. Either way it goes to stderr; stdout is for data.
"""

from __future__ import annotations

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


def for_stream(stream=None, quiet: bool = False):
    stream = stream or sys.stderr
    if quiet:
        return lambda *a: None
    return LiveTable(stream) if stream.isatty() else StepLines(stream)
