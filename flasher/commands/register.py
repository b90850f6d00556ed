"""``flasher register``: DPS registration and a proof message for ids you already have."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import click

from flasher.commands.options import (
    AZURE_SETTINGS,
    azure_options,
    config_option,
    err,
    group_key_options,
    group_keys,
    id_format_option,
    json_line,
    ledger_options,
    open_ledger,
    registration_payload_from,
    secret_options,
    setting_option,
    transport_from,
)
from flasher.errors import EXIT_FAILURE, InputError

if TYPE_CHECKING:
    from flasher.progress import LiveLine


@click.command()
@click.argument("ids", nargs=-1, metavar="[ID_OR_EUI]...")
@click.option("--input", "input_file", type=click.File("rb"),
              help="Read ids from a file ('-' for stdin): one per line, or a column of a CSV file with a header. "
                   "Recorded in the ledger as they finish: a rerun skips the ids registered already.")
@click.option("--column", metavar="NAME", help="With --input: the CSV column holding the ids "
                                               "[default: registration_id, else deveui].")
@click.option("--enrollment", type=click.Choice(["group", "individual"]), default="group", show_default=True,
              help="Group: the device key is derived from the group key. Individual: the enrollment's own key.")
@setting_option("--id-scope", name="id_scope", metavar="SCOPE")
@setting_option("--dps-host", name="dps_host", metavar="HOST")
@setting_option("--ca-cert", name="ca_cert", type=click.Path(dir_okay=False))
@setting_option("--timeout", name="timeout", metavar="S", help="Seconds allowed per device, all phases")
@click.option("--no-test-message", is_flag=True, help="Register only; do not connect to the hub and send 'TestMessage'.")
@setting_option("--concurrency", name="concurrency", metavar="N", help="Registrations in flight at once",
                shown_default="enough for --dps-rate, 8 to 256")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per device on stdout.")
@ledger_options
@azure_options
@secret_options("device_key")
@id_format_option
@group_key_options
@config_option
def register(ids, input_file, column, enrollment, no_test_message, as_json, **_options):
    """Register devices with Azure DPS, then prove each with one hub message.

    Each ID_OR_EUI is a registration id, or a DevEUI that becomes one through
    --registration-id-format. Ids are registered concurrently, paced to the DPS quota
    (--dps-rate: a 429 slows the whole run down, as DPS asks, and success speeds it
    back up), and each is reported as it finishes; the exit code is 1 if any failed.

    --input pre-registers a whole fleet before its first uplink: ids stream from the file
    (any number, constant memory), each outcome is recorded in the ledger before it is
    reported, and a rerun after Ctrl-C, SIGTERM or a crash skips the ids done already.

    \b
    Example:
      export FLASHER_GROUP_PRIMARY_KEY=...   # never on the command line
      flasher register 2CF7F12024900138 2CF7F12024900139 --id-scope 0ne0001A2B3
      flasher register --input deveuis.txt --id-scope 0ne0001A2B3 --no-test-message --dps-rate 1000/min
      flasher status --csv | flasher register --input - --column deveui --id-scope 0ne0001A2B3
      flasher simulate dps --enrollments enrollments.json &   # a local DPS + hub
      flasher register 2CF7F12024900138 --id-scope 0ne00000001 --dps-host 127.0.0.1 \\
          --ca-cert ~/.cache/flasher/dps-emulator/ca.pem --json
      # IoT Central, behind a proxy that only lets 443 out:
      flasher register 2CF7F12024900138 --model-id 'dtmi:com:example:Thermostat;1' \\
          --websockets --proxy http://bench@proxy.corp:3128 --proxy-password-file ~/.proxy-password
    """
    from flasher.dps import register_many
    from flasher.governor import RateGovernor, in_flight_for
    from flasher.keys import decode_symmetric_key
    from flasher.progress import LiveLine
    from flasher.settings import from_click

    s = from_click(["id_scope", "dps_host", "ca_cert", "timeout", "concurrency", "registration_id_format", "test_message",
                    "ledger", *AZURE_SETTINGS])
    if not ids and input_file is None:
        raise click.UsageError("give ids as arguments or --input FILE")
    if column is not None and input_file is None:
        raise click.UsageError("--column is for --input")
    if not s.id_scope:
        raise click.UsageError("--id-scope is required (or FLASHER_ID_SCOPE, or id_scope in flasher.toml)")
    payload = registration_payload_from(s)
    transport = transport_from(s)
    governor = RateGovernor.from_text(s.dps_rate, "--dps-rate")
    hub_governor = RateGovernor.from_text(s.hub_rate, "--hub-rate")
    in_flight = s.concurrency if s.source("concurrency") != "default" else in_flight_for(governor)
    policy = s.registration_id_format
    arg_ids = list(dict.fromkeys(policy.resolve(a)[0] for a in ids))
    total: int | None = len(arg_ids)
    if input_file is not None:
        total = _check_input(input_file, column, policy, total)
    names = ("primary", "secondary")
    if enrollment == "individual":
        if input_file is not None or len(arg_ids) != 1:
            raise click.UsageError("--enrollment individual takes one id: each individual enrollment has its own key")
        if s.use_secondary_key or s.check_other_key:
            raise click.UsageError("--use-secondary-key and --check-other-key are for group enrollments; for an "
                                   "individual enrollment, give the key you want as --device-key-file")
        key = s.secret("device_key", prompt=True, warn=err).reveal().strip()
        decode_symmetric_key(key, "device key")
        derive = {arg_ids[0]: key}.__getitem__
        derive_other = None
    else:
        if _options.get("device_key") or _options.get("device_key_file"):
            raise click.UsageError("--device-key is for --enrollment individual; group device keys are derived")
        group_key, other, names = group_keys(s)
        derive = _deriver(group_key.reveal())
        derive_other = _deriver(other.reveal()) if other is not None else None

    ledger = open_ledger(s) if input_file is not None or s.source("ledger") != "default" else None
    run = _Run(ledger, s.id_scope, s.dps_host, as_json=as_json, message=not no_test_message)
    live = run.live = LiveLine(total)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, _frame: run.stopping(signum, stop))
                for sig in (signal.SIGTERM, signal.SIGHUP)}
    started = time.monotonic()
    try:
        items = run.pending(_ids(arg_ids, input_file, column, policy), derive, derive_other)
        for reg_id, reg in register_many(items, concurrency=in_flight, on_phase=live.phase, stop=stop,
                                         record=run.record if ledger is not None else None,
                                         look_up=run.interrupted if ledger is not None else None,
                                         sending=run.sending if ledger is not None else None,
                                         governor=governor, id_scope=s.id_scope, dps_host=s.dps_host,
                                         hub_governor=hub_governor,
                                         ca_cert=s.ca_cert, timeout=s.timeout,
                                         test_message=None if no_test_message else s.test_message,
                                         transport=transport, payload=payload, model_id=s.model_id,
                                         key_names=names):
            run.report(reg_id, reg)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        live.close()
        if ledger is not None:
            ledger.close()
    if input_file is not None and not as_json:
        err(run.summary(time.monotonic() - started, governor))
    if run.stopped_by is not None:
        resume = "the ledger has every id that finished, a rerun goes on with the rest" if ledger is not None else \
            "the ids that finished are listed above"
        err(f"error: stopped by {signal.Signals(run.stopped_by).name}; {resume}")
        sys.exit(128 + run.stopped_by)
    return EXIT_FAILURE if run.failed else 0


def _deriver(group_key: bytes) -> Callable[[str], str]:
    from flasher.keys import DeviceKeyDeriver

    return DeviceKeyDeriver(group_key)


def _check_input(stream, column: str | None, policy, counted: int | None) -> int | None:
    """Read a file's ids once before anything is registered: a bad line is refused now, and the ETA knows the total.

    Stdin and pipes cannot be read twice: their ids are checked as they come (None: no total).
    """
    name = getattr(stream, "name", "-")
    try:
        seekable = stream.seekable() and os.path.isfile(name)
    except (OSError, TypeError):
        seekable = False
    if not seekable:
        return None
    counted = (counted or 0) + sum(1 for _ in _input_ids(stream, column, policy))
    stream.seek(0)
    return counted


def _ids(arg_ids: list[str], stream, column: str | None, policy) -> Iterator[str]:
    yield from arg_ids
    if stream is not None:
        yield from _input_ids(stream, column, policy)


def _input_ids(stream, column: str | None, policy) -> Iterator[str]:
    """The registration ids of ``--input``, each line's error naming the file and the line."""
    from flasher.idlist import read_ids

    name = getattr(stream, "name", "-")
    for where, text in read_ids(stream, name, column):
        try:
            yield policy.resolve(text)[0]
        except InputError as exc:
            raise InputError(f"--input {name}: {where}: {exc}") from None


