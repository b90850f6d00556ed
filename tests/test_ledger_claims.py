"""Claims: two runs on one ledger never work on the same board, and a dead run's boards are taken over.

A "run" is a Ledger object. Runs in other processes are real child processes,
killed or stopped with real signals by pid.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flasher.errors import EXIT_FAILURE
from flasher.ledger import BoardClaimed, Ledger, LedgerError

EUI = "2CF7F12024900001"
HOST = socket.gethostname()

CHILD = """
import sys, time
from flasher.ledger import Ledger
led = Ledger(sys.argv[1], stale_after=float(sys.argv[3]))
led.claim(sys.argv[2])
print(led.run_id, flush=True)
time.sleep(120)
"""


def claims(path: Path) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT deveui, run_id, pid, host, claimed_at, heartbeat_at FROM claims ORDER BY deveui").fetchall()
    finally:
        db.close()


def heartbeat_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ledger heartbeat")]


@pytest.fixture
def child(tmp_path):
    """Start a real python process that claims a board and sleeps; it is killed by pid afterwards."""
    started: list[subprocess.Popen] = []

    def start(path: Path, deveui: str, stale_after: float = 60.0) -> tuple[subprocess.Popen, str]:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), deveui, str(stale_after)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(proc)
        run_id = proc.stdout.readline().strip()
        assert run_id, proc.stderr.read()
        return proc, run_id

    yield start
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def test_a_second_run_cannot_claim_a_board_the_first_holds(tmp_path):
    path = tmp_path / "l.sqlite3"
    first, second = Ledger(path), Ledger(path)
    try:
        first.claim(EUI)
        first.claim(EUI)  # again, same run: fine
        with pytest.raises(BoardClaimed) as err:
            second.claim(EUI)
        assert str(err.value) == f"in progress in another run (pid {os.getpid()} on {HOST})"
        assert (err.value.pid, err.value.host, err.value.run_id) == (os.getpid(), HOST, first.run_id)
        assert isinstance(err.value, LedgerError) and err.value.exit_code == EXIT_FAILURE
        second.claim("2CF7F12024900002")  # another board: fine
        first.release(EUI)
        second.claim(EUI)
        with pytest.raises(BoardClaimed):
            first.claim(EUI)
        assert sorted((c[0], c[1]) for c in claims(path)) == [(EUI, second.run_id), ("2CF7F12024900002", second.run_id)]
        second.close()  # close releases everything the run held
        assert claims(path) == []
        first.claim(EUI)
        first.release("2CF7F12024900002")  # not held by this run: nothing happens
        assert [(c[0], c[1]) for c in claims(path)] == [(EUI, first.run_id)]
    finally:
        first.close()
        second.close()
    assert claims(path) == []


def test_each_ledger_object_is_its_own_run(tmp_path):
    path = tmp_path / "l.sqlite3"
    with Ledger(path) as a, Ledger(path) as b, Ledger(path, run_id="bench-7") as c:
        assert a.run_id != b.run_id and a.run_id.startswith(f"{HOST}:{os.getpid()}:") and c.run_id == "bench-7"


def test_of_many_runs_racing_for_a_board_exactly_one_wins(tmp_path):
    path = tmp_path / "l.sqlite3"
    runs = [Ledger(path) for _ in range(8)]
    barrier = threading.Barrier(len(runs))
    outcomes: list[str] = []

    def race(led: Ledger) -> None:
        barrier.wait()
        try:
            led.claim(EUI)
            outcomes.append("won")
        except BoardClaimed:
            outcomes.append("refused")

    threads = [threading.Thread(target=race, args=(led,)) for led in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for led in runs:
        led.close()
    assert sorted(outcomes) == ["refused"] * 7 + ["won"]


def test_a_claim_left_by_a_killed_process_is_taken_over(tmp_path, child):
    path = tmp_path / "l.sqlite3"
    Ledger(path).close()
    proc, run_id = child(path, EUI)
    with Ledger(path) as led:
        with pytest.raises(BoardClaimed) as err:
            led.claim(EUI)
        assert err.value.pid == proc.pid and err.value.run_id == run_id
        os.kill(proc.pid, signal.SIGKILL)  # no chance to release anything
        proc.wait(timeout=10)
        assert [c[1] for c in claims(path)] == [run_id]  # still there, but its holder is gone
        led.claim(EUI)
        assert [(c[1], c[2]) for c in claims(path)] == [(led.run_id, os.getpid())]


def test_a_stopped_process_keeps_its_claim_until_its_heartbeat_is_stale(tmp_path, child):
    """Its pid still exists, so only the heartbeat can tell: SIGSTOP freezes it."""
    path = tmp_path / "l.sqlite3"
    Ledger(path).close()
    proc, run_id = child(path, EUI, stale_after=1.5)
    with Ledger(path, stale_after=1.5) as led:
        time.sleep(2.0)  # longer than stale_after: only its heartbeats keep the claim
        with pytest.raises(BoardClaimed):
            led.claim(EUI)
        os.kill(proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while True:
            try:
                led.claim(EUI)
                break
            except BoardClaimed:
                assert time.monotonic() < deadline, "a frozen run's claim never went stale"
                time.sleep(0.1)
        assert claims(path)[0][1] == led.run_id
        assert proc.poll() is None  # taken over while its process still exists


def test_another_hosts_claim_counts_until_its_heartbeat_is_old(tmp_path):
    path = tmp_path / "l.sqlite3"
    Ledger(path).close()
    db = sqlite3.connect(path)
    now = time.time()
    with db:
        db.executemany("INSERT INTO claims (deveui, run_id, pid, host, claimed_at, heartbeat_at) VALUES (?, ?, ?, ?, ?, ?)", [
            ("2CF7F12024900001", "bench-2:4242:aa", 4242, "bench-2", now - 600, now - 120),  # silent for 2 min
            ("2CF7F12024900002", "bench-2:4242:aa", 4242, "bench-2", now - 600, now - 5),    # beat 5 s ago
            ("2CF7F12024900003", f"{HOST}:{os.getpid()}:bb", os.getpid(), HOST, now - 600, now - 120),  # pid reused
        ])
    db.close()
    with Ledger(path, stale_after=60) as led:
        led.claim("2CF7F12024900001")
        led.claim("2CF7F12024900003")
        with pytest.raises(BoardClaimed) as err:
            led.claim("2CF7F12024900002")
        assert str(err.value) == "in progress in another run (pid 4242 on bench-2)"
        assert (err.value.pid, err.value.host) == (4242, "bench-2")
        held = {c[0]: c[1] for c in claims(path)}
        assert held == {"2CF7F12024900001": led.run_id, "2CF7F12024900002": "bench-2:4242:aa",
                        "2CF7F12024900003": led.run_id}


def test_one_heartbeat_thread_while_claims_are_held_and_none_after_close(tmp_path):
    path = tmp_path / "l.sqlite3"
    assert heartbeat_threads() == []
    led = Ledger(path, stale_after=0.2)
    try:
        led.begin(EUI, EUI.lower())
        assert heartbeat_threads() == []  # no claim, no thread
        led.claim(EUI)
        led.claim("2CF7F12024900002")
        assert len(heartbeat_threads()) == 1
        claimed_at = claims(path)[0][4]
        time.sleep(0.3)
        beats = [c[5] for c in claims(path)]
        time.sleep(0.3)
        later = [c[5] for c in claims(path)]
        assert all(claimed_at < b < b2 for b, b2 in zip(beats, later, strict=True))
    finally:
        led.close()
    assert heartbeat_threads() == [] and claims(path) == []


def test_a_read_only_ledger_takes_no_claims(tmp_path):
    path = tmp_path / "l.sqlite3"
    Ledger(path).close()
    with Ledger(path, readonly=True) as led:
        with pytest.raises(LedgerError, match="opened read-only"):
            led.claim(EUI)
        assert heartbeat_threads() == []
