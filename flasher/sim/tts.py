"""A local The Things Stack v3 emulator: the four end device registries behind one HTTP(S) port.

Like the DPS emulator, it is a product feature: ``flasher simulate tts`` and ``flasher
demo`` run it, and tests use it in process. What it answers follows lorawan-stack's
sources (TheThingsNetwork/lorawan-stack):

* routes (``api/ttn/lorawan/v3/end_device_services.proto``, ``joinserver.proto``,
  ``networkserver.proto``, ``applicationserver.proto``): ``POST/GET/DELETE
  /api/v3/applications/{app}/devices[/{id}]`` (Identity Server) and ``GET/PUT/POST/DELETE
  /api/v3/{js,ns,as}/applications/{app}/devices[/{id}]``; bodies ``{"end_device", "field_mask":
  {"paths"}}``, GETs with ``?field_mask=a,b``; every success is 200 (grpc-gateway);
* field masks (``pkg/ttnpb/field_mask_validation.go``): a Set or Get naming a path its server
  does not own is 400 ``field_mask_paths`` with ``forbidden_paths``; a Set stores exactly the
  masked paths; a Get returns the masked paths plus ids and timestamps;
* rights (``pkg/auth/rights/require.go``, each registry's ``rights.RequireApplication``): API keys
  ``NNSXS.<id>.<secret>`` (``pkg/auth``) with rights per application; Create/Set need
  ``RIGHT_APPLICATION_DEVICES_WRITE``, writing ``root_keys`` also ``..._WRITE_KEYS``, Gets
  ``..._READ`` and for keys ``..._READ_KEYS``; no rights on the application is 403
  ``no_application_rights``, some missing is 403 ``insufficient_application_rights`` with
  ``missing``; an unknown key is 401 ``api_key_not_found``, a wrong secret 401
  ``invalid_authorization``; no key at all is 403 at the Identity Server and 401
  ``unauthenticated`` at the others;
* conflicts: a taken device id is 409 ``id_taken`` (``pkg/util/store``); a DevEUI/JoinEUI pair
  registered anywhere is 409 ``end_device_euis_taken`` naming the holder
  (``pkg/identityserver/end_device_registry.go``); the Join Server refuses another device's
  EUIs with 409 ``already_provisioned`` and changed EUIs with 400 ``read_only_field``
  (``pkg/joinserver/redis/registry.go``); the Network Server wants a frequency plan and
  valid MAC/PHY versions on creation (400 ``field_value``) and a known plan (404 ``not_found``);
* errors have the stack's shape (``pkg/errors``, grpc-gateway's error handler):
  ``{"code": <gRPC code>, "message": "error:<namespace>:<name> (<message>)", "details":
  [{"@type": ".../ttn.lorawan.v3.ErrorDetails", "namespace", "name", "message_format",
  "attributes", "correlation_id", "code"}]}``; rate limiting is 429 ``rate_limit_exceeded``
  with ``X-Rate-Limit-Limit/-Available/-Reset/-Retry`` (``pkg/ratelimit``).

Fault knobs: latency (all servers or one), the next N requests answered 429/503/500, a
server refusing until told otherwise. State (applications, devices on each server,
writes per server, requests) is inspectable by :meth:`TtsEmulator.state` and, with
``state_file``, rewritten as JSON on every write. AppKeys never appear in the state:
tests ask :meth:`TtsEmulator.app_key` for them.
"""

from __future__ import annotations

import copy
import datetime as dt
import hmac
import json
import logging
import os
import re
import secrets as _secrets
import ssl
import tempfile
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from flasher.errors import FlasherError, InputError
from flasher.files import atomic_write

log = logging.getLogger("flasher.sim.tts")

SERVERS = ("is", "js", "ns", "as")
DEFAULT_PORT = 8885   # the stack's own HTTPS port
ALL = "RIGHT_APPLICATION_ALL"
READ, WRITE = "RIGHT_APPLICATION_DEVICES_READ", "RIGHT_APPLICATION_DEVICES_WRITE"
READ_KEYS, WRITE_KEYS = "RIGHT_APPLICATION_DEVICES_READ_KEYS", "RIGHT_APPLICATION_DEVICES_WRITE_KEYS"
APPLICATION_RIGHTS = ("RIGHT_APPLICATION_INFO", READ, WRITE, READ_KEYS, WRITE_KEYS, "RIGHT_APPLICATION_TRAFFIC_READ")
_ID = re.compile(r"^[a-z0-9](?:[-]?[a-z0-9]){2,}$")
_ADDRESS = re.compile(r"^(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9\-]*[a-zA-Z0-9])\.)*"
                      r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9\-]*[A-Za-z0-9])(?::[0-9]{1,5})?$|^$")
_TOKEN_TYPES = {"NNSXS": "api key", "MFRWG": "access token", "OJSWM": "refresh token", "MF2XI": "authorization code",
                "ONZW4": "session"}   # base32("key"), ("acc"), ("ref"), ("aut"), ("ssn"): pkg/auth
_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"

