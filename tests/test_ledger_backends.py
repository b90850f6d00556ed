"""One ledger, two back ends: the same calls give the same results and the same messages on SQLite and PostgreSQL.

The PostgreSQL half runs against a real server (fixtures_pg.py), each test in a fresh
database. What only one back end has (files, read-only media; passwords, a server
that cannot be reached) is tested at the end of this file or beside that back end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from flasher import ledger as ledger_mod
from flasher.errors import InputError
from flasher.ledger import MIGRATIONS, SCHEMA_VERSION, BoardClaimed, Ledger, LedgerError, export_json

EUI = "2CF7F12024900001"
HOST = socket.gethostname()


def rows(led: Ledger, sql: str, params=()) -> list[tuple]:
    """Plain SQL through the ledger's own back end (its placeholders are "?" on both)."""
    with led._backend.transaction(write=False) as db:
        return [tuple(r) for r in db.execute(sql, params)]


def version(led: Ledger) -> int:
    with led._backend.transaction(write=False) as db:
        return led._backend.user_version(db)


def test_steps_and_stations_are_recorded_and_survive_reopen(ledger_place):
    with ledger_place.open(station="bench-1") as led:
        led.begin(EUI, EUI.lower(), port="/dev/ttyACM0", band="EU868")
        led.step_started(EUI, "derive")
        led.step_finished(EUI, "derive", "ok", "fine")
        led.step_started(EUI, "render")
    with ledger_place.open(station="bench-2") as led:
        rec = led.get(EUI)
        assert (rec.status, rec.current_step, rec.station, rec.attempts, rec.band) == ("in_progress", "render",
                                                                                      "bench-1", 1, "EU868")
        assert rec.steps == {"derive": "ok", "render": "started"}
        led.step_finished(EUI, "render", "failed", "disk full")
        assert (led.get(EUI).status, led.get(EUI).last_error) == ("failed", "disk full")
        led.begin(EUI, EUI.lower())
        led.step_started(EUI, "render")
        led.step_finished(EUI, "render")
        led.finish(EUI)
        rec = led.get(EUI)
        assert (rec.status, rec.attempts, rec.last_error, rec.station) == ("provisioned", 2, None, "bench-2")
        assert rows(led, "SELECT step, outcome, station, detail FROM steps ORDER BY step") == [
            ("derive", "ok", "bench-1", "fine"), ("render", "ok", "bench-2", None)]
        assert abs(rec.updated_at - time.time()) < 5  # stored to the microsecond (PostgreSQL's REAL would be 2 min)
        assert rec.created_at < rec.updated_at


def test_a_failed_transaction_leaves_nothing(ledger_place):
    with ledger_place.open() as led:
        led.begin(EUI, EUI.lower())
        with pytest.raises(LedgerError, match="unknown field"):
            led.step_finished(EUI, "derive", "ok", None, no_such_field=1)
        assert led.get(EUI).steps == {}


def test_sixteen_threads_write_at_once(ledger_place):
    with ledger_place.open() as led:
        def work(i):
            eui = f"{i:016X}"
            led.claim(eui)
            led.begin(eui, eui.lower())
            for step in ("derive", "render", "program"):
                led.step_started(eui, step)
                led.step_finished(eui, step)
            led.finish(eui)
            led.release(eui)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        recs = led.all()
        assert len(recs) == 16 and all(r.status == "provisioned" and len(r.steps) == 3 for r in recs)
        assert rows(led, "SELECT count(*) FROM claims") == [(0,)]


