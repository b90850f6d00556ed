"""Benchmark provisioning a fleet: 1, 4 and 16 simulated boards at once, and 16 one after another.

    python bench/fleet.py [--assign-delay 1.0] [--repeat 1]

Simulated boards on real ptys, the local DPS + IoT Hub emulator over TLS (assigning
takes ``--assign-delay`` seconds, like a real DPS), the real azure-iot-device SDK,
a real SQLite ledger: :func:`flasher.pipeline.provision_boards` for 1, 4 and 16
boards, and a plain loop of :func:`flasher.pipeline.provision_board` over the same
16. Every run starts from a fresh ledger and header folder. The configurations are
interleaved in each round so the machine's noise hits them alike.

Goals: wall(16 concurrent) <= 1.5 x wall(1); and the speed-up over the sequential
loop is reported. With ``--profile`` (or when a goal is missed) the time per step is
printed, for 1 board and for 16 at once, to show where the time goes.

    python bench/fleet.py --postgres [--repeat 3]

The shared ledger instead: the same 16 boards at once with a PostgreSQL ledger (a
throwaway server on loopback with fsync on, a fresh database per run) and with the
SQLite one, interleaved. Goal: <= 1.1 x, the ledger is not the bottleneck. Then the
ledger alone: what 16 boards write (claim, begin, 7 steps started and finished,
finish, release: 19 transactions each) from 16 threads, on each back end.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import report  # noqa: E402

from flasher.eui import EUI64  # noqa: E402
from flasher.ledger import Ledger  # noqa: E402
from flasher.pipeline import Settings, provision_board, provision_boards  # noqa: E402
from flasher.sim.board import BoardSimulator  # noqa: E402
from flasher.sim.dps import DpsEmulator, free_loopback  # noqa: E402

ID_SCOPE = "0ne0000BE4C"
STEPS = ("identify", "derive", "render", "program", "upload", "register", "message")


class StepClock:
    """A progress reporter (flasher.progress.Reporter) that times each (board, step) from 'running' to its outcome."""

    def __init__(self):
        self._lock = threading.Lock()
        self._started: dict[tuple[str, str], float] = {}
        self.durations: dict[str, list[float]] = defaultdict(list)

    def emit(self, event) -> None:
        now = time.perf_counter()
        key = (event.port, event.step)
        with self._lock:
            if event.state == "running":
                self._started[key] = now
            elif key in self._started:
                self.durations[event.step].append(now - self._started.pop(key))

    def close(self) -> None:
        pass


def one_run(sim: BoardSimulator, n: int, settings: Settings, work: Path, sequential: bool,
            ledger_at: Callable[[Path], str] | None = None) -> tuple[float, StepClock]:
    """Provision the first ``n`` boards afresh; ``ledger_at(run_dir)`` names a new ledger (default: a SQLite file)."""
    run_dir = Path(tempfile.mkdtemp(dir=work, prefix=f"{'seq' if sequential else 'con'}{n}-"))
    s = Settings(**{**settings.__dict__, "out_dir": run_dir / "headers"})
    clock = StepClock()
    ports = list(sim.ports[:n])
    with Ledger(ledger_at(run_dir) if ledger_at else run_dir / "ledger.sqlite3") as ledger:
        t0 = time.perf_counter()
        if sequential:
            results = [provision_board(p, s, ledger, clock) for p in ports]
        else:
            results = list(provision_boards(ports, s, ledger, clock, concurrency=16))
        wall = time.perf_counter() - t0
    bad = [r for r in results if r.status != "provisioned"]
    if bad:
        raise SystemExit(f"fleet: {len(bad)} board(s) failed: {bad[0].failed_step}: {bad[0].error}")
    return wall, clock


def profile(label: str, clock: StepClock, wall: float) -> None:
    parts = []
    for step in STEPS:
        d = clock.durations.get(step)
        if d:
            parts.append(f"{step} {statistics.mean(d):.2f}/{max(d):.2f}")
    print(f"  profile {label} (wall {wall:.2f} s), seconds per board mean/max: " + ", ".join(parts))


def ledger_traffic(target: str, boards: int = 16) -> float:
    """Seconds for ``boards`` threads to write what a board's run writes, on a fresh ledger at ``target``."""
    with Ledger(target) as ledger:
        def board(i: int) -> None:
            eui = f"{i:016X}"
            ledger.claim(eui)
            ledger.begin(eui, eui.lower(), port=f"/dev/ttyACM{i}")
            for step in STEPS:
                ledger.step_started(eui, step)
                ledger.step_finished(eui, step, "ok", "done", header_sha256="0" * 64)
            ledger.finish(eui)
            ledger.release(eui)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(boards) as pool:
            list(pool.map(board, range(boards)))
        return time.perf_counter() - t0


