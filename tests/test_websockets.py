"""Port 443 of the emulator: TLS, HTTP/1.1 and the server side of RFC 6455, checked two ways.

First byte by byte, with a raw client written here from the RFC (masking, fragments,
control frames, the closing handshake, the HTTP answers that are not upgrades). Then with
the real SDK (paho-mqtt 1.x inside): registration and a hub message over
``wss://host:443/$iothub/websocket`` with port 8883 closed, and the two things paho does
that a strict server would punish, answering PING and CLOSE with unmasked frames.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import struct
import threading
import time

import pytest
from fixtures_dps import ID_SCOPE, free_loopback, group_device_key, leftover_threads, wait_for

from flasher.dps import DpsError, Transport, _dispose_hub, register_device, send_test_message
from flasher.sim.web import accept_key

MQTT_CONNECT = bytes.fromhex("101000044d5154540402003c0004") + b"test"  # client id "test", no credentials


@pytest.fixture
def wss(make_dps_emulator):
    """An emulator serving WebSockets on an ephemeral port (8883 closed) and a TLS opener for it."""
    emu = make_dps_emulator(port=None, websocket_port=0)
    ctx = ssl.create_default_context(cafile=str(emu.ca_cert_path))
    opened: list[ssl.SSLSocket] = []

    def connect() -> ssl.SSLSocket:
        raw = socket.create_connection((emu.host, emu.websocket_port), timeout=10)
        s = ctx.wrap_socket(raw, server_hostname=emu.host)
        opened.append(s)
        return s

    yield emu, connect
    for s in opened:
        s.close()


def read_http(s: ssl.SSLSocket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        assert chunk, f"closed before the response head: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        rest += s.recv(4096)
    return int(status_line.split(" ")[1]), headers, rest


def upgrade(s: ssl.SSLSocket, path: str = "/$iothub/websocket", protocol: str = "mqtt", extra: str = "") -> tuple:
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET {path} HTTP/1.1\r\nHost: x:443\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {protocol}\r\n"
               f"{extra}\r\n").encode())
    status, headers, _ = read_http(s)
    return status, headers, key


def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True) -> bytes:
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    length = bytes([n]) if n < 126 else bytes([126]) + struct.pack("!H", n)
    if not mask:
        return head + length + payload
    key = os.urandom(4)
    return head + bytes([length[0] | 0x80]) + length[1:] + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def read_frame(s: ssl.SSLSocket) -> tuple[int, bytes, bool]:
    """(opcode, payload, masked) of the next frame from the server."""
    def exactly(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = s.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed")
            out += chunk
        return out

    b0, b1 = exactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", exactly(2))
    assert not b1 & 0x80, "a server's frames are never masked"
    return b0 & 0x0F, exactly(n), bool(b1 & 0x80)


def closed_by_server(s: ssl.SSLSocket) -> bool:
    try:
        return s.recv(1) == b""
    except (ConnectionError, ssl.SSLError):
        return True


# --- the handshake and HTTP ------------------------------------------------------------

def test_the_upgrade_answers_with_the_rfc_accept_key_and_the_mqtt_subprotocol(wss):
    emu, connect = wss
    status, headers, key = upgrade(connect())
    assert status == 101
    assert headers["sec-websocket-accept"] == accept_key(key)
    assert headers["upgrade"].lower() == "websocket" and headers["sec-websocket-protocol"] == "mqtt"
    # RFC 6455's own example (section 1.3)
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("request_text, status", [
    ("GET /other HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    ("GET /$iothub/websocket HTTP/1.1\r\nHost: x\r\n\r\n", 426),
    ("PUT /$iothub/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 426),
    ("nonsense\r\n\r\n", 400),
])
def test_requests_that_are_not_upgrades_get_an_http_answer(wss, request_text, status):
    emu, connect = wss
    s = connect()
    s.sendall(request_text.encode())
    got, headers, body = read_http(s)
    assert got == status and json.loads(body)["message"]


def test_a_wrong_subprotocol_or_version_is_refused(wss):
    emu, connect = wss
    assert upgrade(connect(), protocol="chat")[0] == 400
    s = connect()
    s.sendall(b"GET /$iothub/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)) + b"\r\nSec-WebSocket-Version: 8\r\n"
              b"Sec-WebSocket-Protocol: mqtt\r\n\r\n")
    status, headers, _ = read_http(s)
    assert status == 426 and headers["sec-websocket-version"] == "13"


def test_http_keep_alive_serves_several_requests_on_one_connection(wss):
    emu, connect = wss
    s = connect()
    for _ in range(3):
        s.sendall(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = read_http(s)
        assert status == 404 and headers["connection"] == "keep-alive"
    s.sendall(b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert read_http(s)[0] == 404 and closed_by_server(s)


# --- frames --------------------------------------------------------------------------------

def test_mqtt_split_over_fragments_is_reassembled_and_answered_in_a_binary_frame(wss):
    emu, connect = wss
    s = connect()
    assert upgrade(s)[0] == 101
    s.sendall(frame(0x2, MQTT_CONNECT[:5], fin=False) + frame(0x9, b"in between") + frame(0x0, MQTT_CONNECT[5:]))
    assert read_frame(s) == (0xA, b"in between", False)  # the PING in the middle of the message is answered
    opcode, payload, _ = read_frame(s)
    # a CONNACK: the user name is neither DPS's nor the hub's, so "bad user name or password" (4)
    assert (opcode, payload) == (0x2, bytes([0x20, 2, 0, 4]))


def test_a_masked_client_close_is_echoed_and_the_connection_ends(wss):
    emu, connect = wss
    s = connect()
    upgrade(s)
    s.sendall(frame(0x8, struct.pack("!H", 1001) + b"going away"))
    opcode, payload, _ = read_frame(s)
    assert opcode == 0x8 and struct.unpack("!H", payload[:2])[0] == 1001
    assert closed_by_server(s)


BAD_FRAMES = {
    "unmasked data": (lambda: frame(0x2, MQTT_CONNECT, mask=False), 1002),  # RFC 6455 5.1: a client masks data
    "text frame": (lambda: frame(0x1, b"MQTT as text"), 1003),               # [MQTT-6.0.0-1]: binary frames only
    "orphan continuation": (lambda: frame(0x0, b"orphan"), 1002),
    "reserved bit": (lambda: bytes([0x82 | 0x40, 0x80]) + os.urandom(4), 1002),  # no extension was negotiated
    "fragmented control frame": (lambda: frame(0x9, b"x" * 10, fin=False), 1002),
}


@pytest.mark.parametrize("name", BAD_FRAMES)
def test_protocol_errors_close_with_the_rfc_status(wss, name):
    make, code = BAD_FRAMES[name]
    emu, connect = wss
    s = connect()
    upgrade(s)
    s.sendall(make())
    opcode, payload, _ = read_frame(s)
    assert opcode == 0x8 and struct.unpack("!H", payload[:2])[0] == code
    assert closed_by_server(s)


# --- the real SDK over 443, with 8883 closed -------------------------------------------

def test_the_sdk_registers_and_sends_over_websockets_with_8883_closed(make_dps_emulator):
    emu = make_dps_emulator(port=None, websocket_port=443)
    host = emu.host
    with socket.socket() as probe:  # nothing listens on 8883: only 443 can have been used
        assert probe.connect_ex((host, 8883)) != 0
    rid = "2cf7f120249e0443"
    baseline = set(threading.enumerate())
    reg = register_device(rid, group_device_key(rid), id_scope=ID_SCOPE, dps_host=host, ca_cert=emu.ca_cert_path,
                          transport=Transport(websockets=True), timeout=30)
    assert reg.device_id == rid
    assert wait_for(lambda: not leftover_threads(baseline)), leftover_threads(baseline)  # paho's threads joined
    assert wait_for(lambda: not emu.connections())
    state = emu.state()
    rec = next(r for r in state["registrations"] if r["registrationId"] == rid)
    dev = next(d for d in state["devices"] if d["device_id"] == rid)
    assert rec["transport"] == "websocket" and dev["transport"] == "websocket"
    assert [m["payload"] for m in state["messages"] if m["device_id"] == rid] == ["TestMessage"]
    assert state["stats"]["websocket_connections"] == 2  # DPS, then the hub


def test_without_websockets_a_closed_8883_says_so_and_suggests_them(make_dps_emulator):
    emu = make_dps_emulator(port=None, websocket_port=443)
    host = emu.host
    with pytest.raises(DpsError) as info:
        register_device("2cf7f120249e0444", group_device_key("2cf7f120249e0444"), id_scope=ID_SCOPE, dps_host=host,
                        ca_cert=emu.ca_cert_path, timeout=30)
    assert info.value.kind == "unreachable"
    assert "port 8883 (Connection refused)" in str(info.value) and "--websockets" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_silent_8883_times_out_and_suggests_websockets():
    """A firewall that drops packets: a listener whose accept queue is full never answers a SYN."""
    host = free_loopback()
    listener = socket.socket()
    fillers = []
    try:
        listener.bind((host, 8883))
        listener.listen(0)
        for _ in range(3):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex((host, 8883))
            fillers.append(c)
        time.sleep(0.2)
        t0 = time.monotonic()
        with pytest.raises(DpsError) as info:
            register_device("2cf7f120249e0445", group_device_key("2cf7f120249e0445"), id_scope=ID_SCOPE, dps_host=host,
                            timeout=30)
        assert time.monotonic() - t0 < 20  # paho's own connect timeout (5 s), not our whole budget
    finally:
        for c in fillers:
            c.close()
        listener.close()
    assert info.value.kind == "unreachable"
    assert "port 8883 (timed out)" in str(info.value) and "--websockets" in str(info.value)


def test_paho_answers_ping_and_close_unmasked_and_the_emulator_keeps_it(make_dps_emulator):
    emu = make_dps_emulator(port=None, websocket_port=443)
    host = emu.host
    rid = "2cf7f120249e0446"
    key = group_device_key(rid)
    register_device(rid, key, id_scope=ID_SCOPE, dps_host=host, ca_cert=emu.ca_cert_path,
                    transport=Transport(websockets=True), test_message=None, timeout=30)
    from azure.iot.device import IoTHubDeviceClient, Message

    client = IoTHubDeviceClient.create_from_symmetric_key(symmetric_key=key, hostname=host, device_id=rid,
                                                          server_verification_cert=emu.ca_cert_path.read_text(),
                                                          websockets=True, connection_retry=False)
    try:
        client.connect()
        assert emu.ping_websockets() == 1
        assert wait_for(lambda: emu.websocket_stats()["pongs_received"] == 1)
        assert emu.websocket_stats()["unmasked_control_frames"] >= 1   # paho's PONG is unmasked...
        client.send_message(Message("after the ping"))                 # ...and the connection lives on
        assert wait_for(lambda: [m["payload"] for m in emu.state()["messages"] if m["device_id"] == rid]
                        == ["after the ping"])
        assert emu.close_websockets() == 1
        assert wait_for(lambda: emu.websocket_stats()["closes_received"] == 1)  # paho echoed the CLOSE
        assert emu.websocket_stats()["unmasked_control_frames"] == 2
        assert wait_for(lambda: not emu.connections())
    finally:
        _dispose_hub(client, "test")  # flasher's own cleanup: the SDK's shutdown() raises once the server closed


def test_a_separate_hub_message_goes_the_same_way(make_dps_emulator):
    emu = make_dps_emulator(websocket_port=443)  # both open: the transport is the client's choice
    host = emu.host
    rid = "2cf7f120249e0447"
    register_device(rid, group_device_key(rid), id_scope=ID_SCOPE, dps_host=host, ca_cert=emu.ca_cert_path,
                    test_message=None, timeout=30)
    send_test_message(rid, host, group_device_key(rid), ca_cert=emu.ca_cert_path, transport=Transport(websockets=True),
                      timeout=30)
    state = emu.state()
    assert next(r for r in state["registrations"] if r["registrationId"] == rid)["transport"] == "mqtt"
    assert next(d for d in state["devices"] if d["device_id"] == rid)["transport"] == "websocket"

