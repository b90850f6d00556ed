"""Fixtures for the local DPS + IoT Hub emulator (see flasher.sim.dps).

The SDK always dials port 8883 (443 with WebSockets), so emulators never share an address: each one binds
its own loopback address (127.0.0.2, 127.0.0.3, ...; Linux routes all of 127/8 to lo).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import socket
import threading
import time

import pytest

from flasher.dps import sas_token  # the plain clients here and the tests sign with flasher's own signer
from flasher.keys import derive_device_key
from flasher.sim.dps import free_loopback  # noqa: F401  (tests import it from here)

ID_SCOPE = "0ne00000001"
# Fixed, test-only keys (not secrets): derived from a label so they are stable across runs.
GROUP_NAME = "fleet"
GROUP_PRIMARY = base64.b64encode(hashlib.sha512(b"flasher tests: group primary").digest()).decode()
GROUP_SECONDARY = base64.b64encode(hashlib.sha512(b"flasher tests: group secondary").digest()).decode()
INDIVIDUAL_ID = "solo-0001"
INDIVIDUAL_PRIMARY = base64.b64encode(hashlib.sha256(b"flasher tests: individual primary").digest()).decode()
INDIVIDUAL_SECONDARY = base64.b64encode(hashlib.sha256(b"flasher tests: individual secondary").digest()).decode()
DISABLED_ID = "solo-disabled"
DISABLED_KEY = base64.b64encode(hashlib.sha256(b"flasher tests: disabled").digest()).decode()
SDK_THREADS = {"pipeline", "callback", "azure_iot_http"}  # the SDK's process-wide executors

ENROLLMENTS = {
    "id_scope": ID_SCOPE,
    "groups": [{"name": GROUP_NAME, "primary_key": GROUP_PRIMARY, "secondary_key": GROUP_SECONDARY, "enabled": True}],
    "individual": [
        {"registration_id": INDIVIDUAL_ID, "primary_key": INDIVIDUAL_PRIMARY, "secondary_key": INDIVIDUAL_SECONDARY,
         "enabled": True},
        {"registration_id": DISABLED_ID, "primary_key": DISABLED_KEY, "enabled": False},
    ],
}

def group_device_key(registration_id: str, primary: bool = True) -> str:
    return derive_device_key(base64.b64decode(GROUP_PRIMARY if primary else GROUP_SECONDARY), registration_id)


def leftover_threads(baseline: set[threading.Thread]) -> list[str]:
    """Threads started since ``baseline`` that are still alive, ignoring the SDK's shared executors."""
    return sorted(t.name for t in threading.enumerate()
                  if t not in baseline and t.is_alive() and t.name not in SDK_THREADS and not t.name.startswith("dps-emulator"))


