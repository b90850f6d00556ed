"""Benchmark provisioning a fleet: 1, 16, 64 and 256 simulated boards at once, with default settings.

    python bench/fleet.py [--assign-delay 1.0] [--repeat 3] [--profile]

Simulated boards on real ptys, the local DPS + IoT Hub emulator over TLS (assigning
takes ``--assign-delay`` seconds, like a real DPS), the real azure-iot-device SDK, a
real SQLite ledger: :func:`flasher.pipeline.provision_boards` with its default
concurrency (no ``--concurrency``), as ``flasher provision --all`` runs it. Every run
starts from a fresh ledger and header folder, and the sizes are interleaved in each
round so the machine's noise hits them alike; medians are reported.

Provisioning runs in a child process (``--worker``), the board simulator in another
(``--boards``) and the emulator in this one, so the worker's CPU time is flasher's
alone, and neither simulator waits for the other's turn at a GIL (real boards and a
real DPS do not share one with flasher either). The child
imports everything and provisions one board untimed first (the SDK import, the first
TLS handshake), then times each run from opening its ledger to closing it.

Goals: wall(64) <= 1.5 x wall(1) and wall(256) <= 3 x wall(1); and CPU per board
<= 15 ms, where CPU per board is the marginal cost of a board: (CPU(256) - CPU(1)) / 255,
the child's process CPU time (every thread, user + system) of each run. What every
run pays once (a ledger, a template compile, a thread pool) cancels out. With
``--profile`` (or when a goal is missed) the time per step is printed.

    python bench/fleet.py --postgres [--repeat 3]

The shared ledger instead: 16 boards at once with a PostgreSQL ledger (a throwaway
server on loopback with fsync on, a fresh database per run) and with the SQLite one,
interleaved. Goal: <= 1.1 x, the ledger is not the bottleneck. Then the ledger alone:
what 16 boards write (claim, begin, 7 steps started and finished, finish, release:
19 writes each) from 16 threads, on each back end.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import statistics
import subprocess
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
from common import bench_env, report  # noqa: E402

from flasher.eui import EUI64  # noqa: E402
from flasher.ledger import Ledger  # noqa: E402
from flasher.pipeline import Settings, provision_boards  # noqa: E402

ID_SCOPE = "0ne0000BE4C"
STEPS = ("identify", "derive", "render", "program", "upload", "register", "message")
SIZES = (1, 16, 64, 256)
GOALS = {64: 1.5, 256: 3.0}
CPU_GOAL_MS = 15.0


class StepClock:
    """A progress reporter (flasher.progress.Reporter) that times each (board, step) from 'running' to its outcome,
    and each step's span over the run: from the first board's start to the last board's finish."""

    def __init__(self):
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        self._started: dict[tuple[str, str], float] = {}
        self.durations: dict[str, list[float]] = defaultdict(list)
        self.spans: dict[str, list[float]] = {}

    def emit(self, event) -> None:
        now = time.perf_counter()
        key = (event.port, event.step)
        with self._lock:
            if event.state == "running":
                self._started.setdefault(key, now)   # a step's phases (assigning, connect...) come as 'running' too
                span = self.spans.setdefault(event.step, [now - self._t0, now - self._t0])
                span[0] = min(span[0], now - self._t0)
            elif key in self._started:
                self.durations[event.step].append(now - self._started.pop(key))
                self.spans[event.step][1] = now - self._t0

    def close(self) -> None:
        pass

    def summary(self) -> dict[str, tuple[float, float, float, float]]:
        """step -> (mean, max seconds per board, first start, last finish in the run)."""
        return {s: (statistics.mean(d), max(d), *self.spans[s]) for s, d in self.durations.items() if d}


# --- the child: provisions, and measures only itself ------------------------------------

