"""One board, one step at a time; many boards at once.

The order of the steps is :data:`STEPS`, the one list the ledger, the progress
display, ``flasher status`` and the tests take step names from. Each step is an
object (see :class:`flasher.steps.Step`): whether it applies (and why not), whether
the ledger says it is done, and ``run(board)`` returning what to record. This
module is the recorder: it commits every step to the ledger as it starts and ends,
so a board interrupted anywhere (unplug, crash, kill, DPS refusal) resumes where it
stopped. Steps never talk to the ledger or the display themselves.

Many boards run concurrently, each in its own thread, by default every board given
(up to :data:`DEFAULT_CONCURRENCY`): the AT phases are short, the DPS registrations
take seconds each and overlap.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flasher.dps import DIRECT, SELECT_LIMIT, CaCert, Transport
from flasher.errors import FlasherError
from flasher.eui import EUI64
from flasher.governor import RateGovernor
from flasher.identity import RegistrationIdPolicy
from flasher.keys import AppKeyPlan, AppKeySource, key_check
from flasher.labels import LabelPlan
from flasher.ledger import BoardClaimed, BoardRecord, Ledger, LedgerError
from flasher.progress import DONE, BoardEvent, NullReporter, Reporter, StepState
from flasher.secrets import Secret
from flasher.states import BoardStatus, ResultStatus, StepOutcome
from flasher.steps import Conflict, Step
from flasher.steps.derive import Derive
from flasher.steps.identify import Identify
from flasher.steps.label import Label
from flasher.steps.message import Message
from flasher.steps.network import Network
from flasher.steps.program import Program
from flasher.steps.register import Register
from flasher.steps.render import Render
from flasher.steps.upload import Upload as UploadStep

if TYPE_CHECKING:
    from flasher.tts import TtsTarget

log = logging.getLogger("flasher.pipeline")

# The order every board goes through. Adding a step: a module in flasher/steps/ and one line here.
STEPS: list[Step] = [
    Identify(),
    Derive(),
    Render(),
    Program(),
    UploadStep(),
    Network(),
    Register(),
    Message(),
    Label(),
]


def step_names() -> list[str]:
    return [s.name for s in STEPS]


@dataclass(frozen=True)
class Upload:
    sketch: str
    fqbn: str
    arduino_cli: str | None = None
    builder: str = "arduino-cli"  # or "arduino-builder": offline, with the Seeed core in samd_core
    samd_core: str | None = None
    bossac: str | None = None


@dataclass(frozen=True)
class Settings:
    """Everything a board run needs, already parsed and checked; secrets only as :class:`Secret`."""

    id_scope: str
    group_key: Secret
    dps_host: str = "global.azure-devices-provisioning.net"
    ca_cert: CaCert | str | None = None
    template: str = "seeed-lorawan"
    band: str = "EU868"
    join_eui: EUI64 = EUI64(bytes(8))
    app_key: AppKeyPlan = AppKeyPlan(AppKeySource.RANDOM)
    out_dir: Path = Path("headers")
    id_policy: RegistrationIdPolicy = RegistrationIdPolicy()
    timeout: float = 60.0                   # DPS, per board
    at_timeout: float = 2.0                 # per AT command
    test_message: str | None = "TestMessage"
    upload: Upload | None = None
    tts: TtsTarget | None = None            # The Things Stack (--tts-app): the network step
    force: bool = False
    extras: dict = field(default_factory=dict)
    labels: LabelPlan | None = None         # --labels DIR: the label step writes there
    transport: Transport = DIRECT           # 8883 or 443 (WebSockets), directly or through a proxy
    dps_payload: dict | None = None         # the DPS registration payload ({"modelId": ...} for IoT Central)
    model_id: str | None = None             # also announced to the hub (IoT Plug and Play)
    other_group_key: Secret | None = None   # the group's other key, tried once after a 401 (--check-other-key)
    key_names: tuple[str, str] = ("primary", "secondary")  # what group_key and other_group_key are
    governor: RateGovernor | None = field(default=None, compare=False)  # the run's DPS pace (--dps-rate); shared
    hub_governor: RateGovernor | None = field(default=None, compare=False)  # its hub connections' (--hub-rate)

    def __post_init__(self) -> None:
        if not isinstance(self.group_key, Secret):
            object.__setattr__(self, "group_key", Secret(self.group_key, "group key"))
        if isinstance(self.ca_cert, (str, Path)):
            from flasher.dps import load_ca_cert

            object.__setattr__(self, "ca_cert", load_ca_cert(self.ca_cert))
        object.__setattr__(self, "out_dir", Path(self.out_dir))

    def fingerprint(self) -> dict[str, str | None]:
        """What a finished board depends on: if one of these changed, the board was provisioned otherwise."""
        from flasher.payload import canonical

        fingerprint = {"join_eui": self.join_eui.hex, "band": self.band, "id_scope": self.id_scope,
                       "app_key_source": str(self.app_key.source), "dps_payload": canonical(self.dps_payload)}
        if self.tts is not None:
            fingerprint["tts_app"] = self.tts.app
        return fingerprint


# Fingerprint fields whose empty value is a setting too ("no payload was sent"), not "not recorded":
# a ledger from before the column existed only holds boards that sent no payload.
EXACT_FINGERPRINT = frozenset({"dps_payload"})


@dataclass
class BoardResult:
    port: str
    deveui: str | None = None
    registration_id: str | None = None
    status: ResultStatus = ResultStatus.FAILED
    assigned_hub: str | None = None
    device_id: str | None = None
    header: str | None = None
    error: str | None = None
    failed_step: str | None = None
    seconds: float = 0.0
    tts_device_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in (ResultStatus.PROVISIONED, ResultStatus.ALREADY_PROVISIONED)

    def to_dict(self) -> dict:
        return {"port": self.port, "deveui": self.deveui, "registration_id": self.registration_id,
                "status": str(self.status), "assigned_hub": self.assigned_hub, "device_id": self.device_id,
                "header": self.header, "error": self.error, "failed_step": self.failed_step,
                "seconds": round(self.seconds, 3), "tts_device_id": self.tts_device_id}


@dataclass
class Board:
    """What one board's steps share. Each step reads what earlier ones left and adds its own."""

    port: str
    settings: Settings
    reporter: Reporter = field(default_factory=NullReporter)
    stop: threading.Event = field(default_factory=threading.Event)
    step: str = "identify"
    module: Any = None                      # the open RHF76, while steps that need it run
    serial_number: str | None = None        # USB serial number, to follow the board through re-enumeration
    dev_eui: EUI64 | None = None
    registration_id: str | None = None
    device_key: Secret | None = None
    record: BoardRecord | None = None       # the ledger's row as this run found it
    app_key: Secret | None = None
    header_path: Path | None = None
    assigned_hub: str | None = None
    device_id: str | None = None
    tts_device_id: str | None = None        # the end device id in The Things Stack
    checkpoint: Callable[[dict], None] = field(default=lambda fields: None, repr=False)
    # ^ a running step reports progress worth keeping if it is interrupted (the recorder writes it to the ledger)

    @property
    def deveui(self) -> str | None:
        return self.dev_eui.hex if self.dev_eui is not None else None

    @property
    def key(self) -> str:
        """The DevEUI the ledger keys this board by (known once identify ran)."""
        assert self.dev_eui is not None, "no ledger row before identify"
        return self.dev_eui.hex

    def phase(self, detail: str) -> None:
        """A running step says what it is waiting for (shown live, not recorded)."""
        self.reporter.emit(BoardEvent(self.port, self.deveui, self.step, StepState.RUNNING, detail))

    def done_earlier(self, step: str) -> bool:
        return self.record is not None and self.record.done(step)


