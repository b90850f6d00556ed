"""Benchmark `flasher status --csv` on a big ledger against a bare `sqlite3 -csv` export of the same columns.

    python bench/status.py [--boards 1000000] [--repeat 3] [--keep FILE]

Builds a ledger of N provisioned boards (each with its seven step rows) through the real
schema, then times `flasher status --csv` and `sqlite3 -csv -header` selecting the same
columns in the same order, side by side, and reports each one's peak memory (the
child's own max RSS) and CPU time (less disturbed by a busy machine than the wall clock).
Goals: time <= 1.5x the bare export; flasher's peak <= 64 MiB, also for `status --json`
and the table (run once each, timed for information only). The ledger is built by SQLite
in one transaction and kept in the temp folder, named by its size, schema and the code
that built it, so reruns reuse it; `--keep FILE` puts it elsewhere.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_env, side_by_side  # noqa: E402

STEPS = ("identify", "derive", "render", "program", "upload", "register", "message")


def build(path: Path, boards: int) -> None:
    """N provisioned boards with their seven steps, made by SQLite itself in one transaction (a million in ~30 s)."""
    from flasher.ledger import EXPORT_FIELDS, Ledger

    Ledger(path).close()   # the real schema, at the current version
    db = sqlite3.connect(path, isolation_level=None)
    values = {"deveui": "printf('%016X', 0x2CF7F12000000000 + i)", "registration_id": "printf('%016x', 0x2CF7F12000000000 + i)",
              "status": "'provisioned'", "join_eui": "'70B3D57ED003F06A'", "band": "'EU868'",
              "app_key_source": "'derived'", "id_scope": "'0ne0001A2B3'", "device_key_check": "printf('%016x', i)",
              "assigned_hub": "'hub-1.azure-devices.net'", "device_id": "printf('%016x', 0x2CF7F12000000000 + i)",
              "header_path": "printf('headers/%016X.h', 0x2CF7F12000000000 + i)", "header_sha256": "printf('%064x', i)",
              "attempts": "1", "port": "'/dev/ttyACM' || (i % 64)", "serial_number": "printf('SN%08d', i)",
              "created_at": ":now + i * 1e-3", "updated_at": ":now + i * 1e-3"}
    cols = [c for c in EXPORT_FIELDS if c in values]
    steps = " UNION ALL ".join(f"SELECT '{s}' AS step" for s in STEPS)
    db.execute("PRAGMA journal_mode = OFF")
    db.execute("BEGIN")
    db.execute(f"WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < :boards) "
               f"INSERT INTO boards ({', '.join(cols)}) SELECT {', '.join(values[c] for c in cols)} FROM n",
               {"boards": boards, "now": time.time()})
    db.execute(f"INSERT INTO steps (deveui, step, outcome, started_at, finished_at, detail) "
               f"SELECT b.deveui, s.step, CASE s.step WHEN 'upload' THEN 'skipped' ELSE 'ok' END, b.created_at, "
               f"b.created_at, NULL FROM boards b, ({steps}) s ORDER BY b.deveui, s.step")
    db.execute("COMMIT")
    db.execute("PRAGMA journal_mode = WAL")  # as flasher leaves its ledgers
    db.close()


def cached_ledger(boards: int) -> Path:
    """Where the ledger for these parameters is kept between runs: the temp folder, named by what built it."""
    from flasher.ledger import SCHEMA_VERSION

    digest = hashlib.sha256(inspect.getsource(build).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"flasher-bench-status-{boards}-v{SCHEMA_VERSION}-{digest}.sqlite3"


def run_measured(cmd: list[str], env: dict) -> tuple[float, float, float]:
    """(seconds, CPU seconds, peak RSS in MiB) of one child, from its own rusage (not the sum of all children)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]}... exited {proc.returncode}")
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024   # Linux: KiB


