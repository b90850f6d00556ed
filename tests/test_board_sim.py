"""The board simulator: its dialect, its EEPROM, its ptys, its faults, its cleanup."""

import json
import os
import random
import select
import threading

import pytest

from flasher.at import ATClient, ATTimeout, PortGone
from flasher.errors import InputError
from flasher.rhf76 import open_module
from flasher.sim.board import BoardSimulator, Faults, SimulatedBoard


@pytest.fixture
def board(tmp_path):
    return SimulatedBoard(0, tmp_path / "b.json", random.Random(7), Faults())


def answers(board, line):
    return [text for _, text in board.respond(line.encode("latin-1"))]


@pytest.mark.parametrize("line,expect", [
    ("AT", ["+AT: OK"]),
    ("at+ver", ["+VER: 2.1.19"]),
    ("AT+VER?", ["+VER: 2.1.19"]),
    ("AT+MODE=?", ["+MODE: LWABP"]),
    ("AT+CLASS", ["+CLASS: A"]), ("AT+ADR", ["+ADR: ON"]), ("AT+PORT", ["+PORT: 8"]), ("AT+POWER", ["+POWER: 14"]),
    ("AT+DR", ["+DR: DR0", "+DR: EU868 DR0  SF12 BW125K "]),
    ("AT+DR=as923", ["+DR: AS923"]), ("AT+DR=5", ["+DR: DR5"]), ("AT+DR=DR16", ["+DR: ERROR(-1)"]),
    ('AT+ID=AppEui,"70B3D57ED003F06A"', ["+ID: AppEui, 70:B3:D5:7E:D0:03:F0:6A"]),
    ('AT+ID=AppEui,"70:B3:D5:7E:D0:03:F0:6A"', ["+ID: ERROR(-1)"]),  # plain hex only
    ('AT+KEY=APPKEY,"2B7E151628AED2A6ABF7158809CF4F3C"', ["+KEY: APPKEY 2B7E151628AED2A6ABF7158809CF4F3C"]),
    ('AT+KEY=APPKEY,"2B7E"', ["+KEY: ERROR(-1)"]),
    ("AT+KEY", ["+KEY: ERROR(-11)"]),
    ("AT+MODE=FOO", ["+MODE: ERROR(-1)"]),
    ("AT+NOPE", ["+AT: ERROR(-10)"]), ("HELLO", ["+AT: ERROR(-10)"]),
    ("AT+VER=" + "x" * 600, ["+AT: ERROR(-21)"]),
    ("AT+MSG=\"\x01\"", ["+AT: ERROR(-23)"]),
    ("AT+JOIN", ["+JOIN: Not in OTAA mode"]),
    ('AT+MSG="hi"', ["+MSG: Start", "+MSG: FPENDING", "+MSG: Done"]),
    ("AT+RESET", ["+RESET: OK"]), ("AT+FDEFAULT=RISINGHF", ["+FDEFAULT: OK"]), ("AT+FDEFAULT=X", ["+FDEFAULT: ERROR(-1)"]),
    ("", []),
])
def test_dialect(board, line, expect):
    assert answers(board, line) == expect


def test_id_query_three_lines_in_order(board):
    lines = answers(board, "AT+ID")
    e = board.eeprom
    assert lines == [f"+ID: DevAddr, {':'.join(e.devaddr[i:i+2] for i in range(0, 8, 2))}",
                     f"+ID: DevEui, {':'.join(e.deveui[i:i+2] for i in range(0, 16, 2))}",
                     "+ID: AppEui, 80:00:00:00:00:00:00:06"]


def test_modes_and_join(board):
    assert answers(board, "AT+MODE=TEST") == ["+MODE: TEST"]
    assert answers(board, "AT+JOIN") == ["+JOIN: ERROR(-12)"]
    assert answers(board, 'AT+MSG="x"') == ["+MSG: ERROR(-12)"]
    answers(board, "AT+MODE=LWOTAA")
    answers(board, 'AT+KEY=APPKEY,"2B7E151628AED2A6ABF7158809CF4F3C"')
    assert answers(board, 'AT+MSG="x"') == ["+MSG: Please join network first"]
    joined = answers(board, "AT+JOIN")
    assert joined[:3] == ["+JOIN: Starting", "+JOIN: NORMAL", "+JOIN: Network joined"] and joined[-1] == "+JOIN: Done"
    assert answers(board, "AT+JOIN") == ["+JOIN: Joined already"]


def test_2_0_10_echoes_key_space_separated(tmp_path):
    b = SimulatedBoard(0, tmp_path / "b.json", random.Random(1), Faults(), version="2.0.10")
    assert answers(b, 'AT+KEY=APPKEY,"2b7e151628aed2a6abf7158809cf4f3c"') == \
        ["+KEY: APPKEY 2B 7E 15 16 28 AE D2 A6 AB F7 15 88 09 CF 4F 3C"]


