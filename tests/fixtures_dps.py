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

import pytest

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
