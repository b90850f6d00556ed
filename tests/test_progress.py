"""Progress reporters. The live table is checked the way a person sees it: the bytes a reporter writes to a real pty
(with a real window size) are replayed through the pyte terminal emulator, and the tests read its screen."""

from __future__ import annotations

import fcntl
import io
import itertools
import json
import os
import pty
import struct
import sys
import termios
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pyte
import pytest

from flasher.progress import (
    BoardEvent,
    JsonReporter,
    LineReporter,
    LiveLine,
    NullReporter,
    StepState,
    TableReporter,
    for_stream,
)

RUNNING, OK, SKIPPED, FAILED = StepState.RUNNING, StepState.OK, StepState.SKIPPED, StepState.FAILED
MARKS = {"running": "…", "ok": "ok", "skipped": "–", "failed": "FAILED"}  # what the STATE column shows
STEPS = ["identify", "derive", "render", "program", "upload", "register", "message"]
NO_TICK = 3600.0  # the ticker never fires within a test: only events draw, so what was drawn at which size is known


class Terminal:
    """A real pty with a window size. Reporters write to ``stream`` (the slave side); a thread drains the master side
    into a log as it arrives, so writes never block; ``screen()`` replays the log through pyte, resizing pyte at the
    points where ``resize()`` resized the pty."""

    def __init__(self, cols: int, rows: int):
        self.rows = rows
        self.master, self.slave = pty.openpty()
        self._set_size(cols)
        self.stream = open(self.slave, "w", encoding="utf-8", closefd=False)  # closed in close()
        self._log = bytearray()
        self._sizes = [(0, cols)]  # (offset in the log, columns from there on)
        self._cond = threading.Condition()
        self._marks = itertools.count(1)
        self._reader = threading.Thread(target=self._drain, name="pty-reader")
        self._reader.start()

    def _set_size(self, cols: int) -> None:
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", self.rows, cols, 0, 0))

    def _drain(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: every slave descriptor is closed
                return
            if not chunk:
                return
            with self._cond:
                self._log += chunk
                self._cond.notify_all()

    def sync(self) -> int:
        """Wait until everything written so far has been read; return where in the log "now" is."""
        marker = f"\x1b]0;sync-{next(self._marks)}\x07".encode()  # a title change: travels in order, then removed
        os.write(self.slave, marker)
        with self._cond:
            assert self._cond.wait_for(lambda: marker in self._log, timeout=30), "the pty reader stopped"
            at = self._log.index(marker)
            del self._log[at:at + len(marker)]
        return at

    def wait_output(self, after: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self._log) > after, timeout=30), "nothing was drawn"

    def resize(self, cols: int) -> None:
        """Resize the window; what was written before is replayed at the old width, what follows at the new one."""
        self._sizes.append((self.sync(), cols))
        self._set_size(cols)

    def screen(self) -> pyte.Screen:
        end = self.sync()
        with self._cond:
            data = bytes(self._log[:end])
        screen = pyte.Screen(self._sizes[0][1], self.rows)
        feed = pyte.ByteStream(screen)
        for (start, cols), (stop, _) in zip(self._sizes, [*self._sizes[1:], (len(data), 0)], strict=True):
            screen.resize(self.rows, cols)
            feed.feed(data[start:stop])
        return screen

    def close(self) -> None:
        self.stream.close()
        os.close(self.slave)
        self._reader.join()
        os.close(self.master)


@pytest.fixture
def terminal():
    opened: list[Terminal] = []

    def make(cols: int = 80, rows: int = 24) -> Terminal:
        opened.append(Terminal(cols, rows))
        return opened[-1]

    yield make
    for term in opened:
        term.close()


@dataclass(frozen=True)
class Board:
    port: str
    deveui: str


def boards(n: int) -> list[Board]:
    # by-id paths: long, and alike up to the USB serial number near their end
    return [Board(f"/dev/serial/by-id/usb-Seeed_Seeeduino_LoRaWAN_{0xA1B2C3D0 + i:08X}-if00", f"2CF7F1202490{i:04X}")
            for i in range(n)]