class Warnings(logging.Handler):
    """Counts the warnings a run logs (the CLI would print them), instead of printing hundreds."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record.getMessage())

    def take(self) -> list[str]:
        seen, self.seen = self.seen, []
        return seen


def serve() -> int:
    """Read a settings line, then one run per line ({"ports", "dir", "ledger"}); answer one JSON line each.

    Logging as ``flasher provision`` sets it up: flasher's warnings, the SDK's and paho's own only if critical."""
    warnings = Warnings()
    logging.getLogger().addHandler(warnings)
    logging.getLogger().setLevel(logging.WARNING)
    for noisy in ("azure", "paho"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    conf = json.loads(sys.stdin.readline())
    if conf.get("connecting"):   # --connecting: another turnstile width than flasher's own, to compare
        from flasher import dps
        from flasher.governor import Turnstile

        dps._CONNECTING = Turnstile(conf["connecting"])
    settings = Settings(id_scope=conf["id_scope"], group_key=base64.b64decode(conf["group_key"]),
                        dps_host=conf["dps_host"], ca_cert=conf["ca_cert"], join_eui=EUI64.parse(conf["join_eui"]),
                        timeout=60.0)
    for line in sys.stdin:
        run = json.loads(line)
        if "sdk" in run:
            print(json.dumps({**sdk_only(settings, run["sdk"]), "warnings": warnings.take()}), flush=True)
            continue
        s = Settings(**{**settings.__dict__, "out_dir": Path(run["dir"]) / "headers"})
        wall0, t0 = time.perf_counter(), os.times()
        clock = StepClock()
        with Ledger(run["ledger"] or Path(run["dir"]) / "ledger.sqlite3") as ledger:
            results = list(provision_boards(run["ports"], s, ledger, clock))
        wall, t1 = time.perf_counter() - wall0, os.times()
        user, system = t1.user - t0.user, t1.system - t0.system
        bad = [f"{r.port}: {r.failed_step}: {r.error}" for r in results if r.status != "provisioned"]
        print(json.dumps({"wall": wall, "cpu": user + system, "user": user, "system": system, "bad": bad,
                          "steps": clock.summary(), "warnings": warnings.take()}), flush=True)
    return 0


def sdk_only(settings: Settings, n: int) -> dict:
    """What the Azure SDK alone costs: ``n`` registrations and proof messages at once through
    :func:`flasher.dps.register_many`, without boards, ledger or pipeline."""
    from flasher.dps import DpsError, register_many
    from flasher.keys import derive_device_key

    group_key = settings.group_key.reveal()
    keys = {f"bench-sdk-{i:04d}": derive_device_key(group_key, f"bench-sdk-{i:04d}") for i in range(n)}
    wall0, t0 = time.perf_counter(), os.times()
    results = list(register_many(keys, concurrency=n, id_scope=settings.id_scope, dps_host=settings.dps_host,
                                 ca_cert=settings.ca_cert, timeout=settings.timeout))
    wall, t1 = time.perf_counter() - wall0, os.times()
    bad = [f"{reg_id}: {r}" for reg_id, r in results if isinstance(r, DpsError)]
    return {"wall": wall, "cpu": t1.user - t0.user + t1.system - t0.system, "user": t1.user - t0.user,
            "system": t1.system - t0.system, "bad": bad, "steps": {}}


def serve_boards(count: int, state_dir: str) -> int:
    """The board simulator in a process of its own: print the ports (one JSON line), run until stdin closes,
    then print this process's CPU seconds."""
    from flasher.sim.board import BoardSimulator

    with BoardSimulator(count=count, state_dir=state_dir, seed=5) as sim:
        print(json.dumps(sim.ports), flush=True)
        sys.stdin.read()
    print(json.dumps(time.process_time()), flush=True)
    return 0


class Boards:
    """``count`` simulated boards served by a child process (so its pty loop does not share a GIL with the
    emulator); stopped, by its pid if need be, on every path out of the ``with``."""

    def __init__(self, count: int, state_dir: Path):
        self.proc = subprocess.Popen([sys.executable, __file__, "--boards", str(count), str(state_dir)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=bench_env())
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.__exit__()
            raise SystemExit(f"fleet: the board simulator ended (exit {self.proc.returncode})")
        self.ports: list[str] = json.loads(line)
        self.cpu: float | None = None

    def __enter__(self) -> Boards:
        return self

    def __exit__(self, *exc) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.close()
            line = self.proc.stdout.readline()
            self.cpu = json.loads(line) if line else None
            self.proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, OSError, ValueError):
            self.proc.kill()
            self.proc.wait()
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()


class Worker:
    """The provisioning child process; stopped (by its pid) on every path out of the ``with``."""

    def __init__(self, conf: dict):
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=bench_env())
        self._send(conf)

    def _send(self, obj: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def run(self, ports: list[str], run_dir: Path, ledger: str | None = None) -> dict:
        """One run in the child; ``sims`` in the answer is what this process (the emulator) spent meanwhile."""
        return self._ask({"ports": ports, "dir": str(run_dir), "ledger": ledger})

    def sdk(self, n: int) -> dict:
        """The SDK alone; its failures are reported, not fatal (register_many does not collect what paho leaves,
        see flasher.dps._SdkGarbage, so at 256 a few can hang)."""
        answer = self._ask({"sdk": n}, fatal=False)
        if answer["bad"]:
            print(f"        the SDK alone, {n} at once: {len(answer['bad'])} failed, e.g. {answer['bad'][0]}")
        return answer

    def _ask(self, request: dict, fatal: bool = True) -> dict:
        self._send(request)
        assert self.proc.stdout is not None
        sims = time.process_time()
        line = self.proc.stdout.readline()
        sims = time.process_time() - sims
        if not line:
            raise SystemExit(f"fleet: the worker ended (exit {self.proc.wait()})")
        answer = json.loads(line)
        if answer["bad"] and fatal:
            raise SystemExit(f"fleet: {len(answer['bad'])} board(s) failed, e.g. {answer['bad'][0]}")
        return {**answer, "sims": sims}

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def fresh(work: Path, name: str) -> Path:
    return Path(tempfile.mkdtemp(dir=work, prefix=f"{name}-"))


def profile(label: str, steps: dict, wall: float) -> None:
    parts = [f"{s} {steps[s][0]:.2f}/{steps[s][1]:.2f}" for s in STEPS if s in steps]
    print(f"  profile {label} (wall {wall:.2f} s), seconds per board mean/max: " + ", ".join(parts))
    spans = [f"{s} {steps[s][2]:.2f}-{steps[s][3]:.2f}" for s in STEPS if s in steps]
    print("    each step from the first board's start to the last one's finish (s into the run): " + ", ".join(spans))


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


# --- PostgreSQL vs SQLite -------------------------------------------------------------------

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


def compare_ledgers(args, ports: list[str], worker: Worker, work: Path, pg) -> int:
    """16 boards at once with a PostgreSQL ledger (on ``pg``) vs a SQLite one; then the ledgers' own writes alone."""
    kinds: dict[str, Callable[[Path], str | None]] = {"sqlite": lambda _: None,
                                                      "postgres": lambda _: pg.create_database()}
    worker.run(ports[:16], fresh(work, "warm"), kinds["postgres"](work))  # the server's side warms up too
    walls: dict[str, list[float]] = defaultdict(list)
    alone: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.repeat):
        for kind, at in kinds.items():
            run_dir = fresh(work, kind)
            walls[kind].append(worker.run(ports[:16], run_dir, at(run_dir))["wall"])
            print(f"  16 boards, {kind} ledger: {walls[kind][-1]:6.2f} s ({load()})", flush=True)
    for _ in range(max(3, args.repeat)):
        for kind, at in kinds.items():
            run_dir = fresh(work, kind)
            alone[kind].append(ledger_traffic(at(run_dir) or str(run_dir / "ledger.sqlite3")))
    med = {k: statistics.median(v) for k, v in walls.items()}
    led = {k: statistics.median(v) for k, v in alone.items()}
    ok = report("fleet 16, PostgreSQL ledger vs SQLite", med["postgres"], med["sqlite"], 1.1,
                "wall time of 16 boards at once")
    writes = 16 * (4 + 2 * len(STEPS))
    print(f"ledger alone, 16 boards' writes ({writes} writes from 16 threads): PostgreSQL "
          f"{led['postgres'] * 1000:.0f} ms vs SQLite {led['sqlite'] * 1000:.0f} ms "
          f"({led['postgres'] / led['sqlite']:.2f}x); {100 * led['postgres'] / med['postgres']:.1f}% of the fleet's "
          f"wall time with PostgreSQL")
    print(load())
    return 0 if ok else 1


