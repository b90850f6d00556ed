"""The Things Stack v3 (lorawan-stack): end devices through its REST API, and the values it takes.

An end device lives on four servers, created in the order the stack documents
(``api/ttn/lorawan/v3/end_device_services.proto``; the CLI's split in
``cmd/ttn-lw-cli/commands/end_devices_split.go``):

* Identity Server ``POST /api/v3/applications/{app}/devices``: ids and server addresses;
* Join Server ``PUT /api/v3/js/applications/{app}/devices/{id}``: ``root_keys.app_key.key``,
  the only place the AppKey goes;
* Network Server ``PUT /api/v3/ns/...``: ``supports_join``, ``lorawan_version``,
  ``lorawan_phy_version``, ``frequency_plan_id``;
* Application Server ``PUT /api/v3/as/...``: ids.

Each request carries a field mask; errors come back as
``{"code", "message", "details": [{"namespace", "name", "attributes", ...}]}``
(``pkg/errors``), which this module turns into one line that names what to do.
Only the standard library is used (http.client + ssl), imported when a request is
made. The API key is a :class:`~flasher.secrets.Secret`; it is never logged, and
neither is any request body (the Join Server's carries the AppKey).
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from flasher.errors import FlasherError, InputError
from flasher.eui import EUI64
from flasher.identity import check_deveui_format
from flasher.secrets import Secret

if TYPE_CHECKING:
    from flasher.dps import CaCert

log = logging.getLogger("flasher.tts")

SERVERS = ("is", "js", "ns", "as")   # the order an end device is created in
SERVER_NAMES = {"is": "Identity Server", "js": "Join Server", "ns": "Network Server", "as": "Application Server"}
API = "/api/v3"
DEFAULT_TIMEOUT = 60.0
DEFAULT_DEVICE_ID_FORMAT = "eui-{deveui}"   # the stack's own convention (ttscsv.go generates "eui-<deveui>")

# --- ids (api/ttn/lorawan/v3/identifiers.proto: application_id, device_id) ---------------

_ID = re.compile(r"[a-z0-9](?:-?[a-z0-9]){2,}")
MAX_ID = 36
_ID_RULE = ("3 to 36 lower-case letters, digits and single dashes, starting and ending with a letter or digit "
            "(The Things Stack's id rule)")


def validate_id(text: str, what: str = "device id") -> str:
    """An application or device id as the stack accepts it: ``^[a-z0-9](?:[-]?[a-z0-9]){2,}$``, at most 36."""
    s = text.strip() if isinstance(text, str) else ""
    if not s:
        raise InputError(f"{what} '': empty ({_ID_RULE})")
    if len(s) > MAX_ID or not _ID.fullmatch(s):
        raise InputError(f"{what} {s!r}: must be {_ID_RULE}")
    return s


@dataclass(frozen=True)
class DeviceIdPolicy:
    """How a DevEUI becomes an end device id; ``{deveui}`` is its 16 lower-case hex digits."""

    template: str = DEFAULT_DEVICE_ID_FORMAT

    def __post_init__(self) -> None:
        check_deveui_format(self.template, "device id format")
        for sample in ("0" * 16, "f" * 16):
            try:
                validate_id(self.template.format(deveui=sample))
            except InputError as exc:
                raise InputError(f"device id format {self.template!r}: gives {self.template.format(deveui=sample)!r}, "
                                 f"which is not a valid id ({_ID_RULE})") from exc

    def for_eui(self, dev_eui: EUI64) -> str:
        return self.template.format(deveui=dev_eui.lower)

    def __str__(self) -> str:
        return self.template


# --- frequency plans and LoRaWAN versions -----------------------------------------------

# RHF76 band (flasher.bands) -> The Things Stack frequency plan id (TheThingsNetwork/lorawan-frequency-plans,
# frequency-plans.yml): the plan TTN's community network uses for that band where there is one.
FREQUENCY_PLANS: dict[str, str] = {
    "EU868": "EU_863_870_TTN",
    "US915": "US_902_928_FSB_2",
    "US915HYBRID": "US_902_928_FSB_2",
    "AU915": "AU_915_928_FSB_2",
    "AS923": "AS_923",
    "CN470": "CN_470_510_FSB_11",
    "KR920": "KR_920_923_TTN",
    "IN865": "IN_865_867",
    "EU433": "EU_433",
}
_PLAN = re.compile(r"[A-Z0-9][A-Z0-9_]{0,63}")

# api/ttn/lorawan/v3/lorawan.proto: MACVersion and PHYVersion, each name with the aliases the stack accepts.
MAC_VERSIONS: dict[str, tuple[str, ...]] = {
    "MAC_V1_0": ("1.0", "1.0.0", "V1_0"),
    "MAC_V1_0_1": ("1.0.1", "V1_0_1"),
    "MAC_V1_0_2": ("1.0.2", "V1_0_2"),
    "MAC_V1_0_3": ("1.0.3", "V1_0_3"),
    "MAC_V1_0_4": ("1.0.4", "V1_0_4"),
    "MAC_V1_1": ("1.1", "1.1.0", "V1_1"),
}
PHY_VERSIONS: dict[str, tuple[str, ...]] = {
    "PHY_V1_0": ("1.0", "1.0.0", "V1_0", "TS001_V1_0"),
    "PHY_V1_0_1": ("1.0.1", "V1_0_1", "TS001_V1_0_1"),
    "PHY_V1_0_2_REV_A": ("1.0.2", "1.0.2-a", "V1_0_2", "V1_0_2_REV_A", "RP001_V1_0_2"),
    "PHY_V1_0_2_REV_B": ("1.0.2-b", "V1_0_2_REV_B", "RP001_V1_0_2_REV_B"),
    "PHY_V1_1_REV_A": ("1.1-a", "1.1.0-a", "V1_1_REV_A", "RP001_V1_1_REV_A"),
    "PHY_V1_1_REV_B": ("1.1-b", "1.1.0-b", "V1_1_REV_B", "RP001_V1_1_REV_B"),
    "PHY_V1_0_3_REV_A": ("1.0.3-a", "V1_0_3_REV_A", "RP001_V1_0_3_REV_A"),
    "RP002_V1_0_0": ("RP002_V1_0_0",),
    "RP002_V1_0_1": ("RP002_V1_0_1",),
    "RP002_V1_0_2": ("RP002_V1_0_2",),
    "RP002_V1_0_3": ("RP002_V1_0_3",),
    "RP002_V1_0_4": ("RP002_V1_0_4",),
}
# The RHF76-052 is a LoRaWAN 1.0.2 class A modem (RisingHF's datasheet); its LoRaMac-node based firmware
# implements Regional Parameters 1.0.2 revision B, the revision the stack pairs with 1.0.2 ("1.0.2-b").
DEFAULT_MAC_VERSION = "MAC_V1_0_2"
DEFAULT_PHY_VERSION = "PHY_V1_0_2_REV_B"


def _version(table: dict[str, tuple[str, ...]], text: str, what: str) -> str:
    s = str(text).strip()
    for name, aliases in table.items():
        if s.upper() == name or s in aliases or s.upper() in aliases:
            return name
    shown = ", ".join(f"{aliases[0]} ({name})" for name, aliases in table.items())
    raise InputError(f"{what} {s!r}: unknown (one of {shown})")


def parse_mac_version(text: str, where: str = "LoRaWAN version") -> str:
    """``1.0.2`` or ``MAC_V1_0_2`` -> ``MAC_V1_0_2`` (the canonical name the stack answers with)."""
    return _version(MAC_VERSIONS, text, where)


def parse_phy_version(text: str, where: str = "LoRaWAN PHY version") -> str:
    """``1.0.2-b`` or ``PHY_V1_0_2_REV_B`` -> ``PHY_V1_0_2_REV_B``; plain ``1.0.2`` is revision A, as in the stack."""
    return _version(PHY_VERSIONS, text, where)


def parse_frequency_plan(text: str, where: str = "frequency plan") -> str:
    s = str(text).strip()
    if not _PLAN.fullmatch(s):
        raise InputError(f"{where} {s!r}: expected a frequency plan id such as EU_863_870_TTN "
                         f"(upper-case letters, digits and '_', at most 64)")
    return s


def frequency_plan_for(band: str) -> str:
    try:
        return FREQUENCY_PLANS[band]
    except KeyError:
        raise InputError(f"band {band!r}: no default frequency plan; give --frequency-plan") from None


# --- where the servers are -------------------------------------------------------------

_LOOPBACK = re.compile(r"127(?:\.\d{1,3}){3}|localhost|::1")


@dataclass(frozen=True)
class Endpoint:
    """One server's base address: ``https://host[:port]`` (``http`` only on loopback)."""

    scheme: str
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def address(self) -> str:
        """``host[:port]`` as the stack stores server addresses (the port only when not the scheme's)."""
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return f"{self.scheme}://{self.host}" + ("" if self.port == default else f":{self.port}")


