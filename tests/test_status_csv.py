"""`status --csv` renders its rows in SQLite (and streams a server-side cursor on PostgreSQL): byte for byte what
Python's csv writer prints for the same rows, whatever they hold."""

from __future__ import annotations

import io
import math
import sqlite3
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flasher.ledger import EXPORT_FIELDS, Ledger, _csv_quoting, _csv_select, write_csv

TEXT_FIELDS = [f for f in EXPORT_FIELDS if f not in ("attempts", "created_at", "updated_at")]
# Most values are plain; a board has at most a few odd ones, so that each odd character is also met alone.
# Odd: what matters to CSV (quotes, separators, line ends), to printf (%), to the checks (\x01, '), and beyond
# ASCII; NUL only where flasher can write it (last_error: see _CsvSelect).
PLAIN = st.one_of(st.none(), st.text(st.sampled_from("aZ09-._:/ "), max_size=8),
                  st.sampled_from(["", "NULL", "None", "1.5", "1e5", "0x10"]))
ODD = st.text(st.sampled_from(list(',"\n\r\t %\'\x01;\\') + ["a", "é", "Ω", "💡", "\u2028", "\x7f"]), min_size=1,
              max_size=6)
stamps = st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                   st.floats(min_value=1e9, max_value=3e9), st.integers(1, 2**40).map(float),
                   st.sampled_from([1e16, 1e-5, -0.0, 1073741824.0039062, 1796004664.0415344, 2e9]))


@st.composite
def board(draw) -> dict:
    b = {f: draw(PLAIN) for f in TEXT_FIELDS}
    for f in draw(st.lists(st.sampled_from(TEXT_FIELDS), max_size=2, unique=True)):
        b[f] = draw(ODD)
    if draw(st.booleans()) and draw(st.booleans()):
        b["last_error"] = draw(st.text(st.sampled_from(["\x00", "a", ",", '"']), min_size=1, max_size=4))
    attempts = st.one_of(st.integers(0, 9), st.integers(-2**63, 2**63 - 1))
    return {**b, "attempts": draw(attempts), "created_at": draw(stamps), "updated_at": draw(stamps)}


def slow(led: Ledger, station=None) -> str:
    """What status --csv printed before: csv.DictWriter over the records."""
    buf = io.StringIO()
    write_csv(led.iter_records(station=station), buf)
    return buf.getvalue()


