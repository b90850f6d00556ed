"""Benchmark bulk pre-registration against a DPS quota, and a killed run that resumes.

    python bench/register.py [--ids 2000] [--quota 1000/min] [--resume 10000] [--independent]

The DPS emulator runs in this process and enforces ``--quota`` (at most that many
registrations in any window of the unit's length, 429 with retry-after beyond it, as
DPS does); ``flasher register --input ids.txt --no-test-message --dps-rate QUOTA --json``
runs in a child process, the real SDK over TLS, a real SQLite ledger.

Throughput: a quota of Q per window W bounds N ids from below in two ways, printed
side by side with the run's wall time:

* the issue's quota floor, N / Q windows: the time a steady pace of Q per window takes
  (goal: the run finishes within 1.15x of it, with zero failed ids);
* the window floor: the last of N ids cannot start before (ceil(N / Q) - 1) x W, plus
  the time one registration takes (the run's median): how close the run comes to
  what the quota allows at all.

Also printed: 429s the emulator sent (the governor should cause few, never a storm),
and the child's CPU time per id.

``--independent`` runs the same against a DPS that shares no code with flasher's
emulator: Debian's mosquitto broker and a DPS responder written from Microsoft's MQTT
documentation (bench/independent/dps.py; it does not check keys).

Resume (``--resume N``, 0 to skip): N ids at a quota that does not bind (to keep the
run short), stopped when half are in the ledger, then run again to the end. Once with
SIGTERM (in-flight ids finish and are recorded: each id must be assigned exactly once,
by the emulator's own count) and once with SIGKILL (nothing is finished after the kill:
the ids in flight are left 'registering' in the ledger, and the rerun asks DPS's
registration status lookup about them before registering them, so each id must again be
assigned exactly once; the independent DPS has no lookup, so there at most the ids in
flight are registered a second time, which DPS answers with the same assignment).
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import resource
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "independent"))
from dps import IndependentDps  # noqa: E402

from flasher.governor import parse_quota  # noqa: E402
from flasher.sim.dps import DpsEmulator, free_loopback  # noqa: E402

ID_SCOPE = "0ne0000BE4C"
FLASHER = [sys.executable, "-m", "flasher"]


def child_env(group_key: bytes) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHER_")}
    env["FLASHER_GROUP_PRIMARY_KEY"] = base64.b64encode(group_key).decode()
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def ids_file(work: Path, prefix: str, n: int) -> Path:
    path = work / f"{prefix}-{n}.txt"
    path.write_text("".join(f"{prefix}{i:06X}\n" for i in range(n)))
    return path


def recorded(ledger: Path) -> int:
    try:
        db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute("SELECT count(*) FROM registrations WHERE status = 'assigned'").fetchone()[0]
        finally:
            db.close()
    except sqlite3.OperationalError:   # not made yet
        return 0


class Flashers:
    """flasher's own emulator, seen the way the benchmark needs it."""

    name = "flasher's emulator"

    def __init__(self, emu: DpsEmulator):
        self.emu, self.host, self.ca_cert_path = emu, emu.host, emu.ca_cert_path

    def throttled(self) -> int:
        return self.emu.state()["stats"].get("quota_throttled", 0)

    def attempts(self, ids: set[str]) -> list[int]:
        return [r["attempts"] for r in self.emu.state()["registrations"] if r["registrationId"] in ids]

    def lookups(self) -> int | None:
        return self.emu.state()["stats"]["status_lookups"]


class Independent:
    name = "the independent DPS (mosquitto)"

    def __init__(self, dps: IndependentDps):
        self.dps, self.host, self.ca_cert_path = dps, dps.host, dps.ca_cert_path

    def throttled(self) -> int:
        return self.dps.throttled

    def attempts(self, ids: set[str]) -> list[int]:
        return [n for reg_id, n in self.dps.registered.items() if reg_id in ids]

    def lookups(self) -> int | None:
        return None   # no HTTPS API: a rerun registers the ids in flight at a kill again


