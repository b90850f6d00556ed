"""Key rotation: registering with the group's secondary key, and what a 401 says when the other key is loaded.

The emulator records which of the enrollment's keys signed each accepted registration, so
these tests see which key really went to DPS, and how many requests reached it.
"""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from fixtures_dps import GROUP_PRIMARY, GROUP_SECONDARY, ID_SCOPE, group_device_key

ROTATED_AWAY = base64.b64encode(hashlib.sha512(b"flasher tests: a key the group no longer has").digest()).decode()


@pytest.fixture
def register(cli, dps_emulator, monkeypatch):
    """``flasher register ID --json ...`` against the session emulator, with the group keys given."""
    def run(rid, *args, primary=GROUP_PRIMARY, secondary=GROUP_SECONDARY):
        for var, value in (("FLASHER_GROUP_PRIMARY_KEY", primary), ("FLASHER_GROUP_SECONDARY_KEY", secondary)):
            if value is None:
                monkeypatch.delenv(var, raising=False)
            else:
                monkeypatch.setenv(var, value)
        return cli("register", rid, "--id-scope", ID_SCOPE, "--dps-host", dps_emulator.host, "--ca-cert",
                   dps_emulator.ca_cert_path, "--no-test-message", *args)
    return run


def record(emu, rid):
    return next(r for r in emu.state()["registrations"] if r["registrationId"] == rid)


def test_use_secondary_key_registers_with_the_secondary(register, dps_emulator):
    code, out, err = register("2cf7f120249a0001", "--use-secondary-key", "--json", primary=None)
    assert code == 0, err
    assert record(dps_emulator, "2cf7f120249a0001")["signed_with"] == "secondary"
    code, out, err = register("2cf7f120249a0002", "--json")
    assert code == 0 and record(dps_emulator, "2cf7f120249a0002")["signed_with"] == "primary"


def test_use_secondary_key_without_one_is_a_usage_error(register):
    code, out, err = register("2cf7f120249a0003", "--use-secondary-key", secondary=None)
    assert code == 2 and "group secondary key: missing" in err and "FLASHER_GROUP_SECONDARY_KEY" in err


def test_a_401_says_the_secondary_works_when_asked_to_check(register, dps_emulator):
    before = dps_emulator.state()["stats"]
    code, out, err = register("2cf7f120249a0004", "--check-other-key", "--json", primary=ROTATED_AWAY)
    assert code == 1
    line = json.loads(out)
    assert line["ok"] is False and line["error"] == "unauthorized"
    assert line["message"] == (f"registration '2cf7f120249a0004' at {dps_emulator.host}: DPS refused the primary key "
                               f"(401), but the secondary key works (DPS registered the device with it): the primary "
                               f"key was probably rotated; rerun --use-secondary-key")
    after = dps_emulator.state()["stats"]
    assert after["unauthorized"] == before["unauthorized"] + 1
    assert after["register_requests"] == before["register_requests"] + 2  # the refused one, and exactly one more
    assert record(dps_emulator, "2cf7f120249a0004")["signed_with"] == "secondary"


def test_without_the_check_a_401_is_one_attempt(register, dps_emulator):
    before = dps_emulator.state()["stats"]["register_requests"]
    code, out, err = register("2cf7f120249a0005", primary=ROTATED_AWAY)
    assert code == 1 and "DPS refused the credentials (401)" in err and "secondary" not in err
    assert dps_emulator.state()["stats"]["register_requests"] == before + 1


def test_both_keys_refused(register):
    code, out, err = register("2cf7f120249a0006", "--check-other-key", primary=ROTATED_AWAY, secondary=ROTATED_AWAY)
    assert code == 1
    assert "DPS refused the primary key (401), and the secondary key too: check the ID scope" in err


def test_checking_the_primary_when_the_secondary_is_in_use(register):
    code, out, err = register("2cf7f120249a0007", "--use-secondary-key", "--check-other-key", secondary=ROTATED_AWAY)
    assert code == 1
    assert "DPS refused the secondary key (401), but the primary key works" in err
    assert "rerun without --use-secondary-key" in err


def test_check_other_key_needs_the_other_key(register):
    code, out, err = register("2cf7f120249a0008", "--check-other-key", secondary=None)
    assert (code, out) == (2, "")
    assert err == ("error: --check-other-key: the group secondary key is not loaded (set FLASHER_GROUP_SECONDARY_KEY "
                   "or use a key file)\n")


def test_the_key_used_is_the_one_keys_prints_for_the_secondary(cli, register, dps_emulator, monkeypatch):
    """`flasher keys` prints both device keys; --use-secondary-key registers with the second one."""
    monkeypatch.setenv("FLASHER_GROUP_PRIMARY_KEY", GROUP_PRIMARY)
    monkeypatch.setenv("FLASHER_GROUP_SECONDARY_KEY", GROUP_SECONDARY)
    code, out, err = cli("keys", "2cf7f120249a0009", "--format", "json")
    assert code == 0, err
    assert json.loads(out)["secondary_device_key"] == group_device_key("2cf7f120249a0009", primary=False)
    code, out, err = register("2cf7f120249a0009", "--use-secondary-key", "--json")
    assert code == 0 and record(dps_emulator, "2cf7f120249a0009")["signed_with"] == "secondary"