def test_eeprom_survives_restart_and_is_written_atomically(tmp_path):
    state = tmp_path / "state"
    with BoardSimulator(count=2, state_dir=state, seed=3) as sim:
        first = [(b.serial_number, b.deveui) for b in sim.boards]
        with open_module(sim.ports[1]) as m:
            m.at.command('AT+ID=AppEui,"70B3D57ED003F06A"')
            m.at.command("AT+MODE=LWOTAA")
    with BoardSimulator(count=2, state_dir=state, seed=99) as sim:  # another seed: the EEPROM wins
        assert [(b.serial_number, b.deveui) for b in sim.boards] == first
        with open_module(sim.ports[1]) as m:
            s = m.read_settings()
            assert (s.join_eui.hex, s.mode) == ("70B3D57ED003F06A", "LWOTAA")
    saved = json.loads((state / "board-1.json").read_text())
    for key in ("deveui", "appeui", "devaddr", "appkey", "nwkskey", "appskey", "mode", "band", "dr", "class", "adr",
                "version", "serial_number"):
        assert key in saved
    assert sorted(p.name for p in state.iterdir()) == ["board-0.json", "board-1.json"]  # no temp files, no ports.json


def test_identities_come_from_the_seed_and_vary(tmp_path):
    with BoardSimulator(count=8, state_dir=tmp_path / "a", seed=5) as a, \
            BoardSimulator(count=8, state_dir=tmp_path / "b", seed=5) as b, \
            BoardSimulator(count=8, state_dir=tmp_path / "c", seed=6) as c:
        assert [x.deveui for x in a.boards] == [x.deveui for x in b.boards]
        assert [x.deveui for x in a.boards] != [x.deveui for x in c.boards]
        assert len({x.deveui[:6] for x in a.boards}) > 1  # no fixed prefix
        assert len({x.serial_number for x in a.boards + c.boards}) == 16


def test_ports_file_follows_plugs_and_goes_away(tmp_path):
    with BoardSimulator(count=2, state_dir=tmp_path, seed=1) as sim:
        entries = json.loads(sim.ports_file.read_text())
        assert [e["device"] for e in entries] == sim.ports
        assert {(e["vid"], e["pid"]) for e in entries} == {("2886", "800C")}
        sim.unplug(0)
        assert [e["device"] for e in json.loads(sim.ports_file.read_text())] == [sim.ports[1]]
        sim.replug(0)
        assert {e["serial_number"] for e in json.loads(sim.ports_file.read_text())} == \
            {b.serial_number for b in sim.boards}
    assert not sim.ports_file.exists()


def test_unplug_and_replug_keep_identity_and_eeprom(sim_boards):
    sim = sim_boards(1)
    old = sim.ports[0]
    with open_module(old) as m:
        deveui = m.read_ids().dev_eui
        m.at.command('AT+ID=AppEui,"0102030405060708"')
        sim.unplug(0)
        assert sim.ports[0] is None
        with pytest.raises(PortGone):
            m.read_ids()
    new = sim.replug(0)
    assert sim.ports[0] == new and sim.replug(0) == new  # replugging a plugged board is a no-op
    with open_module(new) as m:
        ids = m.read_ids()
    assert ids.dev_eui == deveui and ids.app_eui.hex == "0102030405060708"


def test_unplug_after_counts_commands_then_clears(sim_boards):
    sim = sim_boards(1, faults=Faults(unplug_after=2))
    with ATClient.open(sim.ports[0], timeout=2) as at:
        at.command("AT")
        at.command("AT+VER")
        with pytest.raises(PortGone):
            at.command("AT+ID")
    assert sim.boards[0].faults.unplug_after is None
    with open_module(sim.replug(0)) as m:
        m.read_ids()


def test_faults_change_at_runtime(sim_boards):
    sim = sim_boards(1)
    f = sim.boards[0].faults
    with ATClient.open(sim.ports[0], timeout=0.3) as at:
        assert at.command("AT") == ["OK"]
        f.silent = True
        with pytest.raises(ATTimeout):
            at.command("AT")
        f.silent = False
        f.echo = True
        assert at.command("AT") == ["OK"]


def test_close_releases_every_pty_and_thread(tmp_path):
    before = threading.active_count()
    sim = BoardSimulator(count=3, state_dir=tmp_path, seed=1).start()
    ports = list(sim.ports)
    assert all(os.path.exists(p) for p in ports)
    at = ATClient.open(ports[0], timeout=1)
    sim.close()
    with pytest.raises(PortGone):
        at.command("AT")
    at.close()
    assert not any(os.path.exists(p) for p in ports)
    assert threading.active_count() == before
    sim.close()  # twice is fine


