"""A fleet in one process: every board at once, a ledger that commits many boards' writes together, and room
for the ports and sockets of hundreds of boards.

Real SQLite (and PostgreSQL where a server is available), real ptys from the board
simulator, real child processes killed by pid, real resource limits.
"""

from __future__ import annotations

import base64
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from fixtures_dps import GROUP_PRIMARY, ID_SCOPE

from flasher import sandbox
from flasher.at import ATClient
from flasher.eui import EUI64
from flasher.ledger import BoardClaimed, Ledger, LedgerError
from flasher.pipeline import DEFAULT_CONCURRENCY, Settings, fds_needed, provision_boards
from flasher.settings import SETTINGS


def euis(n: int) -> list[str]:
    return [f"2CF7F120249{i:05X}" for i in range(n)]


def wait_until(what, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class Held:
    """Another connection holding the SQLite file's write lock, so the ledger's next commit waits behind it."""

    def __init__(self, path):
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self.db.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self.db.execute("COMMIT")
        self.db.close()


def commits_of(led: Ledger) -> list[str]:
    """Every COMMIT the ledger's SQLite connection runs from now on."""
    seen: list[str] = []
    led._db.set_trace_callback(lambda sql: seen.append(sql) if sql.strip().upper() == "COMMIT" else None)
    return seen


def writers(led: Ledger, count: int, write) -> tuple[list[threading.Thread], dict[str, BaseException | None]]:
    """``count`` threads, each doing ``write(eui)`` once its turn comes; returns them and what each raised."""
    outcome: dict[str, BaseException | None] = {}

    def run(eui: str) -> None:
        try:
            write(eui)
            outcome[eui] = None
        except BaseException as exc:  # recorded for the test to judge
            outcome[eui] = exc

    threads = [threading.Thread(target=run, args=(e,)) for e in euis(count)]
    return threads, outcome


def test_writes_that_queue_behind_a_commit_share_the_next_one(tmp_path):
    path = tmp_path / "l.sqlite3"
    with Ledger(path) as led:
        for eui in euis(40):
            led.begin(eui, eui.lower())
        commits = commits_of(led)
        held = Held(path)
        threads, outcome = writers(led, 40, lambda eui: led.step_finished(eui, "render", "ok", "x.h"))
        threads[0].start()          # its commit waits for the file's write lock ...
        wait_until(lambda: led._committing)
        for t in threads[1:]:       # ... while the other 39 queue behind it
            t.start()
        wait_until(lambda: len(led._queue) == 39)
        assert commits == []        # none returned before it was committed
        held.release()
        for t in threads:
            t.join(timeout=30)
        assert outcome == {e: None for e in euis(40)}
        assert len(commits) == 2    # the first write alone, then the 39 others in one transaction
        assert {r.deveui: r.steps for r in led.all()} == {e: {"render": "ok"} for e in euis(40)}


def test_a_write_that_fails_is_rolled_back_alone_and_the_rest_of_its_transaction_is_written(tmp_path):
    path = tmp_path / "l.sqlite3"
    taken = euis(6)[3]
    with Ledger(path) as other:
        other.claim(taken)          # another live run holds board 3
        with Ledger(path) as led:
            for eui in euis(6):
                led.begin(eui, eui.lower())
            held = Held(path)

            def write(eui: str) -> None:
                if eui == taken:
                    led.claim(eui)
                elif eui == euis(6)[4]:  # writes its step row, then refuses an unknown field: none of it stays
                    led.step_finished(eui, "render", "ok", "x.h", no_such_column="1")
                else:
                    led.step_finished(eui, "render", "ok", "x.h")

            threads, outcome = writers(led, 6, write)
            threads[0].start()
            wait_until(lambda: led._committing)
            for t in threads[1:]:
                t.start()
            wait_until(lambda: len(led._queue) == 5)
            held.release()
            for t in threads:
                t.join(timeout=30)
            assert isinstance(outcome[taken], BoardClaimed)
            assert isinstance(outcome[euis(6)[4]], LedgerError) and "unknown field" in str(outcome[euis(6)[4]])
            ok = [e for e in euis(6) if e not in (taken, euis(6)[4])]
            assert all(outcome[e] is None for e in ok)
            steps = {r.deveui: r.steps for r in led.all()}
            assert steps == {**{e: {"render": "ok"} for e in ok}, taken: {}, euis(6)[4]: {}}
            db = sqlite3.connect(path)
            try:
                assert db.execute("SELECT run_id FROM claims WHERE deveui = ?", (taken,)).fetchone()[0] == other.run_id
            finally:
                db.close()


def test_a_commit_that_fails_fails_every_write_in_it_with_one_line_each(tmp_path):
    path = tmp_path / "l.sqlite3"
    with Ledger(path) as led:
        for eui in euis(5):
            led.begin(eui, eui.lower())
        held = Held(path)
        led._db.execute("PRAGMA busy_timeout = 300")  # the held lock outlasts it: BEGIN IMMEDIATE gives up
        threads, outcome = writers(led, 5, lambda eui: led.finish(eui))
        threads[0].start()
        wait_until(lambda: led._committing)
        for t in threads[1:]:
            t.start()
        for t in threads:
            t.join(timeout=30)
        held.release()
        errors = {str(exc) for exc in outcome.values()}
        assert all(isinstance(exc, LedgerError) for exc in outcome.values()), outcome
        assert errors == {f"ledger {str(path)!r}: cannot write (database is locked)"}
        assert {r.status for r in led.all()} == {"in_progress"}
        led._db.execute("PRAGMA busy_timeout = 30000")
        led.finish(euis(5)[0])      # and the ledger goes on working
        assert led.get(euis(5)[0]).status == "provisioned"


KILLED_WRITER = """
import sys, threading
from flasher.ledger import Ledger
led = Ledger(sys.argv[1])
lock = threading.Lock()
def board(i):
    eui = f"2CF7F12024{i:06X}"
    led.claim(eui)
    led.begin(eui, eui.lower())
    for step in ("identify", "derive", "render", "program", "register", "message"):
        led.step_started(eui, step)
        led.step_finished(eui, step, "ok", "")
    led.finish(eui)
    with lock:
        print(eui, flush=True)          # reported done only once finish() returned
threads = [threading.Thread(target=board, args=(i,)) for i in range(int(sys.argv[2]))]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("all", flush=True)
import time; time.sleep(60)
"""


def test_a_board_reported_done_is_in_the_ledger_even_if_the_process_is_killed_at_once(tmp_path):
    path = tmp_path / "l.sqlite3"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path), "64"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    reported: list[str] = []
    try:
        while len(reported) < 20:
            line = proc.stdout.readline().strip()
            assert line, proc.stderr.read()
            reported.append(line)
        os.kill(proc.pid, signal.SIGKILL)   # mid-run: other boards are still writing
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
    with Ledger(path, readonly=True) as led:
        records = {r.deveui: r for r in led.all()}
    assert all(records[eui].status == "provisioned" for eui in reported), reported
    for rec in records.values():             # and every other board says where it stopped
        assert rec.status == "provisioned" or rec.current_step is not None


