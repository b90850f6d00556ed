"""The Things Stack adapter (flasher.tts) against the emulator: real HTTPS on loopback, real JSON, real errors.

Each test starts its own emulator (its own port and CA), so fault knobs never leak
between tests. "Interrupted" here means a server refusing mid-way (the step fails
and records what it got done); a SIGKILL between servers is in test_tts_pipeline.py.
"""

from __future__ import annotations

import logging

import pytest
from fixtures_tts import APP, OTHER_APP, end_device, tts_target

from flasher.tts import SERVERS, TtsClient, TtsError, read_back, register_end_device

DEVEUI = "2CF7F12024900138"


def register(emu, key, dev, held=(), **target_kwargs):
    with TtsClient(tts_target(emu, key, app=dev.app, **target_kwargs)) as client:
        progress: list[list[str]] = []
        reg = register_end_device(client, dev, held, on_held=lambda servers: progress.append(servers))
    return reg, client, progress


def test_a_fresh_device_is_written_to_the_four_servers_in_order(make_tts):
    emu = make_tts()
    key = emu.add_api_key(app=APP)
    dev = end_device(DEVEUI)
    reg, client, progress = register(emu, key, dev)
    assert [(s, m) for s, m, _, _ in client.calls] == [("is", "POST"), ("js", "PUT"), ("ns", "PUT"), ("as", "PUT")]
    assert reg.held == list(SERVERS) and reg.written == list(SERVERS) and not reg.adopted
    assert progress == [["is"], ["is", "js"], ["is", "js", "ns"], ["is", "js", "ns", "as"]]
    copies = emu.device(APP, dev.device_id)
    assert copies["is"]["ids"] == {"device_id": dev.device_id, "application_ids": {"application_id": APP},
                                   "dev_eui": DEVEUI, "join_eui": "70B3D57ED003F06A"}
    host = f"127.0.0.1:{emu.port}"
    assert {copies["is"][f] for f in ("join_server_address", "network_server_address",
                                      "application_server_address")} == {host}
    assert "root_keys" not in copies["is"] and "root_keys" not in copies["ns"] and "root_keys" not in copies["as"]
    assert emu.app_key(APP, dev.device_id) == dev.app_key_hex
    assert {k: copies["ns"][k] for k in ("supports_join", "lorawan_version", "lorawan_phy_version",
                                         "frequency_plan_id")} == \
        {"supports_join": True, "lorawan_version": "MAC_V1_0_2", "lorawan_phy_version": "PHY_V1_0_2_REV_B",
         "frequency_plan_id": "EU_863_870_TTN"}
    assert emu.writes == {"is": 1, "js": 1, "ns": 1, "as": 1}


def test_a_rerun_with_the_servers_recorded_asks_nothing(make_tts):
    emu = make_tts()
    key = emu.add_api_key(app=APP)
    dev = end_device(DEVEUI)
    register(emu, key, dev)
    requests = emu.stats["requests"]
    reg, client, _ = register(emu, key, dev, held=SERVERS)
    assert client.calls == [] and reg.written == [] and emu.stats["requests"] == requests
    assert reg.detail == f"{dev.device_id}: already on all four servers"


def test_a_rerun_without_a_record_reads_back_and_writes_nothing(make_tts):
    emu = make_tts()
    key = emu.add_api_key(app=APP)
    dev = end_device(DEVEUI)
    register(emu, key, dev)
    reg, client, _ = register(emu, key, dev)   # the ledger was lost: the stack is asked, nothing written
    assert reg.adopted and reg.written == [] and reg.held == list(SERVERS)
    assert [(s, m, st) for s, m, _, st in client.calls] == [("is", "POST", 409), ("is", "GET", 200),
                                                            ("js", "GET", 200), ("ns", "GET", 200), ("as", "GET", 200)]
    assert emu.writes == {"is": 1, "js": 1, "ns": 1, "as": 1}


@pytest.mark.parametrize("done", [1, 2, 3], ids=["after-is", "after-js", "after-ns"])
def test_interrupted_after_each_server_resumes_at_the_missing_one(make_tts, done):
    emu = make_tts()
    key = emu.add_api_key(app=APP)
    dev = end_device(DEVEUI)
    emu.refuse(SERVERS[done], status=500)
    client = TtsClient(tts_target(emu, key))
    progress: list[list[str]] = []
    with pytest.raises(TtsError) as err:
        register_end_device(client, dev, on_held=progress.append)
    assert "500" in str(err.value) and "\n" not in str(err.value)
    assert progress[-1] == list(SERVERS[:done])          # what the step records before it fails
    assert emu.writes == {s: int(i < done) for i, s in enumerate(SERVERS)}
    emu.accept()
    reg, client, _ = register(emu, key, dev, held=progress[-1])
    assert reg.written == list(SERVERS[done:]) and reg.held == list(SERVERS)
    assert [s for s, m, _, _ in client.calls if m != "GET"] == list(SERVERS[done:])
    assert emu.writes["is"] == 1          # never created twice
    assert emu.app_key(APP, dev.device_id) == dev.app_key_hex


