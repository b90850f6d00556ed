"""--upload through arduino-cli.

arduino-cli, the Seeed SAMD core and a board's bootloader cannot run here, so this is
the one place a stand-in is used: a small script on PATH named arduino-cli that answers
like the real one (--show-properties, compile, upload) and records what it was asked,
the environment it was given and the build folder it was pointed at. On request it
sleeps in `compile` with a grandchild of its own (and can ignore SIGTERM), so the tests
can interrupt a build for real: signals to a real child Python process running
ArduinoCli, then a look at which processes and folders are left. Everything else
(simulated board over a pty, DPS emulator over TLS, ledger) is real.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fixtures_dps import ID_SCOPE
from test_provision import run_cli, settings_for

from flasher.arduino import ArduinoCli, ArduinoError, bossac_problem, clean_stale_builds, default_sketch, find_arduino_cli
from flasher.ledger import Ledger
from flasher.pipeline import Upload, provision_boards

FAKE = r'''#!{python}
import json, os, shutil, signal, subprocess, sys, time
args = sys.argv[1:]
log = os.environ["FAKE_ARDUINO_LOG"]
with open(os.path.join(log, "calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\n")
with open(os.path.join(log, "env.jsonl"), "a") as f:
    f.write(json.dumps(dict(os.environ)) + "\n")
if os.path.isdir(args[-1]):
    folder = os.path.dirname(args[-1])
    with open(os.path.join(log, "folders.jsonl"), "a") as f:
        f.write(json.dumps({"folder": folder, "mode": os.stat(folder).st_mode & 0o777,
                            "config_mode": os.stat(os.path.join(args[-1], "config.h")).st_mode & 0o777}) + "\n")
if os.environ.get("FAKE_SLEEP") and args[0] == "compile":
    if os.environ.get("FAKE_IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the grandchild too
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(os.path.join(log, "pids.tmp"), "w") as f:
        f.write(f"{os.getpid()} {grandchild.pid}")
    os.replace(os.path.join(log, "pids.tmp"), os.path.join(log, "pids"))
    time.sleep(float(os.environ["FAKE_SLEEP"]))
if "--show-properties" in args:
    print("upload.tool=bossac")  # as arduino-cli shows the rolawan board's properties (placeholders unexpanded)
    print("tools.bossac.cmd=bossac")
    print("tools.bossac.path={runtime.tools.bossac.path}")
    print("runtime.tools.bossac.path=/root/.arduino15/packages/Seeeduino/tools/bossac/" + os.environ["FAKE_BOSSAC"])
    print("tools.bossac.upload.pattern=\"{{path}}/bossac\" -i -d --port={{serial.port.file}} -U true -e -w -v "
          "-b \"{{build.path}}/x.bin\" -R")
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


def folders(log: Path) -> list[dict]:
    return [json.loads(line) for line in (log / "folders.jsonl").read_text().splitlines()]


def envs(log: Path) -> list[dict]:
    return [json.loads(line) for line in (log / "env.jsonl").read_text().splitlines()]


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
    # Built in a private folder beside the headers, gone afterwards.
    headers = tmp_path / "headers"
    assert {Path(f["folder"]).parent for f in folders(fake_arduino)} == {headers / ".flasher-build"}
    assert not (headers / ".flasher-build").exists()
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


# --- the child's environment ------------------------------------------------------------

def test_arduino_cli_gets_no_secret_in_its_environment(fake_arduino, tmp_path, monkeypatch):
    from flasher.header import resolve_app_key
    from flasher.secrets import resolve_secret

    group = base64.b64encode(hashlib.sha512(b"upload env: group key").digest()).decode()
    secondary = base64.b64encode(hashlib.sha512(b"upload env: secondary").digest()).decode()
    master = "upload env: an AppKey master secret"
    app_key = "00112233445566778899AABBCCDDEEFF"
    device_key = base64.b64encode(hashlib.sha256(b"upload env: device").digest()).decode()
    given = {"FLASHER_GROUP_PRIMARY_KEY": group, "FLASHER_GROUP_SECONDARY_KEY": secondary,
             "FLASHER_APPKEY_MASTER": master, "FLASHER_APP_KEY": app_key, "FLASHER_DEVICE_KEY": device_key,
             "FLASHER_FUTURE_TOKEN": "a name no one has used yet", "FLASHER_SIMULATED_PORTS": "/tmp/ports.json",
             "BUILD_NOTE": group, "MY_MASTER_COPY": f"--key={master}", "FAKE_KEEP_ME": "harmless"}
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    # Load them the way the commands do, so this process knows them as secrets.
    resolve_secret("group primary key", env_var="FLASHER_GROUP_PRIMARY_KEY")
    derived, _ = resolve_app_key("2CF7F12024900138", master_secret=resolve_secret("master", env_var="FLASHER_APPKEY_MASTER"))
    header = tmp_path / "out" / "2CF7F12024900138.h"
    header.parent.mkdir()
    header.write_text(f'#define FLASHER_APP_KEY "{derived.hex().upper()}"\n')
    ArduinoCli().build_and_upload(default_sketch(), header, "/dev/ttyACM9")
    seen = envs(fake_arduino)
    assert len(seen) == 3
    for env in seen:
        assert {k for k in env if k.startswith("FLASHER_")} == {"FLASHER_SIMULATED_PORTS"}
        assert "BUILD_NOTE" not in env and "MY_MASTER_COPY" not in env
        assert env["FAKE_KEEP_ME"] == "harmless" and env["PATH"] == os.environ["PATH"]
        dump = json.dumps(env)
        for secret in (group, secondary, master, app_key, device_key, derived.hex(), derived.hex().upper()):
            assert secret not in dump


# --- build folders ------------------------------------------------------------------------

def test_build_folder_is_private_and_removed_on_success_and_error(fake_arduino, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    header = out / "2CF7F12024900138.h"
    header.write_text("#define X 1\n")
    old = os.umask(0)
    try:
        ArduinoCli().build_and_upload(default_sketch(), header, "/dev/ttyACM9")
        monkeypatch.setenv("FAKE_UPLOAD_EXIT", "1")
        with pytest.raises(ArduinoError, match="upload failed"):
            ArduinoCli().build_and_upload(default_sketch(), header, "/dev/ttyACM9", build_parent=tmp_path / "elsewhere")
    finally:
        os.umask(old)
    seen = folders(fake_arduino)
    elsewhere = tmp_path / "elsewhere" / ".flasher-build"
    assert [Path(f["folder"]).parent for f in seen] == [out / ".flasher-build"] * 3 + [elsewhere] * 3
    assert all(Path(f["folder"]).name.startswith(f"{os.getpid()}-") for f in seen)
    assert {f["mode"] for f in seen} == {0o700} and {f["config_mode"] for f in seen} == {0o600}
    assert not (out / ".flasher-build").exists() and not (tmp_path / "elsewhere" / ".flasher-build").exists()
    assert stat.S_IMODE((tmp_path / "elsewhere").stat().st_mode) == 0o700  # created by us, under umask 0


RUNNER = r"""
import signal, sys
from flasher.arduino import ArduinoCli
from flasher.arduino import default_sketch

