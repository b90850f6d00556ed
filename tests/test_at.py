"""The AT transport against real ptys (simulated boards, a raw pty) and pyserial's loop://."""

import logging
import os
import threading
import time
import tty

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flasher.at import (
    ATClient,
    ATError,
    ATTimeout,
    ModuleError,
    NotSerialPort,
    PortGone,
    PortOpenError,
    ProtocolError,
    ResponseCollector,
    check_timeout,
    command_name,
    default_final,
    is_query,
    mask,
)
from flasher.errors import FlasherError, InputError
from flasher.sim.board import Faults

KEY = "2B7E151628AED2A6ABF7158809CF4F3C"


def test_command_collects_per_command_line_counts(sim_boards):
    sim = sim_boards(1)
    with ATClient.open(sim.ports[0], timeout=2) as at:
        assert at.command("AT") == ["OK"]
        ids = at.command("at+id")  # case-insensitive, three lines
        assert [line.split(",")[0] for line in ids] == ["DevAddr", "DevEui", "AppEui"]
        assert len(at.command("AT+ID=DevEui")) == 1
        dr = at.command("AT+DR?")
        assert dr[0] == "DR0" and dr[1].startswith("EU868 DR0")
        assert at.command("AT+DR=EU868") == ["EU868"]


def test_completion_is_decided_per_command():
    assert default_final("AT+ID")(["a", "b"]) is False
    assert default_final("AT+ID")(["a", "b", "c"]) is True
    assert default_final("AT+ID=AppEui")(["a"]) is True
    assert default_final("AT+DR=?")(["DR0"]) is False
    assert default_final("AT+JOIN")(["Start", "NORMAL", "Network joined"]) is False
    assert default_final("AT+JOIN")(["Start", "Done"]) is True
    assert default_final("AT+MSG=\"x\"")(["Please join network first"]) is True
    assert command_name("at+fdefault=RISINGHF") == "FDEFAULT" and command_name("AT") == "AT"
    assert is_query("AT+MODE") and is_query("AT+MODE?") and is_query("AT+MODE=?") and not is_query("AT+MODE=TEST")


@pytest.mark.parametrize("cmd,code,meaning", [
    ('AT+KEY=APPKEY,"00"', -1, "invalid parameter"),
    ("AT+NOSUCH", -10, "unknown command"),
    ("AT+VER=1", -11, "wrong command format"),
])
def test_module_errors_carry_code_and_meaning(sim_boards, cmd, code, meaning):
    sim = sim_boards(1)
    with ATClient.open(sim.ports[0], timeout=2) as at:
        with pytest.raises(ModuleError) as e:
            at.command(cmd)
    assert e.value.code == code and e.value.meaning == meaning
    assert sim.ports[0] in str(e.value) and meaning in str(e.value) and "\n" not in str(e.value)


def test_error_in_mode(sim_boards):
    sim = sim_boards(1)
    with ATClient.open(sim.ports[0], timeout=2) as at:
        at.command("AT+MODE=TEST")
        with pytest.raises(ModuleError) as e:
            at.command("AT+JOIN")
    assert e.value.code == -12 and "unavailable in the current mode" in str(e.value)


def test_silent_port_times_out_naming_port_and_command(sim_boards):
    sim = sim_boards(1, faults=Faults(silent=True))
    with ATClient.open(sim.ports[0], timeout=0.3) as at:
        t0 = time.monotonic()
        with pytest.raises(ATTimeout) as e:
            at.command("AT+ID")
        assert time.monotonic() - t0 < 5  # a hang guard, not a measurement
    msg = str(e.value)
    assert sim.ports[0] in msg and "AT+ID" in msg and "0.3 s" in msg and e.value.heard == 0


def test_loop_url_only_hears_its_own_echo():
    with ATClient.open("loop://", timeout=0.2) as at:
        with pytest.raises(ATTimeout, match=r"port 'loop://': no answer to AT within 0.2 s \(only unrelated output\)"):
            at.command("AT")


def test_echo_boot_noise_and_glued_garbage_are_skipped(sim_boards):
    sim = sim_boards(1, faults=Faults(echo=True, boot_noise=True))
    with ATClient.open(sim.ports[0], timeout=2) as at:
        assert at.command("AT") == ["OK"]
        assert at.command("AT+VER") == ["2.1.19"]
        assert at.command("AT+RESET") == ["OK"]
        assert len(at.command("AT+ID")) == 3  # noise again after the reset


