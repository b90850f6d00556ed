"""The sketches built for the real target: Debian's arduino-builder and arm-none-eabi-gcc with Seeed's SAMD core
(board rolawan), its LoRaWan library and MCCI arduino-lmic, all from the shared kit (tests/samd_kit.py says
where; these tests skip, saying what is missing, without it). Every sketch with every template it takes and
every band, incrementally in one build folder per sketch; the flash size of each; the bossac guard against
the real rolawan properties and the real Debian bossac; and --upload --builder arduino-builder end to end
against the board simulator, with a stand-in bossac (no SAM-BA device here) speaking a SAM-BA subset.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
from fixtures_dps import ID_SCOPE
from fixtures_sketch import APP_KEY, JOIN_EUI
from samd_kit import core_dir, need_kit_and_toolchain
from test_provision import run_cli

from flasher.arduino import (
    ArduinoBuilder,
    ArduinoError,
    bossac_problem,
    bossac_version,
    default_sketch,
    flash_size,
    parse_properties,
    run_tool,
)
from flasher.bands import BANDS
from flasher.eui import EUI64
from flasher.header import build_header_data, render_header, shipped_templates
from flasher.ledger import Ledger

SKETCHES = Path(__file__).parent / "sketches"
FLASH_MAX = 262144  # boards.txt rolawan.upload.maximum_size (the 8 KB bootloader comes off it)
DEV = "2CF7F12024900138"


def header(template: str, band: str) -> str:
    return render_header(build_header_data(EUI64.parse(DEV), app_key=APP_KEY, app_key_source="given", join_eui=JOIN_EUI,
                                           band=band, id_scope="0ne00000001",
                                           device_key="Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc="), template)


@pytest.fixture(scope="session")
def core_cache(tmp_path_factory) -> Path:
    """core.a built once for every worker: the first takes the lock and fills the cache."""
    need_kit_and_toolchain()
    root = tmp_path_factory.getbasetemp().parent  # shared by the xdist workers of one run
    cache = root / "samd-core-cache"
    cache.mkdir(exist_ok=True)
    with open(root / "samd-core-cache.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (cache / "done").exists():
            tool = ArduinoBuilder(need_kit_and_toolchain(), cache=cache)
            work = root / "samd-core-warmup"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            (work / "config.h").write_text(header("seeed-lorawan", "EU868"))
            tool.build(default_sketch(), work / "config.h", build_parent=work)
            (cache / "done").write_text("")
    return cache


class Incremental:
    """One sketch copy and one build folder, rebuilt per header: what changes is recompiled (~0.5 s)."""

    def __init__(self, sketch: Path, tmp: Path, cache: Path):
        self.tool = ArduinoBuilder(need_kit_and_toolchain(), cache=cache)
        self.work = tmp / sketch.name
        shutil.copytree(sketch, self.work)
        self.build = tmp / "build"
        self.build.mkdir()

    def __call__(self, config: str | None) -> int:
        if config is not None:
            (self.work / "config.h").write_text(config)
        out = run_tool([*self.tool._args(self.build), "-compile", str(self.work / f"{self.work.name}.ino")],
                       "arduino-builder compile", timeout=300)
        size = flash_size(out)
        assert size is not None and 0 < size < FLASH_MAX - 8192, out[-500:]
        return size


def test_at_passthrough_builds(tmp_path, core_cache):
    size = Incremental(default_sketch().parent / "at_passthrough", tmp_path, core_cache)(None)
    assert size < 50000  # the core's USB CDC stack is most of it


def test_flasher_otaa_builds_for_every_band(tmp_path, core_cache):
    build = Incremental(default_sketch(), tmp_path, core_cache)
    sizes = {band: build(header("seeed-lorawan", band)) for band in BANDS}
    assert 40000 < min(sizes.values()) and max(sizes.values()) - min(sizes.values()) < 64, sizes  # band names only


@pytest.mark.parametrize("template", ["lmic", "azure-dps"])
def test_flasher_otaa_refuses_a_header_of_another_template(tmp_path, core_cache, template):
    build = Incremental(default_sketch(), tmp_path, core_cache)
    with pytest.raises(ArduinoError, match="arduino-builder compile failed .*config.h was not generated with the "
                                           "seeed-lorawan template"):
        build(header(template, "EU868"))


@pytest.mark.parametrize("band", ["EU868", "US915"])
def test_lmic_sketch_links_the_lmic_header_against_the_real_lmic(tmp_path, core_cache, band):
    assert Incremental(SKETCHES / "lmic_otaa", tmp_path, core_cache)(header("lmic", band)) > 15000


MACROS = ["FLASHER_DEV_EUI", "FLASHER_APP_EUI", "FLASHER_JOIN_EUI", "FLASHER_APP_KEY", "FLASHER_APP_KEY_SOURCE",
          "FLASHER_BAND", "FLASHER_TOOL_VERSION", "FLASHER_DPS_ID_SCOPE", "FLASHER_DPS_REGISTRATION_ID",
          "FLASHER_DPS_DEVICE_KEY", "FLASHER_LORA_BAND", "FLASHER_DPS_GLOBAL_ENDPOINT", "FLASHER_MEMCPY_P",
          "FLASHER_CONFIG_H"]  # the include guard too, so the next band's header is read


@pytest.mark.parametrize("template", ["seeed-lorawan", "lmic", "azure-dps"])
def test_every_band_of_a_template_compiles_for_the_target(tmp_path, core_cache, template):
    """One sketch includes the header of every band, each in a namespace of its own (one build, not eleven),
    and uses what it defines: the seeed-lorawan band token as the real library's enum."""
    assert set(shipped_templates()) == {"seeed-lorawan", "lmic", "azure-dps"}
    probe = tmp_path / "src" / "band_probe"
    probe.mkdir(parents=True)
    lines = ["#include <LoRaWan.h>", "#include <string.h>", "static unsigned long total;"]
    for n, band in enumerate(BANDS):
        dev = f"{DEV[:14]}{n:02X}"  # a DevEUI per band, so each value is told apart
        (probe / f"config_{band}.h").write_text(header(template, band).replace(DEV, dev))
        lines += [f"namespace b{n} {{", f'#include "config_{band}.h"',
                  "static const char *values[] = {FLASHER_DEV_EUI, FLASHER_DPS_REGISTRATION_ID};",
                  "#ifdef FLASHER_LORA_BAND", "static const _physical_type_t band = FLASHER_LORA_BAND;", "#else",
                  "static const int band = 0;", "#endif", "}"] + [f"#undef {m}" for m in MACROS]
        lines.append(f"static void use{n}() {{ total += strlen(b{n}::values[0]) + strlen(b{n}::values[1]) "
                     f"+ (unsigned long)b{n}::band; }}")
    lines += ["void setup() {"] + [f"  use{n}();" for n in range(len(BANDS))]
    lines += ["  SerialUSB.println(total);", "}", "void loop() {}"]
    (probe / "band_probe.ino").write_text("\n".join(lines) + "\n")
    Incremental(probe, tmp_path, core_cache)(None)