def test_temporary_state_dir_is_removed():
    with BoardSimulator(count=1) as sim:
        d = sim.state_dir
        assert (d / "board-0.json").exists()
    assert not d.exists()


def test_nobody_reading_does_not_block_or_spin(sim_boards):
    sim = sim_boards(1, faults=Faults(echo=True))
    fd = os.open(sim.ports[0], os.O_RDWR | os.O_NOCTTY)
    try:
        for _ in range(400):  # ~8 KiB of answers nobody reads: more than the pty buffer holds
            os.write(fd, b"AT+VER\r\n")
        with ATClient.open(sim.ports[0], timeout=5) as at:  # the backlog drains once someone reads
            assert at.command("AT") == ["OK"]
        assert sim.replug(0) == sim.ports[0]  # the loop thread is responsive
    finally:
        os.close(fd)


# --- line noise ----------------------------------------------------------------------------

def _read_exactly(fd: int, n: int, timeout: float = 5.0) -> bytes:
    got = b""
    while len(got) < n:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"only {len(got)} of {n} bytes within {timeout} s"
        got += os.read(fd, n - len(got))
    return got


def test_bit_flips_touch_the_share_of_bytes_asked_for(sim_boards):
    sim = sim_boards(1, faults=Faults(flip_rate=1.0))
    clean = b"+VER: 2.1.19\r\n"
    fd = os.open(sim.ports[0], os.O_RDWR | os.O_NOCTTY)
    try:
        os.write(fd, b"AT+VER\r\n")
        got = _read_exactly(fd, len(clean))
        assert [bin(a ^ b).count("1") for a, b in zip(got, clean, strict=True)] == [1] * len(clean)  # every byte, one bit
        sim.boards[0].faults.flip_rate = 0.25
        answers = []
        for _ in range(100):
            os.write(fd, b"AT+VER\r\n")
            answers.append(_read_exactly(fd, len(clean)))
    finally:
        os.close(fd)
    flips = [bin(a ^ b).count("1") for answer in answers for a, b in zip(answer, clean, strict=True)]
    assert set(flips) == {0, 1}
    assert 0.2 < sum(flips) / len(flips) < 0.3


# --- state files that cannot be used ----------------------------------------------------------

GOOD_STATE = {"serial_number": "0A1B", "deveui": "2CF7F12024900138", "factory_deveui": "2CF7F12024900138",
              "devaddr": "24900138"}


@pytest.mark.parametrize("content,why", [
    ("{not json", "not a simulated board's state (Expecting property name enclosed in double quotes: line 1 column 2"),
    ("", "not a simulated board's state (Expecting value: line 1 column 1"),
    ("[1, 2]", "not a simulated board's state (expected a JSON object)"),
    ('{"serial_number": "0A1B"}', "not a simulated board's state (deveui, factory_deveui missing)"),
    (json.dumps({**GOOD_STATE, "deveui": "2CF7F120"}), "not a simulated board's state (bad value for deveui)"),
    (json.dumps({**GOOD_STATE, "dr": "0", "mode": "SLEEP"}), "not a simulated board's state (bad value for mode, dr)"),
    (b"\xff\xfe{}", "cannot read ("),
])
def test_unusable_state_file_is_one_line_naming_it(tmp_path, content, why):
    state = tmp_path / "state"
    state.mkdir()
    (state / "board-0.json").write_text(json.dumps(GOOD_STATE))
    bad = state / "board-1.json"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    threads = threading.active_count()
    with pytest.raises(InputError) as e:
        BoardSimulator(count=2, state_dir=state)
    msg = str(e.value)
    assert msg.startswith(f"board state {str(bad)!r}: {why}") and "\n" not in msg
    assert bad.read_bytes() == (content if isinstance(content, bytes) else content.encode())  # left as it was
    assert threading.active_count() == threads


def test_a_state_file_that_is_a_directory(tmp_path):
    (tmp_path / "board-0.json").mkdir()
    with pytest.raises(InputError, match=r"^board state '.*board-0.json': cannot read \(Is a directory\)$"):
        BoardSimulator(count=1, state_dir=tmp_path)


def test_simulate_boards_with_a_corrupt_state_file_is_one_line(cli, tmp_path):
    (tmp_path / "board-0.json").write_text("{not json")
    code, out, err = cli("simulate", "boards", "--state", tmp_path)
    assert code == 2 and out == ""
    assert err == (f"error: board state {str(tmp_path / 'board-0.json')!r}: not a simulated board's state "
                   "(Expecting property name enclosed in double quotes: line 1 column 2 (char 1)); "
                   "fix it or delete it for a new board\n")


# --- what Seeed's LoRaWan library sends ---------------------------------------------------

