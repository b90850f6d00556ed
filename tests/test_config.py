import pytest

from flasher.config import load_file
from flasher.errors import InputError
from flasher.settings import resolve


def test_values_and_relative_paths(tmp_path):
    (tmp_path / "flasher.toml").write_text('id_scope = "0ne0001A2B3"\nband = "US915"\nca_cert = "certs/ca.pem"\ntimeout = 30\n')
    values, path = load_file(cwd=tmp_path)
    assert path == str(tmp_path / "flasher.toml")
    assert values["id_scope"] == "0ne0001A2B3" and values["band"] == "US915" and values["timeout"] == 30
    assert values["ca_cert"] == str(tmp_path / "certs" / "ca.pem")


def test_precedence_option_env_file_default(tmp_path, monkeypatch):
    (tmp_path / "flasher.toml").write_text('id_scope = "0neFILE"\nband = "US915"\ntimeout = 30\n')
    monkeypatch.setenv("FLASHER_ID_SCOPE", "0neENV")
    monkeypatch.delenv("FLASHER_DPS_HOST", raising=False)
    s = resolve({"band": "AS923"}, ["id_scope", "band", "timeout", "dps_host"], cwd=str(tmp_path))
    assert (s.band, s.source("band")) == ("AS923", "option")
    assert (s.id_scope, s.source("id_scope")) == ("0neENV", "env FLASHER_ID_SCOPE")
    assert s.timeout == 30.0 and s.source("timeout").startswith("file ")
    assert s.dps_host == "global.azure-devices-provisioning.net" and s.source("dps_host") == "default"


def test_no_file_is_fine(tmp_path):
    assert load_file(cwd=tmp_path) == ({}, None)


@pytest.mark.parametrize("body,why", [
    ('group_key = "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE"', "inline"),
    ('app_key_master = "supersecretsupersecret"', "inline"),
    ('app_key = "2B7E151628AED2A6ABF7158809CF4F3C"', "app_key_file"),
    ('colour = "blue"', "unknown key 'colour'"),
    ('timeout = "soon"', "wrong type"),
    ('id_scope = ', "not valid TOML"),
])
def test_refusals(tmp_path, body, why):
    p = tmp_path / "flasher.toml"
    p.write_text(body + "\n")
    with pytest.raises(InputError, match=why) as e:
        load_file(p)
    assert "8isrFI1s" not in str(e.value) and "supersecret" not in str(e.value) and "2B7E15" not in str(e.value)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("body,where", [
    ("timeout = -5", "timeout"), ("concurrency = 0", "concurrency"), ('band = "EU999"', "EU999"),
    ("timeout = inf", "timeout"), ("timeout = nan", "timeout"), ('registration_id_format = "{deveui:.2}"', "format spec"),
])
def test_bad_values_name_the_file_and_key(tmp_path, body, where):
    (tmp_path / "flasher.toml").write_text(body + "\n")
    names = ["timeout", "concurrency", "band", "registration_id_format"]
    with pytest.raises(InputError, match=where):
        resolve({}, names, cwd=str(tmp_path))


def test_repr_never_shows_a_secret(tmp_path, monkeypatch):
    from flasher.keys import AppKeyPlan, AppKeySource
    from flasher.pipeline import Settings
    from flasher.secrets import Secret

    key, master = b"\x11" * 32, "a master secret, long enough"
    settings = Settings(id_scope="0ne00000001", group_key=key,
                        app_key=AppKeyPlan.derived_from(master))
    shown = repr(settings) + str(settings) + repr(Secret("visible-or-not-1234"))
    assert key.hex() not in shown and master not in shown and "visible-or-not" not in shown
    assert AppKeySource.DERIVED in shown or "derived" in shown


def test_missing_explicit_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_file(tmp_path / "nope.toml")
