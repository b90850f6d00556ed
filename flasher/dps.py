"""Register a device with Azure DPS (symmetric key) and prove it with one hub message.

The only module that imports azure-iot-device, and only inside functions: commands
that do not register never pay for the SDK (nor for paho). The SDK 2.14 has sharp
edges this adapter files down:

* ``register()`` blocks with no timeout and retries 429/5xx forever: it runs on a
  worker thread under our own deadline, and 429s are counted on the pipeline's
  provisioning stages (``throttle_retries``, each honouring retry-after).
* a failed ``register()`` leaves the client connected, with retry/polling/SAS-renewal
  timer threads pending, and has no public shutdown: :func:`_dispose_provisioning`
  cancels the provisioning ops' timers, fails what is still pending (which frees the
  waiting thread), and runs the pipeline's own shutdown (cancels the SAS alarm,
  disconnects paho and stops its thread) on the SDK's pipeline thread.
* failures arrive as ``ClientError("Unexpected failure")``: the real cause is
  dug out of the exception chain and turned into a :class:`DpsError` with a ``kind``.

How the SDK gets out is a :class:`Transport`: MQTT on 8883 (fixed by the SDK), or MQTT
over WebSockets on 443 (``websockets=True``: ``wss://host:443/$iothub/websocket``), either
of them optionally through an HTTP CONNECT or SOCKS5 proxy (``ProxyOptions``). DPS and the
hub connection always go the same way.

The SDK's process-wide "pipeline" and "callback" worker threads are shared by every
client and live as long as the process: they are not leaks.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flasher.errors import FlasherError, InputError
from flasher.governor import RateGovernor, Slot, Stopped, Turnstile
from flasher.identity import validate_host, validate_id_scope
from flasher.proxy import Proxy

log = logging.getLogger("flasher.dps")

DEFAULT_DPS_HOST = "global.azure-devices-provisioning.net"
DEFAULT_TIMEOUT = 60.0
DEFAULT_THROTTLE_RETRIES = 5
ERROR_KINDS = frozenset({"unauthorized", "not_found", "disabled", "throttled", "unreachable", "tls", "timeout",
                         "hub_refused", "proxy", "bad_request", "failed"})
MQTT_PORT, WEBSOCKET_PORT = 8883, 443  # both fixed by the SDK
PHASES = ("register", "assigning", "throttled", "connect", "message")
_GRACE = 10.0  # how long cleanup may take after the deadline before we stop waiting for the SDK
SELECT_LIMIT = 1024  # paho waits with select(), which takes descriptors below this only
# SDK clients setting up a connection at once (see governor.Turnstile): a few per core keep the CPU busy while
# each waits on its round trips, without sharing it so thinly that every set-up finishes late.
CONNECTING_PER_CPU = 4
# Failures that never reached the service, or give no telling: they hold no place in its quota.
_NOT_REACHED = frozenset({"unreachable", "tls", "proxy", "timeout"})
_CONNECTING = Turnstile(CONNECTING_PER_CPU * (os.cpu_count() or 1))


class DpsError(FlasherError):
    """A registration or hub step failed; ``kind`` is one of :data:`ERROR_KINDS`."""

    def __init__(self, kind: str, message: str, *, status: int | None = None, retry_after: int | None = None):
        assert kind in ERROR_KINDS, kind
        super().__init__(message)
        self.kind = kind
        self.status, self.retry_after = status, retry_after   # a throttled answer's HTTP status and retry-after


@dataclass(frozen=True)
class Transport:
    """How the SDK reaches DPS and the hub: MQTT over TLS on 8883, or over TLS + WebSocket on 443
    (``websockets``), directly or through ``proxy``."""

    websockets: bool = False
    proxy: Proxy | None = None

    @property
    def port(self) -> int:
        return WEBSOCKET_PORT if self.websockets else MQTT_PORT

    def proxy_for(self, host: str) -> Proxy | None:
        return self.proxy if self.proxy is not None and self.proxy.applies_to(host) else None

    def describe(self, host: str) -> str:
        """``port 443 (MQTT over WebSockets) through proxy http://bench@10.0.0.1:3128``: never a password."""
        how = f"port {self.port}" + (" (MQTT over WebSockets)" if self.websockets else "")
        proxy = self.proxy_for(host)
        return how + (f" through proxy {proxy}" if proxy else "")

    def sdk_kwargs(self, host: str) -> dict[str, Any]:
        """The SDK's ``websockets`` and ``proxy_options`` for a connection to ``host``."""
        kwargs: dict[str, Any] = {"websockets": self.websockets}
        proxy = self.proxy_for(host)
        if proxy is not None:
            from azure.iot.device import ProxyOptions

            kwargs["proxy_options"] = ProxyOptions(proxy.sdk_type, proxy.host, proxy.port, proxy.username,
                                                   proxy.password.reveal() if proxy.password else None)
        return kwargs


DIRECT = Transport()


@dataclass(frozen=True)
class Registration:
    registration_id: str
    device_id: str
    assigned_hub: str
    status: str
    substatus: str | None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase: register, connect, message
    payload: Any = None  # registrationState.payload: what DPS (a custom allocation, IoT Central) handed back

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
        return d


_PEM_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]*?-----END CERTIFICATE-----")


def read_ca_cert(path: str | Path) -> str:
    """PEM text of a root-of-trust file (what the SDK wants), with a one-line error otherwise.

    A bundle (a chain, or several roots) is fine, and so is text between the blocks
    (``openssl`` writes ``subject=`` lines, in UTF-8): only the certificate blocks are
    kept. They are loaded once here, because the SDK loads them while it builds its
    pipeline, where a bad one escapes as a bare ``ssl.SSLError`` and leaves a timer behind.
    """
    import ssl

    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(f"CA certificate {str(path)!r}: no such file") from None
    except OSError as exc:
        raise InputError(f"CA certificate {str(path)!r}: cannot read ({exc.strerror or exc.__class__.__name__})") from None
    blocks = _PEM_BLOCK.findall(raw.decode("utf-8", errors="replace"))
    if not blocks:
        raise InputError(f"CA certificate {str(path)!r}: not a PEM certificate")
    text = "\n".join(blocks).replace("\r", "") + "\n"
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except (ssl.SSLError, ValueError) as exc:
        why = getattr(exc, "reason", None) or exc
        raise InputError(f"CA certificate {str(path)!r}: not a valid PEM certificate ({why})") from None
    return text