@pytest.mark.parametrize("left", ["no claim", "a dead station's claim"])
def test_of_many_runs_and_stations_racing_for_a_board_exactly_one_wins(ledger_place, left):
    """Taking over a dead claim is the subtle race: each taker must judge the row it then overwrites (a row lock)."""
    runs = [ledger_place.open(station=f"bench-{i % 2}") for i in range(8)]
    if left != "no claim":
        now = runs[0]._backend.now()
        with runs[0]._tx() as db:
            db.execute("INSERT INTO claims (deveui, run_id, pid, host, claimed_at, heartbeat_at, station) VALUES "
                       "(?, 'bench-9:1:aa', 1, 'bench-9', ?, ?, 'bench-9')", (EUI, now - 900, now - 600))
    barrier = threading.Barrier(len(runs))
    outcomes: dict[int, object] = {}

    def race(i: int) -> None:
        barrier.wait()
        try:
            runs[i].claim(EUI)
            outcomes[i] = "won"
        except BoardClaimed as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(runs))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        [winner] = [i for i, o in outcomes.items() if o == "won"]
        for i, exc in outcomes.items():
            if i == winner:
                continue
            assert isinstance(exc, BoardClaimed) and exc.run_id == runs[winner].run_id
            if runs[i].station == runs[winner].station:
                assert str(exc) == f"in progress in another run (pid {os.getpid()} on {HOST})"
            else:
                assert str(exc) == f"in progress at station {runs[winner].station} (pid {os.getpid()} on {HOST})"
        assert rows(runs[0], "SELECT run_id, station FROM claims") == [(runs[winner].run_id, runs[winner].station)]
    finally:
        for led in runs:
            led.close()


def test_another_stations_claim_counts_until_its_heartbeat_is_older_than_the_claim_timeout(ledger_place):
    with ledger_place.open() as setup:
        now = setup._backend.now()
        with setup._tx() as db:
            for eui, age, station in (("2CF7F12024900001", 120, "bench-2"), ("2CF7F12024900002", 5, "bench-2"),
                                      ("2CF7F12024900003", 5, HOST)):
                # bench-2 and this station's own claim from a process that is gone (pid 2**22 + 1 never exists)
                pid, host = (4242, "bench-2") if station == "bench-2" else (2**22 + 1, HOST)
                db.execute("INSERT INTO claims (deveui, run_id, pid, host, claimed_at, heartbeat_at, station) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", (eui, f"{host}:{pid}:aa", pid, host, now - 600, now - age,
                                                            station))
    with ledger_place.open(stale_after=60) as led:
        led.claim("2CF7F12024900001")          # silent for two minutes: taken over
        led.claim("2CF7F12024900003")          # this station's, and its process is gone: taken over at once
        with pytest.raises(BoardClaimed) as err:
            led.claim("2CF7F12024900002")      # another station's, beating: another machine may share a hostname
        assert str(err.value) == "in progress at station bench-2 (pid 4242 on bench-2)"
        held = dict(rows(led, "SELECT deveui, run_id FROM claims ORDER BY deveui"))
        assert held == {"2CF7F12024900001": led.run_id, "2CF7F12024900002": "bench-2:4242:aa",
                        "2CF7F12024900003": led.run_id}


def test_heartbeats_keep_claims_and_close_releases_them(ledger_place):
    with ledger_place.open(stale_after=0.4) as led:
        led.claim(EUI)
        first = rows(led, "SELECT heartbeat_at FROM claims")[0][0]
        time.sleep(0.5)
        assert rows(led, "SELECT heartbeat_at FROM claims")[0][0] > first
        with ledger_place.open(stale_after=0.4) as other:  # beating: still taken, though older than stale_after
            with pytest.raises(BoardClaimed):
                other.claim(EUI)
    with ledger_place.open() as led:
        assert rows(led, "SELECT count(*) FROM claims") == [(0,)]


