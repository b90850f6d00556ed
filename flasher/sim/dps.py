"""A local Azure DPS + IoT Hub emulator, the way Azurite stands in for Azure Storage.

It speaks the DPS MQTT registration protocol that azure-iot-device uses, over TLS on
port 8883 (the SDK's fixed port), with its own root of trust:

* CONNECT with user name ``{idScope}/registrations/{registrationId}/api-version=...`` and
  a SAS token as password. An unknown ID scope is refused with CONNACK 3 ("server
  unavailable"), as DPS does; a bad token is accepted at CONNECT and answered 401 on the
  response topic, as DPS does.
* ``$dps/registrations/PUT/iotdps-register/?$rid={n}`` -> ``res/202`` ``{"operationId",
  "status": "assigning"}`` with ``retry-after``; ``.../GET/iotdps-get-operationstatus/?
  $rid={n}&operationId={id}`` -> 202 while assigning, then 200 ``assigned`` with the
  registration state (after ``assign_delay`` seconds). A disabled enrollment answers 200
  ``disabled``; throttling answers 429 with ``retry-after``.
* SAS tokens are checked as DPS checks them: ``sr`` is ``{idScope}/registrations/{id}``,
  ``se`` in the future, ``sig`` an HMAC-SHA256 by the individual enrollment's primary or
  secondary key or, when there is no individual enrollment for the id, by a key derived
  from some group's primary or secondary key.
* The assigned hub is this same server (its host name is the bound host): the device's
  hub CONNECT (user name ``{hub}/{deviceId}/?api-version=...``, SAS over
  ``{hub}/devices/{deviceId}``) is checked against the keys it registered with, refused
  with CONNACK 5 otherwise, and every telemetry message is recorded. A Plug and Play
  ``model-id`` in that user name is recorded on the device.
* The register request's body is ``{"registrationId", "payload"}``: the device's payload
  (IoT Central's ``{"modelId": "dtmi:...;1"}``, or anything a custom allocation wants) is
  recorded with the registration; a member DPS does not know, such as a ``modelId`` beside
  ``registrationId``, is refused with 400 / errorCode 400012 "Deserialization error.", as
  DPS does (MicrosoftDocs/azure-docs#66740). An enrollment configured with a
  ``return_payload`` hands it back in ``registrationState.payload``, as a custom allocation
  webhook's answer would be. Which of the enrollment's keys signed the token (primary or
  secondary) is recorded too, for key rotation.
* Port 443 (``websocket_port``): MQTT over TLS + WebSocket at ``/$iothub/websocket``, what the
  SDK dials with ``websockets=True``, into the same MQTT server and state as 8883. ``port=None``
  keeps 8883 closed (bound, never listening, so no other server can open it there meanwhile),
  to prove a client really used 443. Each registration and hub device records
  the transport it came by.
* Port 443 also serves DPS's HTTPS runtime API (``PUT /{idScope}/registrations/{id}/register``,
  ``GET .../operations/{operationId}``, the SAS token in ``Authorization``, ``Retry-After``): the Node and C
  SDKs' HTTP transports and curl. MQTT, WebSockets and HTTPS share one request core, so every check, knob and
  record is the same whatever the transport.
* Registration ids follow DPS's rules (:data:`REGISTRATION_ID`; an invalid one is answered 400 before any
  key is checked) and are case-insensitive: two spellings are one registration and one device.
* Knobs: ``throttle()`` (429/5xx with retry-after), ``registration_quota="1000/min"`` (DPS's quota: 429
  beyond it, retry-after until the oldest accepted request leaves the sliding window), an enrollment's
  ``allocation_error`` or ``fail_allocation()`` (registrations end ``failed``, e.g. 400209),
  ``assign_delay``, ``refuse_hub()``, ``disable()``.
* The hub answers a twin GET (an empty twin plus the reported properties) and reported-property PATCHes
  (merged and recorded); direct-method, desired-property and cloud-to-device subscriptions are accepted but
  nothing is ever sent on them.

State (registration records, devices, messages, twins, counters; never a key) is available from
:meth:`DpsEmulator.state` and, if ``state_file`` is given, rewritten atomically on every
change, before the answer that follows from it is sent. Use in-process as a context manager (its event loop runs in a thread).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import datetime as dt
import hashlib
import hmac
import itertools
import json
import logging
import math
import os
import re
import secrets as _secrets
import socket
import ssl
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flasher.errors import FlasherError, InputError
from flasher.files import atomic_write
from flasher.keys import decode_symmetric_key, derive_device_key
from flasher.sim import certs
from flasher.sim.mqtt import (
    ACCEPTED,
    REFUSED_BAD_USERNAME_PASSWORD,
    REFUSED_NOT_AUTHORIZED,
    REFUSED_SERVER_UNAVAILABLE,
    Connection,
    ConnectRequest,
    MqttApplication,
    MqttServer,
    ProtocolError,
)
from flasher.sim.web import HttpRequest, HttpResponse, HttpsListener, WebSocketStream, not_found

log = logging.getLogger("flasher.sim.dps")

DEFAULT_PORT = 8883  # fixed by the SDK for MQTT over TLS
WEBSOCKET_PORT = 443  # fixed by the SDK for MQTT over WebSockets
WEBSOCKET_PATH = "/$iothub/websocket"  # the SDK's path, for DPS and the hub alike
REGISTER_MEMBERS = {"registrationId", "payload", "tpm"}  # DPS's DeviceRegistration; anything else: 400012
RES_PREFIX = "$dps/registrations/res/"
REGISTER_PATH = "$dps/registrations/PUT/iotdps-register"
STATUS_PATH = "$dps/registrations/GET/iotdps-get-operationstatus"
REGISTER_RETRY_AFTER = 3  # what DPS sends with the first 202
# DPS's registration id rules: case-insensitive, at most 128 characters, alphanumerics and - . _ :, the last one
# alphanumeric or '-'. A request for any other id gets INVALID_ID_ERROR (HTTP 400), before any key is checked.
REGISTRATION_ID = re.compile(r"[A-Za-z0-9._:-]{0,127}[A-Za-z0-9-]")
INVALID_ID_ERROR = 400004  # DPS's "argument invalid": the request's registration id breaks the rules
THROTTLED_MESSAGE = "Operations are being throttled for this tenant."
FAILED_ALLOCATION = 400209  # custom allocation failed: what an enrollment's ``allocation_error`` defaults to
ALLOCATION_MESSAGES = {400209: "Custom allocation failed.", 400208: "Allocation failed: no hub could be assigned."}
API_VERSION = "2019-03-31"  # what the SDKs send; the emulator accepts any


def valid_registration_id(registration_id: str) -> bool:
    """True if DPS accepts ``registration_id`` (see :data:`REGISTRATION_ID`)."""
    return REGISTRATION_ID.fullmatch(registration_id) is not None


_loopback_next = itertools.count(os.getpid() % 250)  # processes started together try different addresses first
_loopback_lock = threading.Lock()


def free_loopback(port: int | tuple[int, ...] = 8883, prefer: tuple[str, ...] = ()) -> str:
    """A loopback address where ``port`` (or every port of a tuple) can be bound now: ``prefer`` first,
    then 127.0.0.2-251.

    The SDK always dials 8883 (443 with WebSockets), so emulators that run side by side
    (tests, a demo next to a running `flasher simulate dps`) each take their own address;
    Linux routes all of 127/8 to the loopback interface.
    """
    ports = (port,) if isinstance(port, int) else tuple(port)
    with _loopback_lock:
        candidates = [*prefer, *(f"127.0.0.{2 + next(_loopback_next) % 250}" for _ in range(250))]
        for host in candidates:
            if all(_bindable(host, p) for p in ports):
                return host
    shown = "/".join(map(str, ports))
    raise FlasherError(f"port {shown} is busy on every loopback address tried ({candidates[0]} and 249 more)")


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def default_cert_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flasher" / "dps-emulator"


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- enrollments --------------------------------------------------------------------

@dataclass
class Enrollment:
    kind: str  # "group" | "individual"
    name: str  # group name, or the individual enrollment's registration id
    primary: bytes
    secondary: bytes | None
    enabled: bool = True
    return_payload: object = None  # handed back in registrationState.payload, as a custom allocation would
    allocation_error: int | None = None  # every registration ends "failed" with this errorCode (e.g. 400209)
    allocation_message: str | None = None

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.name}"


@dataclass
class Enrollments:
    id_scope: str
    groups: list[Enrollment] = field(default_factory=list)
    individual: dict[str, Enrollment] = field(default_factory=dict)  # by registration id in lower case


def load_enrollments(source: dict | str | os.PathLike) -> Enrollments:
    """Parse and check an enrollments document (a dict, or the path of a JSON file)."""
    where = "enrollments"
    if not isinstance(source, dict):
        where = f"enrollments file {str(source)!r}"
        try:
            source = json.loads(Path(source).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{where}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{where}: cannot read ({exc.__class__.__name__})") from None
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(source, dict):
        raise InputError(f"{where}: expected a JSON object")
    from flasher.dps import validate_id_scope

    try:
        scope = validate_id_scope(source.get("id_scope", ""))
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    out = Enrollments(scope)

    def keys(entry: dict, what: str) -> tuple[bytes, bytes | None]:
        p = decode_symmetric_key(entry.get("primary_key", ""), f"{where}: {what} primary_key")
        s = entry.get("secondary_key")
        return p, (decode_symmetric_key(s, f"{where}: {what} secondary_key") if s else None)

    groups, individual = source.get("groups", []), source.get("individual", [])
    if not isinstance(groups, list) or not isinstance(individual, list):
        raise InputError(f"{where}: 'groups' and 'individual' must be lists")
    def failure(entry: dict, what: str) -> tuple[int | None, str | None]:
        code, message = entry.get("allocation_error"), entry.get("allocation_message")
        if code is None:
            if message is not None:
                raise InputError(f"{where}: {what}: 'allocation_message' without 'allocation_error'")
            return None, None
        if isinstance(code, bool) or not isinstance(code, int) or not 400000 <= code <= 599999:
            raise InputError(f"{where}: {what}: 'allocation_error' {code!r} is not a DPS errorCode (400000-599999)")
        if message is not None and not isinstance(message, str):
            raise InputError(f"{where}: {what}: 'allocation_message' must be a string")
        return code, message

    for n, g in enumerate(groups, 1):
        if not isinstance(g, dict) or not isinstance(g.get("name"), str) or not g["name"]:
            raise InputError(f"{where}: group {n} needs a 'name'")
        if any(x.name == g["name"] for x in out.groups):
            raise InputError(f"{where}: group {g['name']!r} appears twice")
        p, s = keys(g, f"group {g['name']!r}")
        out.groups.append(Enrollment("group", g["name"], p, s, bool(g.get("enabled", True)), g.get("return_payload"),
                                     *failure(g, f"group {g['name']!r}")))
    for n, e in enumerate(individual, 1):
        rid = e.get("registration_id") if isinstance(e, dict) else None
        if not isinstance(rid, str) or not rid:
            raise InputError(f"{where}: individual enrollment {n} needs a 'registration_id'")
        if not valid_registration_id(rid):
            raise InputError(f"{where}: individual enrollment {rid!r}: not a valid registration id (at most 128 "
                             "alphanumerics and - . _ :, ending in an alphanumeric or -)")
        if rid.lower() in out.individual:  # registration ids are case-insensitive
            raise InputError(f"{where}: individual enrollment {rid!r} appears twice")
        p, s = keys(e, f"individual enrollment {rid!r}")
        out.individual[rid.lower()] = Enrollment("individual", rid, p, s, bool(e.get("enabled", True)),
                                                 e.get("return_payload"), *failure(e, f"individual enrollment {rid!r}"))
    return out


# --- SAS tokens ---------------------------------------------------------------------

def check_sas(token: str | None, resource: str, keys: list[bytes], now: float | None = None) -> str | None:
    """None if ``token`` is a valid SAS for ``resource`` signed by one of ``keys``; else why not."""
    prefix = "SharedAccessSignature "
    if not token or not token.startswith(prefix):
        return "not a SharedAccessSignature"
    fields: dict[str, str] = {}
    for part in token[len(prefix):].split("&"):
        k, sep, v = part.partition("=")
        if not sep or k in fields:
            return "malformed token"
        fields[k] = v
    if not {"sr", "sig", "se"} <= fields.keys():
        return "token lacks sr, sig or se"
    sr_raw, se = fields["sr"], fields["se"]
    if urllib.parse.unquote(sr_raw).lower() != resource.lower():
        return "token is for another resource"
    try:
        expiry = int(se)
        sig = base64.b64decode(urllib.parse.unquote(fields["sig"]), validate=True)
    except (ValueError, binascii.Error):
        return "malformed token"
    if expiry <= (time.time() if now is None else now):
        return "token expired"
    decoded = urllib.parse.unquote(sr_raw)
    signed = {sr_raw, urllib.parse.quote(decoded, safe=""), urllib.parse.quote(decoded.lower(), safe="")}
    for key in keys:
        for sr in signed:
            mac = hmac.new(key, f"{sr}\n{se}".encode(), hashlib.sha256).digest()
            if hmac.compare_digest(mac, sig):
                return None
    return "signature does not match"


def _which_key(e: Enrollment, registration_id: str, token: str | None, id_scope: str) -> str:
    """"primary" or "secondary": which of the enrollment's keys signed an accepted token (key rotation)."""
    primary = _key_pair(e, registration_id)[:1]
    return "primary" if check_sas(token, f"{id_scope}/registrations/{registration_id}", primary) is None else "secondary"


