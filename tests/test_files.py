"""Writing headers onto whatever is at the path: real device nodes, FIFOs, sockets and links, made in tmp.

The device node is our own (``mknod`` of 1:3, the null device, in the test's folder; the
tests run as root), never /dev/null itself. Each refused write must leave the node as it
was (still a device, still a FIFO ...) and no temp file beside it.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import pytest

from flasher.errors import InputError
from flasher.files import atomic_write, make_private_dirs
from flasher.header import write_header

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a character device needs root")


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@needs_root
def test_a_device_node_is_refused_and_stays_a_device(tmp_path):
    dev = tmp_path / "null"
    os.mknod(dev, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    with pytest.raises(InputError, match=r"^output '.*/null': not a regular file \(a character device\)$"):
        write_header("#define A 1\n", dev)
    st = os.lstat(dev)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert leftovers(tmp_path) == []
    with pytest.raises(InputError, match="character device"):
        atomic_write(dev, b"x")
    assert stat.S_ISCHR(os.lstat(dev).st_mode)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.h"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match=r"not a regular file \(a FIFO\)"):
        write_header("#define A 1\n", fifo)  # no reader/writer on the other end: opening it would block
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and leftovers(tmp_path) == []


def test_a_socket_is_refused(tmp_path):
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        with pytest.raises(InputError, match=r"not a regular file \(a socket\)"):
            write_header("x", path)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_symbolic_links_are_refused_not_replaced_nor_followed(tmp_path):
    real = tmp_path / "real.h"
    real.write_text("old\n")
    link = tmp_path / "config.h"
    link.symlink_to(real)
    with pytest.raises(InputError, match="is a symbolic link"):
        write_header("new\n", link)
    assert link.is_symlink() and real.read_text() == "old\n"
    dangling = tmp_path / "dangling.h"
    dangling.symlink_to(tmp_path / "nowhere.h")
    with pytest.raises(InputError, match="is a symbolic link"):
        write_header("new\n", dangling)
    assert not (tmp_path / "nowhere.h").exists() and leftovers(tmp_path) == []
    write_header("new\n", real)  # the file itself, named directly, is replaced as usual
    assert real.read_text() == "new\n" and stat.S_IMODE(real.stat().st_mode) == 0o600 and link.is_symlink()


@pytest.mark.parametrize("umask", [0o000, 0o777])
def test_created_folders_are_0700_whatever_the_umask(tmp_path, umask):
    existing = tmp_path / "shared"
    existing.mkdir()
    existing.chmod(0o755)
    old = os.umask(umask)
    try:
        write_header("x\n", existing / "a" / "b" / "config.h")
        make_private_dirs(tmp_path / "build" / "1234-abc")
    finally:
        os.umask(old)
    for d in (existing / "a", existing / "a" / "b", tmp_path / "build", tmp_path / "build" / "1234-abc"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert stat.S_IMODE(existing.stat().st_mode) == 0o755  # an existing folder is left alone
    assert stat.S_IMODE((existing / "a" / "b" / "config.h").stat().st_mode) == 0o600


def test_without_fchmod_the_mode_is_still_set(tmp_path, monkeypatch):
    # Windows has no os.fchmod; take it away here to run that path for real on this OS.
    monkeypatch.delattr(os, "fchmod")
    target = tmp_path / "ca.pem"
    atomic_write(target, b"pem\n", mode=0o640)
    assert target.read_bytes() == b"pem\n" and stat.S_IMODE(target.stat().st_mode) == 0o640


def test_cli_output_onto_a_fifo_is_one_line_exit_2(tmp_path):
    fifo = tmp_path / "out.h"
    os.mkfifo(fifo)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHER_")}
    env["FLASHER_GROUP_PRIMARY_KEY"] = "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw=="
    r = subprocess.run([sys.executable, "-m", "flasher", "header", "2CF7F12024900138", "--random-app-key", "-o",
                        str(fifo)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"error: output {str(fifo)!r}: not a regular file (a FIFO)\n" and r.stdout == ""
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
