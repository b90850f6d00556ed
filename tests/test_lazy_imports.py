"""Start-up matters: commands that do not register or render must not import the Azure SDK or Jinja2 (nor psycopg)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fixtures_dps import GROUP_PRIMARY

from flasher.ledger import Ledger

HEAVY = ("azure", "paho", "jinja2", "psycopg")  # psycopg: only a postgresql:// ledger needs it


def loaded_after(argvs: list[list[str]], env_extra=None) -> set[str]:
    code = ("import json, sys\n"
            "from flasher.cli import cli\n"
            f"for argv in {argvs!r}:\n"
            "    cli.main(args=argv, standalone_mode=False)\n"
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))\n")
    env = {**os.environ, "FLASHER_GROUP_PRIMARY_KEY": GROUP_PRIMARY, **(env_extra or {})}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    return set(json.loads(p.stdout.splitlines()[-1]))


def test_board_and_ledger_commands_stay_light(sim_boards, tmp_path):
    sim = sim_boards(1, seed=5)
    ledger = tmp_path / "l.sqlite3"
    Ledger(ledger).close()
    argvs = [["keys", "2cf7f12024900138", "--format", "json"], ["ports", "--json"],
             ["eui", "--port", sim.ports[0], "--json"],
             ["verify", "--port", sim.ports[0], "--expect", sim.boards[0].deveui],
             ["status", "--ledger", str(ledger), "--json"], ["provision", "--help"], ["demo", "--help"],
             ["tts", "--help"], ["tts", "register", "--help"],
             ["tts", "export", "--format", "tts-csv", "-o", str(tmp_path / "fleet.csv"), "--ledger", str(ledger)]]
    assert loaded_after(argvs, {"FLASHER_SIMULATED_PORTS": str(sim.ports_file)}) == set()


def test_header_needs_jinja2_but_not_the_sdk(tmp_path):
    argvs = [["header", "2CF7F12024900138", "--random-app-key", "--id-scope", "0ne00000001", "-o",
              str(tmp_path / "h.h")]]
    assert loaded_after(argvs) == {"jinja2"}


def test_keys_starts_without_logging_toml_json_or_getpass():
    """What `flasher keys ID` needs beyond click is hashing: the rest is loaded only by the commands that use it.
    (Not pathlib: click does not need it, nor does flasher for this, but an editable install's import hook does.)"""
    code = ("import sys\n"
            "from flasher.cli import cli\n"
            "cli.main(args=['keys', '2CF7F12024900138'], standalone_mode=False)\n"
            "print(sorted({'logging', 'tomllib', 'json', 'getpass'} & set(sys.modules)))\n")
    env = {**os.environ, "FLASHER_GROUP_PRIMARY_KEY": GROUP_PRIMARY}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, cwd="/")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1] == "[]"


def test_logging_loaded_after_the_command_started_is_configured_and_masks_secrets():
    """Logging is set up as it is first imported: the format, the level and the Redactor are the same as ever."""
    code = ("import sys\n"
            "from flasher.cli import cli\n"
            "cli.main(args=['keys', '2CF7F12024900138'], standalone_mode=False)\n"
            "assert 'logging' not in sys.modules\n"
            "import logging\n"
            f"logging.getLogger('flasher.later').warning('key %s', {GROUP_PRIMARY!r})\n"
            "logging.getLogger('flasher.later').info('not shown')\n"
            "logging.getLogger('azure.x').error('quiet unless -vv')\n")
    env = {**os.environ, "FLASHER_GROUP_PRIMARY_KEY": GROUP_PRIMARY}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, cwd="/")
    assert p.returncode == 0, p.stderr
    assert p.stderr == "WARNING flasher.later: key ********\n"
