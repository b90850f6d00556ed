"""``flasher provision`` the way a factory bench behind a proxy runs it, every setting from flasher.toml.

Simulated boards; the emulator known as ``dps.flasher.test`` (a name only the proxy can
resolve) with port 8883 closed; an HTTP CONNECT proxy that wants a user name and password;
the IoT Central model id; the group's secondary key. Then: every board provisioned, the
emulator shows each device's model id, WebSocket transport and key, the proxy's log shows
every tunnel, the ledger and ``status`` show both payloads, and the proxy password is
nowhere: not in the output, the logs, the ledger, the headers or the emulator's state.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import urllib.parse

import pytest
from fixtures_dps import ENROLLMENTS, GROUP_PRIMARY, GROUP_SECONDARY, _may_bind, free_loopback, group_device_key
from proxies import HttpConnectProxy

NAME = "dps.flasher.test"
THERMOSTAT = "dtmi:com:example:Thermostat;1"
RETURNED = {"iotcTemplate": "thermostat"}
PASSWORD = "bench-proxy-pw/Z7"


@pytest.fixture
def bench(tmp_path, make_dps_emulator, sim_boards, monkeypatch):
    enrollments = json.loads(json.dumps(ENROLLMENTS))
    enrollments["groups"][0]["return_payload"] = RETURNED
    emu = make_dps_emulator(enrollments=enrollments, hub_name=NAME, port=None, websocket_port=443,
                            state_file=tmp_path / "dps-state.json")
    host = emu.host
    sim = sim_boards(2, seed=1212)
    with HttpConnectProxy(free_loopback(0), username="bench", password=PASSWORD, hosts={NAME: host},
                          log_file=tmp_path / "proxy.log") as proxy:
        (tmp_path / "secrets").mkdir()
        (tmp_path / "secrets" / "proxy.txt").write_text(PASSWORD + "\n")
        (tmp_path / "flasher.toml").write_text(
            f'id_scope = "{ENROLLMENTS["id_scope"]}"\ndps_host = "{NAME}"\nca_cert = "{emu.ca_cert_path}"\n'
            f'model_id = "{THERMOSTAT}"\nwebsockets = true\nproxy = "http://bench@{proxy.address}"\n'
            f'proxy_password_file = "secrets/proxy.txt"\nuse_secondary_key = true\ncheck_other_key = true\n'
            f'ledger = "bench.sqlite3"\nout_dir = "headers"\ntimeout = 30\n')
        monkeypatch.chdir(tmp_path)
        for var in ("HTTPS_PROXY", "https_proxy", "FLASHER_ID_SCOPE", "FLASHER_DPS_HOST", "FLASHER_APPKEY_MASTER",
                    "FLASHER_PROXY_PASSWORD"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("FLASHER_GROUP_PRIMARY_KEY", GROUP_PRIMARY)
        monkeypatch.setenv("FLASHER_GROUP_SECONDARY_KEY", GROUP_SECONDARY)
        yield tmp_path, emu, proxy, sim


def test_provision_with_model_id_websockets_proxy_and_secondary_key_from_flasher_toml(bench, cli):
    folder, emu, proxy, sim = bench
    ports = [p for p in sim.ports if p]
    code, out, err = cli("-v", "provision", *(a for p in ports for a in ("--port", p)), "--json")
    assert code == 0, err
    results = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["status"] for r in results) == ["provisioned", "provisioned"]
    reg_ids = sorted(r["registration_id"] for r in results)

    # the emulator: each device's model id, transport, and the key that signed
    state = emu.state()
    for rid in reg_ids:
        rec = next(r for r in state["registrations"] if r["registrationId"] == rid)
        assert (rec["model_id"], rec["transport"], rec["signed_with"]) == (THERMOSTAT, "websocket", "secondary")
        dev = next(d for d in state["devices"] if d["device_id"] == rid)
        assert (dev["model_id"], dev["transport"], dev["message_count"]) == (THERMOSTAT, "websocket", 1)
    assert state["endpoint"] is None  # 8883 was never open

    # the proxy: every tunnel, DPS and hub for each board, with the bench's user name
    log = proxy.log()
    assert len(log) == 4 and {(t["target"], t["status"], t["user"]) for t in log} == {(f"{NAME}:443", "200", "bench")}
    assert [json.loads(line)["status"] for line in (folder / "proxy.log").read_text().splitlines()] == ["200"] * 4

    # the ledger, through status: what was sent and what came back
    code, out, err = cli("status", "--json")
    assert code == 0, err
    rows = {r["registration_id"]: r for r in map(json.loads, out.splitlines())}
    assert sorted(rows) == reg_ids
    for row in rows.values():
        assert row["dps_payload"] == {"modelId": THERMOSTAT} and row["registration_payload"] == RETURNED
    code, out, _ = cli("status", "--csv")
    assert out.splitlines()[0].endswith(",dps_payload,registration_payload")
    assert all(line.endswith(',"{""modelId"":""dtmi:com:example:Thermostat;1""}","{""iotcTemplate"":""thermostat""}"')
               for line in out.splitlines()[1:])

    # the headers carry the device key from the secondary group key
    for r in results:
        assert group_device_key(r["registration_id"], primary=False) in open(r["header"]).read()

    # the proxy password: nowhere
    assert_no_password(folder, out + err)


def test_a_changed_model_id_is_a_conflict_and_the_same_one_is_already_done(bench, cli):
    folder, emu, proxy, sim = bench
    port = sim.ports[0]
    assert cli("provision", "--port", port, "--json")[0] == 0
    code, out, err = cli("provision", "--port", port, "--json")
    assert code == 0 and json.loads(out)["status"] == "already_provisioned"
    code, out, err = cli("provision", "--port", port, "--json", "--model-id", "dtmi:com:example:Thermostat;2")
    result = json.loads(out)
    assert code == 1 and result["status"] == "conflict"
    assert ('DPS registration payload was {"modelId":"dtmi:com:example:Thermostat;1"} '
            '(now {"modelId":"dtmi:com:example:Thermostat;2"})') in result["error"]
    code, out, err = cli("provision", "--port", port, "--json", "--model-id", "dtmi:com:example:Thermostat;2", "--force")
    assert code == 0, err
    rec = next(r for r in emu.state()["registrations"] if r["registrationId"] == json.loads(out)["registration_id"])
    assert rec["model_id"] == "dtmi:com:example:Thermostat;2" and rec["attempts"] == 2


def assert_no_password(folder, output: str) -> None:
    """Not in the output, not in any file (ledgers, their WAL and a SQL dump, headers, emulator state, proxy log)."""
    forms = {PASSWORD, urllib.parse.quote(PASSWORD, safe=""), PASSWORD.encode().hex()}
    assert not any(f in output for f in forms)
    ledgers = []
    for path in folder.rglob("*"):
        if path.is_file() and path.name != "proxy.txt":  # the password file itself
            data = path.read_bytes()
            assert not any(f.encode() in data for f in forms), path
            ledgers += [path] if path.suffix == ".sqlite3" else []
    assert ledgers
    for ledger in ledgers:
        db = sqlite3.connect(ledger)
        dump = "\n".join(db.iterdump())
        db.close()
        assert not any(f in dump for f in forms)


def test_the_done_when_run_options_on_the_command_line_and_the_emulator_as_a_process(tmp_path, sim_boards, cli,
                                                                                     monkeypatch):
    """`flasher simulate dps --websockets-only` in its own process; `flasher provision --model-id … --websockets
    --proxy http://bench:PASSWORD@…` with the password on the command line (warned about, and shown nowhere)."""
    if not _may_bind(443):
        pytest.skip("binding port 443 needs root or CAP_NET_BIND_SERVICE (CI has it)")
    (tmp_path / "enrollments.json").write_text(json.dumps(ENROLLMENTS))
    host, state = free_loopback((8883, 443)), tmp_path / "state.json"
    emulator = subprocess.Popen([sys.executable, "-m", "flasher", "simulate", "dps", "--enrollments",
                                 str(tmp_path / "enrollments.json"), "--host", host, "--websockets-only", "--state",
                                 str(state), "--cert-dir", str(tmp_path / "certs")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ca = emulator.stdout.readline().strip()
        assert ca.endswith("ca.pem"), emulator.stderr.read() if emulator.poll() is not None else ca
        sim = sim_boards(2, seed=1313)
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("FLASHER_GROUP_PRIMARY_KEY", GROUP_PRIMARY)
        for var in ("HTTPS_PROXY", "https_proxy", "FLASHER_PROXY_PASSWORD"):
            monkeypatch.delenv(var, raising=False)
        with HttpConnectProxy(free_loopback(0), username="bench", password=PASSWORD) as proxy:
            code, out, err = cli("-v", "provision", *(a for p in sim.ports for a in ("--port", p)), "--id-scope",
                                 ENROLLMENTS["id_scope"], "--dps-host", host, "--ca-cert", ca, "--model-id", THERMOSTAT,
                                 "--websockets", "--proxy",
                                 f"http://bench:{urllib.parse.quote(PASSWORD, safe='')}@{proxy.address}", "--json")
            tunnels = proxy.log()
        assert code == 0, err
        assert "warning: the password in --proxy is visible in the process list" in err
        assert len(tunnels) == 4 and {(t["target"], t["status"]) for t in tunnels} == {(f"{host}:443", "200")}
        emulator.send_signal(signal.SIGTERM)
        _, stderr = emulator.communicate(timeout=30)
        assert emulator.returncode == 0, stderr
        recorded = json.loads(state.read_text())
        assert recorded["endpoint"] is None and recorded["websocket_endpoint"] == f"wss://{host}:443/$iothub/websocket"
        reg_ids = sorted(json.loads(line)["registration_id"] for line in out.splitlines())
        assert sorted(r["registrationId"] for r in recorded["registrations"]) == reg_ids
        assert {(r["model_id"], r["transport"]) for r in recorded["registrations"]} == {(THERMOSTAT, "websocket")}
        assert {(d["model_id"], d["transport"]) for d in recorded["devices"]} == {(THERMOSTAT, "websocket")}
        assert_no_password(tmp_path, out + err + stderr)
    finally:
        if emulator.poll() is None:
            emulator.kill()
            emulator.wait(10)


@pytest.mark.parametrize("args, fragment", [
    (["--model-id", "dtmi:com:example:thermostat_;1"], "--model-id 'dtmi:com:example:thermostat_;1': not a valid DTMI: "
                                                       "path segment 'thermostat_'"),
    (["--proxy", "https://proxy.corp:3128"], "--proxy 'https://proxy.corp:3128': the scheme must be"),
    (["--payload-json", "{list}"], "must hold a JSON object"),
])
def test_provision_refuses_bad_azure_inputs_before_touching_a_board(bench, cli, args, fragment):
    folder, emu, proxy, sim = bench
    (folder / "list.json").write_text("[]")
    args = [str(folder / "list.json") if a == "{list}" else a for a in args]
    code, out, err = cli("provision", "--port", sim.ports[0], *args)
    assert (code, out) == (2, "") and err.count("\n") == 1 and fragment in err
    assert [b.commands for b in sim.boards] == [0, 0] and proxy.log() == []
    assert emu.state()["stats"]["register_requests"] == 0 and not (folder / "bench.sqlite3").exists()
