"""A second, independent client: Microsoft's Node.js SDK against the emulator (issue 17).

The provisioning SDK's MQTT (8883) and HTTP (443) transports register group and individual enrollments,
with a payload, a wrong key, a disabled enrollment and a failed allocation; the device SDK's MQTT client
sends a message and reads and patches its twin. The packages are the pinned ones of tests/node/package.json
and its lockfile, installed with ``npm ci`` into a cache folder outside the checkout (once per lockfile).
Without node/npm or the npm registry the tests skip, unless FLASHER_REQUIRE_NODE=1 (CI) makes that a failure.
The emulator's CA reaches Node through NODE_EXTRA_CA_CERTS, as a developer's would.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from fixtures_dps import (
    DISABLED_ID,
    DISABLED_KEY,
    ENROLLMENTS,
    GROUP_NAME,
    ID_SCOPE,
    INDIVIDUAL_ID,
    INDIVIDUAL_PRIMARY,
    DpsHttps,
    group_device_key,
)

NODE_DIR = Path(__file__).resolve().parent / "node"
NETWORK_ERRORS = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "ENETUNREACH",
                  "network", "getaddrinfo", "socket hang up")
RUN_TIMEOUT = 90  # one node process; the kill on expiry is subprocess.run's, of that process only


def _unavailable(why: str):
    if os.environ.get("FLASHER_REQUIRE_NODE") == "1":
        pytest.fail(f"FLASHER_REQUIRE_NODE=1 but {why}")
    pytest.skip(why)


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flasher" / "node-compat"


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """``npm ci`` of tests/node into ~/.cache/flasher/node-compat/<lockfile hash>, once (a lock keeps two
    test workers from installing at the same time)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        _unavailable("node and npm are needed for the Node.js SDK compatibility test (apt-get install nodejs npm)")
    lock = (NODE_DIR / "package-lock.json").read_bytes()
    digest = hashlib.sha256(lock + (NODE_DIR / "package.json").read_bytes()).hexdigest()[:16]
    target = _cache_root() / digest
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{digest}.lock", "w") as lockfile:
        fcntl.flock(lockfile, fcntl.LOCK_EX)
        try:
            if not (target / "installed").exists():
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir()
                for name in ("package.json", "package-lock.json"):
                    shutil.copy(NODE_DIR / name, target / name)
                try:
                    p = subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error",
                                        "--fetch-retries=1", "--fetch-retry-maxtimeout=10000"],
                                       cwd=target, capture_output=True, text=True, timeout=300)
                except subprocess.TimeoutExpired:
                    _unavailable("npm ci did not finish within 300 s (is the npm registry reachable?)")
                if p.returncode != 0:
                    out = p.stdout + p.stderr
                    why = [line for line in out.splitlines() if any(e in line for e in NETWORK_ERRORS)]
                    if why:
                        _unavailable(f"the npm registry is unreachable: {why[0].strip()[:200]}")
                    pytest.fail(f"npm ci failed ({p.returncode}):\n{out[-2000:]}")
                (target / "installed").write_text(digest + "\n")
        finally:
            fcntl.flock(lockfile, fcntl.LOCK_UN)
    return target / "node_modules"


def run_node(node_modules: Path, script: str, data: dict, emu, tmp_path: Path) -> dict | list:
    args = tmp_path / f"{script}.json"
    args.write_text(json.dumps(data))
    env = {**os.environ, "NODE_PATH": str(node_modules), "NODE_EXTRA_CA_CERTS": str(emu.ca_cert_path)}
    env.pop("DEBUG", None)
    p = subprocess.run([shutil.which("node") or "node", str(NODE_DIR / script), str(args)], capture_output=True,
                       text=True, timeout=RUN_TIMEOUT, env=env, cwd=tmp_path)
    lines = [line for line in p.stdout.splitlines() if line.startswith(("{", "["))]
    assert lines, f"{script} printed no result (exit {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    return json.loads(lines[-1])


ENROLLMENTS_NODE = {
    "id_scope": ID_SCOPE,
    "groups": [{**ENROLLMENTS["groups"][0], "return_payload": {"template": "thermostat"}}],
    "individual": [
        *ENROLLMENTS["individual"],
        {"registration_id": "node-failing-01", "primary_key": INDIVIDUAL_PRIMARY, "allocation_error": 400209},
    ],
}


@pytest.fixture
def emulator_443(make_dps_emulator, tmp_path):
    """8883 and 443: the ports the Node transports dial (the HTTP transport has no port option)."""
    return make_dps_emulator(enrollments=ENROLLMENTS_NODE, websocket_port=443, state_file=tmp_path / "state.json")


