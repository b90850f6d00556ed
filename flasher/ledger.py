"""The provisioning ledger: a local SQLite file that remembers every board.

It is what makes ``flasher provision`` resumable: each step's outcome is committed
as it happens, so a crash, kill or unplug leaves a row saying where the board
stopped, and a rerun picks up there. It holds identities, outcomes and file
hashes — never a group key, master secret or device key.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flasher.errors import FlasherError, InputError

SCHEMA = """
CREATE TABLE IF NOT EXISTS boards (
    deveui          TEXT PRIMARY KEY,      -- 16 upper-case hex digits
    registration_id TEXT NOT NULL,
    status          TEXT NOT NULL,         -- in_progress | provisioned | failed
    current_step    TEXT,                  -- the step running or that failed last
    port            TEXT,
    serial_number   TEXT,
    join_eui        TEXT,
    band            TEXT,
    app_key_source  TEXT,
    id_scope        TEXT,
    device_key_check TEXT,                 -- one-way tag of the device key: did the group key change?
    assigned_hub    TEXT,
    device_id       TEXT,
    header_path     TEXT,
    header_sha256   TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS steps (
    deveui      TEXT NOT NULL REFERENCES boards(deveui),
    step        TEXT NOT NULL,
    outcome     TEXT NOT NULL,             -- started | ok | skipped | failed
    started_at  REAL NOT NULL,
    finished_at REAL,
    detail      TEXT,
    PRIMARY KEY (deveui, step)
);
"""

EXPORT_FIELDS = ("deveui", "registration_id", "status", "current_step", "join_eui", "band", "app_key_source",
                 "id_scope", "device_key_check", "assigned_hub", "device_id", "header_path", "header_sha256", "attempts",
                 "last_error", "port", "serial_number", "created_at", "updated_at")


class LedgerError(FlasherError):
    pass


class BoardClaimed(LedgerError):
    pass


@dataclass(frozen=True)
class BoardRecord:
    deveui: str
    registration_id: str
    status: str
    current_step: str | None
    join_eui: str | None
    band: str | None
    app_key_source: str | None
    id_scope: str | None
    device_key_check: str | None
    assigned_hub: str | None
    device_id: str | None
    header_path: str | None
    header_sha256: str | None
    attempts: int
    last_error: str | None
    port: str | None
    serial_number: str | None
    created_at: float
    updated_at: float
    steps: dict  # step -> outcome

    def done(self, step: str) -> bool:
        return self.steps.get(step) in ("ok", "skipped")

    def to_dict(self) -> dict:
        d = {f: getattr(self, f) for f in EXPORT_FIELDS}
        d["steps"] = dict(self.steps)
        return d


class Ledger:
    """Thread-safe: boards are provisioned concurrently, each write is one transaction."""

    def __init__(self, path: str | os.PathLike, *, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.exists():
            raise InputError(f"ledger {str(self.path)!r}: no such file")
        if self.path.is_dir():
            raise InputError(f"ledger {str(self.path)!r}: is a directory")
        try:
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA busy_timeout = 30000")
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if create and (not tables or "boards" in tables):  # new, or ours: never add tables to another database
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.executescript(SCHEMA)
                tables |= {"boards", "steps"}
        except sqlite3.DatabaseError as exc:
            raise InputError(f"ledger {str(self.path)!r}: not a flasher ledger ({exc})") from None
        except OSError as exc:
            raise InputError(f"ledger {str(self.path)!r}: {exc.strerror or exc}") from None
        if not {"boards", "steps"} <= tables:
            self._db.close()
            raise InputError(f"ledger {str(self.path)!r}: not a flasher ledger (no boards/steps tables)")
        if create and os.name == "posix":
            os.chmod(self.path, 0o600)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _tx(self):
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # --- writes -------------------------------------------------------------------
    def begin(self, deveui: str, registration_id: str, **fields) -> BoardRecord:
        """Open (or reopen) a board's record for an attempt; counts attempts."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT deveui FROM boards WHERE deveui = ?", (deveui,)).fetchone()
            if row is None:
                db.execute("INSERT INTO boards (deveui, registration_id, status, attempts, created_at, updated_at) "
                           "VALUES (?, ?, 'in_progress', 0, ?, ?)", (deveui, registration_id, now, now))
            db.execute("UPDATE boards SET attempts = attempts + 1, status = 'in_progress', registration_id = ?, "
                       "updated_at = ? WHERE deveui = ?", (registration_id, now, deveui))
            self._set(db, deveui, fields, now)
        return self.get(deveui)

    def reset(self, deveui: str) -> None:
        """--force: forget the steps of a board so every one runs again."""
        with self._tx() as db:
            db.execute("DELETE FROM steps WHERE deveui = ?", (deveui,))

    def step_started(self, deveui: str, step: str) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO steps (deveui, step, outcome, started_at) VALUES (?, ?, 'started', ?)",
                       (deveui, step, now))
            db.execute("UPDATE boards SET current_step = ?, updated_at = ? WHERE deveui = ?", (step, now, deveui))

    def step_finished(self, deveui: str, step: str, outcome: str = "ok", detail: str | None = None, **fields) -> None:
        """Record a step's outcome together with what it produced, in one transaction."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute("UPDATE steps SET outcome = ?, finished_at = ?, detail = ? WHERE deveui = ? AND step = ?",
                             (outcome, now, detail, deveui, step))
            if cur.rowcount == 0:
                db.execute("INSERT INTO steps (deveui, step, outcome, started_at, finished_at, detail) "
                           "VALUES (?, ?, ?, ?, ?, ?)", (deveui, step, outcome, now, now, detail))
            if outcome == "failed":
                fields = {**fields, "status": "failed", "last_error": detail}
            self._set(db, deveui, fields, now)

    def finish(self, deveui: str) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE boards SET status = 'provisioned', current_step = NULL, last_error = NULL, "
                       "updated_at = ? WHERE deveui = ?", (now, deveui))

    def mark(self, deveui: str, status: str, message: str | None) -> None:
        """Set a board's status and last error without touching its steps (a conflict leaves the work as it was)."""
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE boards SET status = ?, last_error = ?, updated_at = ? WHERE deveui = ?",
                       (status, message, now, deveui))

    # TEMPORARY until the claims branch lands
    def claim(self, deveui: str) -> None:
        pass

    def release(self, deveui: str) -> None:
        pass

    @staticmethod
    def _set(db, deveui: str, fields: dict, now: float) -> None:
        if not fields:
            return
        bad = set(fields) - set(EXPORT_FIELDS)
        if bad:
            raise LedgerError(f"ledger: unknown field(s) {sorted(bad)}")
        cols = ", ".join(f"{k} = ?" for k in fields)
        db.execute(f"UPDATE boards SET {cols}, updated_at = ? WHERE deveui = ?", (*fields.values(), now, deveui))

    # --- reads --------------------------------------------------------------------
    def get(self, deveui: str) -> BoardRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(EXPORT_FIELDS)} FROM boards WHERE deveui = ?", (deveui,)).fetchone()
            if row is None:
                return None
            steps = dict(self._db.execute("SELECT step, outcome FROM steps WHERE deveui = ?", (deveui,)).fetchall())
        return BoardRecord(*row, steps=steps)

    def all(self) -> list[BoardRecord]:
        with self._lock:
            euis = [r[0] for r in self._db.execute("SELECT deveui FROM boards ORDER BY created_at, deveui")]
        return [self.get(e) for e in euis]


def export_json(records: list[BoardRecord]) -> str:
    return "".join(json.dumps(r.to_dict(), sort_keys=False) + "\n" for r in records)


def export_csv(records: list[BoardRecord]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=EXPORT_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in records:
        w.writerow({f: getattr(r, f) for f in EXPORT_FIELDS})
    return buf.getvalue()
