"""Issue 17 over MQTT: the real azure-iot-device SDK and a plain paho client against the emulator.

Invalid and differently spelled registration ids, failed allocations, the registration quota (exact
retry-after in the topic; the SDK waiting it out), the twin (GET and reported PATCH through the SDK), and a
state file that is current the moment an answer arrives.
"""

from __future__ import annotations

import json
import threading

import pytest
from fixtures_dps import (
    ENROLLMENTS,
    ID_SCOPE,
    INDIVIDUAL_ID,
    INDIVIDUAL_PRIMARY,
    MqttClient,
    dps_answer,
    dps_mqtt,
    group_device_key,
    sas_token,
    wait_for,
)

from flasher.dps import DpsError, register_device
from flasher.sim.dps import INVALID_ID_ERROR

REGISTER = "$dps/registrations/PUT/iotdps-register/?$rid={}"
STATUS = "$dps/registrations/GET/iotdps-get-operationstatus/?$rid={}&operationId={}"



class StepClock:
    def __init__(self, now: float = 5000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _register_raw(emu, rid: str, key: str | None, n: int = 1, password: str | None = None):
    with dps_mqtt(emu, rid, key, password) as c:
        assert c.wait_connack() == 0
        c.subscribe("$dps/registrations/res/#")
        return dps_answer(*c.ask(REGISTER.format(n), json.dumps({"registrationId": rid}).encode()))


@pytest.mark.parametrize("rid", ["bad/slash", "with space", "y" * 129])
def test_invalid_ids_over_mqtt_get_400_not_a_misleading_401(make_dps_emulator, rid):
    emu = make_dps_emulator()
    status, _, body = _register_raw(emu, rid, group_device_key(rid))
    assert status == 400 and body["errorCode"] == INVALID_ID_ERROR
    stats = emu.state()["stats"]
    assert stats["invalid_registration_ids"] == 1 and stats["unauthorized"] == 0


def sdk_register(emu, rid: str, key: str):
    """The SDK's own ProvisioningDeviceClient, without flasher's checks of the id (flasher refuses such ids)."""
    from azure.iot.device import ProvisioningDeviceClient

    from flasher.dps import _dispose_provisioning

    client = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=emu.host, registration_id=rid, id_scope=ID_SCOPE, symmetric_key=key,
        server_verification_cert=emu.ca_cert_path.read_text())
    try:
        return client.register()
    finally:
        _dispose_provisioning(client, [], f"test {rid}")


def _causes(exc: BaseException) -> str:
    out = []
    while exc is not None:
        out.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return " | ".join(out)


def test_the_sdk_gets_the_invalid_id_error(make_dps_emulator):
    from azure.iot.device.exceptions import ClientError

    emu = make_dps_emulator()
    rid = "has space 01"
    with pytest.raises(ClientError) as info:
        sdk_register(emu, rid, group_device_key(rid))
    assert "400" in _causes(info.value)
    assert emu.state()["stats"]["invalid_registration_ids"] == 1 and emu.state()["registrations"] == []


def test_two_spellings_of_one_id_are_one_device_with_the_sdk(make_dps_emulator):
    emu = make_dps_emulator()
    for rid in ("Node-UPPER-0001", "node-upper-0001"):
        result = sdk_register(emu, rid, group_device_key(rid))
        assert result.status == "assigned" and result.registration_state.device_id == "Node-UPPER-0001"
    state = emu.state()
    assert len(state["registrations"]) == 1 and len(state["devices"]) == 1


def test_registration_quota_exact_retry_after_over_mqtt(make_dps_emulator):
    clock = StepClock()
    emu = make_dps_emulator(registration_quota="1/min", clock=clock)
    rid, key = "2cf7f1202490bb01", group_device_key("2cf7f1202490bb01")
    with dps_mqtt(emu, rid, key) as c:
        assert c.wait_connack() == 0
        c.subscribe("$dps/registrations/res/#")
        status, params, accepted = dps_answer(*c.ask(REGISTER.format(1), json.dumps({"registrationId": rid}).encode()))
        assert status == 202 and params["retry-after"] == "3"
        clock.now += 12.25
        status, params, body = dps_answer(*c.ask(REGISTER.format(2), json.dumps({"registrationId": rid}).encode()))
        assert (status, params["$rid"], params["retry-after"]) == (429, "2", "48")  # ceil(60 - 12.25)
        assert body["errorCode"] == 429001 and body["message"] == "Operations are being throttled for this tenant."
        status, _, _ = dps_answer(*c.ask(STATUS.format(3, accepted["operationId"])))
        assert status == 200  # a poll is not a registration
        clock.now += 47.75
        status, _, _ = dps_answer(*c.ask(REGISTER.format(4), json.dumps({"registrationId": rid}).encode()))
        assert status == 202
    assert emu.state()["stats"]["quota_throttled"] == 1


def test_the_sdk_waits_out_the_quota(make_dps_emulator):
    clock = StepClock()
    emu = make_dps_emulator(registration_quota="1/s", clock=clock)
    first = "2cf7f1202490bb02"
    reg = register_device(first, group_device_key(first), id_scope=ID_SCOPE, dps_host=emu.host,
                          ca_cert=emu.ca_cert_path, test_message=None, timeout=30)
    assert reg.status == "assigned"
    second, phases, out = "2cf7f1202490bb03", [], []

    def run() -> None:
        try:
            out.append(register_device(second, group_device_key(second), id_scope=ID_SCOPE, dps_host=emu.host,
                                       ca_cert=emu.ca_cert_path, test_message=None, timeout=60,
                                       on_phase=phases.append))
        except DpsError as exc:
            out.append(exc)

    t = threading.Thread(target=run)
    t.start()
    try:
        # the clock stands still: the second registration is refused until the test moves it on
        assert wait_for(lambda: emu.state()["stats"]["quota_throttled"] >= 1, timeout=30.0)
    finally:
        clock.now += 1.0  # the first one leaves the window: the SDK's retry after retry-after=1 is accepted
        t.join(90)
    assert not t.is_alive()
    assert out and not isinstance(out[0], Exception), out
    assert out[0].status == "assigned" and "throttled" in phases