def _may_bind(port: int) -> bool:
    """False only if this process may not bind ``port`` at all (a privileged port, as non-root)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except PermissionError:
            return False
        except OSError:  # busy: someone else has it, but we may bind it elsewhere
            return True
    return True


@pytest.fixture
def make_dps_emulator(tmp_path):
    """Factory for private emulators (for fault knobs that would disturb others); all stopped at teardown.

    Without a ``host``, each gets a loopback address where its ports (8883 and/or its WebSocket
    port) are free, and another one if a process running beside the tests took it meanwhile.
    """
    from flasher.errors import FlasherError
    from flasher.sim.dps import DpsEmulator

    with contextlib.ExitStack() as stack:
        n = itertools.count()

        def make(**kwargs):
            kwargs.setdefault("enrollments", ENROLLMENTS)
            kwargs.setdefault("cert_dir", tmp_path / f"certs{next(n)}")
            if "host" in kwargs:
                return stack.enter_context(DpsEmulator(**kwargs))
            # 8883 too when it is to stay closed: the emulator holds it (bound, not listening)
            ports = tuple(p for p in (kwargs.get("port", 8883) or 8883, kwargs.get("websocket_port")) if p)
            if 443 in ports and not _may_bind(443):
                pytest.skip("binding port 443 needs root or CAP_NET_BIND_SERVICE (CI has it)")
            for attempt in range(5):
                try:
                    return stack.enter_context(DpsEmulator(host=free_loopback(ports), **kwargs))
                except FlasherError as exc:
                    if "cannot listen" not in str(exc) or attempt == 4:
                        raise

        yield make


@pytest.fixture(scope="session")
def dps_emulator(tmp_path_factory):
    """One emulator for the session: group 'fleet' (GROUP_PRIMARY/SECONDARY), individual INDIVIDUAL_ID, disabled DISABLED_ID."""
    from flasher.sim.dps import DpsEmulator

    d = tmp_path_factory.mktemp("dps")
    with DpsEmulator(ENROLLMENTS, host=free_loopback(), cert_dir=d / "certs", state_file=d / "state.json") as emu:
        yield emu


@pytest.fixture
def dps_target(dps_emulator):
    """Keyword arguments that point register_device at the session emulator."""
    return {"id_scope": ID_SCOPE, "dps_host": dps_emulator.host, "ca_cert": str(dps_emulator.ca_cert_path)}


# --- plain clients: what a developer without the Python SDK points at the emulator -------

class DpsHttps:
    """DPS's HTTPS runtime API with http.client, as curl would use it: one request a connection, the
    emulator's CA, the host name checked."""

    def __init__(self, emu, scope: str = ID_SCOPE):
        import ssl

        self.emu, self.scope = emu, scope
        self.ctx = ssl.create_default_context(cafile=str(emu.ca_cert_path))

    def request(self, method: str, path: str, token: str | None = None, body: object = None,
                raw: bytes | None = None) -> tuple[int, dict[str, str], dict]:
        import http.client
        import json

        conn = http.client.HTTPSConnection(self.emu.host, self.emu.websocket_port, context=self.ctx, timeout=30)
        try:
            headers = {"Accept": "application/json", "Content-Type": "application/json; charset=utf-8"}
            if token is not None:
                headers["Authorization"] = token
            data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            text = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(text) if text else {}
        finally:
            conn.close()

    def path(self, registration_id: str, tail: str) -> str:
        import urllib.parse

        return f"/{self.scope}/registrations/{urllib.parse.quote(registration_id, safe='/')}/{tail}?api-version=2019-03-31"

    def register(self, registration_id: str, key: str | None, payload: object = None, body: object = None):
        token = sas_token(f"{self.scope}/registrations/{registration_id}", key) if key else None
        if body is None:
            body = {"registrationId": registration_id, **({"payload": payload} if payload is not None else {})}
        return self.request("PUT", self.path(registration_id, "register"), token, body)

    def status(self, registration_id: str, key: str, operation_id: str):
        token = sas_token(f"{self.scope}/registrations/{registration_id}", key)
        return self.request("GET", self.path(registration_id, f"operations/{operation_id}"), token)

    def register_and_wait(self, registration_id: str, key: str, payload: object = None, polls: int = 50):
        """PUT, then GET the operation until it is no longer "assigning"; the last answer."""
        import time

        status, headers, body = self.register(registration_id, key, payload)
        for _ in range(polls):
            if status != 202:
                return status, headers, body
            time.sleep(0.1)
            status, headers, body = self.status(registration_id, key, body["operationId"])
        raise AssertionError(f"{registration_id}: still assigning after {polls} polls")


class MqttClient:
    """A plain paho-mqtt 1.x client over TLS on 8883 that collects what arrives (for DPS or the hub)."""

    def __init__(self, emu, client_id: str, username: str, password: str | None):
        import queue
        import ssl

        import paho.mqtt.client as mqtt

        self.messages: queue.Queue = queue.Queue()
        self.connack: queue.Queue = queue.Queue()
        self.client = mqtt.Client(client_id=client_id, protocol=mqtt.MQTTv311, clean_session=True)
        self.client.username_pw_set(username, password)
        self.client.tls_set_context(ssl.create_default_context(cafile=str(emu.ca_cert_path)))
        self.client.on_connect = lambda c, u, flags, rc: self.connack.put(rc)
        self.client.on_message = lambda c, u, msg: self.messages.put((msg.topic, msg.payload))
        self.host, self.port = emu.host, emu.port

    def __enter__(self) -> MqttClient:
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        return self

    def __exit__(self, *exc) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def wait_connack(self, timeout: float = 20) -> int:
        return self.connack.get(timeout=timeout)

    def subscribe(self, topic: str) -> None:
        import queue

        subscribed: queue.Queue = queue.Queue()
        self.client.on_subscribe = lambda c, u, mid, granted: subscribed.put(granted)
        self.client.subscribe(topic, qos=1)
        assert subscribed.get(timeout=20) != (0x80,), f"subscription to {topic} refused"

    def ask(self, topic: str, payload: bytes = b"", timeout: float = 20) -> tuple[str, bytes]:
        self.client.publish(topic, payload, qos=1)
        return self.messages.get(timeout=timeout)


def dps_mqtt(emu, registration_id: str, key: str | None, password: str | None = None) -> MqttClient:
    """A raw DPS client: the SDK's user name, client id and SAS token (or ``password``)."""
    token = password if password is not None else sas_token(f"{ID_SCOPE}/registrations/{registration_id}", key or "")
    return MqttClient(emu, registration_id, f"{ID_SCOPE}/registrations/{registration_id}/api-version=2019-03-31",
                      token)


def dps_answer(topic: str, payload: bytes) -> tuple[int, dict[str, str], dict]:
    """``$dps/registrations/res/{status}/?$rid=..&retry-after=..`` and its JSON body."""
    import json
    import urllib.parse

    head, _, query = topic.partition("/?")
    params = {k: v[0] for k, v in urllib.parse.parse_qs(query).items()}
    return int(head.rsplit("/", 1)[1]), params, json.loads(payload) if payload else {}


def wait_for(pred, timeout: float = 10.0) -> bool:
    """Poll until pred() is true (a hang guard, not a timing assertion)."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True