# The frequency plans the emulated Network Server knows (lorawan-frequency-plans, frequency-plans.yml).
FREQUENCY_PLANS = frozenset({
    "EU_863_870", "EU_863_870_TTN", "EU_863_870_ROAMING_DRAFT", "EU_433", "IN_865_867", "RU_864_870_TTN",
    *(f"US_902_928_FSB_{n}" for n in range(1, 9)), *(f"AU_915_928_FSB_{n}" for n in range(1, 9)),
    "CN_470_510_FSB_1", "CN_470_510_FSB_11", "AS_920_923", "AS_920_923_LBT", "AS_923", "AS_923_2", "AS_923_3",
    "AS_923_4", "AS_923_925", "AS_923_925_LBT", "AS_920_923_TTN_AU", "AS_923_925_TTN_AU", "KR_920_923_TTN",
})
MAC_VERSIONS = {"MAC_UNKNOWN": 0, "MAC_V1_0": 1, "MAC_V1_0_1": 2, "MAC_V1_0_2": 3, "MAC_V1_1": 4, "MAC_V1_0_3": 5,
                "MAC_V1_0_4": 6}
MAC_ALIASES = {"1.0": "MAC_V1_0", "1.0.0": "MAC_V1_0", "1.0.1": "MAC_V1_0_1", "1.0.2": "MAC_V1_0_2",
               "1.1": "MAC_V1_1", "1.1.0": "MAC_V1_1", "1.0.3": "MAC_V1_0_3", "1.0.4": "MAC_V1_0_4"}
PHY_VERSIONS = {"PHY_UNKNOWN": 0, "PHY_V1_0": 1, "PHY_V1_0_1": 2, "PHY_V1_0_2_REV_A": 3, "PHY_V1_0_2_REV_B": 4,
                "PHY_V1_1_REV_A": 5, "PHY_V1_1_REV_B": 6, "PHY_V1_0_3_REV_A": 7, "RP002_V1_0_0": 8,
                "RP002_V1_0_1": 9, "RP002_V1_0_2": 10, "RP002_V1_0_3": 11, "RP002_V1_0_4": 12}
PHY_ALIASES = {"1.0": "PHY_V1_0", "1.0.0": "PHY_V1_0", "V1_0": "PHY_V1_0", "TS001_V1_0": "PHY_V1_0",
               "1.0.1": "PHY_V1_0_1", "V1_0_1": "PHY_V1_0_1", "TS001_V1_0_1": "PHY_V1_0_1",
               "1.0.2": "PHY_V1_0_2_REV_A", "1.0.2-a": "PHY_V1_0_2_REV_A", "V1_0_2": "PHY_V1_0_2_REV_A",
               "V1_0_2_REV_A": "PHY_V1_0_2_REV_A", "RP001_V1_0_2": "PHY_V1_0_2_REV_A",
               "1.0.2-b": "PHY_V1_0_2_REV_B", "V1_0_2_REV_B": "PHY_V1_0_2_REV_B", "RP001_V1_0_2_REV_B": "PHY_V1_0_2_REV_B",
               "1.1-a": "PHY_V1_1_REV_A", "1.1.0-a": "PHY_V1_1_REV_A", "V1_1_REV_A": "PHY_V1_1_REV_A",
               "RP001_V1_1_REV_A": "PHY_V1_1_REV_A", "1.1-b": "PHY_V1_1_REV_B", "1.1.0-b": "PHY_V1_1_REV_B",
               "V1_1_REV_B": "PHY_V1_1_REV_B", "RP001_V1_1_REV_B": "PHY_V1_1_REV_B",
               "1.0.3-a": "PHY_V1_0_3_REV_A", "V1_0_3_REV_A": "PHY_V1_0_3_REV_A",
               "RP001_V1_0_3_REV_A": "PHY_V1_0_3_REV_A"}

_IDS = ["ids", "ids.application_ids", "ids.application_ids.application_id", "ids.dev_eui", "ids.device_id",
        "ids.join_eui"]
_VERSION_IDS = ["version_ids", "version_ids.band_id", "version_ids.brand_id", "version_ids.firmware_version",
                "version_ids.hardware_version", "version_ids.model_id"]
