"""Pace registrations to the service's quota instead of capping them at a small fixed number.

DPS admits 1,000 registrations per minute per service unit (Microsoft's "DPS quotas
and limits"; 200/min in older documents) and answers 429 beyond it. A registration
spends most of its ≥ 2 s waiting inside the SDK, so what limits a fleet run is the
quota, not the number in flight. :class:`RateGovernor` is a token bucket shared by
every board of a run:

* ``acquire()`` waits for the next start slot at the current rate (no idle waiting
  while slots are free, no burst above the configured rate);
* ``throttled(retry_after)`` (a 429) halves the current rate and holds every caller
  until ``retry_after`` has passed, so one 429 never becomes a storm;
* ``succeeded()`` after a quiet spell raises the rate again, step by step, up to the
  configured ceiling (additive increase, multiplicative decrease, as TCP does).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable

from flasher.errors import FlasherError, InputError

DEFAULT_DPS_RATE = "1000/min"    # one DPS service unit (S1)
_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*", re.IGNORECASE)
_PER = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}


def parse_rate(text: str, where: str = "rate") -> float:
    """``"1000/min"`` → starts per second. ``/s``, ``/min`` and ``/h`` are understood."""
    m = _RATE.fullmatch(str(text))
    if not m:
        raise InputError(f"{where} {text!r}: expected a number per second, minute or hour, like 1000/min")
    per_second = float(m.group(1)) / _PER[m.group(2).lower()]
    if not 0 < per_second <= 100_000:
        raise InputError(f"{where} {text!r}: must be above 0 and at most 100000/s")
    return per_second


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


class RateGovernor:
    """A token bucket whose rate backs off on 429 and recovers on success. Thread-safe."""

    def __init__(self, per_second: float, *, burst: float = 1.0, floor: float = 0.2,
                 recover_after: int = 20, clock: Callable[[], float] = time.monotonic):
        self.ceiling = per_second
        self.rate = per_second
        self.floor = min(floor, per_second)
        self.burst = max(1.0, burst)
        self.recover_after = recover_after
        self._clock = clock
        self._tokens = self.burst
        self._last = clock()
        self._hold_until = 0.0
        self._streak = 0
        self._cond = threading.Condition()
        self.throttle_count = 0

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def wait_time(self) -> float:
        """Seconds until the next slot (0 when one is free now); does not take it."""
        with self._cond:
            now = self._clock()
            self._refill(now)
            hold = max(0.0, self._hold_until - now)
            need = 0.0 if self._tokens >= 1 - 1e-9 else (1 - self._tokens) / self.rate
            return max(hold, need)

    def try_acquire(self) -> bool:
        with self._cond:
            now = self._clock()
            self._refill(now)
            if now >= self._hold_until and self._tokens >= 1 - 1e-9:   # float sums of small steps
                self._tokens -= 1
                return True
            return False

    def acquire(self, deadline: float | None = None, stop: threading.Event | None = None) -> None:
        """Wait for a start slot; raises :class:`Stopped` when ``stop`` is set or ``deadline`` passes first."""
        while True:
            if stop is not None and stop.is_set():
                raise Stopped("stopping: no new registration starts")
            if self.try_acquire():
                return
            wait = self.wait_time()
            if deadline is not None:
                left = deadline - self._clock()
                if left <= 0 or wait > left:
                    raise Stopped(f"the DPS rate ({self.rate * 60:.0f}/min after throttling) leaves no slot "
                                  f"before the deadline")
            with self._cond:
                self._cond.wait(min(wait, 0.5) if wait > 0 else 0.01)

    def throttled(self, retry_after: float | None = None) -> None:
        """DPS answered 429: halve the rate and hold everyone for ``retry_after`` seconds (default 1/rate)."""
        with self._cond:
            now = self._clock()
            self._refill(now)
            self.throttle_count += 1
            self._streak = 0
            self.rate = max(self.floor, self.rate / 2)
            pause = retry_after if retry_after is not None and retry_after > 0 else 1 / self.rate
            self._hold_until = max(self._hold_until, now + pause)
            self._tokens = min(self._tokens, 0.0)
            self._cond.notify_all()

    def succeeded(self) -> None:
        """A registration went through: after ``recover_after`` in a row, step the rate back up."""
        with self._cond:
            self._streak += 1
            if self.rate < self.ceiling and self._streak >= self.recover_after:
                self._streak = 0
                self.rate = min(self.ceiling, self.rate + self.ceiling / 8)
                self._cond.notify_all()
