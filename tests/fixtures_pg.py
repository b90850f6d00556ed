"""A real PostgreSQL server for the ledger tests: one throwaway cluster per test process.

Under pytest-xdist every worker is its own process, so each gets its own cluster (its
own folder and free loopback port): nothing to share, nothing to race. The server is
stopped and its folder removed when the session ends, and also if the worker dies
(see flasher.sim.postgres). Stations authenticate with a password, read by libpq from
the file PGPASSFILE names (the ~/.pgpass mechanism), as a real station's would be.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def pg_server():
    from flasher.sim.postgres import ThrowawayPostgres, find_bin_dir

    if find_bin_dir() is None:
        message = "PostgreSQL's server programs are not installed (apt-get install postgresql-15; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    server = ThrowawayPostgres().start()
    before = os.environ.get("PGPASSFILE")
    os.environ["PGPASSFILE"] = str(server.pgpass)
    try:
        yield server
    finally:
        if before is None:
            os.environ.pop("PGPASSFILE", None)
        else:
            os.environ["PGPASSFILE"] = before
        server.close()


@pytest.fixture
def pg_url(pg_server) -> str:
    """A fresh, empty database on the session's server, for one test: its ledger URL."""
    return pg_server.create_database()


class LedgerPlace:
    """Where one test keeps its ledgers: files in tmp_path, or fresh databases on the session's server.

    ``target(name)`` is what ``--ledger`` gets (the same name, the same ledger);
    ``open(name)`` opens it in this process.
    """

    def __init__(self, kind: str, tmp_path, server=None):
        self.kind, self._tmp, self._server = kind, tmp_path, server
        self._urls: dict[str, str] = {}

    def target(self, name: str = "l") -> str:
        if self.kind == "sqlite":
            return str(self._tmp / f"{name}.sqlite3")
        if name not in self._urls:
            self._urls[name] = self._server.create_database()
        return self._urls[name]

    def open(self, name: str = "l", **kwargs):
        from flasher.ledger import Ledger

        return Ledger(self.target(name), **kwargs)

    def __repr__(self) -> str:
        return f"LedgerPlace({self.kind})"


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_place(request, tmp_path) -> LedgerPlace:
    """Run the test once with SQLite ledgers and once with PostgreSQL ones."""
    server = request.getfixturevalue("pg_server") if request.param == "postgres" else None
    return LedgerPlace(request.param, tmp_path, server)
