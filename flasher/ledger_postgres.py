"""The ledger's PostgreSQL back end: one database that every station of a fleet shares.

Imported only for a ``postgresql://`` ledger, and the only module that imports psycopg
(an optional extra, ``pip install 'flasher[postgres]'``). Each transaction takes a
connection from a pool, so concurrent boards write at once instead of queueing on one
connection; a claim's row is locked (``SELECT … FOR UPDATE``) while it is judged; the
migrations hold an advisory lock, so two stations starting on an empty database create
it once; and every timestamp is on the server's clock, so heartbeats written by
stations whose clocks disagree are judged alike.
"""

from __future__ import annotations

import functools
import re
import time
from contextlib import contextmanager
from typing import Any

from flasher.ledger import Backend, LedgerError, mask_url
from flasher.secrets import Redactor, Secret

DEFAULT_CONNECT_TIMEOUT = 10     # seconds; libpq's own default is to wait for ever
POOL_SIZE = 8                    # connections per run: transactions are short, 16 boards share them
MIGRATION_LOCK = 0x666C6173686572  # pg_advisory_lock key ("flasher"): one migrating opener at a time
VERSION_TABLE = "flasher_schema"   # PostgreSQL has no PRAGMA user_version: the schema version lives here


def _driver(where: str):
    """psycopg and its pool, or one line saying which extra to install."""
    try:
        import psycopg
        import psycopg_pool
    except ImportError as exc:
        raise LedgerError(f"{where}: a PostgreSQL ledger needs psycopg 3 and psycopg_pool ({exc.name} is missing): "
                          f"pip install 'flasher[postgres]'") from None
    return psycopg, psycopg_pool


@functools.lru_cache(maxsize=512)
def _placeholders(sql: str) -> str:
    """The ledger's portable SQL ("?" placeholders) in psycopg's style."""
    return sql.replace("%", "%%").replace("?", "%s")


class _Db:
    """A connection in a transaction whose ``execute`` takes "?" placeholders, as sqlite3's does."""

    __slots__ = ("conn",)

    def __init__(self, conn):
        self.conn = conn

    def execute(self, sql: str, params=()):
        if not params:  # no parameters: psycopg takes the text as it is (a "?" in a comment stays one)
            return self.conn.execute(sql)
        return self.conn.execute(_placeholders(sql), tuple(params))


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return re.sub(r"\s+", " ", lines[0]) if lines else ""