# What each registry may be asked for (field_mask_validation.go: RPCFieldMaskPaths ... Allowed). A trailing "."
# entry admits every path under it (the MAC settings and state trees are long and not used here).
ALLOWED = {
    ("is", "get"): ["activated_at", "application_server_address", "attributes", "created_at",
                    "claim_authentication_code", "description", *_IDS, "join_server_address", "locations", "name",
                    "network_server_address", "serial_number", "service_profile_id", "lora_alliance_profile_ids",
                    "updated_at", *_VERSION_IDS, "picture", "last_seen_at"],
    ("js", "get"): ["application_server_address", "application_server_id", "application_server_kek_label",
                    "claim_authentication_code", *_IDS, "ids.dev_addr", "last_dev_nonce", "last_join_nonce",
                    "last_rj_count_0", "last_rj_count_1", "net_id", "network_server_address",
                    "network_server_kek_label", "provisioner_id", "provisioning_data", "resets_join_nonces",
                    "root_keys", "root_keys.app_key", "root_keys.app_key.key", "root_keys.nwk_key",
                    "root_keys.nwk_key.key", "root_keys.root_key_id", "used_dev_nonces"],
    ("ns", "get"): ["battery_percentage", "created_at", "downlink_margin", "frequency_plan_id", *_IDS, "ids.dev_addr",
                    "last_dev_status_received_at", "lorawan_phy_version", "lorawan_version", "mac_settings",
                    "mac_settings.", "mac_state", "mac_state.", "multicast", "pending_mac_state",
                    "pending_mac_state.", "pending_session", "pending_session.", "power_state", "session",
                    "session.", "supports_class_b", "supports_class_c", "supports_join", "updated_at",
                    *_VERSION_IDS],
    ("as", "get"): ["formatters", "formatters.", *_IDS, "ids.dev_addr", "pending_session", "pending_session.",
                    "session", "session.", "serial_number", "skip_payload_crypto", "skip_payload_crypto_override",
                    "lora_alliance_profile_ids", *_VERSION_IDS],
}
ALLOWED[("js", "set")] = [p for p in ALLOWED[("js", "get")] if p != "ids.dev_addr"]
ALLOWED[("ns", "set")] = [p for p in ALLOWED[("ns", "get")] if p not in ("created_at", "updated_at", "power_state")]
ALLOWED[("as", "set")] = [p for p in ALLOWED[("as", "get")] if p != "ids.dev_addr"]
IS_WRITABLE = ("application_server_address", "attributes", "description", "join_server_address", "locations", "name",
               "network_server_address", "serial_number", "service_profile_id", "version_ids",
               "lora_alliance_profile_ids")
NAMESPACE = {"is": "pkg/identityserver", "js": "pkg/joinserver", "ns": "pkg/networkserver",
             "as": "pkg/applicationserver"}
# gRPC code -> HTTP status, as pkg/errors/http.go maps them.
HTTP_STATUS = {3: 400, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400, 10: 409, 12: 501, 13: 500, 14: 503, 16: 401}


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ApiError(Exception):
    """One refusal in the stack's error shape (pkg/errors): ``error:<namespace>:<name> (<message>)``."""

    def __init__(self, code: int, namespace: str, name: str, message_format: str, headers: dict | None = None,
                 **attributes: Any):
        self.code, self.namespace, self.name = code, namespace, name
        self.message_format, self.attributes = message_format, attributes
        self.headers = headers or {}
        super().__init__(self.message)

    @property
    def message(self) -> str:
        text = re.sub(r"\{(\w+)\}", lambda m: str(self.attributes.get(m.group(1), m.group(0))), self.message_format)
        return f"error:{self.namespace}:{self.name} ({text})"

    @property
    def status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)

    def body(self) -> dict:
        details: dict[str, Any] = {"@type": "type.googleapis.com/ttn.lorawan.v3.ErrorDetails",
                                   "namespace": self.namespace, "name": self.name,
                                   "message_format": self.message_format, "correlation_id": uuid.uuid4().hex,
                                   "code": self.code}
        if self.attributes:
            details["attributes"] = self.attributes
        return {"code": self.code, "message": self.message, "details": [details]}


def _validation(field: str, reason: str) -> ApiError:
    return ApiError(3, "pkg/errors", "validation", "invalid `{field}`: {reason}", field=field, reason=reason)