def test_paging_and_the_station_filter_give_what_all_gives(ledger_place):
    with ledger_place.open(station="bench-a") as a, ledger_place.open(station="bench-b") as b:
        for i in range(7):
            (a if i % 3 else b).begin(f"{i:016X}", f"{i:016x}")
        everything = a.all()
        assert len(everything) == 7
        for batch in (1, 2, 7, 100):
            assert list(a.iter_records(batch=batch)) == everything
            assert list(a.iter_records(batch=batch, station="bench-b")) == b.all(station="bench-b") == \
                [r for r in everything if r.station == "bench-b"]
        assert [r.deveui for r in a.all(station="bench-b")] == ["0000000000000000", "0000000000000003",
                                                                 "0000000000000006"]
        assert list(a.iter_records(station="nobody")) == []


def test_read_only_writes_nothing_and_says_so(ledger_place):
    with ledger_place.open() as led:
        led.begin(EUI, EUI.lower())
    with ledger_place.open(readonly=True, create=False) as ro:
        assert ro.get(EUI).attempts == 1
        for write in (lambda: ro.begin(EUI, "x"), lambda: ro.claim(EUI), lambda: ro.finish(EUI)):
            with pytest.raises(LedgerError) as err:
                write()
            assert str(err.value) == f"ledger {str(ro.path)!r}: opened read-only"