@dataclass(frozen=True)
class CaCert:
    """A root of trust read and checked once per run (not once per connection)."""

    path: str
    pem: str = field(repr=False)


def load_ca_cert(path: str | Path) -> CaCert:
    return CaCert(str(path), read_ca_cert(path))


def _pem(ca_cert: CaCert | str | Path | None) -> str | None:
    if ca_cert is None:
        return None
    return ca_cert.pem if isinstance(ca_cert, CaCert) else read_ca_cert(ca_cert)


# --- the adapter --------------------------------------------------------------------

def register_device(registration_id: str, device_key: str, *, id_scope: str, dps_host: str = DEFAULT_DPS_HOST,
                    ca_cert: CaCert | str | Path | None = None, timeout: float = DEFAULT_TIMEOUT,
                    test_message: str | None = "TestMessage", on_phase: Callable[[str], None] | None = None,
                    throttle_retries: int = DEFAULT_THROTTLE_RETRIES, transport: Transport = DIRECT,
                    payload: Any = None, model_id: str | None = None, other_key: str | None = None,
                    key_names: tuple[str, str] = ("primary", "secondary"), governor: RateGovernor | None = None,
                    stop: threading.Event | None = None, hub_governor: RateGovernor | None = None,
                    look_up_first: bool = False, before_send: Callable[[], None] | None = None) -> Registration:
    """Register ``registration_id`` with DPS, then (unless ``test_message`` is None) send it from the hub.

    ``device_key`` is the device's base64 key (group-derived or the individual
    enrollment's). ``ca_cert`` is the path of a PEM root of trust (an emulator, a
    gateway). ``timeout`` bounds the whole call. ``on_phase`` is called with one of
    :data:`PHASES` as each starts ("throttled" each time DPS answers 429 and we wait).
    ``transport`` says how to get out (8883, 443, a proxy); ``payload`` is the registration
    payload (IoT Central's ``{"modelId": ...}``); ``model_id`` is also announced to the hub.
    ``other_key`` (the device key from the group's other key, named ``key_names[1]``) is
    tried once if DPS refuses ``device_key`` with 401, so the error can say whether it works.
    ``governor`` (shared by a run) paces every request to the DPS quota: each attempt
    waits for a slot, and a 429 slows the whole run instead of being retried blind;
    ``stop`` ends that wait (raising :class:`~flasher.governor.Stopped`). ``hub_governor`` paces
    the test messages' connections to the hub's limit on new device connections the same way.
    ``look_up_first`` (an id whose registration a killed run may have sent) asks DPS's
    registration status lookup first, and registers only if DPS has no assignment for it.
    ``before_send`` runs once this id's turn in the quota has come, just before it is sent.
    Raises :class:`DpsError` (one-line message naming the id and host) or
    :class:`InputError` for bad arguments. Every SDK client is closed on every path.
    """
    from flasher.identity import validate_registration_id
    from flasher.keys import decode_symmetric_key
    from flasher.secrets import Redactor

    reg_id = validate_registration_id(registration_id)
    decode_symmetric_key(device_key, f"device key for {reg_id!r}")
    Redactor.add(device_key)
    if other_key is not None:
        decode_symmetric_key(other_key, f"{key_names[1]} device key for {reg_id!r}")
        Redactor.add(other_key)
    scope = validate_id_scope(id_scope)
    host = validate_host(dps_host)
    if not (0 < timeout < math.inf):
        raise InputError(f"timeout {timeout}: must be a positive number of seconds")
    pem = _pem(ca_cert)
    phase = on_phase or (lambda _p: None)
    timings: dict[str, float] = {}
    if look_up_first:   # not a registration: it waits for no place in the quota
        t0 = time.monotonic()
        deadline = t0 + timeout
        found = look_up_registration(reg_id, device_key, id_scope=scope, dps_host=host, pem=pem, deadline=deadline,
                                     transport=transport)
        if found is not None:
            timings["lookup"] = time.monotonic() - t0
            log.info("registration %r: DPS has it assigned to %s already (status lookup)", reg_id, found.assigned_hub)
            if test_message is not None:
                _prove(reg_id, device_key, found.device_id, found.assigned_hub, pem, test_message, deadline, timeout,
                       phase, timings, transport, model_id, hub_governor)
            return Registration(reg_id, found.device_id, found.assigned_hub, "assigned", found.substatus, timings,
                                found.payload)
    first_slot = governor.acquire(None, stop) if governor is not None else None   # the queue is not the device's time
    if before_send is not None:
        try:
            before_send()
        except BaseException:
            if first_slot is not None:
                first_slot.refused()
            raise
    deadline = time.monotonic() + timeout
    attempt = _Attempt(reg_id, scope, host, pem, timeout, throttle_retries, transport, payload, governor, stop)

    t0 = time.monotonic()
    phase("register")
    try:
        result = attempt.provision(device_key, deadline, phase, first_slot)
    except DpsError as exc:
        if exc.kind != "unauthorized" or other_key is None:
            raise
        raise attempt.check_other_key(exc, other_key, deadline, key_names) from None
    timings["register"] = time.monotonic() - t0
    state = result.registration_state
    hub, device_id, substatus = state.assigned_hub, state.device_id, state.sub_status or None
    if not hub or not device_id:
        raise DpsError("failed", f"{attempt.where}: DPS answered {result.status!r} without a hub or device id")
    returned = _returned_payload(state)
    log.info("registration %r: assigned to %s as %r (%s)", reg_id, hub, device_id, substatus)
    if test_message is not None:
        _prove(reg_id, device_key, device_id, hub, pem, test_message, deadline, timeout, phase, timings, transport,
               model_id, hub_governor)
    return Registration(reg_id, device_id, hub, result.status, substatus, timings, returned)


