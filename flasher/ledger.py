"""The provisioning ledger: every board and every step, in a local SQLite file or on a shared PostgreSQL server.

It is what makes ``flasher provision`` resumable: each step's outcome is committed
as it happens, so a crash, kill or unplug leaves a row saying where the board
stopped, and a rerun picks up there. It holds identities, outcomes and file
hashes — never a group key, master secret or device key.

There is one :class:`Ledger` and two back ends behind a small seam
(:class:`Backend`): a SQLite file, the embedded default, and a PostgreSQL database
(``postgresql://user@host/db``, :mod:`flasher.ledger_postgres`) that the stations of
a fleet share. The SQL, the schema and its migrations, the claims and the messages
are the same on both; a back end only supplies transactions, its placeholder
style, where it keeps the schema version, how it locks and whose clock counts.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TextIO, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

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

# Adds The Things Stack: the application and end device id a board is registered as, and which of the
# four servers (is, js, ns, as) hold it, so a board interrupted between two resumes at the missing one.
TTS = """
ALTER TABLE boards ADD COLUMN tts_app TEXT;
ALTER TABLE boards ADD COLUMN tts_device_id TEXT;
ALTER TABLE boards ADD COLUMN tts_servers TEXT;
"""

# Adds which station (--station-id) last worked on a board, ran each step and holds each claim.
STATIONS = """
ALTER TABLE boards ADD COLUMN station TEXT;
ALTER TABLE steps ADD COLUMN station TEXT;
ALTER TABLE claims ADD COLUMN station TEXT;
"""

# What a board sent DPS as its registration payload (IoT Central's {"modelId": ...}; compared like the
# other settings), and what DPS handed back in registrationState.payload. JSON text, NULL for none.
DPS_PAYLOADS = """
ALTER TABLE boards ADD COLUMN dps_payload TEXT;
ALTER TABLE boards ADD COLUMN registration_payload TEXT;
"""

# Adds ids registered with DPS ahead of their boards (`flasher register --input`), so an interrupted bulk
# run resumes without registering the done ones again. Keyed by the registration id as DPS compares it
# (lower case), for the DPS instance (id scope + host) it was registered at.
REGISTRATIONS = """
CREATE TABLE registrations (
    registration_key TEXT NOT NULL,       -- the registration id in lower case: DPS ids are case-insensitive
    id_scope         TEXT NOT NULL,
    dps_host         TEXT NOT NULL,
    registration_id  TEXT NOT NULL,       -- as given
    status           TEXT NOT NULL,       -- assigned | failed | registering (sent by a run that did not finish)
    device_key_check TEXT,
    assigned_hub     TEXT,
    device_id        TEXT,
    message_sent     INTEGER NOT NULL DEFAULT 0,
    attempts         INTEGER NOT NULL DEFAULT 0,
    last_error       TEXT,
    station          TEXT,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL,
    PRIMARY KEY (registration_key, id_scope, dps_host)
);
"""

Migration = str | Callable[[Any], None]

# MIGRATIONS[n] takes a ledger from schema n to n + 1 (0 is an empty file or database), inside the
# caller's transaction, on both back ends: a script of portable SQL (TEXT, INTEGER, REAL, which
# PostgreSQL stores as DOUBLE PRECISION) or a function of a connection whose execute() takes "?"
# placeholders. A new column is one more line, e.g. "ALTER TABLE boards ADD COLUMN firmware TEXT"
# (and its name appended to EXPORT_FIELDS). Never edit one that has shipped.
MIGRATIONS: list[Migration] = [
    SCHEMA,
    CLAIMS,
    TTS,
    STATIONS,
    DPS_PAYLOADS,
    REGISTRATIONS,
]
SCHEMA_VERSION = 6
assert len(MIGRATIONS) == SCHEMA_VERSION

EXPORT_FIELDS = ("deveui", "registration_id", "status", "current_step", "join_eui", "band", "app_key_source",
                 "id_scope", "device_key_check", "assigned_hub", "device_id", "header_path", "header_sha256", "attempts",
                 "last_error", "port", "serial_number", "created_at", "updated_at", "tts_app", "tts_device_id",
                 "tts_servers", "station", "dps_payload", "registration_payload")
JSON_FIELDS = frozenset({"dps_payload", "registration_payload"})  # JSON text in the ledger and CSV, values in --json

# A step row, whole (what `flasher ledger copy` moves).
STEP_FIELDS = ("deveui", "step", "outcome", "started_at", "finished_at", "detail", "station")
# A pre-registration row, whole (`flasher register --input`; also moved by `flasher ledger copy`).
REGISTRATION_FIELDS = ("registration_key", "id_scope", "dps_host", "registration_id", "status", "device_key_check",
                       "assigned_hub", "device_id", "message_sent", "attempts", "last_error", "station", "created_at",
                       "updated_at")
# What `flasher status --registrations` shows of one (the lower-case key is the registration id's own business).
REGISTRATION_LIST = REGISTRATION_FIELDS[1:]


class PreRegistration(NamedTuple):
    """One id's state in the ledger's registrations table, as a rerun of `flasher register` needs it."""

    status: str                      # assigned | failed | registering
    device_key_check: str | None     # the one-way tag of the key it was registered with
    message_sent: bool

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
POSTGRES_SCHEMES = ("postgresql", "postgres")


class LedgerError(FlasherError):
    pass


T = TypeVar("T")


class _Write:
    """One queued write (see :meth:`Ledger._write`): the function, then its result or error."""

    __slots__ = ("fn", "result", "error", "done", "wake")

    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False
        self.wake = threading.Event()    # set when it is done, or when its writer is to commit the queue

    def outcome(self, ledger: Ledger) -> Any:
        if self.error is None:
            return self.result
        if isinstance(self.error, ledger._backend.errors):  # one LedgerError per writer: they may share the cause
            raise LedgerError(f"{ledger._where}: cannot write ({ledger._backend.describe(self.error)})") from None
        raise self.error


class BoardClaimed(LedgerError):
    """Another live run is working on this board: leave it alone (exit 1).

    ``station`` is set when that run belongs to another station (a shared ledger).
    """

    def __init__(self, deveui: str, pid: int, host: str, run_id: str, station: str | None = None):
        where = f"at station {station}" if station else "in another run"
        super().__init__(f"in progress {where} (pid {pid} on {host})")
        self.deveui, self.pid, self.host, self.run_id, self.station = deveui, pid, host, run_id, station


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
    tts_app: str | None          # The Things Stack application, end device id, and the servers holding it
    tts_device_id: str | None
    tts_servers: str | None      # comma-separated, in the order is,js,ns,as
    station: str | None
    dps_payload: str | None
    registration_payload: str | None
    steps: dict  # step -> outcome

    def done(self, step: str) -> bool:
        return self.steps.get(step) in ("ok", "skipped")

    def to_dict(self) -> dict:
        d = {f: getattr(self, f) for f in EXPORT_FIELDS}
        for f in JSON_FIELDS:
            d[f] = _json_value(d[f])
        d["steps"] = dict(self.steps)
        return d


def _json_value(text: str | None):
    """A JSON column as its value in --json; text that is not JSON (written by hand) is shown as it is."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


