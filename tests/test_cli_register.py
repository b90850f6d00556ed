"""`flasher register` and `flasher simulate dps` end to end, in real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from fixtures_dps import (
    DISABLED_ID,
    DISABLED_KEY,
    ENROLLMENTS,
    GROUP_PRIMARY,
    ID_SCOPE,
    INDIVIDUAL_ID,
    INDIVIDUAL_PRIMARY,
    free_loopback,
)

FLASHER = [sys.executable, "-m", "flasher"]


def run(args, env=None, timeout=90):
    e = {k: v for k, v in os.environ.items() if not k.startswith("FLASHER_")}
    e.update(env or {})
    return subprocess.run(FLASHER + args, capture_output=True, text=True, env=e, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture
def target(dps_emulator):
    return ["--id-scope", ID_SCOPE, "--dps-host", dps_emulator.host, "--ca-cert", str(dps_emulator.ca_cert_path)]


def test_group_registration_json_several_ids(target, dps_emulator):
    euis = ["2C:F7:F1:20:24:90:01:40", "2CF7F12024900141", "2cf7f12024900142"]
    p = run(["register", *euis, *target, "--json"], env={"FLASHER_GROUP_PRIMARY_KEY": GROUP_PRIMARY})
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert sorted(r["registration_id"] for r in rows) == ["2cf7f12024900140", "2cf7f12024900141", "2cf7f12024900142"]
    assert all(r["ok"] and r["status"] == "assigned" and r["assigned_hub"] == dps_emulator.host for r in rows)
    assert all(set(r["timings"]) == {"register", "connect", "message"} for r in rows)
    assert "\r" not in p.stderr  # no live status line on a pipe
    received = {m["device_id"] for m in dps_emulator.state()["messages"] if m["payload"] == "TestMessage"}
    assert {r["device_id"] for r in rows} <= received
    assert GROUP_PRIMARY not in p.stdout + p.stderr


def test_individual_registration_from_env_text_output(target):
    p = run(["register", INDIVIDUAL_ID, *target, "--enrollment", "individual", "--no-test-message"],
            env={"FLASHER_DEVICE_KEY": INDIVIDUAL_PRIMARY})
    assert p.returncode == 0, p.stderr
    fields = p.stdout.strip().split("\t")
    assert fields[:2] == [INDIVIDUAL_ID, "assigned"]
    assert "register" in fields[-1] and "connect" not in fields[-1]


def test_errors_are_one_line_and_exit_nonzero(target, tmp_path):
    key_file = tmp_path / "k"
    key_file.write_text(GROUP_PRIMARY + "\n")  # a valid key, but not this enrollment's
    p = run(["register", INDIVIDUAL_ID, *target, "--enrollment", "individual", "--device-key-file", str(key_file)])
    assert p.returncode == 1
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("error: ") and "401" in p.stderr
    assert "Traceback" not in p.stderr and GROUP_PRIMARY not in p.stderr

    p = run(["register", DISABLED_ID, *target, "--enrollment", "individual", "--device-key", DISABLED_KEY, "--json"])
    assert p.returncode == 1
    assert json.loads(p.stdout)["error"] == "disabled"
    lines = p.stderr.strip().splitlines()
    assert lines[0].startswith("warning: --device-key") and len(lines) == 2 and lines[1].startswith("error: ")


@pytest.mark.parametrize("args, env, fragment", [
    (["register", "2cf7f12024900138"], {"FLASHER_GROUP_PRIMARY_KEY": GROUP_PRIMARY}, "--id-scope is required"),
    (["register", "2cf7f12024900138", "--id-scope", "0ne/00"], {"FLASHER_GROUP_PRIMARY_KEY": GROUP_PRIMARY}, "ID scope"),
    (["register", "2cf7f12024900138", "--id-scope", ID_SCOPE], {}, "group primary key: missing"),
    (["register", "a", "b", "--id-scope", ID_SCOPE, "--enrollment", "individual"],
     {"FLASHER_DEVICE_KEY": INDIVIDUAL_PRIMARY}, "one id"),
    (["register", "2cf7f12024900138", "--id-scope", ID_SCOPE, "--ca-cert", "/nonexistent.pem"],
     {"FLASHER_GROUP_PRIMARY_KEY": GROUP_PRIMARY}, "no such file"),
])
def test_usage_errors_exit_2(args, env, fragment):
    p = run(args, env=env)
    assert p.returncode == 2, p.stderr
    assert fragment in p.stderr and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def test_live_state_on_a_terminal(target):
    import pty

    master, slave = pty.openpty()
    try:
        e = {k: v for k, v in os.environ.items() if not k.startswith("FLASHER_")}
        e["FLASHER_DEVICE_KEY"] = INDIVIDUAL_PRIMARY
        p = subprocess.run(FLASHER + ["register", INDIVIDUAL_ID, *target, "--enrollment", "individual", "--no-test-message"],
                           stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, env=e, timeout=90)
        os.close(slave)
        slave = None
        seen = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the writer side is closed
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)
    assert p.returncode == 0
    assert b"\r\x1b[K[0/1 done, 0 failed] " + INDIVIDUAL_ID.encode() + b": register" in seen
    assert p.stdout.startswith(INDIVIDUAL_ID.encode())  # results stay on stdout


def test_unreachable_dps_one_line():
    p = run(["register", INDIVIDUAL_ID, "--id-scope", ID_SCOPE, "--dps-host", free_loopback(), "--enrollment", "individual"],
            env={"FLASHER_DEVICE_KEY": INDIVIDUAL_PRIMARY})
    assert p.returncode == 1 and "cannot connect" in p.stderr and p.stderr.count("\n") == 1


def test_commands_that_do_not_register_never_import_the_sdk():
    code = ("import sys\n"
            "from flasher.cli import cli\n"
            "cli.main(args=['keys', '2cf7f12024900138'], standalone_mode=False)\n"
            "cli.main(args=['register', '--help'], standalone_mode=False)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('azure', 'paho')))\n")
    env = {**os.environ, "FLASHER_GROUP_PRIMARY_KEY": GROUP_PRIMARY}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1] == "[]"
    assert p.stdout.startswith("2cf7f12024900138\t")


def test_simulate_dps_serves_register_and_stops_on_sigterm(tmp_path):
    enr = tmp_path / "enrollments.json"
    enr.write_text(json.dumps(ENROLLMENTS))
    host, state, ca_out = free_loopback(), tmp_path / "state.json", tmp_path / "ca.pem"
    proc = subprocess.Popen(FLASHER + ["simulate", "dps", "--enrollments", str(enr), "--host", host, "--cert-dir",
                                       str(tmp_path / "certs"), "--ca-cert-out", str(ca_out), "--state", str(state)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ca_line = proc.stdout.readline().strip()
        assert ca_line == str(ca_out) and ca_out.read_text().startswith("-----BEGIN CERTIFICATE-----")
        p = run(["register", "2cf7f120249001aa", "--id-scope", ID_SCOPE, "--dps-host", host, "--ca-cert", ca_line, "--json"],
                env={"FLASHER_GROUP_PRIMARY_KEY": GROUP_PRIMARY})
        assert p.returncode == 0, p.stderr
        data = json.loads(state.read_text())
        assert [m["payload"] for m in data["messages"] if m["device_id"] == "2cf7f120249001aa"] == ["TestMessage"]
        assert data["devices"][0]["device_id"] == "2cf7f120249001aa"
        proc.send_signal(signal.SIGTERM)
        out, errs = proc.communicate(timeout=30)
        assert proc.returncode == 0, errs
        assert "stopped" in errs and "Traceback" not in errs
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_corrupt_ca_cert_is_a_usage_error(tmp_path):
    bad = tmp_path / "corrupt.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    p = run(["register", "2cf7f12024900138", "--id-scope", ID_SCOPE, "--dps-host", free_loopback(), "--ca-cert", str(bad)],
            env={"FLASHER_GROUP_PRIMARY_KEY": GROUP_PRIMARY})
    assert p.returncode == 2, p.stderr
    assert "corrupt.pem" in p.stderr and "not a valid PEM" in p.stderr and p.stderr.count("\n") == 1
    assert "Traceback" not in p.stderr