def test_node_provisioning_mqtt_and_http_transports(node_modules, emulator_443, tmp_path):
    emu = emulator_443
    payload = {"modelId": "dtmi:com:example:Thermostat;1"}
    regs = [
        {"name": "mqtt-group", "transport": "mqtt", "registrationId": "node-mqtt-group-01", "payload": payload},
        {"name": "http-group", "transport": "http", "registrationId": "node-http-group-01", "payload": payload},
        {"name": "mqtt-individual", "transport": "mqtt", "registrationId": INDIVIDUAL_ID, "key": INDIVIDUAL_PRIMARY},
        {"name": "http-individual", "transport": "http", "registrationId": INDIVIDUAL_ID, "key": INDIVIDUAL_PRIMARY},
        {"name": "mqtt-wrong-key", "transport": "mqtt", "registrationId": "node-wrong-01",
         "key": group_device_key("someone-else")},
        {"name": "http-wrong-key", "transport": "http", "registrationId": "node-wrong-02",
         "key": group_device_key("someone-else")},
        {"name": "http-disabled", "transport": "http", "registrationId": DISABLED_ID, "key": DISABLED_KEY},
        {"name": "mqtt-failed", "transport": "mqtt", "registrationId": "node-failing-01", "key": INDIVIDUAL_PRIMARY},
    ]
    for r in regs:
        r.setdefault("key", group_device_key(r["registrationId"]))
    results = {r["name"]: r for r in run_node(node_modules, "register.js",
                                               {"host": emu.host, "idScope": ID_SCOPE, "registrations": regs},
                                               emu, tmp_path)}
    assert set(results) == {r["name"] for r in regs}
    for name in ("mqtt-group", "http-group"):
        assert results[name]["ok"], results[name]
        state = results[name]["state"]
        assert state["status"] == "assigned" and state["assignedHub"] == emu.hub_name
        assert state["payload"] == {"template": "thermostat"}  # the group's return_payload, handed back
    for name in ("mqtt-individual", "http-individual"):
        assert results[name]["ok"] and results[name]["state"]["deviceId"] == INDIVIDUAL_ID, results[name]
    for name in ("mqtt-wrong-key", "http-wrong-key"):
        assert not results[name]["ok"] and results[name]["error"] == "UnauthorizedError", results[name]
        assert results[name]["errorCode"] == 401002
    assert not results["http-disabled"]["ok"] and "disabled" in results["http-disabled"]["message"]
    failed = results["mqtt-failed"]
    assert (failed["error"], failed["errorCode"]) == ("ProvisioningRegistrationFailedError", 400209), failed
    records = {r["registrationId"]: r for r in json.loads(emu.state_file.read_text())["registrations"]}
    assert records["node-mqtt-group-01"]["transport"] == "mqtt"
    assert records["node-http-group-01"]["transport"] == "https"
    assert records["node-http-group-01"]["device_payload"] == payload
    assert records[INDIVIDUAL_ID]["attempts"] == 2  # once over MQTT, once over HTTPS
    assert records["node-failing-01"]["status"] == "failed"
    assert "node-wrong-01" not in records and json.loads(emu.state_file.read_text())["stats"]["unauthorized"] == 2
    assert f"group:{GROUP_NAME}" == records["node-mqtt-group-01"]["enrollment"]


def test_node_device_client_message_and_twin(node_modules, emulator_443, tmp_path):
    emu = emulator_443
    rid = "node-device-01"
    status, _, body = DpsHttps(emu).register_and_wait(rid, group_device_key(rid))
    assert status == 200, body
    out = run_node(node_modules, "device.js", {"hub": body["registrationState"]["assignedHub"], "deviceId": rid,
                                               "key": group_device_key(rid), "message": "hello from node",
                                               "reported": {"firmware": "1.4.2"}}, emu, tmp_path)
    assert out.get("sent"), out
    assert out["twinBefore"]["desired"] == {"$version": 1} and out["twinBefore"]["reported"] == {"$version": 1}
    assert out["twinAfter"]["reported"] == {"firmware": "1.4.2", "$version": 2}
    state = json.loads(emu.state_file.read_text())
    assert [m["payload"] for m in state["messages"] if m["device_id"] == rid] == ["hello from node"]
    assert state["twins"][rid]["reported"] == {"firmware": "1.4.2"}
    assert state["devices"][0]["transport"] == "mqtt" and state["devices"][0]["connection_count"] == 1
