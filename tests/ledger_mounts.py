"""Real read-only and full file systems for the ledger tests, in a private mount namespace.

The tests run as root, where permission bits stop no write, so these make the real
thing: a mount that exists only inside one child process (`unshare -m`) and goes
away with it, whatever happens to the test. Skips, saying why, where the sandbox
allows no mount namespaces.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest


def run_with_mount(mount_sh: str, script: str, *args: str) -> dict:
    """Run ``script`` (Python that prints one JSON object) after ``mount_sh`` (sh), in a private mount namespace."""
    shell = f'{mount_sh} && exec "$0" -c "$@"'  # $0: this Python; "$@": the script, then its arguments
    try:
        done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", shell, sys.executable,
                               textwrap.dedent(script), *args], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        pytest.skip("no unshare(1) here: cannot make a private mount for this test")
    if done.returncode != 0 and "Traceback" not in done.stderr:
        pytest.skip(f"cannot mount in a private namespace here (needs root and mount namespaces): {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def read_only(src, dst, script: str, *args: str) -> dict:
    """``script`` sees folder ``src`` at ``dst`` (made here), on a read-only bind mount."""
    dst.mkdir()
    return run_with_mount(f'mount --bind "{src}" "{dst}" && mount -o remount,bind,ro "{dst}"', script, *args)


def tiny_tmpfs(dst, size_kib: int, free_kib: int, script: str, *args: str) -> dict:
    """``script`` sees a tmpfs of ``size_kib`` at ``dst`` (made here) with only ``free_kib`` left (the rest in dst/fill)."""
    dst.mkdir()
    fill = (size_kib - free_kib) // 4
    return run_with_mount(f'mount -t tmpfs -o size={size_kib}k flasher-test "{dst}" && '
                          f'dd if=/dev/zero of="{dst}/fill" bs=4k count={fill} status=none', script, *args)
