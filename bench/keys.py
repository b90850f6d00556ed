"""Benchmark `flasher keys`: throughput over 100,000 ids and start-up, each against a bare baseline.

    python bench/keys.py [--ids 100000] [--repeat 3]

1. `flasher keys --input FILE --format csv` vs a bare-Python hmac+base64 loop over the
   same file, both as fresh processes (start-up included). Goal <= 1.5x.
2. One `flasher keys ID` process vs `python -c pass`. Goal <= 3x (no SDK/Jinja2 import).
   Beside it, the same process vs `python -c "import click"`: the floor any click CLI pays,
   so the two ratios together say how much is click's and how much is flasher's.
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_env, interleaved, load_average, report, side_by_side, time_command  # noqa: E402

BARE = r"""
import base64, hashlib, hmac, os, sys
key = base64.b64decode(os.environ["FLASHER_GROUP_PRIMARY_KEY"])
out = sys.stdout
out.write("registration_id,primary_device_key,secondary_device_key\n")
with open(sys.argv[1]) as f:
    for line in f:
        rid = line.strip().lower()
        k = base64.b64encode(hmac.new(key, rid.encode(), hashlib.sha256).digest()).decode()
        out.write(f"{rid},{k},\n")
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ids", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    env = bench_env(FLASHER_GROUP_PRIMARY_KEY=base64.b64encode(os.urandom(64)).decode())
    env.pop("FLASHER_GROUP_SECONDARY_KEY", None)
    py = sys.executable
    rng = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp:
        ids = Path(tmp) / "ids.txt"
        with ids.open("w") as f:
            for _ in range(args.ids):
                f.write(f"{rng.getrandbits(64):016X}\n")
        cand, base = side_by_side(
            lambda: time_command([py, "-m", "flasher", "keys", "--input", str(ids), "--format", "csv"], env=env),
            lambda: time_command([py, "-c", BARE, str(ids)], env=env), args.repeat)
        ok1 = report(f"keys throughput ({args.ids} ids)", cand, base, 1.5, "flasher keys vs bare hmac loop")
        median = interleaved({
            "flasher": lambda: time_command([py, "-m", "flasher", "keys", "2CF7F12024900138"], env=env),
            "pass": lambda: time_command([py, "-c", "pass"], env=env),
            "click": lambda: time_command([py, "-c", "import click"], env=env),
        }, max(5, args.repeat * 3))
        ok2 = report("keys start-up", median["flasher"], median["pass"], 3.0, "flasher keys ID vs python -c pass")
        print(f"keys start-up vs the click floor: {median['flasher'] / median['click']:.2f}x "
              f"({median['flasher'] * 1000:.0f} ms vs {median['click'] * 1000:.0f} ms for python -c 'import click'; "
              f"click alone is {median['click'] / median['pass']:.2f}x python -c pass) ({load_average()})")
    return 0 if ok1 and ok2 else 1


if __name__ == "__main__":
    sys.exit(main())