# --- the bossac guard, on the real rolawan properties ----------------------------------------

def rolawan(**over: str) -> dict[str, str]:
    """platform.txt plus boards.txt's rolawan.* as the board's properties (what -dump-prefs shows)."""
    core = core_dir()
    props = parse_properties((core / "platform.txt").read_text())
    prefix = "rolawan."
    props.update({k[len(prefix):]: v for k, v in parse_properties((core / "boards.txt").read_text()).items()
                  if k.startswith(prefix)})
    props.update(over)
    return props


def test_guard_on_the_real_rolawan_properties():
    props = rolawan(**{"runtime.tools.bossac-1.7.0-arduino3.path": "/opt/arduino/tools/bossac/1.7.0-arduino3"})
    assert props["upload.tool"] == "bossac" and bossac_problem(props) is None  # the core's own bossac 1.7
    # A bossac >= 1.8 put where the core's tool points, with the core's pattern (no --offset): refused.
    problem = bossac_problem(props, version="1.9.1")
    assert problem and "'bossac' is bossac 1.9.1" in problem and "erase the SAMD21 bootloader" in problem
    # The old guard accepted this, because another tool's pattern (bossac18) has --offset.
    assert "--offset" in props["tools.bossac18.upload.pattern"] and bossac_problem(props, version="1.8.0") is not None
    # A board on bossac18 with its offset given is safe; with upload.offset missing it is not.
    b18 = {**props, "upload.tool": "bossac18", "runtime.tools.bossac-1.8.0-48-gb176eee.path": "/opt/bossac/1.8.0-48"}
    assert bossac_problem({**b18, "upload.offset": "0x2000"}) is None
    assert "bossac 1.8.0-48-gb176eee" in (bossac_problem(b18) or "")
    assert bossac_problem(rolawan(**{"upload.tool": "openocd"}), version="1.9.1") is None


def test_guard_refuses_debians_real_bossac_with_the_core_recipe():
    bossac = shutil.which("bossac")
    if bossac is None:
        pytest.skip("Debian's bossac is not installed (apt-get install bossa-cli)")
    version = bossac_version(bossac)
    assert version and version.startswith("1.9")
    assert "erase the SAMD21 bootloader" in (bossac_problem(rolawan(), version) or "")


# --- --upload --builder arduino-builder, end to end ------------------------------------------

STAND_IN_BOSSAC = r'''#!{python}
"""A stand-in bossac: no SAM-BA device exists here. Says its version like BOSSA; uploads over the simulator's
SAM-BA subset (N#, V#, S<addr>,<size>#<bytes>, G<addr>#). Records its arguments."""
import json, os, sys, time
import serial
args = sys.argv[1:]
if "--help" in args:
    print("Basic Open Source SAM-BA Application (BOSSA) Version " + os.environ.get("STAND_IN_BOSSAC_VERSION", "1.7.0-arduino3"))
    sys.exit(0)
with open(os.environ["STAND_IN_BOSSAC_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
port = next(a.split("=", 1)[1] for a in args if a.startswith("--port="))
image = open(args[-2], "rb").read()
with serial.Serial("/dev/" + port, 921600, timeout=2) as s:
    s.write(b"N#"); assert s.read(2) == b"\n\r"
    s.write(b"V#"); print(s.read_until(b"\n\r").decode().strip())
    s.write(b"S%08X,%X#" % (0x2000, len(image)) + image + b"G00002000#")
    time.sleep(0.2)
'''


