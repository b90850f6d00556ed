"""Header data, rendering, writing, and the `flasher header` command."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import subprocess
import sys

import pytest

from flasher.errors import FlasherError, InputError
from flasher.eui import EUI64
from flasher.header import (
    BANDS,
    HeaderData,
    build_header_data,
    parse_sets,
    render_header,
    resolve_app_key,
    shipped_templates,
    write_header,
)
from flasher.keys import decode_symmetric_key, derive_app_key, derive_device_key

GOLDEN_GROUP_KEY = "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw=="
DEV = EUI64.parse("2CF7F12024900138")
APP_KEY = bytes.fromhex("2B7E151628AED2A6ABF7158809CF4F3C")
MASTER = "correct horse battery staple, v1"


def data(**over) -> HeaderData:
    kw = dict(app_key=APP_KEY, app_key_source="given", id_scope="0ne0001A2B3",
              device_key=derive_device_key(decode_symmetric_key(GOLDEN_GROUP_KEY), "2cf7f12024900138"))
    kw.update(over)
    return build_header_data("2C:F7:F1:20:24:90:01:38", **kw)


# --- build_header_data ----------------------------------------------------------------

def test_defaults():
    d = data()
    assert d.dev_eui == DEV and d.join_eui == EUI64(bytes(8))
    assert d.registration_id == "2cf7f12024900138" and d.band == "EU868" and d.band_seeed == "EU868"
    assert "2B7E" not in repr(d) and d.device_key not in repr(d)  # secrets stay out of reprs and logs


def test_pipeline_spelling_of_a_given_key_is_accepted():
    assert data(app_key_source="file").app_key_source == "given"


@pytest.mark.parametrize("over,match", [
    ({"app_key": b"short"}, "AppKey: expected 16 bytes"),
    ({"app_key_source": "guessed"}, "AppKey source 'guessed'"),
    ({"band": "EU999"}, "band 'EU999': unknown"),
    ({"id_scope": "0ne 0001"}, "ID scope"),
    ({"registration_id": "UPPER"}, "registration id 'UPPER'"),
    ({"device_key": "not base64!"}, "device key: not valid base64"),
    ({"join_eui": "zz"}, "JoinEUI 'zz'"),
    ({"extras": {"int": "x"}}, "keyword"),
    ({"extras": {"OK": "a\x00b"}}, "--set OK: contains a NUL"),
    ({"tool_version": "1 */ 2"}, "tool version"),
])
def test_bad_inputs_name_the_input(over, match):
    with pytest.raises(InputError, match=match):
        data(**over)


def test_every_rhf76_band_is_accepted_case_insensitively():
    assert {data(band=b.lower()).band for b in BANDS} == set(BANDS)


def test_parse_sets():
    assert parse_sets(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    for bad, match in [(["A"], "expected NAME=VALUE"), (["A=1", "A=2"], "given twice"), (["1A=x"], "not a C identifier"),
                       (["FLASHER_DEV_EUI=x"], "reserved")]:
        with pytest.raises(InputError, match=match):
            parse_sets(bad)


# --- resolve_app_key ----------------------------------------------------------------

def test_app_key_sources():
    assert resolve_app_key(DEV, app_key_text="2b7e1516 28aed2a6 abf71588 09cf4f3c") == (APP_KEY, "given")
    key, source = resolve_app_key(DEV, master_secret=MASTER)
    assert source == "derived" and key == derive_app_key(MASTER.encode(), DEV)
    # The documented derivation, recomputed independently: HMAC-SHA256(master, label + DevEUI bytes)[:16].
    import hmac
    assert key == hmac.new(MASTER.encode(), b"flasher-appkey-v1" + bytes.fromhex("2CF7F12024900138"), "sha256").digest()[:16]
    assert resolve_app_key(DEV, master_secret=MASTER.encode())[0] == key
    k1, s1 = resolve_app_key(DEV, random=True)
    k2, _ = resolve_app_key(DEV, random=True)
    assert s1 == "random" and len(k1) == 16 and k1 != k2


@pytest.mark.parametrize("kw,match", [
    ({}, "got no source"),
    ({"app_key_text": "00" * 16, "random": True}, "got an AppKey and a random AppKey"),
    ({"master_secret": MASTER, "app_key_text": "00" * 16}, "choose exactly one"),
    ({"app_key_text": "00" * 15}, "32 hex digits"),
    ({"master_secret": "short"}, "at least 16 bytes"),
    ({"master_secret": b"short"}, "at least 16 bytes"),
])
def test_app_key_choice_is_explicit(kw, match):
    with pytest.raises(InputError, match=match):
        resolve_app_key(DEV, **kw)


# --- render_header ---------------------------------------------------------------------

def test_seeed_header_shape():
    text = render_header(data(extras={"WIFI_SSID": "lab"}), "seeed-lorawan")
    assert text.count("#ifndef FLASHER_CONFIG_H") == 1 and text.rstrip().endswith("#endif /* FLASHER_CONFIG_H */")
    assert '#define FLASHER_DEV_EUI "2CF7F12024900138"' in text
    assert '#define FLASHER_APP_EUI "0000000000000000"' in text
    assert '#define FLASHER_APP_KEY "2B7E151628AED2A6ABF7158809CF4F3C"' in text
    assert "#define FLASHER_LORA_BAND EU868" in text
    assert '#define WIFI_SSID "lab"' in text


@pytest.mark.parametrize("template", ["seeed-lorawan", "lmic", "azure-dps"])
def test_generated_by_comment_has_no_secret(template):
    d = data(app_key_source="derived")
    text = render_header(d, template)
    comment = text[: text.index("*/") + 2]
    assert f"flasher {d.tool_version}" in comment and "2CF7F12024900138" in comment and "AppKey: derived" in comment
    for secret in (APP_KEY.hex().upper(), APP_KEY.hex(), d.device_key, GOLDEN_GROUP_KEY):
        assert secret not in comment
    assert GOLDEN_GROUP_KEY not in text


def test_lmic_byte_order():
    text = render_header(data(join_eui="70B3D57ED003F06A"), "lmic")
    assert "APPEUI[8] = { 0x6A, 0xF0, 0x03, 0xD0, 0x7E, 0xD5, 0xB3, 0x70 }" in text
    assert "DEVEUI[8] = { 0x38, 0x01, 0x90, 0x24, 0x20, 0xF1, 0xF7, 0x2C }" in text
    assert "APPKEY[16] = { 0x2B, 0x7E, 0x15, 0x16," in text


def test_missing_value_is_named():
    with pytest.raises(InputError, match="template 'azure-dps': line 9: 'id_scope' is undefined"):
        render_header(data(id_scope=None), "azure-dps")
    assert "FLASHER_DPS_ID_SCOPE" not in render_header(data(id_scope=None), "seeed-lorawan")


def test_template_by_path(tmp_path):
    t = tmp_path / "mine.h.j2"
    t.write_text('{% include "_banner.h.j2" %}\n#define MY_ID {{ registration_id|c_string }}\n'
                 "#define MY_KEY {{ app_key|c_bytes }}\n#define N {{ extras|length }}\n")
    text = render_header(data(), str(t))
    assert '#define MY_ID "2cf7f12024900138"' in text and "#define N 0" in text and "Generated by flasher" in text


@pytest.mark.parametrize("source,match", [
    ("{{ nosuchvar|c_string }}", "'nosuchvar' is undefined"),
    ("{% if %}", "syntax error on line 1"),
    ("#define X {{ registration_id }}", "outputs raw str"),       # every value must pass a C filter
    ("#define X {{ dev_eui.hex }}", "outputs raw str"),
    ('{% include "nope.j2" %}', "'nope.j2'"),
    ("{{ extras|c_string }}", "expected text"),
])
def test_bad_templates_are_input_errors(tmp_path, source, match):
    t = tmp_path / "bad.h.j2"
    t.write_text(source)
    with pytest.raises(InputError, match=match) as e:
        render_header(data(), str(t))
    msg = str(e.value)
    assert msg.startswith(f"template {str(t)!r}") or msg.startswith("template value:"), msg


def test_unknown_or_unreadable_templates(tmp_path):
    with pytest.raises(InputError, match="no such shipped template.*lmic"):
        render_header(data(), "nosuch")
    with pytest.raises(InputError, match="no such file"):
        render_header(data(), str(tmp_path / "missing.j2"))
    (tmp_path / "bin.j2").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputError, match="cannot read"):
        render_header(data(), str(tmp_path / "bin.j2"))
    with pytest.raises(InputError, match=r"not a regular file \(a directory\)"):
        render_header(data(), str(tmp_path))


def test_shipped_templates_hide_partials():
    assert shipped_templates() == ["azure-dps", "lmic", "seeed-lorawan"]


# --- write_header ----------------------------------------------------------------------

def test_write_header_atomic_0600(tmp_path):
    target = tmp_path / "new" / "dir" / "config.h"
    digest = write_header("#define A 1\n", target)
    assert target.read_text() == "#define A 1\n"
    assert digest == hashlib.sha256(b"#define A 1\n").hexdigest()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    # Replacing a world-readable file leaves a 0600 file and no temp files behind.
    target.chmod(0o644)
    write_header("#define A 2\n", target)
    assert target.read_text() == "#define A 2\n" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["config.h"]


def test_write_header_refuses_a_directory(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        write_header("x", tmp_path)


def test_write_header_parent_is_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(FlasherError, match="cannot create"):
        write_header("x", tmp_path / "file" / "config.h")


# --- the command -----------------------------------------------------------------------

def run(args, env_extra=None, cwd=None, input=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHER_")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "flasher", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, input=input, timeout=60)


GK = {"FLASHER_GROUP_PRIMARY_KEY": GOLDEN_GROUP_KEY}


def test_cli_stdout_and_derived_key():
    r = run(["header", "2cf7f12024900138", "--id-scope", "0ne0001A2B3"], {**GK, "FLASHER_APPKEY_MASTER": MASTER})
    assert r.returncode == 0, r.stderr
    key = derive_app_key(MASTER.encode(), DEV).hex().upper()
    assert f'#define FLASHER_APP_KEY "{key}"' in r.stdout
    dk = derive_device_key(base64.b64decode(GOLDEN_GROUP_KEY), "2cf7f12024900138")
    assert f'#define FLASHER_DPS_DEVICE_KEY "{dk}"' in r.stdout
    assert "AppKey: derived" in r.stdout and MASTER not in r.stdout + r.stderr


def test_cli_output_file_and_secrets_stay_out(tmp_path):
    keyfile = tmp_path / "appkey.txt"
    keyfile.write_text(APP_KEY.hex() + "\n")
    out = tmp_path / "hdr" / "config.h"
    r = run(["-v", "header", "2CF7F12024900138", "--app-key-file", str(keyfile), "--template", "lmic",
             "--registration-id-format", "lora-{deveui}", "--set", "SITE=north", "-o", str(out)], GK)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and f"wrote {out}" in r.stderr
    text = out.read_text()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert '"lora-2cf7f12024900138"' in text and '#define SITE "north"' in text and "AppKey: given" in text
    raw = base64.b64decode(GOLDEN_GROUP_KEY)
    for secret in (GOLDEN_GROUP_KEY, raw.hex(), APP_KEY.hex(), APP_KEY.hex().upper()):
        assert secret not in r.stderr  # --verbose included
    assert GOLDEN_GROUP_KEY not in text and raw.hex() not in text.lower()


def test_cli_plain_option_warns_once(tmp_path):
    r = run(["header", "2CF7F12024900138", "--app-key", APP_KEY.hex(), "--group-key", GOLDEN_GROUP_KEY])
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("visible in the process list") == 2  # one for --app-key, one for --group-key
    assert GOLDEN_GROUP_KEY not in r.stderr and APP_KEY.hex() not in r.stderr


def test_cli_random_key_says_so():
    r = run(["header", "2CF7F12024900138", "--random-app-key"], GK)
    assert r.returncode == 0 and "AppKey is random" in r.stderr and "AppKey: random" in r.stdout


@pytest.mark.parametrize("args,env,match", [
    (["nothex"], GK, "DevEUI 'nothex'"),
    (["--random-app-key", "--join-eui", "12"], GK, "JoinEUI '12'"),
    ([], GK, "AppKey: no source"),
    (["--random-app-key", "--app-key-file", "x"], GK, "exclude each other"),
    ([], {**GK, "FLASHER_APP_KEY": "00" * 16, "FLASHER_APPKEY_MASTER": MASTER}, "both FLASHER_APP_KEY"),
    (["--random-app-key", "--band", "XX"], GK, "band 'XX'"),
    (["--random-app-key", "--set", "NOEQUALS"], GK, "expected NAME=VALUE"),
    (["--random-app-key", "--set", "A=1", "--set", "A=2"], GK, "given twice"),
    (["--random-app-key", "--template", "nope"], GK, "template 'nope'"),
    (["--random-app-key", "--template", "azure-dps"], GK, "'id_scope' is undefined"),
    (["--random-app-key", "--registration-id-format", "X{deveui}"], GK, "upper-case"),
    (["--app-key-file", "/nonexistent/key"], GK, "AppKey file '/nonexistent/key': no such file"),
    (["--random-app-key"], {}, "group primary key: missing"),
])
def test_cli_bad_input_exit_2_nothing_written(tmp_path, args, env, match):
    out = tmp_path / "config.h"
    r = run(["header", "2CF7F12024900138" if args[:1] != ["nothex"] else "nothex", *args[args[:1] == ["nothex"]:],
             "-o", str(out)], env)
    assert r.returncode == 2, r.stderr
    assert match in r.stderr and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert not out.exists() and list(tmp_path.iterdir()) == []