# --- where a ledger lives ---------------------------------------------------------------

def is_url(target: str | os.PathLike) -> bool:
    """Whether a --ledger value is a server URL rather than a file path."""
    return isinstance(target, str) and _URL.match(target) is not None


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``****``, for every message and log line."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            user, _, host = netloc.rpartition("@")
            netloc = f"{user.split(':', 1)[0]}:****@{host}"
        query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2****", parts.query)
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:  # not parseable: show nothing that could be a password
        return url.split("://", 1)[0] + "://****"


def check_url(url: str, where: str) -> str:
    """A ledger URL as given, if flasher can use it; an inline password is refused (it would show)."""
    scheme = url.split("://", 1)[0].lower()
    if scheme not in POSTGRES_SCHEMES:
        raise InputError(f"{where} {mask_url(url)!r}: unknown kind of ledger {scheme!r} "
                         f"(a SQLite file path, or postgresql://user@host/db)")
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError as exc:
        raise InputError(f"{where} {mask_url(url)!r}: not a valid URL ({exc})") from None
    if parts.password is not None or re.search(r"(?i)(^|&)password=", parts.query):
        raise InputError(f"{where} {mask_url(url)!r}: a password in the URL would be visible (process list, "
                         f"flasher.toml, logs); use PGPASSWORD, ~/.pgpass or ledger_password_file instead")
    return url


# --- the back-end seam ---------------------------------------------------------------

class Backend:
    """What differs between SQLite and PostgreSQL; everything else is :class:`Ledger`'s.

    ``transaction`` yields a connection whose ``execute(sql, params)`` takes ``?``
    placeholders and returns a cursor (``fetchone``, ``fetchall``, ``rowcount``,
    iteration). ``errors`` are the driver's exception types; ``describe`` makes one
    line of one of them.
    """

    name: str                               # what messages show: a path, or the URL with any password masked
    path: Any                               # Ledger.path: the file's Path, or the masked URL
    errors: tuple[type[BaseException], ...] = ()
    lock_clause = ""                        # appended to the claim's SELECT to lock the row, where rows lock
    group_commit = False                    # concurrent writes share one transaction (see Ledger._write)

    def open(self, create: bool, readonly: bool) -> None:
        raise NotImplementedError

    def transaction(self, write: bool) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def migrating(self) -> AbstractContextManager[Any]:
        """The one transaction migrations run in; no other opener migrates at the same time."""
        raise NotImplementedError

    def user_version(self, db) -> int:
        raise NotImplementedError

    def set_version(self, db, version: int) -> None:
        raise NotImplementedError

    def tables(self, db) -> set[str]:
        """The tables of the ledger's database (its bookkeeping left out)."""
        raise NotImplementedError

    def columns(self, db, table: str) -> list[str]:
        raise NotImplementedError

    def ddl(self, statement: str) -> str:
        """A migration statement as this back end wants it."""
        return statement

    def describe(self, exc: BaseException) -> str:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__

    def not_a_ledger(self, exc: BaseException) -> bool:
        """Whether a driver error on opening means the thing is no database at all."""
        return False

    def now(self) -> float:
        """Seconds since the epoch on the clock every user of this ledger shares."""
        return time.time()

    def same_as(self, other: Backend) -> bool:
        return type(self) is type(other) and self.name == other.name

    def close(self, failed: bool = False) -> None:
        """Let go of the ledger; ``failed``: the open failed, undo what it made."""
        raise NotImplementedError

    def stream(self, db, sql: str, args: tuple, batch: int) -> Iterator[list[tuple]]:
        """The rows of one query, ``batch`` at a time as the database gives them, never all at once."""
        cursor = db.execute(sql, args)
        while rows := cursor.fetchmany(batch):
            yield rows


def open_backend(target: str | os.PathLike, password=None, application: str = "flasher") -> Backend:
    """The back end for a --ledger value: a path is a SQLite file, ``postgresql://…`` a server."""
    if is_url(target):
        url = check_url(str(target), "ledger")
        from flasher.ledger_postgres import PostgresBackend  # imports psycopg: only for a server ledger

        return PostgresBackend(url, password=password, application=application)
    return SQLiteBackend(target)


class SQLiteBackend(Backend):
    """A ledger file on this machine: one connection, one writer at a time (``BEGIN IMMEDIATE``), WAL.

    Writers take turns anyway, so each transaction takes every write waiting for it:
    one commit (one fsync) for many boards' steps.
    """

    errors = (sqlite3.Error,)
    group_commit = True

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = str(self.path)
        self._where = f"ledger {self.name!r}"
        self._lock = threading.Lock()
        self._made: list[Path] = []  # what this open made, to remove again if it fails
        self.db: sqlite3.Connection | None = None

    def open(self, create: bool, readonly: bool) -> None:
        if self.path.is_dir():
            raise InputError(f"{self._where}: is a directory")
        if readonly:
            self._open_readonly()
            return
        if not self.path.exists():
            if not create:
                raise InputError(f"{self._where}: no such file")
            self._made = self._create_file()
        else:
            problem = self._write_problem()
            if problem:
                raise LedgerError(f"{self._where}: read-only ({problem})")
        try:
            self.db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            self._remove(self._made)
            raise LedgerError(f"{self._where}: cannot open ({exc})") from None
        self.db.execute("PRAGMA busy_timeout = 30000")

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
            db = sqlite3.connect(uri + ("&immutable=1" if immutable else ""), uri=True, timeout=30,
                                 check_same_thread=False, isolation_level=None)
            try:
                db.execute("PRAGMA busy_timeout = 30000")
                db.execute("SELECT count(*) FROM sqlite_master").fetchone()  # the first read opens the -shm
                self.db = db
                return
            except sqlite3.Error as exc:
                db.close()
                if immutable or getattr(exc, "sqlite_errorname", None) != "SQLITE_CANTOPEN":
                    if self.not_a_ledger(exc):
                        raise InputError(f"{self._where}: not a flasher ledger ({exc})") from None
                    raise LedgerError(f"{self._where}: cannot read ({exc})") from None
                wal = Path(f"{self.path}-wal")
                if wal.exists() and wal.stat().st_size > 0:
                    raise LedgerError(f"{self._where}: cannot read: its last changes are still in {str(wal)!r}, and "
                                      f"reading them needs a writable folder (copy both files somewhere writable)") from None
            except BaseException:
                db.close()
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

    @contextmanager
    def transaction(self, write: bool):
        """One transaction on the one connection; a writer takes the file's write lock at once."""
        assert self.db is not None
        with self._lock:
            try:
                self.db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    @contextmanager
    def migrating(self):
        assert self.db is not None
        if self.db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            self.db.execute("PRAGMA journal_mode = WAL")  # readers never wait for the writer
        with self.transaction(write=True) as db:  # BEGIN IMMEDIATE: no other run can migrate meanwhile
            yield db

    def _rollback(self) -> None:
        """Roll back if a transaction is still open: SQLite ends some itself (a full disk), and
        ROLLBACK without one is an error that would hide the real one."""
        assert self.db is not None
        if self.db.in_transaction:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.warning("%s: rollback failed: %s", self._where, exc)

    def user_version(self, db) -> int:
        return db.execute("PRAGMA user_version").fetchone()[0]

    def set_version(self, db, version: int) -> None:
        db.execute(f"PRAGMA user_version = {int(version)}")

    def tables(self, db) -> set[str]:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def columns(self, db, table: str) -> list[str]:
        return [r[0] for r in db.execute("SELECT name FROM pragma_table_info(?)", (table,))]

    def describe(self, exc: BaseException) -> str:
        return str(exc)

    def not_a_ledger(self, exc: BaseException) -> bool:
        return getattr(exc, "sqlite_errorname", None) == "SQLITE_NOTADB"

    def same_as(self, other: Backend) -> bool:
        return isinstance(other, SQLiteBackend) and self.path.resolve() == other.path.resolve()

    def close(self, failed: bool = False) -> None:
        if self.db is not None:
            self.db.close()
        if failed:
            self._remove(self._made)


