"""The rate governor: a burst up to the quota, never more per window, one 429 slows everyone, success recovers."""

from __future__ import annotations

import threading
import time

import pytest

from flasher.errors import InputError
from flasher.governor import RateGovernor, Stopped, Turnstile, in_flight_for, parse_quota


class Clock:
    """A clock the test moves by hand, so pacing is checked exactly, not by timing."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("text,quota", [("1000/min", (1000, 60.0)), ("5/s", (5, 1.0)), (" 7200 / hour ", (7200, 3600.0)),
                                        ("200/MIN", (200, 60.0)), ("3/sec", (3, 1.0))])
def test_quotas_parse_as_a_count_per_window(text, quota):
    assert parse_quota(text) == quota


@pytest.mark.parametrize("text", ["1000", "fast", "0.5/s", "0/min", "-5/s", "10/day", "1e9/s", "200000/s", ""])
def test_bad_quotas_are_one_input_error_naming_the_value(text):
    with pytest.raises(InputError, match="--registration-quota"):
        parse_quota(text, "--registration-quota")


def test_a_burst_up_to_the_quota_goes_at_once_and_no_more():
    clock = Clock()
    g = RateGovernor(3, 60, clock=clock)
    slots = [g.try_acquire() for _ in range(3)]
    assert all(slots) and g.try_acquire() is None
    assert g.wait_time() is None          # all three in flight: only an answer can free one
    for s in slots:
        clock.now += 1
        s.answered()                      # answered at 1001, 1002, 1003
    assert g.wait_time() == pytest.approx(58.0)   # the first leaves the window at 1061
    clock.now = 1060.9
    assert g.try_acquire() is None
    clock.now = 1061.0
    assert g.try_acquire() is not None and g.try_acquire() is None


def test_a_throttled_request_does_not_count():
    clock = Clock()
    g = RateGovernor(2, 1, clock=clock)
    a, b = g.try_acquire(), g.try_acquire()
    a.answered()
    b.refused()
    assert g.try_acquire() is not None     # b's place is free again at once


def test_a_429_halves_the_quota_once_per_hold_and_holds_everyone_for_retry_after():
    clock = Clock()
    g = RateGovernor(8, 1, clock=clock)
    burst = [g.try_acquire() for _ in range(8)]
    for s in burst:
        s.refused()
        g.throttled(retry_after=2)         # eight 429s of one burst: one halving
    assert g.limit == 4 and g.throttle_count == 8
    clock.now += 1.9
    assert g.try_acquire() is None and g.wait_time() == pytest.approx(0.1)
    clock.now += 0.1
    got = [g.try_acquire() for _ in range(5)]
    assert sum(s is not None for s in got) == 4
    for s in filter(None, got):
        s.answered()
    clock.now += 5
    g.throttled(None)                      # after the hold: halves again, waits one slot at the new pace
    assert g.limit == 2 and g.wait_time() == pytest.approx(0.5)


def test_sustained_success_climbs_back_to_the_ceiling_and_not_beyond():
    g = RateGovernor(16, 1, recover_after=3, clock=Clock())
    g.throttled(0)
    g._hold_until = 0                      # a second, separate 429
    g.throttled(0)
    assert g.limit == 4
    limits = []
    for _ in range(60):
        g.succeeded()
        limits.append(g.limit)
    assert limits == sorted(limits) and limits[-1] == 16 and max(limits) <= 16
    assert limits[1] == 4 and limits[2] == 6     # one step of 16/8 per 3 successes


def test_threads_never_exceed_the_quota_in_any_window():
    """Eight threads taking 60 slots at 20 per 0.25 s: no 0.25 s window holds more than 20 answers."""
    g = RateGovernor(20, 0.25)
    answers: list[float] = []
    lock = threading.Lock()

    def worker():
        for _ in range(60 // 8 + 1):
            slot = g.acquire(deadline=time.monotonic() + 30)
            slot.answered()
            with lock:
                answers.append(slot.at)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(answers) == 8 * (60 // 8 + 1)
    answers.sort()
    for i, t0 in enumerate(answers):
        assert sum(1 for t in answers[i:] if t < t0 + 0.25) <= 20


def test_a_stop_or_a_deadline_ends_the_wait():
    g = RateGovernor(1, 2)
    g.try_acquire().answered()
    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped, match="stopping"):
        g.acquire(stop=stop)
    with pytest.raises(Stopped, match="deadline"):
        g.acquire(deadline=time.monotonic() + 0.5)   # the next slot is 2 s away


def test_an_answer_wakes_a_waiter():
    g = RateGovernor(1, 60)
    slot = g.try_acquire()
    got = []
    t = threading.Thread(target=lambda: got.append(g.acquire(deadline=time.monotonic() + 10)))
    t.start()
    slot.refused()
    t.join(10)
    assert got and got[0] is not None


def test_in_flight_follows_the_quota():
    assert in_flight_for(RateGovernor(1000, 60)) == 67        # 16.7/s x 4 s
    assert in_flight_for(RateGovernor(10, 60)) == 8           # never below 8
    assert in_flight_for(RateGovernor(100_000, 60)) == 256    # never above 256


# --- the turnstile: connection set-ups a few at a time, first come first served ---------

def _queue_up(gate: Turnstile, n: int, order: list[int], inside: list[int],
              release: threading.Event) -> list[threading.Thread]:
    """``n`` threads that line up one after another (each is waiting before the next starts) and, once in,
    note their number and how many are inside, then wait for ``release``."""
    lock = threading.Lock()
    threads = []

    def worker(i: int) -> None:
        entry = gate.enter()
        with lock:
            order.append(i)
            inside.append(gate.inside)
        release.wait(10)
        entry.leave()

    for i in range(n):
        t = threading.Thread(target=worker, args=(i,))
        t.start()
        threads.append(t)
        deadline = time.monotonic() + 5
        while len(gate._queue) + gate.inside < i + 1 and time.monotonic() < deadline:
            time.sleep(0.001)   # in line (or inside) before the next one comes
    return threads


def test_the_turnstile_lets_in_at_most_its_width():
    gate = Turnstile(3)
    order: list[int] = []
    inside: list[int] = []
    release = threading.Event()
    threads = _queue_up(gate, 12, order, inside, release)
    time.sleep(0.05)
    assert order == [0, 1, 2]   # the rest wait in line
    release.set()
    for t in threads:
        t.join(10)
    assert sorted(order) == list(range(12))
    assert max(inside) <= 3
    assert gate.inside == 0 and not gate._queue


def test_the_turnstile_lets_them_in_in_the_order_they_came():
    gate = Turnstile(1)
    order: list[int] = []
    release = threading.Event()
    threads = _queue_up(gate, 12, order, [], release)
    release.set()
    for t in threads:
        t.join(10)
    assert order == list(range(12))   # each left before the next was let in: the order is the turnstile's


def test_leaving_twice_frees_one_place():
    gate = Turnstile(2)
    a = gate.enter()
    gate.enter()
    a.leave()
    a.leave()
    assert gate.inside == 1


def test_a_turnstile_needs_a_width():
    with pytest.raises(ValueError):
        Turnstile(0)
