"""The real azure-iot-device SDK against the local emulator, over TLS on loopback."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fixtures_dps import (
    DISABLED_ID,
    DISABLED_KEY,
    ID_SCOPE,
    INDIVIDUAL_ID,
    INDIVIDUAL_PRIMARY,
    INDIVIDUAL_SECONDARY,
    group_device_key,
    leftover_threads,
    wait_for,
)

from flasher import dps
from flasher.dps import DpsError, Registration, register_device, validate_id_scope
from flasher.errors import InputError
from flasher.sim import certs
from flasher.sim.dps import check_sas, load_enrollments


def _messages(emu, device_id):
    return [m for m in emu.state()["messages"] if m["device_id"] == device_id]


# --- success paths --------------------------------------------------------------------

def test_group_enrollment_registers_and_records_the_test_message(dps_emulator, dps_target):
    phases = []
    reg = register_device("2cf7f12024900138", group_device_key("2cf7f12024900138"), on_phase=phases.append,
                          timeout=30, **dps_target)
    assert isinstance(reg, Registration)
    assert (reg.registration_id, reg.device_id, reg.assigned_hub, reg.status) == \
           ("2cf7f12024900138", "2cf7f12024900138", dps_emulator.host, "assigned")
    assert reg.substatus == "initialAssignment"
    assert set(reg.timings) == {"register", "connect", "message"}
    assert phases[0] == "register" and phases[-2:] == ["connect", "message"]
    d = reg.to_dict()
    assert json.loads(json.dumps(d))["assigned_hub"] == dps_emulator.host
    msgs = _messages(dps_emulator, "2cf7f12024900138")
    assert [m["payload"] for m in msgs] == ["TestMessage"]
    state = dps_emulator.state()
    rec = next(r for r in state["registrations"] if r["registrationId"] == "2cf7f12024900138")
    assert rec["enrollment"] == "group:fleet" and rec["status"] == "assigned"
    assert rec["assignedHub"] == dps_emulator.host and rec["deviceId"] == "2cf7f12024900138"


def test_individual_enrollment_with_secondary_key_and_no_message(dps_emulator, dps_target):
    reg = register_device(INDIVIDUAL_ID, INDIVIDUAL_SECONDARY, test_message=None, timeout=30, **dps_target)
    assert reg.device_id == INDIVIDUAL_ID and reg.status == "assigned"
    assert set(reg.timings) == {"register"}
    assert _messages(dps_emulator, INDIVIDUAL_ID) == []
    rec = next(r for r in dps_emulator.state()["registrations"] if r["registrationId"] == INDIVIDUAL_ID)
    assert rec["enrollment"] == f"individual:{INDIVIDUAL_ID}"


def test_twenty_concurrent_registrations(dps_emulator, dps_target):
    ids = [f"c0ffee00000000{n:02x}" for n in range(20)]
    with ThreadPoolExecutor(20) as pool:
        regs = list(pool.map(lambda r: register_device(r, group_device_key(r), timeout=60, **dps_target), ids))
    assert [r.device_id for r in regs] == ids
    received = {m["device_id"] for m in dps_emulator.state()["messages"]}
    assert set(ids) <= received
    assert wait_for(lambda: not dps_emulator.connections())


def test_throttled_then_succeeding(make_dps_emulator):
    emu = make_dps_emulator()
    emu.throttle(2, retry_after=1)
    phases = []
    reg = register_device("00000000000000aa", group_device_key("00000000000000aa"), id_scope=ID_SCOPE,
                          dps_host=emu.host, ca_cert=emu.ca_cert_path, test_message=None, timeout=30,
                          on_phase=phases.append)
    assert reg.status == "assigned"
    assert phases.count("throttled") == 2
    assert emu.state()["stats"]["throttled"] == 2


# --- failures: one kind each, a one-line message naming the id and host ----------------

def _fails(kind, *args, **kwargs) -> DpsError:
    with pytest.raises(DpsError) as info:
        register_device(*args, **kwargs)
    exc = info.value
    assert exc.kind == kind, str(exc)
    assert "\n" not in str(exc) and "Unexpected failure" not in str(exc)
    assert repr(args[0]) in str(exc)
    return exc


def test_wrong_key_is_unauthorized(dps_target, dps_emulator):
    exc = _fails("unauthorized", "2cf7f12024900138", INDIVIDUAL_PRIMARY, **dps_target)
    assert dps_emulator.host in str(exc) and "401" in str(exc)
    # an individual enrollment wins over the group: a group-derived key is refused for it
    _fails("unauthorized", INDIVIDUAL_ID, group_device_key(INDIVIDUAL_ID), **dps_target)


def test_unknown_scope(dps_target):
    _fails("not_found", INDIVIDUAL_ID, INDIVIDUAL_PRIMARY, **{**dps_target, "id_scope": "0ne0000FFFF"})


def test_disabled_enrollment(dps_target, dps_emulator):
    exc = _fails("disabled", DISABLED_ID, DISABLED_KEY, **dps_target)
    assert "disabled" in str(exc)
    rec = next(r for r in dps_emulator.state()["registrations"] if r["registrationId"] == DISABLED_ID)
    assert rec["status"] == "disabled"


def test_throttled_beyond_the_bound(make_dps_emulator):
    emu = make_dps_emulator()
    emu.throttle(100, retry_after=1)
    exc = _fails("throttled", "00000000000000bb", group_device_key("00000000000000bb"), id_scope=ID_SCOPE,
                 dps_host=emu.host, ca_cert=emu.ca_cert_path, throttle_retries=1, timeout=30)
    assert "429" in str(exc)
    assert emu.state()["stats"]["throttled"] == 2  # the first answer and one retry
    assert wait_for(lambda: not emu.connections())


def test_unreachable_host(dps_target):
    from fixtures_dps import free_loopback

    _fails("unreachable", INDIVIDUAL_ID, INDIVIDUAL_PRIMARY, **{**dps_target, "dps_host": free_loopback()})


def test_tls_failure_with_the_wrong_ca(dps_target, tmp_path):
    other_ca = certs.make_ca(tmp_path / "other")
    exc = _fails("tls", INDIVIDUAL_ID, INDIVIDUAL_PRIMARY, **{**dps_target, "ca_cert": str(other_ca)})
    assert "certificate" in str(exc).lower()


def test_timeout_while_assigning(make_dps_emulator):
    emu = make_dps_emulator(assign_delay=60)
    baseline = set(threading.enumerate())
    _fails("timeout", "00000000000000cc", group_device_key("00000000000000cc"), id_scope=ID_SCOPE,
           dps_host=emu.host, ca_cert=emu.ca_cert_path, timeout=3)
    assert leftover_threads(baseline) == []
    assert wait_for(lambda: not emu.connections())


def test_hub_refusing_the_device(make_dps_emulator):
    emu = make_dps_emulator()
    emu.refuse_hub("00000000000000dd")
    exc = _fails("hub_refused", "00000000000000dd", group_device_key("00000000000000dd"), id_scope=ID_SCOPE,
                 dps_host=emu.host, ca_cert=emu.ca_cert_path, timeout=30)
    assert "hub" in str(exc)
    assert emu.state()["stats"]["hub_refused"] >= 1 and emu.state()["messages"] == []


def test_failures_leave_no_thread_or_connection_behind(dps_target, dps_emulator, tmp_path):
    from fixtures_dps import free_loopback

    baseline = set(threading.enumerate())
    bad = [("unauthorized", {}), ("not_found", {"id_scope": "0ne0000FFFF"}), ("unreachable", {"dps_host": free_loopback()}),
           ("tls", {"ca_cert": str(certs.make_ca(tmp_path / "x"))})]
    for kind, override in bad:
        _fails(kind, "2cf7f12024900138", INDIVIDUAL_PRIMARY, **{**dps_target, **override})
    _fails("disabled", DISABLED_ID, DISABLED_KEY, **dps_target)
    # a joined thread may take a moment to leave threading.enumerate(); a leaked one never does
    assert wait_for(lambda: not leftover_threads(baseline)), leftover_threads(baseline)
    assert wait_for(lambda: not dps_emulator.connections()), dps_emulator.connections()
    assert dps._CONNECTING.inside == 0 and not dps._CONNECTING._queue   # every failure left its place


def test_connection_set_ups_take_turns(dps_target, dps_emulator, monkeypatch):
    """Eight registrations and messages at once through a turnstile two wide: never more than two SDK clients
    setting up a connection together, and each place is left (at DPS's first answer, after the message)."""
    from flasher.governor import Turnstile

    seen: list[int] = []

    class Watched(Turnstile):
        def enter(self):
            entry = super().enter()
            seen.append(self.inside)
            return entry

    gate = Watched(2)
    monkeypatch.setattr(dps, "_CONNECTING", gate)
    ids = [f"2cf7f1202490{i:04x}" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        regs = list(pool.map(lambda r: register_device(r, group_device_key(r), **dps_target), ids))
    assert [r.registration_id for r in regs] == ids
    assert len(seen) == 16 and max(seen) <= 2   # a provisioning and a hub client per id
    assert gate.inside == 0 and not gate._queue


def test_hub_connections_are_paced_to_the_hub_rate(dps_target, dps_emulator):
    """--hub-rate: five test messages with a hub limit of 2 new connections per second, all registered at once."""
    from flasher.dps import register_many
    from flasher.governor import RateGovernor

    starts: list[float] = []

    class Watched(RateGovernor):
        def _settle(self, slot, counted):
            super()._settle(slot, counted)
            if counted:
                starts.append(slot.at)

    hub = Watched(2, 1.0)
    ids = [f"2cf7f1202491{i:04x}" for i in range(5)]
    before = dps_emulator.state()["stats"]["hub_connections"]
    results = dict(register_many({r: group_device_key(r) for r in ids}, concurrency=5, hub_governor=hub,
                                 **dps_target))
    assert all(isinstance(r, Registration) for r in results.values()), results
    assert dps_emulator.state()["stats"]["hub_connections"] - before == 5
    starts.sort()
    assert len(starts) == 5   # each connection counted once, from the hub's answer
    for i, t0 in enumerate(starts):
        assert sum(1 for t in starts[i:] if t < t0 + 1.0) <= 2


def test_the_status_lookup_finds_an_assignment_and_only_that(make_dps_emulator):
    """DPS's device registration status lookup (HTTPS, signed with the device key), as a resumed run uses it."""
    from flasher.dps import look_up_registration, read_ca_cert

    emu = make_dps_emulator(websocket_port=443)
    target = {"id_scope": ID_SCOPE, "dps_host": emu.host, "ca_cert": str(emu.ca_cert_path)}
    pem = read_ca_cert(emu.ca_cert_path)
    done, never = "2cf7f12024920001", "2cf7f12024920002"
    reg = register_device(done, group_device_key(done), test_message=None, **target)

    def look(reg_id, key):
        return look_up_registration(reg_id, key, id_scope=ID_SCOPE, dps_host=emu.host, pem=pem,
                                    deadline=time.monotonic() + 10)

    found = look(done, group_device_key(done))
    assert (found.assigned_hub, found.device_id) == (reg.assigned_hub, reg.device_id)
    assert look(never, group_device_key(never)) is None             # 404: never registered
    assert look(done, group_device_key(never)) is None              # 401: another device's key
    assert emu.state()["stats"]["status_lookups"] == 3
    registers = emu.state()["stats"]["register_requests"]
    again = register_device(done, group_device_key(done), look_up_first=True, **target)   # found: not registered again
    assert "lookup" in again.timings and "register" not in again.timings and "message" in again.timings
    fresh = register_device(never, group_device_key(never), look_up_first=True, test_message=None, **target)
    assert fresh.status == "assigned" and "register" in fresh.timings
    assert emu.state()["stats"]["register_requests"] == registers + 1
    assert {r["registrationId"]: r["attempts"] for r in emu.state()["registrations"]} == {done: 1, never: 1}


# --- inputs ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, fragment", [
    ({"registration_id": "ABC"}, "upper-case"),
    ({"device_key": "not base64!"}, "device key"),
    ({"id_scope": "0ne/x"}, "ID scope"),
    ({"ca_cert": "/nonexistent/ca.pem"}, "no such file"),
])
def test_bad_inputs_fail_before_any_network(kwargs, fragment):
    args = {"registration_id": "abc", "device_key": INDIVIDUAL_PRIMARY, "id_scope": ID_SCOPE, "dps_host": "127.0.0.1"}
    args.update(kwargs)
    with pytest.raises(InputError, match=fragment):
        register_device(args.pop("registration_id"), args.pop("device_key"), **args)


