"""IoT Central device templates: the model id (or any JSON object) in the DPS registration payload.

The real SDK sends ``{"registrationId", "payload"}``; the emulator records the payload, hands
back an enrollment's return payload in ``registrationState.payload``, and refuses a body DPS
cannot read (a ``modelId`` beside ``registrationId``) with 400 / errorCode 400012, checked
here with a plain paho client that sends exactly that.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import queue
import ssl
import time
import urllib.parse

import pytest
from fixtures_dps import ENROLLMENTS, GROUP_PRIMARY, ID_SCOPE, group_device_key

from flasher.dps import DpsError, register_device
from flasher.errors import InputError
from flasher.payload import read_payload_file, registration_payload, validate_model_id

THERMOSTAT = "dtmi:com:example:Thermostat;1"
RETURNED = {"iotcTemplate": "thermostat", "shelf": 7}


# --- the model id and the payload file, before anything is sent ---------------------------

@pytest.mark.parametrize("good", [THERMOSTAT, "dtmi:com:fabrikam:industrialProducts:airQualitySensor;12",
                                  "dtmi:a_b:c9;999999999", "dtmi:x;2.3"])
def test_valid_model_ids(good):
    assert validate_model_id(f" {good} ") == good


@pytest.mark.parametrize("bad, why", [
    ("", "empty"),
    ("DTMI:com:example:Thermostat;1", "must start with 'dtmi:'"),
    ("dtmi:com:example:Thermostat", "needs a version"),
    ("dtmi:com:example:Thermostat;0", "version '0'"),
    ("dtmi:com:example:Thermostat;01", "version '01'"),
    ("dtmi:com:example:Thermostat;1234567890", "version '1234567890'"),
    ("dtmi:com:9example:Thermostat;1", "path segment '9example'"),
    ("dtmi:com:example_:Thermostat;1", "path segment 'example_'"),
    ("dtmi:com::Thermostat;1", "empty path segment"),
    ("dtmi:com:exa-mple;1", "path segment 'exa-mple'"),
    ("dtmi:;1", "no path"),
    ("dtmi:" + "a" * 2050 + ";1", "longer than 2048"),
])
def test_invalid_model_ids_say_which_rule_they_break(bad, why):
    with pytest.raises(InputError) as info:
        validate_model_id(bad)
    assert why in str(info.value) and str(info.value).startswith("--model-id") and "\n" not in str(info.value)


def test_payload_files(tmp_path):
    good = tmp_path / "payload.json"
    good.write_text('\ufeff{"allocation": {"line": 3}}')  # a BOM, as Windows editors write
    assert read_payload_file(good) == {"allocation": {"line": 3}}
    for content, why in (("[1, 2]", "must hold a JSON object ({...}), not an array"), ('"text"', "not a string"),
                         ("{oops", "not JSON (line 1"), ("null", "not null")):
        (tmp_path / "bad.json").write_text(content)
        with pytest.raises(InputError, match=r"^--payload-json '.*bad\.json': ") as info:
            read_payload_file(tmp_path / "bad.json")
        assert why in str(info.value)
    with pytest.raises(InputError, match="no such file"):
        read_payload_file(tmp_path / "missing.json")


def test_model_id_goes_into_the_payload_and_must_agree_with_the_file():
    assert registration_payload(THERMOSTAT, None) == {"modelId": THERMOSTAT}
    assert registration_payload(THERMOSTAT, {"line": 3}) == {"line": 3, "modelId": THERMOSTAT}
    assert registration_payload(None, {"line": 3}) == {"line": 3}
    assert registration_payload(None, None) is None
    with pytest.raises(InputError, match="differ"):
        registration_payload(THERMOSTAT, {"modelId": "dtmi:other:Model;1"})


# --- the real SDK against the emulator ------------------------------------------------------

@pytest.fixture
def central(make_dps_emulator):
    """An emulator whose group hands back a payload, as an allocation webhook would."""
    enrollments = json.loads(json.dumps(ENROLLMENTS))
    enrollments["groups"][0]["return_payload"] = RETURNED
    return make_dps_emulator(enrollments=enrollments)


def test_the_model_id_reaches_dps_and_the_hub_and_the_returned_payload_comes_back(central):
    rid = "2cf7f120249c0001"
    reg = register_device(rid, group_device_key(rid), id_scope=ID_SCOPE, dps_host=central.host,
                          ca_cert=central.ca_cert_path, payload={"modelId": THERMOSTAT}, model_id=THERMOSTAT, timeout=30)
    assert reg.payload == RETURNED and reg.to_dict()["payload"] == RETURNED
    state = central.state()
    rec = next(r for r in state["registrations"] if r["registrationId"] == rid)
    assert rec["device_payload"] == {"modelId": THERMOSTAT} and rec["model_id"] == THERMOSTAT
    assert rec["payload"] == RETURNED
    device = next(d for d in state["devices"] if d["device_id"] == rid)
    assert device["model_id"] == THERMOSTAT  # the Plug and Play announcement in the hub CONNECT


def test_without_a_payload_nothing_is_sent_and_nothing_comes_back(dps_emulator, dps_target):
    rid = "2cf7f120249c0002"
    reg = register_device(rid, group_device_key(rid), test_message=None, timeout=30, **dps_target)
    assert reg.payload is None
    rec = next(r for r in dps_emulator.state()["registrations"] if r["registrationId"] == rid)
    assert rec["device_payload"] is None and rec["model_id"] is None and "payload" not in rec


def _sas(resource: str, key: str, ttl: int = 600) -> str:
    expiry = int(time.time()) + ttl
    sr = urllib.parse.quote(resource, safe="")
    sig = base64.b64encode(hmac.new(base64.b64decode(key), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()).decode()
    return f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig, safe='')}&se={expiry}"


def test_a_model_id_beside_the_registration_id_gets_400012_from_the_emulator(dps_emulator):
    """Exactly the request of MicrosoftDocs/azure-docs#66740, by a plain MQTT client."""
    import paho.mqtt.client as mqtt

    rid = "2cf7f120249c0003"
    answers: queue.Queue = queue.Queue()
    client = mqtt.Client(client_id=rid, protocol=mqtt.MQTTv311)
    client.username_pw_set(f"{ID_SCOPE}/registrations/{rid}/api-version=2019-03-31",
                           _sas(f"{ID_SCOPE}/registrations/{rid}", group_device_key(rid)))
    client.tls_set_context(ssl.create_default_context(cafile=str(dps_emulator.ca_cert_path)))
    client.on_message = lambda c, u, m: answers.put((m.topic, json.loads(m.payload)))
    client.on_connect = lambda c, u, f, rc: c.subscribe("$dps/registrations/res/#", qos=1)
    before = dps_emulator.state()["stats"]["bad_requests"]
    client.connect(dps_emulator.host, 8883)
    client.loop_start()
    try:
        time.sleep(0.3)  # the subscription is in place
        client.publish("$dps/registrations/PUT/iotdps-register/?$rid=1",
                       json.dumps({"registrationId": rid, "modelId": THERMOSTAT}), qos=1)
        topic, body = answers.get(timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()
    assert topic.startswith("$dps/registrations/res/400/?$rid=1")
    assert body["errorCode"] == 400012 and body["message"] == "Deserialization error."
    assert dps_emulator.state()["stats"]["bad_requests"] == before + 1
    assert rid not in {r["registrationId"] for r in dps_emulator.state()["registrations"]}


def test_flasher_names_dps_error_code_when_the_body_is_refused(dps_emulator, dps_target, monkeypatch):
    """If the SDK (or a fork of it) put modelId at the top, flasher's error would carry DPS's errorCode."""
    from azure.iot.device.provisioning.pipeline import pipeline_stages_provisioning as stages

    def top_level(self):  # the mistake azure-docs#66740 describes
        return json.dumps({"registrationId": self.registrationId, "modelId": THERMOSTAT})

    monkeypatch.setattr(stages.DeviceRegistrationPayload, "get_json_string", top_level)
    with pytest.raises(DpsError) as info:
        register_device("2cf7f120249c0004", group_device_key("2cf7f120249c0004"), timeout=30, **dps_target)
    assert info.value.kind == "bad_request"
    assert "(400) (errorCode 400012: Deserialization error.)" in str(info.value)


# --- the commands ------------------------------------------------------------------------------

def test_register_json_shows_the_returned_payload(cli, central, monkeypatch):
    monkeypatch.setenv("FLASHER_GROUP_PRIMARY_KEY", GROUP_PRIMARY)
    code, out, err = cli("register", "2cf7f120249c0005", "--id-scope", ID_SCOPE, "--dps-host", central.host,
                         "--ca-cert", central.ca_cert_path, "--model-id", THERMOSTAT, "--json")
    assert code == 0, err
    assert json.loads(out)["payload"] == RETURNED
    rec = next(r for r in central.state()["registrations"] if r["registrationId"] == "2cf7f120249c0005")
    assert rec["model_id"] == THERMOSTAT


@pytest.mark.parametrize("args, fragment", [
    (["--model-id", "dtmi:com:example:Thermostat"], "--model-id 'dtmi:com:example:Thermostat': not a valid DTMI: needs a"),
    (["--payload-json", "{list}"], "must hold a JSON object ({...}), not an array"),
    (["--payload-json", "{missing}"], "no such file"),
    (["--model-id", THERMOSTAT, "--payload-json", "{other}"], "differ"),
])
def test_bad_payload_inputs_are_one_line_and_exit_2_before_anything_is_sent(cli, dps_emulator, tmp_path, monkeypatch,
                                                                             args, fragment):
    monkeypatch.setenv("FLASHER_GROUP_PRIMARY_KEY", GROUP_PRIMARY)
    files = {"{list}": "[1]", "{other}": '{"modelId": "dtmi:other:Model;1"}'}
    for name, content in files.items():
        (tmp_path / f"{name[1:-1]}.json").write_text(content)
    args = [str(tmp_path / f"{a[1:-1]}.json") if a.startswith("{") else a for a in args]
    before = dps_emulator.state()["stats"]
    code, out, err = cli("register", "2cf7f120249c0006", "--id-scope", ID_SCOPE, "--dps-host", dps_emulator.host,
                         "--ca-cert", dps_emulator.ca_cert_path, *args)
    assert (code, out) == (2, "")
    assert err.startswith("error: ") and fragment in err and err.count("\n") == 1
    assert dps_emulator.state()["stats"] == before  # nothing reached DPS
