"""Schema versions: old ledgers are migrated whole or not at all; odd files are refused in one line.

``data/ledger-v1.sqlite3`` was written by flasher 0.1.0 (see data/make_ledger_v1.py);
``data/ledger-v1.status.*`` is what that version's ``flasher status --json/--csv`` printed for it
(later versions print the same, plus the columns added since: see ledger_golden.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from ledger_golden import golden
from ledger_mounts import tiny_tmpfs

from flasher import ledger as ledger_mod
from flasher.errors import InputError
from flasher.ledger import MIGRATIONS, SCHEMA, SCHEMA_VERSION, Ledger, LedgerError, export_csv, export_json

DATA = Path(__file__).parent / "data"
V1 = DATA / "ledger-v1.sqlite3"


def v1_copy(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.sqlite3"
    shutil.copyfile(V1, path)
    return path


def raw(path: Path) -> dict:
    """Everything a ledger holds, read with plain sqlite3."""
    db = sqlite3.connect(path)
    try:
        tables = sorted(r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
        return {"user_version": db.execute("PRAGMA user_version").fetchone()[0], "tables": tables,
                "boards": db.execute("SELECT * FROM boards ORDER BY deveui").fetchall(),
                "steps": db.execute("SELECT * FROM steps ORDER BY deveui, step").fetchall()}
    finally:
        db.close()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def counting(calls: list) -> list:
    """The real migrations, the last one counting its runs on a file (not the in-memory model of the schema)."""
    last = MIGRATIONS[-1]
    assert isinstance(last, str)

    def counted(db):
        calls.append(db.execute("PRAGMA database_list").fetchone()[2] or ":memory:")
        for statement in ledger_mod._statements(last):
            db.execute(statement)
    return [*MIGRATIONS[:-1], counted]


def test_the_fixture_is_what_flasher_0_1_0_wrote():
    before = raw(V1)
    assert before["user_version"] == 0 and before["tables"] == ["boards", "steps"]
    assert [b[2] for b in before["boards"]] == ["provisioned", "failed", "in_progress", "in_progress"]
    assert len(before["steps"]) == 19


def test_v1_ledger_is_migrated_keeping_every_board_field_and_step(tmp_path):
    path = v1_copy(tmp_path)
    before = raw(path)
    with Ledger(path) as led:
        records = led.all()
        assert [r.deveui for r in records] == [b[0] for b in before["boards"]]
        provisioned, failed, killed, retried = records
        assert provisioned.status == "provisioned" and provisioned.done("upload") and provisioned.steps["upload"] == "skipped"
        assert failed.current_step == "register" and failed.last_error.startswith("DPS refused")
        assert killed.current_step == "program" and not killed.done("program")
        assert retried.attempts == 2
        # what `flasher status --json/--csv` prints is byte for byte what 0.1.0 printed (newer fields appended)
        assert export_json(records) == golden("jsonl")
        assert export_csv(records) == golden("csv")
    after = raw(path)
    assert after["user_version"] == SCHEMA_VERSION
    assert after["tables"] == ["boards", "claims", "registrations", "steps"]
    for table in ("boards", "steps"):  # every row as it was; the columns added since are empty
        width = len(before[table][0])
        assert [row[:width] for row in after[table]] == before[table]
        assert {value for row in after[table] for value in row[width:]} <= {None}


def test_reopening_does_not_migrate_again(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(ledger_mod, "MIGRATIONS", counting(calls))
    path = v1_copy(tmp_path)
    Ledger(path).close()
    assert calls.count(str(path)) == 1
    migrated = digest(path)
    with Ledger(path) as led:
        assert len(led.all()) == 4
    assert calls.count(str(path)) == 1 and digest(path) == migrated


def test_a_migration_failing_halfway_leaves_the_ledger_at_v1_with_every_row(tmp_path, monkeypatch):
    def halfway(db):  # in place of the last migration, after the earlier ones ran in the same transaction
        db.execute("CREATE TABLE half_made (deveui TEXT PRIMARY KEY)")
        db.execute("UPDATE boards SET status = 'mangled'")
        db.execute("INSERT INTO no_such_table VALUES (1)")

    path = v1_copy(tmp_path)
    before = raw(path)
    monkeypatch.setattr(ledger_mod, "MIGRATIONS", [SCHEMA, halfway, *MIGRATIONS[2:]])
    with pytest.raises(LedgerError) as err:
        Ledger(path)
    assert str(err.value) == (f"ledger {str(path)!r}: cannot upgrade from schema 1 to {SCHEMA_VERSION} "
                              f"(no such table: no_such_table)")
    assert raw(path) == before
    monkeypatch.setattr(ledger_mod, "MIGRATIONS", MIGRATIONS)
    with Ledger(path) as led:
        assert [r.status for r in led.all()] == ["provisioned", "failed", "in_progress", "in_progress"]
    assert raw(path)["user_version"] == SCHEMA_VERSION


def test_a_new_column_is_one_more_migration(tmp_path, monkeypatch):
    path = tmp_path / "ledger.sqlite3"
    with Ledger(path) as led:
        led.begin("2CF7F12024900001", "2cf7f12024900001")
    monkeypatch.setattr(ledger_mod, "MIGRATIONS", [*MIGRATIONS, "ALTER TABLE boards ADD COLUMN firmware TEXT"])
    monkeypatch.setattr(ledger_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with Ledger(path) as led:
        assert led.get("2CF7F12024900001").attempts == 1
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    assert "firmware" in [r[1] for r in db.execute("PRAGMA table_info(boards)")]
    db.close()


def test_a_ledger_from_a_newer_flasher_is_refused_untouched(tmp_path):
    path = v1_copy(tmp_path)
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 7")
    db.close()
    before = digest(path)
    for kwargs in ({}, {"create": False}):
        with pytest.raises(LedgerError) as err:
            Ledger(path, **kwargs)
        assert str(err.value) == (f"ledger {str(path)!r}: written by a newer flasher (schema 7; "
                                  f"this one reads up to {SCHEMA_VERSION})")
    assert digest(path) == before and not Path(f"{path}-wal").exists()


def test_missing_columns_are_named(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA.replace("deveui          TEXT PRIMARY KEY", "eui TEXT PRIMARY KEY"))
    db.close()
    before = digest(path)
    with pytest.raises(InputError) as err:
        Ledger(path)
    assert str(err.value) == f"ledger {str(path)!r}: not a flasher ledger (table boards has no column deveui)"
    assert digest(path) == before

    db = sqlite3.connect(path)
    db.executescript("DROP TABLE steps; CREATE TABLE steps (deveui TEXT, step TEXT)")
    db.close()
    with pytest.raises(InputError, match=r"table boards has no column deveui"):
        Ledger(path)


def test_missing_steps_columns_are_named(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA.replace("outcome     TEXT NOT NULL,", "").replace("    detail      TEXT,\n", ""))
    db.close()
    with pytest.raises(InputError) as err:
        Ledger(path)
    assert str(err.value) == f"ledger {str(path)!r}: not a flasher ledger (table steps has no column outcome, detail)"


def test_a_schema_2_ledger_without_its_claims_table_is_refused(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    Ledger(path).close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE claims")
    db.close()
    with pytest.raises(InputError, match=r"not a flasher ledger \(no claims table\)"):
        Ledger(path)


def test_a_new_ledger_is_made_whole_at_the_current_schema(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    Ledger(path).close()
    after = raw(path)
    assert after["user_version"] == SCHEMA_VERSION and after["tables"] == ["boards", "claims", "registrations", "steps"]
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_failed_creation_leaves_no_file_and_no_folder_behind(tmp_path, monkeypatch):
    def fails(db):
        db.execute("CREATE TABLE claims (deveui TEXT PRIMARY KEY)")
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(ledger_mod, "MIGRATIONS", [SCHEMA, fails])
    path = tmp_path / "a" / "b" / "ledger.sqlite3"
    with pytest.raises(LedgerError) as err:
        Ledger(path)
    assert str(err.value) == f"ledger {str(path)!r}: cannot create (database or disk is full)"
    assert os.listdir(tmp_path) == []


def test_an_empty_file_becomes_a_ledger_but_only_when_creating(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    path.touch()
    with pytest.raises(InputError, match="not a flasher ledger"):
        Ledger(path, create=False)
    assert path.read_bytes() == b""
    Ledger(path).close()
    assert raw(path)["user_version"] == SCHEMA_VERSION


def test_folders_made_for_the_ledger_are_private_whatever_the_umask(tmp_path):
    existing = tmp_path / "shared"
    existing.mkdir(mode=0o755)
    old = os.umask(0o000)
    try:
        Ledger(existing / "x" / "y" / "ledger.sqlite3").close()
    finally:
        os.umask(old)
    assert existing.stat().st_mode & 0o777 == 0o755
    assert (existing / "x").stat().st_mode & 0o777 == 0o700
    assert (existing / "x" / "y").stat().st_mode & 0o777 == 0o700
    assert (existing / "x" / "y" / "ledger.sqlite3").stat().st_mode & 0o777 == 0o600


def test_a_creation_that_fills_a_real_disk_leaves_nothing_behind(tmp_path):
    disk = tmp_path / "disk"
    seen = tiny_tmpfs(disk, 64, 16, """
        import json, os, sys
        from flasher.ledger import Ledger, LedgerError
        disk = sys.argv[1]
        try:
            Ledger(os.path.join(disk, "bench", "ledger.sqlite3")).close()
            out = {"error": None}
        except LedgerError as exc:
            out = {"error": str(exc)}
        out["files"] = sorted(os.listdir(disk))
        print(json.dumps(out))
    """, str(disk))
    assert seen["error"].startswith(f"ledger {str(disk / 'bench' / 'ledger.sqlite3')!r}: cannot create (")
    assert "\n" not in seen["error"]
    assert seen["files"] == ["fill"]


def test_flasher_status_prints_for_an_old_ledger_what_0_1_0_printed(tmp_path, cli):
    path = v1_copy(tmp_path)
    for flag, kind in (("--json", "jsonl"), ("--csv", "csv")):
        code, out, err = cli("status", "--ledger", path, flag)
        assert (code, err) == (0, "") and out == golden(kind)


def test_flasher_status_on_a_newer_ledger_is_one_line_and_exit_1(tmp_path, cli):
    path = v1_copy(tmp_path)
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    code, out, err = cli("status", "--ledger", path, "--json")
    assert (code, out) == (1, "")
    assert err == (f"error: ledger {str(path)!r}: written by a newer flasher (schema {SCHEMA_VERSION + 1}; "
                   f"this one reads up to {SCHEMA_VERSION})\n")