LOOKUP_API_VERSION = "2021-10-01"


@dataclass(frozen=True)
class _Found:
    assigned_hub: str
    device_id: str
    substatus: str | None
    payload: Any


def look_up_registration(reg_id: str, device_key: str, *, id_scope: str, dps_host: str, pem: str | None,
                         deadline: float, transport: Transport = DIRECT) -> _Found | None:
    """DPS's device registration status lookup (``POST /{idScope}/registrations/{id}``, HTTPS on 443, signed
    with the device key): the assignment DPS holds for ``reg_id``, or None if it has none (never registered,
    failed, disabled) or cannot say (no answer, a proxy: this lookup goes direct only). None means "register";
    it never fails a registration that would otherwise go through."""
    import http.client
    import json
    import ssl
    import urllib.parse

    if transport.proxy_for(dps_host) is not None:
        return None
    path = (f"/{urllib.parse.quote(id_scope, safe='')}/registrations/{urllib.parse.quote(reg_id, safe='')}"
            f"?api-version={LOOKUP_API_VERSION}")
    headers = {"Authorization": sas_token(f"{id_scope}/registrations/{reg_id}", device_key, key_name="registration"),
               "Content-Type": "application/json", "Accept": "application/json"}
    context = ssl.create_default_context(cadata=pem) if pem else ssl.create_default_context()
    conn = http.client.HTTPSConnection(dps_host, WEBSOCKET_PORT, context=context,
                                       timeout=max(1.0, min(10.0, deadline - time.monotonic())))
    try:
        conn.request("POST", path, body=json.dumps({"registrationId": reg_id}), headers=headers)
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        log.info("registration %r: status lookup at %s failed (%s); registering", reg_id, dps_host, exc)
        return None
    finally:
        conn.close()
    if response.status != 200:
        log.info("registration %r: status lookup answered %d; registering", reg_id, response.status)
        return None
    try:
        state = json.loads(body)
    except ValueError:
        return None
    if not isinstance(state, dict) or state.get("status") != "assigned" or not state.get("assignedHub") \
            or not state.get("deviceId"):
        return None
    return _Found(state["assignedHub"], state["deviceId"], state.get("substatus"), state.get("payload"))


def sas_token(resource: str, key: str, ttl: int = 3600, key_name: str | None = None) -> str:
    """A shared access signature for ``resource`` signed with the base64 ``key``, as the SDKs build it: ``sr``
    URL-encoded, HMAC-SHA256 over ``sr + "\\n" + se``; ``skn`` only if ``key_name`` is given (DPS's "registration")."""
    import base64
    import hashlib
    import hmac
    import urllib.parse

    expiry = int(time.time()) + ttl
    sr = urllib.parse.quote(resource, safe="")
    sig = base64.b64encode(hmac.new(base64.b64decode(key), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest())
    token = f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig.decode(), safe='')}&se={expiry}"
    return token + (f"&skn={key_name}" if key_name else "")


def _returned_payload(state) -> Any:
    """registrationState.payload as JSON values (the SDK keeps it decoded, and re-encodes it for display)."""
    import json

    text = state.response_payload  # json.dumps of what the service sent; "null" when it sent none
    return json.loads(text)


@dataclass(frozen=True)
class _Attempt:
    """One registration's fixed inputs, so a second attempt with the other key differs only in the key."""

    reg_id: str
    scope: str
    host: str
    pem: str | None
    timeout: float
    throttle_retries: int
    transport: Transport
    payload: Any
    governor: RateGovernor | None = None
    stop: threading.Event | None = None

    @property
    def where(self) -> str:
        return f"registration {self.reg_id!r} at {self.host}"

    def provision(self, key: str, deadline: float, phase: Callable[[str], None], slot: Slot | None = None):
        if self.governor is None:   # the SDK retries 429s itself, honouring retry-after
            return _provision(self.reg_id, key, self.scope, self.host, self.pem, deadline, self.timeout, phase,
                              self.throttle_retries, self.transport, self.payload)
        return self._paced(key, deadline, phase, self.governor, slot)

    def _paced(self, key: str, deadline: float, phase: Callable[[str], None], governor: RateGovernor,
               slot: Slot | None):
        """Each request in a slot of the run's quota; a 429 slows the run down, and this id waits its turn again."""
        retries, throttled = 0, ""
        while True:
            if slot is None:
                try:
                    slot = governor.acquire(deadline, self.stop)
                except Stopped as exc:
                    if self.stop is not None and self.stop.is_set():
                        raise
                    raise DpsError("timeout", f"{self.where}: {exc}{throttled}") from None

            def answered(status: int, slot=slot) -> None:
                if status != 429:   # DPS took the request: from when it answered, it counts against the quota
                    slot.answered()

            try:
                result = _provision(self.reg_id, key, self.scope, self.host, self.pem, deadline, self.timeout,
                                    phase, 0, self.transport, self.payload, answered)
            except DpsError as exc:
                if exc.kind != "throttled" or exc.status is None:
                    if exc.kind in _NOT_REACHED:
                        slot.refused()   # never reached DPS, or no telling: do not hold a place for it
                    else:
                        slot.answered()
                    if exc.kind == "timeout" and throttled:
                        raise DpsError("timeout", f"{exc}{throttled}") from None
                    raise
                if exc.status == 429:
                    slot.refused()
                    governor.throttled(exc.retry_after)
                else:   # 5xx: DPS counted it; wait as told, without slowing everyone
                    slot.answered()
                    time.sleep(max(0.0, min(exc.retry_after or 2, deadline - time.monotonic())))
                retries += 1
                throttled = (f" (DPS had answered {exc.status} {retries} time(s), retry-after "
                             f"{exc.retry_after} s)")
                if retries > self.throttle_retries:
                    raise DpsError("throttled", f"{self.where}: DPS answered {exc.status} "
                                                f"(retry-after {exc.retry_after} s); gave up after "
                                                f"{retries - 1} retries", status=exc.status,
                                   retry_after=exc.retry_after) from None
                log.info("%s: DPS answered %s; waiting for the run's next slot (%d/%d)", self.where, exc.status,
                         retries, self.throttle_retries)
                phase("throttled")
                slot = None
                continue
            except BaseException:   # not an answer from DPS (a bad argument, Ctrl-C): free the place
                slot.refused()
                raise
            slot.answered()
            governor.succeeded()
            return result

    def check_other_key(self, refused: DpsError, other_key: str, deadline: float, names: tuple[str, str]) -> DpsError:
        """The first key got 401: try the other one once, and say what that tells the user."""
        used, other = names
        rerun = "--use-secondary-key" if other == "secondary" else "without --use-secondary-key"
        first = f"{self.where}: DPS refused the {used} key (401)"
        if deadline - time.monotonic() < 1:
            return DpsError("unauthorized", f"{first}; no time was left to try the {other} key")
        log.info("%s; trying the %s key once", first, other)
        try:
            self.provision(other_key, deadline, lambda _p: None)
        except DpsError as exc:
            if exc.kind == "unauthorized":
                return DpsError("unauthorized", f"{first}, and the {other} key too: check the ID scope, the "
                                                f"registration id format and the enrollment group")
            return DpsError(refused.kind, f"{first}; trying the {other} key failed too: "
                                          f"{str(exc).removeprefix(self.where + ': ')}")
        return DpsError("unauthorized", f"{first}, but the {other} key works (DPS registered the device with it): "
                                        f"the {used} key was probably rotated; rerun {rerun}")


