"""Every command reads flasher.toml the same way: one resolver, option > env > file > default.

The bug this guards: with ``registration_id_format`` in flasher.toml, ``keys`` and
``header`` derived a different device key than ``provision`` for the same board,
and ``register`` asked for ``--id-scope`` although the file had it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fixtures_dps import GROUP_PRIMARY, group_device_key

SCOPE = "0ne00000001"


@pytest.fixture
def bench(tmp_path, monkeypatch, dps_emulator, sim_boards):
    """A bench folder with a flasher.toml that sets everything, and one simulated board."""
    sim = sim_boards(1, seed=907)
    (tmp_path / "flasher.toml").write_text(
        f'id_scope = "{SCOPE}"\ndps_host = "{dps_emulator.host}"\nca_cert = "{dps_emulator.ca_cert_path}"\n'
        f'registration_id_format = "sn-{{deveui}}"\nband = "US915"\njoin_eui = "70B3D57ED003F06A"\n'
        f'ledger = "bench.sqlite3"\nout_dir = "out"\ntemplate = "seeed-lorawan"\ntimeout = 30\nat_timeout = 1.5\n')
    monkeypatch.chdir(tmp_path)
    for var in ("FLASHER_ID_SCOPE", "FLASHER_DPS_HOST", "FLASHER_APPKEY_MASTER", "FLASHER_APP_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FLASHER_GROUP_PRIMARY_KEY", GROUP_PRIMARY)
    board = sim.boards[0]
    return tmp_path, sim.ports[0], board.deveui, f"sn-{board.deveui.lower()}"


def test_keys_uses_the_files_registration_id_format(cli, bench):
    _, _, deveui, reg_id = bench
    code, out, err = cli("keys", deveui, "--format", "csv")
    assert code == 0, err
    assert out.splitlines()[1].split(",")[:2] == [reg_id, group_device_key(reg_id)]


def test_header_uses_the_file(cli, bench):
    _, _, deveui, reg_id = bench
    code, out, err = cli("header", deveui, "--random-app-key")
    assert code == 0, err
    assert f'"{reg_id}"' in out and f'"{group_device_key(reg_id)}"' in out
    assert '"70B3D57ED003F06A"' in out and "US915" in out and f'"{SCOPE}"' in out


def test_register_needs_no_id_scope_option(cli, bench):
    _, _, deveui, reg_id = bench
    code, out, err = cli("register", deveui, "--no-test-message", "--json")
    assert code == 0, err
    assert json.loads(out)["registration_id"] == reg_id


def test_provision_status_verify_and_keys_agree(cli, bench):
    folder, port, deveui, reg_id = bench
    code, out, err = cli("provision", "--port", port, "--json", "-q", "--no-test-message")
    assert code == 0, err
    result = json.loads(out)
    assert result["registration_id"] == reg_id and result["header"].startswith(str(folder / "out"))
    header = Path(result["header"]).read_text()
    _, keys_out, _ = cli("keys", deveui)
    assert keys_out.split() == [reg_id, group_device_key(reg_id)]
    assert re.search(rf'"{re.escape(group_device_key(reg_id))}"', header)
    code, out, err = cli("status", "--json")
    assert code == 0 and json.loads(out)["band"] == "US915" and json.loads(out)["registration_id"] == reg_id
    code, out, err = cli("verify", "--port", port, "--json")
    assert code == 0, out + err
    assert json.loads(out)["ok"] is True


def test_eui_and_verify_take_the_at_timeout_from_the_file(cli, bench):
    folder, port, deveui, _ = bench
    code, out, err = cli("eui", "--port", port)
    assert code == 0 and out.strip() == deveui
    (folder / "flasher.toml").write_text((folder / "flasher.toml").read_text().replace("at_timeout = 1.5", "at_timeout = -1"))
    code, out, err = cli("eui", "--port", port)
    assert code == 2 and "at_timeout" in err and "flasher.toml" in err


def test_an_option_beats_the_environment_which_beats_the_file(cli, bench, monkeypatch):
    _, _, deveui, reg_id = bench
    monkeypatch.setenv("FLASHER_ID_SCOPE", "0neFROMENV")
    code, out, _ = cli("config", "--json")
    rows = {r["name"]: r for r in map(json.loads, out.splitlines())}
    assert rows["id_scope"]["value"] == "0neFROMENV" and rows["id_scope"]["source"] == "env FLASHER_ID_SCOPE"
    assert rows["band"]["value"] == "US915" and rows["band"]["source"].startswith("file ")
    assert rows["fqbn"]["source"] == "default"
    assert rows["group_key"]["value"] == "(secret)" and rows["group_key"]["source"] == "$FLASHER_GROUP_PRIMARY_KEY"
    assert GROUP_PRIMARY not in out
    code, out, err = cli("header", deveui, "--random-app-key", "--id-scope", "0neFROMOPTION")
    assert code == 0 and '"0neFROMOPTION"' in out


def test_an_unknown_key_is_refused_by_every_command(cli, bench):
    folder, port, deveui, _ = bench
    (folder / "flasher.toml").write_text('id_skope = "0ne00000001"\n')
    for argv in (["keys", deveui], ["header", deveui, "--random-app-key"], ["register", deveui],
                 ["provision", "--port", port], ["status"], ["eui", "--port", port], ["config"]):
        code, out, err = cli(*argv)
        assert code == 2 and "unknown key 'id_skope'" in err and "flasher.toml" in err, (argv, err)
