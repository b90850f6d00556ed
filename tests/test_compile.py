"""Generated headers are valid C (and C++) and carry the exact bytes: compiled with the real gcc.

For every shipped template, a small host program #includes the rendered header
(twice: the include guard must hold), prints every value back as hex, and the
test compares that with the inputs. The property test pushes arbitrary text
through --set extras and the registration id, batched several per compile.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flasher.eui import EUI64
from flasher.header import build_header_data, render_header, shipped_templates
from flasher.keys import decode_symmetric_key, derive_app_key, derive_device_key

GOLDEN_GROUP_KEY = "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw=="
DEV = EUI64.parse("2CF7F12024900138")
JOIN = EUI64.parse("70B3D57ED003F06A")
APP_KEY = bytes.fromhex("2B7E151628AED2A6ABF7158809CF4F3C")
REG_ID = "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6"
DEVICE_KEY = derive_device_key(decode_symmetric_key(GOLDEN_GROUP_KEY), REG_ID)

# What each template must define: string macros, byte arrays, LMIC callbacks, stringified tokens.
EXPECT = {
    "seeed-lorawan": {"strings": ["FLASHER_DEV_EUI", "FLASHER_APP_EUI", "FLASHER_JOIN_EUI", "FLASHER_APP_KEY",
                                  "FLASHER_APP_KEY_SOURCE", "FLASHER_BAND", "FLASHER_TOOL_VERSION",
                                  "FLASHER_DPS_ID_SCOPE", "FLASHER_DPS_REGISTRATION_ID", "FLASHER_DPS_DEVICE_KEY"],
                      "tokens": ["FLASHER_LORA_BAND"], "arrays": {}, "callbacks": {}},
    "lmic": {"strings": ["FLASHER_DEV_EUI", "FLASHER_APP_EUI", "FLASHER_APP_KEY", "FLASHER_BAND",
                         "FLASHER_DPS_ID_SCOPE", "FLASHER_DPS_REGISTRATION_ID", "FLASHER_DPS_DEVICE_KEY"],
             "tokens": [], "arrays": {"APPEUI": 8, "DEVEUI": 8, "APPKEY": 16},
             "callbacks": {"os_getArtEui": 8, "os_getDevEui": 8, "os_getDevKey": 16}},
    "azure-dps": {"strings": ["FLASHER_DEV_EUI", "FLASHER_DPS_ID_SCOPE", "FLASHER_DPS_REGISTRATION_ID",
                              "FLASHER_DPS_DEVICE_KEY", "FLASHER_TOOL_VERSION"],
                  "tokens": [], "arrays": {}, "callbacks": {}},
}


def expected_values(band_token: str = "EU868") -> dict[str, bytes]:
    """What the host program must print for the known inputs (as bytes)."""
    return {
        "FLASHER_DEV_EUI": b"2CF7F12024900138",
        "FLASHER_APP_EUI": b"70B3D57ED003F06A",
        "FLASHER_JOIN_EUI": b"70B3D57ED003F06A",
        "FLASHER_APP_KEY": b"2B7E151628AED2A6ABF7158809CF4F3C",
        "FLASHER_APP_KEY_SOURCE": b"given",
        "FLASHER_BAND": b"EU868",
        "FLASHER_TOOL_VERSION": b"9.8.7",
        "FLASHER_DPS_ID_SCOPE": b"0ne0001A2B3",
        "FLASHER_DPS_REGISTRATION_ID": REG_ID.encode(),
        "FLASHER_DPS_DEVICE_KEY": DEVICE_KEY.encode(),
        "FLASHER_LORA_BAND": band_token.encode(),
        # LMIC: EUIs least-significant byte first, AppKey most-significant first.
        "APPEUI": bytes.fromhex("6AF003D07ED5B370"),
        "DEVEUI": bytes.fromhex("38019024 20F1F72C".replace(" ", "")),
        "APPKEY": APP_KEY,
        "os_getArtEui": bytes.fromhex("6AF003D07ED5B370"),
        "os_getDevEui": bytes.fromhex("3801902420F1F72C"),
        "os_getDevKey": APP_KEY,
    }


@pytest.fixture(scope="module")
def gcc():
    path = shutil.which("gcc")
    assert path, "these tests need gcc (apt-get install gcc)"
    return path


def host_program(strings, tokens=(), arrays=None, callbacks=None) -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stdint.h>",
        '#include "config.h"',
        '#include "config.h"  /* twice: the include guard must hold */',
        "#define STR_(x) #x",
        "#define STR(x) STR_(x)",
        "static void hex(const char *name, const void *p, size_t n) {",
        "    const unsigned char *b = (const unsigned char *)p;",
        "    size_t i;",
        '    printf("%s ", name);',
        '    for (i = 0; i < n; i++) printf("%02x", b[i]);',
        '    printf("\\n");',
        "}",
        "int main(void) {",
    ]
    for m in strings:
        lines.append(f'    hex("{m}", {m}, sizeof({m}) - 1);')
    for m in tokens:
        lines.append(f'    hex("{m}", STR({m}), sizeof(STR({m})) - 1);')
    for name, n in (arrays or {}).items():
        lines.append(f'    hex("{name}", {name}, sizeof({name}));')
        lines.append(f'    if (sizeof({name}) != {n}) return 3;')
    for fn, n in (callbacks or {}).items():
        lines.append(f"    {{ uint8_t buf[{n}]; {fn}(buf); hex(\"{fn}\", buf, {n}); }}")
    lines += ["    return 0;", "}"]
    return "\n".join(lines) + "\n"


def compile_and_run(gcc: str, header: str, program: str, workdir: Path, cplusplus: bool = False) -> dict[str, bytes]:
    (workdir / "config.h").write_text(header, encoding="utf-8")
    src = workdir / ("main.cpp" if cplusplus else "main.c")
    src.write_text(program, encoding="utf-8")
    exe = workdir / ("main_cpp" if cplusplus else "main_c")
    if cplusplus:
        cmd = [gcc, "-x", "c++", "-std=c++11", "-Wall", "-Wextra", "-Werror", str(src), "-o", str(exe), "-lstdc++"]
    else:
        # -std=c99 also turns trigraphs on: a stray "??/" in a literal would be caught here.
        cmd = [gcc, "-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror", "-Wno-overlength-strings",
               str(src), "-o", str(exe)]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, f"{' '.join(cmd)}\n{built.stderr}\n--- config.h ---\n{header}"
    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    out = {}
    for line in ran.stdout.splitlines():
        name, _, hexed = line.partition(" ")
        out[name] = bytes.fromhex(hexed)
    return out


def known_data(**over):
    kw = dict(join_eui=JOIN, app_key=APP_KEY, app_key_source="given", band="EU868", id_scope="0ne0001A2B3",
              registration_id=REG_ID, device_key=DEVICE_KEY, tool_version="9.8.7")
    kw.update(over)
    return build_header_data(DEV, **kw)


def test_every_shipped_template_is_covered():
    assert set(shipped_templates()) == set(EXPECT)


@pytest.mark.parametrize("cplusplus", [False, True], ids=["c99", "c++11"])
@pytest.mark.parametrize("template", sorted(EXPECT))
def test_header_compiles_and_carries_the_bytes(gcc, tmp_path, template, cplusplus):
    extras = {"WIFI_SSID": 'lab "b" \\ ??= \x7f\x1b é 🙂', "EMPTY": "", "HEXY": "\x04" + "1F"}
    header = render_header(known_data(extras=extras), template)
    spec = EXPECT[template]
    program = host_program(spec["strings"] + list(extras), spec["tokens"], spec["arrays"], spec["callbacks"])
    got = compile_and_run(gcc, header, program, tmp_path, cplusplus)
    want = expected_values()
    want.update({k: v.encode("utf-8") for k, v in extras.items()})
    names = spec["strings"] + spec["tokens"] + list(spec["arrays"]) + list(spec["callbacks"]) + list(extras)
    assert sorted(got) == sorted(names)
    for name in names:
        assert got[name] == want[name], name


@pytest.mark.parametrize("template", sorted(EXPECT))
def test_every_band_renders_and_compiles(gcc, tmp_path, template):
    """Every template x band through the host gcc, checking the band's bytes (the target build is in
    test_firmware_target.py)."""
    from flasher.bands import BANDS

    for band, token in BANDS.items():
        spec = EXPECT[template]
        strings = [m for m in ("FLASHER_BAND",) if m in spec["strings"]]
        got = compile_and_run(gcc, render_header(known_data(band=band), template),
                              host_program(strings + ["FLASHER_DEV_EUI"], spec["tokens"]), tmp_path)
        want = {"FLASHER_DEV_EUI": b"2CF7F12024900138", **({"FLASHER_BAND": band.encode()} if strings else {}),
                **({"FLASHER_LORA_BAND": token.encode()} if spec["tokens"] else {})}
        assert got == want, band


def test_eu433_is_the_seeed_librarys_eu434(gcc, tmp_path):
    header = render_header(known_data(band="eu433"), "seeed-lorawan")
    got = compile_and_run(gcc, header, host_program(["FLASHER_BAND"], ["FLASHER_LORA_BAND"]), tmp_path)
    assert got == {"FLASHER_BAND": b"EU433", "FLASHER_LORA_BAND": b"EU434"}


def test_derived_app_key_reaches_the_lmic_array_msb_first(gcc, tmp_path):
    master = b"a master secret of enough length"
    key = derive_app_key(master, DEV)
    header = render_header(known_data(app_key=key, app_key_source="derived"), "lmic")
    got = compile_and_run(gcc, header, host_program(["FLASHER_APP_KEY"], arrays={"APPKEY": 16},
                                                    callbacks={"os_getDevKey": 16}), tmp_path)
    assert got == {"FLASHER_APP_KEY": key.hex().upper().encode(), "APPKEY": key, "os_getDevKey": key}


_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
_REG_ID = st.from_regex(r"[a-z0-9\-._:]{0,40}[a-z0-9\-]", fullmatch=True)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(_TEXT, min_size=1, max_size=8), reg_id=_REG_ID, template=st.sampled_from(sorted(EXPECT)))
def test_any_string_survives_a_compiled_header(gcc, values, reg_id, template):
    extras = {f"EXTRA_{i}": v for i, v in enumerate(values)}
    header = render_header(known_data(extras=extras, registration_id=reg_id), template)
    program = host_program(["FLASHER_DPS_REGISTRATION_ID", *extras])
    with tempfile.TemporaryDirectory() as d:
        got = compile_and_run(gcc, header, program, Path(d))
    assert got.pop("FLASHER_DPS_REGISTRATION_ID") == reg_id.encode()
    assert got == {k: v.encode("utf-8") for k, v in extras.items()}
