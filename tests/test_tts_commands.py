"""`flasher tts register` and `flasher tts export` for boards provisioned without The Things Stack.

The boards are provisioned once for the module (simulated boards, DPS emulator, no
--tts-app, so the network step is skipped with its reason); each test works on its
own copy of that ledger. The export files are read back by a parser written here from
the stack's own import rules (pkg/devicetemplates/ttscsv.go, ttsjson.go), not by
flasher's code, and what it reads is then registered on the emulated stack.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import sqlite3
import stat
from concurrent.futures import ThreadPoolExecutor

import pytest
from fixtures_dps import GROUP_PRIMARY, ID_SCOPE
from fixtures_tts import APP, end_device, tts_target

from flasher.eui import EUI64
from flasher.keys import AppKeyPlan, derive_app_key
from flasher.ledger import Ledger
from flasher.pipeline import Settings, provision_boards
from flasher.sim.board import BoardSimulator
from flasher.tts import SERVERS, TtsClient, read_back

MASTER = "tts commands tests: a master secret"
JOIN_EUI = "70B3D57ED003F06A"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, dps_emulator):
    """Three boards provisioned without The Things Stack: two with a header that carries the AppKey
    (random, the shipped seeed-lorawan template), one whose header does not (derived, azure-dps)."""
    base = tmp_path_factory.mktemp("fleet")
    with BoardSimulator(count=3, state_dir=base / "boards", seed=1900) as sim:
        common = dict(id_scope=ID_SCOPE, group_key=base64.b64decode(GROUP_PRIMARY), dps_host=dps_emulator.host,
                      ca_cert=str(dps_emulator.ca_cert_path), out_dir=base / "headers", test_message=None,
                      join_eui=EUI64.parse(JOIN_EUI), timeout=30.0)
        with Ledger(base / "ledger.sqlite3") as ledger, ThreadPoolExecutor(2) as pool:   # the two overlap
            runs = [pool.submit(lambda: list(provision_boards(sim.ports[:2], Settings(**common), ledger))),
                    pool.submit(lambda: list(provision_boards(sim.ports[2:], Settings(
                        **common, template="azure-dps", app_key=AppKeyPlan.derived_from(MASTER)), ledger)))]
            done = [r for run in runs for r in run.result()]
        assert [r.status for r in done] == ["provisioned"] * 3, [r.error for r in done]
        keys = {b.deveui: b.state["appkey"] for b in sim.boards}
    return base, keys


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    for var in [v for v in os.environ if v.startswith("FLASHER_")]:
        monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def bench(fleet, tmp_path, clean_env):
    """A copy of the fleet's ledger (the headers are shared, read only)."""
    base, keys = fleet
    ledger = tmp_path / "ledger.sqlite3"
    shutil.copyfile(base / "ledger.sqlite3", ledger)
    return ledger, keys


def test_tts_register_from_the_ledger_registers_and_records_each_board(bench, make_tts, cli, monkeypatch):
    ledger, keys = bench
    rows = sqlite3.connect(ledger).execute("SELECT outcome, detail FROM steps WHERE step = 'network'").fetchall()
    assert rows == [("skipped", "--tts-app not given")] * len(keys)    # provisioned without --tts-app
    tts = make_tts()
    monkeypatch.setenv("FLASHER_TTS_API_KEY", tts.add_api_key(app=APP))
    monkeypatch.setenv("FLASHER_APPKEY_MASTER", MASTER)   # the azure-dps board's header lacks its AppKey
    argv = ["tts", "register", "--ledger", ledger, "--tts-app", APP, "--tts-url", tts.url,
            "--tts-ca-cert", tts.ca_cert_path, "--json"]
    code, out, err = cli(*argv)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["deveui"] for r in rows) == sorted(keys)
    assert {r["status"] for r in rows} == {"registered"} and all(r["servers"] == list(SERVERS) for r in rows)
    for deveui, module_key in keys.items():
        assert tts.app_key(APP, f"eui-{deveui.lower()}") == module_key
    with Ledger(ledger, create=False, readonly=True) as led:
        for rec in led.all():
            assert rec.status == "provisioned"                 # a step run on its own leaves the status alone
            assert rec.steps["network"] == "ok" and rec.tts_servers == "is,js,ns,as"
            assert rec.tts_app == APP and rec.tts_device_id == f"eui-{rec.deveui.lower()}"
    # a rerun asks the stack nothing
    requests = tts.stats["requests"]
    code, out, err = cli(*argv)
    assert code == 0 and {json.loads(x)["status"] for x in out.splitlines()} == {"already_registered"}
    assert tts.stats["requests"] == requests


