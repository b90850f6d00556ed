"""`flasher ledger copy SRC DEST`: a bench's SQLite ledger into the fleet's PostgreSQL one, and back, whole or not at all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ledger_golden import golden

from flasher.ledger import Ledger

V1 = Path(__file__).parent / "data" / "ledger-v1.sqlite3"   # four boards, as flasher 0.1.0 wrote them


def status(cli, target) -> str:
    code, out, err = cli("status", "--ledger", target, "--json")
    assert code == 0, err
    return out


def test_a_bench_ledger_goes_to_the_server_and_back_unchanged(cli, pg_url, tmp_path):
    src = tmp_path / "bench.sqlite3"
    shutil.copyfile(V1, src)
    code, out, err = cli("ledger", "copy", src, pg_url)
    assert (code, out) == (0, "") and err == (f"copied 4 board(s) from {src} to {pg_url}: 4 new, 0 already there, "
                                              f"0 replaced (19 step rows written)\n")
    assert status(cli, pg_url) == golden("jsonl")   # every field and step, as 0.1.0 showed them
    code, _, err = cli("ledger", "copy", src, pg_url)   # again: nothing to do
    assert code == 0 and "0 new, 4 already there, 0 replaced (0 step rows written)" in err
    back = tmp_path / "back" / "ledger.sqlite3"
    code, _, err = cli("ledger", "copy", pg_url, back)
    assert code == 0 and "4 new" in err, err
    assert status(cli, back) == golden("jsonl")
    assert status(cli, src) == golden("jsonl")   # the source was only read: not even migrated
    with Ledger(back, readonly=True, create=False) as led:
        assert [r.status for r in led.all()] == ["provisioned", "failed", "in_progress", "in_progress"]


def test_a_conflict_stops_the_whole_copy_unless_forced(cli, pg_url, tmp_path):
    src = tmp_path / "bench.sqlite3"
    shutil.copyfile(V1, src)
    assert cli("ledger", "copy", src, pg_url)[0] == 0
    with Ledger(pg_url, station="bench-2") as fleet:   # the fleet ledger moves on for one board
        fleet.mark("2CF7F12024900002", "conflict", "provisioned elsewhere")
    with Ledger(src, station="bench-1") as bench:      # and the bench gets a new board
        bench.begin("2CF7F12024900009", "2cf7f12024900009")
    before = status(cli, pg_url)
    code, out, err = cli("ledger", "copy", src, pg_url)
    assert code == 1 and out == ""
    assert err == (f"error: ledger {pg_url!r}: nothing copied: 1 board(s) differ from {str(src)!r} "
                   f"(2CF7F12024900002); --force replaces them\n")
    assert status(cli, pg_url) == before   # one transaction: not even the new board went in
    code, out, err = cli("ledger", "copy", src, pg_url, "--force")
    assert code == 0 and "1 new, 3 already there, 1 replaced" in err, err
    theirs = {r["deveui"]: r for r in map(json.loads, status(cli, pg_url).splitlines())}
    ours = {r["deveui"]: r for r in map(json.loads, status(cli, src).splitlines())}
    assert theirs == ours and theirs["2CF7F12024900002"]["status"] == "failed"


def test_force_never_replaces_a_board_a_live_run_is_working_on(cli, pg_url, tmp_path):
    src = tmp_path / "bench.sqlite3"
    shutil.copyfile(V1, src)
    assert cli("ledger", "copy", src, pg_url)[0] == 0
    with Ledger(pg_url, station="bench-2") as fleet:
        fleet.claim("2CF7F12024900003")
        fleet.step_started("2CF7F12024900003", "program")
        code, _, err = cli("ledger", "copy", src, pg_url, "--force")
        assert code == 1 and "nothing copied: 1 board(s) are in progress in a run using it (2CF7F12024900003)" in err
    code, _, err = cli("ledger", "copy", src, pg_url, "--force")   # released: now it may
    assert code == 0 and "1 replaced" in err, err


def test_copying_a_ledger_onto_itself_or_from_nothing_is_refused(cli, pg_url, tmp_path):
    src = tmp_path / "bench.sqlite3"
    shutil.copyfile(V1, src)
    code, _, err = cli("ledger", "copy", src, tmp_path / "." / "bench.sqlite3")
    assert code == 2 and err == f"error: ledger {str(src)!r}: source and destination are the same ledger\n"
    Ledger(pg_url).close()
    code, _, err = cli("ledger", "copy", pg_url, pg_url + "?connect_timeout=5")
    assert code == 2 and "source and destination are the same ledger" in err
    code, _, err = cli("ledger", "copy", tmp_path / "missing.sqlite3", pg_url)
    assert code == 2 and "no such file" in err
