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
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO
from urllib.parse import quote

from flasher.errors import FlasherError, InputError

log = logging.getLogger(__name__)

# The tables of schema 1, as flasher 0.1.0 made them (its ledgers say user_version 0).
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

# Adds which run is working on which board (see Ledger.claim), and an index for reading in order.
CLAIMS = """
CREATE TABLE claims (
    deveui       TEXT PRIMARY KEY,
    run_id       TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    host         TEXT NOT NULL,
    claimed_at   REAL NOT NULL,
    heartbeat_at REAL NOT NULL
);
CREATE INDEX boards_by_age ON boards (created_at, deveui);
"""

# What a board sent DPS as its registration payload (IoT Central's {"modelId": ...}; compared like the
# other settings), and what DPS handed back in registrationState.payload. JSON text, NULL for none.
DPS_PAYLOADS = """
ALTER TABLE boards ADD COLUMN dps_payload TEXT;
ALTER TABLE boards ADD COLUMN registration_payload TEXT;
"""

Migration = str | Callable[[sqlite3.Connection], None]

# MIGRATIONS[n] takes a ledger from schema n to n + 1 (0 is an empty file), inside the caller's
# transaction: a SQL script or a function of the connection. A new column is one more line,
# e.g. "ALTER TABLE boards ADD COLUMN firmware TEXT". Never edit one that has shipped.
MIGRATIONS: list[Migration] = [
    SCHEMA,
    CLAIMS,
    DPS_PAYLOADS,
]
SCHEMA_VERSION = 3
assert len(MIGRATIONS) == SCHEMA_VERSION

EXPORT_FIELDS = ("deveui", "registration_id", "status", "current_step", "join_eui", "band", "app_key_source",
                 "id_scope", "device_key_check", "assigned_hub", "device_id", "header_path", "header_sha256", "attempts",
                 "last_error", "port", "serial_number", "created_at", "updated_at", "dps_payload", "registration_payload")
JSON_FIELDS = frozenset({"dps_payload", "registration_payload"})  # JSON text in the ledger and CSV, values in --json


class LedgerError(FlasherError):
    pass


class BoardClaimed(LedgerError):
    """Another live run is working on this board: leave it alone (exit 1)."""

    def __init__(self, deveui: str, pid: int, host: str, run_id: str):
        super().__init__(f"in progress in another run (pid {pid} on {host})")
        self.deveui, self.pid, self.host, self.run_id = deveui, pid, host, run_id


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
    dps_payload: str | None
    registration_payload: str | None
    steps: dict  # step -> outcome

    def done(self, step: str) -> bool:
        return self.steps.get(step) in ("ok", "skipped")

    def to_dict(self) -> dict:
        d = {f: getattr(self, f) for f in EXPORT_FIELDS}
        for f in JSON_FIELDS:
            if d[f] is not None:
                try:
                    d[f] = json.loads(d[f])
                except ValueError:  # written by hand, or by something else: shown as it is
                    pass
        d["steps"] = dict(self.steps)
        return d