def parse_url(text: str, where: str = "The Things Stack URL") -> Endpoint:
    """A base URL such as ``https://eu1.cloud.thethings.network`` (a trailing ``/api/v3`` is allowed).

    The API key travels in every request, so plain ``http`` is refused except on
    loopback (a local emulator).
    """
    s = str(text).strip()
    try:
        u = urlsplit(s)
        port = u.port
    except ValueError as exc:
        raise InputError(f"{where} {s!r}: {exc}") from None
    if u.scheme not in ("https", "http") or not u.hostname:
        raise InputError(f"{where} {s!r}: expected https://HOST[:PORT], e.g. https://eu1.cloud.thethings.network")
    if u.username or u.password or u.query or u.fragment or u.path.rstrip("/") not in ("", API):
        raise InputError(f"{where} {s!r}: expected only https://HOST[:PORT] (no path, query or credentials)")
    host = u.hostname
    if u.scheme == "http" and not _LOOPBACK.fullmatch(host):
        raise InputError(f"{where} {s!r}: plain http would send the API key unencrypted; use https "
                         f"(http is accepted on loopback only)")
    return Endpoint(u.scheme, host, port or (443 if u.scheme == "https" else 80))


_TOKEN = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def check_api_key(key: Secret) -> Secret:
    """An API key looks like ``NNSXS.<id>.<secret>`` (``pkg/auth``: three base32 parts); the message never shows it.

    Only the shape is checked (three dot-separated parts, no spaces), so a pasted wrong value fails here, before
    any board, while the stack stays the judge of whether the key is valid.
    """
    text = key.reveal()
    text = text.decode() if isinstance(text, bytes) else text
    if not _TOKEN.fullmatch(text.strip()):
        raise InputError(f"API key for The Things Stack ({key.source}): not an API key "
                         f"(expected NNSXS.<id>.<secret>, as the console shows it once when the key is made)")
    return Secret(text.strip(), key.source)