def compare_ledgers(args, sim: BoardSimulator, settings: Settings, work: Path) -> int:
    """16 boards at once with a PostgreSQL ledger vs a SQLite one; then the ledgers' own writes alone."""
    from flasher.sim.postgres import ThrowawayPostgres

    with ThrowawayPostgres(durable=True) as pg:
        os.environ["PGPASSFILE"] = str(pg.pgpass)
        kinds = {"sqlite": lambda run_dir: str(run_dir / "ledger.sqlite3"), "postgres": lambda _: pg.create_database()}
        one_run(sim, 16, settings, work, False, kinds["postgres"])  # warm-up of the server's side too
        walls: dict[str, list[float]] = defaultdict(list)
        alone: dict[str, list[float]] = defaultdict(list)
        for _ in range(args.repeat):
            for kind, at in kinds.items():
                walls[kind].append(one_run(sim, 16, settings, work, False, at)[0])
                print(f"  16 boards, {kind} ledger: {walls[kind][-1]:6.2f} s", flush=True)
        for _ in range(max(3, args.repeat)):
            for kind, at in kinds.items():
                alone[kind].append(ledger_traffic(at(Path(tempfile.mkdtemp(dir=work)))))
    med = {k: statistics.median(v) for k, v in walls.items()}
    led = {k: statistics.median(v) for k, v in alone.items()}
    ok = report("fleet 16, PostgreSQL ledger vs SQLite", med["postgres"], med["sqlite"], 1.1,
                "wall time of 16 boards at once")
    writes = 16 * (4 + 2 * len(STEPS))
    print(f"ledger alone, 16 boards' writes ({writes} transactions from 16 threads): PostgreSQL "
          f"{led['postgres'] * 1000:.0f} ms vs SQLite {led['sqlite'] * 1000:.0f} ms "
          f"({led['postgres'] / led['sqlite']:.2f}x); {100 * led['postgres'] / med['postgres']:.1f}% of the fleet's "
          f"wall time with PostgreSQL")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assign-delay", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=1, help="rounds; medians are reported")
    ap.add_argument("--profile", action="store_true", help="print the time per step")
    ap.add_argument("--postgres", action="store_true", help="PostgreSQL ledger vs SQLite, 16 boards (see above)")
    args = ap.parse_args()
    group_key = os.urandom(64)
    enrollments = {"id_scope": ID_SCOPE, "individual": [],
                   "groups": [{"name": "bench", "primary_key": base64.b64encode(group_key).decode(), "enabled": True}]}
    walls: dict[str, list[float]] = defaultdict(list)
    clocks: dict[str, tuple[StepClock, float]] = {}
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-fleet-")))
        emu = stack.enter_context(DpsEmulator(enrollments, host=free_loopback(), cert_dir=work / "certs",
                                              assign_delay=args.assign_delay))
        sim = stack.enter_context(BoardSimulator(count=16, state_dir=work / "boards", seed=5))
        settings = Settings(id_scope=ID_SCOPE, group_key=group_key, dps_host=emu.host, ca_cert=str(emu.ca_cert_path),
                            join_eui=EUI64.parse("70B3D57ED003F06A"), timeout=60.0)
        one_run(sim, 1, settings, work, False)  # warm-up: SDK import, certificates, first TLS
        if args.postgres:
            return compare_ledgers(args, sim, settings, work)
        configs = [("1", 1, False), ("4", 4, False), ("16", 16, False), ("seq16", 16, True)]
        for _ in range(args.repeat):
            for name, n, seq in configs:
                wall, clock = one_run(sim, n, settings, work, seq)
                walls[name].append(wall)
                clocks[name] = (clock, wall)
                print(f"  {name:>6}: {wall:6.2f} s", flush=True)
        stats = emu.state()["stats"]
    med = {k: statistics.median(v) for k, v in walls.items()}
    print(f"fleet (assign delay {args.assign_delay:g} s, {args.repeat} round(s)): "
          + ", ".join(f"{k} boards {v:.2f} s" if k != "seq16" else f"16 one after another {v:.2f} s"
                      for k, v in med.items()))
    print(f"  emulator: {stats['register_requests']} register and {stats['status_requests']} status requests, "
          f"{stats['hub_connections']} hub connections")
    print(f"fleet 4 vs 1: {med['4'] / med['1']:.2f}x (informational)")
    ok = report("fleet 16 vs 1 (concurrent)", med["16"], med["1"], 1.5, "wall time of 16 boards vs 1")
    speedup = med["seq16"] / med["16"]
    print(f"fleet 16 concurrent vs 16 one after another: {med['16'] / med['seq16']:.2f}x "
          f"({speedup:.1f}x faster: {med['16']:.2f} s vs {med['seq16']:.2f} s)")
    if args.profile or not ok:
        for name in ("1", "16", "seq16"):
            profile(name, *clocks[name])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
