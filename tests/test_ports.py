"""Port discovery over recorded comports() output from three operating systems; no hardware."""

import json

import pytest
from serial.tools.list_ports_common import ListPortInfo

from flasher.errors import FlasherError, InputError
from flasher.ports import APP, BOOTLOADER, SIMULATED_PORTS_ENV, classify, find_boards, list_ports, load_simulated, resolve_targets


def port(device, vid=None, pid=None, serial_number=None, location=None, description="n/a", **extra):
    """A real pyserial ListPortInfo, filled in as pyserial fills it on that OS."""
    p = ListPortInfo(device, skip_link_detection=True)
    p.vid, p.pid, p.serial_number, p.location, p.description = vid, pid, serial_number, location, description
    for k, v in extra.items():
        setattr(p, k, v)
    return p


# Recorded shapes: Linux (sysfs), macOS (IOKit, cu.* devices), Windows (SetupAPI, COMn).
LINUX = [
    port("/dev/ttyS0"),
    port("/dev/ttyACM0", 0x2886, 0x800C, "6D3F2A1B5150484735202020FF0B1C2A", "1-1.2:1.0", "Seeeduino LoRaWAN",
         manufacturer="Seeed Studio", product="Seeeduino LoRaWAN", hwid="USB VID:PID=2886:800C SER=6D3F2A1B LOCATION=1-1.2:1.0"),
    port("/dev/ttyACM1", 0x2886, 0x000C, None, "1-1.3:1.0", "Seeeduino LoRaWAN"),  # a bootloader has no serial number
    port("/dev/ttyUSB0", 0x0403, 0x6001, "A50285BI", "1-1.4:1.0", "FT232R USB UART"),
    port("/dev/ttyACM2", 0x2341, 0x8057, "ABCDEF", "1-1.5:1.0", "Arduino Nano 33 IoT"),
]
MACOS = [
    port("/dev/cu.Bluetooth-Incoming-Port"),
    port("/dev/cu.usbmodem14201", 0x2886, 0x800C, "B1C2D3E45150484735202020FF0A0B0C", "20-2", "Seeeduino LoRaWAN"),
]
WINDOWS = [
    port("COM1", description="Communications Port (COM1)"),
    port("COM7", 0x2886, 0x800C, "0F1E2D3C5150484735202020FF101112", "1-4:x.0", "USB Serial Device (COM7)"),
    port("COM8", 0x2886, 0x000C, None, "1-5:x.0", "USB Serial Device (COM8)"),
]


@pytest.mark.parametrize("records,expect", [
    (LINUX, {"/dev/ttyACM0": APP, "/dev/ttyACM1": BOOTLOADER}),
    (MACOS, {"/dev/cu.usbmodem14201": APP}),
    (WINDOWS, {"COM7": APP, "COM8": BOOTLOADER}),
])
def test_recognises_boards_by_usb_id(records, expect):
    infos = classify(records)
    assert len(infos) == len(records)
    assert {p.device: p.board for p in infos if p.board} == expect
    assert [p.device for p in find_boards(infos)] == list(expect)


def test_port_info_fields_and_json():
    p = classify(LINUX)[1]
    assert (p.serial_number, p.location, p.bootloader) == ("6D3F2A1B5150484735202020FF0B1C2A", "1-1.2:1.0", False)
    assert classify(LINUX)[2].bootloader
    assert p.to_json()["vid"] == "2886" and p.to_json()["pid"] == "800C" and p.to_json()["board"] == "app"
    assert classify(LINUX)[0].to_json()["vid"] is None


def test_resolve_by_port_serial_number_and_all():
    avail = classify(LINUX + WINDOWS)
    assert resolve_targets(["loop://", "loop://"], [], False, available=avail) == ["loop://"]
    assert resolve_targets([], ["6d3f2a1b5150484735202020ff0b1c2a"], False, available=avail) == ["/dev/ttyACM0"]
    assert resolve_targets(["/dev/ttyACM0"], [], True, available=avail) == ["/dev/ttyACM0", "COM7"]


@pytest.mark.parametrize("ports,sns,all_,exc,match", [
    ([], [], False, InputError, "no board selected"),
    ([], ["NOPE"], False, FlasherError, r"serial number NOPE: no board running a sketch has it; 1 board\(s\) in their "
                                        r"bootloader at /dev/ttyACM1 \(USB 1-1.3\) report no serial number"),
])
def test_resolve_errors(ports, sns, all_, exc, match):
    with pytest.raises(exc, match=match):
        resolve_targets(ports, sns, all_, available=classify(LINUX))