def run_of(board: Board, fail_at: str | None = None) -> Iterator[BoardEvent]:
    """A board's whole run as the pipeline emits it, with details as long as real ones get."""
    yield BoardEvent(board.port, None, "identify", RUNNING, f"AT+ID on {board.port}")
    yield BoardEvent(board.port, board.deveui, "identify", OK, f"{board.deveui} (module firmware v4.0.11, EU868)")
    for step in STEPS[1:]:
        yield BoardEvent(board.port, board.deveui, step, RUNNING, f"{step} for registration id {board.deveui.lower()}")
        if step == fail_at:
            yield BoardEvent(board.port, board.deveui, step, FAILED,
                             "DPS refused the registration: 401 Unauthorized (the group key does not match this id)")
            return
        if step == "upload":
            yield BoardEvent(board.port, board.deveui, step, SKIPPED, "--upload not given")
        else:
            yield BoardEvent(board.port, board.deveui, step, OK, f"0.4 s {step} finished for {board.deveui.lower()}")
    yield BoardEvent(board.port, board.deveui, "done", OK,
                     f"{board.deveui.lower()} @ flasher-hub-westeurope-01.azure-devices.net")


def assert_table(screen: pyte.Screen, last: dict[str, BoardEvent], *, above: tuple[str, ...] = ()) -> int:
    """The screen shows ``above``, then the header exactly once, then one row per board with its last step and state,
    and nothing else; no line reaches the last column (so no terminal wraps it). Returns the row below the table."""
    lines = [line.rstrip() for line in screen.display]
    assert tuple(lines[:len(above)]) == above, "the table overwrote what was on screen before it"
    headers = [i for i, line in enumerate(lines) if line.split()[:2] == ["PORT", "DEVEUI"]]
    assert headers == [len(above)], "\n".join(lines)
    table = lines[len(above):len(above) + 1 + len(last)]
    assert all(not line for line in lines[len(above) + 1 + len(last):]), "\n".join(lines)  # no leftovers below it
    assert all(len(line) < screen.columns for line in lines), "\n".join(lines)
    for event in last.values():
        assert event.deveui is not None
        rows = [line for line in table if event.deveui in line]
        assert len(rows) == 1, (event.deveui, "\n".join(lines))
        cells = rows[0].split()
        assert cells[0].startswith("…") and event.port.endswith(cells[0][1:])  # the port, shortened from the left
        assert cells[1:4] == [event.deveui, event.step, MARKS[event.state]], rows[0]
        assert "".join(" " if c < " " else c for c in event.detail[:8]) in rows[0]  # control characters blanked
    return len(above) + 1 + len(last)


def test_the_live_table_fits_the_terminal_redraws_in_place_and_survives_a_resize(terminal):
    term = terminal(80, 24)
    term.stream.write("flasher: provisioning 5 boards\n")
    reporter = TableReporter(term.stream, tick=NO_TICK)
    bs = boards(5)
    runs = [run_of(b, fail_at="register" if i == 3 else None) for i, b in enumerate(bs)]
    last: dict[str, BoardEvent] = {}

    def advance(counts: list[int]) -> None:  # round-robin, so every event is a redraw with boards at different steps
        for _ in range(max(counts)):
            for i, run in enumerate(runs):
                event = next(run, None) if counts[i] > 0 else None
                if event is not None:
                    counts[i] -= 1
                    reporter.emit(event)
                    last[event.port] = event

    advance([3, 5, 7, 9, 4])
    assert_table(term.screen(), last, above=("flasher: provisioning 5 boards",))
    term.resize(60)
    advance([2, 2, 1, 2, 3])
    assert_table(term.screen(), last, above=("flasher: provisioning 5 boards",))
    advance([99] * 5)  # every board to its end
    reporter.close()
    screen = term.screen()
    below = assert_table(screen, last, above=("flasher: provisioning 5 boards",))
    assert (screen.cursor.y, screen.cursor.x) == (below, 0)  # the table stays, the cursor is on a fresh line
    assert [e.step for e in last.values()].count("done") == 4 and [e.state for e in last.values()].count(FAILED) == 1


def test_the_ticker_redraws_for_a_resize_without_any_event(terminal):
    term = terminal(80, 24)
    reporter = TableReporter(term.stream, tick=0.02)
    last = {}
    for b in boards(5):
        for event in run_of(b):
            reporter.emit(event)
        last[b.port] = event
    mark = term.sync()  # every board is done, so nothing moves and nothing is redrawn until the size changes
    term.resize(60)
    term.wait_output(after=mark)
    reporter.close()
    screen = term.screen()
    assert screen.columns == 60
    assert (screen.cursor.y, screen.cursor.x) == (assert_table(screen, last), 0)


