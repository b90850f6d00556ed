"""`flasher provision --tts-app` end to end: simulated boards on real ptys, The Things Stack emulator over
HTTPS, the DPS + IoT Hub emulator through the real SDK, a real SQLite ledger.

"Done when" of issue 11: every board complete on all four servers with the module's AppKey on the
Join Server, registered in DPS and proven with a message; a rerun writes nothing new; an interrupted
board resumes (a server refusing, and a SIGKILL between two servers); the API key never leaves.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from urllib.parse import urlsplit

import pytest
from fixtures_dps import GROUP_PRIMARY, ID_SCOPE
from fixtures_tts import APP, OTHER_APP, end_device, tts_target

from flasher.eui import EUI64
from flasher.keys import AppKeyPlan, AppKeySource, derive_app_key
from flasher.ledger import Ledger
from flasher.pipeline import Settings, provision_boards
from flasher.sim.tts import TtsEmulator
from flasher.tts import SERVERS, TtsClient, register_end_device

JOIN_EUI = "70B3D57ED003F06A"
MASTER = "tts pipeline tests: an AppKey master secret"


def cli_env(key: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHER_")}
    env.update(FLASHER_GROUP_PRIMARY_KEY=GROUP_PRIMARY, FLASHER_TTS_API_KEY=key, **extra)
    return env


def provision_argv(ports, dps, tts, tmp_path, *extra, verbose: str | None = None) -> list[str]:
    return [sys.executable, "-m", "flasher", *([verbose] if verbose else []), "provision",
            *[a for p in ports for a in ("--port", p)],
            "--id-scope", ID_SCOPE, "--dps-host", dps.host, "--ca-cert", str(dps.ca_cert_path),
            "--join-eui", JOIN_EUI, "--ledger", str(tmp_path / "ledger.sqlite3"), "--out-dir", str(tmp_path / "h"),
            "--json", "--tts-app", APP, "--tts-url", tts.url, "--tts-ca-cert", str(tts.ca_cert_path), *extra]


def results(proc) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


@pytest.fixture
def flasher(cli, monkeypatch):
    """Run ``flasher ARGS`` in process (the error funnel, real logging) with an API key in the environment."""
    for var in [v for v in os.environ if v.startswith("FLASHER_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("FLASHER_GROUP_PRIMARY_KEY", GROUP_PRIMARY)

    def run(argv: list[str], key: str | None):
        if key is None:
            monkeypatch.delenv("FLASHER_TTS_API_KEY", raising=False)
        else:
            monkeypatch.setenv("FLASHER_TTS_API_KEY", key)
        return cli(*argv[3:])   # the argv of a subprocess, without "python -m flasher"

    return run


def lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def dps_registrations(dps, reg_id: str) -> list[dict]:
    return [r for r in dps.state()["registrations"] if r.get("registrationId") == reg_id]


def test_provision_registers_every_board_on_all_four_servers_then_dps(sim_boards, dps_emulator, make_tts, tmp_path,
                                                                       flasher):
    sim = sim_boards(2, seed=1101)
    tts = make_tts()
    key = tts.add_api_key(app=APP)
    code, stdout, stderr = flasher(provision_argv(sim.ports, dps_emulator, tts, tmp_path), key)
    assert code == 0, stderr
    out = lines(stdout)
    assert len(out) == 2 and {r["status"] for r in out} == {"provisioned"}
    for r, board in ((r, next(b for b in sim.boards if b.deveui == r["deveui"])) for r in out):
        device_id = f"eui-{board.deveui.lower()}"
        assert r["tts_device_id"] == device_id
        copies = tts.device(APP, device_id)
        assert all(copies[s] is not None for s in SERVERS)
        assert tts.app_key(APP, device_id) == board.state["appkey"]          # the module's AppKey, on the JS only
        assert copies["ns"]["frequency_plan_id"] == "EU_863_870_TTN" and copies["ns"]["supports_join"] is True
        assert copies["is"]["ids"]["join_eui"] == JOIN_EUI
        assert [x["status"] for x in dps_registrations(dps_emulator, board.deveui.lower())] == ["assigned"]
        assert any(m["device_id"] == r["device_id"] and m["payload"] == "TestMessage"
                   for m in dps_emulator.state()["messages"])
    # the ledger and `flasher status` show the network step and the end device id
    rows = sqlite3.connect(tmp_path / "ledger.sqlite3").execute(
        "SELECT deveui, tts_app, tts_device_id, tts_servers FROM boards").fetchall()
    assert {(a, d, s) for _, a, d, s in rows} == {(APP, f"eui-{b.deveui.lower()}", "is,js,ns,as") for b in sim.boards}
    ledger = str(tmp_path / "ledger.sqlite3")
    _, text, _ = flasher(["", "", "", "status", "--ledger", ledger], None)
    head, *rows_text = text.splitlines()
    assert "NETWORK" in head and "TTS DEVICE" in head
    for b in sim.boards:
        line = next(x for x in rows_text if x.startswith(b.deveui))
        assert line.split()[5:7] == ["ok", f"eui-{b.deveui.lower()}"]
    _, as_json, _ = flasher(["", "", "", "status", "--ledger", ledger, "--json"], None)
    for row in lines(as_json):
        assert row["steps"]["network"] == "ok" and row["tts_servers"] == "is,js,ns,as"
    _, as_csv, _ = flasher(["", "", "", "status", "--ledger", ledger, "--csv"], None)
    assert as_csv.splitlines()[0].split(",")[-6:-3] == ["tts_app", "tts_device_id", "tts_servers"]
    # a rerun writes nothing new: no request reaches the stack, no registration reaches DPS
    writes, requests = dict(tts.writes), tts.stats["requests"]
    registrations = len(dps_emulator.state()["registrations"])
    code, again, stderr = flasher(provision_argv(sim.ports, dps_emulator, tts, tmp_path), key)
    assert code == 0, stderr
    assert {r["status"] for r in lines(again)} == {"already_provisioned"}
    assert tts.writes == writes and tts.stats["requests"] == requests
    assert len(dps_emulator.state()["registrations"]) == registrations


# (AppKey source, template): a header that carries the key as a string, one that does not (the key is
# derived again), and the LMIC one (a string and a byte array, which must agree).
SOURCES = [("random", "seeed-lorawan"), ("derived", "azure-dps"), ("given", "lmic")]


@pytest.mark.parametrize("source,template", SOURCES, ids=[s for s, _ in SOURCES])
def test_a_resumed_board_sends_the_modules_appkey_for_every_source(source, template, sim_boards, dps_emulator,
                                                                   make_tts, tmp_path):
    sim = sim_boards(1, seed=1200 + SOURCES.index((source, template)))
    board = sim.boards[0]
    tts = make_tts()
    target = tts_target(tts, tts.add_api_key(app=APP))
    app_key = {"random": lambda: AppKeyPlan(AppKeySource.RANDOM), "derived": lambda: AppKeyPlan.derived_from(MASTER),
               "given": lambda: AppKeyPlan.given_key("2B7E151628AED2A6ABF7158809CF4F3C")}[source]()
    settings = Settings(id_scope=ID_SCOPE, group_key=base64.b64decode(GROUP_PRIMARY), dps_host=dps_emulator.host,
                        ca_cert=str(dps_emulator.ca_cert_path), out_dir=tmp_path / "h", join_eui=EUI64.parse(JOIN_EUI),
                        template=template, app_key=app_key, test_message=None, timeout=30.0, tts=target)
    device_id = f"eui-{board.deveui.lower()}"
    with Ledger(tmp_path / "l.sqlite3") as ledger:
        tts.refuse("js", status=500)           # the Join Server refuses: the board stops in the network step
        [r] = provision_boards(sim.ports, settings, ledger)
        assert r.status == "failed" and r.failed_step == "network" and "500" in r.error
        rec = ledger.get(board.deveui)
        assert rec.steps["program"] == "ok" and rec.steps["network"] == "failed" and rec.tts_servers == "is"
        assert not dps_registrations(dps_emulator, board.deveui.lower())   # DPS only after the network step
        tts.accept()
        [r] = provision_boards(sim.ports, settings, ledger)    # render is done: the AppKey comes back from the header
        assert r.status == "provisioned", r.error
        assert ledger.get(board.deveui).tts_servers == "is,js,ns,as"
    module_key = board.state["appkey"]
    assert tts.app_key(APP, device_id) == module_key
    assert tts.writes == {"is": 1, "js": 1, "ns": 1, "as": 1}
    if source == "derived":
        assert module_key == derive_app_key(MASTER.encode(), EUI64.parse(board.deveui)).hex().upper()
    if source == "given":
        assert module_key == "2B7E151628AED2A6ABF7158809CF4F3C"


class HoldingTts(TtsEmulator):
    """The emulator, plus one test knob: hold requests to one server until released (to SIGKILL the client there)."""

    def __init__(self, *args, hold: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.hold, self.caught, self.release = hold, threading.Event(), threading.Event()

    def handle(self, method, target, headers, body):
        if self._server_of(urlsplit(target).path) == self.hold and not self.release.is_set():
            self.caught.set()
            self.release.wait(60)
            return 503, {}, {"code": 14, "message": "the client went away", "details": []}
        return super().handle(method, target, headers, body)


def test_a_board_killed_between_two_servers_resumes_at_the_missing_one(sim_boards, dps_emulator, tmp_path, flasher):
    sim = sim_boards(1, seed=1301)
    board = sim.boards[0]
    device_id = f"eui-{board.deveui.lower()}"
    with HoldingTts(applications=[APP], cert_dir=tmp_path / "tts", hold="ns") as tts:
        key = tts.add_api_key(app=APP)
        proc = subprocess.Popen(provision_argv(sim.ports, dps_emulator, tts, tmp_path), env=cli_env(key),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert tts.caught.wait(60), "the Network Server was never asked"
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
            tts.release.set()
        row = sqlite3.connect(tmp_path / "ledger.sqlite3").execute(
            "SELECT status, current_step, tts_servers FROM boards").fetchone()
        assert row == ("in_progress", "network", "is,js")       # recorded server by server before the kill
        assert tts.writes == {"is": 1, "js": 1, "ns": 0, "as": 0}
        seen = len(tts.requests)
        code, again, stderr = flasher(provision_argv(sim.ports, dps_emulator, tts, tmp_path, "--no-test-message"), key)
        assert code == 0, stderr
        assert lines(again)[0]["status"] == "provisioned"
        rerun = [(r["server"], r["method"]) for r in tts.requests[seen:]]
        assert ("is", "POST") not in rerun and ("js", "PUT") not in rerun        # resumed at the missing ones
        assert tts.writes == {"is": 1, "js": 1, "ns": 1, "as": 1}
        assert tts.app_key(APP, device_id) == board.state["appkey"]


def test_a_deveui_registered_elsewhere_stops_the_board_in_one_line(sim_boards, dps_emulator, make_tts, tmp_path,
                                                                  flasher):
    sim = sim_boards(1, seed=1401)
    board = sim.boards[0]
    tts = make_tts()
    theirs = end_device(board.deveui, app=OTHER_APP, join_eui=EUI64.parse(JOIN_EUI))
    theirs = type(theirs)(OTHER_APP, "bench-7", theirs.dev_eui, theirs.join_eui, theirs.app_key)
    with TtsClient(tts_target(tts, tts.add_api_key(app=OTHER_APP), app=OTHER_APP)) as client:
        register_end_device(client, theirs)
    code, out, stderr = flasher(provision_argv(sim.ports, dps_emulator, tts, tmp_path), tts.add_api_key(app=APP))
    assert code == 1
    [r] = lines(out)
    assert r["failed_step"] == "network" and "\n" not in r["error"]
    assert "'bench-7'" in r["error"] and f"'{OTHER_APP}'" in r["error"] and f"'{APP}'" in r["error"]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {board.deveui}: network: {r['error']}"] and "Traceback" not in stderr
    assert tts.device(APP, f"eui-{board.deveui.lower()}") == {s: None for s in SERVERS}
    assert tts.app_key(OTHER_APP, "bench-7") == theirs.app_key_hex          # theirs untouched
    assert not dps_registrations(dps_emulator, board.deveui.lower())


def test_a_key_without_a_right_ends_the_board_naming_it_and_a_good_key_resumes(sim_boards, dps_emulator, make_tts,
                                                                              tmp_path, flasher):
    sim = sim_boards(1, seed=1501)
    board = sim.boards[0]
    tts = make_tts()
    weak = tts.add_api_key({APP: ["RIGHT_APPLICATION_DEVICES_READ", "RIGHT_APPLICATION_DEVICES_WRITE"]})
    code, out, _ = flasher(provision_argv(sim.ports, dps_emulator, tts, tmp_path), weak)
    assert code == 1
    [r] = lines(out)
    assert r["failed_step"] == "network" and "RIGHT_APPLICATION_DEVICES_WRITE_KEYS" in r["error"]
    assert "Join Server" in r["error"] and "lacks" in r["error"]
    # a key with the right resumes at the Join Server, riding out a 429 and a 503 on the way
    tts.fail_next(1, 429, server="js", retry=0)
    tts.fail_next(1, 503, server="ns")
    code, out, stderr = flasher(provision_argv(sim.ports, dps_emulator, tts, tmp_path, "--no-test-message"),
                                tts.add_api_key(app=APP))
    assert code == 0, stderr
    assert tts.stats["throttled"] == 1 and tts.stats["unavailable"] == 1
    assert tts.writes == {"is": 1, "js": 1, "ns": 1, "as": 1}
    assert tts.app_key(APP, f"eui-{board.deveui.lower()}") == board.state["appkey"]


def test_the_api_key_never_leaves_the_process(sim_boards, dps_emulator, make_tts, tmp_path, flasher):
    """-vv everywhere, a refusal on the way; the key is nowhere: output, logs, ledger, headers, emulator state."""
    sim = sim_boards(1, seed=1701)
    tts = make_tts(state_file=tmp_path / "tts-state.json")
    key = tts.add_api_key(app=APP)
    secret = key.split(".")[2]
    tts.fail_next(1, 503)
    tts.refuse("as", status=500)
    runs = [flasher(provision_argv(sim.ports, dps_emulator, tts, tmp_path, "--no-test-message", verbose="-vv"), key)]
    tts.accept()
    runs.append(flasher(provision_argv(sim.ports, dps_emulator, tts, tmp_path, "--no-test-message", verbose="-vv"),
                        key))
    tts.refuse("js", status=500)   # and `tts register` from a key file, failing on the way
    key_file, app_key_file = tmp_path / "key.txt", tmp_path / "appkey.txt"
    key_file.write_text(key + "\n")
    app_key_file.write_text("2B7E151628AED2A6ABF7158809CF4F3C\n")
    runs.append(flasher(["", "", "", "-vv", "tts", "register", "2CF7F12024900777", "--app-key-source", "given",
                         "--app-key-file", str(app_key_file), "--tts-app", APP, "--tts-url", tts.url,
                         "--tts-ca-cert", str(tts.ca_cert_path), "--tts-api-key-file", str(key_file)], None))
    assert [code for code, _, _ in runs] == [1, 0, 1], [err[-400:] for _, _, err in runs]
    assert "DEBUG" in runs[1][2] and "network" in runs[1][2]     # -vv did log
    blobs = [(out + err).encode() for _, out, err in runs]
    for path in tmp_path.rglob("*"):
        if path.is_file() and path != key_file:
            blobs.append(path.read_bytes())
    with Ledger(tmp_path / "ledger.sqlite3", create=False, readonly=True) as ledger:
        blobs.append(json.dumps([r.to_dict() for r in ledger.all()]).encode())
    for blob in blobs:
        assert key.encode() not in blob and secret.encode() not in blob and secret[:24].encode() not in blob