def register_many(keys: Mapping[str, str] | Iterable[tuple[str, str, str | None]], *, concurrency: int = 8,
                  on_phase: Callable[[str, str], None] | None = None, other_keys: Mapping[str, str] | None = None,
                  stop: threading.Event | None = None,
                  record: Callable[[str, str, Registration | DpsError], None] | None = None,
                  look_up: Callable[[str], bool] | None = None, sending: Callable[[str], None] | None = None,
                  **kwargs) -> Iterator[tuple[str, Registration | DpsError]]:
    """Register ids at once, at most ``concurrency`` in flight, each reported as it finishes.

    ``keys`` is ``registration id -> device key``, or a stream of ``(registration id, device
    key, the device key from the group's other key or None)``, read only as fast as slots
    free up, so a file of a million ids costs the memory of ``concurrency`` of them.
    Yields ``(registration_id, Registration or DpsError)``, so one refusal never hides
    the others; ``other_keys`` are for the 401 check. ``record(id, key, outcome)`` runs on
    the worker before the outcome is yielded, so what finishes while the caller is gone
    (Ctrl-C) is still recorded. ``look_up(id)`` says whether to ask DPS's status lookup
    before registering the id (a killed run had sent it); ``sending(id)`` runs on the worker
    once its turn in the quota has come, just before it is sent. Once ``stop`` is set,
    nothing new starts, what is in flight finishes and is yielded, and ids waiting for the
    quota are dropped. ``kwargs`` go to
    :func:`register_device` (``governor``: the run's pace).
    """
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    if isinstance(keys, Mapping):
        items: Iterator[tuple[str, str, str | None]] = (
            (r, k, other_keys.get(r) if other_keys else None) for r, k in keys.items())
    else:
        items = iter(keys)

    def one(reg_id: str, key: str, other: str | None) -> Registration | DpsError:
        phase = (lambda p: on_phase(reg_id, p)) if on_phase else None
        outcome: Registration | DpsError
        try:
            outcome = register_device(reg_id, key, on_phase=phase, other_key=other, stop=stop,
                                      look_up_first=look_up(reg_id) if look_up is not None else False,
                                      before_send=(lambda: sending(reg_id)) if sending is not None else None, **kwargs)
        except DpsError as exc:
            outcome = exc
        if record is not None:
            record(reg_id, key, outcome)
        return outcome

    stop = stop if stop is not None else threading.Event()
    width = max(1, concurrency)
    pending: dict[Future, str] = {}
    with ThreadPoolExecutor(max_workers=width, thread_name_prefix="flasher-register") as pool:
        try:
            while True:
                while len(pending) < width and not stop.is_set():
                    item = next(items, None)
                    if item is None:
                        break
                    pending[pool.submit(one, *item)] = item[0]
                if not pending:
                    return
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    reg_id = pending.pop(fut)
                    try:
                        outcome = fut.result()
                    except Stopped:
                        continue
                    yield reg_id, outcome
        finally:
            if pending:   # the caller stopped reading (Ctrl-C, an error): wake every id waiting for the quota
                stop.set()
            for fut in pending:
                fut.cancel()


# --- provisioning -------------------------------------------------------------------

class _Throttled(Exception):
    def __init__(self, retries: int, retry_after: int | None, status: int = 429):
        super().__init__(f"DPS answered {status} after {retries} retries")
        self.retries, self.retry_after, self.status = retries, retry_after, status


class _DeadlineReached(Exception):
    pass


def _stages(root):
    stage = root
    while stage is not None:
        yield stage
        stage = stage.next


def _provision(reg_id, key, scope, host, pem, deadline, timeout, phase, throttle_retries, transport=DIRECT,
               payload=None, on_answer: Callable[[int], None] | None = None):
    """One registration through the SDK. Its connection set-up takes a place in :data:`_CONNECTING`, left at DPS's
    first answer to the register request (the wait for the assignment costs no CPU) or on any way out. That wait
    is short and ignores a stop: an id given its turn in the quota is sent, and a stopping run lets it finish."""
    entry = _CONNECTING.enter()
    try:
        return _provision_entered(reg_id, key, scope, host, pem, deadline, timeout, phase, throttle_retries,
                                  transport, payload, on_answer, entry.leave)
    finally:
        entry.leave()


