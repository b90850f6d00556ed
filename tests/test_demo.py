"""`flasher demo`, the README's first command: three boards end to end, nothing left running."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys

from fixtures_dps import free_loopback


def test_demo_provisions_three_boards_and_stops_everything(tmp_path):
    work = tmp_path / "demo"
    # an address of its own, so "nothing is left listening" cannot be confused by another test's emulator
    p = subprocess.run([sys.executable, "-m", "flasher", "demo", "--workdir", str(work), "--bind", free_loopback()],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "3/3 boards provisioned" in p.stdout
    rows = sqlite3.connect(work / "ledger.sqlite3").execute("SELECT deveui, status, device_id FROM boards").fetchall()
    assert len(rows) == 3 and {r[1] for r in rows} == {"provisioned"}
    state = json.loads((work / "dps" / "state.json").read_text())
    assert sorted(r["registrationId"] for r in state["registrations"]) == sorted(r[0].lower() for r in rows)
    assert sorted(m["device_id"] for m in state["messages"] if m["payload"] == "TestMessage") == sorted(r[2] for r in rows)
    assert len(list((work / "headers").glob("*.h"))) == 3
    # the whole chain: every board on The Things Stack's four servers, the module's AppKey on the Join Server
    tts = json.loads((work / "tts" / "state.json").read_text())
    assert sorted(d["device_id"] for d in tts["devices"]) == sorted(f"eui-{r[0].lower()}" for r in rows)
    assert all(d["servers"] == ["is", "js", "ns", "as"] for d in tts["devices"])
    assert p.stdout.count("on IS+JS+NS+AS  EU_863_870_TTN MAC_V1_0_2 PHY_V1_0_2_REV_B  Join Server AppKey is the "
                          "module's") == 3
    assert "(set)" in json.dumps(tts) and not any("AppKey" in line and "DIFFERS" in line for line in p.stdout.splitlines())
    # nothing is left listening: the emulator's address is free again
    host = p.stdout.split("emulator on ")[1].split(":8883")[0]
    with socket.socket() as s:
        s.bind((host, 8883))
    tts_host, tts_port = p.stdout.split("The Things Stack emulator on https://")[1].split(",")[0].split(":")
    with socket.socket() as s:
        s.bind((tts_host, int(tts_port)))
    # a second run starts clean in the same folder; a folder the demo did not make is refused
    again = subprocess.run([sys.executable, "-m", "flasher", "demo", "--workdir", str(work), "--boards", "1"],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "1/1 boards provisioned" in again.stdout, again.stderr
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    refused = subprocess.run([sys.executable, "-m", "flasher", "demo", "--workdir", str(other)], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2 and "not made by 'flasher demo'" in refused.stderr
    assert (other / "notes.txt").read_text() == "keep me"


def test_demo_station_mode_boards_arrive_one_resumes_and_everything_stops(tmp_path):
    work = tmp_path / "demo"
    p = subprocess.run([sys.executable, "-m", "flasher", "demo", "--station", "--boards", "3", "--plug-every", "0.3",
                        "--workdir", str(work), "--bind", free_loopback()], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    assert "demo: 3 done, 0 failed, 0 already done" in p.stdout
    verdicts = [line.split(": verdict: ")[1].split(":")[0] for line in p.stderr.splitlines() if ": verdict: " in line]
    assert sorted(verdicts) == ["done", "done", "done", "unplugged"]   # the third board was pulled out once
    assert "resumes at program" in p.stderr
    rows = sqlite3.connect(work / "ledger.sqlite3").execute("SELECT status, attempts FROM boards").fetchall()
    assert sorted(rows) == [("provisioned", 1), ("provisioned", 1), ("provisioned", 2)]
    assert len(list((work / "labels").glob("*.png"))) == 3
    host = p.stdout.split("emulator on ")[1].split(":8883")[0]
    with socket.socket() as s:
        s.bind((host, 8883))
    assert not (work / "boards" / "ports.json").exists()
