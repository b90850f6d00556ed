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

The SDK's process-wide "pipeline" and "callback" worker threads are shared by every
client and live as long as the process: they are not leaks.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flasher.errors import FlasherError, InputError
from flasher.identity import validate_host, validate_id_scope

log = logging.getLogger("flasher.dps")

DEFAULT_DPS_HOST = "global.azure-devices-provisioning.net"
DEFAULT_TIMEOUT = 60.0
DEFAULT_THROTTLE_RETRIES = 5
ERROR_KINDS = frozenset({"unauthorized", "not_found", "disabled", "throttled", "unreachable", "tls", "timeout",
                         "hub_refused", "failed"})
PHASES = ("register", "assigning", "throttled", "connect", "message")
_GRACE = 10.0  # how long cleanup may take after the deadline before we stop waiting for the SDK


class DpsError(FlasherError):
    """A registration or hub step failed; ``kind`` is one of :data:`ERROR_KINDS`."""

    def __init__(self, kind: str, message: str):
        assert kind in ERROR_KINDS, kind
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Registration:
    registration_id: str
    device_id: str
    assigned_hub: str
    status: str
    substatus: str | None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase: register, connect, message

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
                    throttle_retries: int = DEFAULT_THROTTLE_RETRIES) -> Registration:
    """Register ``registration_id`` with DPS, then (unless ``test_message`` is None) send it from the hub.

    ``device_key`` is the device's base64 key (group-derived or the individual
    enrollment's). ``ca_cert`` is the path of a PEM root of trust (an emulator, a
    gateway). ``timeout`` bounds the whole call. ``on_phase`` is called with one of
    :data:`PHASES` as each starts ("throttled" each time DPS answers 429 and we wait).
    Raises :class:`DpsError` (one-line message naming the id and host) or
    :class:`InputError` for bad arguments. Every SDK client is closed on every path.
    """
    from flasher.identity import validate_registration_id
    from flasher.keys import decode_symmetric_key
    from flasher.secrets import Redactor

    reg_id = validate_registration_id(registration_id)
    decode_symmetric_key(device_key, f"device key for {reg_id!r}")
    Redactor.add(device_key)
    scope = validate_id_scope(id_scope)
    host = validate_host(dps_host)
    if not (0 < timeout < math.inf):
        raise InputError(f"timeout {timeout}: must be a positive number of seconds")
    pem = _pem(ca_cert)
    phase = on_phase or (lambda _p: None)
    deadline = time.monotonic() + timeout
    timings: dict[str, float] = {}

    t0 = time.monotonic()
    phase("register")
    result = _provision(reg_id, device_key, scope, host, pem, deadline, timeout, phase, throttle_retries)
    timings["register"] = time.monotonic() - t0
    state = result.registration_state
    hub, device_id, substatus = state.assigned_hub, state.device_id, state.sub_status or None
    if not hub or not device_id:
        raise DpsError("failed", f"registration {reg_id!r} at {host}: DPS answered {result.status!r} without a hub or device id")
    log.info("registration %r: assigned to %s as %r (%s)", reg_id, hub, device_id, substatus)
    if test_message is not None:
        _prove(reg_id, device_key, device_id, hub, pem, test_message, deadline, timeout, phase, timings)
    return Registration(reg_id, device_id, hub, result.status, substatus, timings)