def _provision_entered(reg_id, key, scope, host, pem, deadline, timeout, phase, throttle_retries, transport,
                       payload, on_answer: Callable[[int], None] | None, answered: Callable[[], None]):
    from azure.iot.device import ProvisioningDeviceClient
    from azure.iot.device.common.pipeline import pipeline_ops_base as ops_base
    from azure.iot.device.provisioning.pipeline import pipeline_ops_provisioning as ops_provisioning
    from azure.iot.device.provisioning.pipeline import pipeline_stages_provisioning as stages

    where = f"registration {reg_id!r} at {host}"
    kwargs = {"server_verification_cert": pem} if pem else {}
    try:
        client = ProvisioningDeviceClient.create_from_symmetric_key(
            provisioning_host=host, registration_id=reg_id, id_scope=scope, symmetric_key=key,
            **transport.sdk_kwargs(host), **kwargs)
    except ValueError as exc:  # the SDK rejects what we validated only for an unreadable CA
        raise InputError(f"{where}: {exc}") from None
    if payload is not None:
        client.provisioning_payload = payload  # sent as {"registrationId": ..., "payload": ...}
    ops: list = []
    throttled = {"count": 0}
    service_errors: list[dict] = []  # DPS's error bodies ({"errorCode", "message"}); the SDK drops them

    def instrument(stage) -> None:
        run_op, retry = stage._run_op, stage._process_retry_status_code

        def tracking_run_op(op):
            ops.append(op)
            if isinstance(op, ops_provisioning.RegisterOperation) and not getattr(op, "_flasher_printable", False):
                op._flasher_printable = True  # type: ignore[attr-defined]  # our mark on the SDK's object
                op.add_callback(_make_result_printable)  # runs before the SDK's own callbacks (LIFO)
            if isinstance(stage, stages.PollingStatusStage) and not throttled.get("assigning"):
                throttled["assigning"] = True
                phase("assigning")
            return run_op(op)

        def bounded_retry(error, original_op, response_op):
            retry_after = int(response_op.retry_after) if response_op.retry_after is not None else 2
            throttled["count"] += 1
            if throttled["count"] > throttle_retries or time.monotonic() + retry_after >= deadline:
                original_op.complete(error=_Throttled(throttled["count"] - 1, retry_after, response_op.status_code))
                return
            log.info("%s: DPS answered %s; retrying in %d s (%d/%d)", where, response_op.status_code, retry_after,
                     throttled["count"], throttle_retries)
            phase("throttled")
            retry(error, original_op, response_op)

        def sanitising_send_op_down(op):
            if isinstance(op, ops_base.RequestAndResponseOperation):
                op.add_callback(_integral_retry_after)  # runs before the stage's own response handler
                op.add_callback(lambda op, error: _keep_service_error(op, service_errors))
                if op.request_type == "register":   # DPS's first answer: the set-up is over, the slot counts
                    op.add_callback(lambda op, error: answered())
                    if on_answer is not None:
                        op.add_callback(lambda op, error: on_answer(op.status_code) if op.status_code else None)
            return send_op_down(op)

        send_op_down = stage.send_op_down
        stage._run_op = tracking_run_op
        stage._process_retry_status_code = bounded_retry
        stage.send_op_down = sanitising_send_op_down

    for stage in _stages(client._pipeline._pipeline):
        if isinstance(stage, (stages.RegistrationStage, stages.PollingStatusStage)):
            instrument(stage)
    threads = _track_paho_threads(client._pipeline._pipeline)

    try:
        outcome = _run_until(client.register, deadline, f"flasher-dps-{reg_id}", threads)
        if isinstance(outcome, _DeadlineReached):
            raise DpsError("timeout", f"{where}: no answer within {timeout:g} s")
        if isinstance(outcome, BaseException):
            raise _classify(outcome, where, throttle_retries, transport=transport, host=host,
                            service_error=service_errors[-1] if service_errors else None) from None
        if outcome is None or outcome.status != "assigned" or outcome.registration_state is None:
            status = getattr(outcome, "status", None)
            raise DpsError("disabled" if status == "disabled" else "failed", f"{where}: DPS answered status {status!r}")
        return outcome
    finally:
        _dispose_provisioning(client, ops, where)
        _join_all(threads, where)
        _SDK_GARBAGE.client_ended()


class _SdkGarbage:
    """Collects what the Azure SDK's clients leave to Python's cycle collector before it crowds select()'s range.

    Each client leaves paho's wake-up socket pair (two descriptors) in a reference cycle,
    freed only by a full collection, which a big run may not get for minutes. paho waits
    with select(), which takes descriptors below 1024 only: 256 boards' leftovers push
    the next connections above it, and those hang until their deadline. So after every
    ``every`` clients, if fewer than ``room`` descriptors below 1024 are free, collect
    (about 60 ms of CPU with 256 boards' objects, so only when it is needed).
    """

    def __init__(self, every: int = 32, room: int = 256):
        self.every, self.room = every, room
        self._lock = threading.Lock()
        self._ended = 0

    def client_ended(self) -> None:
        with self._lock:
            self._ended += 1
            if self._ended < self.every:
                return
            self._ended = 0
        if _free_below_select() < self.room:
            gc.collect()


def _free_below_select() -> int:
    """How many descriptor numbers below 1024 are free (0 where /proc cannot tell: then always collect)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return 0
    return SELECT_LIMIT - sum(1 for n in names if n.isdigit() and int(n) < SELECT_LIMIT)


_SDK_GARBAGE = _SdkGarbage()


def _keep_service_error(op, into: list[dict]) -> None:
    """Keep an error answer's body: its errorCode says more than the status (400012: a body DPS cannot read)."""
    import json

    status = getattr(op, "status_code", None)
    if status is None or status < 300 or not getattr(op, "response_body", None):
        return
    try:
        body = json.loads(op.response_body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, AttributeError):
        return
    if isinstance(body, dict):
        into.append({"status": status, "errorCode": body.get("errorCode"), "message": body.get("message")})