@dataclass(frozen=True)
class TtsTarget:
    """Where and how boards are registered with The Things Stack; everything already checked."""

    app: str
    endpoints: dict[str, Endpoint]             # is/js/ns/as
    api_key: Secret = field(repr=False)
    device_ids: DeviceIdPolicy = DeviceIdPolicy()
    frequency_plan: str | None = None          # None: from each board's band (FREQUENCY_PLANS)
    lorawan_version: str = DEFAULT_MAC_VERSION
    lorawan_phy_version: str = DEFAULT_PHY_VERSION
    ca_cert: CaCert | None = None
    timeout: float = DEFAULT_TIMEOUT           # per board: every request and retry of its network step

    @classmethod
    def single(cls, app: str, url: str, api_key: Secret | str, **kwargs) -> TtsTarget:
        """All four servers at one address (The Things Stack Cloud, TTN, most clusters)."""
        ep = parse_url(url) if isinstance(url, str) else url
        key = api_key if isinstance(api_key, Secret) else Secret(api_key, "API key")
        return cls(validate_id(app, "application id"), {s: ep for s in SERVERS}, check_api_key(key), **kwargs)

    def plan_for(self, band: str | None) -> str:
        if self.frequency_plan:
            return self.frequency_plan
        if not band:
            raise InputError("frequency plan: the board's band is unknown; give --frequency-plan")
        return frequency_plan_for(band)


# --- what is registered ------------------------------------------------------------------

@dataclass(frozen=True)
class EndDevice:
    """One board as the stack will hold it."""

    app: str
    device_id: str
    dev_eui: EUI64
    join_eui: EUI64
    app_key: Secret = field(repr=False)        # 16 bytes: the module's AppKey
    frequency_plan_id: str = FREQUENCY_PLANS["EU868"]
    lorawan_version: str = DEFAULT_MAC_VERSION
    lorawan_phy_version: str = DEFAULT_PHY_VERSION

    def ids(self) -> dict:
        return {"device_id": self.device_id, "application_ids": {"application_id": self.app},
                "dev_eui": self.dev_eui.hex, "join_eui": self.join_eui.hex}

    @property
    def app_key_hex(self) -> str:
        return bytes(self.app_key.reveal()).hex().upper()


IDS_PATHS = ["ids.device_id", "ids.dev_eui", "ids.join_eui", "ids.application_ids.application_id"]
NS_PATHS = ["supports_join", "lorawan_version", "lorawan_phy_version", "frequency_plan_id"]