class _Run:
    """One register run's bookkeeping: what the ledger has done already, what to record, what to print."""

    PAGE = 500   # ids looked up in the ledger at a time

    def __init__(self, ledger, id_scope: str, dps_host: str, *, as_json: bool, message: bool):
        self.ledger, self.id_scope, self.dps_host = ledger, id_scope, dps_host
        self.as_json, self.message = as_json, message
        self.registered = self.failed = self.already = 0
        self.stopped_by: int | None = None
        self.live: LiveLine
        self._interrupted: set[str] = set()   # ids a killed run was registering: ask DPS before registering again

    def stopping(self, signum: int, stop: threading.Event) -> None:
        """SIGTERM, SIGHUP: start nothing new, let what is in flight finish and be recorded."""
        self.stopped_by = signum
        stop.set()

    def pending(self, reg_ids: Iterator[str], derive, derive_other) -> Iterator[tuple[str, str, str | None]]:
        """``(id, device key, other key)`` for each id the ledger does not have done, a page of lookups at a time."""
        from flasher.keys import key_check

        for page in _pages(reg_ids, self.PAGE):
            known = self.ledger.pre_registrations(page, self.id_scope, self.dps_host) if self.ledger is not None else {}
            self._interrupted |= {k for k, r in known.items() if r.status == "registering"}
            for reg_id in page:
                key = derive(reg_id)
                earlier = known.get(reg_id.lower())
                if earlier is not None and earlier.status == "assigned" and earlier.device_key_check == key_check(key) \
                        and (earlier.message_sent or not self.message):
                    self.already += 1
                    self.live.skipped()
                    if self.as_json:
                        json_line({"registration_id": reg_id, "ok": True, "status": "already_registered"})
                    continue
                yield reg_id, key, derive_other(reg_id) if derive_other else None

    def interrupted(self, reg_id: str) -> bool:
        """Whether a killed run had sent this id (DPS may have assigned it): then DPS is asked before registering."""
        return reg_id.lower() in self._interrupted

    def sending(self, reg_id: str) -> None:
        """In the worker, just before the id is sent: noted durably, so a run killed from here on asks DPS first."""
        self.ledger.registering(reg_id, id_scope=self.id_scope, dps_host=self.dps_host)

    def record(self, reg_id: str, key: str, reg) -> None:
        """In the worker, before the result is reported: an id reported done is in the ledger."""
        from flasher.dps import DpsError
        from flasher.keys import key_check

        if isinstance(reg, DpsError):
            self.ledger.record_registration(reg_id, id_scope=self.id_scope, dps_host=self.dps_host, status="failed",
                                            error=str(reg))
        else:
            self.ledger.record_registration(reg_id, id_scope=self.id_scope, dps_host=self.dps_host, status="assigned",
                                            device_key_check=key_check(key), assigned_hub=reg.assigned_hub,
                                            device_id=reg.device_id, message_sent="message" in reg.timings)

    def report(self, reg_id: str, reg) -> None:
        from flasher.dps import DpsError

        live = self.live
        if isinstance(reg, DpsError):
            self.failed += 1
            if self.as_json:
                live.finished(reg_id, json.dumps({"registration_id": reg_id, "ok": False, "error": reg.kind,
                                                  "message": str(reg)}), failed=True)
                err(f"error: {reg}")
            else:
                live.finished(reg_id, f"error: {reg}", to_err=True, failed=True)
            return
        self.registered += 1
        if self.as_json:
            live.finished(reg_id, json.dumps({**reg.to_dict(), "ok": True}))
        else:
            t = ", ".join(f"{k} {v:.2f} s" for k, v in reg.timings.items())
            live.finished(reg_id, f"{reg.registration_id}\t{reg.status}\t{reg.assigned_hub}\t{reg.device_id}\t"
                                  f"{reg.substatus or '-'}\t({t})")

    def summary(self, seconds: float, governor) -> str:
        rate = f", {self.registered * 60 / seconds:.0f}/min" if seconds > 0 and self.registered else ""
        throttled = f"; DPS throttled {governor.throttle_count} time(s)" if governor.throttle_count else ""
        return (f"{self.registered + self.failed + self.already} ids: {self.registered} registered, "
                f"{self.already} already were (ledger), {self.failed} failed in {seconds:.1f} s{rate}{throttled}")


def _pages(items: Iterator[str], size: int) -> Iterator[list[str]]:
    page: list[str] = []
    for item in items:
        page.append(item)
        if len(page) >= size:
            yield page
            page = []
    if page:
        yield page
