"""Where the Seeed SAMD build kit is (the real core for ``Seeeduino:samd:rolawan``, its LoRaWan library,
CMSIS and MCCI arduino-lmic), and whether the real-target toolchain is installed.

The kit is found at ``$FLASHER_ARDUINO_SAMD`` or ``<repo>/../shared/arduino-samd``. Tests that need it
skip with a reason naming what is missing; CI has both (``.ci/run`` installs the Debian packages).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOLS = ("arduino-builder", "arm-none-eabi-g++")
PACKAGES = "arduino-builder gcc-arm-none-eabi libnewlib-arm-none-eabi libstdc++-arm-none-eabi-newlib"


def kit_path() -> Path | None:
    given = os.environ.get("FLASHER_ARDUINO_SAMD")
    for candidate in ([Path(given)] if given else []) + [REPO.parent / "shared" / "arduino-samd"]:
        if (candidate / "hardware" / "Seeeduino" / "samd" / "platform.txt").is_file():
            return candidate
    return None


def core_dir() -> Path:
    """``hardware/Seeeduino/samd`` of the kit, or skip."""
    kit = kit_path()
    if kit is None:
        pytest.skip("the Seeed SAMD kit is missing: set FLASHER_ARDUINO_SAMD or put it at ../shared/arduino-samd")
    return kit / "hardware" / "Seeeduino" / "samd"


def need_kit_and_toolchain() -> Path:
    """The kit, with arduino-builder and arm-none-eabi-g++ on PATH, or skip saying which is missing."""
    core_dir()
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"real-target build needs {', '.join(missing)} (apt-get install {PACKAGES})")
    kit = kit_path()
    assert kit is not None
    return kit