# --- the fleet --------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assign-delay", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=1, help="rounds; medians are reported")
    ap.add_argument("--profile", action="store_true", help="print the time per step")
    ap.add_argument("--postgres", action="store_true", help="PostgreSQL ledger vs SQLite, 16 boards (see above)")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="board counts (1 and 256 give the goals)")
    ap.add_argument("--connecting", type=int, metavar="N",
                    help="SDK connection set-ups at once (default: flasher's, 4 per core; 256: as if unlimited)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--boards", nargs=2, metavar=("COUNT", "STATE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return serve()
    if args.boards:
        return serve_boards(int(args.boards[0]), args.boards[1])
    from flasher.sim.dps import DpsEmulator, free_loopback

    sizes = sorted({int(n) for n in args.sizes.split(",")} | {1})
    group_key = os.urandom(64)
    enrollments = {"id_scope": ID_SCOPE, "individual": [],
                   "groups": [{"name": "bench", "primary_key": base64.b64encode(group_key).decode(), "enabled": True}]}
    print(f"before: {load()}", flush=True)
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-fleet-")))
        emu = stack.enter_context(DpsEmulator(enrollments, host=free_loopback(), cert_dir=work / "certs",
                                              assign_delay=args.assign_delay))
        count = max(sizes + ([16] if args.postgres else []))
        # The simulated boards' EEPROM files go to RAM where there is some: each AT+KEY/MODE/DR/ID= set rewrites
        # one (write, rename), about 1 ms on this ext4 disk and serial in the simulator's one loop; a real
        # module's flash costs the host nothing. The ledger and the headers stay on disk, as in real use.
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK | os.X_OK) else None
        eeproms = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-fleet-boards-", dir=shm)))
        ports = stack.enter_context(Boards(count, eeproms)).ports
        conf = {"id_scope": ID_SCOPE, "group_key": base64.b64encode(group_key).decode(), "dps_host": emu.host,
                "connecting": args.connecting,
                "ca_cert": str(emu.ca_cert_path), "join_eui": "70B3D57ED003F06A"}
        pg = None
        if args.postgres:
            from flasher.sim.postgres import ThrowawayPostgres

            pg = stack.enter_context(ThrowawayPostgres(durable=True))
            os.environ["PGPASSFILE"] = str(pg.pgpass)  # before the worker starts: it inherits it
        worker = stack.enter_context(Worker(conf))
        worker.run(ports[:1], fresh(work, "warm"))  # untimed: the SDK import, certificates, the first TLS
        if pg is not None:
            return compare_ledgers(args, ports, worker, work, pg)
        runs: dict[int, list[dict]] = defaultdict(list)
        sdk: dict[int, list[dict]] = defaultdict(list)
        top = max(sizes)
        worker.sdk(1)  # untimed, as for the boards
        for _ in range(args.repeat):
            for n in sorted({1, top}):
                sdk[n].append(worker.sdk(n))
            for n in sizes:
                runs[n].append(worker.run(ports[:n], fresh(work, f"con{n}")))
                r = runs[n][-1]
                print(f"  {n:>4} boards: {r['wall']:6.2f} s wall, {r['cpu']:6.2f} s CPU ({r['user']:.2f} user, "
                      f"{r['system']:.2f} system; emulator {r['sims']:.2f} s) ({load()})", flush=True)
                if r["warnings"]:
                    print(f"        {len(r['warnings'])} warning(s) logged, e.g. {r['warnings'][0]}", flush=True)
        stats = emu.state()["stats"]
    wall = {n: statistics.median(r["wall"] for r in v) for n, v in runs.items()}
    cpu = {n: statistics.median(r["cpu"] for r in v) for n, v in runs.items()}
    print(f"fleet (assign delay {args.assign_delay:g} s, {args.repeat} round(s), default concurrency), medians: "
          + ", ".join(f"{n}: {wall[n]:.2f} s wall / {cpu[n]:.2f} s CPU" for n in sizes))
    print(f"  emulator: {stats['register_requests']} register and {stats['status_requests']} status requests, "
          f"{stats['hub_connections']} hub connections")
    print("wall vs 1 board: " + ", ".join(f"{n} boards {wall[n] / wall[1]:.2f}x" for n in sizes if n > 1))
    ok = True
    for n, goal in GOALS.items():
        if n in wall:
            ok &= report(f"fleet {n} vs 1", wall[n], wall[1], goal, f"wall time of {n} boards at once vs 1")
    for n in sizes:
        if n > 1:
            print(f"CPU per extra board at {n}: {(cpu[n] - cpu[1]) / (n - 1) * 1000:.1f} ms")
    if top > 1:
        sdk_cpu = {n: statistics.median(r["cpu"] for r in v) for n, v in sdk.items()}
        print(f"  of which the Azure SDK alone (register_many: {top} registrations and proof messages at once, no "
              f"boards, ledger or pipeline): {(sdk_cpu[top] - sdk_cpu[1]) / (top - 1) * 1000:.1f} ms per board")
        per_board = (cpu[top] - cpu[1]) / (top - 1) * 1000
        verdict = "meets" if per_board <= CPU_GOAL_MS else "MISSES"
        ok &= per_board <= CPU_GOAL_MS
        print(f"fleet CPU per board: {per_board:.1f} ms ((CPU({top}) - CPU(1)) / {top - 1}: {cpu[top] * 1000:.0f} ms "
              f"vs {cpu[1] * 1000:.0f} ms) — goal <= {CPU_GOAL_MS:g} ms: {verdict}")
    print(f"after: {load()}")
    if args.profile or not ok:
        for n in sizes:
            profile(str(n), runs[n][-1]["steps"], runs[n][-1]["wall"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