@pytest.fixture
def stand_in_bossac(tmp_path, monkeypatch):
    exe = tmp_path / "bin" / "bossac"
    exe.parent.mkdir()
    exe.write_text(STAND_IN_BOSSAC.replace("{python}", sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "bossac.jsonl"
    monkeypatch.setenv("STAND_IN_BOSSAC_LOG", str(log))
    return exe, log


def test_upload_with_arduino_builder_follows_the_board_by_location_then_serial_number(
        sim_boards, sim_env, dps_emulator, stand_in_bossac, tmp_path, core_cache):
    kit = need_kit_and_toolchain()
    bossac, log = stand_in_bossac
    sim = sim_boards(2, seed=501)
    sim_env(sim)
    b = sim.boards[1]
    proc = run_cli("provision", "--serial-number", b.serial_number, "--id-scope", ID_SCOPE, "--dps-host",
                   dps_emulator.host, "--ca-cert", str(dps_emulator.ca_cert_path), "--ledger", str(tmp_path / "l.db"),
                   "--out-dir", str(tmp_path / "h"), "--join-eui", JOIN_EUI, "--upload", "--builder", "arduino-builder",
                   "--samd-core", str(kit), "--bossac", str(bossac), "--json",
                   env_extra={"FLASHER_SIMULATED_PORTS": str(sim.ports_file), "STAND_IN_BOSSAC_LOG": str(log)},
                   timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "provisioned"
    with Ledger(tmp_path / "l.db", create=False, readonly=True) as ledger:  # followed to the sketch's new port
        rec = ledger.get(b.deveui)
        assert (rec.port, rec.serial_number, rec.steps["upload"]) == (b.port, b.serial_number, "ok")
    # The core's recipe ran on the bootloader's port (found by location), with the built image.
    [args] = [json.loads(line) for line in log.read_text().splitlines()]
    assert args[:2] == ["--port=" + args[0].split("=", 1)[1], "-U"] and args[-1] == "-R"
    assert args[-2].endswith("/flasher_otaa.ino.bin") and "-e" in args and "-w" in args
    # The simulator read flasher_otaa's banner, with this board's DevEUI, from the image it was sent.
    assert (b.eeprom.firmware, b.eeprom.firmware_deveui) == ("flasher_otaa", b.deveui)
    assert sim.boards[0].eeprom.firmware == "at_passthrough"
    assert not (tmp_path / "h" / ".flasher-build").exists()
    ok = run_cli("verify", "--port", b.port, "--expect", b.deveui, "--join-eui", JOIN_EUI)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_upload_with_a_bossac_that_would_erase_the_bootloader_is_refused_before_the_touch(
        sim_boards, sim_env, stand_in_bossac, tmp_path, monkeypatch, core_cache):
    kit = need_kit_and_toolchain()
    bossac, log = stand_in_bossac
    monkeypatch.setenv("STAND_IN_BOSSAC_VERSION", "1.9.1")
    sim = sim_boards(1, seed=502)
    sim_env(sim)
    hdr = tmp_path / "config.h"
    hdr.write_text(header("seeed-lorawan", "EU868"))
    port = sim.ports[0]
    with pytest.raises(ArduinoError, match=r"refusing to upload to .*bossac 1\.9\.1.*erase the SAMD21 bootloader"):
        ArduinoBuilder(kit, bossac=str(bossac), cache=core_cache).build_and_upload(
            default_sketch(), hdr, port, build_parent=tmp_path, location="sim-0")
    assert not sim.boards[0].bootloader and sim.ports[0] == port and not log.exists()


def test_flasher_build_prints_the_size_and_writes_private_images(tmp_path, core_cache):
    kit = need_kit_and_toolchain()
    hdr = tmp_path / "config.h"
    hdr.write_text(header("seeed-lorawan", "US915"))
    proc = run_cli("build", str(hdr), "--builder", "arduino-builder", "--samd-core", str(kit), "-o", str(tmp_path / "out"),
                   env_extra={"FLASHER_BUILD_CACHE": str(core_cache)}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    name, size, maximum, builder = proc.stdout.rstrip("\n").split("\t")
    assert (name, int(maximum), builder) == ("flasher_otaa", FLASH_MAX, "arduino-builder") and 40000 < int(size) < FLASH_MAX
    images = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert images == ["flasher_otaa.ino.bin", "flasher_otaa.ino.elf", "flasher_otaa.ino.hex",
                      "flasher_otaa.ino.with_bootloader.hex"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()} == {0o600}
    assert int(size) <= os.path.getsize(tmp_path / "out" / "flasher_otaa.ino.bin") < int(size) + 1024
