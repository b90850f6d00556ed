"""Benchmark provisioning a fleet against parts that share no code with flasher's own simulators.

    python bench/independent_fleet.py [--boards 1,16,64,256] [--latency-ms 20] [--repeat 1]

The boards are bench/independent/rhf76.c (an RHF76-052 AT dialect in C, on real ptys, built
here with gcc), DPS and the hub are Debian's mosquitto with the DPS responder of
bench/independent/dps.py (no key checks), and ``flasher provision --port ... --json`` runs
as a child process with default settings (real SDK over TLS, a real SQLite ledger).
It checks that bench/fleet.py's ratios (N boards at once vs one; goals: 64 <= 1.5x,
256 <= 3x) are not an artefact of flasher's own simulators, and reports the child's CPU
time per board beside them.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "independent"))
from dps import IndependentDps  # noqa: E402

from flasher.sim.dps import free_loopback  # noqa: E402

ID_SCOPE = "0ne0000BE4C"
GOALS = {64: 1.5, 256: 3.0}


class Modules:
    """``with Modules(n, latency_ms, work) as ports:`` the C modules, stopped (by their pid) on the way out."""

    def __init__(self, n: int, latency_ms: int, work: Path):
        self.n, self.latency_ms, self.work = n, latency_ms, work
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> list[str]:
        binary = self.work / "rhf76"
        if not binary.exists():
            subprocess.run(["gcc", "-O2", "-o", str(binary), str(HERE / "independent" / "rhf76.c")], check=True)
        self.proc = subprocess.Popen([str(binary), str(self.n), str(self.latency_ms)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        return [self.proc.stdout.readline().strip() for _ in range(self.n)]

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()   # its end of stdin closed: it stops
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def provision(n: int, dps: IndependentDps, args, work: Path, env: dict) -> tuple[float, float]:
    """Wall and child CPU seconds to provision ``n`` fresh boards at once."""
    run_dir = Path(tempfile.mkdtemp(dir=work, prefix=f"n{n}-"))
    with Modules(n, args.latency_ms, work) as ports:
        cmd = [sys.executable, "-m", "flasher", "provision", *[a for p in ports for a in ("--port", p)],
               "--id-scope", ID_SCOPE, "--dps-host", dps.host, "--ca-cert", str(dps.ca_cert_path),
               "--join-eui", "70B3D57ED003F06A", "--ledger", str(run_dir / "ledger.sqlite3"),
               "--out-dir", str(run_dir / "headers"), "--json"]
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=run_dir)
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    bad = [r for r in rows if r.get("status") != "provisioned"]
    if p.returncode != 0 or len(rows) != n or bad:
        raise SystemExit(f"independent fleet of {n}: exit {p.returncode}, {len(bad)} not provisioned: "
                         f"{(bad[0] if bad else p.stderr[-800:])}")
    return wall, (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boards", default="1,16,64,256", help="fleet sizes, comma-separated (1 first)")
    ap.add_argument("--latency-ms", type=int, default=20, help="each module's delay before an answer")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # stop what was started, like Ctrl-C
    sizes = [int(s) for s in args.boards.split(",")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHER_")}
    env["FLASHER_GROUP_PRIMARY_KEY"] = base64.b64encode(os.urandom(64)).decode()
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    walls: dict[int, list[float]] = {n: [] for n in sizes}
    cpus: dict[int, list[float]] = {n: [] for n in sizes}
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-independent-")))
        dps = stack.enter_context(IndependentDps(free_loopback()))
        provision(1, dps, args, work, env)   # warm-up: bytecode, certificates
        for _ in range(args.repeat):
            for n in sizes:
                wall, cpu = provision(n, dps, args, work, env)
                walls[n].append(wall)
                cpus[n].append(cpu)
                print(f"  {n:>4} boards: {wall:6.2f} s, child CPU {cpu:6.2f} s", flush=True)
    med = {n: statistics.median(v) for n, v in walls.items()}
    one, one_cpu = med[sizes[0]], statistics.median(cpus[sizes[0]])
    ok = True
    for n in sizes[1:]:
        ratio = med[n] / one
        extra = (statistics.median(cpus[n]) - one_cpu) / (n - sizes[0]) * 1000
        goal = GOALS.get(n)
        verdict = "" if goal is None else f" — goal <= {goal}x: {'meets' if ratio <= goal else 'MISSES'}"
        ok &= goal is None or ratio <= goal
        print(f"independent fleet {n} vs {sizes[0]}: {ratio:.2f}x ({med[n]:.2f} s vs {one:.2f} s), "
              f"{extra:.1f} ms of CPU per extra board{verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