class _Stopped(FlasherError):
    pass


class _Recorder:
    """Runs one board through :data:`STEPS`, committing each step to the ledger."""

    def __init__(self, board: Board, ledger: Ledger):
        self.b, self.ledger = board, ledger
        self.result = BoardResult(port=board.port)
        self.early: list[tuple[str, str]] = []   # steps run before the board was claimed: (name, detail)
        self.claimed = False

    def emit(self, state: StepState, detail: str = "", step: str | None = None) -> None:
        b = self.b
        b.reporter.emit(BoardEvent(b.port, b.deveui, step or b.step, state, detail))

    def run(self) -> BoardResult:
        b, t0 = self.b, time.monotonic()
        try:
            with ExitStack() as module_scope:
                for step in STEPS:
                    b.step = step.name
                    if b.stop.is_set():
                        raise _Stopped(f"interrupted before {step.name}; rerun to resume here")
                    if not step.before_claim and b.record is None and not self._open_record():
                        return self.result
                    self._run_step(step, module_scope)
            self.ledger.finish(b.key)
            self.result.status = ResultStatus.PROVISIONED
            self._fill_result()
            b.step = DONE
            self.emit(StepState.OK, f"{b.device_id} @ {b.assigned_hub}")
        except BoardClaimed as exc:
            self.result.status, self.result.error, self.result.failed_step = ResultStatus.BUSY, str(exc), b.step
            self.emit(StepState.SKIPPED, str(exc))
        except Conflict as exc:
            self._conflict(str(exc))
        except FlasherError as exc:
            self._fail(str(exc))
        except BaseException as exc:  # a bug or Ctrl-C: still leave the ledger saying where it stopped
            what = "interrupted" if isinstance(exc, KeyboardInterrupt) else \
                f"internal error: {exc.__class__.__name__}: {exc}"
            self._fail(what)
            raise
        finally:
            self.result.seconds = time.monotonic() - t0
            if self.claimed:
                try:
                    self.ledger.release(b.key)
                except LedgerError as exc:  # close() releases what is left; the board's outcome stands
                    if str(exc) not in (self.result.error or ""):  # else the board's error says it already
                        log.warning("%s: claim not released: %s", b.key, exc)
        return self.result

    def _run_step(self, step: Step, module_scope: ExitStack) -> None:
        b = self.b
        reason = step.skip_reason(b)
        if reason is not None:
            if b.record is not None and b.record.steps.get(step.name) != StepOutcome.SKIPPED:
                self.ledger.step_finished(b.key, step.name, StepOutcome.SKIPPED, reason)
            self.emit(StepState.SKIPPED, reason)
            return
        if not step.before_claim and step.done(b):
            step.resume(b)
            self.emit(StepState.SKIPPED, "done earlier")
            return
        if step.needs_port and b.module is not None:
            module_scope.close()   # e.g. arduino-cli needs the port to itself; until then we hold it
            b.module = None
        if step.needs_module and b.module is None:
            from flasher.rhf76 import open_module

            b.module = module_scope.enter_context(open_module(b.port, timeout=b.settings.at_timeout))
        self.emit(StepState.RUNNING)
        if not step.before_claim:
            self.ledger.step_started(b.key, step.name)
            b.checkpoint = lambda fields: self.ledger.note(b.key, **fields)
        started = time.monotonic()
        done = step.run(b)
        if step.before_claim:
            self.early.append((step.name, done.detail))
        else:
            self.ledger.step_finished(b.key, step.name, StepOutcome.OK, done.detail, **done.fields)
        self.emit(StepState.OK, f"{time.monotonic() - started:.1f} s" + (f" {done.detail}" if done.detail else ""))

    def _open_record(self) -> bool:
        """Claim the board in the ledger and decide: resume, start over, or leave it alone. False: leave it."""
        b, s, r = self.b, self.b.settings, self.result
        assert b.dev_eui is not None and b.registration_id is not None and b.device_key is not None
        r.deveui, r.registration_id = b.deveui, b.registration_id
        self.ledger.claim(b.key)       # raises BoardClaimed while another run works on it
        self.claimed = True
        fingerprint = {**s.fingerprint(), "registration_id": b.registration_id,
                       "device_key_check": key_check(b.device_key)}
        existing = self.ledger.get(b.key)
        if existing is not None and s.force:
            self.ledger.reset(b.key)
        elif existing is not None:
            changed = {k: (getattr(existing, k), v) for k, v in fingerprint.items()
                       if getattr(existing, k) != v and (getattr(existing, k) is not None or k in EXACT_FINGERPRINT)}
            if existing.status == BoardStatus.PROVISIONED and not changed:
                r.status = ResultStatus.ALREADY_PROVISIONED
                r.assigned_hub, r.device_id, r.header = existing.assigned_hub, existing.device_id, existing.header_path
                r.tts_device_id = existing.tts_device_id
                self.emit(StepState.SKIPPED, "already provisioned (use --force to redo)", step=DONE)
                return False
            if existing.status == BoardStatus.PROVISIONED:
                raise Conflict("provisioned earlier with other settings: " + _describe(changed)
                               + "; rerun with --force to provision it again")
            if changed:
                log.info("%s: settings changed since the last attempt (%s); starting over", b.deveui, _describe(changed))
                self.ledger.reset(b.key)
        fingerprint.pop("registration_id")
        usb = {"serial_number": b.serial_number} if b.serial_number else {}
        b.record = self.ledger.begin(b.key, b.registration_id, port=b.port, **usb, **fingerprint)
        for name, detail in self.early:
            self.ledger.step_finished(b.key, name, StepOutcome.OK, detail)
        return True

    def _fill_result(self) -> None:
        b, r = self.b, self.result
        r.assigned_hub, r.device_id, r.tts_device_id = b.assigned_hub, b.device_id, b.tts_device_id
        r.header = str(b.header_path) if b.header_path else r.header

    def _conflict(self, message: str) -> None:
        b, r = self.b, self.result
        r.status, r.error, r.failed_step = ResultStatus.CONFLICT, message, b.step
        self._fill_result()
        if b.record is not None or (b.deveui and self.ledger.get(b.key) is not None):
            self._record_failure(lambda: self.ledger.mark(b.key, BoardStatus.CONFLICT, message))
        self.emit(StepState.FAILED, r.error or message)

    def _fail(self, message: str) -> None:
        b, r = self.b, self.result
        r.status, r.error, r.failed_step = ResultStatus.FAILED, message, b.step
        self._fill_result()
        if b.record is not None:
            self._record_failure(lambda: self.ledger.step_finished(b.key, b.step, StepOutcome.FAILED, message,
                                                                   current_step=b.step))
        self.emit(StepState.FAILED, r.error or message)

    def _record_failure(self, write) -> None:
        """Record a failure; if the ledger itself cannot be written (a full disk), say so in the board's error."""
        try:
            write()
        except LedgerError as exc:  # unless the failure was the ledger's own (a server gone): said once is enough
            if str(exc) not in (self.result.error or ""):
                self.result.error = f"{self.result.error}; the ledger could not record it: {exc}"