def _write_request(server: str, dev: EndDevice, target: TtsTarget) -> tuple[dict, list[str]]:
    """The body and field mask one server is sent, in the split end_devices_split.go makes."""
    addr = {s: target.endpoints[s].address for s in SERVERS}
    ids = dev.ids()
    body: dict[str, Any]
    if server == "is":
        body = {"ids": ids, "join_server_address": addr["js"], "network_server_address": addr["ns"],
                "application_server_address": addr["as"]}
        return body, ["join_server_address", "network_server_address", "application_server_address",
                      "ids.dev_eui", "ids.join_eui"]
    if server == "js":
        body = {"ids": ids, "network_server_address": addr["ns"], "application_server_address": addr["as"],
                "root_keys": {"app_key": {"key": dev.app_key_hex}}}
        return body, ["network_server_address", "application_server_address", *IDS_PATHS, "root_keys.app_key.key"]
    if server == "ns":
        body = {"ids": ids, "supports_join": True, "lorawan_version": dev.lorawan_version,
                "lorawan_phy_version": dev.lorawan_phy_version, "frequency_plan_id": dev.frequency_plan_id}
        return body, [*NS_PATHS, *IDS_PATHS]
    return {"ids": ids}, list(IDS_PATHS)


# --- errors --------------------------------------------------------------------------------

RIGHT_WORDS = {
    "RIGHT_APPLICATION_DEVICES_READ": "view devices",
    "RIGHT_APPLICATION_DEVICES_WRITE": "create, edit and delete devices",
    "RIGHT_APPLICATION_DEVICES_READ_KEYS": "view device keys",
    "RIGHT_APPLICATION_DEVICES_WRITE_KEYS": "edit device keys",
}
# The right each request needs (the registries' rights.RequireApplication calls), to name it when the stack does not.
NEEDED = {("is", "POST"): "RIGHT_APPLICATION_DEVICES_WRITE", ("is", "GET"): "RIGHT_APPLICATION_DEVICES_READ",
          ("js", "PUT"): "RIGHT_APPLICATION_DEVICES_WRITE_KEYS", ("js", "GET"): "RIGHT_APPLICATION_DEVICES_READ_KEYS",
          ("ns", "PUT"): "RIGHT_APPLICATION_DEVICES_WRITE", ("ns", "GET"): "RIGHT_APPLICATION_DEVICES_READ",
          ("as", "PUT"): "RIGHT_APPLICATION_DEVICES_WRITE", ("as", "GET"): "RIGHT_APPLICATION_DEVICES_READ"}


class TtsError(FlasherError):
    """The stack refused or could not be reached; the message is one line and names what to do."""

    def __init__(self, message: str, *, status: int | None = None, name: str | None = None):
        super().__init__(message)
        self.status, self.name = status, name


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any
    headers: dict[str, str]

    @property
    def ok(self) -> bool:
        """Any 2xx: the gateway answers 200, a proxy or another implementation may say 201 or 204."""
        return 200 <= self.status < 300

    @property
    def detail(self) -> dict:
        details = self.body.get("details") if isinstance(self.body, dict) else None
        first = details[0] if isinstance(details, list) and details and isinstance(details[0], dict) else {}
        return first

    @property
    def name(self) -> str | None:
        return self.detail.get("name")

    @property
    def attributes(self) -> dict:
        attrs = self.detail.get("attributes")
        return attrs if isinstance(attrs, dict) else {}

    @property
    def message(self) -> str:
        msg = self.body.get("message") if isinstance(self.body, dict) else None
        if isinstance(msg, str) and msg:
            return " ".join(msg.split())
        text = self.body if isinstance(self.body, str) else ""
        return " ".join(text.split())[:120] or f"HTTP {self.status}"


RETRIED = (429, 502, 503, 504)