class Ledger:
    """Thread-safe: boards are provisioned concurrently, each write is one transaction.

    Opening migrates an older ledger to :data:`SCHEMA_VERSION` in one transaction, or
    creates a new one (``create=True``) in one transaction, removing the file again if
    that fails, so a ledger is never left half made. ``readonly=True`` opens an existing
    ledger (of any schema up to this one) without writing, migrating or creating anything,
    even on read-only media.

    Each Ledger object is one "run" (``run_id``): :meth:`claim` keeps two runs off the
    same board. A claim lives while its holder does: a run on this host whose process is
    gone, or any run whose heartbeat is older than ``stale_after`` seconds, loses it.
    The heartbeat is judged by the claiming run's ``stale_after``, so runs sharing a
    ledger should use the same value (the default, unless a test needs it short).
    """

    def __init__(self, path: str | os.PathLike, *, create: bool = True, readonly: bool = False,
                 run_id: str | None = None, stale_after: float = 60.0):
        self.path = Path(path)
        self.readonly = readonly
        self._where = f"ledger {str(self.path)!r}"
        if not stale_after > 0:
            raise InputError(f"{self._where}: stale_after must be a positive number of seconds, not {stale_after!r}")
        self.stale_after = float(stale_after)
        self._host, self._pid = socket.gethostname(), os.getpid()
        self.run_id = run_id or f"{self._host}:{self._pid}:{os.urandom(4).hex()}"
        self._lock = threading.Lock()
        self._claims: set[str] = set()
        self._heartbeat: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        if self.path.is_dir():
            raise InputError(f"{self._where}: is a directory")
        if readonly:
            self._open_readonly()
            return
        created: list[Path] = []  # what this open made, to remove again if it fails
        if not self.path.exists():
            if not create:
                raise InputError(f"{self._where}: no such file")
            created = self._create_file()
        else:
            problem = self._write_problem()
            if problem:
                raise LedgerError(f"{self._where}: read-only ({problem})")
        try:
            self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            self._remove(created)
            raise LedgerError(f"{self._where}: cannot open ({exc})") from None
        try:
            self._db.execute("PRAGMA busy_timeout = 30000")
            self._open(create)
            self._select = _select_list(self._db)
        except BaseException:
            self._db.close()
            self._remove(created)
            raise

    def _write_problem(self) -> str | None:
        """Why this process cannot write the existing ledger (SQLite would only say so at the first write)."""
        try:
            os.close(os.open(self.path, os.O_RDWR))
        except OSError as exc:
            return exc.strerror or str(exc)
        sidecars = [Path(f"{self.path}{s}") for s in ("-wal", "-shm")]
        folder = self.path.parent
        if not all(os.access(p, os.W_OK) for p in sidecars) and not os.access(folder, os.W_OK | os.X_OK):
            return f"cannot create its -wal/-shm files in {str(folder)!r}"
        return None

    def _open_readonly(self) -> None:
        """Open with SQLite's mode=ro; on read-only media, where the -shm a WAL ledger needs cannot be
        made, open it immutable: nothing can write there, so nothing can change under the reader."""
        if not self.path.exists():
            raise InputError(f"{self._where}: no such file")
        uri = f"file:{quote(str(self.path.absolute()))}?mode=ro"
        for immutable in (False, True):
            self._db = sqlite3.connect(uri + ("&immutable=1" if immutable else ""), uri=True, timeout=30,
                                       check_same_thread=False, isolation_level=None)
            try:
                self._db.execute("PRAGMA busy_timeout = 30000")
                self._version(create=False)
                self._select = _select_list(self._db)
                return
            except sqlite3.Error as exc:
                self._db.close()
                if immutable or getattr(exc, "sqlite_errorname", None) != "SQLITE_CANTOPEN":
                    raise self._read_error(exc) from None
                wal = Path(f"{self.path}-wal")
                if wal.exists() and wal.stat().st_size > 0:
                    raise LedgerError(f"{self._where}: cannot read: its last changes are still in {str(wal)!r}, and "
                                      f"reading them needs a writable folder (copy both files somewhere writable)") from None
            except BaseException:
                self._db.close()
                raise

    def _create_file(self) -> list[Path]:
        """Make the file (0600 from the start) and any missing folders (0700); return what was made."""
        made: list[Path] = []
        try:
            missing = [d for d in self.path.parents if not d.exists()]
            for d in reversed(missing):
                try:
                    d.mkdir(mode=0o700)
                except FileExistsError:  # made by someone else meanwhile: theirs, leave its mode
                    continue
                made.append(d)
                os.chmod(d, 0o700)  # the umask may have taken bits off
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:  # another run created it first: open it as an existing ledger
                return made
            made.append(self.path)
            os.chmod(self.path, 0o600)
        except OSError as exc:
            self._remove(made)
            raise InputError(f"{self._where}: {exc.strerror or exc}") from None
        return made

    def _remove(self, made: list[Path]) -> None:
        """Undo a failed creation: the file, its -wal/-shm/-journal, then the folders made for it."""
        try:
            for p in reversed(made):
                if p == self.path:
                    for q in (p, *(Path(f"{p}{s}") for s in ("-wal", "-shm", "-journal"))):
                        q.unlink(missing_ok=True)
                else:
                    p.rmdir()  # fails if someone put something there meanwhile: then it stays
        except OSError as exc:  # the error being raised is the one to report; this one is only logged
            log.warning("%s: could not remove what a failed creation made: %s", self._where, exc)

    def _open(self, create: bool) -> None:
        db = self._db
        try:
            version = self._version(create)
        except sqlite3.Error as exc:
            raise self._read_error(exc) from None
        if version == SCHEMA_VERSION:
            return
        what = "cannot create" if version == 0 else f"cannot upgrade from schema {version} to {SCHEMA_VERSION}"
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode = WAL")  # readers never wait for the writer
            db.execute("BEGIN IMMEDIATE")
            version = self._version(create)  # again, now that no other run can change it
            for migration in MIGRATIONS[version:SCHEMA_VERSION]:
                if isinstance(migration, str):
                    for statement in _statements(migration):
                        db.execute(statement)
                else:
                    migration(db)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException as exc:
            self._rollback()
            if isinstance(exc, sqlite3.Error):
                raise LedgerError(f"{self._where}: {what} ({exc})") from None
            raise

    def _rollback(self) -> None:
        """Roll back if a transaction is still open: SQLite ends some itself (a full disk), and
        ROLLBACK without one is an error that would hide the real one."""
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.warning("%s: rollback failed: %s", self._where, exc)

    def _version(self, create: bool) -> int:
        """The schema this file is at (0: empty), or refuse it; reads only."""
        db = self._db
        user_version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables and user_version == 0 and create:
            return 0  # new: never add tables to a database that has any of its own
        if not {"boards", "steps"} <= tables:
            raise InputError(f"{self._where}: not a flasher ledger (no boards/steps tables)")
        if user_version > SCHEMA_VERSION:
            raise LedgerError(f"{self._where}: written by a newer flasher (schema {user_version}; "
                              f"this one reads up to {SCHEMA_VERSION})")
        version = max(user_version, 1)  # flasher 0.1.0 left user_version at 0
        for table, columns in _columns(version).items():
            have = {r[0] for r in db.execute("SELECT name FROM pragma_table_info(?)", (table,))}
            missing = [c for c in columns if c not in have]
            if len(missing) == len(columns):
                raise InputError(f"{self._where}: not a flasher ledger (no {table} table)")
            if missing:
                raise InputError(f"{self._where}: not a flasher ledger (table {table} has no column "
                                 f"{', '.join(missing)})")
        return version

    def _read_error(self, exc: sqlite3.Error) -> FlasherError:
        if getattr(exc, "sqlite_errorname", None) == "SQLITE_NOTADB":
            return InputError(f"{self._where}: not a flasher ledger ({exc})")
        return LedgerError(f"{self._where}: cannot read ({exc})")

    def close(self) -> None:
        """Stop the heartbeat, release this run's claims, close the file. Safe to call twice."""
        if self._closed:
            return
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            try:
                with self._tx() as db:
                    db.execute("DELETE FROM claims WHERE run_id = ?", (self.run_id,))
                    self._claims.clear()
            except LedgerError as exc:  # not fatal: they lapse with this process (or its heartbeat)
                log.warning("%s: this run's claims were not released: %s", self._where, exc)
        self._closed = True
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- claims -------------------------------------------------------------------
    def claim(self, deveui: str) -> None:
        """Take the board for this run, or raise :class:`BoardClaimed` if another live run has it.

        One transaction, so of two runs racing for a board exactly one wins. Claiming a
        board this run holds again is fine. The first claim starts the heartbeat.
        """
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT run_id, pid, host, heartbeat_at FROM claims WHERE deveui = ?", (deveui,)).fetchone()
            if row is not None and row[0] == self.run_id:
                db.execute("UPDATE claims SET heartbeat_at = ? WHERE deveui = ?", (now, deveui))
            else:
                if row is not None:
                    if self._alive(row[1], row[2], row[3], now):
                        raise BoardClaimed(deveui, pid=row[1], host=row[2], run_id=row[0])
                    log.info("%s: %s: taking over from run %s (pid %s on %s), which is gone", self._where, deveui,
                             row[0], row[1], row[2])
                db.execute("INSERT OR REPLACE INTO claims (deveui, run_id, pid, host, claimed_at, heartbeat_at) "
                           "VALUES (?, ?, ?, ?, ?, ?)", (deveui, self.run_id, self._pid, self._host, now, now))
        with self._lock:
            self._claims.add(deveui)
            if self._heartbeat is None:
                self._heartbeat = threading.Thread(target=self._beat, name=f"ledger heartbeat {self.run_id}", daemon=True)
                self._heartbeat.start()

    def release(self, deveui: str) -> None:
        """Give the board back (only if this run holds it)."""
        with self._tx() as db:
            db.execute("DELETE FROM claims WHERE deveui = ? AND run_id = ?", (deveui, self.run_id))
            self._claims.discard(deveui)

    def _alive(self, pid: int, host: str, heartbeat_at: float, now: float) -> bool:
        """Whether a claim's holder may still be working: a fresh heartbeat, and its process if it is ours to see."""
        if now - heartbeat_at > self.stale_after:
            return False
        if host == self._host and isinstance(pid, int) and pid > 0:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:  # exists, as another user
                return True
        return True

    def _beat(self) -> None:
        """Refresh this run's claims every stale_after/4 seconds until close(), so others see it alive."""
        while not self._stop.wait(self.stale_after / 4):
            try:
                with self._tx() as db:
                    db.execute("UPDATE claims SET heartbeat_at = ? WHERE run_id = ?", (time.time(), self.run_id))
                    held = {r[0] for r in db.execute("SELECT deveui FROM claims WHERE run_id = ?", (self.run_id,))}
                    lost, self._claims = self._claims - held, self._claims & held
            except LedgerError as exc:  # a busy or full disk: try again next beat; the claims may lapse meanwhile
                log.warning("%s: heartbeat not recorded: %s", self._where, exc)
                continue
            if lost:
                log.warning("%s: another run took over %s after this run's heartbeat lapsed", self._where,
                            ", ".join(sorted(lost)))

    @contextmanager
    def _tx(self):
        """One write transaction; a SQLite failure (full disk, lock timeout) becomes one line naming the ledger."""
        if self.readonly:
            raise LedgerError(f"{self._where}: opened read-only")
        if self._closed:
            raise LedgerError(f"{self._where}: already closed")
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as exc:
                self._rollback()
                if isinstance(exc, sqlite3.Error):
                    raise LedgerError(f"{self._where}: cannot write ({exc})") from None
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
            record = self._get(db, deveui)
        assert record is not None
        return record

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

    def _set(self, db, deveui: str, fields: dict, now: float) -> None:
        if not fields:
            return
        bad = set(fields) - set(EXPORT_FIELDS)
        if bad:
            raise LedgerError(f"{self._where}: unknown field(s) {sorted(bad)}")
        cols = ", ".join(f"{k} = ?" for k in fields)
        db.execute(f"UPDATE boards SET {cols}, updated_at = ? WHERE deveui = ?", (*fields.values(), now, deveui))

    # --- reads --------------------------------------------------------------------
    @contextmanager
    def _read(self):
        """One read transaction, so a board and its steps are read as of the same moment."""
        if self._closed:
            raise LedgerError(f"{self._where}: already closed")
        with self._lock:
            try:
                self._db.execute("BEGIN")
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as exc:
                self._rollback()
                if isinstance(exc, sqlite3.Error):
                    raise self._read_error(exc) from None
                raise

    def _get(self, db: sqlite3.Connection, deveui: str) -> BoardRecord | None:
        row = db.execute(f"SELECT {self._select} FROM boards WHERE deveui = ?", (deveui,)).fetchone()
        if row is None:
            return None
        return _record(row, dict(db.execute("SELECT step, outcome FROM steps WHERE deveui = ? ORDER BY step", (deveui,))))

    def get(self, deveui: str) -> BoardRecord | None:
        with self._read() as db:
            return self._get(db, deveui)

    def all(self) -> list[BoardRecord]:
        """Every board, oldest first, in two queries however many there are."""
        with self._read() as db:
            rows = db.execute(f"SELECT {self._select} FROM boards ORDER BY created_at, deveui").fetchall()
            steps = _group_steps(db.execute("SELECT deveui, step, outcome FROM steps ORDER BY deveui, step"))
        return [_record(row, steps.get(row[0], {})) for row in rows]

    def iter_records(self, batch: int = 1000) -> Iterator[BoardRecord]:
        """Every board in the order of :meth:`all`, read ``batch`` boards (two queries) at a time.

        Only one batch is held, so exporting 100,000 boards takes little memory. Other
        threads can write between batches; paging by (created_at, deveui), which never
        change, means no board is skipped or repeated.
        """
        if batch < 1:
            raise InputError(f"{self._where}: batch must be at least 1, not {batch}")
        after: tuple = ()
        while True:
            where = "WHERE (created_at, deveui) > (?, ?)" if after else ""
            page = f"SELECT {{}} FROM boards {where} ORDER BY created_at, deveui LIMIT ?"
            with self._read() as db:
                rows = db.execute(page.format(self._select), (*after, batch)).fetchall()
                steps = _group_steps(db.execute(f"SELECT deveui, step, outcome FROM steps WHERE deveui IN "
                                                f"({page.format('deveui')}) ORDER BY deveui, step", (*after, batch)))
            for row in rows:
                yield _record(row, steps.get(row[0], {}))
            if len(rows) < batch:
                return
            after = (rows[-1][EXPORT_FIELDS.index("created_at")], rows[-1][0])


