"""One board, one step at a time: identify → derive → render → program → upload → register → message.

This is the only module that knows the order. Every step is recorded in the
ledger as it starts and ends, and every step is safe to run again, so a board
interrupted anywhere (unplug, crash, kill, DPS refusal) resumes where it stopped.
Many boards run concurrently, each in its own thread: the AT phases are short,
the DPS registrations take seconds each and overlap.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from flasher.errors import FlasherError, InputError
from flasher.eui import EUI64
from flasher.identity import RegistrationIdPolicy
from flasher.keys import derive_device_key
from flasher.ledger import Ledger

log = logging.getLogger("flasher.pipeline")

IDENTIFY = "identify"


@dataclass(frozen=True)
class Upload:
    sketch: str
    fqbn: str
    arduino_cli: str | None = None


@dataclass(frozen=True)
class Settings:
    """Everything a board run needs; secrets are held here only in memory."""

    id_scope: str
    group_key: bytes
    dps_host: str = "global.azure-devices-provisioning.net"
    ca_cert: str | None = None
    template: str = "seeed-lorawan"
    band: str = "EU868"
    join_eui: EUI64 = EUI64(bytes(8))
    app_key_policy: str = "random"          # random | derived | given
    app_key: bytes | None = None            # for "given"
    master_secret: bytes | None = None      # for "derived"
    out_dir: Path = Path("headers")
    id_policy: RegistrationIdPolicy = RegistrationIdPolicy()
    timeout: float = 60.0                   # DPS, per board
    at_timeout: float = 2.0                 # per AT command
    test_message: str | None = "TestMessage"
    upload: Upload | None = None
    force: bool = False
    extras: dict = field(default_factory=dict)

    def fingerprint(self) -> dict:
        """What a finished step depends on: if it changed, earlier work is stale."""
        return {"join_eui": self.join_eui.hex, "band": self.band, "id_scope": self.id_scope,
                "app_key_source": self.app_key_policy}


@dataclass
class BoardResult:
    port: str
    deveui: str | None = None
    registration_id: str | None = None
    status: str = "failed"                 # provisioned | already_provisioned | failed
    assigned_hub: str | None = None
    device_id: str | None = None
    header: str | None = None
    error: str | None = None
    failed_step: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("provisioned", "already_provisioned")

    def to_dict(self) -> dict:
        return {"port": self.port, "deveui": self.deveui, "registration_id": self.registration_id,
                "status": self.status, "assigned_hub": self.assigned_hub, "device_id": self.device_id,
                "header": self.header, "error": self.error, "failed_step": self.failed_step,
                "seconds": round(self.seconds, 3)}


# (port, deveui or None, step, state: running|ok|skipped|failed, detail)
Progress = Callable[[str, str | None, str, str, str], None]


def _quiet(*_args) -> None:
    pass


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


class _Run:
    """The state of one board's run; methods are the steps."""

    def __init__(self, port: str, settings: Settings, ledger: Ledger, progress: Progress,
                 stop: threading.Event | None = None):
        self.port, self.s, self.ledger, self.progress = port, settings, ledger, progress
        self.stop = stop or threading.Event()
        self.result = BoardResult(port=port)
        self.step = IDENTIFY
        self.device_key: str | None = None

    def _emit(self, state: str, detail: str = "") -> None:
        self.progress(self.port, self.result.deveui, self.step, state, detail)

    def _record(self, step: str, fn, *, done: bool, **kwargs):
        """Run ``fn`` as ``step`` unless the ledger says it is done; record the outcome."""
        self.step = step
        eui = self.result.deveui
        if self.stop.is_set():
            raise FlasherError(f"interrupted before {step}; rerun to resume here")
        if done:
            self._emit("skipped", "done earlier")
            return None
        self._emit("running")
        self.ledger.step_started(eui, step)
        t0 = time.monotonic()
        value, fields, detail = fn(**kwargs)
        self.ledger.step_finished(eui, step, "ok", detail, **fields)
        self._emit("ok", f"{time.monotonic() - t0:.1f} s" + (f" {detail}" if detail else ""))
        return value

    def run(self) -> BoardResult:
        from flasher.rhf76 import open_module

        s, t0 = self.s, time.monotonic()
        try:
            self._emit("running")
            with open_module(self.port, timeout=s.at_timeout) as module:
                ids = module.read_ids()
                dev_eui = ids.dev_eui
                self.result.deveui = dev_eui.hex
                self._emit("ok", dev_eui.hex)
                record = self._open_record(dev_eui)
                if record is None:
                    return self.result
                device_key = self._record("derive", self._derive, done=False)
                redo_module = not record.done("program") or not record.done("render")
                header = self._record("render", self._render, done=not redo_module, dev_eui=dev_eui, device_key=device_key,
                                      record=record)
                if header is None:
                    header = self._check_header(record)
                self._record("program", self._program, done=not redo_module, module=module, header=header)
            if s.upload is None:
                self.step = "upload"
                if not record.done("upload"):
                    self.ledger.step_finished(dev_eui.hex, "upload", "skipped", "--upload not given")
                self._emit("skipped", "--upload not given")
            else:
                self._record("upload", self._upload, done=record.done("upload"), header=header)
            reg = self._record("register", self._register, done=record.done("register"), device_key=device_key)
            if reg is None:
                self.result.assigned_hub, self.result.device_id = record.assigned_hub, record.device_id
            if s.test_message is None:
                self.step = "message"
                self.ledger.step_finished(dev_eui.hex, "message", "skipped", "--no-test-message")
                self._emit("skipped", "--no-test-message")
            else:
                self._record("message", self._message, done=record.done("message"), device_key=device_key)
            self.ledger.finish(dev_eui.hex)
            self.result.status = "provisioned"
            self.step = "done"
            self._emit("ok", f"{self.result.device_id} @ {self.result.assigned_hub}")
        except FlasherError as exc:
            self._fail(str(exc))
        except Exception as exc:  # a bug: still leave the ledger saying where it stopped, then re-raise
            self._fail(f"internal error: {exc.__class__.__name__}: {exc}")
            raise
        finally:
            self.result.seconds = time.monotonic() - t0
        return self.result

    def _fail(self, message: str) -> None:
        self.result.status, self.result.error, self.result.failed_step = "failed", message, self.step
        if self.result.deveui is not None and self.step != IDENTIFY:
            self.ledger.step_finished(self.result.deveui, self.step, "failed", message)
        self._emit("failed", message)

    # --- steps ----------------------------------------------------------------------
    def _open_record(self, dev_eui: EUI64):
        s = self.s
        reg_id = s.id_policy.for_eui(dev_eui)
        self.result.registration_id = reg_id
        # Derived once, here: the ledger's fingerprint needs it before the "derive" step is recorded.
        self.device_key = derive_device_key(s.group_key, reg_id)
        fingerprint = {**s.fingerprint(), "device_key_check": key_check(self.device_key)}
        existing = self.ledger.get(dev_eui.hex)
        if existing is not None and not s.force:
            stale = any(getattr(existing, k) not in (None, v) for k, v in fingerprint.items())
            if existing.status == "provisioned" and not stale:
                self.result.status = "already_provisioned"
                self.result.assigned_hub, self.result.device_id = existing.assigned_hub, existing.device_id
                self.result.header = existing.header_path
                self._emit("skipped", "already provisioned (use --force to redo)")
                return None
            if stale:
                log.info("%s: settings changed since the last attempt; starting over", dev_eui.hex)
                self.ledger.reset(dev_eui.hex)
        elif existing is not None:
            self.ledger.reset(dev_eui.hex)
        return self.ledger.begin(dev_eui.hex, reg_id, port=self.port, **fingerprint)

    def _derive(self):
        return self.device_key, {}, ""

    def _app_key(self, dev_eui: EUI64) -> bytes:
        """The one AppKey dispatcher `flasher header` uses too (it also registers the key with the log masker)."""
        from flasher.header import resolve_app_key

        s = self.s
        key, _ = resolve_app_key(dev_eui, app_key_text=s.app_key.hex() if s.app_key_policy == "given" else None,
                                 master_secret=s.master_secret if s.app_key_policy == "derived" else None,
                                 random=s.app_key_policy == "random")
        return key

    def _render(self, dev_eui: EUI64, device_key: str, record):
        from flasher.header import build_header_data, render_header, write_header

        s = self.s
        app_key = self._app_key(dev_eui)
        data = build_header_data(dev_eui=dev_eui, join_eui=s.join_eui, app_key=app_key, app_key_source=s.app_key_policy,
                                 band=s.band, id_scope=s.id_scope, registration_id=self.result.registration_id,
                                 device_key=device_key, extras=s.extras)
        path = Path(s.out_dir) / f"{dev_eui.hex}.h"
        digest = write_header(render_header(data, s.template), path)
        self.result.header = str(path)
        return (path, app_key), {"header_path": str(path), "header_sha256": digest}, str(path)

    def _check_header(self, record):
        """Module already programmed: the header on disk must still be the one that matches it."""
        path = Path(record.header_path)
        if _sha256(path) != record.header_sha256:
            raise FlasherError(f"header {str(path)!r} is missing or changed since the module was programmed; "
                               f"rerun with --force to provision this board again")
        self.result.header = str(path)
        return path, None

    def _program(self, module, header):
        _, app_key = header
        module.program(self.s.join_eui, app_key, band=self.s.band)
        return None, {}, f"JoinEUI {self.s.join_eui.hex}, {self.s.band}, OTAA"

    def _upload(self, header):
        """Build with the header and upload; the tty may change name, so follow the USB serial number."""
        from flasher.arduino import ArduinoCli, wait_for_serial_number
        from flasher.ports import find_boards

        path, _ = header
        up = self.s.upload
        serial_number = next((b.serial_number for b in find_boards() if b.device == self.port), None)
        ArduinoCli(up.arduino_cli, up.fqbn).build_and_upload(up.sketch, path, self.port)
        fields = {}
        if serial_number:
            self.port = wait_for_serial_number(serial_number)
            fields = {"port": self.port, "serial_number": serial_number}
        return None, fields, f"{up.fqbn} on {self.port}"

    def _register(self, device_key: str):
        from flasher import dps

        s = self.s
        reg = dps.register_device(self.result.registration_id, device_key, id_scope=s.id_scope, dps_host=s.dps_host,
                                  ca_cert=s.ca_cert, timeout=s.timeout, test_message=None,
                                  on_phase=lambda phase: self._emit("running", phase))
        self.result.assigned_hub, self.result.device_id = reg.assigned_hub, reg.device_id
        return reg, {"assigned_hub": reg.assigned_hub, "device_id": reg.device_id}, f"{reg.device_id}@{reg.assigned_hub}"

    def _message(self, device_key: str):
        from flasher import dps

        s, r = self.s, self.result
        dps.send_test_message(r.device_id, r.assigned_hub, device_key, ca_cert=s.ca_cert, timeout=s.timeout,
                              message=s.test_message)
        return None, {}, ""