def insert(path, boards: list[dict]) -> None:
    db = sqlite3.connect(path)
    with db:
        db.execute("DELETE FROM boards")
        for i, b in enumerate(boards):
            row = {**b, "deveui": f"{i:04d}{b['deveui'] or ''}", "registration_id": b["registration_id"] or "r",
                   "status": b["status"] or "s"}
            db.execute(f"INSERT INTO boards ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
    db.close()


@pytest.fixture(scope="module")
def ledger_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("csv") / "l.sqlite3"
    Ledger(path).close()
    return path


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(boards=st.lists(board(), max_size=12), batch=st.integers(1, 5))
def test_sqlites_rendering_is_what_csv_writer_prints_for_any_row(ledger_file, boards, batch):
    insert(ledger_file, boards)
    with Ledger(ledger_file, readonly=True, create=False) as led:
        fast = "".join(led.iter_csv(batch=batch))
        assert fast == slow(led)
    assert fast.count("\n") >= len(boards) + 1


def test_the_fast_path_is_taken_for_plain_rows_and_left_only_for_the_odd_ones(tmp_path, monkeypatch):
    """Ordinary boards are rendered by SQLite (no raw row read back); a board with a quote, a NUL in its error
    or a timestamp stored as text is read back raw and printed by csv.writer, alone."""
    path = tmp_path / "l.sqlite3"
    with Ledger(path) as led:
        for i in range(40):
            eui = f"{i:016X}"
            led.begin(eui, eui.lower(), port=f"/dev/ttyACM{i}", band="EU868")
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE boards SET last_error = 'said \"no\", twice' WHERE deveui = ?", (f"{3:016X}",))
        db.execute("UPDATE boards SET last_error = ? WHERE deveui = ?", ("a\x00b", f"{17:016X}"))
        db.execute("UPDATE boards SET updated_at = 'yesterday' WHERE deveui = ?", (f"{30:016X}",))
    db.close()
    raw_reads: list[int] = []
    real = Ledger._raw_by_rowid

    def counting(self, db):
        read = real(self, db)

        def one(rowid):
            raw_reads.append(rowid)
            return read(rowid)
        return one

    monkeypatch.setattr(Ledger, "_raw_by_rowid", counting)
    with Ledger(path, readonly=True, create=False) as led:
        fast = "".join(led.iter_csv(batch=8))
        assert fast == slow(led)
    assert '"said ""no"", twice"' in fast and "a\x00b" in fast and ",yesterday," in fast
    assert len(raw_reads) == 3


def test_a_ledger_at_schema_1_prints_its_missing_columns_empty(tmp_path):
    from ledger_golden import golden
    from test_ledger_migrations import v1_copy

    with Ledger(v1_copy(tmp_path), readonly=True, create=False) as led:
        assert "".join(led.iter_csv(batch=2)) == golden("csv") == slow(led)


def test_the_station_filter_and_one_query_for_the_whole_export(tmp_path):
    path = tmp_path / "l.sqlite3"
    for station in ("a", "b"):
        with Ledger(path, station=station) as led:
            for i in range(5):
                led.begin(f"{i:015X}{station.upper()}", f"{i:015x}{station}")
    with Ledger(path, readonly=True, create=False) as led:
        selects: list[str] = []
        led._db.set_trace_callback(lambda sql: selects.append(sql) if sql.lstrip().startswith("SELECT") else None)
        pages = list(led.iter_csv(batch=2, station="b"))
        led._db.set_trace_callback(None)
        assert len(selects) == 1 and len(pages) == 1 + 3   # the header, then 2 + 2 + 1 boards
        assert "".join(pages) == slow(led, station="b") and "".join(pages).count("B,") == 5


def test_the_csv_export_holds_a_page_not_the_ledger(tmp_path):
    path = tmp_path / "l.sqlite3"
    Ledger(path).close()
    db = sqlite3.connect(path)
    with db:
        db.executemany("INSERT INTO boards (deveui, registration_id, status, attempts, created_at, updated_at, band) "
                       "VALUES (?, ?, 'provisioned', 1, ?, ?, 'EU868')",
                       ((f"{i:016X}", f"{i:016x}", 1.7e9 + i / 7, 1.7e9 + i / 3) for i in range(40_000)))
    db.close()
    with Ledger(path, readonly=True, create=False) as led:
        tracemalloc.start()
        try:
            size = sum(len(page) for page in led.iter_csv(batch=200))
            streamed = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert size > 40_000 * 100 and streamed * 10 < size, (streamed, size)


def test_the_quoting_rule_is_asked_of_csv():
    quoted = _csv_quoting()
    assert {",", '"', "\n"} <= quoted and "a" not in quoted and "'" not in quoted


def test_timestamps_print_as_python_prints_them():
    """The one thing SQLite is not asked to print: a float's shortest repr (its printf shows 15 digits)."""
    db = sqlite3.connect(":memory:")
    assert db.execute("SELECT printf('%s', ?)", (1796004664.0415344,)).fetchone()[0] == "1796004664.04153"
    shape = _csv_select(", ".join(EXPORT_FIELDS))
    row = ("a,b", 1796004664.0415344, 2e9, "c", "", 7)
    assert shape.line(row) == "a,b,1796004664.0415344,2000000000.0,c\n"


@pytest.mark.parametrize("boards", [0, 3])
def test_postgres_streams_status_csv_through_a_server_side_cursor(pg_url, boards, cli):
    """Same bytes as the records' CSV; the rows come through FETCH on a named cursor, not one big result."""
    import psycopg

    with Ledger(pg_url, station="bench-1") as led:
        for i in range(boards):
            eui = f"{i:016X}"
            led.begin(eui, eui.lower(), port="/dev/ttyACM0", band="EU868")
            led.step_finished(eui, "derive", "failed", 'bad, "quoted"\nline é')
        pages, seen = [], []
        with psycopg.connect(pg_url, autocommit=True) as watcher:
            for page in led.iter_csv(batch=2):
                pages.append(page)
                seen += [r[0] for r in watcher.execute(
                    "SELECT query FROM pg_stat_activity WHERE application_name = 'flasher bench-1' "
                    "AND query LIKE 'FETCH%'")]
        assert "".join(pages) == slow(led)
        assert "".join(led.iter_csv(station="bench-1")) == slow(led, station="bench-1") == "".join(pages)
        assert "".join(led.iter_csv(station="elsewhere")) == pages[0]
    assert len(pages) == 1 + math.ceil(boards / 2) and (seen if boards else True)
    assert all('"flasher_stream"' in q for q in seen)
    code, out, err = cli("status", "--csv", "--ledger", pg_url)
    assert (code, err) == (0, "") and out == "".join(pages)
