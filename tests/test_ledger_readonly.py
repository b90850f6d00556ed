"""Read-only ledgers: `flasher status` reads any ledger, even an old one on read-only media, and changes nothing.

The tests run as root, where permission bits do not stop a write, so the media tests
use a real read-only file system: a read-only bind mount inside a private mount
namespace (see ledger_mounts.py), which disappears with the child process that reads it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from ledger_golden import v1_status
from ledger_mounts import read_only

from flasher.errors import InputError
from flasher.ledger import SCHEMA_VERSION, Ledger, LedgerError, export_csv, export_json

DATA = Path(__file__).parent / "data"


def snapshot(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


@pytest.fixture
def v1(tmp_path) -> Path:
    (tmp_path / "v1").mkdir()
    path = tmp_path / "v1" / "ledger.sqlite3"
    shutil.copyfile(DATA / "ledger-v1.sqlite3", path)
    os.utime(path, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))  # any write would move it
    return path


def test_readonly_reads_an_old_ledger_as_it_is_and_writes_nothing(v1):
    before = snapshot(v1)
    with Ledger(v1, create=False, readonly=True) as led:
        records = led.all()
        assert export_json(records) == v1_status("jsonl")
        assert export_csv(led.iter_records(batch=3)) == v1_status("csv")
        assert led.get("2CF7F12024900002").last_error.startswith("DPS refused")
        for write in (lambda: led.begin("2CF7F12024900009", "x"), lambda: led.step_started("2CF7F12024900001", "derive"),
                      lambda: led.finish("2CF7F12024900003"), lambda: led.reset("2CF7F12024900001")):
            with pytest.raises(LedgerError) as err:
                write()
            assert str(err.value) == f"ledger {str(v1)!r}: opened read-only"
    assert snapshot(v1) == before
    db = sqlite3.connect(f"file:{v1}?mode=ro", uri=True)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0  # not migrated
    db.close()


def test_readonly_never_creates_and_still_refuses_what_is_not_a_ledger(tmp_path, v1):
    missing = tmp_path / "sub" / "missing.sqlite3"
    for create in (True, False):
        with pytest.raises(InputError, match="no such file"):
            Ledger(missing, create=create, readonly=True)
    assert not missing.parent.exists()
    other = tmp_path / "other.sqlite3"
    other.write_bytes(b"not a database at all" * 300)
    with pytest.raises(InputError, match="not a flasher ledger"):
        Ledger(other, readonly=True)
    db = sqlite3.connect(v1)
    db.execute("PRAGMA user_version = 9")
    db.close()
    with pytest.raises(LedgerError, match=rf"written by a newer flasher \(schema 9; this one reads up to {SCHEMA_VERSION}\)"):
        Ledger(v1, readonly=True)


def test_readonly_sees_what_a_writer_commits_meanwhile(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    with Ledger(path) as writer:
        writer.begin("2CF7F12024900001", "2cf7f12024900001")
        with Ledger(path, readonly=True) as reader:
            assert [r.deveui for r in reader.all()] == ["2CF7F12024900001"]
            writer.step_started("2CF7F12024900001", "derive")
            assert reader.get("2CF7F12024900001").current_step == "derive"


# --- real read-only media -------------------------------------------------------------

READ_MEDIA = """
    import json, os, sys
    from flasher.errors import FlasherError
    from flasher.ledger import Ledger, export_json

    media = sys.argv[1]
    out = {}
    def attempt(name, fn):
        try:
            out[name] = fn()
        except FlasherError as exc:
            out[name] = {"error": str(exc), "type": type(exc).__name__}
    def read():
        with Ledger(os.path.join(media, "ledger.sqlite3"), create=False, readonly=True) as led:
            return export_json(led.all())
    attempt("read", read)
    attempt("write", lambda: Ledger(os.path.join(media, "ledger.sqlite3")).close())
    attempt("create", lambda: Ledger(os.path.join(media, "new", "ledger.sqlite3")).close())
    out["files"] = sorted(os.listdir(media))
    print(json.dumps(out))
"""


def test_a_wal_ledger_on_read_only_media(tmp_path, v1):
    media = tmp_path / "media"
    seen = read_only(v1.parent, media, READ_MEDIA, str(media))
    assert seen["read"] == v1_status("jsonl")
    where = f"ledger {str(media / 'ledger.sqlite3')!r}"
    assert seen["write"] == {"error": f"{where}: read-only (Read-only file system)", "type": "LedgerError"}
    assert seen["create"] == {"error": f"ledger {str(media / 'new' / 'ledger.sqlite3')!r}: Read-only file system",
                              "type": "InputError"}
    assert seen["files"] == ["ledger.sqlite3"]


def test_read_only_media_with_changes_still_in_the_wal_is_refused_not_misread(tmp_path):
    """A -wal with commits but no -shm: reading the file alone would silently miss those commits."""
    src = tmp_path / "src"
    src.mkdir()
    path = src / "ledger.sqlite3"
    Ledger(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_autocheckpoint = 0")
    db.execute("INSERT INTO boards (deveui, registration_id, status, created_at, updated_at) "
               "VALUES ('2CF7F12024900001', 'x', 'in_progress', 1, 1)")
    db.commit()
    (tmp_path / "copy").mkdir()
    for name in ("ledger.sqlite3", "ledger.sqlite3-wal"):  # copied off a writer that was still running
        shutil.copyfile(src / name, tmp_path / "copy" / name)
    db.close()
    assert (tmp_path / "copy" / "ledger.sqlite3-wal").stat().st_size > 0
    media = tmp_path / "media"
    seen = read_only(tmp_path / "copy", media, READ_MEDIA, str(media))
    where = f"ledger {str(media / 'ledger.sqlite3')!r}"
    assert seen["read"]["type"] == "LedgerError" and seen["read"]["error"].startswith(f"{where}: cannot read: its last "
                                                                                      f"changes are still in ")