def on_term(signum, frame):
    raise SystemExit(143)  # what a caller does to turn SIGTERM into an exception

signal.signal(signal.SIGTERM, on_term)
ArduinoCli(grace=float(sys.argv[3])).build_and_upload(default_sketch(), sys.argv[1], "/dev/ttyACM9", build_parent=sys.argv[2])
"""


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a dead child its new parent has not reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.fixture
def build_child(fake_arduino, tmp_path, monkeypatch):
    """Start a real `python -c` that runs a build whose compile step sleeps; stop whatever is left at the end."""
    started: list[int] = []

    def start(grace: float = 5.0, ignore_term: bool = False):
        monkeypatch.setenv("FAKE_SLEEP", "120")
        if ignore_term:
            monkeypatch.setenv("FAKE_IGNORE_TERM", "1")
        out = tmp_path / "out"
        out.mkdir(exist_ok=True)
        header = out / "2CF7F12024900138.h"
        header.write_text("#define X 1\n")
        child = subprocess.Popen([sys.executable, "-c", RUNNER, str(header), str(out), str(grace)],
                                 env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started.append(child.pid)
        pids = fake_arduino / "pids"
        wait_until(lambda: pids.exists() or child.poll() is not None, 30, "the stand-in never started")
        assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
        stand_in, grandchild = map(int, pids.read_text().split())
        started.extend([stand_in, grandchild])
        [folder] = (out / ".flasher-build").iterdir()
        return child, out, folder, stand_in, grandchild

    yield start
    for pid in started:
        if running(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_build_stops_arduino_cli_and_removes_the_folder(build_child, sig):
    child, out, folder, stand_in, grandchild = build_child()
    assert folder.is_dir() and stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert (folder / "flasher_otaa" / "config.h").is_file()
    os.kill(child.pid, sig)
    child.wait(timeout=30)
    assert child.returncode != 0
    assert not folder.exists() and not (out / ".flasher-build").exists()
    wait_until(lambda: not running(stand_in) and not running(grandchild), 10, "arduino-cli or its child left running")


def test_a_stand_in_that_ignores_sigterm_is_killed_after_the_grace_period(build_child):
    child, out, folder, stand_in, grandchild = build_child(grace=0.5, ignore_term=True)
    os.kill(child.pid, signal.SIGTERM)
    child.wait(timeout=30)
    assert not folder.exists()
    wait_until(lambda: not running(stand_in) and not running(grandchild), 10, "arduino-cli or its child left running")


def test_sigkill_leaves_a_folder_the_next_run_removes(build_child):
    child, out, folder, stand_in, grandchild = build_child()
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert folder.is_dir() and running(stand_in)  # nothing could run in a SIGKILLed process
    keep_live = out / ".flasher-build" / f"{os.getpid()}-live"
    keep_live.mkdir()
    keep_other = out / ".flasher-build" / "notes"
    keep_other.mkdir()
    # Someone else's process that merely names the folder (an editor, say) is not ours to stop.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", str(folder / "flasher_otaa")])
    try:
        assert clean_stale_builds(out) == [folder]
        assert not folder.exists() and keep_live.is_dir() and keep_other.is_dir()
        wait_until(lambda: not running(stand_in) and not running(grandchild), 10, "orphaned arduino-cli left running")
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_cancel_stops_a_build_in_a_worker_thread(fake_arduino, tmp_path, monkeypatch):
    # The pipeline builds in worker threads; its stop event ends the build, not the build's timeout.
    monkeypatch.setenv("FAKE_SLEEP", "120")
    header = tmp_path / "out" / "2CF7F12024900138.h"
    header.parent.mkdir()
    header.write_text("#define X 1\n")
    cancel = threading.Event()
    pids = fake_arduino / "pids"
    threading.Thread(target=lambda: (wait_until(pids.exists, 30, "no stand-in"), cancel.set()), daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(ArduinoError, match="arduino-cli compile: interrupted"):
        ArduinoCli(grace=1.0).build_and_upload(default_sketch(), header, "/dev/ttyACM9", cancel=cancel)
    assert time.monotonic() - t0 < 60
    stand_in, grandchild = map(int, pids.read_text().split())
    try:
        assert not running(stand_in)
        wait_until(lambda: not running(grandchild), 10, "the stand-in's child left running")
        assert not (header.parent / ".flasher-build").exists()
    finally:
        for pid in (stand_in, grandchild):
            if running(pid):
                os.kill(pid, signal.SIGKILL)