def test_latency_within_and_beyond_timeout(sim_boards):
    sim = sim_boards(1, faults=Faults(latency=0.2))
    with ATClient.open(sim.ports[0], timeout=2) as at:
        assert at.command("AT") == ["OK"]
        sim.boards[0].faults.latency = 1.0
        with pytest.raises(ATTimeout):
            at.command("AT", timeout=0.3)


def test_unplug_mid_command_is_port_gone(sim_boards):
    sim = sim_boards(1, faults=Faults(unplug_after=1))
    with ATClient.open(sim.ports[0], timeout=2) as at:
        assert at.command("AT") == ["OK"]
        with pytest.raises(PortGone) as e:
            at.command("AT+ID")
        assert "AT+ID" in str(e.value) and "unplugged" in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(PortGone):  # and it stays gone, without a traceback or a hang
            at.command("AT")


def test_unplug_from_outside_while_waiting(sim_boards):
    sim = sim_boards(1, faults=Faults(latency=5))
    with ATClient.open(sim.ports[0], timeout=10) as at:
        timer = threading.Timer(0.2, sim.unplug, args=(0,))
        timer.start()
        try:
            with pytest.raises(PortGone):
                at.command("AT")
        finally:
            timer.cancel()


def test_garbled_answers_raise_protocol_error(sim_boards):
    sim = sim_boards(1, faults=Faults(corrupt=1))
    with ATClient.open(sim.ports[0], timeout=2) as at:
        with pytest.raises(ProtocolError, match="garbled answer to AT"):
            at.command("AT")
        assert at.command("AT") == ["OK"]  # the next command is in step again


def test_open_errors_are_one_line():
    with pytest.raises(PortOpenError, match=r"^port '/dev/flasher-nope': cannot open \(no such device"):
        ATClient.open("/dev/flasher-nope")
    with pytest.raises(PortOpenError, match=r"^port 'bogus://x': cannot open \(.*protocol 'bogus' not known\)$"):
        ATClient.open("bogus://x")


def test_a_path_that_is_not_a_serial_port_is_an_input_error(tmp_path):
    plain = tmp_path / "notes.txt"
    plain.write_bytes(b"AT\r\n")
    for path, what in (("/dev/null", "not a terminal device"), (str(plain), "not a terminal device"),
                       (str(tmp_path), "a directory")):
        with pytest.raises(NotSerialPort) as e:
            ATClient.open(path)
        assert str(e.value) == f"port {path!r}: not a serial port ({what}); see `flasher ports`"
        assert isinstance(e.value, InputError) and not isinstance(e.value, ATError)  # exit 2, not a board failure
    assert plain.read_bytes() == b"AT\r\n"  # untouched


def test_busy_port(sim_boards):
    sim = sim_boards(1)
    with ATClient.open(sim.ports[0]) as holder:
        with pytest.raises(PortOpenError) as e:
            ATClient.open(sim.ports[0])
        assert str(e.value) == f"port {sim.ports[0]!r}: busy (another process has it open)"
        assert sim.boards[0].commands == 0
        assert holder.command("AT") == ["OK"]  # the holder is undisturbed
    with ATClient.open(sim.ports[0]) as at:  # released on close
        assert at.command("AT") == ["OK"]


def test_exclusive_lock_only_where_there_is_a_device(sim_boards):
    sim = sim_boards(1)
    with ATClient.open(sim.ports[0]) as at:
        assert at._ser.exclusive is True
    with ATClient.open("loop://") as at:  # no device behind it: nothing to lock
        assert at._ser.exclusive is None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 0, 0.0, -1, "soon", "", None, True])
def test_check_timeout_refuses_what_is_not_a_finite_positive_number(value):
    with pytest.raises(InputError) as e:
        check_timeout(value, "--timeout")
    assert str(e.value).startswith(f"--timeout {value!r}: expected ") and "\n" not in str(e.value)


def test_check_timeout_accepts_seconds():
    assert check_timeout(2, "--timeout") == 2.0 and isinstance(check_timeout(2, "x"), float)
    assert check_timeout("0.25", "timeout in flasher.toml") == 0.25
    assert check_timeout(1e-3, "x") == 1e-3


def test_client_refuses_an_unusable_timeout(sim_boards):
    sim = sim_boards(1)
    with pytest.raises(InputError, match="AT timeout inf"):
        ATClient.open(sim.ports[0], timeout=float("inf"))
    with ATClient.open(sim.ports[0]) as at:
        with pytest.raises(InputError, match="AT timeout nan"):
            at.command("AT", timeout=float("nan"))
    assert sim.boards[0].commands == 0