def test_a_table_taller_than_the_terminal_keeps_the_active_boards_and_counts_the_rest(terminal):
    term = terminal(80, 10)
    reporter = TableReporter(term.stream, tick=NO_TICK)
    bs = boards(12)
    finished = {0: None, 5: None, 9: None, 11: "register"}  # board index → where it fails (None: it succeeds)
    last = {}
    for i, b in enumerate(bs):
        events = list(run_of(b, fail_at=finished[i])) if i in finished else list(run_of(b))[:6]
        for event in events:
            reporter.emit(event)
        last[b.port] = event
    lines = [line.rstrip() for line in term.screen().display]
    shown = [line for line in lines if line]
    assert len(shown) == 9 and lines[9] == ""  # header, 7 rows and a summary: the cursor's line stays free
    assert shown[0].startswith("PORT") and sum(line.startswith("PORT") for line in lines) == 1
    active = [b.deveui for i, b in enumerate(bs) if i not in finished]
    assert [row.split()[1] for row in shown[1:8]] == active[:7]  # the active boards first, in port order
    assert shown[8] == "+5 more: 1 active, 1 failed, 3 finished"
    reporter.close()
    screen = term.screen()
    lines = [line.rstrip() for line in screen.display]
    # the final table shows every board; its last 9 rows are what the 10-line screen still holds
    assert [line.split()[1] for line in lines[:9]] == [b.deveui for b in bs[3:]]
    assert lines[9] == "" and (screen.cursor.y, screen.cursor.x) == (9, 0)


def test_control_characters_in_a_detail_cannot_move_the_cursor(terminal):
    term = terminal(80, 24)
    term.stream.write("before\n")
    reporter = TableReporter(term.stream, tick=NO_TICK)
    b = boards(1)[0]
    event = BoardEvent(b.port, b.deveui, "program", FAILED, "bad\r\nreply\x1b[2J\tAT")
    reporter.emit(event)
    reporter.close()
    screen = term.screen()
    assert_table(screen, {b.port: event}, above=("before",))
    assert screen.display[2].rstrip().endswith("  bad  reply [2J AT")


