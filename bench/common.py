"""Side-by-side timing: run a candidate and its baseline alternately, report medians and their ratio.

Machines here are noisy, so absolute times are context only; the ratio, measured
in the same run with interleaved repetitions, is the figure that means something.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time


def time_command(cmd: list[str], env=None, stdin=None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, stdin=stdin, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def bench_env(**extra: str) -> dict:
    """The environment for timed child processes: bytecode caching on, as for an installed tool.

    pip compiles .pyc files at install time; a shell with PYTHONDONTWRITEBYTECODE set
    (or a fresh editable checkout) would otherwise time the compiler, not flasher.
    """
    env = dict(os.environ, **extra)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def side_by_side(candidate, baseline, repeat: int) -> tuple[float, float]:
    """One untimed warm-up of each, then alternate ``repeat`` times; return (median candidate, median baseline)."""
    candidate(), baseline()
    c, b = [], []
    for _ in range(repeat):
        c.append(candidate())
        b.append(baseline())
    return statistics.median(c), statistics.median(b)


def report(name: str, cand: float, base: float, goal: float, what: str) -> bool:
    ratio = cand / base
    verdict = "meets" if ratio <= goal else "MISSES"
    print(f"{name}: {ratio:.2f}x ({what}: {cand * 1000:.0f} ms vs {base * 1000:.0f} ms) — goal <= {goal}x: {verdict}")
    sys.stdout.flush()
    return ratio <= goal


def interleaved(runs: dict, repeat: int) -> dict:
    """Like :func:`side_by_side` for any number of commands: one untimed warm-up each, then rounds in turn;
    the median of each."""
    for run in runs.values():
        run()
    times: dict = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            times[name].append(run())
    return {name: statistics.median(t) for name, t in times.items()}


def load_average() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