def test_killed_between_servers_without_a_record_reads_back_and_completes_the_rest(make_tts):
    emu = make_tts()
    key = emu.add_api_key(app=APP)
    dev = end_device(DEVEUI)
    emu.refuse("ns", status=500)
    with pytest.raises(TtsError):
        register(emu, key, dev)
    emu.accept()
    reg, client, _ = register(emu, key, dev, held=())   # nothing recorded: the IS and JS copies are found
    assert reg.adopted and reg.written == ["ns", "as"]
    assert emu.writes == {"is": 1, "js": 1, "ns": 1, "as": 1}


def test_a_join_server_holding_another_appkey_gets_the_modules(make_tts):
    emu = make_tts()
    key = emu.add_api_key(app=APP)
    register(emu, key, end_device(DEVEUI, key=bytes(range(16))))
    dev = end_device(DEVEUI, key=bytes(range(100, 116)))   # the module was programmed again (random AppKey, --force)
    reg, _, _ = register(emu, key, dev)
    assert reg.written == ["js"] and emu.app_key(APP, dev.device_id) == dev.app_key_hex


def test_a_deveui_registered_in_another_application_is_named_and_never_overwritten(make_tts):
    emu = make_tts()
    theirs = end_device(DEVEUI, app=OTHER_APP)
    theirs = type(theirs)(OTHER_APP, "their-sensor-7", theirs.dev_eui, theirs.join_eui, theirs.app_key)
    register(emu, emu.add_api_key(app=OTHER_APP), theirs)
    before = emu.state()["writes"]
    mine = end_device(DEVEUI)
    with pytest.raises(TtsError) as err:
        register(emu, emu.add_api_key(app=APP), mine)
    msg = str(err.value)
    assert "\n" not in msg and err.value.status == 409
    assert "'their-sensor-7'" in msg and f"'{OTHER_APP}'" in msg          # theirs
    assert f"'{mine.device_id}'" in msg and f"'{APP}'" in msg             # ours
    assert "not overwritten" in msg
    assert emu.state()["writes"] == before
    assert emu.device(APP, mine.device_id) == {s: None for s in SERVERS}
    assert emu.app_key(OTHER_APP, "their-sensor-7") == theirs.app_key_hex


def test_a_device_id_taken_by_another_deveui_is_named_and_never_overwritten(make_tts):
    emu = make_tts()
    key = emu.add_api_key(app=APP)
    first = end_device(DEVEUI)
    register(emu, key, first)
    other = end_device("2CF7F12024900139")
    other = type(other)(APP, first.device_id, other.dev_eui, other.join_eui, other.app_key)  # same id, other board
    with pytest.raises(TtsError) as err:
        register(emu, key, other)
    assert "already belongs to DevEUI 2CF7F12024900138" in str(err.value) and "not overwritten" in str(err.value)
    assert emu.app_key(APP, first.device_id) == first.app_key_hex and emu.writes["js"] == 1


@pytest.mark.parametrize("mangle,name", [(lambda k: k.replace(k.split(".")[1], "A" * 39), "api_key_not_found"),
                                         (lambda k: k[:-4] + "AAAA", "invalid_authorization")],
                         ids=["unknown-key", "wrong-secret"])
def test_a_wrong_key_is_one_line_saying_the_key_was_refused(make_tts, mangle, name):
    emu = make_tts()
    key = mangle(emu.add_api_key(app=APP))
    with pytest.raises(TtsError) as err:
        register(emu, key, end_device(DEVEUI))
    assert err.value.status == 401 and name in str(err.value) and "API key was refused" in str(err.value)
    assert key not in str(err.value) and key.split(".")[2] not in str(err.value)
    assert emu.writes == {s: 0 for s in SERVERS}


@pytest.mark.parametrize("rights,stops_at,missing", [
    (["RIGHT_APPLICATION_DEVICES_READ"], "is", "RIGHT_APPLICATION_DEVICES_WRITE"),
    (["RIGHT_APPLICATION_DEVICES_READ", "RIGHT_APPLICATION_DEVICES_WRITE"], "js", "RIGHT_APPLICATION_DEVICES_WRITE_KEYS"),
], ids=["no-write", "no-write-keys"])
def test_missing_rights_name_the_right(make_tts, rights, stops_at, missing):
    emu = make_tts()
    key = emu.add_api_key({APP: rights})
    with pytest.raises(TtsError) as err:
        register(emu, key, end_device(DEVEUI))
    msg = str(err.value)
    assert err.value.status == 403 and f"lacks {missing} " in msg and f"on application '{APP}'" in msg
    assert _server_named(msg) == stops_at