def _integral_retry_after(op, error) -> None:
    """The SDK parses retry-after with ``int()`` inside a callback: a "1.5" would stall registration."""
    ra = getattr(op, "retry_after", None)
    if ra is not None and not str(ra).isdigit():
        try:
            op.retry_after = str(max(1, math.ceil(float(ra))))
        except (ValueError, OverflowError):
            op.retry_after = None  # the SDK's default interval (2 s)


def _make_result_printable(op, error) -> None:
    """The SDK formats the result into a debug line (even when not logging) and ``str()`` fails on a
    missing ``substatus``, ``assignedHub`` or ``deviceId``: register() would then never return."""
    state = getattr(getattr(op, "registration_result", None), "registration_state", None)
    if state is not None:
        for name in ("_device_id", "_assigned_hub", "_sub_status"):
            if getattr(state, name, None) is None:
                setattr(state, name, "")


def _dispose_provisioning(client, ops: list, where: str) -> None:
    """Leave nothing behind: no timer, no pending op, no paho thread, no connection."""
    from azure.iot.device.common.evented_callback import EventedCallback
    from azure.iot.device.common.pipeline import pipeline_exceptions, pipeline_thread

    pipeline = client._pipeline

    timers: list[threading.Thread] = []

    @pipeline_thread.invoke_on_pipeline_thread_nowait
    def cancel_ops():
        timers.extend(_stage_timers(pipeline._pipeline))  # cancelled by the shutdown below
        for op in ops:
            for name in ("provisioning_timeout_timer", "polling_timer", "retry_after_timer"):
                timer = getattr(op, name, None)
                if timer is not None:
                    timer.cancel()
                    timers.append(timer)
                    setattr(op, name, None)
        for op in reversed(ops):  # workers first: completing one completes its parent
            if not (op.completed or op.completing):
                try:
                    op.complete(error=pipeline_exceptions.OperationCancelled("registration abandoned"))
                except pipeline_exceptions.OperationError as exc:
                    log.debug("%s: cancelling %s: %s", where, op.name, exc)
        _cancel_pending_connection(pipeline._pipeline)

    try:
        cancel_ops().result(_GRACE)
        if pipeline._running:
            done = EventedCallback()
            pipeline.shutdown(callback=done)
            if not done.completion_event.wait(_GRACE):
                log.warning("%s: the SDK did not finish shutting down the DPS client", where)
    except Exception as exc:  # cleanup must not mask the registration's own outcome
        log.warning("%s: closing the DPS client: %s", where, exc)
    _join_all(timers, where)  # a cancelled Timer's thread ends a moment later: wait for it


def _stage_timers(root) -> list[threading.Thread]:
    """Timer threads a pipeline's stages hold (SAS renewal alarm, reauthorisation and reconnect timers)."""
    found = []
    for stage in _stages(root):
        for name in ("_token_update_alarm", "_reauth_retry_timer", "reconnect_timer"):
            t = getattr(stage, name, None)
            if isinstance(t, threading.Thread):
                found.append(t)
    return found


def _cancel_pending_connection(root) -> None:
    from azure.iot.device.common.pipeline import pipeline_exceptions
    from azure.iot.device.common.pipeline.pipeline_stages_mqtt import MQTTTransportStage

    for stage in _stages(root):
        if isinstance(stage, MQTTTransportStage) and getattr(stage, "_pending_connection_op", None):
            stage._cancel_pending_connection_op(error=pipeline_exceptions.OperationCancelled("abandoned"))


def _run_until(fn: Callable[[], Any], deadline: float, name: str, threads: list | None = None) -> Any:
    """Run ``fn`` on a worker thread; its result, its exception, or _DeadlineReached.

    A thread still running at the deadline is appended to ``threads`` so that cleanup,
    which unblocks it, can then join it.
    """
    box: list = []

    def target():
        try:
            box.append(fn())
        except BaseException as exc:  # handed to the caller, which classifies it
            box.append(exc)

    t = threading.Thread(target=target, name=name, daemon=True)
    t.start()
    t.join(max(0.0, deadline - time.monotonic()))
    if t.is_alive():
        if threads is not None:
            threads.append(t)
        return _DeadlineReached()
    return box[0]


def _track_paho_threads(root) -> list[threading.Thread]:
    """Record every network thread paho starts for this pipeline.

    After a refused CONNACK or a dropped connection, the SDK stops paho's loop from
    inside paho's own thread and forgets it (``_thread = None``), so ``loop_stop`` can
    no longer join it; we keep our own references and join them during cleanup.
    """
    from azure.iot.device.common.pipeline.pipeline_stages_mqtt import MQTTTransportStage

    started: list[threading.Thread] = []
    for stage in _stages(root):
        transport = getattr(stage, "transport", None)
        if isinstance(stage, MQTTTransportStage) and transport is not None:
            paho = transport._mqtt_client
            loop_start = paho.loop_start

            def tracking_loop_start(paho=paho, loop_start=loop_start):
                rc = loop_start()
                if paho._thread is not None:
                    started.append(paho._thread)
                return rc

            paho.loop_start = tracking_loop_start
    return started


def _join_all(threads: list[threading.Thread], where: str) -> None:
    end = time.monotonic() + _GRACE
    for t in threads:
        finished = getattr(t, "finished", None)  # Timer/Alarm: join only once cancelled
        if finished is not None and not finished.is_set():
            log.warning("%s: an SDK timer was not cancelled", where)
            continue
        if t is not threading.current_thread():
            t.join(max(0.0, end - time.monotonic()))
            if t.is_alive():
                log.warning("%s: SDK thread %s still running after cleanup", where, t.name)


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        out.append(link)
        link = link.__cause__ or link.__context__
    return out