def _key_pair(e: Enrollment, registration_id: str) -> list[bytes]:
    """The device keys an enrollment grants a registration id (raw bytes)."""
    if e.kind == "individual":
        return [k for k in (e.primary, e.secondary) if k]
    return [base64.b64decode(derive_device_key(k, registration_id)) for k in (e.primary, e.secondary) if k]


# --- the emulator -------------------------------------------------------------------

def _add_ws_stats(totals: dict, stream: WebSocketStream) -> None:
    st = stream.stats
    totals["pings_sent"] += st.pings_sent
    totals["pongs_received"] += st.pongs_received
    totals["unmasked_control_frames"] += st.unmasked_control_frames
    totals["closes_received"] += st.close_received is not None
    totals["closes_sent"] += st.close_sent is not None


# Registration record members that are the emulator's own, never sent to the device.
_EXTRAS = frozenset({"enrollment", "attempts", "device_payload", "model_id", "transport", "signed_with"})

@dataclass
class _Operation:
    operation_id: str
    registration_id: str
    enrollment: Enrollment
    ready_at: float
    keys: list[bytes]
    request: dict = field(default_factory=dict)  # what the emulator records of the request: payload, transport
    result: dict | None = None


class DpsEmulator(MqttApplication):
    """DPS + IoT Hub on one TLS MQTT endpoint (and 443). ``with DpsEmulator(...) as emu:`` runs it in a thread.

    ``port``: MQTT over TLS (8883; None keeps it closed). ``websocket_port``: MQTT over TLS +
    WebSocket (443 for the SDK; None, the default, serves no WebSockets).
    """

    def __init__(self, enrollments: dict | str | os.PathLike, host: str = "127.0.0.1", port: int | None = DEFAULT_PORT,
                 cert_dir: str | os.PathLike | None = None, assign_delay: float = 0.0,
                 state_file: str | os.PathLike | None = None, hub_name: str | None = None,
                 websocket_port: int | None = None, registration_quota: str | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.enrollments = load_enrollments(enrollments)
        self._quota: tuple[int, float] | None = None
        if registration_quota is not None:
            from flasher.governor import parse_quota

            self._quota = parse_quota(registration_quota, "--registration-quota")
        self.registration_quota = registration_quota
        self._clock = clock  # for the quota's window only (a test may pass its own)
        self._quota_accepted: deque[float] = deque()  # when each register request inside the window was accepted
        self.id_scope = self.enrollments.id_scope
        if port is None and websocket_port is None:
            raise InputError("DPS emulator: neither port 8883 nor a WebSocket port to listen on")
        self.host, self.port, self.websocket_port = host, port, websocket_port
        self.hub_name = hub_name or ("localhost" if host in ("", "0.0.0.0", "::") else host)
        self.assign_delay = float(assign_delay)
        self.state_file = Path(state_file) if state_file else None
        self._tmp_cert_dir: tempfile.TemporaryDirectory | None = None
        if cert_dir is None:
            self._tmp_cert_dir = tempfile.TemporaryDirectory(prefix="flasher-dps-")
            cert_dir = self._tmp_cert_dir.name
        self.cert_dir = Path(cert_dir)
        self._creds: certs.ServerCredentials | None = None
        self._lock = threading.RLock()
        self._registrations: dict[str, dict] = {}
        self._devices: dict[str, dict] = {}
        self._device_keys: dict[str, list[bytes]] = {}
        self._messages: list[dict] = []
        self._operations: dict[str, _Operation] = {}
        self._stats = {"register_requests": 0, "status_requests": 0, "throttled": 0, "quota_throttled": 0,
                       "unauthorized": 0, "bad_requests": 0, "invalid_registration_ids": 0, "hub_connections": 0,
                       "hub_refused": 0, "websocket_connections": 0, "https_requests": 0, "twin_requests": 0,
                       "status_lookups": 0}
        self._twins: dict[str, dict] = {}  # device id -> {"reported": {...}, "version": n}
        self._throttle: dict[str | None, list[int]] = {}  # registration id (None: any) -> [remaining, retry_after, status]
        self._refused: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: MqttServer | None = None
        self._https: HttpsListener | None = None
        self._closed_8883: socket.socket | None = None  # with port=None: bound, never listening
        self._ws_streams: set[WebSocketStream] = set()  # open ones (guarded by _lock)
        self._ws_totals = {"pings_sent": 0, "pongs_received": 0, "unmasked_control_frames": 0, "closes_received": 0,
                           "closes_sent": 0}

    # --- lifecycle ---------------------------------------------------------------
    @property
    def ca_cert_path(self) -> Path:
        if self._creds is None:
            raise RuntimeError("the emulator is not started")
        return self._creds.ca_cert

    def start(self) -> DpsEmulator:
        if self._thread is not None:
            raise RuntimeError("already started")
        hosts = [h for h in (self.hub_name, self.host, "localhost", "127.0.0.1") if h and h not in ("0.0.0.0", "::")]
        self._creds = certs.ensure_server_credentials(self.cert_dir, hosts)
        if self.port is None:
            self._hold_8883_closed()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self._creds.cert, self._creds.key)
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._loop_exception)
        self._server = MqttServer(self, self.host, self.port or 0, ctx)
        if self.websocket_port is not None:
            self._https = HttpsListener(self.host, self.websocket_port, ctx,
                                        upgrades={WEBSOCKET_PATH: ("mqtt", self._serve_websocket)},
                                        http_handler=self._serve_http)
        started: list[BaseException | None] = []
        ready = threading.Event()

        loop, server, https = self._loop, self._server, self._https
        assert loop is not None

        async def listen() -> None:
            if self.port is not None:
                await server.start()
            if https is not None:
                try:
                    await https.start()
                except OSError:
                    await server.stop()
                    raise

        async def stop() -> None:
            if https is not None:
                await https.stop()
            await server.stop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(listen())
            except OSError as exc:
                started.append(exc)
                ready.set()
                loop.close()
                return
            started.append(None)
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(stop())
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name=f"dps-emulator-{self.host}", daemon=True)
        self._thread.start()
        ready.wait()
        if started[0] is not None:
            self._thread.join()
            self._thread = None
            if self._closed_8883 is not None:
                self._closed_8883.close()
                self._closed_8883 = None
            exc = started[0]
            why = getattr(exc, "strerror", None) or exc
            ports = "/".join(str(p) for p in (self.port, self.websocket_port) if p is not None)
            raise FlasherError(f"DPS emulator: cannot listen on {self.host}:{ports}: {why}")
        if self.port is not None:
            self.port = self._server.port
        if self._https is not None:
            self.websocket_port = self._https.port
        self._write_state()
        log.info("DPS emulator on %s (hub %s), ID scope %s", self.endpoints(), self.hub_name, self.id_scope)
        return self

    def endpoints(self) -> str:
        """Where it listens, for people: ``127.0.0.5:8883 (MQTT), 127.0.0.5:443 (MQTT over WebSocket, HTTPS)``."""
        shown = [f"{self.host}:{self.port} (MQTT)"] if self.port is not None else []
        if self.websocket_port is not None:
            shown.append(f"{self.host}:{self.websocket_port} (MQTT over WebSocket, HTTPS)")
        return ", ".join(shown)

    def _hold_8883_closed(self) -> None:
        """Bind 8883 on our address without listening: a client that dials it is refused, and no other
        server can open it there while we run, so a working client provably came by 443."""
        sock = socket.socket()
        try:
            sock.bind((self.host, DEFAULT_PORT))  # no SO_REUSEADDR: nobody else may bind it either
        except OSError as exc:
            sock.close()
            raise FlasherError(f"DPS emulator: cannot listen on {self.host} with port {DEFAULT_PORT} closed: "
                               f"{DEFAULT_PORT} is in use there ({exc.strerror or exc})") from None
        self._closed_8883 = sock

    def stop(self) -> None:
        """Close every listener and connection and end the thread; the certificates stay in ``cert_dir``."""
        if self._thread is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._thread = None
        if self._closed_8883 is not None:
            self._closed_8883.close()
            self._closed_8883 = None
        if self._tmp_cert_dir is not None:
            self._tmp_cert_dir.cleanup()
            self._tmp_cert_dir = None

    def __enter__(self) -> DpsEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @staticmethod
    def _loop_exception(loop, context) -> None:
        exc = context.get("exception")
        if isinstance(exc, (ssl.SSLError, ConnectionError, OSError)):
            log.debug("connection error: %s", context.get("message"))  # e.g. a client that rejects our CA
        else:
            loop.default_exception_handler(context)

    # --- fault knobs (thread-safe) -----------------------------------------------
    def throttle(self, count: int, retry_after: int = 1, registration_id: str | None = None, status: int = 429) -> None:
        """Answer the next ``count`` register requests (of one id, or of anyone) with 429 (or a 5xx ``status``)."""
        if status != 429 and not 500 <= status <= 599:
            raise ValueError(f"status {status}: throttling answers 429 or 5xx")
        with self._lock:
            self._throttle[registration_id.lower() if registration_id else None] = [int(count), int(retry_after),
                                                                                     int(status)]

    def refuse_hub(self, *device_ids: str) -> None:
        """Refuse hub connections (CONNACK 5) for these devices from now on."""
        with self._lock:
            self._refused.update(device_ids)

    def accept_hub(self, *device_ids: str) -> None:
        with self._lock:
            self._refused.difference_update(device_ids)

    def _enrollment(self, name: str) -> Enrollment:
        e = self.enrollments.individual.get(name.lower()) or next(
            (g for g in self.enrollments.groups if g.name == name), None)
        if e is None:
            raise InputError(f"enrollment {name!r}: no such group or individual enrollment")
        return e

    def set_enrollment_enabled(self, name: str, enabled: bool) -> None:
        """Enable or disable an individual enrollment (by registration id) or a group (by name)."""
        with self._lock:
            self._enrollment(name).enabled = bool(enabled)
        self._write_state()

    def fail_allocation(self, name: str, error_code: int | None = FAILED_ALLOCATION, message: str | None = None) -> None:
        """Make every registration through this enrollment end ``failed`` with ``error_code`` (400209, custom
        allocation failed, by default), as DPS reports an allocation that went wrong; None: assign again."""
        if error_code is not None and not 400000 <= int(error_code) <= 599999:
            raise ValueError(f"error code {error_code}: not a DPS errorCode")
        with self._lock:
            e = self._enrollment(name)
            e.allocation_error = None if error_code is None else int(error_code)
            e.allocation_message = message
        self._write_state()

    def ping_websockets(self, payload: bytes = b"flasher") -> int:
        """Send a WebSocket PING on every open WebSocket connection; how many were pinged.

        The answers show in :meth:`websocket_stats` (paho answers unmasked: see flasher.sim.web).
        """
        with self._lock:
            streams = list(self._ws_streams)
        if self._loop is None or not streams:
            return 0

        async def ping() -> None:
            for stream in streams:
                stream.ping(payload)
                await stream.drain()

        asyncio.run_coroutine_threadsafe(ping(), self._loop).result(10)
        return len(streams)

    def close_websockets(self) -> int:
        """Start the WebSocket closing handshake on every open WebSocket connection; how many."""
        with self._lock:
            streams = list(self._ws_streams)
        if self._loop is None or not streams:
            return 0

        async def close() -> None:
            for stream in streams:
                stream.close()
                await stream.drain()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        return len(streams)

    def websocket_stats(self) -> dict:
        """Frame counts over every WebSocket connection so far, open or closed (pings sent, pongs and
        closes received, unmasked control frames)."""
        with self._lock:
            totals = dict(self._ws_totals)
            for stream in self._ws_streams:
                _add_ws_stats(totals, stream)
        return totals

    def disable(self, name: str) -> None:
        self.set_enrollment_enabled(name, False)

    def enable(self, name: str) -> None:
        self.set_enrollment_enabled(name, True)

    def assign_now(self) -> None:
        """Finish every registration still assigning at its next poll: a test that held DPS with a long
        ``assign_delay`` (two runs overlapping, whatever the machine's load) lets go."""
        with self._lock:
            for op in self._operations.values():
                op.ready_at = min(op.ready_at, time.monotonic())

    # --- state ---------------------------------------------------------------------
    def state(self) -> dict:
        with self._lock:
            return copy.deepcopy({
                "id_scope": self.id_scope,
                "endpoint": f"{self.host}:{self.port}" if self.port is not None else None,
                "websocket_endpoint": (f"wss://{self.host}:{self.websocket_port}{WEBSOCKET_PATH}"
                                       if self.websocket_port is not None else None),
                "hub": self.hub_name,
                "registration_quota": self.registration_quota,
                "enrollments": {"groups": [{"name": g.name, "enabled": g.enabled, "allocation_error": g.allocation_error}
                                           for g in self.enrollments.groups],
                                "individual": [{"registration_id": e.name, "enabled": e.enabled,
                                                "allocation_error": e.allocation_error}
                                               for e in self.enrollments.individual.values()]},
                "registrations": list(self._registrations.values()),
                "devices": list(self._devices.values()),
                "messages": self._messages,
                "twins": {d: {"reported": t["reported"], "version": t["version"]} for d, t in self._twins.items()},
                "stats": self._stats,
            })

    def connections(self) -> list[dict]:
        """Open connections: [{"kind": "dps"|"hub", "client_id": ..., "transport": "mqtt"|"websocket"}]."""
        if self._server is None:
            return []
        return [{"kind": c.info.get("kind"), "client_id": c.client_id, "transport": c.transport}
                for c in list(self._server.connections)]

    def _write_state(self) -> None:
        if self.state_file is None:
            return
        with self._lock:  # one writer at a time, so the newest state lands last
            atomic_write(self.state_file, json.dumps(self.state(), indent=2, sort_keys=True) + "\n", mode=0o644)

    # --- 443: MQTT over WebSockets ----------------------------------------------------
    async def _serve_websocket(self, stream: WebSocketStream, request: HttpRequest) -> None:
        """An upgraded /$iothub/websocket: the same MQTT connection handler as port 8883."""
        assert self._server is not None
        with self._lock:
            self._stats["websocket_connections"] += 1
            self._ws_streams.add(stream)
        self._write_state()
        try:
            await self._server.serve(stream, stream, transport="websocket")
            await stream.finish()
        finally:
            with self._lock:
                self._ws_streams.discard(stream)
                _add_ws_stats(self._ws_totals, stream)

    # --- 443: DPS's HTTPS registration API ----------------------------------------------
    async def _serve_http(self, request: HttpRequest) -> HttpResponse:
        """Every request on 443 that is not a WebSocket upgrade: DPS's HTTPS runtime API.

        ``PUT /{idScope}/registrations/{registrationId}/register?api-version=...`` (body
        ``{"registrationId", "payload"}``) and ``GET /{idScope}/registrations/{registrationId}/operations/
        {operationId}?api-version=...``, each with the SAS token in ``Authorization``. The same checks, knobs,
        operations and records as MQTT (:meth:`_register_request`, :meth:`_status_request`); ``Retry-After``
        where MQTT has ``retry-after`` in the topic. Also the device's registration status lookup, ``POST
        /{idScope}/registrations/{registrationId}?api-version=...`` (:meth:`_lookup_request`).
        """
        parts = request.path.split("/")
        if len(parts) < 4 or parts[0] != "" or parts[2] != "registrations":
            return await not_found(request)
        scope = urllib.parse.unquote(parts[1])
        if len(parts) == 4:
            kind, reg_id, op_id = "lookup", parts[3], ""
        elif parts[-1] == "register":
            kind, reg_id, op_id = "register", "/".join(parts[3:-1]), ""
        elif len(parts) >= 6 and parts[-2] == "operations":
            kind, reg_id, op_id = "status", "/".join(parts[3:-2]), urllib.parse.unquote(parts[-1])
        else:
            return await not_found(request)
        reg_id = urllib.parse.unquote(reg_id)
        with self._lock:
            self._stats["https_requests"] += 1
        wanted = {"register": "PUT", "status": "GET", "lookup": "POST"}[kind]
        if request.method != wanted:
            self._write_state()
            return HttpResponse.json(405, self._error(405000, f"The requested resource does not support http method "
                                                              f"'{request.method}'."), [("Allow", wanted)])
        token = request.headers.get("authorization")
        if scope != self.id_scope:
            log.info("DPS HTTPS %r: unknown ID scope %r; answering 401", reg_id, scope)
            auth: _Auth = _Auth("unknown ID scope", None, None)
        elif not valid_registration_id(reg_id):
            auth = _Auth(None, None, None)  # refused as an invalid id first, like MQTT
        else:
            why, enrollment = self._authenticate(reg_id, token)
            signed = _which_key(enrollment, reg_id, token, self.id_scope) if enrollment is not None else None
            auth = _Auth(why, enrollment, signed)
            if why:
                log.info("DPS HTTPS %r: authentication failed (%s); answering 401", reg_id, why)
        if kind == "register":
            answer = self._register_request(reg_id, auth, "https", request.body)
        elif kind == "lookup":
            answer = self._lookup_request(reg_id, auth)
        else:
            answer = self._status_request(reg_id, auth, op_id)
        headers = [("Retry-After", str(answer.retry_after))] if answer.retry_after is not None else []
        return HttpResponse.json(answer.status, answer.body, headers)

    # --- MQTT: CONNECT -------------------------------------------------------------
    async def on_connect(self, conn: Connection, req: ConnectRequest) -> int:
        user = req.username or ""
        scope, sep, rest = user.partition("/registrations/")
        if sep and "/" not in scope:
            # {idScope}/registrations/{registrationId}/api-version=...: the id itself may hold a '/' (refused later)
            reg_id = rest.rpartition("/api-version=")[0] if "/api-version=" in rest else rest.partition("/")[0]
            return self._connect_dps(conn, req, scope, reg_id)
        parts = user.split("/")
        if len(parts) >= 2 and parts[0].lower() == self.hub_name.lower():
            query = urllib.parse.parse_qs("/".join(parts[2:]).partition("?")[2])
            model_ids = query.get("model-id") or []
            return self._connect_hub(conn, req, parts[1], model_ids[0] if model_ids else None)
        log.info("CONNECT from %s refused: user name is neither DPS nor hub %s", conn.peer, self.hub_name)
        return REFUSED_BAD_USERNAME_PASSWORD

    def _connect_dps(self, conn: Connection, req: ConnectRequest, scope: str, reg_id: str) -> int:
        if scope != self.id_scope:
            log.info("DPS CONNECT %r refused: unknown ID scope %r", reg_id, scope)
            return REFUSED_SERVER_UNAVAILABLE  # what DPS answers for an unknown ID scope
        conn.info.update(kind="dps", registration_id=reg_id)
        conn.session_key = ("dps", req.client_id)
        reason: str | None = "client id differs from the registration id"
        enrollment = None
        if not valid_registration_id(reg_id):
            reason = None  # every request is answered 400 (invalid id) before any key is looked at
        elif req.client_id == reg_id:
            reason, enrollment = self._authenticate(reg_id, req.password)
        signed = _which_key(enrollment, reg_id, req.password, self.id_scope) if enrollment is not None else None
        conn.info["auth"] = _Auth(reason, enrollment, signed)
        if reason:
            log.info("DPS %r: authentication failed (%s); will answer 401", reg_id, reason)
        return ACCEPTED  # DPS answers a bad token with 401 on the response topic, not at CONNECT

    def _authenticate(self, reg_id: str, password: str | None) -> tuple[str | None, Enrollment | None]:
        resource = f"{self.id_scope}/registrations/{reg_id}"
        with self._lock:
            individual = self.enrollments.individual.get(reg_id.lower())  # ids are case-insensitive
            if individual is not None:  # an individual enrollment wins over any group
                why = check_sas(password, resource, _key_pair(individual, reg_id))
                return (why, None) if why else (None, individual)
            why = "no enrollment matches"
            for g in self.enrollments.groups:
                why = check_sas(password, resource, _key_pair(g, reg_id))
                if why is None:
                    return None, g
                if why != "signature does not match":
                    break
        return why, None

    def _connect_hub(self, conn: Connection, req: ConnectRequest, device_id: str, model_id: str | None) -> int:
        conn.info.update(kind="hub", device_id=device_id)
        conn.session_key = ("hub", device_id)
        with self._lock:
            keys = self._device_keys.get(device_id)
            why: str | None
            if req.client_id != device_id:
                why = "client id differs from the device id"
            elif keys is None:
                why = "no such device"
            elif device_id in self._refused:
                why = "refused by the emulator's fault knob"
            else:
                why = check_sas(req.password, f"{self.hub_name}/devices/{device_id}", keys)
            if why:
                self._stats["hub_refused"] += 1
                log.info("hub CONNECT %r refused: %s", device_id, why)
            else:
                self._stats["hub_connections"] += 1
                dev = self._devices[device_id]
                dev["connected"] = True
                dev["connection_count"] += 1
                dev["last_activity_utc"] = _utc_now()
                dev["transport"] = conn.transport
                if model_id:
                    dev["model_id"] = model_id  # IoT Plug and Play: announced in the CONNECT user name
        self._write_state()  # before the CONNACK: a test that reads the file after a refusal sees it
        return REFUSED_NOT_AUTHORIZED if why else ACCEPTED

    def on_close(self, conn: Connection, reason: str) -> None:
        if conn.info.get("kind") == "hub":
            with self._lock:
                dev = self._devices.get(conn.info["device_id"])
                if dev is not None:
                    dev["connected"] = False
            self._write_state()

    async def on_subscribe(self, conn: Connection, topic_filter: str, qos: int) -> int:
        if conn.info.get("kind") == "dps":
            return min(qos, 1) if topic_filter == RES_PREFIX + "#" else 0x80
        dev = conn.info.get("device_id")
        # Twin GET and reported PATCH are answered; direct methods and cloud-to-device messages are accepted
        # subscriptions on which nothing ever arrives (the emulator has no service-side API to send them).
        allowed = (f"devices/{dev}/messages/devicebound/#", "$iothub/twin/res/#", "$iothub/methods/POST/#",
                   "$iothub/twin/PATCH/properties/desired/#")
        return min(qos, 1) if topic_filter in allowed else 0x80

    # --- MQTT: PUBLISH -------------------------------------------------------------
    async def on_publish(self, conn: Connection, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if conn.info.get("kind") == "dps":
            await self._dps_request(conn, topic, payload)
        else:
            await self._hub_publish(conn, topic, payload)

    async def _respond(self, conn: Connection, status: int, rid: str, body: dict, retry_after: int | None = None) -> None:
        topic = f"{RES_PREFIX}{status}/?$rid={urllib.parse.quote(rid, safe='')}"
        if retry_after is not None:
            topic += f"&retry-after={retry_after}"
        await conn.publish(topic, json.dumps(body).encode("utf-8"), qos=1)

    @staticmethod
    def _error(code: int, message: str) -> dict:
        return {"errorCode": code, "trackingId": str(uuid.uuid4()), "message": message, "timestampUtc": _utc_now()}

    async def _dps_request(self, conn: Connection, topic: str, payload: bytes) -> None:
        path, _, query = topic.partition("/?")
        params = {k: v[0] for k, v in urllib.parse.parse_qs(query, keep_blank_values=True).items()}
        rid = params.get("$rid")
        if rid is None or path not in (REGISTER_PATH, STATUS_PATH):
            raise ProtocolError(f"DPS: unexpected publish to {topic!r}")
        reg_id, auth = conn.info["registration_id"], conn.info["auth"]
        if path == REGISTER_PATH:
            answer = self._register_request(reg_id, auth, conn.transport, payload)
        else:
            answer = self._status_request(reg_id, auth, params.get("operationId", ""))
        await self._respond(conn, answer.status, rid, answer.body, answer.retry_after)

    # --- the requests, whatever the transport ------------------------------------------
    def _register_request(self, reg_id: str, auth: _Auth, transport: str, payload: bytes) -> _Answer:
        """One register request, checked in DPS's order: the id, the throttling knob, the quota, the key, the
        body, the enrollment. The state file is rewritten before the answer goes out."""
        try:
            with self._lock:
                self._stats["register_requests"] += 1
                return self._register_locked(reg_id, auth, transport, payload)
        finally:
            self._write_state()

    def _register_locked(self, reg_id: str, auth: _Auth, transport: str, payload: bytes) -> _Answer:
        if not valid_registration_id(reg_id):
            return self._invalid_id(reg_id)
        for key in (reg_id.lower(), None):
            t = self._throttle.get(key)
            if t and t[0] > 0:
                t[0] -= 1
                self._stats["throttled"] += 1
                retry_after, status = t[1], t[2]
                log.info("DPS %r: throttled (%d, retry-after %d)", reg_id, status, retry_after)
                message = THROTTLED_MESSAGE if status == 429 else "Internal server error."
                return _Answer(status, self._error(status * 1000 + 1, message), retry_after)
        wait = self._quota_wait()
        if wait is not None:
            self._stats["quota_throttled"] += 1
            log.info("DPS %r: over the registration quota %s (retry-after %d)", reg_id, self.registration_quota, wait)
            return _Answer(429, self._error(429001, THROTTLED_MESSAGE), wait)
        if auth.error:
            self._stats["unauthorized"] += 1
            return self._unauthorized()
        try:
            body = json.loads(payload.decode("utf-8") or "{}")
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = None
        if not isinstance(body, dict) or not set(body) <= REGISTER_MEMBERS:
            # DPS deserializes the body strictly: a top-level "modelId" (IoT Central's model id belongs
            # inside "payload") gets exactly this answer (MicrosoftDocs/azure-docs#66740).
            self._stats["bad_requests"] += 1
            log.info("DPS %r: register body refused (400012): members %s", reg_id,
                     sorted(body) if isinstance(body, dict) else type(body).__name__)
            return _Answer(400, self._error(400012, "Deserialization error."))
        if str(body.get("registrationId", "")).lower() != reg_id.lower():
            self._stats["bad_requests"] += 1
            return _Answer(400, self._error(400004, "The registration id in the request body does not match the token."))
        enrollment = auth.enrollment
        assert enrollment is not None
        request = {"device_payload": body.get("payload"), "transport": transport, "signed_with": auth.signed_with}
        op_id = self._new_operation_id()
        if not enrollment.enabled:
            record = self._record(reg_id, enrollment, status="disabled", now=_utc_now(), request=request)
            log.info("DPS %r: enrollment %s is disabled", reg_id, enrollment.label)
            return _Answer(200, {"operationId": op_id, "status": "disabled",
                                 "registrationState": self._registration_state(record)})
        self._operations[op_id] = _Operation(op_id, reg_id, enrollment, time.monotonic() + self.assign_delay,
                                             _key_pair(enrollment, reg_id), request)
        log.info("DPS %r: assigning (operation %s, %s, over %s)", reg_id, op_id, enrollment.label, transport)
        return _Answer(202, {"operationId": op_id, "status": "assigning"}, REGISTER_RETRY_AFTER)

    def _status_request(self, reg_id: str, auth: _Auth, op_id: str) -> _Answer:
        """One operation status poll (not counted against the quota); state written before the answer."""
        try:
            with self._lock:
                self._stats["status_requests"] += 1
                refused = self._refused_request(reg_id, auth)
                if refused is not None:
                    return refused
                op = self._operations.get(op_id)
                if op is None or op.registration_id.lower() != reg_id.lower():
                    return _Answer(404, self._error(404201, "Operation not found."))
                if op.result is None:
                    remaining = op.ready_at - time.monotonic()
                    if remaining > 0:
                        return _Answer(202, {"operationId": op_id, "status": "assigning"},
                                       max(1, min(3, math.ceil(remaining))))
                    op.result = self._assign(op)
                return _Answer(200, op.result)
        finally:
            self._write_state()

    def _lookup_request(self, reg_id: str, auth: _Auth) -> _Answer:
        """The device's registration status lookup: 200 with its DeviceRegistrationResult (the registration state),
        404 if it never registered. Not a registration: no quota, no record; state written before the answer."""
        try:
            with self._lock:
                self._stats["status_lookups"] += 1
                refused = self._refused_request(reg_id, auth)
                if refused is not None:
                    return refused
                rec = self._registrations.get(reg_id.lower())
                if rec is None:
                    return _Answer(404, self._error(404201, "Device registration not found."))
                return _Answer(200, self._registration_state(rec))
        finally:
            self._write_state()

    def _refused_request(self, reg_id: str, auth: _Auth) -> _Answer | None:
        """An invalid id's 400 or a bad token's 401 (in that order, as DPS checks them), or None. Lock held."""
        if not valid_registration_id(reg_id):
            return self._invalid_id(reg_id)
        if auth.error:
            self._stats["unauthorized"] += 1
            return self._unauthorized()
        return None

    def _invalid_id(self, reg_id: str) -> _Answer:
        self._stats["invalid_registration_ids"] += 1
        log.info("DPS: registration id %r refused: not a valid registration id", reg_id[:140])
        return _Answer(400, self._error(INVALID_ID_ERROR, "The registration id is invalid: at most 128 characters, "
                                                          "alphanumerics and '-', '.', '_', ':', the last one "
                                                          "alphanumeric or '-'."))

    def _unauthorized(self) -> _Answer:
        return _Answer(401, self._error(401002, "The specified SAS token has an invalid signature. "
                                                "It does not match either the primary or secondary key."))

    def _quota_wait(self) -> int | None:
        """None if the registration quota takes one more request now (and counts it); else the whole seconds
        (at least 1) until the oldest accepted request leaves the window. Lock held."""
        if self._quota is None:
            return None
        count, window = self._quota
        now = self._clock()
        accepted = self._quota_accepted
        while accepted and accepted[0] <= now - window:
            accepted.popleft()
        if len(accepted) >= count:
            return max(1, math.ceil(accepted[0] + window - now))
        accepted.append(now)
        return None

    def _new_operation_id(self) -> str:
        return f"5.{_secrets.token_hex(8)}.{uuid.uuid4()}"

    def _record(self, reg_id: str, e: Enrollment, *, status: str, now: str, request: dict,
                substatus: str | None = None) -> dict:
        """The registration record, shaped like DPS's DeviceRegistrationState, plus the emulator's own
        extras (:data:`_EXTRAS`: the enrollment, attempts, and what the device sent and how). Registration
        ids are case-insensitive: one record per id whatever its spelling, named as first registered."""
        rec = self._registrations.get(reg_id.lower())
        if rec is None:
            rec = self._registrations[reg_id.lower()] = {"registrationId": reg_id, "createdDateTimeUtc": now,
                                                         "attempts": 0}
        device_payload = request.get("device_payload")
        model_id = device_payload.get("modelId") if isinstance(device_payload, dict) else None
        rec.update(enrollment=e.label, status=status, lastUpdatedDateTimeUtc=now, attempts=rec["attempts"] + 1,
                   etag=f'"{uuid.uuid4()}"', device_payload=device_payload, model_id=model_id,
                   transport=request.get("transport"), signed_with=request.get("signed_with"))
        for k in ("errorCode", "errorMessage"):
            rec.pop(k, None)
        if status == "assigned":
            rec.update(deviceId=rec.get("deviceId") or rec["registrationId"], assignedHub=self.hub_name,
                       substatus=substatus)
            if e.return_payload is not None:
                rec["payload"] = copy.deepcopy(e.return_payload)
            else:
                rec.pop("payload", None)
        return rec

    @staticmethod
    def _registration_state(rec: dict) -> dict:
        """What the device is told: the record without the emulator's extras."""
        return {k: v for k, v in rec.items() if k not in _EXTRAS}

    def _assign(self, op: _Operation) -> dict:
        """Complete an operation (lock held): create or update the device in the hub, or fail as configured."""
        now, reg_id, e = _utc_now(), op.registration_id, op.enrollment
        if not e.enabled:
            rec = self._record(reg_id, e, status="disabled", now=now, request=op.request)
            return {"operationId": op.operation_id, "status": "disabled", "registrationState": self._registration_state(rec)}
        if e.allocation_error is not None:
            rec = self._record(reg_id, e, status="failed", now=now, request=op.request)
            message = e.allocation_message or ALLOCATION_MESSAGES.get(e.allocation_error, "Allocation failed.")
            rec.update(errorCode=e.allocation_error, errorMessage=message)
            state = {k: v for k, v in self._registration_state(rec).items()
                     if k not in ("assignedHub", "deviceId", "substatus", "payload")}  # nothing was assigned
            log.info("DPS %r: allocation failed (%d, the enrollment's knob)", reg_id, e.allocation_error)
            return {"operationId": op.operation_id, "status": "failed", "registrationState": state}
        rec = self._record(reg_id, e, status="assigned", now=now, request=op.request, substatus="initialAssignment")
        device_id = rec["deviceId"]
        dev = self._devices.get(device_id)
        if dev is None:
            dev = self._devices[device_id] = {"device_id": device_id, "hub": self.hub_name, "created_utc": now,
                                              "connected": False, "connection_count": 0, "message_count": 0}
        dev.update(registration_id=rec["registrationId"], enrollment=e.label, status="enabled", last_activity_utc=now)
        self._device_keys[device_id] = op.keys
        log.info("DPS %r: assigned to %s as %r", reg_id, self.hub_name, device_id)
        return {"operationId": op.operation_id, "status": "assigned", "registrationState": self._registration_state(rec)}

    # --- the hub: telemetry and the twin -----------------------------------------------
    async def _hub_publish(self, conn: Connection, topic: str, payload: bytes) -> None:
        device_id = conn.info["device_id"]
        prefix = f"devices/{device_id}/messages/events/"
        if topic.startswith("$iothub/twin/"):
            return await self._twin_request(conn, device_id, topic, payload)
        if not topic.startswith(prefix):
            if topic.startswith("$iothub/"):  # e.g. a method response: no method is ever called here
                log.debug("hub %r: %s ignored (no direct method was invoked)", device_id, topic)
                return
            raise ProtocolError(f"device {device_id!r} published to {topic!r}")  # IoT Hub disconnects too
        props = {}
        for pair in filter(None, topic[len(prefix):].split("&")):
            k, _, v = pair.partition("=")
            props[urllib.parse.unquote(k)] = urllib.parse.unquote(v)
        try:
            text, encoding = payload.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(payload).decode("ascii"), "base64"
        with self._lock:
            self._messages.append({"device_id": device_id, "topic": topic, "payload": text, "payload_encoding": encoding,
                                   "properties": props, "received_utc": _utc_now()})
            dev = self._devices.get(device_id)
            if dev is not None:
                dev["message_count"] += 1
                dev["last_activity_utc"] = _utc_now()
        log.info("hub %r: telemetry (%d bytes)", device_id, len(payload))
        self._write_state()

    async def _twin_request(self, conn: Connection, device_id: str, topic: str, payload: bytes) -> None:
        """``$iothub/twin/GET/?$rid=n`` -> ``res/200`` with the twin (no desired properties; the reported ones
        the device patched); ``$iothub/twin/PATCH/properties/reported/?$rid=n`` -> ``res/204`` with the new
        ``$version``, or ``res/400`` for a body that is not a JSON object."""
        path, _, query = topic.partition("/?")
        rid = urllib.parse.parse_qs(query, keep_blank_values=True).get("$rid", [""])[0]
        extra = ""
        with self._lock:
            self._stats["twin_requests"] += 1
            twin = self._twins.setdefault(device_id, {"reported": {}, "version": 1})
            if path == "$iothub/twin/GET":
                status, body = 200, {"desired": {"$version": 1}, "reported": {**twin["reported"],
                                                                               "$version": twin["version"]}}
            elif path == "$iothub/twin/PATCH/properties/reported":
                try:
                    patch = json.loads(payload.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    patch = None
                if isinstance(patch, dict):
                    _merge_patch(twin["reported"], patch)
                    twin["version"] += 1
                    status, body, extra = 204, None, f"&$version={twin['version']}"
                else:
                    status, body = 400, self._error(400004, "The reported properties must be a JSON object.")
            else:
                status, body = 400, self._error(400004, f"Unsupported twin operation {path!r}.")
        log.info("hub %r: twin %s -> %d", device_id, path, status)
        self._write_state()
        topic_out = f"$iothub/twin/res/{status}/?$rid={urllib.parse.quote(rid, safe='')}{extra}"
        await conn.publish(topic_out, b"" if body is None else json.dumps(body).encode("utf-8"), qos=0)


@dataclass
class _Auth:
    """What the emulator concluded about a request's credentials (at CONNECT over MQTT, per request over HTTPS)."""

    error: str | None  # why the token is refused; None if accepted (or the id is invalid, refused first)
    enrollment: Enrollment | None
    signed_with: str | None  # "primary" | "secondary"


@dataclass
class _Answer:
    status: int
    body: dict
    retry_after: int | None = None


def _merge_patch(target: dict, patch: dict) -> None:
    """JSON merge patch (RFC 7396), what a twin's reported properties PATCH does: null removes a member."""
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            _merge_patch(target[k], v)
        else:
            target[k] = copy.deepcopy(v)
