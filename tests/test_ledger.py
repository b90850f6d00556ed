import json
import threading

import pytest

from flasher.errors import InputError
from flasher.ledger import Ledger, LedgerError, export_csv, export_json


def test_steps_are_recorded_and_survive_reopen(tmp_path):
    path = tmp_path / "l.sqlite3"
    with Ledger(path) as led:
        led.begin("2CF7F12024900138", "2cf7f12024900138", port="/dev/pts/9", band="EU868")
        led.step_started("2CF7F12024900138", "derive")
        led.step_finished("2CF7F12024900138", "derive")
        led.step_started("2CF7F12024900138", "render")
    # a "crash": reopen from disk
    with Ledger(path) as led:
        rec = led.get("2CF7F12024900138")
        assert rec.status == "in_progress" and rec.current_step == "render"
        assert rec.done("derive") and not rec.done("render")
        assert rec.attempts == 1 and rec.band == "EU868"
        led.step_finished("2CF7F12024900138", "render", "failed", "disk full")
        rec = led.get("2CF7F12024900138")
        assert rec.status == "failed" and rec.last_error == "disk full"
        led.begin("2CF7F12024900138", "2cf7f12024900138")
        led.finish("2CF7F12024900138")
        rec = led.get("2CF7F12024900138")
        assert rec.status == "provisioned" and rec.attempts == 2 and rec.last_error is None
    assert (path.stat().st_mode & 0o777) == 0o600


def test_failed_transaction_leaves_nothing(tmp_path):
    with Ledger(tmp_path / "l.sqlite3") as led:
        led.begin("AA00000000000001", "aa00000000000001")
        with pytest.raises(LedgerError, match="unknown field"):
            led.step_finished("AA00000000000001", "derive", "ok", None, no_such_field=1)
        assert led.get("AA00000000000001").steps == {}


def test_concurrent_writers(tmp_path):
    led = Ledger(tmp_path / "l.sqlite3")

    def work(i):
        eui = f"{i:016X}"
        led.begin(eui, eui.lower())
        for step in ("derive", "render", "program"):
            led.step_started(eui, step)
            led.step_finished(eui, step)
        led.finish(eui)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recs = led.all()
    assert len(recs) == 16 and all(r.status == "provisioned" and len(r.steps) == 3 for r in recs)
    rows = export_csv(recs).splitlines()
    assert rows[0].startswith("deveui,registration_id,status") and len(rows) == 17
    assert all(json.loads(line)["status"] == "provisioned" for line in export_json(recs).splitlines())
    led.close()


def test_not_a_ledger(tmp_path):
    bad = tmp_path / "x.sqlite3"
    bad.write_text("this is not sqlite" * 100)
    with pytest.raises(InputError, match="not a flasher ledger"):
        Ledger(bad)
    with pytest.raises(InputError, match="no such file"):
        Ledger(tmp_path / "missing.sqlite3", create=False)
    with pytest.raises(InputError, match="is a directory"):
        Ledger(tmp_path)


def test_reading_never_changes_someone_elses_database(tmp_path):
    import sqlite3

    other = tmp_path / "other.sqlite3"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE notes (x TEXT)")
    other.chmod(0o644)
    for create in (False, True):
        with pytest.raises(InputError, match="no boards/steps tables"):
            Ledger(other, create=create)
    with sqlite3.connect(other) as db:
        assert [r[0] for r in db.execute("SELECT name FROM sqlite_master")] == ["notes"]
    assert other.stat().st_mode & 0o777 == 0o644


def test_a_full_disk_is_one_line_and_loses_nothing_committed(tmp_path):
    """SQLite's own limit (max_page_count) makes the disk "full" for real, mid-transaction."""
    path = tmp_path / "l.sqlite3"
    led = Ledger(path)
    try:
        pages = led._db.execute("PRAGMA page_count").fetchone()[0]
        led._db.execute(f"PRAGMA max_page_count = {pages + 2}")
        written = []
        with pytest.raises(LedgerError) as err:
            for i in range(1000):
                eui = f"{i:016X}"
                led.begin(eui, eui.lower(), port="/dev/ttyACM0", last_error="x" * 500)
                written.append(eui)
        assert str(err.value) == f"ledger {str(path)!r}: cannot write (database or disk is full)"
        assert 0 < len(written) < 1000
        assert [r.deveui for r in led.all()] == written  # the board being written is not half there
        assert all(r.last_error == "x" * 500 and r.attempts == 1 for r in led.all())
        led._db.execute("PRAGMA max_page_count = 1073741823")  # space freed: the same object goes on
        led.begin("FFFF000000000001", "ffff000000000001")
        led.step_started("FFFF000000000001", "derive")
        led.step_finished("FFFF000000000001", "derive")
    finally:
        led.close()
    with Ledger(path) as led:
        assert [r.deveui for r in led.all()] == [*written, "FFFF000000000001"]
        assert led.get("FFFF000000000001").done("derive")


def test_closing_twice_is_fine_and_a_closed_ledger_says_so(tmp_path):
    path = tmp_path / "l.sqlite3"
    led = Ledger(path)
    led.close()
    led.close()
    for use in (lambda: led.begin("AA00000000000001", "aa00000000000001"), led.all, lambda: led.claim("AA00000000000001")):
        with pytest.raises(LedgerError) as err:
            use()
        assert str(err.value) == f"ledger {str(path)!r}: already closed"
