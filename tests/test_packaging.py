"""Build the wheel, install it into a fresh venv, and use it from another directory.

Proves that the templates and firmware ship as package data and are found by
importlib.resources when flasher is installed for real (not from the source tree).
The venv sees this interpreter's dependencies through a .pth file, so nothing is
downloaded at install time (`pip install --no-deps`); the wheel is built by `python -m build`
with this interpreter's setuptools (no isolated build environment to install each run).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
GOLDEN_GROUP_KEY = "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw=="


def sh(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # Build from a copy, so the shared working tree gets no build/ or egg-info churn.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "config.h")
    for name in ("flasher", "templates", "firmware"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out = tmp_path_factory.mktemp("dist")
    # No isolated build env (it would install setuptools into a fresh venv every run): this interpreter's own
    # setuptools builds it, exactly as the isolated build would.
    sh([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", out, src])
    (whl,) = out.glob("flasher-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False, clear=True).create(env_dir)   # this interpreter's pip installs into it
    py = env_dir / "bin" / "python"
    site = Path(sh([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # Dependencies (click, jinja2, ...) come from the interpreter running the tests, after the venv's own.
    (site / "zz_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: a flasher visible through the .pth (CI installs one) must not satisfy this
    sh([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "--no-build-isolation",
        "--ignore-installed", wheel])
    return env_dir


def test_wheel_carries_templates_and_sketches(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for must in ("flasher/templates/seeed-lorawan.h.j2", "flasher/templates/lmic.h.j2",
                 "flasher/templates/azure-dps.h.j2", "flasher/templates/_common.h.j2",
                 "flasher/firmware/flasher_otaa/flasher_otaa.ino",
                 "flasher/firmware/at_passthrough/at_passthrough.ino", "flasher/cliteral.py", "flasher/header.py"):
        assert must in names, must


def test_installed_flasher_finds_its_templates(installed, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLASHER_", "PYTHON"))}
    env["FLASHER_GROUP_PRIMARY_KEY"] = GOLDEN_GROUP_KEY
    py, exe = installed / "bin" / "python", installed / "bin" / "flasher"
    where = sh([py, "-c", "import flasher, flasher.templates as t; print(flasher.__file__); print(t.__file__)"],
               cwd=tmp_path, env=env).stdout.split()
    assert all(p.startswith(str(installed)) for p in where), where  # the wheel, not the source tree

    assert "Usage: flasher" in sh([py, "-m", "flasher", "--help"], cwd=tmp_path, env=env).stdout
    for template in ("seeed-lorawan", "lmic"):
        r = sh([exe, "header", "2CF7F12024900138", "--random-app-key", "--template", template, "-o", "cfg/config.h"],
               cwd=tmp_path, env=env)
        text = (tmp_path / "cfg" / "config.h").read_text()
        assert '#define FLASHER_DEV_EUI "2CF7F12024900138"' in text and "wrote cfg/config.h" in r.stderr
    assert "DEVEUI[8] = { 0x38, 0x01" in text

    sketches = sh([py, "-c", "from importlib.resources import files; "
                             "print(sorted(p.name for p in files('flasher.firmware').iterdir() if p.is_dir()))"],
                  cwd=tmp_path, env=env).stdout
    assert "'at_passthrough'" in sketches and "'flasher_otaa'" in sketches