def _eui(value: Any, field: str) -> bytes | None:
    """An EUI as the stack's JSON carries it (hex; empty or absent is unset)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[0-9A-Fa-f]{16}", value):
        raise _validation(field, "invalid EUI-64: expected 16 hexadecimal digits")
    return bytes.fromhex(value)


def _key(value: Any, field: str) -> bytes | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[0-9A-Fa-f]{32}", value):
        raise _validation(field, "invalid AES-128 key: expected 32 hexadecimal digits")
    return bytes.fromhex(value)


def _enum(value: Any, names: dict[str, int], aliases: dict[str, str], prefix: str) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return next((n for n, v in names.items() if v == value), None)
    if not isinstance(value, str):
        return None
    if value in names:
        return value
    if value in aliases:
        return aliases[value]
    if f"{prefix}_{value}" in names:
        return f"{prefix}_{value}"
    return None


def _get_path(obj: dict, path: str) -> Any:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _set_path(obj: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    cur = obj
    for part in parts[:-1]:
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            nxt = cur[part] = {}
        cur = nxt
    if value is None:
        cur.pop(parts[-1], None)
    else:
        cur[parts[-1]] = copy.deepcopy(value)


def _allowed(server: str, kind: str, path: str) -> bool:
    return any(path == a or (a.endswith(".") and path.startswith(a)) for a in ALLOWED[(server, kind)])


class _ApiKey:
    def __init__(self, key_id: str, secret: str, rights: dict[str, set[str]]):
        self.key_id, self.secret, self.rights = key_id, secret, rights


class TtsEmulator:
    """The four registries on one loopback port. ``with TtsEmulator() as tts:`` serves from a thread.

    ``tts.url`` is the base URL (``https://127.0.0.1:<port>``), ``tts.ca_cert_path`` the root
    of trust to pass as ``--tts-ca-cert``; :meth:`add_api_key` makes keys with chosen rights.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, tls: bool = True,
                 cert_dir: str | os.PathLike | None = None, applications: tuple[str, ...] | list[str] = ("flasher",),
                 state_file: str | os.PathLike | None = None):
        self.host, self.port, self.tls = host, port, tls
        self._tmp: tempfile.TemporaryDirectory | None = None
        if cert_dir is None and tls:
            self._tmp = tempfile.TemporaryDirectory(prefix="flasher-tts-")
            cert_dir = self._tmp.name
        self.cert_dir = Path(cert_dir) if cert_dir else None
        self.state_file = Path(state_file) if state_file else None
        self._lock = threading.RLock()
        self._apps: set[str] = set()
        self._keys: dict[str, _ApiKey] = {}
        self._store: dict[str, dict[tuple[str, str], dict]] = {s: {} for s in SERVERS}
        self.writes = {s: 0 for s in SERVERS}
        self.requests: list[dict] = []
        self.stats = {"requests": 0, "throttled": 0, "unavailable": 0, "refused": 0, "unauthenticated": 0,
                      "forbidden": 0, "conflicts": 0}
        self._latency: dict[str | None, float] = {None: 0.0}
        self._faults: list[list] = []            # [server or None, status, remaining, retry seconds]
        self._refusing: dict[str, int] = {}      # server -> status
        self._stopping = threading.Event()
        self._server: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self.ca_cert_path: Path | None = None
        for app in applications:
            self.add_application(app)

    # --- set-up ------------------------------------------------------------------------
    def add_application(self, app_id: str) -> None:
        if not _ID.match(app_id) or len(app_id) > 36:
            raise InputError(f"application id {app_id!r}: not a valid id")
        with self._lock:
            self._apps.add(app_id)

    def add_api_key(self, rights: dict[str, list[str] | tuple[str, ...]] | None = None, *,
                    app: str | None = None) -> str:
        """A new API key (``NNSXS.<id>.<secret>``) with ``rights`` per application (default: all on ``app``)."""
        if rights is None:
            target = app or sorted(self._apps)[0]
            rights = {target: [ALL]}
        key_id = "".join(_secrets.choice(_B32) for _ in range(39))
        secret = "".join(_secrets.choice(_B32) for _ in range(52))
        expanded = {a: set(APPLICATION_RIGHTS) if ALL in r else set(r) for a, r in rights.items()}
        with self._lock:
            self._keys[key_id] = _ApiKey(key_id, secret, expanded)
        return f"NNSXS.{key_id}.{secret}"

    def load_api_key(self, token: str, rights: dict[str, list[str]] | None = None) -> None:
        """Accept an existing key (``flasher simulate tts`` keeps its key file across restarts)."""
        parts = token.strip().split(".")
        if len(parts) != 3 or parts[0] != "NNSXS":
            raise InputError("API key: expected NNSXS.<id>.<secret>")
        rights = rights or {a: [ALL] for a in self._apps}
        with self._lock:
            self._keys[parts[1]] = _ApiKey(parts[1], parts[2], {a: set(APPLICATION_RIGHTS) if ALL in r else set(r)
                                                                  for a, r in rights.items()})

    # --- lifecycle ---------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def start(self) -> TtsEmulator:
        if self._thread is not None:
            raise RuntimeError("already started")
        ctx = None
        if self.tls:
            from flasher.sim import certs

            assert self.cert_dir is not None
            hosts = [h for h in (self.host, "localhost", "127.0.0.1") if h and h not in ("0.0.0.0", "::")]
            creds = certs.ensure_server_credentials(self.cert_dir, hosts)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(creds.cert, creds.key)
            self.ca_cert_path = creds.ca_cert
        try:
            self._server = _HttpServer((self.host, self.port), self, ctx)
        except OSError as exc:
            raise FlasherError(f"The Things Stack emulator: cannot listen on {self.host}:{self.port}: "
                               f"{exc.strerror or exc}") from None
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"tts-emulator-{self.host}:{self.port}", daemon=True)
        self._thread.start()
        self._write_state()
        log.info("The Things Stack emulator on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving, end every open connection and join every thread it started."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.close_connections()
            self._server.server_close()   # joins the request threads
            self._server = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> TtsEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- fault knobs (thread-safe) -----------------------------------------------------
    def set_latency(self, seconds: float, server: str | None = None) -> None:
        """Wait ``seconds`` before answering every request (to one server, or to all)."""
        with self._lock:
            self._latency[server] = float(seconds)

    def fail_next(self, count: int = 1, status: int = 503, server: str | None = None, retry: int = 1) -> None:
        """Answer the next ``count`` requests (to one server, or to any) with 429, 503 or 500."""
        if status not in (429, 500, 503):
            raise ValueError("status: 429, 500 or 503")
        with self._lock:
            self._faults.append([server, status, int(count), int(retry)])

    def refuse(self, server: str, status: int = 503) -> None:
        """``server`` answers ``status`` (503 unavailable, 500 internal, 429 throttled) until :meth:`accept`."""
        if server not in SERVERS or status not in (429, 500, 503):
            raise ValueError("server: is, js, ns or as; status: 429, 500 or 503")
        with self._lock:
            self._refusing[server] = status

    def accept(self, server: str | None = None) -> None:
        with self._lock:
            if server is None:
                self._refusing.clear()
                self._faults.clear()
            else:
                self._refusing.pop(server, None)

    # --- what tests look at ------------------------------------------------------------
    def device(self, app: str, device_id: str) -> dict[str, dict | None]:
        """Each server's copy of one end device (``None`` where it has none), AppKey included."""
        with self._lock:
            return {s: copy.deepcopy(self._store[s].get((app, device_id))) for s in SERVERS}

    def app_key(self, app: str, device_id: str) -> str | None:
        """The AppKey the Join Server holds for a device (upper-case hex), or None."""
        js = self.device(app, device_id)["js"]
        key = _get_path(js or {}, "root_keys.app_key.key")
        return key.upper() if isinstance(key, str) else None

    def state(self) -> dict:
        """Applications, API keys (ids and rights only), devices per server (AppKeys masked), writes, stats."""
        with self._lock:
            devices = []
            for app, dev_id in sorted({k for s in SERVERS for k in self._store[s]}):
                entry: dict[str, Any] = {"application_id": app, "device_id": dev_id,
                                         "servers": [s for s in SERVERS if (app, dev_id) in self._store[s]]}
                for s in SERVERS:
                    rec = copy.deepcopy(self._store[s].get((app, dev_id)))
                    if rec and _get_path(rec, "root_keys.app_key.key"):
                        rec["root_keys"]["app_key"]["key"] = "(set)"
                    entry[s] = rec
                devices.append(entry)
            return {"url": self.url, "applications": sorted(self._apps),
                    "api_keys": [{"id": k.key_id, "rights": {a: sorted(r) for a, r in k.rights.items()}}
                                 for k in self._keys.values()],
                    "devices": devices, "writes": dict(self.writes), "stats": dict(self.stats),
                    "requests": copy.deepcopy(self.requests[-1000:])}

    def _write_state(self) -> None:
        if self.state_file is None:
            return
        with self._lock:
            atomic_write(self.state_file, json.dumps(self.state(), indent=2, sort_keys=True) + "\n", mode=0o644)

    # --- requests ----------------------------------------------------------------------
    def handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, dict]:
        """One HTTP request -> (status, extra headers, JSON body)."""
        u = urlsplit(target)
        path = unquote(u.path)
        server = self._server_of(path)
        with self._lock:
            latency = self._latency.get(server, self._latency[None]) if server else self._latency[None]
        if latency and self._stopping.wait(latency):
            return 503, {}, ApiError(14, "flasher/sim/tts", "stopping", "emulator stopping").body()
        try:
            fault = self._fault(server)
            if fault is not None:
                raise fault
            status, out = self._route(method, path, parse_qs(u.query, keep_blank_values=True), headers, body)
            extra: dict = {}
        except ApiError as exc:
            status, out, extra = exc.status, exc.body(), exc.headers
            key = {401: "unauthenticated", 403: "forbidden", 409: "conflicts"}.get(status)
            if key:
                with self._lock:
                    self.stats[key] += 1
        with self._lock:
            self.stats["requests"] += 1
            self.requests.append({"method": method, "path": path, "server": server, "status": status})
        return status, extra, out

    @staticmethod
    def _server_of(path: str) -> str | None:
        m = re.match(r"^/api/v3/(js|ns|as)/", path)
        if m:
            return m.group(1)
        return "is" if path.startswith("/api/v3/applications/") else None

    def _fault(self, server: str | None) -> ApiError | None:
        with self._lock:
            status = self._refusing.get(server) if server else None
            retry = 1
            if status is not None:
                self.stats["refused"] += 1
            else:
                for f in self._faults:
                    if f[2] > 0 and f[0] in (None, server):
                        f[2] -= 1
                        status, retry = f[1], f[3]
                        break
                self._faults = [f for f in self._faults if f[2] > 0]
            if status == 429:
                self.stats["throttled"] += 1
            elif status is not None:
                self.stats["unavailable"] += 1
        if status is None:
            return None
        if status == 429:
            return ApiError(8, "pkg/ratelimit", "rate_limit_exceeded",
                            "rate limit of `{rate}` accesses per minute exceeded for resource `{key}`",
                            headers={"X-Rate-Limit-Limit": "10", "X-Rate-Limit-Available": "0",
                                     "X-Rate-Limit-Reset": str(retry), "X-Rate-Limit-Retry": str(retry)},
                            rate=10, key=f"http:api:{server}")
        if status == 500:
            return ApiError(13, "flasher/sim/tts", "internal", "internal error (the emulator's fault knob)")
        return ApiError(14, "flasher/sim/tts", "unavailable", "service unavailable (the emulator's fault knob)")

    def _route(self, method: str, path: str, query: dict, headers: dict, body: bytes) -> tuple[int, dict]:
        m = re.fullmatch(r"/api/v3/applications/([^/]+)/devices(?:/([^/]+))?", path)
        if m:
            app, dev = m.group(1), m.group(2)
            if dev is None and method == "POST":
                return 200, self._is_create(app, headers, _json(body))
            if dev is not None and method == "GET":
                return 200, self._get("is", app, dev, headers, _mask(query))
            if dev is not None and method == "DELETE":
                return 200, self._delete("is", app, dev, headers)
            raise ApiError(12, "grpc-gateway", "method_not_allowed", "Method Not Allowed")
        m = re.fullmatch(r"/api/v3/(js|ns|as)/applications/([^/]+)/devices(?:/([^/]+))?", path)
        if m:
            server, app, dev = m.group(1), m.group(2), m.group(3)
            if method == "GET" and dev is not None:
                return 200, self._get(server, app, dev, headers, _mask(query))
            if method == "DELETE" and dev is not None:
                return 200, self._delete(server, app, dev, headers)
            if (method == "PUT" and dev is not None) or (method == "POST" and dev is None):
                return 200, self._set(server, app, dev, headers, _json(body))
            raise ApiError(12, "grpc-gateway", "method_not_allowed", "Method Not Allowed")
        raise ApiError(5, "grpc-gateway", "not_found", "Not Found")

    # --- rights ------------------------------------------------------------------------
    def _require(self, server: str, app: str, headers: dict, *needed: str) -> None:
        auth = headers.get("authorization")
        if not auth:
            if server == "is":
                raise ApiError(7, "pkg/auth/rights", "no_application_rights", "no rights for application `{uid}`",
                               uid=app)
            raise ApiError(16, "pkg/auth/rights", "unauthenticated", "unauthenticated")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer":
            raise ApiError(16, "pkg/identityserver", "unsupported_authorization", "unsupported authorization method")
        parts = token.strip().split(".")
        if len(parts) != 3 or parts[0] not in _TOKEN_TYPES:
            raise ApiError(3, "pkg/auth", "token", "invalid token")
        if parts[0] != "NNSXS":
            raise ApiError(16, "pkg/identityserver", "token_not_found", "token not found")
        with self._lock:
            key = self._keys.get(parts[1])
        if key is None:
            raise ApiError(16, "pkg/identityserver", "api_key_not_found", "API key not found")
        if not hmac.compare_digest(key.secret.encode(), parts[2].encode()):
            raise ApiError(16, "pkg/identityserver", "invalid_authorization", "invalid authorization")
        rights = key.rights.get(app, set())
        if not rights:
            raise ApiError(7, "pkg/auth/rights", "no_application_rights", "no rights for application `{uid}`",
                           uid=app)
        missing = [r for r in needed if r not in rights]
        if missing:
            raise ApiError(7, "pkg/auth/rights", "insufficient_application_rights",
                           "insufficient rights for application `{uid}`", uid=app, missing=missing)

    # --- the registries ----------------------------------------------------------------
    def _is_create(self, app: str, headers: dict, body: dict) -> dict:
        self._require("is", app, headers, WRITE)
        dev = body.get("end_device")
        if not isinstance(dev, dict):
            raise _validation("end_device", "value is required")
        ids: dict = dev["ids"] if isinstance(dev.get("ids"), dict) else {}
        device_id = ids.get("device_id")
        if not isinstance(device_id, str) or not _ID.match(device_id) or len(device_id) > 36:
            raise _validation("device_id", "value does not match regex pattern `^[a-z0-9](?:[-]?[a-z0-9]){2,}$`")
        dev_eui, join_eui = _eui(ids.get("dev_eui"), "dev_eui"), _eui(ids.get("join_eui"), "join_eui")
        for f in ("join_server_address", "network_server_address", "application_server_address"):
            v = dev.get(f, "")
            if not isinstance(v, str) or not _ADDRESS.match(v):
                raise _validation(f, "value does not match regex pattern")
        with self._lock:
            if app not in self._apps:
                raise ApiError(5, "pkg/identityserver/store", "application_not_found",
                               "application with id `{application_id}` not found", application_id=app)
            if (app, device_id) in self._store["is"]:
                raise ApiError(6, "pkg/util/store", "id_taken", "ID already taken, choose a different one and try again")
            if dev_eui is not None:
                for (other_app, other_id), rec in self._store["is"].items():
                    if _eui(rec["ids"].get("dev_eui"), "dev_eui") == dev_eui and \
                            _eui(rec["ids"].get("join_eui"), "join_eui") == join_eui:
                        raise ApiError(6, "pkg/identityserver", "end_device_euis_taken",
                                       "an end device with JoinEUI `{join_eui}` and DevEUI `{dev_eui}` is already "
                                       "registered as `{device_id}` in application `{application_id}`",
                                       join_eui=(join_eui or bytes(8)).hex().upper(), dev_eui=dev_eui.hex().upper(),
                                       device_id=other_id, application_id=other_app)
            now = _now()
            rec = {"ids": _ids(app, device_id, dev_eui, join_eui), "created_at": now, "updated_at": now}
            for f in IS_WRITABLE:
                if dev.get(f) not in (None, "", {}, []):
                    rec[f] = copy.deepcopy(dev[f])
            self._store["is"][(app, device_id)] = rec
            self.writes["is"] += 1
        self._write_state()
        return copy.deepcopy(rec)

    def _get(self, server: str, app: str, dev: str, headers: dict, paths: list[str]) -> dict:
        forbidden = [p for p in paths if not _allowed(server, "get", p)]
        if forbidden:
            raise ApiError(3, "pkg/rpcmiddleware/validator", "field_mask_paths", "forbidden path(s) in field mask",
                           forbidden_paths=forbidden)
        self._require(server, app, headers, READ)
        if server == "js" and any(p == "root_keys" or p.startswith("root_keys.") for p in paths):
            self._require(server, app, headers, READ, READ_KEYS)
        with self._lock:
            rec = self._store[server].get((app, dev))
            if rec is None:
                raise self._not_found(server, app, dev)
            out = {"ids": copy.deepcopy(rec["ids"]), "created_at": rec["created_at"], "updated_at": rec["updated_at"]}
            for p in paths:
                v = _get_path(rec, p)
                if v is not None:
                    _set_path(out, p, v)
        return out

    @staticmethod
    def _not_found(server: str, app: str, dev: str) -> ApiError:
        if server == "is":
            return ApiError(5, "pkg/identityserver/store", "end_device_not_found",
                            "end device with id `{device_id}` not found in application with id `{application_id}`",
                            device_id=dev, application_id=app)
        return ApiError(5, NAMESPACE[server], "device_not_found", "device not found")

    def _delete(self, server: str, app: str, dev: str, headers: dict) -> dict:
        self._require(server, app, headers, WRITE)
        with self._lock:
            if self._store[server].pop((app, dev), None) is None:
                raise self._not_found(server, app, dev)
            self.writes[server] += 1
        self._write_state()
        return {}

    def _set(self, server: str, app: str, dev_id: str | None, headers: dict, body: dict) -> dict:
        dev = body.get("end_device")
        if not isinstance(dev, dict):
            raise _validation("end_device", "value is required")
        fm = body.get("field_mask")
        paths = fm.get("paths") if isinstance(fm, dict) else None
        paths = [p for p in paths if isinstance(p, str)] if isinstance(paths, list) else []
        forbidden = [p for p in paths if not _allowed(server, "set", p)]
        if forbidden:
            raise ApiError(3, "pkg/rpcmiddleware/validator", "field_mask_paths", "forbidden path(s) in field mask",
                           forbidden_paths=forbidden)
        ids: dict = dev["ids"] if isinstance(dev.get("ids"), dict) else {}
        dev_id = dev_id or ids.get("device_id")
        if not isinstance(dev_id, str) or not _ID.match(dev_id):
            raise _validation("device_id", "value does not match regex pattern `^[a-z0-9](?:[-]?[a-z0-9]){2,}$`")
        dev_eui, join_eui = _eui(ids.get("dev_eui"), "dev_eui"), _eui(ids.get("join_eui"), "join_eui")
        if server == "js":
            if join_eui is None:
                raise ApiError(3, "pkg/joinserver", "no_join_eui", "no JoinEUI specified")
            if not dev_eui or dev_eui == bytes(8):
                raise ApiError(3, "pkg/joinserver", "no_dev_eui", "no DevEUI specified")
            if "root_keys.app_key.key" in paths:
                key = _key(_get_path(dev, "root_keys.app_key.key"), "root_keys.app_key.key")
                if not key or key == bytes(16):
                    raise ApiError(3, "pkg/joinserver", "field_value", "invalid value of field `{field}`",
                                   field="root_keys.app_key.key")
        keys = [p for p in paths if p == "root_keys" or p.startswith("root_keys.")]
        self._require(server, app, headers, WRITE, *([WRITE_KEYS] if keys and server == "js" else []))
        with self._lock:
            store = self._store[server]
            stored = store.get((app, dev_id))
            if server == "js":
                self._js_euis(app, dev_id, stored, dev_eui, join_eui, paths)
            if server == "ns":
                dev = self._ns_values(dev, paths, creating=stored is None)
            now = _now()
            rec = copy.deepcopy(stored) if stored else {"ids": _ids(app, dev_id, dev_eui, join_eui), "created_at": now}
            for p in paths:
                if p.startswith("ids"):
                    continue
                _set_path(rec, p, _get_path(dev, p))
            if server == "js" and "root_keys.app_key.key" in paths:
                _set_path(rec, "root_keys.app_key.key", str(_get_path(dev, "root_keys.app_key.key")).upper())
            rec["updated_at"] = now
            store[(app, dev_id)] = rec
            self.writes[server] += 1
            out = {"ids": copy.deepcopy(rec["ids"]), "created_at": rec["created_at"], "updated_at": now}
            for p in paths:
                v = _get_path(rec, p)
                if v is not None:
                    _set_path(out, p, v)
        self._write_state()
        return out

    def _js_euis(self, app: str, dev_id: str, stored: dict | None, dev_eui: bytes | None, join_eui: bytes | None,
                 paths: list[str]) -> None:
        """The Join Server keys devices by their EUIs: another device's pair, or a changed pair, is refused."""
        if stored is not None:
            for f, new in (("ids.join_eui", join_eui), ("ids.dev_eui", dev_eui)):
                old = _eui(_get_path(stored, f), f)
                if f in paths and new is not None and old != new:
                    raise ApiError(3, "pkg/joinserver/redis", "read_only_field", "read-only field `{field}`", field=f)
            return
        for (other_app, other_id), rec in self._store["js"].items():
            if (other_app, other_id) != (app, dev_id) and _eui(rec["ids"].get("dev_eui"), "dev_eui") == dev_eui \
                    and _eui(rec["ids"].get("join_eui"), "join_eui") == join_eui:
                raise ApiError(6, "pkg/joinserver/redis", "already_provisioned", "device already provisioned")

    @staticmethod
    def _ns_values(dev: dict, paths: list[str], *, creating: bool) -> dict:
        """Check the Network Server's values and spell versions canonically (as it answers them)."""
        dev = copy.deepcopy(dev)
        for f, names, aliases, prefix in (("lorawan_version", MAC_VERSIONS, MAC_ALIASES, "MAC"),
                                          ("lorawan_phy_version", PHY_VERSIONS, PHY_ALIASES, "PHY")):
            if f in paths:
                name = _enum(dev.get(f), names, aliases, prefix)
                if name is None or names[name] == 0:
                    raise ApiError(3, "pkg/networkserver", "field_value", "invalid value of field `{field}`", field=f)
                dev[f] = name
            elif creating:
                raise ApiError(3, "pkg/networkserver", "field_value", "invalid value of field `{field}`", field=f)
        plan = dev.get("frequency_plan_id")
        if "frequency_plan_id" in paths or creating:
            if not plan or "frequency_plan_id" not in paths:
                raise ApiError(3, "pkg/networkserver", "field_value", "invalid value of field `{field}`",
                               field="frequency_plan_id")
            if plan not in FREQUENCY_PLANS:
                raise ApiError(5, "pkg/frequencyplans", "not_found", "frequency plan `{id}` not found", id=plan)
        return dev