def _classify(exc: BaseException, where: str, throttle_retries: int = 0, hub: bool = False, *,
              transport: Transport = DIRECT, host: str = "", service_error: dict | None = None) -> DpsError:
    import socket
    import ssl

    chain = _chain(exc)
    names = {type(e).__name__ for e in chain}
    text = " | ".join(str(e) for e in chain)
    for e in chain:
        if isinstance(e, _Throttled):
            ra = f" (retry-after {e.retry_after} s)" if e.retry_after is not None else ""
            what = "throttled by DPS (429)" if e.status == 429 else f"DPS answered {e.status} (server error)"
            return DpsError("throttled", f"{where}: {what}{ra}; gave up after {e.retries} retries", status=e.status,
                            retry_after=e.retry_after)
        if isinstance(e, DpsError):
            return e
    proxy_error = _classify_proxy(chain, where, transport, host)
    if proxy_error is not None:
        return proxy_error
    m = re.search(r"status code (\d{3})", text)
    code = int(m.group(1)) if m else None
    detail = ""
    if service_error and service_error.get("status") == code and service_error.get("errorCode"):
        detail = f" (errorCode {service_error['errorCode']}: {service_error.get('message') or 'no message'})"
    if "invalid registration status disabled" in text:
        return DpsError("disabled", f"{where}: the enrollment is disabled")
    if code in (401, 403):
        return DpsError("unauthorized", f"{where}: DPS refused the credentials ({code}): wrong device key, "
                                        "ID scope or registration id, or the token expired")
    if code == 404:
        return DpsError("not_found", f"{where}: DPS answered 404 (not found)")
    if code == 429 or (code and code >= 500):
        return DpsError("throttled", f"{where}: DPS answered {code}")
    if code == 400:
        return DpsError("bad_request", f"{where}: DPS refused the request as malformed (400){detail}")
    if code is not None:
        return DpsError("failed", f"{where}: DPS answered {code}{detail}")
    if "failed registration status" in text:
        return DpsError("failed", f"{where}: DPS could not assign the device (status 'failed')")
    if "Operation timed out before provisioning service could respond" in text:
        return DpsError("timeout", f"{where}: DPS did not answer a request within 30 s")
    if any(isinstance(e, ssl.SSLError) for e in chain) or "TlsExchangeAuthError" in names:
        reason = next((e.verify_message for e in chain if isinstance(e, ssl.SSLCertVerificationError)), None)
        reason = reason or next((getattr(e, "reason", None) or str(e) for e in chain if isinstance(e, ssl.SSLError)),
                                "handshake failed")
        return DpsError("tls", f"{where}: TLS failed ({reason}); check the host name, or --ca-cert for a private root of trust")
    if any(isinstance(e, socket.gaierror) for e in chain):
        return DpsError("unreachable", f"{where}: cannot resolve the host name")
    if "WebsocketConnectionError" in names:
        why = next(str(e) for e in chain if type(e).__name__ == "WebsocketConnectionError")
        return DpsError("unreachable", f"{where}: no MQTT over WebSockets on port 443 ({why})")
    if "broker unavailable" in text:
        if hub:
            return DpsError("hub_refused", f"{where}: the hub refused the connection (server unavailable)")
        return DpsError("not_found", f"{where}: DPS refused the connection (server unavailable): is the ID scope right?")
    if "UnauthorizedError" in names or "CredentialError" in names or "not authori" in text.lower():
        if hub:
            return DpsError("hub_refused", f"{where}: the hub refused the device's credentials")
        return DpsError("unauthorized", f"{where}: DPS refused the credentials at connect")
    sockerr = next((e for e in chain if isinstance(e, OSError)), None)
    if sockerr is not None or "ConnectionFailedError" in names or "ConnectionDroppedError" in names:
        why = (sockerr.strerror or str(sockerr)) if sockerr is not None else "connection failed or dropped"
        hint = ""
        if not transport.websockets and (isinstance(sockerr, (ConnectionRefusedError, TimeoutError))):
            hint = "; if a firewall blocks 8883, try --websockets (MQTT over WebSockets on port 443)"
        return DpsError("unreachable", f"{where}: cannot connect on {transport.describe(host)} ({why}){hint}")
    if "OperationTimeout" in names:
        return DpsError("timeout", f"{where}: the SDK timed out")
    meaningful = next((str(e) for e in reversed(chain) if str(e) and str(e) != "Unexpected failure"), type(chain[-1]).__name__)
    return DpsError("failed", f"{where}: {meaningful}")


def _classify_proxy(chain: list[BaseException], where: str, transport: Transport, host: str) -> DpsError | None:
    """A failure of the proxy (PySocks' ProxyError) as one line that names the proxy, never its password."""
    try:
        import socks
    except ImportError:  # no PySocks, no proxy: nothing to classify
        return None
    err = next((e for e in chain if isinstance(e, socks.ProxyError)), None)
    proxy = transport.proxy_for(host) if host else transport.proxy
    if err is None or proxy is None:
        return None
    while isinstance(getattr(err, "socket_err", None), socks.ProxyError):  # PySocks wraps its own HTTPError
        err = err.socket_err  # type: ignore[union-attr]
    target = f"{host}:{transport.port}"
    message = str(getattr(err, "msg", None) or err).split("\n")[0]
    hint = "; proxies often allow only port 443: try --websockets" if not transport.websockets else ""
    if isinstance(err, socks.HTTPError):
        status, _, reason = message.partition(": ")
        if status in ("407", "401"):  # 407 is the standard answer; tinyproxy, for one, answers 401
            answer = f"{status} {reason or 'Proxy Authentication Required'}"
            if proxy.username:
                return DpsError("proxy", f"{where}: proxy {proxy} refused the user name or password ({answer})")
            return DpsError("proxy", f"{where}: proxy {proxy} wants a user name and password ({answer}): put the user "
                                     f"in the URL (http://USER@host:port) and the password in --proxy-password-file "
                                     f"or $FLASHER_PROXY_PASSWORD")
        return DpsError("proxy", f"{where}: proxy {proxy} refused the tunnel to {target} ({status} {reason}){hint}")
    if isinstance(err, socks.SOCKS5AuthError):
        return DpsError("proxy", f"{where}: proxy {proxy} refused the user name or password ({message})")
    if isinstance(err, socks.SOCKS5Error):
        return DpsError("proxy", f"{where}: proxy {proxy} could not open the tunnel to {target} ({message}){hint}")
    if isinstance(err, socks.ProxyConnectionError):
        cause = getattr(err, "socket_err", None)
        why = (getattr(cause, "strerror", None) or str(cause)) if cause is not None else message
        return DpsError("proxy", f"{where}: cannot reach proxy {proxy} ({why})")
    cause = getattr(err, "socket_err", None)
    why = (getattr(cause, "strerror", None) or str(cause)) if cause is not None else message
    return DpsError("proxy", f"{where}: proxy {proxy} failed while opening the tunnel to {target} "
                             f"({why.splitlines()[0] if why else 'no reason given'})")


