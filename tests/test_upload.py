"""--upload through arduino-cli.

arduino-cli, the Seeed SAMD core and a board's bootloader cannot run here, so this is
the one place a stand-in is used: a small script on PATH named arduino-cli that answers
like the real one (--show-properties, compile, upload) and records what it was asked.
Everything else (simulated board over a pty, DPS emulator over TLS, ledger) is real.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from fixtures_dps import ID_SCOPE
from test_provision import run_cli, settings_for

from flasher.arduino import ArduinoError, bossac_problem, default_sketch, find_arduino_cli
from flasher.ledger import Ledger
from flasher.pipeline import Upload, provision_boards

FAKE = r'''#!{python}
import json, os, shutil, sys
args = sys.argv[1:]
log = os.environ["FAKE_ARDUINO_LOG"]
with open(os.path.join(log, "calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\n")
if "--show-properties" in args:
    print("upload.tool=bossac")
    print("runtime.tools.bossac.path=/root/.arduino15/packages/Seeeduino/tools/bossac/" + os.environ["FAKE_BOSSAC"])
    print("tools.bossac.upload.pattern=\"{{path}}/bossac\" -i -d --port={{serial.port.file}} -U true -e -w -v -b \"{{build.path}}/x.bin\" -R")
    sys.exit(0)
if args[0] == "compile":
    sketch = args[-1]
    shutil.copyfile(os.path.join(sketch, "config.h"), os.path.join(log, "config.h"))
    os.makedirs(args[args.index("--output-dir") + 1], exist_ok=True)
    sys.exit(0)
if args[0] == "upload":
    sys.exit(int(os.environ.get("FAKE_UPLOAD_EXIT", "0")))
sys.exit(3)
'''


@pytest.fixture
def fake_arduino(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "arduino-cli"
    exe.write_text(FAKE.replace("{python}", sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "arduino-log"
    log.mkdir()
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ARDUINO_LOG", str(log))
    monkeypatch.setenv("FAKE_BOSSAC", "1.7.0-arduino3")
    return log


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in (log / "calls.jsonl").read_text().splitlines()]


def test_upload_builds_with_the_header_and_follows_the_board(sim_boards, sim_env, dps_emulator, fake_arduino, tmp_path):
    sim = sim_boards(1, seed=91)
    sim_env(sim)  # discovery sees the simulated board, with its USB serial number
    up = Upload(sketch=str(default_sketch()), fqbn="Seeeduino:samd:rolawan", arduino_cli=find_arduino_cli())
    with Ledger(tmp_path / "l.sqlite3") as ledger:
        [r] = provision_boards(sim.ports, settings_for(dps_emulator, tmp_path, upload=up), ledger)
        assert r.status == "provisioned", r.error
        rec = ledger.get(sim.boards[0].deveui)
        assert rec.steps["upload"] == "ok" and rec.serial_number == sim.boards[0].serial_number
    assert (fake_arduino / "config.h").read_text() == Path(r.header).read_text()
    verbs = [c[0] for c in calls(fake_arduino)]
    assert verbs == ["compile", "compile", "upload"]
    upload = calls(fake_arduino)[-1]
    assert upload[upload.index("-p") + 1] == sim.ports[0] and "Seeeduino:samd:rolawan" in upload


def test_a_bootloader_eating_bossac_is_refused(sim_boards, dps_emulator, fake_arduino, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_BOSSAC", "1.9.1")
    sim = sim_boards(1, seed=92)
    up = Upload(sketch=str(default_sketch()), fqbn="Seeeduino:samd:rolawan", arduino_cli=find_arduino_cli())
    with Ledger(tmp_path / "l.sqlite3") as ledger:
        [r] = provision_boards(sim.ports, settings_for(dps_emulator, tmp_path, upload=up), ledger)
        assert r.status == "failed" and r.failed_step == "upload"
        assert "erase the SAMD21 bootloader" in r.error
        assert ledger.get(sim.boards[0].deveui).current_step == "upload"
    assert "upload" not in [c[0] for c in calls(fake_arduino)]


def test_bossac_rules():
    assert bossac_problem("upload.tool=bossac\nruntime.tools.bossac.path=/x/bossac/1.7.0-arduino3\n") is None
    assert "1.9" in bossac_problem("upload.tool=bossac\nruntime.tools.bossac.path=/x/bossac/1.9.1\n")
    assert bossac_problem("upload.tool=bossac\nruntime.tools.bossac.path=/x/bossac/1.9.1\n"
                          "tools.bossac.upload.pattern=bossac --offset=0x2000 -w\n") is None
    assert bossac_problem("upload.tool=openocd\n") is None


def test_missing_arduino_cli_is_one_clear_line(sim_boards, dps_emulator, tmp_path):
    sim = sim_boards(1, seed=93)
    proc = run_cli("provision", "--port", sim.ports[0], "--id-scope", ID_SCOPE, "--dps-host", dps_emulator.host,
                   "--ca-cert", str(dps_emulator.ca_cert_path), "--ledger", str(tmp_path / "l.sqlite3"),
                   "--upload", "--arduino-cli", "no-such-arduino-cli", env_extra={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "arduino-cli 'no-such-arduino-cli': not found on PATH" in lines[0]
    assert not (tmp_path / "l.sqlite3").exists()
    with pytest.raises(ArduinoError):
        find_arduino_cli("no-such-arduino-cli")