class PostgresBackend(Backend):
    """A ledger in a PostgreSQL database, reached through a pool of connections."""

    lock_clause = " FOR UPDATE"

    def __init__(self, url: str, password: Secret | str | None = None, application: str = "flasher"):
        self.url = url
        self.name = self.path = mask_url(url)
        self._where = f"ledger {self.name!r}"
        self._psycopg, self._pool_mod = _driver(self._where)
        self.errors = (self._psycopg.Error,)
        try:
            params = self._psycopg.conninfo.conninfo_to_dict(url)
        except self._psycopg.Error as exc:
            raise LedgerError(f"{self._where}: not a valid PostgreSQL URL ({_one_line(str(exc))})") from None
        self._params = params
        self.timeout = float(params.get("connect_timeout") or DEFAULT_CONNECT_TIMEOUT)
        self._kwargs: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in params:
            self._kwargs["connect_timeout"] = DEFAULT_CONNECT_TIMEOUT
        if "application_name" not in params:
            self._kwargs["application_name"] = application[:63]
        secret = password.reveal() if isinstance(password, Secret) else password
        self._password_given = bool(secret)
        if secret:
            Redactor.add(secret)
            self._kwargs["password"] = secret
        self._offset = 0.0
        self.pool: Any = None

    def open(self, create: bool, readonly: bool) -> None:
        """Connect once to say plainly why not if that fails, and to learn the server's clock; then start the pool.

        ``create`` makes the tables in an empty database, never the database itself
        (that takes rights a station should not have): ``createdb`` it once.
        """
        psycopg = self._psycopg
        try:
            conn = psycopg.connect(self.url, **self._kwargs)
        except psycopg.Error as exc:
            raise LedgerError(f"{self._where}: cannot connect ({self._why(exc)})") from None
        try:
            t0 = time.time()
            server = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()[0]
            self._offset = server - (t0 + time.time()) / 2
        except psycopg.Error as exc:
            raise LedgerError(f"{self._where}: cannot read ({self._why(exc)})") from None
        finally:
            conn.close()
        pool = self._pool_mod.ConnectionPool
        self.pool = pool(self.url, kwargs=self._kwargs, min_size=1, max_size=POOL_SIZE, timeout=self.timeout,
                         check=pool.check_connection, configure=self._read_only if readonly else None,
                         name=f"flasher ledger {self.name}", open=True)

    @staticmethod
    def _read_only(conn) -> None:
        conn.execute("SET default_transaction_read_only = on")

    def _why(self, exc: BaseException) -> str:
        """libpq's reason in one line, with what to do about the usual ones."""
        text = _one_line(str(exc)) or exc.__class__.__name__
        if isinstance(exc, self._pool_mod.PoolTimeout):
            try:  # the pool only says it waited: ask the server why
                self._psycopg.connect(self.url, **{**self._kwargs, "connect_timeout": 3}).close()
            except self._psycopg.Error as probe:
                return f"cannot reach the server within {self.timeout:g} s: {self._why(probe)}"
            return f"no free connection to the server within {self.timeout:g} s"
        if "password" in text and not self._password_given:
            text += " (set PGPASSWORD, a ~/.pgpass line, or ledger_password_file)"
        elif "does not exist" in text and "database" in text:
            text += " (create it once: createdb -O USER DBNAME)"
        return Redactor.scrub(text)

    @contextmanager
    def transaction(self, write: bool):
        with self.pool.connection() as conn:
            with conn.transaction():
                yield _Db(conn)

    @contextmanager
    def migrating(self):
        """The lock is taken before the transaction begins: a transaction that began before another opener's
        migration committed may still see the catalog as it was (a cached "no such table"), and migrate again."""
        with self.pool.connection() as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))  # the server drops it if the connection does
            try:
                with conn.transaction():
                    yield _Db(conn)
            finally:
                if not conn.broken:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))

    def stream(self, db, sql: str, args: tuple, batch: int):
        """A server-side cursor: the server holds the result and sends ``batch`` rows a fetch (constant memory here)."""
        with db.conn.cursor(name="flasher_stream") as cursor:
            cursor.execute(_placeholders(sql) if args else sql, tuple(args) or None)
            while rows := cursor.fetchmany(batch):
                yield rows

    def user_version(self, db) -> int:
        if not db.execute(f"SELECT to_regclass('{VERSION_TABLE}') IS NOT NULL").fetchone()[0]:
            return 0
        return db.execute(f"SELECT coalesce(max(version), 0) FROM {VERSION_TABLE}").fetchone()[0]

    def set_version(self, db, version: int) -> None:
        db.execute(f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (version INTEGER NOT NULL)")
        db.execute(f"DELETE FROM {VERSION_TABLE}")
        db.execute(f"INSERT INTO {VERSION_TABLE} (version) VALUES (?)", (int(version),))

    def tables(self, db) -> set[str]:
        rows = db.execute("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                          "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')")
        return {r[0] for r in rows} - {VERSION_TABLE}

    def columns(self, db, table: str) -> list[str]:
        rows = db.execute("SELECT a.attname FROM pg_attribute a WHERE a.attrelid = "
                          "to_regclass(quote_ident(current_schema()) || '.' || quote_ident(?)) "
                          "AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum", (table,))
        return [r[0] for r in rows]

    def ddl(self, statement: str) -> str:
        """SQLite's REAL is a double; PostgreSQL's is a float4 (a timestamp to the nearest two minutes)."""
        return re.sub(r"\bREAL\b", "DOUBLE PRECISION", statement)

    def describe(self, exc: BaseException) -> str:
        return self._why(exc)

    def now(self) -> float:
        return time.time() + self._offset

    def same_as(self, other: Backend) -> bool:
        if not isinstance(other, PostgresBackend):
            return False
        keys = ("host", "hostaddr", "port", "dbname", "user", "options")
        return all(self._params.get(k) == other._params.get(k) for k in keys)

    def close(self, failed: bool = False) -> None:
        if self.pool is not None:
            self.pool.close(timeout=5)
            self.pool = None
