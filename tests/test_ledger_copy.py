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


def _pre_registered(target, scope="0ne0001A2B3", host="global.azure-devices-provisioning.net"):
    with Ledger(target, readonly=True, create=False) as led:
        known = led.pre_registrations([f"2cf7f1202490a{i:03x}" for i in range(6)], scope, host)
    return {k: (r.device_key_check, r.message_sent) for k, r in known.items() if r.status == "assigned"}


def test_pre_registrations_go_along_merged_as_dps_sees_them(cli, pg_url, tmp_path):
    """Two benches pre-registered overlapping ids; the fleet ledger ends up with every assignment, and a
    rerun of `register --input` against it would skip them all."""
    scope, host = "0ne0001A2B3", "global.azure-devices-provisioning.net"
    bench_a, bench_b = tmp_path / "a.sqlite3", tmp_path / "b.sqlite3"
    ids = [f"2cf7f1202490a{i:03x}" for i in range(6)]
    with Ledger(bench_a, station="a") as a:
        for r in ids[:4]:
            a.record_registration(r, id_scope=scope, dps_host=host, status="assigned", device_key_check="k" + r,
                                  assigned_hub="hub-1", device_id=r, message_sent=True)
        a.record_registration(ids[4], id_scope=scope, dps_host=host, status="failed", error="429")
    with Ledger(bench_b, station="b") as b:
        b.record_registration(ids[3], id_scope=scope, dps_host=host, status="failed", error="timeout")
        b.record_registration(ids[4], id_scope=scope, dps_host=host, status="assigned", device_key_check="k" + ids[4],
                              assigned_hub="hub-1", device_id=ids[4])
        b.record_registration(ids[5], id_scope=scope, dps_host=host, status="assigned", device_key_check="k" + ids[5],
                              assigned_hub="hub-2", device_id=ids[5])
    code, _, err = cli("ledger", "copy", bench_a, pg_url)
    assert code == 0 and err.endswith("; 5 pre-registration(s): 5 new, 0 already there, 0 updated\n"), err
    code, _, err = cli("ledger", "copy", bench_b, pg_url)   # 3 failed there, assigned here: stays assigned
    assert code == 0 and err.endswith("; 3 pre-registration(s): 1 new, 1 already there, 1 updated\n"), err
    assert _pre_registered(pg_url) == {**{r: ("k" + r, True) for r in ids[:4]}, ids[4]: ("k" + ids[4], False),
                                       ids[5]: ("k" + ids[5], False)}
    code, _, err = cli("ledger", "copy", bench_b, pg_url)   # again: nothing to do
    assert code == 0 and "3 pre-registration(s): 0 new, 3 already there, 0 updated" in err, err

    with Ledger(bench_b, station="b") as b:   # assigned elsewhere since: a conflict, and nothing is written
        b.record_registration(ids[5], id_scope=scope, dps_host=host, status="assigned", device_key_check="k" + ids[5],
                              assigned_hub="hub-3", device_id=ids[5])
        b.begin("2CF7F12024900077", "2cf7f12024900077")
    code, _, err = cli("ledger", "copy", bench_b, pg_url)
    assert code == 1 and err == (f"error: ledger {pg_url!r}: nothing copied: 1 pre-registration(s) were assigned "
                                 f"otherwise in {str(bench_b)!r} ({ids[5]}); --force replaces them\n")
    with Ledger(pg_url, readonly=True, create=False) as fleet:
        assert fleet.get("2CF7F12024900077") is None   # one transaction: not even the new board
    code, _, err = cli("ledger", "copy", bench_b, pg_url, "--force")
    assert code == 0, err
    with Ledger(pg_url, readonly=True, create=False) as fleet, fleet._read() as db:
        assert db.execute("SELECT assigned_hub FROM registrations WHERE registration_key = ?", (ids[5],)).fetchone()[0] \
            == "hub-3"


def test_a_ledger_from_before_pre_registrations_copies_without_them(cli, tmp_path):
    src = tmp_path / "bench.sqlite3"
    shutil.copyfile(V1, src)
    code, _, err = cli("ledger", "copy", src, tmp_path / "new.sqlite3")
    assert code == 0 and "pre-registration" not in err