def _ids(app: str, device_id: str, dev_eui: bytes | None, join_eui: bytes | None) -> dict:
    ids: dict[str, Any] = {"device_id": device_id, "application_ids": {"application_id": app}}
    if dev_eui is not None:
        ids["dev_eui"] = dev_eui.hex().upper()
    if join_eui is not None:
        ids["join_eui"] = join_eui.hex().upper()
    return ids


def _json(body: bytes) -> dict:
    try:
        data = json.loads(body.decode("utf-8") or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(3, "grpc-gateway", "invalid_body", "invalid JSON body: {reason}", reason=str(exc)) from None
    if not isinstance(data, dict):
        raise ApiError(3, "grpc-gateway", "invalid_body", "invalid JSON body: {reason}", reason="not an object")
    return data


def _mask(query: dict[str, list[str]]) -> list[str]:
    """``field_mask=a,b`` (grpc-gateway's FieldMask query form) or repeated ``field_mask.paths=a``."""
    paths: list[str] = []
    for key in ("field_mask", "field_mask.paths"):
        for value in query.get(key, []):
            paths += [p.strip() for p in value.split(",") if p.strip()]
    return list(dict.fromkeys(paths))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10
    wbufsize = -1   # one write per response (flushed by handle_one_request), not one per header line
    server: _HttpServer

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > 1 << 20:
            self.send_error(413)
            return
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, extra, out = self.server.emu.handle(self.command, self.path, headers, body)
        data = json.dumps(out).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:   # never the headers (they carry the API key)
        log.debug("%s %s", self.address_string(), format % args)


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], emu: TtsEmulator, ctx: ssl.SSLContext | None):
        self.emu, self.ctx = emu, ctx
        self._open: set = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def finish_request(self, request, client_address) -> None:
        """TLS handshakes happen here, in the request's own thread, never in the accepting one."""
        import socket

        request.settimeout(10)
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # headers and body leave at once
        if self.ctx is not None:
            try:
                request = self.ctx.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:   # e.g. a client that does not trust our CA
                log.debug("TLS handshake with %s failed: %s", client_address, exc)
                return
        with self._open_lock:
            self._open.add(request)
        try:
            super().finish_request(request, client_address)
        except (ConnectionError, TimeoutError, ssl.SSLError) as exc:
            log.debug("connection from %s ended: %s", client_address, exc)
        finally:
            with self._open_lock:
                self._open.discard(request)
            try:
                request.close()
            except OSError:
                pass

    def close_connections(self) -> None:
        """Wake every request thread blocked on an idle keep-alive connection."""
        import socket

        with self._open_lock:
            for sock in list(self._open):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def read_or_make_key(emu: TtsEmulator, path: Path) -> str:
    """The emulator's all-rights API key, kept in ``path`` (0600) so it survives restarts like the CA."""
    try:
        token = path.read_text().strip()
        emu.load_api_key(token)
        return token
    except (OSError, InputError):
        token = emu.add_api_key({a: [ALL] for a in emu.state()["applications"]})
        atomic_write(path, token + "\n", mode=0o600)
        return token


def default_cert_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flasher" / "tts-emulator"