def _select_list(db: sqlite3.Connection) -> str:
    """EXPORT_FIELDS as a SELECT list for this file: a column an older ledger (read, not migrated) lacks is NULL."""
    have = {r[0] for r in db.execute("SELECT name FROM pragma_table_info('boards')")}
    return ", ".join(f if f in have else f"NULL AS {f}" for f in EXPORT_FIELDS)


def _record(row: tuple, steps: dict) -> BoardRecord:
    """A BoardRecord from a row of EXPORT_FIELDS (positional: the fields are in that order)."""
    return BoardRecord(*row, steps=steps)  # type: ignore[misc]


def _group_steps(rows: Iterable[tuple[str, str, str]]) -> dict[str, dict[str, str]]:
    grouped: dict[str, dict[str, str]] = {}
    for deveui, step, outcome in rows:
        grouped.setdefault(deveui, {})[step] = outcome
    return grouped


def _statements(script: str):
    """Split a migration script into statements, since executescript() would commit mid-way."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""
    if pending.strip():
        if not sqlite3.complete_statement(pending + ";"):
            raise ValueError(f"incomplete SQL statement in a migration: {pending.strip()[:60]!r}")
        yield pending


def _columns(version: int) -> dict[str, list[str]]:
    """The tables and columns a ledger at ``version`` has, from running the migrations on an empty database."""
    db = sqlite3.connect(":memory:", isolation_level=None)
    try:
        for migration in MIGRATIONS[:version]:
            if isinstance(migration, str):
                db.executescript(migration)
            else:
                migration(db)
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: [r[0] for r in db.execute("SELECT name FROM pragma_table_info(?)", (t,))] for t in tables}
    finally:
        db.close()


def write_json(records: Iterable[BoardRecord], stream: TextIO) -> None:
    """One JSON object per line, written as each record comes: no whole export in memory."""
    for r in records:
        stream.write(json.dumps(r.to_dict(), sort_keys=False) + "\n")


def write_csv(records: Iterable[BoardRecord], stream: TextIO) -> None:
    """CSV with a header row (EXPORT_FIELDS), one row written per record as it comes."""
    w = csv.DictWriter(stream, fieldnames=EXPORT_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in records:
        w.writerow({f: getattr(r, f) for f in EXPORT_FIELDS})


def export_json(records: Iterable[BoardRecord]) -> str:
    buf = io.StringIO()
    write_json(records, buf)
    return buf.getvalue()


def export_csv(records: Iterable[BoardRecord]) -> str:
    buf = io.StringIO()
    write_csv(records, buf)
    return buf.getvalue()