def _describe(changed: dict[str, tuple[Any, Any]]) -> str:
    names = {"device_key_check": "device key (group key or registration id)", "join_eui": "JoinEUI",
             "app_key_source": "AppKey source", "id_scope": "ID scope", "registration_id": "registration id",
             "tts_app": "The Things Stack application", "dps_payload": "DPS registration payload"}

    def shown(v: Any) -> Any:
        return "none" if v is None else v

    return ", ".join(f"{names.get(k, k)} was {shown(old)} (now {shown(new)})" if k != "device_key_check"
                     else f"{names[k]} differs" for k, (old, new) in changed.items())


def preflight(settings: Settings, ports: list[str]) -> None:
    """Refuse, before any board or file is touched, whatever would fail every board the same way."""
    for port in ports:
        if "://" not in port and not os.path.exists(port):
            raise FlasherError(f"port {port!r}: no such device (unplugged? see 'flasher ports')")
    for step in STEPS:
        step.preflight(settings)


def provision_board(port: str, settings: Settings, ledger: Ledger, reporter: Reporter | None = None,
                    stop: threading.Event | None = None, serial_number: str | None = None) -> BoardResult:
    """Run one board through every step it has not finished; ``stop`` ends it at the next step boundary.

    ``serial_number``: the port's USB serial number when the caller found the board by it (the station), recorded
    in the ledger and printed on its label."""
    board = Board(port, settings, reporter or NullReporter(), stop or threading.Event(), serial_number=serial_number)
    return _Recorder(board, ledger).run()


