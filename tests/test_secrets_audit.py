"""Secrets audit: every command, run with --verbose against the simulators, leaks no group key or master secret.

Recognisable group keys (primary and secondary) and an AppKey master secret are handed
to the commands the ways a user would: environment variables, key files, and once
``--group-key`` on the command line (which must warn, and never echo it). Every
command runs as a real process with ``-v`` (``-vv`` for the SDK's own logging where
it matters) against simulated boards, the DPS + IoT Hub emulator (in process, and
``flasher simulate dps`` as a process) and real files. Then stdout, stderr, and
every byte of every file in the work folder (ledgers and their WAL, a SQL dump of
each ledger, headers, emulator state, board EEPROMs) are searched for the secrets in
every encoding we can think of. Headers may carry a device key and the AppKey (that
is their job) but must be mode 0600; device keys may appear only there and on the
stdout of ``keys`` (also its job).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_dps import free_loopback

from flasher.eui import EUI64
from flasher.keys import derive_app_key, derive_device_key
from flasher.sim.board import BoardSimulator
from flasher.sim.dps import DpsEmulator

PRIMARY_RAW = b"AUDIT-GROUP-PRIMARY-KEY:" + bytes(range(0x41, 0x41 + 40))       # 64 bytes
SECONDARY_RAW = b"AUDIT-GROUP-SECONDARY-KEY" + bytes(range(0x61, 0x61 + 39))    # 64 bytes
PRIMARY = base64.b64encode(PRIMARY_RAW).decode()
SECONDARY = base64.b64encode(SECONDARY_RAW).decode()
MASTER = "AUDIT-APPKEY-MASTER-SECRET-7f3a9c"
SCOPE = "0ne00A0D170"
DEMO_KEY_SHAPE = re.compile(rb"[A-Za-z0-9+/]{86}==")  # a 64-byte key in base64: what the demo's random keys look like


def encodings(raw: bytes, text: str | None = None) -> set[bytes]:
    """Every spelling of a secret worth searching for (each at least 16 bytes long)."""
    forms = {raw, raw.hex().encode(), raw.hex().upper().encode(), base64.b64encode(raw),
             base64.b64encode(raw).rstrip(b"="), base64.urlsafe_b64encode(raw), base64.urlsafe_b64encode(raw).rstrip(b"="),
             binascii.b2a_qp(raw), raw.hex(":").encode(), raw.hex(" ").encode(), raw.hex(" ").upper().encode()}
    if text is not None:
        forms.add(text.encode())
        forms.add(text.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D").encode())  # URL-encoded
    # a prefix is enough to count as a leak (a truncated key in a log line is still a leak)
    forms |= {f[:24] for f in list(forms) if len(f) > 24}
    return {f for f in forms if len(f) >= 16}


SECRETS = {
    "group primary key": encodings(PRIMARY_RAW, PRIMARY),
    "group secondary key": encodings(SECONDARY_RAW, SECONDARY),
    "AppKey master secret": encodings(MASTER.encode(), MASTER),
}


def leaks(data: bytes) -> list[str]:
    return sorted({name for name, forms in SECRETS.items() for f in forms if f in data})


def run(args, *, cwd, env, timeout=120):
    proc = subprocess.run([sys.executable, "-m", "flasher", *args], cwd=cwd, env=env, capture_output=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    """Run every command once; return (runs, work dir, board DevEUIs, device keys)."""
    base = tmp_path_factory.mktemp("audit")
    inputs, work = base / "in", base / "work"
    inputs.mkdir()
    work.mkdir()
    (inputs / "primary.key").write_text(PRIMARY + "\n")
    (inputs / "secondary.key").write_text(SECONDARY + "\n")
    (inputs / "master.txt").write_text(MASTER + "\n")
    enrollments = {"id_scope": SCOPE, "individual": [],
                   "groups": [{"name": "audit", "primary_key": PRIMARY, "secondary_key": SECONDARY, "enabled": True}]}
    (inputs / "enrollments.json").write_text(json.dumps(enrollments))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHER_")}
    env.update(FLASHER_GROUP_PRIMARY_KEY=PRIMARY, FLASHER_GROUP_SECONDARY_KEY=SECONDARY, FLASHER_APPKEY_MASTER=MASTER,
               XDG_CACHE_HOME=str(work / "cache"), HOME=str(work / "home"))
    no_env = {k: v for k, v in env.items() if not k.startswith("FLASHER_")}
    runs: dict[str, tuple[int, bytes, bytes]] = {}
    with DpsEmulator(enrollments, host=free_loopback(), cert_dir=work / "dps-certs",
                     state_file=work / "dps-state.json") as emu, \
            BoardSimulator(count=3, state_dir=work / "boards", seed=77) as sim:
        ca = str(emu.ca_cert_path)
        dps = ["--id-scope", SCOPE, "--dps-host", emu.host, "--ca-cert", ca]
        eui0, eui1, eui2 = (b.deveui for b in sim.boards)

        def go(name, args, e=env, **kw):
            runs[name] = run(["-v", *args], cwd=work, env=e, **kw)

        go("keys/env", ["keys", eui0, "--format", "json"])
        go("keys/files", ["keys", eui0, "--group-key-file", str(inputs / "primary.key"),
                          "--secondary-key-file", str(inputs / "secondary.key")], e=no_env)
        go("keys/option", ["keys", eui0, "--group-key", PRIMARY], e=no_env)
        go("header/env-master-stdout", ["header", eui0, "--id-scope", SCOPE])
        go("header/file-master-o", ["header", eui1, "--id-scope", SCOPE, "--app-key-master-file",
                                    str(inputs / "master.txt"), "--group-key-file", str(inputs / "primary.key"),
                                    "-o", str(work / "out" / "header1.h")], e=no_env)
        go("ports", ["ports"], e={**env, "FLASHER_SIMULATED_PORTS": str(sim.ports_file)})
        go("eui", ["eui", "--port", sim.ports[0], "--json"])
        go("register/-v", ["register", eui0, *dps, "--json"])
        runs["register/-vv"] = run(["-vv", "register", eui1, *dps, "--json"], cwd=work, env=env)
        go("provision/env", ["provision", "--port", sim.ports[0], *dps, "--ledger", str(work / "ledger.sqlite3"),
                             "--out-dir", str(work / "headers"), "--json"])
        runs["provision/files-vv"] = run(
            ["-vv", "provision", "--port", sim.ports[1], "--port", sim.ports[2], *dps,
             "--ledger", str(work / "ledger.sqlite3"), "--out-dir", str(work / "headers"), "--json",
             "--group-key-file", str(inputs / "primary.key"), "--app-key-master-file", str(inputs / "master.txt")],
            cwd=work, env=no_env)
        go("verify", ["verify", "--port", sim.ports[0], "--expect", eui0, "--join-eui", "0000000000000000",
                      "--band", "EU868"])
        go("status", ["status", "--ledger", str(work / "ledger.sqlite3")])
        go("status/json", ["status", "--ledger", str(work / "ledger.sqlite3"), "--json"])
        go("status/csv", ["status", "--ledger", str(work / "ledger.sqlite3"), "--csv"])
        go("demo", ["demo", "--boards", "2", "--workdir", str(work / "demo")], e=no_env)
        runs["simulate dps"] = _simulate_dps(inputs, work, env)
    keys = {eui: derive_device_key(PRIMARY_RAW, eui.lower()) for eui in (eui0, eui1, eui2)}
    keys |= {f"{eui}/secondary": derive_device_key(SECONDARY_RAW, eui.lower()) for eui in (eui0, eui1, eui2)}
    return runs, work, (eui0, eui1, eui2), keys


def _simulate_dps(inputs: Path, work: Path, env: dict):
    """`flasher -v simulate dps` as a process, one registration against it, then SIGTERM."""
    host = free_loopback()
    proc = subprocess.Popen([sys.executable, "-m", "flasher", "-v", "simulate", "dps", "--enrollments",
                             str(inputs / "enrollments.json"), "--host", host, "--cert-dir", str(work / "sim-certs"),
                             "--state", str(work / "sim-state.json")], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        ca = proc.stdout.readline().decode().strip()
        reg = run(["-v", "register", "audit-sim-0001", "--id-scope", SCOPE, "--dps-host", host, "--ca-cert", ca],
                  cwd=work, env=env)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return max(proc.returncode, reg[0]), ca.encode() + b"\n" + out + reg[1], err + reg[2]


def all_files(work: Path):
    for root, _, files in os.walk(work):
        for name in files:
            yield Path(root) / name


def test_every_command_ran_and_succeeded(audit):
    runs, *_ = audit
    assert {"keys/env", "header/env-master-stdout", "eui", "verify", "register/-v", "provision/env", "status", "demo",
            "simulate dps"} <= set(runs)
    failed = {n: (rc, err.decode()[-400:]) for n, (rc, _, err) in runs.items() if rc != 0}
    assert not failed
    assert all(b"DEBUG" in err or b"INFO" in err for n, (_, _, err) in runs.items() if n.startswith(("register", "provision"))), \
        "--verbose produced no log lines"
    assert b"azure" in runs["register/-vv"][2] and b"azure" in runs["provision/files-vv"][2], "-vv showed no SDK logging"


def test_no_secret_on_stdout_or_stderr(audit):
    runs, *_ = audit
    found = {f"{n} {stream}": leaks(data) for n, (_, out, err) in runs.items()
             for stream, data in (("stdout", out), ("stderr", err)) if leaks(data)}
    assert not found


def test_group_key_option_warns_without_echo(audit):
    runs, *_ = audit
    rc, out, err = runs["keys/option"]
    assert rc == 0 and b"warning: --group-key on the command line is visible in the process list" in err
    assert not leaks(out + err)


def test_no_secret_in_any_written_file(audit):
    _, work, _, _ = audit
    files = list(all_files(work))
    assert any(f.name == "ledger.sqlite3" for f in files) and any(f.suffix == ".h" for f in files)
    assert (work / "dps-state.json").exists() and (work / "sim-state.json").exists()
    found = {str(f.relative_to(work)): leaks(f.read_bytes()) for f in files if leaks(f.read_bytes())}
    assert not found


def test_no_secret_in_a_dump_of_the_ledgers(audit):
    _, work, _, _ = audit
    ledgers = [f for f in all_files(work) if f.suffix == ".sqlite3"]
    assert len(ledgers) >= 2  # ours and the demo's
    for path in ledgers:
        db = sqlite3.connect(path)
        try:
            dump = "\n".join(db.iterdump()).encode()
        finally:
            db.close()
        assert b"provisioned" in dump
        assert not leaks(dump), path


def test_headers_are_0600_and_carry_only_their_own_keys(audit):
    _, work, euis, keys = audit
    headers = [f for f in all_files(work) if f.suffix == ".h"]
    assert len(headers) >= 6  # header -o, three provisioned boards, two demo boards
    for h in headers:
        assert h.stat().st_mode & 0o777 == 0o600, h
    text = (work / "out" / "header1.h").read_text()
    assert keys[euis[1]] in text  # its device key: that is the header's job
    assert f'FLASHER_APP_KEY "{derive_app_key(MASTER.encode(), EUI64.parse(euis[1])).hex().upper()}"' in text


def test_device_keys_only_where_they_belong(audit):
    """Device keys belong in headers and on `keys`/`header` stdout; not in logs, ledgers or state files."""
    runs, work, _, keys = audit
    forms = {name: encodings(base64.b64decode(k), k) for name, k in keys.items()}

    def has(data: bytes) -> list[str]:
        return sorted({n for n, fs in forms.items() if any(f in data for f in fs)})

    allowed_stdout = ("keys/", "header/env-master-stdout")
    found = {}
    for n, (_, out, err) in runs.items():
        if has(err):
            found[f"{n} stderr"] = has(err)
        if not n.startswith(allowed_stdout) and has(out):
            found[f"{n} stdout"] = has(out)
    for f in all_files(work):
        if f.suffix != ".h" and has(f.read_bytes()):
            found[str(f.relative_to(work))] = has(f.read_bytes())
    assert not found


def test_demo_shows_no_key_shaped_string(audit):
    """The demo's group keys are random and never shown: nothing that looks like a 64-byte base64 key anywhere."""
    runs, work, _, _ = audit
    _, out, err = runs["demo"]
    assert b"4/4" not in out and b"2/2 boards provisioned" in out
    assert not DEMO_KEY_SHAPE.search(out + err)
    for f in all_files(work / "demo"):
        assert not DEMO_KEY_SHAPE.search(f.read_bytes()), f