def test_validate_id_scope():
    assert validate_id_scope(" 0ne0001A2B3 ") == "0ne0001A2B3"
    for bad in ("", "0ne 1", "a" * 65):
        with pytest.raises(InputError):
            validate_id_scope(bad)


# --- emulator pieces --------------------------------------------------------------------

def test_sas_checks():
    import hashlib
    import hmac
    import urllib.parse

    key = base64.b64decode(INDIVIDUAL_PRIMARY)
    res = f"{ID_SCOPE}/registrations/{INDIVIDUAL_ID}"

    def token(resource, expiry, k=key):
        sr = urllib.parse.quote(resource, safe="")
        sig = base64.b64encode(hmac.new(k, f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()).decode()
        return f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig, safe='')}&se={expiry}"

    future = int(time.time()) + 3600
    assert check_sas(token(res, future), res, [key]) is None
    assert check_sas(token(res, int(time.time()) - 1), res, [key]) == "token expired"
    assert check_sas(token(res, future, os.urandom(32)), res, [key]) == "signature does not match"
    assert check_sas(token(f"{ID_SCOPE}/registrations/other", future), res, [key]) == "token is for another resource"
    assert check_sas("Bearer x", res, [key]) == "not a SharedAccessSignature"


def test_enrollments_file_errors(tmp_path):
    p = tmp_path / "e.json"
    p.write_text("{not json")
    with pytest.raises(InputError, match="not JSON"):
        load_enrollments(p)
    with pytest.raises(InputError, match="primary_key"):
        load_enrollments({"id_scope": ID_SCOPE, "groups": [{"name": "g", "primary_key": "short"}]})
    with pytest.raises(InputError, match="no such file"):
        load_enrollments(tmp_path / "missing.json")