def throughput(args, emu, work: Path, env: dict) -> bool:
    count, window = parse_quota(args.quota, "--quota")
    ids = ids_file(work, "2CF7F1202B", args.ids)
    run_dir = Path(tempfile.mkdtemp(dir=work, prefix="throughput-"))
    cmd = FLASHER + ["register", "--input", str(ids), "--id-scope", ID_SCOPE, "--dps-host", emu.host,
                     "--ca-cert", str(emu.ca_cert_path), "--no-test-message", "--dps-rate", args.quota, "--json"]
    before = emu.throttled()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=run_dir, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    failed = [r for r in rows if not r.get("ok")]
    throttled = emu.throttled() - before
    latency = statistics.median(r["timings"]["register"] for r in rows if r.get("ok")) if rows else 0.0
    quota_floor = args.ids / count * window
    window_floor = (math.ceil(args.ids / count) - 1) * window + latency
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    ratio = wall / quota_floor
    ok = p.returncode == 0 and not failed and len(rows) == args.ids and ratio <= 1.15
    print(f"register {args.ids} ids at a quota of {args.quota}, {emu.name}: {wall:.1f} s, {len(rows) - len(failed)} assigned, "
          f"{len(failed)} failed, {throttled} answered 429 by the quota; median registration {latency:.2f} s; "
          f"client CPU {cpu * 1000 / max(1, args.ids):.1f} ms per id")
    print(f"register vs the quota floor ({args.ids}/{count} per {window:g} s = {quota_floor:.1f} s): {ratio:.2f}x "
          f"— goal <= 1.15x with 0 failed: {'meets' if ok else 'MISSES'}")
    print(f"register vs the window floor ({window_floor:.1f} s: last window from "
          f"{(math.ceil(args.ids / count) - 1) * window:g} s, plus one registration): {wall / window_floor:.2f}x")
    if p.returncode not in (0, 1) or failed:
        print(f"  stderr: {p.stderr.strip()[-2000:]}")
    return ok


def resume(args, emu, work: Path, env: dict, how: signal.Signals) -> bool:
    n = args.resume
    prefix = "2CF7F1202C" if how == signal.SIGTERM else "2CF7F1202D"
    ids = ids_file(work, prefix, n)
    run_dir = Path(tempfile.mkdtemp(dir=work, prefix=f"resume-{how.name}-"))
    ledger = run_dir / "flasher-ledger.sqlite3"
    cmd = FLASHER + ["register", "--input", str(ids), "--id-scope", ID_SCOPE, "--dps-host", emu.host,
                     "--ca-cert", str(emu.ca_cert_path), "--no-test-message", "--dps-rate", "100000/min",
                     "--concurrency", str(args.concurrency)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        while proc.poll() is None and recorded(ledger) < n // 2:
            time.sleep(0.2)
        at_kill = recorded(ledger)
        proc.send_signal(how)
        _, errors = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    first = recorded(ledger)
    looked = emu.lookups()
    second = subprocess.run(cmd, cwd=run_dir, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    want = {f"{prefix}{i:06X}".lower() for i in range(n)}
    counts = emu.attempts(want)
    twice = sum(1 for c in counts if c > 1)
    summary = second.stderr.strip().splitlines()[-1:] or ["(no summary)"]
    print(f"resume {n} ids, {emu.name}, {how.name} at {at_kill} recorded (exit {proc.returncode}), {first} recorded after it; "
          f"rerun exit {second.returncode}: {summary[0]}; total {wall:.1f} s")
    ok = second.returncode == 0 and len(counts) == n and recorded(ledger) == n
    if looked is not None:
        print(f"  the rerun asked DPS's status lookup about {emu.lookups() - looked} id(s) left 'registering'")
    if how == signal.SIGTERM or looked is not None:
        ok = ok and twice == 0
        print(f"  each id assigned exactly once by the emulator's count: {'yes' if twice == 0 else f'NO ({twice} twice)'}"
              f" — {'meets' if ok else 'MISSES'}")
    else:
        ok = ok and twice <= args.concurrency
        print(f"  assigned twice: {twice} (at most the {args.concurrency} in flight at the kill) — "
              f"{'meets' if ok else 'MISSES'}")
    if not ok:
        print(f"  stderr: {errors.strip()[-1000:]} / {second.stderr.strip()[-1000:]}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ids", type=int, default=2000, help="ids for the throughput run (0 to skip)")
    ap.add_argument("--quota", default="1000/min", help="the emulator's quota and the client's --dps-rate")
    ap.add_argument("--resume", type=int, default=10000, help="ids for the resume runs (0 to skip)")
    ap.add_argument("--concurrency", type=int, default=128, help="in flight during the resume runs")
    ap.add_argument("--independent", action="store_true", help="against mosquitto + an independent DPS responder")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # stop what was started, like Ctrl-C
    group_key = os.urandom(64)
    enrollments = {"id_scope": ID_SCOPE, "individual": [],
                   "groups": [{"name": "bench", "primary_key": base64.b64encode(group_key).decode(), "enabled": True}]}
    env = child_env(group_key)
    ok = True
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-register-")))
        def target(quota: str | None):
            if args.independent:
                return Independent(stack.enter_context(IndependentDps(
                    free_loopback(), quota=parse_quota(quota, "--quota") if quota else None)))
            return Flashers(stack.enter_context(DpsEmulator(enrollments, host=free_loopback((8883, 443)),
                                                            cert_dir=tempfile.mkdtemp(dir=work),
                                                            registration_quota=quota, websocket_port=443)))

        if args.ids:
            ok &= throughput(args, target(args.quota), work, env)
        if args.resume:
            emu = target(None)
            ok &= resume(args, emu, work, env, signal.SIGTERM)
            ok &= resume(args, emu, work, env, signal.SIGKILL)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