def test_tts_register_deveuis_with_an_appkey_source_needs_no_ledger(clean_env, make_tts, cli, monkeypatch, tmp_path):
    tts = make_tts()
    monkeypatch.setenv("FLASHER_TTS_API_KEY", tts.add_api_key(app=APP))
    (tmp_path / "master.txt").write_text(MASTER + "\n")
    euis = ["2CF7F12024900A01", "2CF7F12024900A02"]
    code, out, err = cli("tts", "register", *euis, "--app-key-source", "derived", "--app-key-master-file",
                         tmp_path / "master.txt", "--band", "US915", "--join-eui", JOIN_EUI, "--tts-app", APP,
                         "--tts-url", tts.url, "--tts-ca-cert", tts.ca_cert_path)
    assert code == 0, err
    assert sorted(line.split("\t")[0] for line in out.splitlines()) == euis
    assert "2/2 boards registered" in err and MASTER not in out + err
    for e in euis:
        eui = EUI64.parse(e)
        assert tts.app_key(APP, f"eui-{eui.lower}") == derive_app_key(MASTER.encode(), eui).hex().upper()
        assert tts.device(APP, f"eui-{eui.lower}")["ns"]["frequency_plan_id"] == "US_902_928_FSB_2"


# --- the export, read back by the stack's rules -----------------------------------------------

KNOWN_CSV_COLUMNS = {"id", "dev_eui", "join_eui", "app_eui", "name", "description", "frequency_plan_id",
                     "lorawan_version", "lorawan_phy_version", "brand_id", "model_id", "hardware_version",
                     "firmware_version", "band_id", "vendor_id", "vendor_profile_id", "app_key", "nwk_key",
                     "rx1_delay", "supports_32_bit_f_cnt", "dev_addr", "app_s_key", "f_nwk_s_int_key",
                     "last_f_cnt_up", "last_n_f_cnt_down", "last_a_f_cnt_down", "supports_class_c"}


def stack_reads_csv(data: bytes) -> list[dict]:
    """The Things Stack CSV as ttscsv.go reads it: BOM dropped; the separator is ';' unless the first line has
    no ';' but a ','; leading spaces trimmed; only known columns; an app_key sets supports_join; a missing id
    becomes eui-<dev_eui lower-case>."""
    text = data.decode("utf-8").lstrip("\ufeff")
    first = text.splitlines()[0]
    comma = ";" if ";" in first else "," if "," in first else ";"
    rows = list(csv.reader(io.StringIO(text), delimiter=comma, skipinitialspace=True))
    header, body = rows[0], rows[1:]
    known = [i for i, name in enumerate(header) if name in KNOWN_CSV_COLUMNS]
    assert known, "no known columns in CSV header"
    devices = []
    for row in body:
        dev: dict = {"ids": {}}
        for i in known:
            name, value = header[i], row[i]
            if name == "id":
                dev["ids"]["device_id"] = value
            elif name in ("dev_eui", "join_eui", "app_eui"):
                assert len(bytes.fromhex(value)) == 8
                dev["ids"]["join_eui" if name == "app_eui" else name] = value.upper()
            elif name == "app_key":
                assert len(bytes.fromhex(value)) == 16
                dev["root_keys"] = {"app_key": {"key": value.upper()}}
                dev["supports_join"] = True
            else:
                dev[name] = value
        if "device_id" not in dev["ids"] and "dev_eui" in dev["ids"]:
            dev["ids"]["device_id"] = "eui-" + dev["ids"]["dev_eui"].lower()
        devices.append(dev)
    return devices


def stack_reads_json(data: bytes) -> list[dict]:
    """The Things Stack JSON as ttsjson.go reads it: a stream of EndDevice objects, one after another."""
    text, pos, devices = data.decode("utf-8"), 0, []
    decoder = json.JSONDecoder()
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return devices
        dev, pos = decoder.raw_decode(text, pos)
        devices.append(dev)