def test_state_file_has_no_secrets(dps_emulator, dps_target):
    register_device(INDIVIDUAL_ID, INDIVIDUAL_PRIMARY, test_message=None, timeout=30, **dps_target)
    text = open(dps_emulator.state_file, encoding="utf-8").read()
    assert json.loads(text)["registrations"]
    for secret in (INDIVIDUAL_PRIMARY, INDIVIDUAL_SECONDARY, DISABLED_KEY, group_device_key("2cf7f12024900138")):
        assert secret not in text


def test_emulator_refuses_a_busy_address(dps_emulator, tmp_path):
    from flasher.errors import FlasherError
    from flasher.sim.dps import DpsEmulator

    with pytest.raises(FlasherError, match="cannot listen"):
        with DpsEmulator({"id_scope": ID_SCOPE}, host=dps_emulator.host, cert_dir=tmp_path):
            pass


def test_send_test_message_after_registration(dps_emulator, dps_target):
    rid = "2cf7f120249000ee"
    key = group_device_key(rid, primary=False)  # the secondary-derived key works too
    reg = register_device(rid, key, test_message=None, timeout=30, **dps_target)
    from flasher.dps import send_test_message

    timings = send_test_message(reg.device_id, reg.assigned_hub, key, ca_cert=dps_target["ca_cert"], message="hello")
    assert set(timings) == {"connect", "message"}
    assert [m["payload"] for m in _messages(dps_emulator, rid)] == ["hello"]
    with pytest.raises(DpsError) as info:
        send_test_message(reg.device_id, reg.assigned_hub, INDIVIDUAL_PRIMARY, ca_cert=dps_target["ca_cert"])
    assert info.value.kind == "hub_refused"


