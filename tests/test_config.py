import pytest

from flasher.config import load_config
from flasher.errors import InputError


def test_defaults_and_relative_paths(tmp_path):
    (tmp_path / "flasher.toml").write_text('id_scope = "0ne0001A2B3"\nband = "US915"\nca_cert = "certs/ca.pem"\ntimeout = 30\n')
    cfg = load_config(cwd=tmp_path)
    assert cfg.id_scope == "0ne0001A2B3" and cfg.band == "US915" and cfg.timeout == 30
    assert cfg.ca_cert == str(tmp_path / "certs" / "ca.pem")
    assert cfg.get("band", "EU868") == "EU868" and cfg.get("band") == "US915"
    assert cfg.get("template", default="seeed-lorawan") == "seeed-lorawan"


def test_no_file_is_fine(tmp_path):
    assert load_config(cwd=tmp_path).id_scope is None


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
        load_config(p)
    assert "8isrFI1s" not in str(e.value) and "supersecret" not in str(e.value) and "2B7E15" not in str(e.value)


def test_missing_explicit_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_config(tmp_path / "nope.toml")
