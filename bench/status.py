"""Benchmark `flasher status --csv` on a big ledger against a bare `sqlite3 -csv` export of the same columns.

    python bench/status.py [--boards 1000000] [--repeat 3] [--keep FILE]

Builds a ledger of N provisioned boards (each with its seven step rows) through the real
schema, then times `flasher status --csv` and `sqlite3 -csv -header` selecting the same
columns in the same order, side by side, and reports each one's peak memory (the
child's own max RSS). Goals: time <= 1.5x the bare export; flasher's peak <= 64 MiB.
The ledger takes a while to build (about 40 s for a million boards); `--keep FILE`
reuses it across runs.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_env, side_by_side  # noqa: E402

STEPS = ("identify", "derive", "render", "program", "upload", "register", "message")


def build(path: Path, boards: int) -> None:
    from flasher.ledger import EXPORT_FIELDS, Ledger

    Ledger(path).close()   # the real schema, at the current version
    db = sqlite3.connect(path)
    now = time.time()
    cols = ", ".join(EXPORT_FIELDS)
    marks = ", ".join("?" for _ in EXPORT_FIELDS)
    with db:
        for start in range(0, boards, 50_000):
            rows, steps = [], []
            for i in range(start, min(boards, start + 50_000)):
                eui = f"{0x2CF7F12000000000 + i:016X}"
                values = {"deveui": eui, "registration_id": eui.lower(), "status": "provisioned", "current_step": None,
                          "join_eui": "70B3D57ED003F06A", "band": "EU868", "app_key_source": "derived",
                          "id_scope": "0ne0001A2B3", "device_key_check": f"{i:016x}", "assigned_hub": "hub-1.azure-devices.net",
                          "device_id": eui.lower(), "header_path": f"headers/{eui}.h", "header_sha256": f"{i:064x}",
                          "attempts": 1, "last_error": None, "port": f"/dev/ttyACM{i % 64}", "serial_number": f"SN{i:08d}",
                          "created_at": now + i * 1e-3, "updated_at": now + i * 1e-3}
                rows.append(tuple(values.get(c) for c in EXPORT_FIELDS))
                steps.extend((eui, s, "skipped" if s == "upload" else "ok", now, now, None) for s in STEPS)
            db.executemany(f"INSERT INTO boards ({cols}) VALUES ({marks})", rows)
            db.executemany("INSERT INTO steps (deveui, step, outcome, started_at, finished_at, detail) "
                           "VALUES (?, ?, ?, ?, ?, ?)", steps)
    db.close()


def run_measured(cmd: list[str], env: dict) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one child, its own rusage (not the sum of all children)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]}... exited {proc.returncode}")
    return elapsed, usage.ru_maxrss / 1024   # Linux: KiB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boards", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="build the ledger here once and reuse it")
    ap.add_argument("--build-only", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        build(args.build_only, args.boards)
        return 0
    sqlite_cli = shutil.which("sqlite3")
    if sqlite_cli is None:
        raise SystemExit("bench/status.py needs the sqlite3 command (Debian: apt-get install sqlite3)")
    from flasher.ledger import EXPORT_FIELDS

    with tempfile.TemporaryDirectory() as tmp:
        ledger = args.keep or Path(tmp) / "big.sqlite3"
        if not ledger.exists():
            t0 = time.perf_counter()
            # in a child: a parent that built a big ledger would pass its peak RSS on to every child it forks
            subprocess.run([sys.executable, __file__, "--build-only", str(ledger), "--boards", str(args.boards)],
                           check=True)
            print(f"built a ledger of {args.boards:,} boards in {time.perf_counter() - t0:.1f} s: {ledger}")
        env = bench_env()
        flasher = [sys.executable, "-m", "flasher", "status", "--csv", "--ledger", str(ledger)]
        bare = [sqlite_cli, "-csv", "-header", str(ledger),
                f"SELECT {', '.join(EXPORT_FIELDS)} FROM boards ORDER BY created_at, deveui"]
        peaks: dict[str, float] = {}

        def timed(name, cmd):
            def run():
                seconds, peak = run_measured(cmd, env)
                peaks[name] = max(peaks.get(name, 0.0), peak)
                return seconds
            return run

        cand, base = side_by_side(timed("flasher", flasher), timed("sqlite3", bare), args.repeat)
    ratio = cand / base
    print(f"status --csv, {args.boards:,} boards: {ratio:.2f}x (flasher {cand:.2f} s vs sqlite3 -csv {base:.2f} s) "
          f"— goal <= 1.5x: {'meets' if ratio <= 1.5 else 'MISSES'}")
    print(f"peak memory: flasher {peaks['flasher']:.0f} MiB, sqlite3 {peaks['sqlite3']:.0f} MiB "
          f"— goal <= 64 MiB: {'meets' if peaks['flasher'] <= 64 else 'MISSES'}")
    return 0 if ratio <= 1.5 and peaks["flasher"] <= 64 else 1


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE))
    sys.exit(main())
