"""Station mode: a bench where boards are plugged in one after another and each is provisioned as it arrives.

The station watches serial ports (``serial.tools.list_ports`` on every platform, plus the simulator's ports file,
through :mod:`flasher.ports`, the same discovery ``--all`` uses), and wakes early on a udev event on Linux when
pyudev is installed. A new board's port must stay for ``settle`` seconds before the board is started (a USB CDC port
exists before the sketch behind it answers AT); then it runs through :func:`flasher.pipeline.provision_board`,
the same pipeline, ledger, claims and settings as ``flasher provision``, concurrently with the boards already running.

Each board ends with a :class:`~flasher.states.Verdict`:

* done, or already done (the ledger says so: nothing is redone);
* failed (also a conflict or a board another run holds): it stays on screen until unplugged, and plugging it back in
  tries again from where it failed;
* unplugged: its port went away mid-way. The board stops at its next step boundary, the ledger says where, and
  plugging it back in resumes there (the pipeline's own resume);
* stopped: Ctrl-C or SIGTERM (:meth:`Station.stop`) ended the run; every board finishes its current step first.

A board is known by its USB serial number when it has one (so a pty or tty name reused by another board is another
board, and a board that comes back under a new name is the same one), else by its port.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flasher.errors import FlasherError
from flasher.ports import APP, PortInfo, classify, load_simulated
from flasher.progress import BoardEvent, StationEvent, StationKind, StationReporter, Tally
from flasher.states import ResultStatus, Verdict

if TYPE_CHECKING:
    from collections.abc import Callable

    from flasher.ledger import Ledger
    from flasher.pipeline import BoardResult, Settings

log = logging.getLogger("flasher.station")

IDENTIFY_RETRIES = 1  # a board that never answered AT+ID is tried once more after settling again


def discover(simulated: str | os.PathLike | None = None, *, strict: bool = False) -> list[PortInfo]:
    """Boards running a sketch, real and simulated (``$FLASHER_SIMULATED_PORTS``, or only the ports file
    ``simulated`` when given: the demo's, with no real board).

    Once the station runs, a simulator's ports file that has gone (the simulator stopped) means no simulated boards,
    said once in the log; ``strict`` (the check before the station starts) refuses it instead. A file that is there
    but cannot be read whole raises: that look tells nothing, and the station skips it rather than take every
    board for unplugged."""
    from serial.tools import list_ports

    from flasher.ports import SIMULATED_PORTS_ENV

    found = classify(list_ports.comports()) if simulated is None else []
    path = simulated if simulated is not None else os.environ.get(SIMULATED_PORTS_ENV)
    if path and not strict and not os.path.exists(path):
        if not _warned.is_set():
            _warned.set()
            log.warning("%s: no such file; watching real ports only until it is back", path)
    else:
        _warned.clear()
        found += load_simulated(path)
    return [p for p in found if p.board == APP]


_warned = threading.Event()


@dataclass(eq=False)
class _Slot:
    """One board attached now."""

    key: str
    port: str
    serial_number: str | None
    seen: float                                   # when its port appeared (or when it was last told to settle again)
    stop: threading.Event = field(default_factory=threading.Event)
    future: Future | None = None
    started: float | None = None
    step: str = "settling"
    deveui: str | None = None
    tries: int = 0
    gone_at: float | None = None                  # its port went away while it was running
    failed: BoardResult | None = None             # a failure waiting to see whether the port goes too
    judge_until: float = 0.0
    verdict: Verdict | None = None


class _Observer:
    """Passes the pipeline's events on, noting each board's step (the station must not call an upload an unplug)."""

    def __init__(self, station: Station):
        self.station = station

    def emit(self, event: BoardEvent) -> None:
        slot = self.station._by_port.get(event.port)
        if slot is not None:
            slot.step = event.step
            slot.deveui = event.deveui or slot.deveui
        self.station.reporter.emit(event)

    def close(self) -> None:
        pass


class Station:
    """Runs until :meth:`stop`; :meth:`run` returns the tally once every board it started has stopped."""

    def __init__(self, settings: Settings, ledger: Ledger, reporter: StationReporter, *, settle: float = 1.0,
                 poll: float = 0.5, concurrency: int = 16, find: Callable[[], list[PortInfo]] = discover,
                 udev: bool | None = None):
        self.settings, self.ledger, self.reporter = settings, ledger, reporter
        self.settle, self.poll, self.find = settle, poll, find
        self.concurrency = concurrency
        self.udev = udev
        self._slots: dict[str, _Slot] = {}
        self._by_port: dict[str, _Slot] = {}
        self._verdicts: dict[str, Verdict] = {}   # by DevEUI (or serial number, or port, before identify): the tally
        self._where: dict[str, str] = {}          # serial number → where its board stopped (for "resumes at")
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._find_error = ""

    # --- control ---------------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ctrl-C: start no more boards; each running one stops at its next step boundary. Safe from a signal handler."""
        self._stopping.set()
        self._wake.set()

    def wake(self) -> None:
        """Look at the ports now (a udev event, a board that finished)."""
        self._wake.set()

    @property
    def tally(self) -> Tally:
        counts = {v: 0 for v in Verdict}
        for v in self._verdicts.values():
            counts[v] += 1
        return Tally(done=counts[Verdict.DONE], failed=counts[Verdict.FAILED], already_done=counts[Verdict.ALREADY_DONE],
                     unplugged=counts[Verdict.UNPLUGGED], stopped=counts[Verdict.STOPPED])

    # --- the loop --------------------------------------------------------------------------------------------------

    def run(self) -> Tally:
        from flasher.pipeline import preflight

        preflight(self.settings, [])   # bad settings fail here, once, before any board
        seen = self.find()   # a broken ports file or port listing fails here, before anything runs
        watcher = self._udev_watcher()
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="station-board")
        self._emit(StationKind.READY, detail=f"{len(seen)} board(s) attached at the start"
                   + ("; udev events" if watcher is not None else f"; polling every {self.poll:g} s"))
        try:
            while not self._stopping.is_set():
                self._look(self._find_quietly())
                self._wake.wait(self._next_wait())
                self._wake.clear()
        finally:
            if watcher is not None:
                watcher.stop()
            self._finish()
        return self.tally

    def _find_quietly(self) -> list[PortInfo] | None:
        try:
            return self.find()
        except (FlasherError, OSError) as exc:  # a listing that failed (a ports file mid-write): look again soon
            if str(exc) != self._find_error:
                log.warning("cannot list serial ports (%s); looking again", exc)
            self._find_error = str(exc)
            return None

    def _next_wait(self) -> float:
        now = time.monotonic()
        due = [s.seen + self.settle for s in self._slots.values() if s.future is None and s.verdict is None]
        due += [s.judge_until for s in self._slots.values() if s.failed is not None]
        return max(0.01, min([self.poll, *(d - now for d in due)]))

    def _look(self, ports: list[PortInfo] | None) -> None:
        now = time.monotonic()
        for slot in list(self._slots.values()):  # results first: a board that failed and went is judged unplugged
            if slot.future is not None and slot.future.done():
                self._collect(slot, now)
        if ports is not None:
            present: dict[str, PortInfo] = {}
            for p in ports:
                present.setdefault(p.serial_number or p.device, p)
            for key, slot in list(self._slots.items()):
                info = present.get(key)
                if info is None or (slot.serial_number is None and info.device != slot.port):
                    self._gone(slot, now)
                elif info.device != slot.port:  # the same board under a new name (an upload's re-enumeration)
                    self._rename(slot, info.device)
            for key, info in present.items():
                if key not in self._slots:
                    self._arrived(key, info, now)
        for slot in list(self._slots.values()):
            if slot.failed is not None and now >= slot.judge_until:
                self._judge(slot, unplugged=False)
            if slot.future is None and slot.verdict is None and slot.failed is None and now >= slot.seen + self.settle:
                self._start(slot)

    def _arrived(self, key: str, info: PortInfo, now: float) -> None:
        slot = _Slot(key, info.device, info.serial_number, now)
        self._slots[key] = slot
        self._by_port[info.device] = slot
        before = self._where.get(key)
        detail = (f"plugged back in; resumes at {before}" if before else
                  f"SN {info.serial_number}" if info.serial_number else "") + \
            (f"; starts in {self.settle:g} s" if self.settle else "")
        self._emit(StationKind.PLUGGED, slot, detail=detail)

    def _rename(self, slot: _Slot, device: str) -> None:
        self._by_port.pop(slot.port, None)
        slot.port = device
        self._by_port[device] = slot

    def _gone(self, slot: _Slot, now: float) -> None:
        if slot.future is not None and not slot.future.done():
            if slot.step == "upload":
                return  # the bootloader's re-enumeration, not an unplug: the upload step follows the board itself
            if slot.gone_at is None:
                slot.gone_at = now
                slot.stop.set()   # at its next step boundary, if the missing port has not already failed it
                self._emit(StationKind.UNPLUGGED, slot, detail=f"during {slot.step}; stopping it at the next step")
            return                # the slot goes once its run has returned (see _collect)
        if slot.failed is not None:
            self._judge(slot, unplugged=True)
        self._drop(slot)
        if slot.verdict is not Verdict.UNPLUGGED:
            self._emit(StationKind.UNPLUGGED, slot)

    def _drop(self, slot: _Slot) -> None:
        self._slots.pop(slot.key, None)
        if self._by_port.get(slot.port) is slot:
            del self._by_port[slot.port]

    def _start(self, slot: _Slot) -> None:
        from flasher.pipeline import provision_board

        assert self._pool is not None
        slot.tries += 1
        slot.started = time.monotonic()
        slot.step = "identify"
        self._emit(StationKind.STARTED, slot, detail=f"try {slot.tries}" if slot.tries > 1 else "")
        slot.future = self._pool.submit(provision_board, slot.port, self.settings, self.ledger, _Observer(self),
                                        slot.stop, slot.serial_number)
        slot.future.add_done_callback(lambda _f: self._wake.set())

    def _collect(self, slot: _Slot, now: float) -> None:
        assert slot.future is not None
        future, slot.future = slot.future, None
        try:
            result: BoardResult = future.result()
        except BaseException as exc:  # a bug in a step: the board failed; the station goes on with the others
            from flasher.pipeline import BoardResult

            log.error("%s: %s", slot.port, exc, exc_info=exc)
            result = BoardResult(port=slot.port, error=f"internal error: {exc.__class__.__name__}: {exc}",
                                 failed_step=slot.step)
        slot.deveui = result.deveui or slot.deveui
        if result.status is ResultStatus.PROVISIONED:
            self._verdict(slot, Verdict.DONE, result, f"{result.device_id} @ {result.assigned_hub}")
        elif result.status is ResultStatus.ALREADY_PROVISIONED:
            self._verdict(slot, Verdict.ALREADY_DONE, result, "the ledger says it is provisioned; nothing redone")
        elif slot.gone_at is not None:
            self._verdict(slot, Verdict.UNPLUGGED, result, "plug it back in to resume")
            self._drop(slot)
        elif slot.stop.is_set() and result.status is ResultStatus.FAILED and (result.error or "").startswith("interrupted"):
            self._verdict(slot, Verdict.STOPPED, result, "the next run resumes here")
        else:  # failed with its port still listed: wait a moment, the port may be on its way out
            slot.failed, slot.judge_until = result, now + max(self.settle, 0.5)

    def _judge(self, slot: _Slot, *, unplugged: bool) -> None:
        result, slot.failed = slot.failed, None
        assert result is not None
        if unplugged:
            self._verdict(slot, Verdict.UNPLUGGED, result, "plug it back in to resume")
        elif result.failed_step == "identify" and result.deveui is None and slot.tries <= IDENTIFY_RETRIES:
            slot.seen = time.monotonic()   # no answer yet: the sketch may still be starting; settle and try again
            slot.step = "settling"
            self._emit(StationKind.PLUGGED, slot, detail=f"no answer yet ({result.error}); trying again")
        else:
            self._verdict(slot, Verdict.FAILED, result, result.error or "")

    def _verdict(self, slot: _Slot, verdict: Verdict, result: BoardResult, detail: str) -> None:
        slot.verdict = verdict
        # one entry per physical board: its USB serial number stays the same whether or not identify got its DevEUI
        self._verdicts[slot.serial_number or result.deveui or slot.deveui or slot.port] = verdict
        if slot.serial_number:
            if verdict in (Verdict.UNPLUGGED, Verdict.FAILED, Verdict.STOPPED) and result.failed_step:
                self._where[slot.key] = result.failed_step
            else:
                self._where.pop(slot.key, None)
        step = None if verdict in (Verdict.DONE, Verdict.ALREADY_DONE) else result.failed_step
        self._emit(StationKind.VERDICT, slot, verdict=verdict, step=step, detail=detail, seconds=result.seconds,
                   deveui=result.deveui)

    def _finish(self) -> None:
        """Every running board stops at its next step boundary; then the tally."""
        running = [s for s in self._slots.values() if s.future is not None]
        if running:
            self._emit(StationKind.STOPPING, detail=f"{len(running)} board(s) finishing their current step")
        self._stopping.set()
        for slot in running:
            slot.stop.set()
        for slot in running:
            assert slot.future is not None
            try:
                slot.future.result()
            except BaseException:
                pass  # _collect reports it
            self._collect(slot, time.monotonic())
        for slot in list(self._slots.values()):
            if slot.failed is not None:   # no time left to see whether its port goes, nor to try it again
                result, slot.failed = slot.failed, None
                self._verdict(slot, Verdict.FAILED, result, result.error or "")
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._emit(StationKind.TALLY, detail=self.tally.text())

    def _emit(self, kind: StationKind, slot: _Slot | None = None, **fields) -> None:
        deveui = fields.pop("deveui", None) or (slot.deveui if slot else None)
        self.reporter.emit(StationEvent(kind, slot.port if slot else None, slot.serial_number if slot else None,
                                        deveui, tally=self.tally, **fields))

    # --- udev ------------------------------------------------------------------------------------------------------

    def _udev_watcher(self):
        """pyudev's observer of tty add/remove events, waking the loop at once; None where there is no udev.

        ``udev=None`` uses it when it is there; ``True`` requires it (the ``udev`` extra, a Linux with udev).
        """
        if self.udev is False:
            return None
        try:
            from flasher.extras import require

            pyudev = require("pyudev", "udev", "--udev")
            monitor = pyudev.Monitor.from_netlink(pyudev.Context())
            monitor.filter_by(subsystem="tty")
            observer = pyudev.MonitorObserver(monitor, callback=lambda _device: self._wake.set(), name="station-udev")
            observer.start()
            return observer
        except FlasherError:
            if self.udev:
                raise
        except Exception as exc:  # no libudev, no netlink in a container: polling alone still finds every board
            if self.udev:
                raise FlasherError(f"--udev: cannot watch udev events ({exc.__class__.__name__}: {exc})") from None
            log.info("udev events unavailable (%s); polling", exc)
        return None
