"""Benchmark the AT phase of one board: read ids + program + verify, against a simulated latency.

    python bench/board.py [--latency 0.05] [--repeat 5]

One simulated board answers every command after a fixed latency L. The phase is
what `flasher provision` does on the port (open, ``AT`` ping, ``AT+ID``, program
with its echo checks and read-back) plus one more read-back of the settings, as
`flasher verify` does. The commands are counted as the simulator receives them
(measured, not assumed); the floor is n x L, the time the module alone needs.
Goal: total <= 1.2 x (n x L), i.e. no idle sleeps and little per-command overhead.

Side by side in the same run, the same phase with L = 0 shows the host's own
per-command cost, which is what the ratio's excess is made of.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import report  # noqa: E402

from flasher.eui import EUI64  # noqa: E402
from flasher.rhf76 import open_module  # noqa: E402
from flasher.sim.board import BoardSimulator, Faults  # noqa: E402

JOIN_EUI = EUI64.parse("70B3D57ED003F06A")
APP_KEY = bytes.fromhex("2B7E151628AED2A6ABF7158809CF4F3C")  # the AES test vector key: not a secret


def at_phase(sim: BoardSimulator) -> tuple[float, int]:
    """One board's AT phase; (seconds, commands the simulator received)."""
    board = sim.boards[0]
    before = board.commands
    t0 = time.perf_counter()
    with open_module(sim.ports[0], timeout=5.0) as module:
        ids = module.read_ids()
        module.program(JOIN_EUI, APP_KEY, band="EU868")
        settings = module.read_settings()
    elapsed = time.perf_counter() - t0
    n = board.commands - before
    assert ids.dev_eui.hex == board.deveui and settings.join_eui == JOIN_EUI and settings.mode == "LWOTAA", settings
    return elapsed, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency", type=float, default=0.05, help="seconds before every answer (L)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    L = args.latency
    with tempfile.TemporaryDirectory(prefix="bench-board-") as tmp, \
            BoardSimulator(count=1, state_dir=Path(tmp) / "boards", seed=3, faults=Faults(latency=L)) as sim:
        board = sim.boards[0]
        at_phase(sim)  # warm-up: imports, first pty open
        slow, fast, counts = [], [], set()
        for _ in range(args.repeat):  # interleaved: the same noise hits both
            board.faults.latency = L
            t, n = at_phase(sim)
            slow.append(t)
            counts.add(n)
            board.faults.latency = 0.0
            t, n = at_phase(sim)
            fast.append(t)
            counts.add(n)
        board.faults.latency = L
    if len(counts) != 1:
        print(f"board: the number of commands varied between runs: {sorted(counts)}", file=sys.stderr)
        return 1
    n = counts.pop()
    total, zero = statistics.median(slow), statistics.median(fast)
    floor = n * L
    print(f"board AT phase: {n} commands counted at the simulator, L = {L * 1000:.0f} ms, {args.repeat} runs each")
    print(f"  total {total * 1000:.0f} ms (min {min(slow) * 1000:.0f}, max {max(slow) * 1000:.0f}); "
          f"floor n x L = {floor * 1000:.0f} ms")
    print(f"  same phase with L = 0: {zero * 1000:.1f} ms ({zero / n * 1000:.2f} ms per command of host overhead)")
    ok = report("board AT phase vs n x L", total, floor, 1.2, "total vs commands x latency")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