def register_many(keys: Mapping[str, str], *, concurrency: int = 8,
                  on_phase: Callable[[str, str], None] | None = None, **kwargs) -> Iterator[tuple[str, Registration | DpsError]]:
    """Register every ``registration id -> device key`` at once, at most ``concurrency`` in flight.

    Yields ``(registration_id, Registration or DpsError)`` as each finishes, so one refusal
    never hides the others; ``kwargs`` go to :func:`register_device`.
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    def one(reg_id: str) -> Registration:
        phase = (lambda p: on_phase(reg_id, p)) if on_phase else None
        return register_device(reg_id, keys[reg_id], on_phase=phase, **kwargs)

    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(keys))), thread_name_prefix="flasher-register") as pool:
        futures = {pool.submit(one, r): r for r in keys}
        try:
            for fut in as_completed(futures):
                try:
                    yield futures[fut], fut.result()
                except DpsError as exc:
                    yield futures[fut], exc
        finally:
            for fut in futures:
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


def _provision(reg_id, key, scope, host, pem, deadline, timeout, phase, throttle_retries):
    from azure.iot.device import ProvisioningDeviceClient
    from azure.iot.device.common.pipeline import pipeline_ops_base as ops_base
    from azure.iot.device.provisioning.pipeline import pipeline_ops_provisioning as ops_provisioning
    from azure.iot.device.provisioning.pipeline import pipeline_stages_provisioning as stages

    where = f"registration {reg_id!r} at {host}"
    kwargs = {"server_verification_cert": pem} if pem else {}
    try:
        client = ProvisioningDeviceClient.create_from_symmetric_key(
            provisioning_host=host, registration_id=reg_id, id_scope=scope, symmetric_key=key, **kwargs)
    except ValueError as exc:  # the SDK rejects what we validated only for an unreadable CA
        raise InputError(f"{where}: {exc}") from None
    ops: list = []
    throttled = {"count": 0}

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
            raise _classify(outcome, where, throttle_retries) from None
        if outcome is None or outcome.status != "assigned" or outcome.registration_state is None:
            status = getattr(outcome, "status", None)
            raise DpsError("disabled" if status == "disabled" else "failed", f"{where}: DPS answered status {status!r}")
        return outcome
    finally:
        _dispose_provisioning(client, ops, where)
        _join_all(threads, where)


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


def _classify(exc: BaseException, where: str, throttle_retries: int = 0, hub: bool = False) -> DpsError:
    import socket
    import ssl

    chain = _chain(exc)
    names = {type(e).__name__ for e in chain}
    text = " | ".join(str(e) for e in chain)
    for e in chain:
        if isinstance(e, _Throttled):
            ra = f" (retry-after {e.retry_after} s)" if e.retry_after is not None else ""
            what = "throttled by DPS (429)" if e.status == 429 else f"DPS answered {e.status} (server error)"
            return DpsError("throttled", f"{where}: {what}{ra}; gave up after {e.retries} retries")
        if isinstance(e, DpsError):
            return e
    m = re.search(r"status code (\d{3})", text)
    code = int(m.group(1)) if m else None
    if "invalid registration status disabled" in text:
        return DpsError("disabled", f"{where}: the enrollment is disabled")
    if code in (401, 403):
        return DpsError("unauthorized", f"{where}: DPS refused the credentials ({code}): wrong device key, "
                                        "ID scope or registration id, or the token expired")
    if code == 404:
        return DpsError("not_found", f"{where}: DPS answered 404 (not found)")
    if code == 429 or (code and code >= 500):
        return DpsError("throttled", f"{where}: DPS answered {code}")
    if code is not None:
        return DpsError("failed", f"{where}: DPS answered {code}")
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
        return DpsError("unreachable", f"{where}: cannot connect on port 8883 ({why})")
    if "OperationTimeout" in names:
        return DpsError("timeout", f"{where}: the SDK timed out")
    meaningful = next((str(e) for e in reversed(chain) if str(e) and str(e) != "Unexpected failure"), type(chain[-1]).__name__)
    return DpsError("failed", f"{where}: {meaningful}")


# --- proof: connect to the hub and send one message -----------------------------------

def send_test_message(device_id: str, assigned_hub: str, device_key: str, *, ca_cert: CaCert | str | Path | None = None,
                      timeout: float = DEFAULT_TIMEOUT, message: str = "TestMessage",
                      on_phase: Callable[[str], None] | None = None) -> dict[str, float]:
    """Connect to the hub as ``device_id`` (after a registration) and send ``message``.

    Returns the timings of the "connect" and "message" phases; raises :class:`DpsError`
    ("hub_refused", "unreachable", "tls", "timeout", "failed") or :class:`InputError`.
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
           on_phase or (lambda _p: None), timings)
    return timings


def _prove(reg_id, key, device_id, hub, pem, text, deadline, timeout, phase, timings) -> None:
    from azure.iot.device import IoTHubDeviceClient, Message

    where = f"device {device_id!r} at hub {hub}"
    kwargs = {"server_verification_cert": pem} if pem else {}
    client = IoTHubDeviceClient.create_from_symmetric_key(symmetric_key=key, hostname=hub, device_id=device_id,
                                                          connection_retry=False, **kwargs)
    threads = _track_paho_threads(client._mqtt_pipeline._pipeline)
    try:
        t0 = time.monotonic()
        phase("connect")
        outcome = _run_until(client.connect, deadline, f"flasher-hub-{device_id}", threads)
        _raise_for(outcome, where, timeout)
        timings["connect"] = time.monotonic() - t0
        t0 = time.monotonic()
        phase("message")
        msg = Message(text)
        msg.content_type, msg.content_encoding = "text/plain", "utf-8"
        outcome = _run_until(lambda: client.send_message(msg), deadline, f"flasher-msg-{device_id}", threads)
        _raise_for(outcome, where, timeout)
        timings["message"] = time.monotonic() - t0
    finally:
        _dispose_hub(client, where)
        _join_all(threads, where)


def _raise_for(outcome, where: str, timeout: float) -> None:
    if isinstance(outcome, _DeadlineReached):
        raise DpsError("timeout", f"{where}: no answer within {timeout:g} s")
    if isinstance(outcome, BaseException):
        raise _classify(outcome, where, hub=True) from None


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