# Boards at once unless --concurrency says fewer: every attached board's AT phase runs at once (a board
# mostly waits: on its serial port, on DPS), and how fast DPS is asked is the rate governor's business.
# flasher.settings' "concurrency" default is the same number (a test checks).
DEFAULT_CONCURRENCY = 256
# What one board holds open at worst: its serial port (the tty and pyserial's two abort pipes); a DPS or hub
# connection (a TLS socket and paho's wake-up socket pair); an HTTPS connection to The Things Stack; a file.
FDS_PER_BOARD = 10
FDS_SPARE = 64  # the ledger, its -wal/-shm, stdio, the SDK's and Python's own


def fds_needed(boards: int) -> int:
    """The open files ``boards`` at once need. Past select()'s range, the serial ports move above it
    (see flasher.at) so the SDK's sockets keep the numbers below: the limit must leave room up there."""
    need = boards * FDS_PER_BOARD + FDS_SPARE
    return need if need <= SELECT_LIMIT else SELECT_LIMIT + need


def ensure_fd_limit(boards: int) -> None:
    """Raise this process's soft limit on open files (up to its hard limit) so ``boards`` can run at once.

    Many systems start processes with a soft limit of 1024, which 256 boards outgrow;
    the hard limit is usually far higher and needs no privilege to reach. If even
    that is too low, say so in one line before any board is touched."""
    import resource

    need = fds_needed(boards)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        most = max((n for n in range(1, boards) if fds_needed(n) <= hard), default=1)
        raise FlasherError(f"{boards} boards at once need about {need} open files, and this process may open at "
                           f"most {hard} (ulimit -Hn): raise that limit, or pass --concurrency {most}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    log.info("open files limit raised from %d to %d for %d boards at once", soft, need, boards)


def provision_boards(ports: list[str], settings: Settings, ledger: Ledger, reporter: Reporter | None = None,
                     *, concurrency: int = DEFAULT_CONCURRENCY,
                     stop: threading.Event | None = None) -> Iterator[BoardResult]:
    """Provision ``ports`` concurrently, at most ``concurrency`` at once; yields each board's result as it finishes.

    Closing the generator early (Ctrl-C in the caller) sets ``stop``: boards finish
    their current step, record where they are, and the rest never start.
    """
    stop = stop or threading.Event()
    reporter = reporter or NullReporter()
    if not ports:
        return
    workers = max(1, min(concurrency, len(ports)))
    ensure_fd_limit(workers)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="board") as pool:
        futures = [pool.submit(provision_board, p, settings, ledger, reporter, stop) for p in ports]
        try:
            for fut in as_completed(futures):
                yield fut.result()
        finally:
            # Ctrl-C or an abandoned caller: boards stop at their next step boundary (a step under
            # way, such as a DPS registration, ends within its own timeout); queued ones never start.
            stop.set()
            for fut in futures:
                fut.cancel()