def test_overlong_and_non_ascii_commands_refused_locally():
    with ATClient.open("loop://", timeout=0.1) as at:
        with pytest.raises(ProtocolError, match="longer than 528"):
            at.command("AT+MSG=" + "x" * 600)
        with pytest.raises(ProtocolError, match="not ASCII"):
            at.command('AT+MSG="é"')


def test_keys_masked_in_traffic_log(sim_boards, caplog):
    sim = sim_boards(1, version="2.0.10")
    caplog.set_level(logging.DEBUG, logger="flasher")
    with ATClient.open(sim.ports[0], timeout=2) as at:
        echo = at.command(f'AT+KEY=APPKEY,"{KEY}"')
    assert echo[0].replace(" ", "") == "APPKEY" + KEY  # 2.0.10 echoes it space-separated
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "AT+KEY=APPKEY" in text and "********" in text
    spaced = " ".join(KEY[i:i + 2] for i in range(0, 32, 2))
    assert KEY not in text and spaced not in text and KEY[:8] not in text


@pytest.mark.parametrize("text", [f'AT+KEY=APPKEY,"{KEY}"', f"+KEY: APPKEY {KEY}", f"+KEY: NWKSKEY {KEY.lower()}",
                                  "+KEY: APPSKEY " + " ".join(KEY[i:i + 2] for i in range(0, 32, 2))])
def test_mask_spellings(text):
    assert KEY[:6] not in mask(text).upper()


def test_errors_are_flasher_errors():
    for cls in (ATTimeout, PortGone, PortOpenError, ProtocolError):
        assert issubclass(cls, ATError) and issubclass(cls, FlasherError)


# --- fuzz ----------------------------------------------------------------------------

COMMANDS = st.sampled_from(["AT", "AT+ID", "AT+ID=AppEui", "AT+DR", "AT+JOIN", "AT+MSG=\"x\"", "AT+KEY=APPKEY,\"00\""])
LINES = st.lists(st.one_of(
    st.binary(max_size=80),
    st.builds(lambda n, d: b"+" + n.encode() + b": " + d,
              st.sampled_from(["AT", "ID", "DR", "JOIN", "MSG", "KEY", "INFO"]), st.binary(max_size=40)),
    st.sampled_from([b"+AT: ERROR(-10)", b"+ID: ERROR(-99999999999)", b"+JOIN: Done", b"\xff+ID: DevEui, 00"]),
), max_size=12)


@given(cmd=COMMANDS, lines=LINES)
@settings(max_examples=400, deadline=None)
def test_fuzz_response_parser_raises_only_client_errors(cmd, lines):
    collector = ResponseCollector(cmd, port="fuzz")
    try:
        for line in lines:
            if collector.feed(line):
                break
    except ATError as exc:
        assert "fuzz" in str(exc)
    assert all(isinstance(x, str) for x in collector.lines)


@pytest.fixture(scope="module")
def raw_pty():
    """A bare pty: the test plays the module by writing bytes to the master."""
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        yield master, os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)


@given(cmd=COMMANDS, blob=st.binary(max_size=300))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzz_client_over_a_pty_with_random_bytes(raw_pty, cmd, blob):
    master, path = raw_pty

    def answer():  # wait for the command line, then answer with random bytes
        got = b""
        while b"\n" not in got:
            got += os.read(master, 1024)
        os.write(master, blob)

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    with ATClient.open(path, timeout=0.05) as at:
        try:
            lines = at.command(cmd)
            assert all(isinstance(x, str) for x in lines)
        except ATError:
            pass
    t.join(5)


def test_noise_glued_to_an_unrelated_line_is_not_a_garbled_answer():
    # Boot junk in front of a well-formed "+INFO: Input timeout" is unrelated output, not one of our lines mangled.
    c = ResponseCollector("AT", port="p")
    assert c.feed(b"\x00\xfe\x01\x02+INFO: Input timeout") is False
    assert c.feed(b"+AT: OK") is True and c.lines == ["OK"] and c.garbled == 0
    # ... while a mangled line of the command's own still is
    with pytest.raises(ProtocolError, match="garbled answer to AT"):
        ResponseCollector("AT", port="p").feed(b"+AT: O\xff\x01")