def _server_named(msg: str) -> str:
    from flasher.tts import SERVER_NAMES

    return next(s for s, name in SERVER_NAMES.items() if f"The Things Stack {name} " in msg)


def test_a_key_of_another_application_has_no_rights_here(make_tts):
    emu = make_tts()
    key = emu.add_api_key(app=OTHER_APP)
    with pytest.raises(TtsError) as err:
        register(emu, key, end_device(DEVEUI))
    assert err.value.status == 403 and "has no rights on application 'fleet'" in str(err.value)


@pytest.mark.parametrize("status", [429, 503])
def test_429_and_503_are_retried_with_backoff(make_tts, status):
    emu = make_tts()
    key = emu.add_api_key(app=APP)
    emu.fail_next(1, status, server="js", retry=0)
    reg, client, _ = register(emu, key, end_device(DEVEUI))
    assert reg.held == list(SERVERS)
    assert [st for s, _, _, st in client.calls if s == "js"] == [status, 200]
    assert emu.writes["js"] == 1


def test_429_honours_the_stacks_retry_header(make_tts):
    emu = make_tts()
    key = emu.add_api_key(app=APP)
    emu.fail_next(1, 429, server="is", retry=1)   # X-Rate-Limit-Retry: 1
    phases: list[str] = []
    client = TtsClient(tts_target(emu, key), on_phase=phases.append)
    register_end_device(client, end_device(DEVEUI))
    assert any("retrying in 1.0 s" in p for p in phases), phases


def test_a_server_that_stays_unavailable_is_given_up_within_the_deadline(make_tts):
    emu = make_tts()
    key = emu.add_api_key(app=APP)
    emu.refuse("ns", status=503)
    with pytest.raises(TtsError) as err:
        register(emu, key, end_device(DEVEUI), timeout=1.0)
    msg = str(err.value)
    assert "Network Server" in msg and "still 503" in msg and "--tts-timeout" in msg and "\n" not in msg
    assert emu.writes == {"is": 1, "js": 1, "ns": 0, "as": 0}


def test_nothing_listening_is_one_line(tmp_path):
    from fixtures_dps import free_loopback

    from flasher.secrets import Secret
    from flasher.tts import TtsTarget

    target = TtsTarget.single(APP, f"https://{free_loopback()}:9", Secret("NNSXS.AAAA.BBBB", "test"), timeout=3.0)
    with pytest.raises(TtsError) as err:
        register_end_device(TtsClient(target), end_device(DEVEUI))
    assert "cannot connect" in str(err.value) and "Identity Server" in str(err.value)


def test_an_untrusted_certificate_is_named(make_tts):
    from flasher.secrets import Secret
    from flasher.tts import TtsTarget

    emu = make_tts()
    target = TtsTarget.single(APP, emu.url, Secret(emu.add_api_key(app=APP), "k"), timeout=3.0)  # system roots only
    with pytest.raises(TtsError) as err:
        register_end_device(TtsClient(target), end_device(DEVEUI))
    assert "certificate not trusted" in str(err.value) and "--tts-ca-cert" in str(err.value)


def test_read_back_shows_each_servers_copy(make_tts):
    emu = make_tts()
    key = emu.add_api_key(app=APP)
    dev = end_device(DEVEUI)
    emu.refuse("as", status=500)
    with pytest.raises(TtsError):
        register(emu, key, dev)
    emu.accept()
    copies = read_back(TtsClient(tts_target(emu, key)), dev)
    assert copies["as"] is None and copies["js"]["root_keys"]["app_key"]["key"] == dev.app_key_hex
    assert copies["ns"]["frequency_plan_id"] == "EU_863_870_TTN"


def test_the_key_never_reaches_the_logs(make_tts, caplog):
    emu = make_tts()
    key = emu.add_api_key(app=APP)
    dev = end_device(DEVEUI)
    with caplog.at_level(logging.DEBUG):
        emu.fail_next(1, 503)
        register(emu, key, dev)
        register(emu, key, dev)
    text = caplog.text + repr(caplog.records)
    assert caplog.records, "the adapter logs what it does"
    for secret in (key, key.split(".")[2], dev.app_key_hex, dev.app_key_hex.lower()):
        assert secret not in text
