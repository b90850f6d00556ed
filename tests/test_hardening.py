"""Hostile and unlucky conditions end in one line, never a traceback, and nothing half-done."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from fixtures_dps import GROUP_PRIMARY, free_loopback

DEVEUI = "2CF7F12024900138"


def run(args, **kw):
    env = {**os.environ, "FLASHER_GROUP_PRIMARY_KEY": GROUP_PRIMARY, **kw.pop("env", {})}
    return subprocess.run([sys.executable, "-m", "flasher", *args], env=env, capture_output=True, timeout=120, **kw)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("args", [["keys", DEVEUI], ["keys", DEVEUI, "--format", "json"],
                                  ["header", DEVEUI, "--random-app-key"]])
def test_a_full_disk_on_stdout_is_one_line(args):
    with open("/dev/full", "wb") as full:
        env = {**os.environ, "FLASHER_GROUP_PRIMARY_KEY": GROUP_PRIMARY}
        p = subprocess.run([sys.executable, "-m", "flasher", *args], env=env, stdout=full, stderr=subprocess.PIPE,
                           timeout=60)
    err = p.stderr.decode()
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert p.returncode == 1, err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert lines == [lines[0]] and lines[0].startswith("error:") and "cannot write" in lines[0]


def test_demo_binds_where_it_is_told(tmp_path):
    host = free_loopback()
    p = run(["demo", "--boards", "1", "--bind", host, "--workdir", str(tmp_path / "demo")], text=True)
    assert p.returncode == 0, p.stderr
    assert f"emulator on {host}:8883" in p.stdout
    assert f"hub={host}" in p.stdout


def test_a_byte_order_mark_is_not_part_of_the_first_line(cli, sim_boards, tmp_path, monkeypatch):
    """Windows editors start UTF-8 files with a BOM; the first EUI or id must still read."""
    monkeypatch.setenv("FLASHER_GROUP_PRIMARY_KEY", GROUP_PRIMARY)
    sim = sim_boards(1, seed=77)
    expect = tmp_path / "expect.txt"
    expect.write_bytes(b"\xef\xbb\xbf" + sim.boards[0].deveui.encode() + b"\r\n")
    code, out, err = cli("verify", "--port", sim.ports[0], "--expect-file", expect)
    assert code == 0 and out.startswith("ok"), out + err
    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"\xef\xbb\xbf" + DEVEUI.encode() + b"\n")
    code, out, err = cli("keys", "--input", ids)
    assert code == 0 and out.startswith(DEVEUI.lower() + "\t"), out + err


def test_a_mistyped_deveui_is_warned_about(cli, monkeypatch):
    monkeypatch.setenv("FLASHER_GROUP_PRIMARY_KEY", GROUP_PRIMARY)
    code, out, err = cli("keys", DEVEUI[:15].lower())
    assert code == 0 and "15 hex digits" in err and "mistyped DevEUI" in err