# --- proof: connect to the hub and send one message -----------------------------------

def send_test_message(device_id: str, assigned_hub: str, device_key: str, *, ca_cert: CaCert | str | Path | None = None,
                      timeout: float = DEFAULT_TIMEOUT, message: str = "TestMessage",
                      on_phase: Callable[[str], None] | None = None, transport: Transport = DIRECT,
                      model_id: str | None = None, governor: RateGovernor | None = None) -> dict[str, float]:
    """Connect to the hub as ``device_id`` (after a registration) and send ``message``.

    ``transport`` is the same as the registration's; ``model_id`` is announced in the
    connection, as IoT Plug and Play devices do. ``governor`` paces new hub connections
    (``--hub-rate``; waiting for it is not counted against ``timeout``). Returns the
    timings of the "connect" and "message" phases; raises :class:`DpsError` ("hub_refused", "unreachable", "tls",
    "proxy", "timeout", "failed") or :class:`InputError`.
    """
    from flasher.keys import decode_symmetric_key
    from flasher.secrets import Redactor

    if not device_id or not assigned_hub:
        raise InputError(f"device {device_id!r} at hub {assigned_hub!r}: both are needed (register first)")
    decode_symmetric_key(device_key, f"device key for {device_id!r}")
    Redactor.add(device_key)
    if not (0 < timeout < math.inf):
        raise InputError(f"timeout {timeout}: must be a positive number of seconds")
    pem = _pem(ca_cert)
    timings: dict[str, float] = {}
    _prove(device_id, device_key, device_id, assigned_hub, pem, message, time.monotonic() + timeout, timeout,
           on_phase or (lambda _p: None), timings, transport, model_id, governor)
    return timings


def _prove(reg_id, key, device_id, hub, pem, text, deadline, timeout, phase, timings, transport=DIRECT,
           model_id=None, governor: RateGovernor | None = None) -> None:
    from azure.iot.device import IoTHubDeviceClient, Message

    where = f"device {device_id!r} at hub {hub}"
    slot = None
    if governor is not None:   # the hub's limit on new connections; the wait for it is not the device's time
        queued = time.monotonic()   # no stop: this device is registered, and a stopping run lets it finish
        slot = governor.acquire()
        deadline += time.monotonic() - queued
    kwargs = {"server_verification_cert": pem} if pem else {}
    if model_id:
        kwargs["product_info"] = model_id  # the SDK announces a "dtmi:..." product_info as the PnP model-id
    entry = _CONNECTING.enter()   # until the message is sent: see _provision
    try:
        client = IoTHubDeviceClient.create_from_symmetric_key(symmetric_key=key, hostname=hub, device_id=device_id,
                                                              connection_retry=False, **transport.sdk_kwargs(hub),
                                                              **kwargs)
    except BaseException:
        entry.leave()
        if slot is not None:
            slot.refused()
        raise
    threads = _track_paho_threads(client._mqtt_pipeline._pipeline)
    try:
        t0 = time.monotonic()
        phase("connect")
        outcome = _run_until(client.connect, deadline, f"flasher-hub-{device_id}", threads)
        try:
            _raise_for(outcome, where, timeout, transport, hub)
        except DpsError as exc:
            if slot is not None and exc.kind not in _NOT_REACHED:
                slot.answered()   # the hub answered: it counts against its limit, as at DPS
            raise
        if slot is not None:
            slot.answered()
        timings["connect"] = time.monotonic() - t0
        t0 = time.monotonic()
        phase("message")
        msg = Message(text)
        msg.content_type, msg.content_encoding = "text/plain", "utf-8"
        outcome = _run_until(lambda: client.send_message(msg), deadline, f"flasher-msg-{device_id}", threads)
        _raise_for(outcome, where, timeout, transport, hub)
        timings["message"] = time.monotonic() - t0
    finally:
        entry.leave()
        if slot is not None:
            slot.refused()   # no answer came (a deadline): no place held; after an answer, this does nothing
        _dispose_hub(client, where)
        _SDK_GARBAGE.client_ended()
        _join_all(threads, where)


def _raise_for(outcome, where: str, timeout: float, transport: Transport = DIRECT, host: str = "") -> None:
    if isinstance(outcome, _DeadlineReached):
        raise DpsError("timeout", f"{where}: no answer within {timeout:g} s")
    if isinstance(outcome, BaseException):
        raise _classify(outcome, where, hub=True, transport=transport, host=host) from None


def _dispose_hub(client, where: str) -> None:
    from azure.iot.device.common.pipeline import pipeline_thread

    root = client._mqtt_pipeline._pipeline

    def cancel_pending():
        _cancel_pending_connection(root)
        return _stage_timers(root)

    timers: list[threading.Thread] = []
    try:
        timers = pipeline_thread.invoke_on_pipeline_thread_nowait(cancel_pending)().result(_GRACE)
        outcome = _run_until(client.shutdown, time.monotonic() + _GRACE, "flasher-hub-shutdown")
        if isinstance(outcome, BaseException):
            log.debug("%s: shutdown: %s", where, outcome)
    except Exception as exc:  # cleanup must not mask the outcome
        log.warning("%s: closing the hub client: %s", where, exc)
    _join_all(timers, where)
