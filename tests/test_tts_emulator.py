"""The Things Stack emulator itself: raw HTTP requests, answered as lorawan-stack answers them.

These use http.client directly (not flasher.tts), so the emulator is checked against
the stack's documented behaviour, not against the adapter its authors wrote.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading

import pytest
from fixtures_tts import APP, OTHER_APP

IDS = {"device_id": "eui-2cf7f12024900138", "application_ids": {"application_id": APP},
       "dev_eui": "2CF7F12024900138", "join_eui": "70B3D57ED003F06A"}
DEV = IDS["device_id"]


def call(emu, method, path, body=None, key=None, query=""):
    ctx = ssl.create_default_context(cafile=str(emu.ca_cert_path))
    conn = http.client.HTTPSConnection("127.0.0.1", emu.port, context=ctx, timeout=10)
    try:
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        conn.request(method, f"/api/v3{path}{query}", json.dumps(body) if body is not None else None, headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}"), dict(resp.getheaders())
    finally:
        conn.close()


def put(server, body_fields, paths):
    return (f"/{server}/applications/{APP}/devices/{DEV}",
            {"end_device": {"ids": IDS, **body_fields}, "field_mask": {"paths": paths}})


def create(emu, key):
    return call(emu, "POST", f"/applications/{APP}/devices", {"end_device": {"ids": IDS}}, key)


def test_errors_have_the_stacks_shape(make_tts):
    emu = make_tts()
    key = emu.add_api_key(app=APP)
    assert create(emu, key)[0] == 200
    status, body, _ = create(emu, key)
    assert status == 409 and body["code"] == 6
    assert body["message"] == "error:pkg/util/store:id_taken (ID already taken, choose a different one and try again)"
    [detail] = body["details"]
    assert detail["@type"] == "type.googleapis.com/ttn.lorawan.v3.ErrorDetails"
    assert (detail["namespace"], detail["name"], detail["code"]) == ("pkg/util/store", "id_taken", 6)
    assert len(detail["correlation_id"]) == 32 and detail["message_format"]


def test_a_deveui_taken_anywhere_names_its_holder(make_tts):
    emu = make_tts()
    assert create(emu, emu.add_api_key(app=APP))[0] == 200
    other = {"end_device": {"ids": {**IDS, "device_id": "other", "application_ids": {"application_id": OTHER_APP}}}}
    status, body, _ = call(emu, "POST", f"/applications/{OTHER_APP}/devices", other, emu.add_api_key(app=OTHER_APP))
    assert status == 409 and body["details"][0]["name"] == "end_device_euis_taken"
    assert body["details"][0]["attributes"] == {"join_eui": "70B3D57ED003F06A", "dev_eui": "2CF7F12024900138",
                                                "device_id": DEV, "application_id": APP}


def test_rights_and_authentication(make_tts):
    emu = make_tts()
    key = emu.add_api_key(app=APP)
    # no key: the Identity Server sees no rights, the others an unauthenticated call
    status, body, _ = create(emu, None)
    assert (status, body["details"][0]["name"]) == (403, "no_application_rights")
    status, body, _ = call(emu, "PUT", *put("ns", {"frequency_plan_id": "EU_863_870_TTN"}, ["frequency_plan_id"]))
    assert (status, body["details"][0]["name"], body["code"]) == (401, "unauthenticated", 16)
    assert call(emu, "GET", f"/applications/{APP}/devices/{DEV}", key="not-a-token")[0] == 400
    parts = key.split(".")
    assert call(emu, "GET", f"/applications/{APP}/devices/{DEV}", key=f"NNSXS.{'B' * 39}.{parts[2]}")[1][
        "details"][0]["name"] == "api_key_not_found"
    assert call(emu, "GET", f"/applications/{APP}/devices/{DEV}", key=f"{parts[0]}.{parts[1]}.{'C' * 52}")[1][
        "details"][0]["name"] == "invalid_authorization"
    # an application key used on another application: no rights there (403, not 404)
    status, body, _ = call(emu, "GET", f"/applications/{OTHER_APP}/devices/{DEV}", key=key)
    assert (status, body["details"][0]["name"]) == (403, "no_application_rights")
    # writing keys needs WRITE_KEYS, reading them READ_KEYS; the error names what is missing
    weak = emu.add_api_key({APP: ["RIGHT_APPLICATION_DEVICES_READ", "RIGHT_APPLICATION_DEVICES_WRITE"]})
    status, body, _ = call(emu, "PUT", *put("js", {"root_keys": {"app_key": {"key": "2B7E151628AED2A6ABF7158809CF4F3C"}}},
                                            ["root_keys.app_key.key"]), key=weak)
    assert status == 403 and body["details"][0]["attributes"] == {"uid": APP,
                                                                  "missing": ["RIGHT_APPLICATION_DEVICES_WRITE_KEYS"]}
    assert call(emu, "PUT", *put("js", {"root_keys": {"app_key": {"key": "2B7E151628AED2A6ABF7158809CF4F3C"}}},
                                 ["root_keys.app_key.key"]), key=key)[0] == 200
    status, body, _ = call(emu, "GET", f"/js/applications/{APP}/devices/{DEV}", key=weak,
                           query="?field_mask=root_keys.app_key.key")
    assert status == 403 and body["details"][0]["attributes"]["missing"] == ["RIGHT_APPLICATION_DEVICES_READ_KEYS"]
    status, body, _ = call(emu, "GET", f"/js/applications/{APP}/devices/{DEV}", key=weak,
                           query="?field_mask=ids.dev_eui")
    assert status == 200 and "root_keys" not in body          # the key is never returned unless asked and allowed


def test_field_masks_are_enforced_and_honoured(make_tts):
    emu = make_tts()
    key = emu.add_api_key(app=APP)
    create(emu, key)
    status, body, _ = call(emu, "PUT", *put("ns", {"root_keys": {"app_key": {"key": "00" * 16}}},
                                            ["root_keys.app_key.key"]), key=key)
    assert status == 400 and body["details"][0]["name"] == "field_mask_paths"
    assert body["details"][0]["attributes"]["forbidden_paths"] == ["root_keys.app_key.key"]
    status, body, _ = call(emu, "GET", f"/as/applications/{APP}/devices/{DEV}", key=key,
                           query="?field_mask=frequency_plan_id")
    assert status == 400 and body["details"][0]["name"] == "field_mask_paths"
    # only the masked paths are stored: a value outside the mask is ignored
    status, body, _ = call(emu, "PUT", *put("ns", {"frequency_plan_id": "US_902_928_FSB_2", "lorawan_version": "1.0.2",
                                                   "lorawan_phy_version": "1.0.2-b", "supports_join": True,
                                                   "supports_class_c": True},
                                            ["frequency_plan_id", "lorawan_version", "lorawan_phy_version",
                                             "supports_join"]), key=key)
    assert status == 200 and body["lorawan_version"] == "MAC_V1_0_2"       # answered in canonical form
    assert body["lorawan_phy_version"] == "PHY_V1_0_2_REV_B" and "supports_class_c" not in emu.device(APP, DEV)["ns"]
    status, body, _ = call(emu, "GET", f"/ns/applications/{APP}/devices/{DEV}", key=key,
                           query="?field_mask=frequency_plan_id,supports_join")
    assert set(body) == {"ids", "created_at", "updated_at", "frequency_plan_id", "supports_join"}


def test_the_network_server_wants_a_known_plan_and_valid_versions(make_tts):
    emu = make_tts()
    key = emu.add_api_key(app=APP)
    good = {"frequency_plan_id": "EU_863_870_TTN", "lorawan_version": "MAC_V1_0_2",
            "lorawan_phy_version": "PHY_V1_0_2_REV_B", "supports_join": True}
    paths = sorted(good)
    status, body, _ = call(emu, "PUT", *put("ns", {k: v for k, v in good.items() if k != "frequency_plan_id"},
                                            [p for p in paths if p != "frequency_plan_id"]), key=key)
    assert (status, body["details"][0]["attributes"]) == (400, {"field": "frequency_plan_id"})
    status, body, _ = call(emu, "PUT", *put("ns", {**good, "frequency_plan_id": "EU_999"}, paths), key=key)
    assert (status, body["details"][0]["name"]) == (404, "not_found")
    status, body, _ = call(emu, "PUT", *put("ns", {**good, "lorawan_version": "2.0"}, paths), key=key)
    assert (status, body["details"][0]["attributes"]) == (400, {"field": "lorawan_version"})


def test_the_join_server_keys_devices_by_their_euis(make_tts):
    emu = make_tts()
    key = emu.add_api_key(app=APP)
    rk = {"root_keys": {"app_key": {"key": "2B7E151628AED2A6ABF7158809CF4F3C"}}}
    assert call(emu, "PUT", *put("js", rk, ["root_keys.app_key.key"]), key=key)[0] == 200
    path, body = put("js", rk, ["root_keys.app_key.key"])
    body["end_device"]["ids"] = {**IDS, "device_id": "twin"}
    status, out, _ = call(emu, "PUT", path.replace(DEV, "twin"), body, key=key)
    assert (status, out["details"][0]["name"]) == (409, "already_provisioned")
    path, body = put("js", {}, ["ids.dev_eui"])
    body["end_device"]["ids"] = {**IDS, "dev_eui": "2CF7F12024900139"}
    status, out, _ = call(emu, "PUT", path, body, key=key)
    assert (status, out["details"][0]["name"]) == (400, "read_only_field")
    status, out, _ = call(emu, "PUT", *put("js", {"root_keys": {"app_key": {"key": "00" * 16}}},
                                           ["root_keys.app_key.key"]), key=key)
    assert (status, out["details"][0]["name"]) == (400, "field_value")


def test_throttling_answers_like_the_rate_limiter(make_tts):
    emu = make_tts()
    emu.fail_next(1, 429, retry=3)
    status, body, headers = create(emu, emu.add_api_key(app=APP))
    assert status == 429 and body["details"][0]["name"] == "rate_limit_exceeded" and body["code"] == 8
    assert headers["X-Rate-Limit-Retry"] == "3" and headers["X-Rate-Limit-Available"] == "0"
    assert "Retry-After" not in headers
    assert call(emu, "GET", "/nope")[0] == 404


def test_state_never_shows_an_appkey_and_stop_leaves_nothing_behind(make_tts, tmp_path):
    before = set(threading.enumerate())
    emu = make_tts(state_file=tmp_path / "state.json")
    key = emu.add_api_key(app=APP)
    call(emu, "PUT", *put("js", {"root_keys": {"app_key": {"key": "2B7E151628AED2A6ABF7158809CF4F3C"}}},
                          ["root_keys.app_key.key"]), key=key)
    # an idle kept-alive connection, to be ended by stop()
    idle = socket.create_connection(("127.0.0.1", emu.port))
    text = json.dumps(emu.state()) + (tmp_path / "state.json").read_text()
    assert "2B7E151628AED2A6ABF7158809CF4F3C" not in text and key.split(".")[2] not in text
    assert emu.app_key(APP, DEV) == "2B7E151628AED2A6ABF7158809CF4F3C"
    port = emu.port
    emu.stop()
    idle.close()
    assert not [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    with pytest.raises(ConnectionRefusedError):   # nothing listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_flasher_simulate_tts_serves_until_sigterm(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FLASHER_")}, "XDG_CACHE_HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "flasher", "simulate", "tts", "--port", "0", "--app", APP,
                             "--cert-dir", str(tmp_path / "tts")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("https://127.0.0.1:")
        key_file = tmp_path / "tts" / "api-key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        (tmp_path / "appkey").write_text("2B7E151628AED2A6ABF7158809CF4F3C\n")
        reg = subprocess.run([sys.executable, "-m", "flasher", "tts", "register", "2CF7F12024900138",
                              "--app-key-source", "given", "--app-key-file", str(tmp_path / "appkey"),
                              "--tts-app", APP, "--tts-url", url, "--tts-ca-cert", str(tmp_path / "tts" / "ca.pem"),
                              "--tts-api-key-file", str(key_file), "--json"],
                             capture_output=True, text=True, env=env, timeout=60)
        assert reg.returncode == 0, reg.stderr
        assert json.loads(reg.stdout)["servers"] == ["is", "js", "ns", "as"]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "stopped" in err
        assert key_file.read_text().strip() not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("query", ["?field_mask=ids.dev_eui,ids.join_eui",
                                   "?field_mask.paths=ids.dev_eui&field_mask.paths=ids.join_eui"])
def test_get_field_masks_in_both_query_forms(make_tts, query):
    emu = make_tts()
    key = emu.add_api_key(app=APP)
    create(emu, key)
    status, body, _ = call(emu, "GET", f"/applications/{APP}/devices/{DEV}", key=key, query=query)
    assert status == 200 and body["ids"]["dev_eui"] == "2CF7F12024900138"