LIBRARY_LINES = [  # LoRaWan.cpp's commands with the values flasher_otaa and the examples use
    "AT+VER=?", "AT+ID=?", 'AT+ID=DevAddr,"26011B3C"', 'AT+ID=DevEui,"2CF7F12024900138"',
    'AT+ID=AppEui,"70B3D57ED003F06A"', 'AT+KEY=NWKSKEY,"2B7E151628AED2A6ABF7158809CF4F3C"',
    'AT+KEY=APPSKEY,"2B7E151628AED2A6ABF7158809CF4F3C"', 'AT+KEY= APPKEY,"2B7E151628AED2A6ABF7158809CF4F3C"',
    "AT+DR=EU433", "AT+DR=CN779", "AT+DR=AU915OLD", "AT+DR=0", "AT+POWER=14", "AT+PORT=8", "AT+ADR=ON", "AT+ADR=OFF",
    "AT+CH=3,867.1", "AT+CH=3,867.1,0", "AT+CH=3,867.1,0,5", "AT+REPT=1", "AT+RETRY=3", "AT+RXWIN1=ON",
    "AT+RXWIN2=869.5,3", "AT+LW=DC, ON", "AT+LW=DC, OFF", "AT+LW=JDC,ON", "AT+LW=JDC,OFF", "AT+DELAY=RX1,1000",
    "AT+CLASS=A", "AT+CLASS=C", "AT+MODE=LWABP", "AT+MODE=LWOTAA", "AT+RESET", "AT+FDEFAULT=RISINGHF", "AT+LOWPOWER",
    'AT+MSG="hello"', 'AT+MSGHEX="0102"', 'AT+CMSG="hello"', "AT+JOIN", "AT+JOIN=FORCE",
]


@pytest.mark.parametrize("line", LIBRARY_LINES)
def test_every_command_the_library_sends_is_understood(board, line):
    got = answers(board, line)
    name = line[3:].split("=")[0].upper()
    assert got and all(a.startswith(f"+{name}: ") and "ERROR" not in a for a in got), got


def test_library_lines_cover_the_real_library():
    """Every AT command word in the real LoRaWan.cpp (the kit's copy) is among LIBRARY_LINES, bar P2P/TEST mode."""
    import re

    from samd_kit import core_dir

    source = (core_dir() / "libraries" / "LoRaWan" / "LoRaWan.cpp").read_text()
    words = set(re.findall(r'"AT\+([A-Z0-9]+)', source)) - {"TEST", "PMSG", "PMSGHEX", "CMSGHEX"}
    covered = {line[3:].split("=")[0].upper() for line in LIBRARY_LINES}
    assert words and words <= covered, words - covered
    bands = set(re.findall(r'"AT\+DR=([A-Z0-9]+)\\r\\n"', source))
    from flasher.sim.board import BANDS
    assert bands == set(BANDS)  # the simulator takes exactly the bands the library can select


def test_join_says_starting_and_a_terse_module_omits_network_joined(board):
    answers(board, "AT+MODE=LWOTAA")
    answers(board, 'AT+KEY=APPKEY,"2B7E151628AED2A6ABF7158809CF4F3C"')
    board.join_style = "terse"
    got = answers(board, "AT+JOIN")
    assert got[:2] == ["+JOIN: Starting", "+JOIN: NORMAL"] and got[2].startswith("+JOIN: NetID 000013 DevAddr ")
    assert got[-1] == "+JOIN: Done" and "+JOIN: Network joined" not in got


def test_no_coverage_fails_joins_until_the_network_answers(board):
    answers(board, "AT+MODE=LWOTAA")
    answers(board, 'AT+KEY=APPKEY,"2B7E151628AED2A6ABF7158809CF4F3C"')
    board.join_accept_after = 2
    assert [answers(board, "AT+JOIN")[2] for _ in range(2)] == ["+JOIN: Join failed"] * 2
    assert answers(board, "AT+JOIN")[2] == "+JOIN: Network joined"
    assert list(board.received)[-3:] == ["AT+JOIN"] * 3


def test_port_power_and_channels_are_kept(board):
    assert answers(board, "AT+PORT=0") == ["+PORT: ERROR(-1)"] and answers(board, "AT+POWER=x") == ["+POWER: ERROR(-1)"]
    answers(board, "AT+PORT=42")
    answers(board, "AT+POWER=20")
    assert answers(board, "AT+PORT") == ["+PORT: 42"] and answers(board, "AT+POWER") == ["+POWER: 20"]
    assert board.eeprom.port == 42 and json.loads(board.state_path.read_text())["power"] == 20
    answers(board, "AT+CH=1,0")
    assert answers(board, "AT+CH") == ["+CH: 2; 0,868100000,DR0,DR5; 2,868500000,DR0,DR5"]
    answers(board, "AT+FDEFAULT=RISINGHF")
    assert answers(board, "AT+CH")[0].startswith("+CH: 3; ") and answers(board, "AT+PORT") == ["+PORT: 8"]
