"""A throwaway PostgreSQL server, for the tests and the benchmarks: like the simulators, a stand-in for a fleet's own.

It is a real server (PostgreSQL's own binaries: Debian's ``postgresql-15`` puts them in
``/usr/lib/postgresql/15/bin``), in a private temporary folder, listening on a free
loopback port and on a socket in that folder. ``initdb`` refuses to run as root, so
as root the cluster belongs to the ``postgres`` user and its programs run through
``runuser``. Stations log in as ``flasher`` with a password (scram-sha-256, as a real
server would ask); the superuser only over the private socket, for set-up.

Stopping is tied to this process, not left to whoever remembers: a watchdog child
stops the server (``pg_ctl stop`` on its own data folder, never by name) and removes
the folder as soon as this process lets go of it, by :meth:`close` or by dying in any
way, ``SIGKILL`` included.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

SERVER_USER = "postgres"  # who owns the cluster when we are root
ROLE = "flasher"          # what stations log in as

WATCHDOG = textwrap.dedent("""
    import shutil, subprocess, sys
    sys.stdin.buffer.read()  # until the parent closes its end, or dies
    prefix, pg_ctl, data, root = sys.argv[1].split() if sys.argv[1] else [], sys.argv[2], sys.argv[3], sys.argv[4]
    subprocess.run([*prefix, pg_ctl, "stop", "-D", data, "-m", "immediate", "-w", "-t", "30"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(root, ignore_errors=True)
""")


def find_bin_dir() -> Path | None:
    """Where initdb and pg_ctl are: $FLASHER_PG_BIN, PATH, or Debian's /usr/lib/postgresql/N/bin (newest)."""
    if os.environ.get("FLASHER_PG_BIN"):
        return Path(os.environ["FLASHER_PG_BIN"])
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]) if
                   p.split("/")[4].isdigit() else 0)
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThrowawayPostgres:
    """One PostgreSQL cluster for as long as this object (and this process) lives.

    ``durable=False`` turns fsync off, for tests; the benchmark keeps it on, so the
    server pays for its commits as a real one does.
    """

    def __init__(self, *, durable: bool = False, bin_dir: Path | None = None):
        self.durable = durable
        found = bin_dir or find_bin_dir()
        if found is None:
            raise RuntimeError("PostgreSQL's server programs (initdb, pg_ctl) are not installed: "
                               "apt-get install postgresql-15 (or set FLASHER_PG_BIN)")
        self.bin_dir: Path = found
        self.password = secrets.token_hex(16)
        self.port = 0
        self.root: Path | None = None
        self._watchdog: subprocess.Popen | None = None
        self._prefix: list[str] = []
        self._databases = 0

    # --- life cycle -------------------------------------------------------------------
    def start(self) -> ThrowawayPostgres:
        self.root = Path(tempfile.mkdtemp(prefix="flasher-pg-"))
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise RuntimeError(f"running as root, and there is no {SERVER_USER!r} user to own the cluster "
                                   f"(initdb refuses root); apt-get install postgresql-15 makes it") from None
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._prefix = ["runuser", "-u", SERVER_USER, "--"]
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", WATCHDOG, " ".join(self._prefix), str(self.bin_dir / "pg_ctl"), str(self.data),
             str(self.root)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)  # a Ctrl-C to our process group must not stop it before we do
        try:
            self._run("initdb", "-D", str(self.data), "-U", SERVER_USER, "--auth-local=trust",
                      "--auth-host=scram-sha-256", "--no-sync", "--locale=C", "-E", "UTF8")
            for _ in range(5):  # a free port can be taken between finding it and binding it
                self.port = _free_port()
                if self._start_server():
                    break
            else:
                raise RuntimeError(f"PostgreSQL did not start: {self.log_tail()}")
            with self.admin() as conn:
                conn.execute(f"CREATE ROLE {ROLE} LOGIN CREATEDB PASSWORD '{self.password}'")
            self.pgpass.write_text(f"127.0.0.1:{self.port}:*:{ROLE}:{self.password}\n")
            self.pgpass.chmod(0o600)
        except BaseException:
            self.close()
            raise
        return self

    @property
    def data(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    @property
    def pgpass(self) -> Path:
        """A ~/.pgpass-style file with the role's password (point PGPASSFILE at it)."""
        assert self.root is not None
        return self.root / "pgpass"

    def _run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([*self._prefix, str(self.bin_dir / program), *args], capture_output=True, text=True,
                              timeout=120)
        if check and done.returncode != 0:
            raise RuntimeError(f"{program} failed: {(done.stderr or done.stdout).strip()[-500:]}")
        return done

    def _start_server(self) -> bool:
        assert self.root is not None
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root} "
                   f"-c max_connections=200" + ("" if self.durable else " -c fsync=off -c full_page_writes=off"))
        done = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options,
                         "-w", "-t", "60", "start", check=False)
        return done.returncode == 0

    def stop(self) -> None:
        """Stop the server now, as a crash would (immediate): the ledger's clients lose it mid-transaction."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop")

    def restart(self) -> None:
        """Start it again after :meth:`stop`, on the same port with the same data."""
        if not self._start_server():
            raise RuntimeError(f"PostgreSQL did not start again: {self.log_tail()}")

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def log_tail(self, lines: int = 5) -> str:
        try:
            assert self.root is not None
            return " | ".join((self.root / "server.log").read_text().strip().splitlines()[-lines:])
        except (OSError, AssertionError):
            return "(no server log)"

    def close(self) -> None:
        """Stop the server and remove its folder (the watchdog does both, as it would if we died)."""
        if self._watchdog is None:
            return
        assert self._watchdog.stdin is not None
        self._watchdog.stdin.close()
        self._watchdog.wait(timeout=60)
        self._watchdog = None

    def __enter__(self) -> ThrowawayPostgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- using it ------------------------------------------------------------------
    def admin(self):
        """A superuser connection over the private socket (autocommit), for set-up."""
        import psycopg

        return psycopg.connect(host=str(self.root), port=self.port, user=SERVER_USER, dbname="postgres",
                               autocommit=True)

    def url(self, dbname: str) -> str:
        """The ledger URL a station would be given (no password in it: that comes from PGPASSFILE/PGPASSWORD)."""
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database owned by the stations' role; its URL."""
        if name is None:
            self._databases += 1
            name = f"ledger_{os.getpid()}_{self._databases}"
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}" OWNER {ROLE}')
        return self.url(name)