def preflight(settings: Settings, ports: list[str]) -> None:
    """Refuse, before any board or file is touched, whatever would fail every board the same way."""
    import os

    from flasher.dps import read_ca_cert
    from flasher.header import build_header_data, render_header

    for port in ports:
        if "://" not in port and not os.path.exists(port):
            raise FlasherError(f"port {port!r}: no such device (unplugged? see 'flasher ports')")
    if settings.ca_cert is not None:
        read_ca_cert(settings.ca_cert)
    if settings.app_key_policy == "derived" and not settings.master_secret:
        raise InputError("AppKey source 'derived' needs a master secret")
    if settings.app_key_policy == "given" and not settings.app_key:
        raise InputError("AppKey source 'given' needs an AppKey")
    # A trial render with a placeholder board: a missing/broken template or bad --set fails here, once.
    sample = EUI64(bytes(8))
    render_header(build_header_data(sample, join_eui=settings.join_eui, app_key=bytes(16),
                                    app_key_source=settings.app_key_policy, band=settings.band,
                                    id_scope=settings.id_scope, registration_id=settings.id_policy.for_eui(sample),
                                    device_key=derive_device_key(settings.group_key, "preflight"),
                                    extras=settings.extras), settings.template)


def key_check(device_key: str) -> str:
    """A short one-way tag of a device key, so a resumed board notices the group key changed."""
    return hashlib.sha256(b"flasher-device-key-check\0" + device_key.encode()).hexdigest()[:16]


def provision_board(port: str, settings: Settings, ledger: Ledger, progress: Progress = _quiet,
                    stop: threading.Event | None = None) -> BoardResult:
    """Run one board through every step it has not finished; ``stop`` ends it at the next step boundary."""
    return _Run(port, settings, ledger, progress, stop).run()


def provision_boards(ports: list[str], settings: Settings, ledger: Ledger, progress: Progress = _quiet,
                     concurrency: int = 16) -> Iterator[BoardResult]:
    """Provision every port concurrently; yield each board's result as it finishes."""
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(ports))), thread_name_prefix="board") as pool:
        futures = [pool.submit(provision_board, p, settings, ledger, progress, stop) for p in ports]
        try:
            for fut in as_completed(futures):
                yield fut.result()
        finally:
            # Ctrl-C or an abandoned caller: boards stop at their next step boundary (a step under
            # way, such as a DPS registration, ends within its own timeout); queued ones never start.
            stop.set()
            for fut in futures:
                fut.cancel()