# --- an emulator configured unlike the default: the client must not assume our shapes ---

@pytest.fixture
def loopback_one():
    """127.0.0.1, if port 8883 is free there (the only loopback address 'localhost' resolves to)."""
    from fixtures_dps import free_loopback

    host = free_loopback(prefer=("127.0.0.1",))
    if host != "127.0.0.1":
        pytest.skip("port 8883 on 127.0.0.1 is busy")
    return host


def test_assigned_hub_is_not_the_dps_host(make_dps_emulator, loopback_one):
    # DPS is dialled as 127.0.0.1 but assigns the hub "localhost": the proof message must go to "localhost"
    emu = make_dps_emulator(host=loopback_one, hub_name="localhost")
    rid = "2cf7f120249000f1"
    reg = register_device(rid, group_device_key(rid), id_scope=ID_SCOPE, dps_host="127.0.0.1",
                          ca_cert=emu.ca_cert_path, timeout=30)
    assert (reg.assigned_hub, reg.device_id) == ("localhost", rid)
    assert [m["payload"] for m in _messages(emu, rid)] == ["TestMessage"]
    assert emu.state()["stats"]["hub_connections"] == 1
    # the hub checks the token against the name the device dialled: the DPS host's name is not the hub's
    from flasher.dps import send_test_message

    with pytest.raises(DpsError) as info:
        send_test_message(rid, "127.0.0.1", group_device_key(rid), ca_cert=emu.ca_cert_path, timeout=30)
    assert info.value.kind == "hub_refused"