def test_sixteen_threads_on_the_live_table_each_end_with_one_row(terminal):
    term = terminal(80, 24)
    reporter = TableReporter(term.stream, tick=0.01)  # the ticker draws too, racing the emitting threads
    bs = boards(16)
    barrier = threading.Barrier(len(bs))

    def board(b: Board) -> None:
        barrier.wait()
        for event in run_of(b):
            reporter.emit(event)

    threads = [threading.Thread(target=board, args=(b,)) for b in bs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reporter.close()
    screen = term.screen()
    last = {b.port: list(run_of(b))[-1] for b in bs}
    assert (screen.cursor.y, screen.cursor.x) == (assert_table(screen, last), 0)


@pytest.mark.parametrize("make", [JsonReporter, LineReporter])
def test_sixteen_threads_emitting_at_once_lose_no_event(make, tmp_path):
    log = tmp_path / "progress.log"
    out = open(log, "w", encoding="utf-8")  # a real file: buffered, flushed after each line
    reporter = make(out)
    bs = boards(16)
    barrier = threading.Barrier(len(bs))
    runs = {b.port: list(run_of(b)) * 10 for b in bs}

    def board(b: Board) -> None:
        barrier.wait()
        for event in runs[b.port]:
            reporter.emit(event)

    threads = [threading.Thread(target=board, args=(b,)) for b in bs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reporter.close()
    out.close()
    lines = log.read_text(encoding="utf-8").splitlines()
    if make is JsonReporter:  # every event, each line whole, in its board's order
        objects = [json.loads(line) for line in lines]
        for b in bs:
            assert [(o["step"], o["state"], o["detail"]) for o in objects if o["port"] == b.port] == \
                [(e.step, e.state.value, e.detail) for e in runs[b.port]]
        assert len(objects) == 16 * len(runs[bs[0].port])
    else:  # every outcome (running steps are not printed)
        for b in bs:
            assert [line for line in lines if line.startswith(f"{b.deveui}: ")] == \
                [f"{b.deveui}: {e.step}: {e.state.value}: {e.detail}" for e in runs[b.port] if e.state is not RUNNING]
        assert len(lines) == 16 * sum(e.state is not RUNNING for e in runs[bs[0].port])


def test_line_reporter_prints_the_step_lines_format():
    out = io.StringIO()
    reporter = LineReporter(out)
    port = "/dev/ttyACM0"
    for event in [BoardEvent(port, None, "identify", RUNNING),
                  BoardEvent(port, None, "identify", FAILED, "no reply to AT+ID"),
                  BoardEvent(port, "2CF7F12024900138", "identify", OK, "2CF7F12024900138"),
                  BoardEvent(port, "2CF7F12024900138", "upload", SKIPPED, "--upload not given"),
                  BoardEvent(port, "2CF7F12024900138", "register", RUNNING, "assigning"),
                  BoardEvent(port, "2CF7F12024900138", "register", OK),
                  BoardEvent(port, "2CF7F12024900138", "done", OK)]:
        reporter.emit(event)
    reporter.emit(BoardEvent("/dev/ttyACM1", None, "identify", "failed", "port busy"))  # a plain string state is taken
    assert out.getvalue() == ("/dev/ttyACM0: identify: failed: no reply to AT+ID\n"
                              "2CF7F12024900138: identify: ok: 2CF7F12024900138\n"
                              "2CF7F12024900138: upload: skipped: --upload not given\n"
                              "2CF7F12024900138: register: ok\n"
                              "2CF7F12024900138: done: ok\n"
                              "/dev/ttyACM1: identify: failed: port busy\n")


def test_json_reporter_writes_every_event_as_one_object():
    out = io.StringIO()
    reporter = JsonReporter(out)
    b = boards(1)[0]
    events = list(run_of(b))
    for event in events:
        reporter.emit(event)
    objects = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [{k: o[k] for k in ("port", "deveui", "step", "state", "detail")} for o in objects] == \
        [{"port": e.port, "deveui": e.deveui, "step": e.step, "state": e.state.value, "detail": e.detail} for e in events]
    assert objects[0]["deveui"] is None and objects[0]["state"] == "running"
    times = [o["t"] for o in objects]
    assert all(isinstance(t, float) for t in times) and 0 <= times[0] and times == sorted(times)


def test_event_states_are_checked_where_the_event_is_made():
    assert BoardEvent("p", None, "identify", "ok").state is StepState.OK  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        BoardEvent("p", None, "identify", "sucess")  # type: ignore[arg-type]


def test_for_stream_picks_by_flags_then_by_terminal(terminal, monkeypatch):
    tty = terminal().stream
    r, w = os.pipe()
    with open(w, "w") as pipe:
        assert isinstance(for_stream(tty), TableReporter)
        assert isinstance(for_stream(pipe), LineReporter)
        assert isinstance(for_stream(tty, json=True), JsonReporter)
        assert isinstance(for_stream(tty, quiet=True, json=True), NullReporter)
        monkeypatch.setattr(sys, "stderr", tty)
        default = for_stream()
        assert isinstance(default, TableReporter) and default.stream is tty
    os.close(r)


@pytest.mark.parametrize("make", [LineReporter, JsonReporter, lambda s: TableReporter(s, tick=0.01)],
                         ids=["lines", "json", "table"])
def test_a_reader_that_went_away_does_not_fail_the_board(make):
    r, w = os.pipe()
    os.close(r)
    stream = open(w, "w")  # closed below
    reporter = make(stream)
    for event in run_of(boards(1)[0]):
        reporter.emit(event)  # EPIPE on every write: never raised into the board's thread
    reporter.close()
    with pytest.raises(BrokenPipeError):
        stream.close()  # the buffered bytes nobody could read


def test_live_line_stays_on_one_line_of_a_narrow_terminal(terminal, monkeypatch):
    term = terminal(40, 5)
    monkeypatch.setattr(sys, "stderr", term.stream)
    clock = iter(range(100, 200))
    live = LiveLine(4, clock=lambda: float(next(clock)))
    for reg_id in ("2cf7f1202490a1b2", "2cf7f1202490a1b3", "2cf7f1202490a1b4", "2cf7f1202490a1b5"):
        live.phase(reg_id, "assigning")
    live.finished("2cf7f1202490a1b2", "error: 2cf7f1202490a1b2: unauthorized", to_err=True, failed=True)
    screen = term.screen()
    lines = [line.rstrip() for line in screen.display]
    assert lines[0] == "error: 2cf7f1202490a1b2: unauthorized"
    assert lines[1].startswith("[1/4 done, 1 failed") and lines[1].endswith("…")
    assert len(lines[1]) < 40 and lines[2:] == ["", "", ""] and screen.cursor.y == 1
    live.close()
    assert [line.rstrip() for line in term.screen().display][1] == ""


def test_live_line_counts_rate_and_eta_and_not_skipped_ids_in_the_rate(terminal, monkeypatch):
    term = terminal(120, 3)
    monkeypatch.setattr(sys, "stderr", term.stream)
    now = [0.0]
    live = LiveLine(100, clock=lambda: now[0])
    live.skipped(40)                       # done in an earlier run: not part of this run's pace
    for i in range(10):
        now[0] += 6.0
        live.finished(f"id-{i}", failed=i == 3)
    assert live.counts() == "50/100 done, 1 failed, 10/min, ETA 0:05:00"
    assert [line.rstrip() for line in term.screen().display][0] == "[50/100 done, 1 failed, 10/min, ETA 0:05:00]"
    live.close()
    streaming = LiveLine(None, clock=lambda: now[0])
    assert streaming.counts() == "0/? done, 0 failed"