def test_a_new_column_is_one_migration_line_on_both(ledger_place, monkeypatch):
    with ledger_place.open() as led:
        led.begin(EUI, EUI.lower())
    monkeypatch.setattr(ledger_mod, "MIGRATIONS", [*MIGRATIONS, "ALTER TABLE boards ADD COLUMN firmware TEXT"])
    monkeypatch.setattr(ledger_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with ledger_place.open() as led:
        assert led.get(EUI).attempts == 1 and version(led) == SCHEMA_VERSION + 1
        assert _has_column(led, "firmware")


def _has_column(led: Ledger, column: str) -> bool:
    with led._backend.transaction(write=False) as db:
        return column in led._backend.columns(db, "boards")


def test_a_migration_failing_halfway_leaves_the_ledger_as_it_was(ledger_place, monkeypatch):
    with ledger_place.open() as led:
        led.begin(EUI, EUI.lower())

    def halfway(db):
        db.execute("ALTER TABLE boards ADD COLUMN firmware TEXT")
        db.execute("UPDATE boards SET status = 'mangled'")
        db.execute("INSERT INTO no_such_table VALUES (1)")

    monkeypatch.setattr(ledger_mod, "MIGRATIONS", [*MIGRATIONS, halfway])
    monkeypatch.setattr(ledger_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(LedgerError) as err:
        ledger_place.open()
    assert str(err.value).startswith(f"ledger {ledger_place.target()!r}: cannot upgrade from schema "
                                     f"{SCHEMA_VERSION} to {SCHEMA_VERSION + 1} (")
    assert "no_such_table" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.undo()
    with ledger_place.open() as led:
        assert version(led) == SCHEMA_VERSION and led.get(EUI).status == "in_progress"
        assert not _has_column(led, "firmware")


def test_a_ledger_from_a_newer_flasher_is_refused_untouched(ledger_place):
    with ledger_place.open() as led:
        led.begin(EUI, EUI.lower())
        with led._tx() as db:
            led._backend.set_version(db, SCHEMA_VERSION + 4)
    for kwargs in ({}, {"create": False}, {"readonly": True, "create": False}):
        with pytest.raises(LedgerError) as err:
            ledger_place.open(**kwargs)
        assert str(err.value) == (f"ledger {ledger_place.target()!r}: written by a newer flasher "
                                  f"(schema {SCHEMA_VERSION + 4}; this one reads up to {SCHEMA_VERSION})")


# --- PostgreSQL only ------------------------------------------------------------------

def test_stations_opening_an_empty_database_at_once_create_it_once(pg_url):
    opened, failures = [], []
    barrier = threading.Barrier(4)

    def open_it():
        barrier.wait()
        try:
            opened.append(Ledger(pg_url))
        except Exception as exc:  # collected and asserted on below
            failures.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert failures == [] and len(opened) == 4
        assert rows(opened[0], "SELECT version FROM flasher_schema") == [(SCHEMA_VERSION,)]
        with opened[0]._backend.transaction(write=False) as db:
            assert sorted(opened[0]._backend.tables(db)) == ["boards", "claims", "registrations", "steps"]
    finally:
        for led in opened:
            led.close()


def test_a_database_with_other_tables_is_refused_untouched(pg_server, pg_url):
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE notes (x TEXT)")
    for create in (True, False):
        with pytest.raises(InputError) as err:
            Ledger(pg_url, create=create)
        assert str(err.value) == f"ledger {pg_url!r}: not a flasher ledger (no boards/steps tables)"
    with psycopg.connect(pg_url) as conn:
        assert [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")] == ["notes"]


def test_an_unreachable_server_is_one_line(pg_server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]   # nothing listens here once it is closed
    url = f"postgresql://flasher@127.0.0.1:{port}/fleet"
    with pytest.raises(LedgerError) as err:
        Ledger(url)
    assert str(err.value).startswith(f"ledger {url!r}: cannot connect (connection failed: ")
    assert "Connection refused" in str(err.value) and "\n" not in str(err.value)


def test_passwords_come_from_a_file_or_pgpassword_and_never_show(pg_server, pg_url, tmp_path, monkeypatch, cli):
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))  # no ~/.pgpass either
    monkeypatch.delenv("PGPASSWORD", raising=False)
    with pytest.raises(LedgerError) as err:
        Ledger(pg_url)
    assert "no password supplied" in str(err.value) and "PGPASSWORD, a ~/.pgpass line, or ledger_password_file" in \
        str(err.value)
    secret = pg_server.password
    (tmp_path / "pw").write_text(secret + "\n")
    code, out, errs = cli("status", "--ledger", pg_url, "--ledger-password-file", tmp_path / "pw", "--json")
    assert (code, errs) == (2, f"error: ledger {pg_url!r}: not a flasher ledger (no boards/steps tables)\n")
    monkeypatch.setenv("PGPASSWORD", secret)
    Ledger(pg_url).close()
    code, out, errs = cli("status", "--ledger", pg_url, "--json")
    assert (code, out, errs) == (0, "", "")
    (tmp_path / "wrong").write_text("not-the-password\n")
    code, out, errs = cli("-v", "status", "--ledger", pg_url, "--ledger-password-file", tmp_path / "wrong")
    assert code == 1 and 'password authentication failed for user "flasher"' in errs
    assert "not-the-password" not in out + errs and secret not in out + errs


def test_a_password_in_the_url_is_refused_and_not_shown(cli, tmp_path):
    for args in (["status", "--ledger", "postgresql://flasher:hunter2hunter2@db.lab/fleet"],
                 ["provision", "--port", "/dev/null", "--ledger", "postgresql://flasher@db.lab/fleet?password=hunter2hunter2"],
                 ["ledger", "copy", "a.sqlite3", "postgres://u:hunter2hunter2@db.lab/fleet"]):
        code, out, err = cli(*args)
        assert code == 2 and "hunter2hunter2" not in out + err and "****" in err, (args, err)
        assert "a password in the URL would be visible" in err and len(err.splitlines()) == 1
    (tmp_path / "flasher.toml").write_text('ledger = "postgresql://flasher:hunter2hunter2@db.lab/fleet"\n')
    code, out, err = cli("status", "--config", tmp_path / "flasher.toml")
    assert code == 2 and "hunter2hunter2" not in out + err and "flasher.toml: ledger" in err
    code, out, err = cli("status", "--ledger", "mysql://db.lab/fleet")
    assert code == 2 and "unknown kind of ledger 'mysql'" in err


def test_a_ledger_url_in_flasher_toml_is_not_taken_for_a_relative_path(cli, tmp_path, pg_url):
    (tmp_path / "flasher.toml").write_text(f'ledger = "{pg_url}"\nstation_id = "bench-7"\n')
    code, out, err = cli("config", "--config", tmp_path / "flasher.toml", "--json")
    assert code == 0, err
    settings = {r["name"]: r for r in map(json.loads, out.splitlines())}
    assert settings["ledger"]["value"] == pg_url and settings["station_id"]["value"] == "bench-7"
    assert settings["claim_timeout"]["value"] == 60.0 and settings["ledger_password"]["value"] == "(secret)"
    code, out, err = cli("provision", "--port", "/dev/null", "--station-id", "two words")
    assert code == 2 and "a station id is 1 to 63 letters" in err


def test_without_psycopg_a_server_ledger_names_the_extra_to_install(pg_url):
    code = ("import sys; sys.modules['psycopg'] = None\n"   # as if flasher[postgres] were not installed
            "from flasher.cli import main\n"
            f"main(['status', '--ledger', {pg_url!r}])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (f"error: ledger {pg_url!r}: a PostgreSQL ledger needs psycopg 3 and psycopg_pool (psycopg "
                           f"is missing): pip install 'flasher[postgres]'\n")
    plain = subprocess.run([sys.executable, "-c", code.replace(repr(pg_url), "'l.sqlite3'")], capture_output=True,
                           text=True, timeout=60)   # a file ledger never needs it
    assert "psycopg" not in plain.stderr and "no such file" in plain.stderr


def test_exports_match_between_the_back_ends(pg_url, tmp_path):
    """The same writes give the same export on both, field for field (times aside)."""
    def fill(led: Ledger) -> None:
        led.begin(EUI, EUI.lower(), port="/dev/ttyACM0", band="EU868", attempts=0)
        led.step_started(EUI, "derive")
        led.step_finished(EUI, "derive", "ok", "x")
        led.finish(EUI)

    exports = []
    for target in (str(tmp_path / "l.sqlite3"), pg_url):
        with Ledger(target, station="bench-1") as led:
            fill(led)
            exports.append([{k: v for k, v in json.loads(line).items() if not k.endswith("_at")}
                            for line in export_json(led.all()).splitlines()])
    assert exports[0] == exports[1] and exports[0][0]["station"] == "bench-1"


def test_an_id_in_flight_is_noted_and_an_assignment_is_never_undone(ledger_place):
    """register --input's bookkeeping on both back ends: 'registering' before the id is sent, then its outcome;
    noting an id again never undoes an assignment, and a failure never does either."""
    scope, host = "0ne0001A2B3", "Global.Azure-Devices-Provisioning.net"
    ids = ["2cf7f1202490c001", "2CF7F1202490C002", "2cf7f1202490c003"]
    with ledger_place.open(station="bench-1") as led:
        def in_state(state, scope=scope):
            return {k: r for k, r in led.pre_registrations(ids, scope, host).items() if r.status == state}


        for r in ids:
            led.registering(r, id_scope=scope, dps_host=host)
        assert set(in_state("registering")) == {r.lower() for r in ids}
        led.record_registration(ids[0], id_scope=scope, dps_host=host, status="assigned", device_key_check="k",
                                assigned_hub="hub-1", device_id=ids[0], message_sent=True)
        led.record_registration(ids[1], id_scope=scope, dps_host=host, status="failed", error="timeout")
        led.registering(ids[0], id_scope=scope, dps_host=host)     # sent again (say, for its test message)
        led.record_registration(ids[0], id_scope=scope, dps_host=host, status="failed", error="401")
        assert set(in_state("registering")) == {ids[2]}
        assert set(in_state("registering", "0ne0009Z9Z9")) == set()   # another DPS: nothing of ours
        assert {k: (r.device_key_check, r.message_sent) for k, r in in_state("assigned").items()} == {ids[0]: ("k", True)}
        led.registering(ids[1], id_scope=scope, dps_host=host)     # a failed one is retried
        assert set(in_state("registering")) == {ids[1].lower(), ids[2]}