def import_like_the_console(tts, key: str, app: str, devices: list[dict]) -> None:
    """Create each imported end device on the four servers, as the console's import does (raw requests)."""
    import http.client
    import ssl

    ctx = ssl.create_default_context(cafile=str(tts.ca_cert_path))
    for dev in devices:
        ids = {**dev["ids"], "application_ids": {"application_id": app}}
        dev_id = ids["device_id"]
        ns = {k: dev[k] for k in ("frequency_plan_id", "lorawan_version", "lorawan_phy_version", "supports_join")}
        calls = [("POST", f"/api/v3/applications/{app}/devices", {"ids": ids}, ["ids.dev_eui", "ids.join_eui"]),
                 ("PUT", f"/api/v3/js/applications/{app}/devices/{dev_id}", {"ids": ids, "root_keys": dev["root_keys"]},
                  ["root_keys.app_key.key"]),
                 ("PUT", f"/api/v3/ns/applications/{app}/devices/{dev_id}", {"ids": ids, **ns}, sorted(ns)),
                 ("PUT", f"/api/v3/as/applications/{app}/devices/{dev_id}", {"ids": ids}, [])]
        for method, path, body, paths in calls:
            conn = http.client.HTTPSConnection("127.0.0.1", tts.port, context=ctx, timeout=10)
            try:
                conn.request(method, path, json.dumps({"end_device": body, "field_mask": {"paths": paths}}),
                             {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
                resp = conn.getresponse()
                assert resp.status == 200, (path, resp.read())
                resp.read()
            finally:
                conn.close()


def test_export_files_import_by_the_stacks_rules(bench, cli, monkeypatch, make_tts, tmp_path):
    ledger, keys = bench
    monkeypatch.setenv("FLASHER_APPKEY_MASTER", MASTER)   # the azure-dps board's header lacks its AppKey
    for fmt, reader in (("tts-csv", stack_reads_csv), ("tts-json", stack_reads_json)):
        out = tmp_path / f"fleet.{fmt}"
        code, stdout, err = cli("tts", "export", "--format", fmt, "-o", out, "--ledger", ledger, "--tts-app", APP)
        assert code == 0, err
        assert stdout == "" and f"wrote 3 end device(s) to {out}" in err and "0600" in err
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        devices = reader(out.read_bytes())
        assert sorted(d["ids"]["dev_eui"] for d in devices) == sorted(keys)
        for d in devices:
            deveui = d["ids"]["dev_eui"]
            assert d["ids"]["device_id"] == f"eui-{deveui.lower()}" and d["ids"]["join_eui"] == JOIN_EUI
            assert d["root_keys"]["app_key"]["key"] == keys[deveui] and d["supports_join"] in (True, "true")
            assert (d["frequency_plan_id"], d["lorawan_version"], d["lorawan_phy_version"]) == \
                ("EU_863_870_TTN", "MAC_V1_0_2", "PHY_V1_0_2_REV_B")
            if fmt == "tts-json":
                assert d["ids"]["application_ids"] == {"application_id": APP}
        # and the stack takes them as they are
        tts = make_tts()
        key = tts.add_api_key(app=APP)
        import_like_the_console(tts, key, APP, devices)
        with TtsClient(tts_target(tts, key)) as client:
            for d in devices:
                copies = read_back(client, end_device(d["ids"]["dev_eui"], join_eui=EUI64.parse(JOIN_EUI)))
                assert all(copies[s] is not None for s in SERVERS)
                assert copies["js"]["root_keys"]["app_key"]["key"] == keys[d["ids"]["dev_eui"]]
    # no API key, no URL, no application: the JSON then names none
    monkeypatch.delenv("FLASHER_TTS_API_KEY", raising=False)
    code, _, err = cli("tts", "export", "--format", "tts-json", "-o", tmp_path / "x.json", "--ledger", ledger)
    assert code == 0, err
    assert all("application_ids" not in d["ids"] for d in stack_reads_json((tmp_path / "x.json").read_bytes()))
    # a board whose AppKey is unknown (its header is gone) is left out, and the exit code says so
    with Ledger(ledger, create=False, readonly=True) as led:
        lost = next(r for r in led.all() if r.app_key_source == "random")
    db = sqlite3.connect(ledger)
    db.execute("UPDATE boards SET header_path = ? WHERE deveui = ?", (str(tmp_path / "gone.h"), lost.deveui))
    db.commit()
    db.close()
    out = tmp_path / "fleet.csv"
    code, stdout, err = cli("tts", "export", "--format", "tts-csv", "-o", out, "--ledger", ledger)
    assert code == 1
    assert f"warning: left out {lost.deveui}: header" in err and "is missing" in err
    assert sorted(d["ids"]["dev_eui"] for d in stack_reads_csv(out.read_bytes())) == \
        sorted(k for k in keys if k != lost.deveui)


def test_flasher_toml_sets_the_stack_and_references_its_key(clean_env, make_tts, cli, tmp_path):
    """Every TTS setting from flasher.toml (paths relative to it), the API key only by reference."""
    tts = make_tts()
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "tts.key").write_text(tts.add_api_key(app=APP) + "\n")
    (tmp_path / "secrets" / "appkey.txt").write_text("2B7E151628AED2A6ABF7158809CF4F3C\n")
    shutil.copyfile(tts.ca_cert_path, tmp_path / "tts-ca.pem")
    (tmp_path / "flasher.toml").write_text(
        f'tts_app = "{APP}"\ntts_url = "{tts.url}"\ntts_ca_cert = "tts-ca.pem"\ntts_api_key_file = "secrets/tts.key"\n'
        f'app_key_file = "secrets/appkey.txt"\ntts_device_id_format = "rhf76-{{deveui}}"\n'
        f'frequency_plan = "EU_863_870"\nlorawan_phy_version = "RP001_V1_0_2"\ntts_timeout = 20\n')
    code, out, err = cli("tts", "register", "2CF7F12024900B01", "--app-key-source", "given", "--json")
    assert code == 0, err
    assert json.loads(out)["device_id"] == "rhf76-2cf7f12024900b01"
    ns = tts.device(APP, "rhf76-2cf7f12024900b01")["ns"]
    assert (ns["frequency_plan_id"], ns["lorawan_phy_version"]) == ("EU_863_870", "PHY_V1_0_2_REV_A")
    assert tts.app_key(APP, "rhf76-2cf7f12024900b01") == "2B7E151628AED2A6ABF7158809CF4F3C"
    code, out, _ = cli("config")
    assert "tts_api_key" in out and "secrets/tts.key" in out and "NNSXS" not in out