def test_a_failed_allocation_reaches_the_sdk(make_dps_emulator):
    enrollments = {**ENROLLMENTS, "individual": [
        {"registration_id": INDIVIDUAL_ID, "primary_key": INDIVIDUAL_PRIMARY, "allocation_error": 400209,
         "allocation_message": "Custom allocation webhook answered 500."}]}
    emu = make_dps_emulator(enrollments=enrollments)
    with pytest.raises(DpsError):
        register_device(INDIVIDUAL_ID, INDIVIDUAL_PRIMARY, id_scope=ID_SCOPE, dps_host=emu.host,
                        ca_cert=emu.ca_cert_path, test_message=None, timeout=30)
    record = emu.state()["registrations"][0]
    assert record["status"] == "failed" and record["errorCode"] == 400209
    assert emu.state()["devices"] == []


def test_twin_get_and_reported_patch_with_the_sdk(make_dps_emulator):
    from azure.iot.device import IoTHubDeviceClient

    emu = make_dps_emulator()
    rid, key = "2cf7f1202490bb04", group_device_key("2cf7f1202490bb04")
    reg = register_device(rid, key, id_scope=ID_SCOPE, dps_host=emu.host, ca_cert=emu.ca_cert_path,
                          test_message=None, timeout=30)
    client = IoTHubDeviceClient.create_from_symmetric_key(key, reg.assigned_hub, reg.device_id,
                                                          server_verification_cert=emu.ca_cert_path.read_text(),
                                                          connection_retry=False)
    try:
        client.connect()
        twin = client.get_twin()
        assert twin == {"desired": {"$version": 1}, "reported": {"$version": 1}}
        client.patch_twin_reported_properties({"firmware": {"version": "1.2.0"}, "battery": 87})
        client.patch_twin_reported_properties({"battery": None, "firmware": {"channel": "beta"}})  # merge patch
        twin = client.get_twin()
        assert twin["reported"] == {"firmware": {"version": "1.2.0", "channel": "beta"}, "$version": 3}
    finally:
        client.shutdown()
    assert emu.state()["twins"][rid] == {"reported": {"firmware": {"version": "1.2.0", "channel": "beta"}},
                                         "version": 3}
    assert emu.state()["stats"]["twin_requests"] == 4


def test_state_file_is_current_when_the_answer_arrives(make_dps_emulator, tmp_path):
    state_file = tmp_path / "state.json"
    emu = make_dps_emulator(state_file=state_file)
    rid, key = "2cf7f1202490bb05", group_device_key("2cf7f1202490bb05")
    register_device(rid, key, id_scope=ID_SCOPE, dps_host=emu.host, ca_cert=emu.ca_cert_path, test_message=None,
                    timeout=30)
    for n in (1, 2):  # two refused hub connections: a wrong key, then a device that does not exist
        device = rid if n == 1 else "no-such-device"
        token = sas_token(f"{emu.hub_name}/devices/{device}", group_device_key("wrong"))
        with MqttClient(emu, device, f"{emu.hub_name}/{device}/?api-version=2021-04-12", token) as c:
            assert c.wait_connack() == 5
        assert json.loads(state_file.read_text())["stats"]["hub_refused"] == n
    status, _, _ = _register_raw(emu, rid, None, password=sas_token(f"{ID_SCOPE}/registrations/{rid}",
                                                                      group_device_key("wrong")))
    assert status == 401 and json.loads(state_file.read_text())["stats"]["unauthorized"] == 1
    status, _, _ = _register_raw(emu, "a b", None, password="x")
    assert status == 400 and json.loads(state_file.read_text())["stats"]["invalid_registration_ids"] == 1


def test_one_quota_for_every_transport(make_dps_emulator):
    """A registration over WebSockets (the SDK) and one over MQTT (paho) fill the quota; HTTPS then gets 429."""
    from fixtures_dps import DpsHttps

    from flasher.dps import Transport

    clock = StepClock()
    emu = make_dps_emulator(websocket_port=443, registration_quota="2/h", clock=clock)
    ws = "2cf7f1202490bb06"
    reg = register_device(ws, group_device_key(ws), id_scope=ID_SCOPE, dps_host=emu.host, ca_cert=emu.ca_cert_path,
                          transport=Transport(websockets=True), test_message=None, timeout=30)
    assert reg.status == "assigned"
    clock.now += 100.0
    status, _, _ = _register_raw(emu, "2cf7f1202490bb07", group_device_key("2cf7f1202490bb07"))
    assert status == 202
    clock.now += 0.5
    status, headers, body = DpsHttps(emu).register("2cf7f1202490bb08", group_device_key("2cf7f1202490bb08"))
    assert status == 429 and headers["retry-after"] == "3500" and body["errorCode"] == 429001  # ceil(3600 - 100.5)
    transports = {r["registrationId"]: r["transport"] for r in emu.state()["registrations"]}
    assert transports == {ws: "websocket"}  # the paho client asked once and never polled
    assert emu.state()["stats"]["quota_throttled"] == 1