def breakdown(ledger: Path) -> None:
    """Where `status --csv`'s CPU goes, in this process on the same ledger and query: SQLite rendering the rows'
    text alone (counted, not fetched), then fetched into Python, then formatted as the export formats them."""
    import sqlite3
    import timeit

    from flasher.ledger import SCHEMA_VERSION, _csv_select, _select_columns

    shape = _csv_select(_select_columns(SCHEMA_VERSION))
    query = f"SELECT {shape.select}, rowid FROM boards ORDER BY created_at, deveui"
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)

    def cpu(work) -> float:
        t0 = time.process_time()
        work()
        return time.process_time() - t0

    def fetch(format_page=None):
        cursor = db.execute(query)
        while rows := cursor.fetchmany(5000):
            if format_page is not None:
                format_page(rows, None)

    render = cpu(lambda: db.execute(f"SELECT count(*) FROM ({query})").fetchone())
    fetched = cpu(fetch)
    formatted = cpu(lambda: fetch(shape.page))
    rows = db.execute("SELECT count(*) FROM boards").fetchone()[0]
    per_repr = min(timeit.repeat("repr(x)", "x = 1796013863.6582781", number=200_000, repeat=5)) / 200_000
    db.close()
    print(f"breakdown (CPU): SQLite renders the text {render:.2f} s; fetching it into Python {fetched - render:.2f} s "
          f"more; formatting {formatted - fetched:.2f} s more, of which the two timestamps' repr is about "
          f"{2 * rows * per_repr:.2f} s ({per_repr * 1e6:.2f} us each)")


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boards", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="build the ledger here (once) instead of the temp folder's cache")
    ap.add_argument("--build-only", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--breakdown", action="store_true", help="also measure where status --csv's CPU goes")
    args = ap.parse_args()
    if args.build_only:
        build(args.build_only, args.boards)
        return 0
    sqlite_cli = shutil.which("sqlite3")
    if sqlite_cli is None:
        raise SystemExit("bench/status.py needs the sqlite3 command (Debian: apt-get install sqlite3)")
    from flasher.ledger import EXPORT_FIELDS

    ledger = args.keep or cached_ledger(args.boards)
    if not ledger.exists():
        t0 = time.perf_counter()
        partial = ledger.with_name(ledger.name + f".{os.getpid()}.partial")
        # in a child: a parent that built a big ledger would pass its peak RSS on to every child it forks
        subprocess.run([sys.executable, __file__, "--build-only", str(partial), "--boards", str(args.boards)],
                       check=True)
        os.replace(partial, ledger)
        print(f"built a ledger of {args.boards:,} boards in {time.perf_counter() - t0:.1f} s: {ledger}")
    else:
        print(f"reusing {ledger}")
    env = bench_env()
    status = [sys.executable, "-m", "flasher", "status", "--ledger", str(ledger)]
    bare = [sqlite_cli, "-csv", "-header", str(ledger),
            f"SELECT {', '.join(EXPORT_FIELDS)} FROM boards ORDER BY created_at, deveui"]
    cpu: dict[str, list[float]] = {}
    peaks: dict[str, float] = {}

    def timed(name, cmd):
        def run():
            seconds, cpu_seconds, peak = run_measured(cmd, env)
            cpu.setdefault(name, []).append(cpu_seconds)
            peaks[name] = max(peaks.get(name, 0.0), peak)
            return seconds
        return run

    print(f"before: {load()}")
    cand, base = side_by_side(timed("flasher", [*status, "--csv"]), timed("sqlite3", bare), args.repeat)
    ratio = cand / base
    cpu_ratio = statistics.median(cpu["flasher"]) / statistics.median(cpu["sqlite3"])
    print(f"status --csv, {args.boards:,} boards: {ratio:.2f}x (flasher {cand:.2f} s vs sqlite3 -csv {base:.2f} s; "
          f"CPU time {cpu_ratio:.2f}x) — goal <= 1.5x: {'meets' if ratio <= 1.5 else 'MISSES'} ({load()})")
    print(f"peak memory: flasher {peaks['flasher']:.0f} MiB, sqlite3 {peaks['sqlite3']:.0f} MiB "
          f"— goal <= 64 MiB: {'meets' if peaks['flasher'] <= 64 else 'MISSES'}")
    for fmt, extra in (("--json", ["--json"]), ("table", [])):   # no goal on time: they carry each board's steps
        seconds, _, peak = run_measured([*status, *extra], env)
        peaks[fmt] = peak
        print(f"status {fmt}: {seconds:.2f} s, peak memory {peak:.0f} MiB "
              f"— goal <= 64 MiB: {'meets' if peak <= 64 else 'MISSES'}")
    if args.breakdown:
        breakdown(ledger)
    sys.stdout.flush()
    return 0 if ratio <= 1.5 and max(peaks.values()) <= 64 else 1


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE))
    sys.exit(main())
