"""The rate governor: paced starts, one 429 slows everyone, success recovers, Ctrl-C stops waiters."""

from __future__ import annotations

import threading
import time

import pytest

from flasher.errors import InputError
from flasher.governor import RateGovernor, Stopped, parse_rate


class Clock:
    """A clock the test moves by hand, so pacing is checked exactly, not by timing."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("text,per_second", [("1000/min", 1000 / 60), ("5/s", 5.0), (" 7200 / hour ", 2.0),
                                             ("0.5/sec", 0.5), ("200/MIN", 200 / 60)])
def test_rates_parse(text, per_second):
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["1000", "fast", "0/min", "-5/s", "10/day", "1e9/s", ""])
def test_bad_rates_are_one_input_error_naming_the_value(text):
    with pytest.raises(InputError, match="--dps-rate"):
        parse_rate(text, "--dps-rate")


def test_slots_come_at_the_rate_and_no_faster():
    clock = Clock()
    g = RateGovernor(10.0, clock=clock)
    assert g.try_acquire() and not g.try_acquire()
    assert g.wait_time() == pytest.approx(0.1)
    clock.now += 0.05
    assert not g.try_acquire()
    clock.now += 0.05
    assert g.try_acquire()
    clock.now += 10   # a long idle spell does not bank a burst beyond `burst`
    assert g.try_acquire() and not g.try_acquire()


def test_a_429_halves_the_rate_and_holds_everyone_for_retry_after():
    clock = Clock()
    g = RateGovernor(10.0, clock=clock)
    assert g.try_acquire()
    g.throttled(retry_after=2.0)
    assert g.rate == pytest.approx(5.0) and g.throttle_count == 1
    clock.now += 1.9
    assert not g.try_acquire() and g.wait_time() == pytest.approx(0.1)
    clock.now += 0.1
    clock.now += 0.2   # one slot at the halved rate
    assert g.try_acquire() and not g.try_acquire()
    g.throttled(None)   # no retry-after: wait one slot at the new rate
    assert g.rate == pytest.approx(2.5) and g.wait_time() == pytest.approx(0.4)


def test_sustained_success_climbs_back_to_the_ceiling_and_not_beyond():
    g = RateGovernor(16.0, recover_after=3, clock=Clock())
    g.throttled(0)
    g.throttled(0)
    assert g.rate == pytest.approx(4.0)
    rates = []
    for _ in range(60):
        g.succeeded()
        rates.append(g.rate)
    assert rates == sorted(rates) and rates[-1] == pytest.approx(16.0) and max(rates) <= 16.0
    assert rates[1] == pytest.approx(4.0) and rates[2] == pytest.approx(6.0)   # one step per 3 successes


def test_threads_share_the_pace():
    """Eight threads taking 30 slots at 100/s: no window holds more starts than the rate allows."""
    g = RateGovernor(100.0)
    starts: list[float] = []
    lock = threading.Lock()

    def worker():
        for _ in range(30 // 8 + 1):
            g.acquire(deadline=time.monotonic() + 30)
            with lock:
                starts.append(time.monotonic())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(starts) == 8 * (30 // 8 + 1)
    starts.sort()
    window = 0.2
    for i, t0 in enumerate(starts):
        within = sum(1 for t in starts[i:] if t < t0 + window)
        assert within <= 100 * window + 1 + 1, (within, window)   # rate x window, the one-slot burst, rounding


def test_a_stop_or_a_deadline_ends_the_wait():
    g = RateGovernor(0.5)
    assert g.try_acquire()
    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped, match="stopping"):
        g.acquire(stop=stop)
    with pytest.raises(Stopped, match="deadline"):
        g.acquire(deadline=time.monotonic() + 0.5)   # the next slot is 2 s away


@pytest.mark.parametrize("text,quota", [("1000/min", (1000, 60.0)), ("5/s", (5, 1.0)), (" 7200 / hour ", (7200, 3600.0))])
def test_quotas_parse_as_a_count_per_window(text, quota):
    from flasher.governor import parse_quota
    assert parse_quota(text) == quota


@pytest.mark.parametrize("text", ["1000", "0.5/s", "0/min", "10/day", "1e9/s", ""])
def test_bad_quotas_are_one_input_error_naming_the_value(text):
    from flasher.governor import parse_quota
    with pytest.raises(InputError, match="--registration-quota"):
        parse_quota(text, "--registration-quota")