def test_a_serial_number_with_no_board_and_no_bootloader_is_bad_input():
    with pytest.raises(InputError, match="serial number NOPE: no such board connected"):
        resolve_targets([], ["NOPE"], False, available=classify(MACOS))


def test_usb_port_path_drops_the_interface():
    from flasher.ports import usb_port_path

    assert [usb_port_path(p.location) for p in classify(LINUX)[1:3]] == ["1-1.2", "1-1.3"]
    assert usb_port_path("20-2") == "20-2" and usb_port_path(None) is None


def test_all_without_boards():
    with pytest.raises(InputError, match="--all: no Seeeduino"):
        resolve_targets([], [], True, available=classify(MACOS[:1]))


def test_same_serial_on_two_ports_is_ambiguous():
    twin = port("/dev/ttyACM9", 0x2886, 0x800C, "6D3F2A1B5150484735202020FF0B1C2A")
    with pytest.raises(InputError, match="several ports"):
        resolve_targets([], ["6D3F2A1B5150484735202020FF0B1C2A"], False, available=classify(LINUX + [twin]))


def test_simulated_ports_file(tmp_path, monkeypatch):
    live = tmp_path / "tty-live"
    live.write_text("")
    f = tmp_path / "ports.json"
    f.write_text(json.dumps([
        {"device": str(live), "serial_number": "SIM1", "vid": "2886", "pid": "800C", "simulated": True},
        {"device": str(tmp_path / "gone"), "serial_number": "SIM2", "vid": "2886", "pid": "800C"},
    ]))
    sims = load_simulated(f)
    assert [(p.device, p.board, p.simulated) for p in sims] == [(str(live), APP, True)]
    monkeypatch.setenv(SIMULATED_PORTS_ENV, str(f))
    assert str(live) in [p.device for p in list_ports()]
    assert resolve_targets([], ["sim1"], False) == [str(live)]


@pytest.mark.parametrize("content,why", [
    (None, "no such file (is `flasher simulate boards` running?)"),
    ("dir", "cannot read (Is a directory)"),
    ("{not json", "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    ("", "not valid JSON (Expecting value: line 1 column 1 (char 0))"),
    (b"\xff[]", "cannot read ('utf-8' codec can't decode byte 0xff in position 0: invalid start byte)"),
    ('{"device": "x"}', "expected a JSON list of objects"),
    ('[{"serial_number": "SIM1", "vid": "2886", "pid": "800C"}]', 'entry 1: "device" must be a non-empty string'),
    ('[{"device": "/dev/pts/1"}, {"device": "/dev/pts/2", "vid": "zz"}]', "entry 2: 'vid' 'zz' is not a USB id"),
    ('[{"device": "/dev/pts/1", "pid": true}]', "entry 1: 'pid' True is not a USB id"),
    ('[{"device": "/dev/pts/1", "serial_number": 7}]', "entry 1: 'serial_number' must be a string"),
])
def test_simulated_ports_file_problems_name_the_variable_and_file(tmp_path, monkeypatch, content, why):
    f = tmp_path / "ports.json"
    if content == "dir":
        f.mkdir()
    elif content is not None:
        f.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputError) as e:
        load_simulated(f)
    assert str(e.value) == f"{SIMULATED_PORTS_ENV}={f}: {why}"
    monkeypatch.setenv(SIMULATED_PORTS_ENV, str(f))
    with pytest.raises(InputError, match="^" + SIMULATED_PORTS_ENV):  # discovery, --all, --serial-number
        resolve_targets([], [], True)


def test_simulated_ports_unset_or_empty_means_none(monkeypatch):
    monkeypatch.delenv(SIMULATED_PORTS_ENV, raising=False)
    assert load_simulated() == []
    monkeypatch.setenv(SIMULATED_PORTS_ENV, "")
    assert load_simulated() == []


def test_ports_command_with_a_missing_simulated_ports_file(cli, tmp_path, monkeypatch):
    monkeypatch.setenv(SIMULATED_PORTS_ENV, str(tmp_path / "ports.json"))
    code, out, err = cli("ports")
    assert (code, out) == (2, "")
    assert err == (f"error: {SIMULATED_PORTS_ENV}={tmp_path / 'ports.json'}: no such file "
                   "(is `flasher simulate boards` running?)\n")


def test_discovery_finds_a_running_simulator(sim_boards, sim_env):
    sim = sim_boards(2)
    sim_env(sim)
    boards = [b for b in find_boards() if b.simulated]
    assert [b.device for b in boards] == sim.ports
    assert resolve_targets([], [sim.boards[1].serial_number], False) == [sim.ports[1]]
