"""Pace registrations to the service's quota instead of capping them at a small fixed number.

DPS admits 1,000 registrations per minute per service unit (Microsoft's "Quotas and
throttling" for DPS; 200/min in older documents) and answers 429 beyond it. A
registration spends most of its >= 2 s waiting inside the SDK, so what limits a fleet
run is the quota, not the number in flight. :class:`RateGovernor` is shared by every
board or id of a run and keeps the quota as the service states it, a count per window:

* ``acquire()`` gives a :class:`Slot` as soon as fewer than the count have started in
  the last window: a burst up to the quota goes at once (no idle waiting), and no
  window ever holds more (no 429 storm). A slot counts from when DPS answered it
  (``answered()``), which is never earlier than when DPS counted it, however long the
  TLS handshake took; a refused request (``refused()``) does not count, as at DPS.
* ``throttled(retry_after)`` (a 429) halves the count per window and holds every caller
  until ``retry_after`` has passed. The 429s of one burst arrive together: only the
  first of them, outside a hold, halves.
* ``succeeded()``, after ``recover_after`` in a row, raises the count by an eighth of the
  configured one, up to it (additive increase, multiplicative decrease, as TCP does).
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable

from flasher.errors import FlasherError, InputError

DEFAULT_DPS_RATE = "1000/min"    # one DPS service unit (S1)
_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*", re.IGNORECASE)
_PER = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}


def parse_quota(text: str, where: str = "quota") -> tuple[int, float]:
    """``"1000/min"`` → ``(1000, 60.0)``: at most that many starts in any window of the unit's length.

    DPS states its quotas per minute; a quota is a whole number of registrations per
    window, so ``/s``, ``/min`` and ``/h`` give windows of 1, 60 and 3,600 seconds.
    """
    m = _RATE.fullmatch(str(text))
    if not m or "." in m.group(1):
        raise InputError(f"{where} {text!r}: expected a whole number per second, minute or hour, like 1000/min")
    count, window = int(m.group(1)), _PER[m.group(2).lower()]
    if not 0 < count / window <= 100_000:
        raise InputError(f"{where} {text!r}: must be above 0 and at most 100000/s")
    return count, window


class Stopped(FlasherError):
    """The run is stopping (Ctrl-C, SIGTERM): no new registration starts."""


class Slot:
    """One registration's place in the governor's window."""

    __slots__ = ("_governor", "at")

    def __init__(self, governor: RateGovernor):
        self._governor = governor
        self.at: float | None = None   # when DPS answered; None while in flight

    def answered(self) -> None:
        """DPS answered the request (accepted it, or refused it other than by throttling): it counts from now."""
        self._governor._settle(self, counted=True)

    def refused(self) -> None:
        """DPS throttled the request (429): it never counted."""
        self._governor._settle(self, counted=False)


class RateGovernor:
    """At most ``count`` registrations per ``window`` seconds, lowered on 429, raised back on success. Thread-safe."""

    def __init__(self, count: int, window: float = 60.0, *, recover_after: int = 20,
                 clock: Callable[[], float] = time.monotonic):
        if count < 1 or window <= 0:
            raise ValueError(f"quota {count}/{window}s")
        self.ceiling = self.limit = int(count)
        self.window = float(window)
        self.recover_after = recover_after
        self._clock = clock
        self._open: set[Slot] = set()          # in flight: they count as if answered now
        self._times: deque[float] = deque()    # when each counted request was answered, oldest first
        self._hold_until = 0.0
        self._streak = 0
        self._cond = threading.Condition()
        self.throttle_count = 0

    @classmethod
    def from_text(cls, text: str, where: str = "--dps-rate", **kwargs) -> RateGovernor:
        count, window = parse_quota(text, where)
        return cls(count, window, **kwargs)

    @property
    def rate(self) -> float:
        """The current pace, in starts per second (for messages)."""
        return self.limit / self.window

    def _used(self, now: float) -> int:
        cutoff = now - self.window
        while self._times and self._times[0] <= cutoff:
            self._times.popleft()
        return len(self._open) + len(self._times)

    def _wait(self, now: float) -> float | None:
        """Seconds until a slot frees (0: one is free), or None when only an in-flight answer can free one."""
        hold = max(0.0, self._hold_until - now)
        excess = self._used(now) - self.limit + 1
        if excess <= 0:
            return hold
        if excess > len(self._times):
            return None
        return max(hold, self._times[excess - 1] + self.window - now)

    def wait_time(self) -> float | None:
        """Seconds until the next slot (0 when one is free now; None: when a request in flight is answered)."""
        with self._cond:
            return self._wait(self._clock())

    def try_acquire(self) -> Slot | None:
        with self._cond:
            return self._take() if self._wait(self._clock()) == 0 else None

    def _take(self) -> Slot:
        slot = Slot(self)
        self._open.add(slot)
        return slot

    def acquire(self, deadline: float | None = None, stop: threading.Event | None = None) -> Slot:
        """Wait for a slot; raises :class:`Stopped` when ``stop`` is set or ``deadline`` passes first."""
        with self._cond:
            while True:
                if stop is not None and stop.is_set():
                    raise Stopped("stopping: no new registration starts")
                now = self._clock()
                wait = self._wait(now)
                if wait == 0:
                    return self._take()
                if deadline is not None and (now >= deadline or (wait is not None and now + wait > deadline)):
                    raise Stopped(f"the DPS quota ({self.limit} per {self.window:g} s after throttling) leaves no "
                                  f"slot before the deadline")
                self._cond.wait(min(wait if wait is not None else 0.5, 0.5))   # a stop is seen within 0.5 s

    def _settle(self, slot: Slot, counted: bool) -> None:
        with self._cond:
            if slot not in self._open:
                return
            self._open.discard(slot)
            if counted:
                slot.at = self._clock()
                self._times.append(slot.at)
            self._cond.notify_all()

    def throttled(self, retry_after: float | None = None) -> None:
        """DPS answered 429: halve the count per window (once per hold) and hold everyone for ``retry_after`` s."""
        with self._cond:
            now = self._clock()
            self.throttle_count += 1
            self._streak = 0
            if now >= self._hold_until:
                self.limit = max(1, self.limit // 2)
            pause = retry_after if retry_after is not None and retry_after > 0 else self.window / self.limit
            self._hold_until = max(self._hold_until, now + pause)
            self._cond.notify_all()

    def succeeded(self) -> None:
        """A registration went through: after ``recover_after`` in a row, raise the count back by an eighth."""
        with self._cond:
            self._streak += 1
            if self.limit < self.ceiling and self._streak >= self.recover_after:
                self._streak = 0
                self.limit = min(self.ceiling, self.limit + max(1, self.ceiling // 8))
                self._cond.notify_all()


def in_flight_for(governor: RateGovernor, latency: float = 4.0, most: int = 256) -> int:
    """How many registrations to keep in flight so the quota, not the pool, sets the pace.

    Little's law: in flight = rate x time per registration (a few seconds inside the SDK).
    """
    return max(8, min(most, math.ceil(governor.rate * latency)))


class Turnstile:
    """At most ``width`` callers inside at once, let in in the order they came (a first-come-first-served semaphore).

    Why, for the SDK's connection set-ups: the TLS handshake, MQTT connect and subscribe
    and the first request are most of a registration's CPU. Where the CPU is the limit
    (256 boards on two cores), N set-ups started together share it and all finish late,
    so every device's wait for DPS (two seconds and more, which costs no CPU) starts late
    too. Let in a few at a time, in order, and the k-th device starts waiting after about k
    set-ups: the waits overlap the set-ups still queued, and the whole run ends sooner.
    A place is handed straight to the next in line, so none overtakes another.
    """

    def __init__(self, width: int):
        if width < 1:
            raise ValueError(f"width {width}: must be at least 1")
        self.width = width
        self._lock = threading.Lock()
        self._inside = 0
        self._queue: deque[threading.Event] = deque()

    def enter(self) -> Pass:
        """Wait for a place (as long as it takes: the places ahead are each left within a connection set-up)."""
        with self._lock:
            if self._inside < self.width and not self._queue:
                self._inside += 1
                return Pass(self)
            turn = threading.Event()
            self._queue.append(turn)
        turn.wait()   # set by _leave, which hands its place over
        return Pass(self)

    def _leave(self) -> None:
        with self._lock:
            if self._queue:
                self._queue.popleft().set()   # the place goes to the next in line; inside stays the same
            else:
                self._inside -= 1

    @property
    def inside(self) -> int:
        return self._inside


class Pass:
    """A place inside a :class:`Turnstile`; ``leave()`` may be called from any thread, and more than once."""

    __slots__ = ("_turnstile", "_lock")

    def __init__(self, turnstile: Turnstile):
        self._turnstile: Turnstile | None = turnstile
        self._lock = threading.Lock()

    def leave(self) -> None:
        with self._lock:
            turnstile, self._turnstile = self._turnstile, None
        if turnstile is not None:
            turnstile._leave()