def test_the_default_concurrency_is_the_pipelines_and_fits_256_boards():
    assert SETTINGS["concurrency"].default == DEFAULT_CONCURRENCY >= 256


LIMITS = """
import resource, sys
from flasher.errors import FlasherError
from flasher.pipeline import ensure_fd_limit
soft, hard = (int(x) for x in sys.argv[2:4])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
try:
    ensure_fd_limit(int(sys.argv[1]))
except FlasherError as exc:
    print("error:", exc)
print(*resource.getrlimit(resource.RLIMIT_NOFILE))
"""


def limits(boards: int, soft: int, hard: int) -> list[str]:
    out = subprocess.run([sys.executable, "-c", LIMITS, str(boards), str(soft), str(hard)], capture_output=True,
                         text=True, timeout=60, check=True)
    return out.stdout.splitlines()


def test_the_open_files_limit_is_raised_to_fit_the_boards_and_a_limit_too_low_is_one_line():
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < fds_needed(256):
        pytest.skip(f"this machine's hard limit on open files ({hard}) is below what 256 boards need")
    assert limits(256, 256, fds_needed(256)) == [f"{fds_needed(256)} {fds_needed(256)}"]
    assert limits(4, 256, 256) == ["256 256"]                     # enough already: left alone
    low = limits(256, 200, 300)
    assert low[1] == "200 300" and low[0].startswith("error: 256 boards at once need about ")
    assert "this process may open at most 300 (ulimit -Hn)" in low[0] and low[0].endswith("--concurrency 23")
    between = limits(256, 200, 2000)  # 193 boards' files would fit in 2000, but not with the ports above 1024
    assert between[0].endswith("--concurrency 96") and fds_needed(96) <= 2000 < fds_needed(97)


