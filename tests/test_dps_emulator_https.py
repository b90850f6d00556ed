"""DPS's HTTPS registration API on the emulator's 443 listener, with a plain HTTPS client.

What curl users and the Node and C SDKs' HTTP transports send: ``PUT /{idScope}/registrations/{id}/register``
and ``GET .../operations/{operationId}``, the SAS token in ``Authorization``. The same checks, knobs, records
and hub as MQTT; DPS's error bodies, status codes and ``Retry-After``.
"""

from __future__ import annotations

import json
import re

import pytest
from fixtures_dps import (
    DISABLED_ID,
    DISABLED_KEY,
    ENROLLMENTS,
    ID_SCOPE,
    INDIVIDUAL_ID,
    INDIVIDUAL_PRIMARY,
    DpsHttps,
    group_device_key,
    sas_token,
)

from flasher.dps import send_test_message
from flasher.errors import InputError
from flasher.sim.dps import INVALID_ID_ERROR, load_enrollments, valid_registration_id

ERROR_MEMBERS = {"errorCode", "trackingId", "message", "timestampUtc"}
STATE_MEMBERS = {"registrationId", "createdDateTimeUtc", "assignedHub", "deviceId", "status", "substatus",
                 "lastUpdatedDateTimeUtc", "etag"}


class StepClock:
    """The quota's clock, moved by the test: exact retry-after values whatever the machine's load."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def https(make_dps_emulator, tmp_path):
    emu = make_dps_emulator(websocket_port=0, state_file=tmp_path / "state.json")
    return emu, DpsHttps(emu)


def _state_file(emu) -> dict:
    return json.loads(emu.state_file.read_text())


def test_register_then_poll_until_assigned_and_the_hub_knows_the_device(https):
    emu, api = https
    rid, key = "2cf7f1202490aa01", group_device_key("2cf7f1202490aa01")
    status, headers, body = api.register(rid, key, payload={"modelId": "dtmi:com:example:Thermostat;1"})
    assert status == 202 and headers["retry-after"] == "3" and headers["content-type"].startswith("application/json")
    assert body["status"] == "assigning" and re.fullmatch(r"5\.[0-9a-f]{16}\.[0-9a-f-]{36}", body["operationId"])
    status, headers, body = api.status(rid, key, body["operationId"])
    assert status == 200 and body["status"] == "assigned"
    state = body["registrationState"]
    assert set(state) == STATE_MEMBERS
    assert (state["registrationId"], state["deviceId"], state["assignedHub"], state["substatus"]) == (
        rid, rid, emu.hub_name, "initialAssignment")
    record = _state_file(emu)["registrations"][0]
    assert record["transport"] == "https" and record["device_payload"] == {"modelId": "dtmi:com:example:Thermostat;1"}
    assert record["signed_with"] == "primary"
    # the same hub as MQTT: the real SDK connects as the device registered over HTTPS and sends a message
    send_test_message(rid, state["assignedHub"], key, ca_cert=emu.ca_cert_path, timeout=30, message="over https")
    assert [m["payload"] for m in emu.state()["messages"] if m["device_id"] == rid] == ["over https"]


def test_individual_enrollment_hands_back_its_payload(make_dps_emulator):
    enrollments = {**ENROLLMENTS, "individual": [
        {"registration_id": INDIVIDUAL_ID, "primary_key": INDIVIDUAL_PRIMARY, "return_payload": {"site": "B7"}}]}
    emu = make_dps_emulator(enrollments=enrollments, websocket_port=0)
    status, _, body = DpsHttps(emu).register_and_wait(INDIVIDUAL_ID, INDIVIDUAL_PRIMARY)
    assert status == 200 and body["registrationState"]["payload"] == {"site": "B7"}


def test_wrong_key_missing_token_and_unknown_scope_are_401_with_dps_error_bodies(https):
    emu, api = https
    rid = "2cf7f1202490aa02"
    status, headers, body = api.register(rid, group_device_key("someone-else"))
    assert status == 401 and set(body) == ERROR_MEMBERS and body["errorCode"] == 401002
    assert "retry-after" not in headers
    assert _state_file(emu)["stats"]["unauthorized"] == 1  # written before the answer went out
    status, _, body = api.register(rid, None)
    assert status == 401 and body["errorCode"] == 401002
    status, _, body = DpsHttps(emu, scope="0ne99999999").register(rid, group_device_key(rid))
    assert status == 401
    assert _state_file(emu)["stats"]["unauthorized"] == 3 and _state_file(emu)["registrations"] == []


def test_disabled_enrollment_answers_200_disabled(https):
    emu, api = https
    status, _, body = api.register(DISABLED_ID, DISABLED_KEY)
    assert status == 200 and body["status"] == "disabled" and body["registrationState"]["status"] == "disabled"


@pytest.mark.parametrize("rid", ["bad/slash", "with space", "x" * 129, "ends-with.", "caf\u00e9", "semi;colon"])
def test_invalid_registration_ids_get_400_before_any_key_is_checked(https, rid):
    emu, api = https
    assert not valid_registration_id(rid)
    status, _, body = api.register(rid, group_device_key(rid))  # a correctly derived key: not a key problem
    assert status == 400 and set(body) == ERROR_MEMBERS and body["errorCode"] == INVALID_ID_ERROR
    assert "registration id" in body["message"]
    stats = _state_file(emu)["stats"]
    assert stats["invalid_registration_ids"] == 1 and stats["unauthorized"] == 0
    assert emu.state()["registrations"] == []


@pytest.mark.parametrize("rid", ["a" * 128, "a-b.c_d:e", "ends-with-", "UPPER-lower-0009"])
def test_ids_at_the_edge_of_the_rules_are_accepted(https, rid):
    emu, api = https
    assert valid_registration_id(rid)
    status, _, body = api.register_and_wait(rid, group_device_key(rid))
    assert status == 200 and body["status"] == "assigned"


def test_registration_ids_are_case_insensitive(https):
    emu, api = https
    first, again = "Node-UPPER-0001", "node-upper-0001"
    assert api.register_and_wait(first, group_device_key(first))[0] == 200
    status, _, body = api.register_and_wait(again, group_device_key(again))
    assert status == 200 and body["registrationState"]["deviceId"] == first  # the same device, as first named
    state = _state_file(emu)
    assert len(state["registrations"]) == 1 and state["registrations"][0]["attempts"] == 2
    assert [d["device_id"] for d in state["devices"]] == [first]
    # an individual enrollment is found whatever the spelling of its id
    status, _, body = api.register_and_wait(INDIVIDUAL_ID.upper(), INDIVIDUAL_PRIMARY)
    assert status == 200 and body["registrationState"]["status"] == "assigned"
    assert _state_file(emu)["registrations"][-1]["enrollment"] == f"individual:{INDIVIDUAL_ID}"


def test_an_enrollment_can_make_registrations_fail(make_dps_emulator, tmp_path):
    enrollments = {**ENROLLMENTS, "individual": [
        {"registration_id": INDIVIDUAL_ID, "primary_key": INDIVIDUAL_PRIMARY, "allocation_error": 400209}]}
    emu = make_dps_emulator(enrollments=enrollments, websocket_port=0, state_file=tmp_path / "state.json")
    api = DpsHttps(emu)
    status, _, body = api.register_and_wait(INDIVIDUAL_ID, INDIVIDUAL_PRIMARY)
    assert status == 200 and body["status"] == "failed"
    state = body["registrationState"]
    assert state["status"] == "failed" and state["errorCode"] == 400209 and state["errorMessage"]
    assert "assignedHub" not in state and "deviceId" not in state
    assert _state_file(emu)["devices"] == [] and _state_file(emu)["registrations"][0]["status"] == "failed"
    emu.fail_allocation(INDIVIDUAL_ID, None)  # the webhook is fixed: the next attempt is assigned
    status, _, body = api.register_and_wait(INDIVIDUAL_ID, INDIVIDUAL_PRIMARY)
    assert status == 200 and body["status"] == "assigned" and "errorCode" not in body["registrationState"]
    emu.fail_allocation("fleet", 400208, "no hub")  # a group, with its own code and message
    rid = "2cf7f1202490aa03"
    status, _, body = api.register_and_wait(rid, group_device_key(rid))
    assert body["status"] == "failed" and body["registrationState"]["errorMessage"] == "no hub"


def test_registration_quota_exact_retry_after_over_https(make_dps_emulator, tmp_path):
    clock = StepClock(1000.0)
    emu = make_dps_emulator(websocket_port=0, registration_quota="2/min", clock=clock,
                            state_file=tmp_path / "state.json")
    api = DpsHttps(emu)
    ids = [f"2cf7f12024900{n:03d}" for n in range(6)]
    status, _, first = api.register(ids[0], group_device_key(ids[0]))
    assert status == 202
    clock.now = 1010.0
    assert api.register(ids[1], group_device_key(ids[1]))[0] == 202
    clock.now = 1020.0
    status, headers, body = api.register(ids[2], group_device_key(ids[2]))
    assert status == 429 and headers["retry-after"] == "40"  # the oldest (t=1000) leaves the window at 1060
    assert set(body) == ERROR_MEMBERS and body["errorCode"] == 429001
    assert body["message"] == "Operations are being throttled for this tenant."
    # operation status polls are not registrations: never counted, never refused by the quota
    for _ in range(3):
        assert api.status(ids[0], group_device_key(ids[0]), first["operationId"])[0] == 200
    clock.now = 1059.5
    status, headers, _ = api.register(ids[2], group_device_key(ids[2]))
    assert status == 429 and headers["retry-after"] == "1"  # ceil(0.5)
    clock.now = 1060.0  # t=1000 has left; the refused requests at 1020 and 1059.5 never counted
    assert api.register(ids[2], group_device_key(ids[2]))[0] == 202
    status, headers, _ = api.register(ids[3], group_device_key(ids[3]))
    assert status == 429 and headers["retry-after"] == "10"  # now t=1010 is the oldest
    stats = _state_file(emu)["stats"]
    assert stats["quota_throttled"] == 3 and stats["register_requests"] == 6 and stats["throttled"] == 0


def test_throttle_knob_over_https_and_the_quota_does_not_count_its_refusals(make_dps_emulator):
    clock = StepClock()
    emu = make_dps_emulator(websocket_port=0, registration_quota="1/s", clock=clock)
    api = DpsHttps(emu)
    emu.throttle(2, retry_after=7, status=503)
    rid = "2cf7f1202490aa04"
    for _ in range(2):
        status, headers, body = api.register(rid, group_device_key(rid))
        assert status == 503 and headers["retry-after"] == "7" and body["errorCode"] == 503001
    assert api.register(rid, group_device_key(rid))[0] == 202
    status, headers, _ = api.register(rid, group_device_key(rid))
    assert status == 429 and headers["retry-after"] == "1"


def test_wrong_method_unknown_operation_and_other_paths(https):
    emu, api = https
    rid, key = "2cf7f1202490aa05", group_device_key("2cf7f1202490aa05")
    status, headers, body = api.request("GET", api.path(rid, "register"), sas_token(f"{ID_SCOPE}/registrations/{rid}", key))
    assert status == 405 and headers["allow"] == "PUT" and set(body) == ERROR_MEMBERS
    status, _, body = api.status(rid, key, "5.0000000000000000.00000000-0000-0000-0000-000000000000")
    assert status == 404 and body["errorCode"] == 404201
    status, _, body = api.request("GET", "/somewhere/else")
    assert status == 404
    status, _, body = api.request("PUT", api.path(rid, "register"), sas_token(f"{ID_SCOPE}/registrations/{rid}", key),
                                  raw=b'{"registrationId": "' + rid.encode() + b'", "modelId": "dtmi:x;1"}')
    assert status == 400 and body["errorCode"] == 400012


def test_enrollment_files_are_checked_for_the_new_members():
    base = {"id_scope": ID_SCOPE, "groups": []}
    with pytest.raises(InputError, match="allocation_error"):
        load_enrollments({**base, "individual": [{"registration_id": "a", "primary_key": INDIVIDUAL_PRIMARY,
                                                  "allocation_error": "custom"}]})
    with pytest.raises(InputError, match="not a valid registration id"):
        load_enrollments({**base, "individual": [{"registration_id": "a b", "primary_key": INDIVIDUAL_PRIMARY}]})
    with pytest.raises(InputError, match="appears twice"):
        load_enrollments({**base, "individual": [{"registration_id": "Solo", "primary_key": INDIVIDUAL_PRIMARY},
                                                 {"registration_id": "solo", "primary_key": INDIVIDUAL_PRIMARY}]})