class TtsClient:
    """Requests to the four servers of one stack, with retries for 429/5xx inside a deadline.

    ``cancel`` (a board's stop event) ends a backoff wait at once; ``on_phase`` is told
    what is being waited for (shown live, never recorded).
    """

    def __init__(self, target: TtsTarget, *, cancel: threading.Event | None = None,
                 on_phase: Callable[[str], None] | None = None):
        self.target = target
        self.cancel = cancel or threading.Event()
        self.on_phase = on_phase or (lambda _text: None)
        self._ssl: Any = None
        self._conns: dict[Endpoint, Any] = {}
        self.calls: list[tuple[str, str, str, int]] = []   # (server, method, path, status): what was asked

    def _connection(self, ep: Endpoint, timeout: float, *, fresh: bool):
        """The kept-alive connection to ``ep`` (one TLS handshake per server, not per request), and whether it
        was open already."""
        import http.client

        conn = None if fresh else self._conns.get(ep)
        was_open = conn is not None and conn.sock is not None
        if conn is None:
            self._drop(ep)
            if ep.scheme == "https":
                conn = http.client.HTTPSConnection(ep.host, ep.port, timeout=timeout, context=self._context())
            else:
                conn = http.client.HTTPConnection(ep.host, ep.port, timeout=timeout)
            self._conns[ep] = conn
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn, was_open

    def _drop(self, ep: Endpoint) -> None:
        conn = self._conns.pop(ep, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Close the kept-alive connections (every caller does, on every path)."""
        for ep in list(self._conns):
            self._drop(ep)

    def __enter__(self) -> TtsClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _context(self):
        if self._ssl is None:
            import ssl

            ca = self.target.ca_cert
            self._ssl = ssl.create_default_context(cadata=ca.pem) if ca is not None else ssl.create_default_context()
        return self._ssl

    def request(self, server: str, method: str, path: str, body: dict | None = None, *,
                query: dict[str, str] | None = None, deadline: float) -> Reply:
        """One request, retried on 429/502/503/504 with backoff while ``deadline`` (monotonic) allows."""
        attempt = 0
        while True:
            reply = self._send(server, method, path, body, query, deadline)
            if reply.status not in RETRIED:
                return reply
            attempt += 1
            wait = self._backoff(reply, attempt)
            left = deadline - time.monotonic()
            if wait > left:
                raise TtsError(f"{self._where(server)}: {method} {path}: still {reply.status} after {attempt} "
                               f"attempt(s), giving up within the {self.target.timeout:g} s allowed per board "
                               f"(--tts-timeout): {reply.message}", status=reply.status, name=reply.name)
            self.on_phase(f"{SERVER_NAMES[server]} answered {reply.status}; retrying in {wait:.1f} s")
            log.info("%s %s %s: %d, retry %d in %.1f s", server, method, path, reply.status, attempt, wait)
            if self.cancel.wait(wait):
                raise TtsError(f"{self._where(server)}: interrupted while waiting to retry {method} {path}")

    @staticmethod
    def _backoff(reply: Reply, attempt: int) -> float:
        """The stack's own hint (X-Rate-Limit-Retry, pkg/ratelimit; or Retry-After), else 0.5 s doubling to 8 s."""
        for header in ("x-rate-limit-retry", "retry-after"):
            value = reply.headers.get(header)
            if value is not None:
                try:
                    return min(max(float(value), 0.2), 60.0)
                except ValueError:
                    pass
        return min(8.0, 0.5 * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)

    def _where(self, server: str) -> str:
        return f"The Things Stack {SERVER_NAMES[server]} ({self.target.endpoints[server]})"

    def _send(self, server: str, method: str, path: str, body: dict | None, query: dict[str, str] | None,
              deadline: float) -> Reply:
        import http.client
        import ssl
        from urllib.parse import urlencode

        ep = self.target.endpoints[server]
        left = deadline - time.monotonic()
        if left <= 0:
            raise TtsError(f"{self._where(server)}: no time left for {method} {path} within the "
                           f"{self.target.timeout:g} s allowed per board (--tts-timeout)")
        url = API + path + (f"?{urlencode(query)}" if query else "")
        key = self.target.api_key.reveal()
        headers = {"Authorization": f"Bearer {key}", "Accept": "application/json",
                   "User-Agent": "flasher (The Things Stack end device registration)"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        timeout = min(left, 30.0)
        for reused in (True, False):
            conn, was_open = self._connection(ep, timeout, fresh=not reused)
            try:
                conn.request(method, url, body=payload, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                status, resp_headers = resp.status, {k.lower(): v for k, v in resp.getheaders()}
                if resp.will_close:
                    self._drop(ep)
                break
            except ssl.SSLCertVerificationError as exc:
                self._drop(ep)
                raise TtsError(f"{self._where(server)}: TLS certificate not trusted ({exc.verify_message}); "
                               f"give its CA with --tts-ca-cert") from None
            except TimeoutError:
                self._drop(ep)
                raise TtsError(f"{self._where(server)}: no answer to {method} {path} within {timeout:.0f} s") from None
            except (OSError, http.client.HTTPException) as exc:
                self._drop(ep)
                if was_open and reused:
                    continue   # the server closed an idle kept-alive connection: once more on a new one
                why = getattr(exc, "strerror", None) or exc.__class__.__name__
                raise TtsError(f"{self._where(server)}: cannot connect ({why})") from None
        self.calls.append((server, method, path, status))
        log.debug("%s %s %s -> %d", server, method, path, status)
        try:
            parsed: Any = json.loads(raw.decode("utf-8")) if raw else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            parsed = raw.decode("utf-8", "replace")
        return Reply(status, parsed, resp_headers)

    # --- one line per refusal ------------------------------------------------------------
    def fail(self, server: str, method: str, path: str, reply: Reply) -> TtsError:
        where = self._where(server)
        app = self.target.app
        if reply.status == 401:
            return TtsError(f"{where}: the API key was refused ({reply.name or 'unauthenticated'}: {reply.message}); "
                            f"check FLASHER_TTS_API_KEY / --tts-api-key-file", status=401, name=reply.name)
        if reply.status == 403:
            if reply.name == "no_application_rights":
                return TtsError(f"{where}: the API key has no rights on application {app!r} (a key of another "
                                f"application or user, or no such application)", status=403, name=reply.name)
            missing = reply.attributes.get("missing")
            rights = [str(r) for r in missing] if isinstance(missing, list) and missing else \
                [NEEDED.get((server, method), "RIGHT_APPLICATION_DEVICES_WRITE")]
            words = ", ".join(f"{r} ({RIGHT_WORDS[r]})" if r in RIGHT_WORDS else r for r in rights)
            return TtsError(f"{where}: the API key lacks {words} on application {app!r}, needed for {method} "
                            f"{path}; add it to the key in the console", status=403, name=reply.name)
        return TtsError(f"{where}: {method} {path}: {reply.status} {reply.message}", status=reply.status,
                        name=reply.name)


# --- registration: one board on the four servers -----------------------------------------------

@dataclass
class Registration:
    """What :func:`register_end_device` found and did."""

    device_id: str
    held: list[str]                        # servers that hold the device as it should be, in SERVERS order
    written: list[str] = field(default_factory=list)   # servers this call wrote to
    adopted: bool = False                  # the Identity Server already had it (an earlier run, or by hand)

    @property
    def detail(self) -> str:
        if not self.written:
            return f"{self.device_id}: already on all four servers"
        return f"{self.device_id}: written to {', '.join(s.upper() for s in self.written)}" + \
            (" (found on the others)" if len(self.written) < len(SERVERS) else "")


def _path(server: str, dev: EndDevice) -> str:
    base = f"/applications/{quote(dev.app, safe='')}/devices"
    return base if server == "is" else f"/{server}{base}/{quote(dev.device_id, safe='')}"


def _eui(value: Any) -> EUI64 | None:
    try:
        return EUI64.parse(str(value), "EUI")
    except InputError:
        return None


def register_end_device(client: TtsClient, dev: EndDevice, held: Iterable[str] = (), *,
                        deadline: float | None = None,
                        on_held: Callable[[list[str]], None] | None = None) -> Registration:
    """Make ``dev`` exist on all four servers; safe to call again at any point.

    ``held``: servers an earlier run recorded as holding the device; they are not
    asked again (a rerun writes nothing new). The Identity Server creates the device;
    if it already exists with the same EUIs it is read back and the other servers are
    read too (``GET`` with a field mask), so only the ones that lack it, or hold
    something else (another AppKey, another frequency plan), are written. A DevEUI
    registered under another id or application is an error naming both, never an
    overwrite. ``on_held`` is called with the servers known to hold the device after
    each one, so a caller can record progress between servers.
    """
    deadline = deadline if deadline is not None else time.monotonic() + client.target.timeout
    have = [s for s in SERVERS if s in set(held)]
    reg = Registration(dev.device_id, have)
    note = on_held or (lambda _servers: None)
    fresh = False
    if "is" not in have:
        fresh = _create_on_identity_server(client, dev, reg, deadline)
        _mark(reg, "is")
        note(list(reg.held))
    for server in ("js", "ns", "as"):
        if server in reg.held:
            continue
        if not fresh and _holds(client, server, dev, deadline):
            _mark(reg, server)
            note(list(reg.held))
            continue
        body, paths = _write_request(server, dev, client.target)
        path = _path(server, dev)
        client.on_phase(f"{SERVER_NAMES[server]}: PUT")
        reply = client.request(server, "PUT", path, {"end_device": body, "field_mask": {"paths": paths}},
                               deadline=deadline)
        if reply.status == 409 and server == "js":
            raise TtsError(f"The Things Stack Join Server ({client.target.endpoints['js']}): DevEUI {dev.dev_eui} "
                           f"(JoinEUI {dev.join_eui}) is already provisioned there under another device "
                           f"({reply.message}); not overwritten", status=409, name=reply.name)
        if not reply.ok:
            raise client.fail(server, "PUT", path, reply)
        reg.written.append(server)
        _mark(reg, server)
        note(list(reg.held))
    return reg


def _mark(reg: Registration, server: str) -> None:
    if server not in reg.held:
        reg.held.append(server)
        reg.held.sort(key=SERVERS.index)


def _create_on_identity_server(client: TtsClient, dev: EndDevice, reg: Registration, deadline: float) -> bool:
    """POST the device; True if this call created it, False if it was there already (with our EUIs)."""
    body, paths = _write_request("is", dev, client.target)
    path = _path("is", dev)
    client.on_phase("Identity Server: POST")
    reply = client.request("is", "POST", path, {"end_device": body, "field_mask": {"paths": paths}},
                           deadline=deadline)
    if reply.ok:
        reg.written.append("is")
        return True
    if reply.status != 409:
        raise client.fail("is", "POST", path, reply)
    # Taken: if it is this very device (an earlier run, a lost answer), read it back and go on.
    get_path = f"{path}/{quote(dev.device_id, safe='')}"
    mine = _get(client, "is", get_path, "ids.dev_eui,ids.join_eui", deadline)
    if mine.ok:
        ids = mine.body.get("ids", {}) if isinstance(mine.body, dict) else {}
        dev_eui, join_eui = _eui(ids.get("dev_eui")), _eui(ids.get("join_eui"))
        if dev_eui == dev.dev_eui and join_eui == dev.join_eui:
            reg.adopted = True
            return False
        raise TtsError(f"The Things Stack Identity Server ({client.target.endpoints['is']}): device id "
                       f"{dev.device_id!r} in application {dev.app!r} already belongs to DevEUI {dev_eui or '?'} "
                       f"(JoinEUI {join_eui or '?'}), not this board's {dev.dev_eui}; not overwritten (choose "
                       f"another --tts-device-id-format)", status=409, name="id_taken")
    if mine.status != 404:
        raise client.fail("is", "GET", get_path, mine)
    attrs = reply.attributes
    other_id, other_app = attrs.get("device_id"), attrs.get("application_id")
    if not (other_id and other_app):   # an older stack, or a proxy: take the names from the message
        names = re.findall(r"`([^`]+)`", reply.message)
        other_id, other_app = (names[2], names[3]) if len(names) >= 4 else ("?", "?")
    raise TtsError(f"The Things Stack Identity Server ({client.target.endpoints['is']}): DevEUI {dev.dev_eui} "
                   f"(JoinEUI {dev.join_eui}) is already registered as {other_id!r} in application {other_app!r}; "
                   f"this board would be {dev.device_id!r} in {dev.app!r}; not overwritten (delete it there first, "
                   f"or register under that id and application)", status=409, name=reply.name or "end_device_euis_taken")


def _get(client: TtsClient, server: str, path: str, mask: str, deadline: float) -> Reply:
    """GET with a field mask (grpc-gateway's ``?field_mask=a,b``); a server that refuses that query form (400)
    is asked once more without it, for the whole device."""
    reply = client.request(server, "GET", path, query={"field_mask": mask}, deadline=deadline)
    if reply.status == 400:
        reply = client.request(server, "GET", path, deadline=deadline)
    return reply


def _holds(client: TtsClient, server: str, dev: EndDevice, deadline: float) -> bool:
    """Whether ``server`` already holds ``dev`` as it should (read back with a field mask)."""
    path = _path(server, dev)
    if server == "js":
        mask = "ids.dev_eui,ids.join_eui,root_keys.app_key.key"
    elif server == "ns":
        mask = ",".join(NS_PATHS)
    else:
        mask = "ids.dev_eui,ids.join_eui"
    client.on_phase(f"{SERVER_NAMES[server]}: GET")
    reply = _get(client, server, path, mask, deadline)
    if reply.status == 403 and server == "js" and reply.name != "no_application_rights":
        # no right to read keys: whether the device is there is all we can learn; the key is written again
        reply = _get(client, server, path, "ids.dev_eui,ids.join_eui", deadline)
        if reply.ok:
            return False
    if reply.status == 404:
        return False
    if reply.status in (400, 403, 405, 501) and reply.name != "no_application_rights":
        # not allowed (or not able) to read it back: write it, a PUT creates or updates
        log.info("%s: %s: cannot read it back (%d); writing it", dev.device_id, server, reply.status)
        return False
    if not reply.ok:
        raise client.fail(server, "GET", path, reply)
    got = reply.body if isinstance(reply.body, dict) else {}
    if server == "js":
        ids = got.get("ids", {}) if isinstance(got.get("ids"), dict) else {}
        if _eui(ids.get("dev_eui")) not in (None, dev.dev_eui):
            raise TtsError(f"The Things Stack Join Server ({client.target.endpoints['js']}): device "
                           f"{dev.device_id!r} there has DevEUI {ids.get('dev_eui')}, not {dev.dev_eui}; not "
                           f"overwritten", status=409)
        key = (got.get("root_keys") or {}).get("app_key", {}).get("key") if isinstance(got.get("root_keys"), dict) \
            else None
        if isinstance(key, str) and key.upper() == dev.app_key_hex:
            return True
        log.info("%s: the Join Server holds another AppKey (or none); setting the module's", dev.device_id)
        return False
    if server == "ns":
        want = {"supports_join": True, "lorawan_version": dev.lorawan_version,
                "lorawan_phy_version": dev.lorawan_phy_version, "frequency_plan_id": dev.frequency_plan_id}
        have = {"supports_join": bool(got.get("supports_join")),
                "lorawan_version": _canonical(parse_mac_version, got.get("lorawan_version")),
                "lorawan_phy_version": _canonical(parse_phy_version, got.get("lorawan_phy_version")),
                "frequency_plan_id": got.get("frequency_plan_id")}
        return have == want
    return True


def _canonical(parse: Callable[[str], str], value: Any) -> str | None:
    try:
        return parse(str(value)) if value is not None else None
    except InputError:
        return None


def read_back(client: TtsClient, dev: EndDevice, *, deadline: float | None = None) -> dict[str, dict | None]:
    """Each server's copy of ``dev`` (``None`` where it is missing), keys included where the API key may read them."""
    deadline = deadline if deadline is not None else time.monotonic() + client.target.timeout
    masks = {"is": "ids.dev_eui,ids.join_eui,join_server_address,network_server_address,application_server_address",
             "js": "ids.dev_eui,ids.join_eui,root_keys.app_key.key", "ns": ",".join(NS_PATHS),
             "as": "ids.dev_eui,ids.join_eui"}
    out: dict[str, dict | None] = {}
    for server in SERVERS:
        path = _path(server, dev) if server != "is" else f"{_path('is', dev)}/{quote(dev.device_id, safe='')}"
        reply = _get(client, server, path, masks[server], deadline)
        if reply.status == 404:
            out[server] = None
        elif reply.ok and isinstance(reply.body, dict):
            out[server] = reply.body
        else:
            raise client.fail(server, "GET", path, reply)
    return out


# --- the stack's bulk-import formats (pkg/devicetemplates) --------------------------------------

CSV_COLUMNS = ("id", "dev_eui", "join_eui", "frequency_plan_id", "lorawan_version", "lorawan_phy_version", "app_key")


def tts_csv(devices: Iterable[EndDevice]) -> Iterable[str]:
    """The Things Stack CSV (``ttscsv.go``): a header of known column names, ``;``-separated, one device a line.

    An ``app_key`` column also sets ``supports_join`` on import; EUIs and keys are hex.
    """
    yield ";".join(CSV_COLUMNS) + "\n"
    for d in devices:
        yield ";".join((d.device_id, d.dev_eui.hex, d.join_eui.hex, d.frequency_plan_id, d.lorawan_version,
                        d.lorawan_phy_version, d.app_key_hex)) + "\n"


def tts_json(devices: Iterable[EndDevice], *, with_application: bool = True) -> Iterable[str]:
    """The Things Stack JSON (``ttsjson.go``): a stream of EndDevice objects, here one a line."""
    for d in devices:
        ids = d.ids()
        if not with_application:
            ids.pop("application_ids")
        yield json.dumps({"ids": ids, "frequency_plan_id": d.frequency_plan_id, "lorawan_version": d.lorawan_version,
                          "lorawan_phy_version": d.lorawan_phy_version, "supports_join": True,
                          "root_keys": {"app_key": {"key": d.app_key_hex}}}) + "\n"