class _TerseDps:
    """Mixin: answer the way a minimal DPS would, with only registrationId, status, assignedHub, deviceId."""

    @staticmethod
    def _registration_state(rec):
        return {k: rec[k] for k in ("registrationId", "status", "assignedHub", "deviceId") if k in rec}


def test_registration_state_without_substatus_or_dates(tmp_path):
    from fixtures_dps import ENROLLMENTS, free_loopback

    from flasher.sim.dps import DpsEmulator

    class TerseDps(_TerseDps, DpsEmulator):
        pass

    baseline = set(threading.enumerate())
    with TerseDps(ENROLLMENTS, host=free_loopback(), cert_dir=tmp_path / "certs") as emu:
        rid = "2cf7f120249000f2"
        reg = register_device(rid, group_device_key(rid), id_scope=ID_SCOPE, dps_host=emu.host,
                              ca_cert=emu.ca_cert_path, timeout=20)
        assert (reg.status, reg.device_id, reg.assigned_hub, reg.substatus) == ("assigned", rid, emu.host, None)
        assert [m["payload"] for m in _messages(emu, rid)] == ["TestMessage"]
    assert wait_for(lambda: not leftover_threads(baseline)), leftover_threads(baseline)


def test_server_errors_are_retried_and_named(make_dps_emulator):
    emu = make_dps_emulator()
    emu.throttle(1, retry_after=1, status=503)
    phases = []
    reg = register_device("00000000000000ab", group_device_key("00000000000000ab"), id_scope=ID_SCOPE,
                          dps_host=emu.host, ca_cert=emu.ca_cert_path, test_message=None, timeout=30,
                          on_phase=phases.append)
    assert reg.status == "assigned" and phases.count("throttled") == 1
    emu.throttle(100, retry_after=1, status=500)
    exc = _fails("throttled", "00000000000000bc", group_device_key("00000000000000bc"), id_scope=ID_SCOPE,
                 dps_host=emu.host, ca_cert=emu.ca_cert_path, throttle_retries=1, timeout=30)
    assert "500" in str(exc) and "429" not in str(exc)


def test_fractional_retry_after_is_honoured(tmp_path):
    from fixtures_dps import ENROLLMENTS, free_loopback

    from flasher.sim.dps import DpsEmulator

    class FractionalDps(DpsEmulator):
        async def _respond(self, conn, status, rid, body, retry_after=None):
            topic = f"$dps/registrations/res/{status}/?$rid={rid}"
            if retry_after is not None:
                topic += "&retry-after=0.5"
            await conn.publish(topic, json.dumps(body).encode(), qos=1)

    with FractionalDps(ENROLLMENTS, host=free_loopback(), cert_dir=tmp_path / "certs") as emu:
        emu.throttle(1, retry_after=1)
        reg = register_device("00000000000000ad", group_device_key("00000000000000ad"), id_scope=ID_SCOPE,
                              dps_host=emu.host, ca_cert=emu.ca_cert_path, test_message=None, timeout=20)
        assert reg.status == "assigned" and emu.state()["stats"]["throttled"] == 1


def test_ca_cert_chain_with_text_and_a_corrupt_one(dps_emulator, dps_target, tmp_path):
    from flasher.dps import read_ca_cert

    other = certs.make_ca(tmp_path / "other").read_text()
    ours = open(dps_target["ca_cert"], encoding="ascii").read()
    chain = tmp_path / "chain.pem"  # an openssl-style bundle: subject lines (not ASCII), CRLF, two roots
    chain.write_bytes(("subject=CN = Zürich root\n" + other + "\nsubject=CN = ours\n" + ours).replace("\n", "\r\n")
                      .encode("utf-8"))
    assert read_ca_cert(chain).count("-----BEGIN CERTIFICATE-----") == 2
    reg = register_device(INDIVIDUAL_ID, INDIVIDUAL_PRIMARY, test_message=None, timeout=30,
                          **{**dps_target, "ca_cert": str(chain)})
    assert reg.status == "assigned"

    corrupt = tmp_path / "corrupt.pem"
    corrupt.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    baseline = set(threading.enumerate())
    with pytest.raises(InputError, match="corrupt.pem.*not a valid"):
        register_device(INDIVIDUAL_ID, INDIVIDUAL_PRIMARY, **{**dps_target, "ca_cert": str(corrupt)})
    assert leftover_threads(baseline) == []
