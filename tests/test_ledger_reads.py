"""Reading the ledger: a fixed number of queries, and exports that stream instead of building one string."""

from __future__ import annotations

import io
import os
import sqlite3
import tracemalloc
from pathlib import Path

import pytest

from flasher.errors import InputError
from flasher.ledger import Ledger, export_csv, export_json, write_csv, write_json

STEPS = ("derive", "render", "program", "upload", "register", "message")


def fill(path: Path, n: int, *, same_time: bool = False) -> None:
    """n boards with six steps each, written straight into a real ledger file in one transaction."""
    Ledger(path).close()
    db = sqlite3.connect(path)
    with db:
        db.executemany("INSERT INTO boards (deveui, registration_id, status, attempts, created_at, updated_at, band) "
                       "VALUES (?, ?, 'provisioned', 1, ?, ?, 'EU868')",
                       ((f"{i:016X}", f"{i:016x}", 1e9 if same_time else 1e9 + i, 2e9) for i in range(n)))
        db.executemany("INSERT INTO steps (deveui, step, outcome, started_at, finished_at) VALUES (?, ?, 'ok', 1, 2)",
                       ((f"{i:016X}", s) for i in range(n) for s in STEPS))
    db.close()


class Selects:
    """Counts the SELECTs a Ledger sends to SQLite."""

    def __init__(self, led: Ledger):
        self.n = 0
        led._db.set_trace_callback(self)

    def __call__(self, sql: str) -> None:
        self.n += sql.lstrip().upper().startswith("SELECT")


def test_all_is_two_queries_however_many_boards(tmp_path):
    fill(tmp_path / "l.sqlite3", 50)
    with Ledger(tmp_path / "l.sqlite3") as led:
        selects = Selects(led)
        records = led.all()
        assert selects.n == 2
    assert len(records) == 50 and all(r.steps == dict.fromkeys(sorted(STEPS), "ok") for r in records)


@pytest.mark.parametrize("same_time", [False, True])
def test_iter_records_gives_what_all_gives_in_the_same_order(tmp_path, same_time):
    path = tmp_path / "l.sqlite3"
    fill(path, 20, same_time=same_time)
    with Ledger(path) as led:
        led.begin("FFFF000000000001", "ffff000000000001")  # a board with no steps at all, newest
        everything = led.all()
        assert [r.deveui for r in everything][-1] == "FFFF000000000001"
        for batch in (1, 3, 7, 21, 1000):
            assert list(led.iter_records(batch=batch)) == everything
        with pytest.raises(InputError, match="batch"):
            next(led.iter_records(batch=0))


def test_iter_records_reads_one_batch_at_a_time(tmp_path):
    path = tmp_path / "l.sqlite3"
    fill(path, 10)
    with Ledger(path) as led:
        selects = Selects(led)
        records = led.iter_records(batch=4)
        first = [next(records) for _ in range(4)]
        assert selects.n == 2
        fifth = next(records)
        assert selects.n == 4
        # written meanwhile (by this thread here; the pipeline's threads in real life): seen once, at the end
        led.begin("FFFF000000000001", "ffff000000000001")
        rest = list(records)
    euis = [r.deveui for r in [*first, fifth, *rest]]
    assert euis == [f"{i:016X}" for i in range(10)] + ["FFFF000000000001"]


def test_streaming_an_export_holds_one_batch_not_every_board(tmp_path):
    path = tmp_path / "l.sqlite3"
    fill(path, 5_000)
    with Ledger(path) as led, open(os.devnull, "w") as sink:
        tracemalloc.start()
        try:
            write_json(led.iter_records(batch=100), sink)
            streamed = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            whole = export_json(led.all())
            built = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert whole.count("\n") == 5_000
    assert streamed * 10 < built, (streamed, built)


class Writes(io.StringIO):
    """Remembers how big each write was."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def write(self, s: str) -> int:
        self.sizes.append(len(s))
        return super().write(s)


def test_write_json_and_csv_stream_any_iterable_and_match_the_string_forms(tmp_path):
    path = tmp_path / "l.sqlite3"
    fill(path, 30)
    with Ledger(path) as led:
        records = led.all()
        for write, export in ((write_json, export_json), (write_csv, export_csv)):
            out = Writes()
            write(led.iter_records(batch=7), out)
            assert out.getvalue() == export(records) == export(r for r in records)
            assert len(out.sizes) >= 30 and max(out.sizes) < 1000  # a record at a time, never the whole


def test_the_csv_fast_path_prints_what_the_records_print(tmp_path):
    """status --csv pages rows without steps; its bytes must be the per-record export's, quoting and all."""
    import io

    from flasher.ledger import write_csv, write_csv_rows

    with Ledger(tmp_path / "l.sqlite3") as led:
        for i in range(250):
            eui = f"{i:016X}"
            led.begin(eui, eui.lower(), port=f"/dev/ttyACM{i}", band="EU868")
            if i % 3:
                led.step_finished(eui, "derive", "failed", 'bad, "quoted"\nline')
        slow, fast = io.StringIO(), io.StringIO()
        write_csv(led.iter_records(), slow)
        write_csv_rows(led.iter_rows(batch=7), fast)
    assert fast.getvalue() == slow.getvalue() and fast.getvalue().count("\n") > 250
