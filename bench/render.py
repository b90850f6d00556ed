"""Benchmark rendering many headers in one process (what `provision --all` does per board).

    python bench/render.py [--headers 1000] [--repeat 5] [--baseline-rev REV]

Renders N headers (a different DevEUI each) with the shipped seeed-lorawan template and
with a user template file, with the current code, and with `flasher/header.py` as of
REV (default: the parent of the commit that added the sandbox), loaded from git beside
it. The baseline compiled the template on every render; the current code renders in a
sandbox with limits but compiles once per template file version. Prints the medians
and the ratio current/baseline; below 1 is faster. No goal: this is a measurement.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

USER_TEMPLATE = """{% include "_banner.h.j2" %}
#ifndef {{ guard|c_ident }}
#define {{ guard|c_ident }}
{% include "_common.h.j2" %}
#define MY_KEY_BYTES {{ app_key|c_bytes }}
{% for name, value in extras %}
#define {{ name|c_ident }} {{ value|c_string }}
{% endfor %}
#endif
"""


def load_baseline(rev: str):
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:flasher/header.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_header.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_header", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_header"] = module
    spec.loader.exec_module(module)
    return module


def run(header_mod, template: str, n: int) -> float:
    datas = [header_mod.build_header_data(f"2CF7F120{i:08X}", app_key=bytes(16), app_key_source="random",
                                          id_scope="0ne0001A2B3", extras={"SITE": "north"}) for i in range(n)]
    t0 = time.perf_counter()
    for d in datas:
        header_mod.render_header(d, template)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--headers", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--baseline-rev", default=None)
    args = ap.parse_args()
    added = subprocess.run(["git", "-C", str(ROOT), "log", "--diff-filter=A", "--format=%H", "--", "flasher/sandbox.py"],
                           check=True, capture_output=True, text=True).stdout.split()
    rev = args.baseline_rev or (f"{added[-1]}^" if added else "HEAD")
    import flasher.header as current

    baseline = load_baseline(rev)
    shown = rev[:12] + ("^" if rev.endswith("^") else "")
    with tempfile.TemporaryDirectory() as tmp:
        user = Path(tmp) / "mine.h.j2"
        user.write_text(USER_TEMPLATE)
        for label, template in (("shipped seeed-lorawan", "seeed-lorawan"), ("user template file", str(user))):
            assert current.render_header(current.build_header_data("2CF7F12024900138", app_key=bytes(16),
                                                                   app_key_source="random"), template)
            cand, base = [], []
            for _ in range(args.repeat):
                cand.append(run(current, template, args.headers))
                base.append(run(baseline, template, args.headers))
            c, b = statistics.median(cand), statistics.median(base)
            print(f"{label}: {args.headers} headers in {c * 1000:.0f} ms (sandbox, cached) vs {b * 1000:.0f} ms "
                  f"(baseline {shown}, compiled every time): ratio {c / b:.3f} ({b / c:.1f}x faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