def test_a_serial_port_works_above_descriptor_1024_and_leaves_the_numbers_below_to_sockets(sim_boards):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1100:
        pytest.skip(f"this machine's hard limit on open files ({hard}) is too low")
    sim = sim_boards(1, seed=77)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1100), hard))
    try:
        with ATClient.open(sim.ports[0], timeout=2.0) as at:
            ser = at._ser
            assert min(ser.fd, ser.pipe_abort_read_r, ser.pipe_abort_write_r) >= 1024
            assert at.command("AT") == ["OK"]
            answer = at.command("AT+ID=DevEui")
            assert len(answer) == 1 and answer[0].replace(":", "").endswith(sim.boards[0].deveui.replace(":", ""))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_every_board_given_starts_at_once_by_default(sim_boards, make_dps_emulator, tmp_path):
    """20 boards, more than the old default of 16: with one board per thread, every board has started
    before any has finished (a board takes over two seconds at DPS); and they share one compiled template."""
    emu = make_dps_emulator(assign_delay=0.5)
    sim = sim_boards(20, seed=2020)
    settings = Settings(id_scope=ID_SCOPE, group_key=base64.b64decode(GROUP_PRIMARY), dps_host=emu.host,
                        ca_cert=str(emu.ca_cert_path), join_eui=EUI64.parse("70B3D57ED003F06A"),
                        out_dir=tmp_path / "headers")
    events: list[tuple[str, str, str]] = []

    class Log:
        def emit(self, event) -> None:
            events.append((event.port, event.step, str(event.state)))

        def close(self) -> None:
            pass

    compiled = sandbox.compile_count()
    with Ledger(tmp_path / "l.sqlite3") as led:
        results = list(provision_boards(sim.ports, settings, led, Log()))
    assert [r.status for r in results] == ["provisioned"] * 20, [r.error for r in results]
    # seeed-lorawan and the two templates it includes, each compiled once for all 20 boards (or 0: already cached)
    assert sandbox.compile_count() - compiled <= 3
    first_done = next(i for i, e in enumerate(events) if e[1] == "done")
    started = {port for port, step, state in events[:first_done] if step == "identify" and state == "running"}
    assert started == set(sim.ports)


def test_the_fd_budget_leaves_the_sdk_sockets_below_1024_and_puts_the_ports_above():
    assert fds_needed(1) < 1024     # a small run fits in select()'s range as it is
    assert fds_needed(256) >= 1024 + 256 * 5  # a big one: each port's five descriptors above 1024


def test_secrets_are_added_and_scrubbed_by_many_boards_at_once():
    """Every board adds its keys to the log masker while other boards' threads mask AT lines and errors."""
    from flasher.secrets import MASK, Redactor

    before, interval = Redactor._secrets, sys.getswitchinterval()
    failures: list[BaseException] = []
    done = threading.Event()

    def add(n: int) -> None:
        for i in range(300):
            Redactor.add(f"board-{n}-secret-{i:06d}")

    def scrub() -> None:
        try:
            while not done.is_set():
                Redactor.scrub("AT+KEY=APPKEY,\"board-0-secret-000000\"")
        except BaseException as exc:  # recorded for the test to judge
            failures.append(exc)

    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        scrubbers = [threading.Thread(target=scrub) for _ in range(4)]
        adders = [threading.Thread(target=add, args=(n,)) for n in range(4)]
        for t in scrubbers + adders:
            t.start()
        for t in adders:
            t.join(timeout=60)
        done.set()
        for t in scrubbers:
            t.join(timeout=60)
        assert failures == []
        assert Redactor.scrub("x board-3-secret-000299 y") == f"x {MASK} y"
    finally:
        sys.setswitchinterval(interval)
        Redactor._secrets = before


def test_what_sdk_clients_leave_to_the_cycle_collector_is_collected_every_so_many_clients():
    """paho leaves each client's wake-up socket pair in a reference cycle; a big run must not wait for Python's
    own full collection to get those descriptors back (paho's select() needs them below 1024)."""
    import gc
    import socket

    from flasher.dps import _SdkGarbage

    class Client:  # what paho leaves behind: a socket pair, reachable only through a cycle
        def __init__(self):
            self.pair = socket.socketpair()
            self.me = self

    def open_sockets() -> int:
        kinds = []
        for f in os.listdir("/proc/self/fd"):
            try:
                kinds.append(os.readlink(f"/proc/self/fd/{f}"))
            except FileNotFoundError:  # the listing's own descriptor, closed by now
                continue
        return sum(1 for k in kinds if k.startswith("socket:"))

    garbage = _SdkGarbage(every=3, room=1024)  # as if the numbers below 1024 were nearly all taken
    relaxed = _SdkGarbage(every=1, room=0)     # as if there were room enough: no collection needed
    enabled = gc.isenabled()
    gc.disable()  # only the collector under test collects
    try:
        gc.collect()
        before = open_sockets()
        for _ in range(3):
            Client()
        assert open_sockets() == before + 6
        relaxed.client_ended()
        assert open_sockets() == before + 6   # room enough: a full collection (tens of milliseconds) is not spent
        garbage.client_ended()
        garbage.client_ended()
        assert open_sockets() == before + 6   # not yet: only every third client
        garbage.client_ended()
        assert open_sockets() == before       # the third client: all three pairs closed
    finally:
        if enabled:
            gc.enable()