class Ledger:
    """Thread-safe: boards are provisioned concurrently; each write returns once committed (see :meth:`_write`).

    ``path`` is a SQLite file, or ``postgresql://user@host/db`` for a ledger that several
    stations share (``password`` from the caller; else libpq's PGPASSWORD or ~/.pgpass).
    Opening migrates an older ledger to :data:`SCHEMA_VERSION` in one transaction, or
    creates a new one (``create=True``) in one transaction, removing the file again if
    that fails, so a ledger is never left half made. ``readonly=True`` opens an existing
    ledger (of any schema up to this one) without writing, migrating or creating anything,
    even on read-only media.

    Each Ledger object is one "run" (``run_id``) of one station (``station``, the
    hostname unless given): :meth:`claim` keeps two runs off the same board. A claim
    lives while its holder does: any run whose heartbeat is older than ``stale_after``
    seconds loses it, and so does a run of this station on this host whose process is
    gone. The heartbeat is judged by the claiming run's ``stale_after``, so runs sharing a
    ledger should use the same value (the default, unless a test needs it short).
    """

    def __init__(self, path: str | os.PathLike, *, create: bool = True, readonly: bool = False,
                 run_id: str | None = None, stale_after: float = 60.0, station: str | None = None,
                 password=None):
        self.readonly = readonly
        self._closed = True  # until open: close() then has nothing to do
        self._host, self._pid = socket.gethostname(), os.getpid()
        self.station = station or self._host
        self._backend = open_backend(path, password=password, application=f"flasher {self.station}")
        self.path = self._backend.path
        self._where = f"ledger {self._backend.name!r}"
        if not stale_after > 0:
            raise InputError(f"{self._where}: stale_after must be a positive number of seconds, not {stale_after!r}")
        self.stale_after = float(stale_after)
        self.run_id = run_id or f"{self._host}:{self._pid}:{os.urandom(4).hex()}"
        self._lock = threading.Lock()     # this run's claims and heartbeat
        self._claims: set[str] = set()
        self._heartbeat: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue_lock = threading.Lock()  # the writes waiting for the next commit (see _write)
        self._queue: list[_Write] = []
        self._committing = False
        self._backend.open(create, readonly)
        try:
            self._open(create)
        except BaseException:
            self._backend.close(failed=True)
            raise
        self._closed = False

    @property
    def _db(self):
        """The SQLite connection (tests reach SQLite's own knobs through it)."""
        return self._backend.db  # type: ignore[attr-defined]

    def _open(self, create: bool) -> None:
        b = self._backend
        try:
            with b.transaction(write=False) as db:
                version = self._version(db, create and not self.readonly)
        except b.errors as exc:
            raise self._read_error(exc) from None
        self._select = _select_columns(version)
        self._schema = version
        if version == SCHEMA_VERSION or self.readonly:
            return
        what = "cannot create" if version == 0 else f"cannot upgrade from schema {version} to {SCHEMA_VERSION}"
        try:
            with b.migrating() as db:
                version = self._version(db, create)  # again, now that no other run can change it
                for migration in MIGRATIONS[version:SCHEMA_VERSION]:
                    if isinstance(migration, str):
                        for statement in _statements(migration):
                            db.execute(b.ddl(statement))
                    else:
                        migration(db)
                b.set_version(db, SCHEMA_VERSION)
        except b.errors as exc:
            raise LedgerError(f"{self._where}: {what} ({b.describe(exc)})") from None
        self._select = _select_columns(SCHEMA_VERSION)
        self._schema = SCHEMA_VERSION

    def _version(self, db, create: bool) -> int:
        """The schema this ledger is at (0: empty), or refuse it; reads only."""
        b = self._backend
        user_version = b.user_version(db)
        tables = b.tables(db)
        if not tables and user_version == 0 and create:
            return 0  # new: never add tables to a database that has any of its own
        if not {"boards", "steps"} <= tables:
            raise InputError(f"{self._where}: not a flasher ledger (no boards/steps tables)")
        if user_version > SCHEMA_VERSION:
            raise LedgerError(f"{self._where}: written by a newer flasher (schema {user_version}; "
                              f"this one reads up to {SCHEMA_VERSION})")
        version = max(user_version, 1)  # flasher 0.1.0 left user_version at 0
        for table, columns in _columns(version).items():
            have = set(b.columns(db, table))
            missing = [c for c in columns if c not in have]
            if len(missing) == len(columns):
                raise InputError(f"{self._where}: not a flasher ledger (no {table} table)")
            if missing:
                raise InputError(f"{self._where}: not a flasher ledger (table {table} has no column "
                                 f"{', '.join(missing)})")
        return version

    def _read_error(self, exc: BaseException) -> FlasherError:
        if self._backend.not_a_ledger(exc):
            return InputError(f"{self._where}: not a flasher ledger ({self._backend.describe(exc)})")
        return LedgerError(f"{self._where}: cannot read ({self._backend.describe(exc)})")

    def close(self) -> None:
        """Stop the heartbeat, release this run's claims, close the ledger. Safe to call twice."""
        if self._closed:
            return
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            try:
                self._write(lambda db: db.execute("DELETE FROM claims WHERE run_id = ?", (self.run_id,)))
                with self._lock:
                    self._claims.clear()
            except LedgerError as exc:  # not fatal: they lapse with this process (or its heartbeat)
                log.warning("this run's claims were not released (they lapse with its heartbeat): %s", exc)
        self._closed = True
        self._backend.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- claims -------------------------------------------------------------------
    def claim(self, deveui: str) -> None:
        """Take the board for this run, or raise :class:`BoardClaimed` if another live run has it.

        One transaction that inserts the claim or, when there is one, locks its row
        (PostgreSQL) or the whole file (SQLite) before judging it, so of two runs or
        stations racing for a board exactly one wins. Claiming a board this run holds
        again is fine. The first claim starts the heartbeat.
        """
        def claim(db) -> None:
            now = self._backend.now()
            mine = (deveui, self.run_id, self._pid, self._host, now, now, self.station)
            for _ in range(3):  # a claim released between the INSERT and the SELECT: try again
                if db.execute("INSERT INTO claims (deveui, run_id, pid, host, claimed_at, heartbeat_at, station) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (deveui) DO NOTHING", mine).rowcount == 1:
                    break
                row = db.execute("SELECT run_id, pid, host, heartbeat_at, station FROM claims WHERE deveui = ?"
                                 + self._backend.lock_clause, (deveui,)).fetchone()
                if row is None:
                    continue
                run_id, pid, host, heartbeat_at, station = row
                if run_id == self.run_id:
                    db.execute("UPDATE claims SET heartbeat_at = ? WHERE deveui = ?", (now, deveui))
                    break
                if self._alive(pid, host, heartbeat_at, station, now):
                    raise BoardClaimed(deveui, pid=pid, host=host, run_id=run_id,
                                       station=station if station not in (None, self.station) else None)
                log.info("%s: %s: taking over from run %s (pid %s on %s, station %s), which is gone", self._where,
                         deveui, run_id, pid, host, station or host)
                db.execute("UPDATE claims SET run_id = ?, pid = ?, host = ?, claimed_at = ?, heartbeat_at = ?, "
                           "station = ? WHERE deveui = ?", (*mine[1:], deveui))
                break
            else:
                raise LedgerError(f"{self._where}: {deveui}: the claim kept changing hands; try again")

        self._write(claim)
        with self._lock:
            self._claims.add(deveui)
            if self._heartbeat is None:
                self._heartbeat = threading.Thread(target=self._beat, name=f"ledger heartbeat {self.run_id}", daemon=True)
                self._heartbeat.start()

    def release(self, deveui: str) -> None:
        """Give the board back (only if this run holds it)."""
        self._write(lambda db: db.execute("DELETE FROM claims WHERE deveui = ? AND run_id = ?", (deveui, self.run_id)))
        with self._lock:
            self._claims.discard(deveui)

    def _alive(self, pid: int, host: str, heartbeat_at: float, station: str | None, now: float) -> bool:
        """Whether a claim's holder may still be working: a fresh heartbeat, and its process if it is ours to see.

        The process is checked only for this station's claims made on this host: another
        machine can bear the same hostname, and only the heartbeat can speak for it.
        """
        if now - heartbeat_at > self.stale_after:
            return False
        if host == self._host and station in (None, self.station) and isinstance(pid, int) and pid > 0:
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
                held = self._write(self._beat_once)
                with self._lock:
                    lost, self._claims = self._claims - held, self._claims & held
            except LedgerError as exc:  # a busy disk, a server away: try again next beat; the claims may lapse meanwhile
                log.warning("%s: heartbeat not recorded: %s", self._where, exc)
                continue
            if lost:
                log.warning("%s: another run took over %s after this run's heartbeat lapsed", self._where,
                            ", ".join(sorted(lost)))

    def _beat_once(self, db) -> set[str]:
        db.execute("UPDATE claims SET heartbeat_at = ? WHERE run_id = ?", (self._backend.now(), self.run_id))
        return {r[0] for r in db.execute("SELECT deveui FROM claims WHERE run_id = ?", (self.run_id,))}

    def _write(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(db)`` in a write transaction; return its result once that is committed.

        Group commit, on a back end whose writers take turns (SQLite): while one transaction
        commits, other threads' writes queue up, and the next transaction takes all of them,
        so 256 boards wait for a few commits (and fsyncs) rather than queue for one each.
        PostgreSQL runs each write in its own transaction on a pooled connection: writers
        do not wait for each other there, and the server flushes concurrent commits together.
        The first queued writer commits for all, so no thread is kept for it. Every call
        still returns only after its own write is committed: a board's claim is held before
        its work starts, a step is recorded before the next begins, and "done" is on disk
        before it is reported. A write that raises (a claim another run holds, a driver
        error in its SQL) is rolled back alone: the others in its transaction run again
        without it. A failed commit fails them all.
        """
        if self.readonly:
            raise LedgerError(f"{self._where}: opened read-only")
        if self._closed:
            raise LedgerError(f"{self._where}: already closed")
        mine = _Write(fn)
        if not self._backend.group_commit:  # transactions run side by side, and the server joins their commits
            self._commit([mine], mine)
            return mine.outcome(self)
        with self._queue_lock:
            self._queue.append(mine)
            lead, self._committing = not self._committing, True
        if not lead:
            mine.wake.wait()
            if mine.done:  # another writer committed it
                return mine.outcome(self)
        # this thread commits the queue, its own write with it (it was queued first and no one else takes it)
        try:
            with self._queue_lock:
                batch, self._queue = self._queue, []
            self._commit(batch, mine)
        finally:
            with self._queue_lock:  # hand the queue to its first writer, or stop committing
                if self._queue:
                    self._queue[0].wake.set()
                else:
                    self._committing = False
        return mine.outcome(self)

    def _commit(self, batch: list[_Write], mine: _Write) -> None:
        """One transaction for ``batch``; each write ends with a result or an error, and its writer is woken."""
        pending = list(batch)
        try:
            while pending:
                at: int | None = None
                try:
                    with self._backend.transaction(write=True) as db:
                        for i, w in enumerate(pending):
                            at = i
                            w.result = w.fn(db)
                        at = None
                    pending = []
                except Exception as exc:
                    if at is None:  # BEGIN or COMMIT itself: none of it was written
                        for w in pending:
                            w.error = exc
                        pending = []
                    else:  # that write alone fails; the others were rolled back with it and run again
                        pending.pop(at).error = exc
        except BaseException as exc:  # Ctrl-C in the committing thread: the rest were not written either
            for w in pending:
                w.error = exc if w is mine else LedgerError(f"{self._where}: cannot write (interrupted)")
            raise
        finally:
            for w in batch:
                w.done = True
                w.wake.set()

    @contextmanager
    def _tx(self):
        """One write transaction of its own (a copy, a test); a driver failure (full disk, lock timeout, server gone)
        becomes one line naming the ledger. The provisioning writes go through :meth:`_write`."""
        if self.readonly:
            raise LedgerError(f"{self._where}: opened read-only")
        if self._closed:
            raise LedgerError(f"{self._where}: already closed")
        try:
            with self._backend.transaction(write=True) as db:
                yield db
        except self._backend.errors as exc:
            raise LedgerError(f"{self._where}: cannot write ({self._backend.describe(exc)})") from None

    # --- writes -------------------------------------------------------------------
    def begin(self, deveui: str, registration_id: str, **fields) -> BoardRecord:
        """Open (or reopen) a board's record for an attempt; counts attempts."""
        def begin(db) -> BoardRecord | None:
            now = self._backend.now()
            db.execute("INSERT INTO boards (deveui, registration_id, status, attempts, created_at, updated_at) "
                       "VALUES (?, ?, 'in_progress', 0, ?, ?) ON CONFLICT (deveui) DO NOTHING",
                       (deveui, registration_id, now, now))
            db.execute("UPDATE boards SET attempts = attempts + 1, status = 'in_progress', registration_id = ?, "
                       "station = ?, updated_at = ? WHERE deveui = ?", (registration_id, self.station, now, deveui))
            self._set(db, deveui, fields, now)
            return self._get(db, deveui)

        record = self._write(begin)
        assert record is not None
        return record

    def reset(self, deveui: str) -> None:
        """--force: forget the steps of a board so every one runs again."""
        self._write(lambda db: db.execute("DELETE FROM steps WHERE deveui = ?", (deveui,)))

    def step_started(self, deveui: str, step: str) -> None:
        def started(db) -> None:
            now = self._backend.now()
            db.execute("INSERT INTO steps (deveui, step, outcome, started_at, finished_at, detail, station) "
                       "VALUES (?, ?, 'started', ?, NULL, NULL, ?) ON CONFLICT (deveui, step) DO UPDATE SET "
                       "outcome = excluded.outcome, started_at = excluded.started_at, finished_at = NULL, detail = NULL, "
                       "station = excluded.station", (deveui, step, now, self.station))
            db.execute("UPDATE boards SET current_step = ?, updated_at = ? WHERE deveui = ?", (step, now, deveui))

        self._write(started)

    def step_finished(self, deveui: str, step: str, outcome: str = "ok", detail: str | None = None, *,
                      keep_status: bool = False, **fields) -> None:
        """Record a step's outcome together with what it produced, in one transaction.

        A failure marks the board failed, unless ``keep_status`` (a step run on its own,
        such as ``flasher tts register``, which leaves the board's provisioning status alone).
        """
        def finished(db) -> None:
            now = self._backend.now()
            cur = db.execute("UPDATE steps SET outcome = ?, finished_at = ?, detail = ?, station = ? "
                             "WHERE deveui = ? AND step = ?", (outcome, now, detail, self.station, deveui, step))
            if cur.rowcount == 0:
                db.execute("INSERT INTO steps (deveui, step, outcome, started_at, finished_at, detail, station) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", (deveui, step, outcome, now, now, detail, self.station))
            changes = {**fields, "status": "failed", "last_error": detail} if outcome == "failed" and not keep_status \
                else fields
            self._set(db, deveui, changes, now)

        self._write(finished)

    def note(self, deveui: str, **fields) -> None:
        """Record what a running step has done so far (the servers that hold an end device), before it ends."""
        self._write(lambda db: self._set(db, deveui, fields, self._backend.now()))

    def finish(self, deveui: str) -> None:
        self._write(lambda db: db.execute("UPDATE boards SET status = 'provisioned', current_step = NULL, "
                                          "last_error = NULL, station = ?, updated_at = ? WHERE deveui = ?",
                                          (self.station, self._backend.now(), deveui)))

    def mark(self, deveui: str, status: str, message: str | None) -> None:
        """Set a board's status and last error without touching its steps (a conflict leaves the work as it was)."""
        self._write(lambda db: db.execute("UPDATE boards SET status = ?, last_error = ?, station = ?, updated_at = ? "
                                          "WHERE deveui = ?", (status, message, self.station, self._backend.now(),
                                                               deveui)))

    def _set(self, db, deveui: str, fields: dict, now: float) -> None:
        if not fields:
            return
        bad = set(fields) - set(EXPORT_FIELDS)
        if bad:
            raise LedgerError(f"{self._where}: unknown field(s) {sorted(bad)}")
        cols = ", ".join(f"{k} = ?" for k in fields)
        db.execute(f"UPDATE boards SET {cols}, updated_at = ? WHERE deveui = ?", (*fields.values(), now, deveui))

    # --- pre-registrations (flasher register --input) ---------------------------
    def pre_registrations(self, registration_ids: Iterable[str], id_scope: str,
                          dps_host: str) -> dict[str, PreRegistration]:
        """What this ledger has of these ids at this DPS, by lower-case id: assigned, failed, or registering (a run
        was killed with it in flight, so DPS may have it or not). One query per call; the caller asks a page of
        ids at a time."""
        keys = list(dict.fromkeys(r.lower() for r in registration_ids))
        if not keys or self._schema < 6:   # a read-only ledger from before pre-registrations has none
            return {}
        marks = ", ".join("?" * len(keys))
        with self._read() as db:
            rows = db.execute(f"SELECT registration_key, status, device_key_check, message_sent FROM registrations "
                              f"WHERE id_scope = ? AND dps_host = ? AND registration_key IN ({marks})",
                              (id_scope, dps_host.lower(), *keys)).fetchall()
        return {k: PreRegistration(status, check, bool(sent)) for k, status, check, sent in rows}

    def registering(self, registration_id: str, *, id_scope: str, dps_host: str) -> None:
        """Noted, durably, before the id's registration is sent: a run killed from here on leaves it 'registering',
        and the next run asks DPS about it before registering it again. An assignment stays as it is."""
        def note(db) -> None:
            now = self._backend.now()
            key, host = registration_id.lower(), dps_host.lower()
            db.execute("INSERT INTO registrations (registration_key, id_scope, dps_host, registration_id, status, "
                       "attempts, station, created_at, updated_at) VALUES (?, ?, ?, ?, 'registering', 0, ?, ?, ?) "
                       "ON CONFLICT (registration_key, id_scope, dps_host) DO UPDATE SET status = 'registering', "
                       "station = excluded.station, updated_at = excluded.updated_at "
                       "WHERE registrations.status <> 'assigned'",
                       (key, id_scope, host, registration_id, self.station, now, now))

        self._write(note)

    def record_registration(self, registration_id: str, *, id_scope: str, dps_host: str, status: str,
                            device_key_check: str | None = None, assigned_hub: str | None = None,
                            device_id: str | None = None, message_sent: bool = False, error: str | None = None) -> None:
        """One id's outcome, committed before it is reported: what is reported done stays done."""
        def record(db) -> None:
            now = self._backend.now()
            key, host = registration_id.lower(), dps_host.lower()
            db.execute("INSERT INTO registrations (registration_key, id_scope, dps_host, registration_id, status, "
                       "attempts, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 0, ?, ?) "
                       "ON CONFLICT (registration_key, id_scope, dps_host) DO NOTHING",
                       (key, id_scope, host, registration_id, status, now, now))
            if status == "assigned":
                db.execute("UPDATE registrations SET registration_id = ?, status = ?, device_key_check = ?, "
                           "assigned_hub = ?, device_id = ?, message_sent = ?, attempts = attempts + 1, "
                           "last_error = NULL, station = ?, updated_at = ? "
                           "WHERE registration_key = ? AND id_scope = ? AND dps_host = ?",
                           (registration_id, status, device_key_check, assigned_hub, device_id, int(message_sent),
                            self.station, now, key, id_scope, host))
            else:   # a failure never undoes an earlier success at this DPS: it stays assigned, with the error noted
                db.execute("UPDATE registrations SET attempts = attempts + 1, last_error = ?, station = ?, "
                           "updated_at = ?, status = CASE WHEN status = 'assigned' THEN status ELSE ? END "
                           "WHERE registration_key = ? AND id_scope = ? AND dps_host = ?",
                           (error, self.station, now, status, key, id_scope, host))

        self._write(record)

    # --- reads --------------------------------------------------------------------
    @contextmanager
    def _read(self):
        """One read transaction, so a board and its steps are read as of the same moment."""
        if self._closed:
            raise LedgerError(f"{self._where}: already closed")
        try:
            with self._backend.transaction(write=False) as db:
                yield db
        except self._backend.errors as exc:
            raise self._read_error(exc) from None

    def _get(self, db, deveui: str) -> BoardRecord | None:
        row = db.execute(f"SELECT {self._select} FROM boards WHERE deveui = ?", (deveui,)).fetchone()
        if row is None:
            return None
        return _record(row, dict(db.execute("SELECT step, outcome FROM steps WHERE deveui = ? ORDER BY step", (deveui,))))

    def get(self, deveui: str) -> BoardRecord | None:
        with self._read() as db:
            return self._get(db, deveui)

    def all(self, station: str | None = None) -> list[BoardRecord]:
        """Every board (of ``station``, if given), oldest first, in two queries however many there are."""
        where, args = ("WHERE station = ?", (station,)) if station is not None else ("", ())
        with self._read() as db:
            rows = db.execute(f"SELECT {self._select} FROM boards {where} ORDER BY created_at, deveui", args).fetchall()
            steps = _group_steps(db.execute("SELECT deveui, step, outcome FROM steps ORDER BY deveui, step"))
        return [_record(row, steps.get(row[0], {})) for row in rows]

    def iter_records(self, batch: int = 1000, station: str | None = None) -> Iterator[BoardRecord]:
        """Every board (of ``station``, if given) in the order of :meth:`all`, read ``batch`` boards (two queries) at a time.

        Only one batch is held, so exporting 100,000 boards takes little memory. Other
        threads can write between batches; paging by (created_at, deveui), which never
        change, means no board is skipped or repeated.
        """
        for rows, steps in self._pages(batch, station, self._select, "deveui, step, outcome"):
            for row in rows:
                yield _record(row, {s: o for _, s, o in steps.get(row[0], [])})

    def iter_registrations(self, batch: int = 5000, station: str | None = None) -> Iterator[list[tuple]]:
        """Pages of pre-registrations (tuples in REGISTRATION_LIST order), oldest first, from one query read as it
        goes (one read transaction, constant memory). A ledger from before pre-registrations has none."""
        if batch < 1:
            raise InputError(f"{self._where}: batch must be at least 1, not {batch}")
        if self._schema < 6:
            return
        where, args = (" WHERE station = ?", (station,)) if station is not None else ("", ())
        with self._read() as db:
            yield from self._backend.stream(db, f"SELECT {', '.join(REGISTRATION_LIST)} FROM registrations{where} "
                                                f"ORDER BY created_at, registration_key, id_scope, dps_host", args, batch)

    def iter_rows(self, batch: int = 5000, station: str | None = None) -> Iterator[list[tuple]]:
        """Pages of board rows (tuples in EXPORT_FIELDS order) without their steps: what a CSV export needs.

        One query per page and no objects per board, so `status --csv` streams a million boards
        in constant memory at close to the speed of SQLite's own CSV export.
        """
        for rows, _ in self._pages(batch, station, self._select, None):
            yield rows

    def iter_csv(self, batch: int = 5000, station: str | None = None) -> Iterator[str]:
        """``status --csv``: the header, then the CSV text of ``batch`` boards at a time, in the order of :meth:`all`.

        Byte for byte what :func:`write_csv` prints, from one query read as it goes (one
        read transaction: a consistent snapshot in constant memory). On SQLite the database
        renders each row's text itself (see :func:`_csv_select`); anything that text could
        get wrong (quotes, commas or newlines in a value, NUL, an unexpected type) is caught
        per page and those rows go through Python's csv writer. PostgreSQL streams the rows
        through a server-side cursor into the csv writer.
        """
        if batch < 1:
            raise InputError(f"{self._where}: batch must be at least 1, not {batch}")
        yield _csv_text([EXPORT_FIELDS])
        where, args = (" WHERE station = ?", (station,)) if station is not None else ("", ())
        order = " ORDER BY created_at, deveui"
        with self._read() as db:
            if not isinstance(self._backend, SQLiteBackend):
                for rows in self._backend.stream(db, f"SELECT {self._select} FROM boards{where}{order}", args, batch):
                    yield _csv_text(rows)
                return
            shape = _csv_select(self._select)
            for rows in self._backend.stream(db, f"SELECT {shape.select}, rowid FROM boards{where}{order}", args, batch):
                yield shape.page(rows, self._raw_by_rowid(db))

    def _raw_by_rowid(self, db) -> Callable[[int], tuple]:
        """One SQLite board row (EXPORT_FIELDS), raw, by rowid: for the rows the database cannot render."""
        return lambda rowid: tuple(db.execute(f"SELECT {self._select} FROM boards WHERE rowid = ?", (rowid,)).fetchone())

    def _pages(self, batch: int, station: str | None, columns: str, step_columns: str | None):
        """(board rows, {deveui: step rows}) ``batch`` boards at a time, oldest first; each row starts with deveui."""
        if batch < 1:
            raise InputError(f"{self._where}: batch must be at least 1, not {batch}")
        after: tuple = ()
        while True:
            conditions = (["(created_at, deveui) > (?, ?)"] if after else []) + (["station = ?"] if station else [])
            where = ("WHERE " + " AND ".join(conditions)) if conditions else ""
            args = (*after, *((station,) if station else ()), batch)
            page = f"SELECT {{}} FROM boards {where} ORDER BY created_at, deveui LIMIT ?"
            with self._read() as db:
                rows = db.execute(page.format(f"{columns}, created_at AS page_key"), args).fetchall()
                steps: dict[str, list[tuple]] = {}
                if step_columns is not None:
                    for r in db.execute(f"SELECT {step_columns} FROM steps WHERE deveui IN "
                                        f"({page.format('deveui')}) ORDER BY deveui, step", args):
                        steps.setdefault(r[0], []).append(tuple(r))
            yield [tuple(r)[:-1] for r in rows], steps
            if len(rows) < batch:
                return
            after = (rows[-1][-1], rows[-1][0])


def _select_columns(version: int) -> str:
    """The SELECT list of EXPORT_FIELDS for a ledger at ``version``: NULL for a column it does not have yet."""
    have = set(_columns(version).get("boards", ())) if version else set(EXPORT_FIELDS)
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


# --- moving a ledger ---------------------------------------------------------------

@dataclass
class CopyReport:
    boards: int = 0      # boards in the source
    steps: int = 0       # step rows written
    copied: int = 0      # boards the destination did not have
    same: int = 0        # boards it already had, identical
    replaced: int = 0    # boards it had otherwise, replaced (--force)
    registrations: int = 0             # pre-registrations in the source
    registrations_copied: int = 0      # ... the destination did not have
    registrations_same: int = 0        # ... it had already (or had assigned where the source had only failed)
    registrations_updated: int = 0     # ... it had failed and the source assigned, or replaced (--force)


def copy_ledger(src: Ledger, dest: Ledger, *, force: bool = False, batch: int = 500) -> CopyReport:
    """Copy every board and step of ``src`` into ``dest`` in one transaction of ``dest``.

    A board ``dest`` already has, identical, is left as it is, so copying again is
    harmless. One it has otherwise is a conflict: without ``force`` nothing at all is
    written and the error names the boards; with ``force`` its row and steps are
    replaced by ``src``'s. A board some live run is working on in ``dest`` is never
    replaced. Claims are not copied: they belong to the runs of the ledger they are in.

    Pre-registrations (``flasher register --input``) go along, merged as DPS would see them:
    one assigned beats one that failed (a failure never undoes a success), and two that
    failed keep the later. Two assigned differently (another hub, device id or key) are a
    conflict like a board's.
    """
    if src._backend.same_as(dest._backend):
        raise InputError(f"{src._where}: source and destination are the same ledger")
    report = CopyReport()
    conflicts: list[str] = []
    busy: list[str] = []
    board_cols, step_cols = ", ".join(EXPORT_FIELDS), ", ".join(STEP_FIELDS)
    with src._read() as db:  # an old source may lack newer step columns: those read as NULL
        src_has = set(src._backend.columns(db, "steps"))
    src_steps = ", ".join(f if f in src_has else f"NULL AS {f}" for f in STEP_FIELDS)
    with dest._tx() as db:
        now = dest._backend.now()
        for rows, steps in src._pages(batch, None, src._select, src_steps):
            if not rows:
                break
            marks, euis = ", ".join("?" * len(rows)), [r[0] for r in rows]
            have = {r[0]: tuple(r) for r in db.execute(f"SELECT {board_cols} FROM boards WHERE deveui IN ({marks})", euis)}
            have_steps: dict[str, list[tuple]] = {}
            for r in db.execute(f"SELECT {step_cols} FROM steps WHERE deveui IN ({marks}) ORDER BY deveui, step", euis):
                have_steps.setdefault(r[0], []).append(tuple(r))
            claims = {r[0]: r for r in db.execute(
                f"SELECT deveui, pid, host, heartbeat_at, station FROM claims WHERE deveui IN ({marks})", euis)}
            for row in rows:
                eui, theirs = row[0], steps.get(row[0], [])
                report.boards += 1
                if eui in have:
                    if have[eui] == row and have_steps.get(eui, []) == theirs:
                        report.same += 1
                        continue
                    if not force:
                        conflicts.append(eui)
                        continue
                    claim = claims.get(eui)
                    if claim is not None and dest._alive(claim[1], claim[2], claim[3], claim[4], now):
                        busy.append(eui)
                        continue
                    db.execute("DELETE FROM steps WHERE deveui = ?", (eui,))
                    db.execute("DELETE FROM boards WHERE deveui = ?", (eui,))
                    report.replaced += 1
                else:
                    report.copied += 1
                db.execute(f"INSERT INTO boards ({board_cols}) VALUES ({', '.join('?' * len(EXPORT_FIELDS))})", row)
                for step in theirs:
                    db.execute(f"INSERT INTO steps ({step_cols}) VALUES ({', '.join('?' * len(STEP_FIELDS))})", step)
                report.steps += len(theirs)
        reg_conflicts = _copy_registrations(src, db, report, force, batch)
        if conflicts or busy or reg_conflicts:
            what = []
            if conflicts:
                what.append(f"{len(conflicts)} board(s) differ from {src._backend.name!r} ({_some(conflicts)}); "
                            f"--force replaces them")
            if reg_conflicts:
                what.append(f"{len(reg_conflicts)} pre-registration(s) were assigned otherwise in "
                            f"{src._backend.name!r} ({_some(reg_conflicts)}); --force replaces them")
            if busy:
                what.append(f"{len(busy)} board(s) are in progress in a run using it ({_some(busy)})")
            raise LedgerError(f"{dest._where}: nothing copied: " + "; ".join(what))
    return report


def _copy_registrations(src: Ledger, db, report: CopyReport, force: bool, batch: int) -> list[str]:
    """Merge ``src``'s pre-registrations into the destination's open transaction ``db``; the conflicting ids."""
    if src._schema < 6:   # a ledger from before pre-registrations
        return []
    cols = ", ".join(REGISTRATION_FIELDS)
    key = "registration_key, id_scope, dps_host"
    insert = f"INSERT INTO registrations ({cols}) VALUES ({', '.join('?' * len(REGISTRATION_FIELDS))})"
    conflicts: list[str] = []
    after: tuple = ()
    while True:
        with src._read() as sdb:
            rows = [tuple(r) for r in sdb.execute(
                f"SELECT {cols} FROM registrations {f'WHERE ({key}) > (?, ?, ?) ' if after else ''}"
                f"ORDER BY {key} LIMIT ?", (*after, batch))]
        for row in rows:
            report.registrations += 1
            have = db.execute(f"SELECT {cols} FROM registrations WHERE ({key}) = (?, ?, ?)", row[:3]).fetchone()
            if have is None:
                db.execute(insert, row)
                report.registrations_copied += 1
                continue
            verdict = _merge_registration(tuple(have), row, force)
            if verdict == "same":
                report.registrations_same += 1
                continue
            if verdict == "conflict":
                conflicts.append(row[_REG["registration_id"]])
                continue
            db.execute(f"DELETE FROM registrations WHERE ({key}) = (?, ?, ?)", row[:3])
            db.execute(insert, row)
            report.registrations_updated += 1
        if len(rows) < batch:
            return conflicts
        after = rows[-1][:3]


_REG = {f: i for i, f in enumerate(REGISTRATION_FIELDS)}


def _merge_registration(ours: tuple, theirs: tuple, force: bool) -> str:
    """What copying pre-registration ``theirs`` onto ``ours`` (same id and DPS) does: "same", "update" or "conflict"."""
    if ours == theirs:
        return "same"
    if force:
        return "update"
    status, when, sent = _REG["status"], _REG["updated_at"], _REG["message_sent"]
    if ours[status] != "assigned":   # a failure here: an assignment there is news, a failure only if later
        return "update" if theirs[status] == "assigned" or theirs[when] > ours[when] else "same"
    if theirs[status] != "assigned":   # a failure never undoes a success
        return "same"
    assignment = [_REG[f] for f in ("assigned_hub", "device_id", "device_key_check")]
    if [ours[i] for i in assignment] != [theirs[i] for i in assignment]:
        return "conflict"
    return "update" if theirs[sent] > ours[sent] else "same"   # the test message went there only


def _some(euis: list[str], n: int = 3) -> str:
    return ", ".join(euis[:n]) + (f" and {len(euis) - n} more" if len(euis) > n else "")


# --- exports ---------------------------------------------------------------------

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


def write_csv_rows(pages: Iterable[list[tuple]], stream: TextIO) -> None:
    """The same CSV as :func:`write_csv`, from :meth:`Ledger.iter_rows` pages: one writerows() per page."""
    w = csv.writer(stream, lineterminator="\n")
    w.writerow(EXPORT_FIELDS)
    for rows in pages:
        w.writerows(rows)


def _csv_text(rows: Iterable[tuple]) -> str:
    """Rows (EXPORT_FIELDS order) as :func:`write_csv` writes them, in one string."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _csv_quoting() -> frozenset[str]:
    """The characters that make this csv writer quote a field (asked of csv itself: it has changed across Pythons)."""
    probe = ',"\n\r\t\x00\x01 ;\'\\'
    return frozenset(c for c in probe if _csv_text([(f"a{c}b", "x")]) != f"a{c}b,x\n")


@dataclass(frozen=True)
class _CsvSelect:
    """How SQLite renders ``status --csv`` rows, and the checks that say when it rendered one as csv.writer would.

    Each row comes back as (text, float, float, text, flag, rowid): the fields before
    created_at joined by commas, the two timestamps as numbers (csv prints Python's repr of
    a float, the shortest text that reads back as the same number; SQLite's printf shows 15
    digits), the fields after them, and a flag that is empty unless attempts is not an
    integer or last_error holds a NUL (printf would print a real with 15 digits, and stop a
    text at its NUL). A page is taken as rendered when its text has exactly one line and
    len(EXPORT_FIELDS) - 1 commas per row and none of the characters csv would quote, nor
    the flag, nor a quote mark (a timestamp that is not a number would show as '...').

    Checking every column's type and every text for NUL costs SQLite more than the whole
    export (a function call per column per row), so only the columns where flasher can write
    them are checked: last_error is free text from errors and devices; the others are ids,
    names, paths and JSON (escaped) that cannot hold a NUL, and flasher writes no blobs.
    """

    select: str
    line: Callable[[tuple], str]
    commas: int
    suspect: tuple[str, ...]

    def page(self, rows: list[tuple], raw: Callable[[int], tuple]) -> str:
        """A page of rows as CSV text; rows the database could not render go through csv.writer."""
        lines = list(map(self.line, rows))
        text = "".join(lines)
        if self._rendered(text, len(rows)):
            return text
        return "".join(line if row[-2] == "" and self._rendered(line, 1) else _csv_text([raw(row[-1])])
                       for row, line in zip(rows, lines, strict=True))

    def _rendered(self, text: str, rows: int) -> bool:
        # one `in` per character: str's own search, several times faster than a regex character class
        return (text.count("\n") == rows and text.count(",") == self.commas * rows
                and not any(c in text for c in self.suspect))


_FLOAT_FIELDS = ("created_at", "updated_at")


def _csv_select(select: str) -> _CsvSelect:
    """The SELECT list that makes SQLite render rows of ``select`` (a ledger's EXPORT_FIELDS list) as CSV text."""
    exprs = [item.split(" AS ")[0] for item in select.split(", ")]   # a column, or NULL for one an old ledger lacks
    parts: list[str] = []
    fmt: list[str] = []
    run: list[str] = []
    checks: list[str] = []
    for field, expr in zip(EXPORT_FIELDS, exprs, strict=True):
        if field in _FLOAT_FIELDS:
            if run:
                parts.append(f"printf('{','.join(['%s'] * len(run))}', {', '.join(run)})")
                fmt.append("%s")
                run = []
            parts.append(expr)
            fmt.append("%r")
            continue
        run.append(expr)
        if expr == "NULL":
            continue
        if field == "attempts":
            checks.append(f"typeof({expr}) = 'integer'")
        elif field == "last_error":
            checks.append(f"({expr} IS NULL OR NOT instr({expr}, char(0)))")
    if run:
        parts.append(f"printf('{','.join(['%s'] * len(run))}', {', '.join(run)})")
        fmt.append("%s")
    flag = f"CASE WHEN {' AND '.join(checks) or 1} THEN '' ELSE char(1) END"
    suspect = _csv_quoting() - {",", "\n"} | {"\x01", "\x00", "'"}
    return _CsvSelect(select=", ".join([*parts, flag]), line=(",".join(fmt) + "%s\n%.0s").__mod__,
                      commas=len(EXPORT_FIELDS) - 1, suspect=tuple(sorted(suspect)))


def export_json(records: Iterable[BoardRecord]) -> str:
    buf = io.StringIO()
    write_json(records, buf)
    return buf.getvalue()


def export_csv(records: Iterable[BoardRecord]) -> str:
    buf = io.StringIO()
    write_csv(records, buf)
    return buf.getvalue()
