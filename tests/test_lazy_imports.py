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
