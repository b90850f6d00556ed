"""``flasher tts register`` and ``flasher tts export``: The Things Stack for boards provisioned earlier or elsewhere.

Both use the network step's own code (:mod:`flasher.steps.network`): the same end
device ids, frequency plans, versions and AppKeys (read back from each board's header,
or computed again from its AppKey source) as ``flasher provision --tts-app``.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import TYPE_CHECKING

import click

from flasher.commands.options import (
    TTS_SETTINGS,
    config_option,
    err,
    json_line,
    secret_options,
    setting_option,
    tts_options,
    tts_target,
)
from flasher.errors import EXIT_FAILURE, FlasherError, InputError

if TYPE_CHECKING:
    from flasher.eui import EUI64
    from flasher.ledger import BoardRecord
    from flasher.secrets import Secret


@click.group()
def tts():
    """The Things Stack: register boards (all four servers), or export them for the console's import."""


@dataclass
class _Board:
    """One board to register or export: where it came from and the AppKey its module holds."""

    dev_eui: EUI64
    join_eui: EUI64
    band: str | None
    app_key: Secret | None = None          # once known
    record: BoardRecord | None = None      # in ledger mode
    problem: str | None = None             # why it cannot be registered or exported


def _parse_euis(values) -> list:
    from flasher.eui import EUI64

    return list(dict.fromkeys(EUI64.parse(v, "DevEUI") for v in values))


def _plans(s, sources: set[str]) -> dict:
    """The AppKey plans boards need (a master secret, a given key), loaded once, before any board is touched."""
    from flasher.commands.provision import app_key_plan
    from flasher.keys import AppKeySource

    plans = {}
    for source in sources:
        if source in ("derived", "given"):
            plans[source] = app_key_plan(s, AppKeySource(source))
    return plans


def _from_ledger(s, ledger, euis: list) -> list[_Board]:
    """Boards whose module holds an AppKey, with it read back from the header (checked unchanged)."""
    import hashlib
    from pathlib import Path

    from flasher.eui import EUI64
    from flasher.steps import Conflict
    from flasher.steps.render import module_app_key

    if euis:
        records = []
        for e in euis:
            rec = ledger.get(e.hex)
            if rec is None:
                raise InputError(f"DevEUI {e.hex}: not in ledger {str(ledger.path)!r}")
            records.append(rec)
    else:
        records = [r for r in ledger.iter_records()]
    found: list[tuple[_Board, BoardRecord, str | None]] = []
    for rec in records:
        b = _Board(EUI64.parse(rec.deveui), EUI64.parse(rec.join_eui) if rec.join_eui else s.join_eui, rec.band,
                   record=rec)
        text = None
        if not (rec.done("render") and rec.done("program")):
            b.problem = "its module was never programmed (provision it first)"
        else:
            try:
                data: bytes | None = Path(rec.header_path or "").read_bytes()
            except OSError:
                data = None
            if data is None or hashlib.sha256(data).hexdigest() != rec.header_sha256:
                b.problem = (f"header {rec.header_path!r} {'is missing' if data is None else 'changed'} since the "
                             f"module was programmed: its AppKey is unknown")
            else:
                text = data.decode("utf-8", "replace")
        found.append((b, rec, text))
    # which boards need their AppKey computed again (their header does not carry it), and from what
    from flasher.header import read_app_key

    needs = set()
    for _b, rec, text in found:
        if text is not None:
            try:
                carried = read_app_key(text)
            except InputError:
                carried = None
            if carried is None:
                needs.add(rec.app_key_source or "random")
    plans = _plans(s, needs)
    for b, rec, text in found:
        if text is None:
            continue
        try:
            b.app_key = module_app_key(plans.get(rec.app_key_source or ""), b.dev_eui, text, rec.header_path or "")
        except Conflict as exc:
            b.problem = str(exc)
            continue
        if b.app_key is None:
            b.problem = f"header {rec.header_path!r} does not carry its random AppKey"
    boards = [b for b, _, _ in found]
    return boards


@tts.command("register")
@click.argument("deveuis", nargs=-1, metavar="[DEVEUI...]")
@tts_options
@setting_option("--ledger", name="ledger", type=click.Path(dir_okay=False),
                help="Register the boards this ledger says were programmed (all, or the DEVEUIs given), and record it")
@click.option("--app-key-source", "key_source", type=click.Choice(["derived", "given"]),
              help="Register the DEVEUIs given, with this AppKey source, without a ledger.")
@secret_options("app_key", "app_key_master")
@setting_option("--join-eui", name="join_eui", metavar="EUI", help="JoinEUI, with --app-key-source")
@setting_option("--band", name="band", help="Band (for the frequency plan), with --app-key-source")
@setting_option("--concurrency", name="concurrency", metavar="N")
@click.option("--json", "as_json", is_flag=True,
              help='One object per board: {"deveui", "device_id", "application_id", "status", "servers", "written", '
                   '"error"}.')
@config_option
def register_cmd(deveuis, key_source, as_json, **_options):
    """Register boards with The Things Stack: Identity, Join, Network and Application Server.

    From the ledger (default): every board in it, or the DEVEUIs given; the AppKey is read
    back from each board's header (or computed again from its AppKey source), and the
    ledger records the network step. A board whose module was never programmed, or whose
    header is gone, is reported and makes the exit code 1. With --app-key-source: the
    DEVEUIs given, keys from that source, no ledger. A board already registered is read
    back and completed where it is missing; nothing is overwritten that belongs to another
    device. Exit 1 if any board failed.

    \b
    Example:
      export FLASHER_TTS_API_KEY=NNSXS....        # rights: devices, device keys
      flasher tts register --tts-app my-fleet --tts-url https://eu1.cloud.thethings.network
      flasher tts register 2CF7F12024900138 --app-key-source derived --tts-app my-fleet --tts-url ...
    """
    from flasher.commands.options import open_ledger
    from flasher.settings import from_click

    s = from_click([*TTS_SETTINGS, "ledger", "join_eui", "band", "concurrency"])
    euis = _parse_euis(deveuis)
    if key_source is None and (_options.get("app_key") or _options.get("app_key_file")
                               or _options.get("app_key_master_file")):
        raise click.UsageError("--app-key-file/--app-key-master-file are for --app-key-source; "
                               "from the ledger each board's AppKey comes from its header")
    target = tts_target(s, required=True)
    ledger = None
    if key_source is not None:
        if not euis:
            raise click.UsageError("--app-key-source registers the DEVEUIs given: give at least one")
        plan = _plans(s, {key_source})[key_source]
        boards = [_Board(e, s.join_eui, s.band, app_key=plan.key_for(e)) for e in euis]
        for b in boards:
            target.plan_for(b.band)
    else:
        ledger = open_ledger(s, create=False)
        try:
            boards = _from_ledger(s, ledger, euis)
            for b in boards:
                if b.problem is None:
                    target.plan_for(b.band)
        except BaseException:
            ledger.close()
            raise
    failed = 0
    try:
        # the API answers 429 to bursts: a few requests at once unless --concurrency says otherwise
        width = s.concurrency if s.source("concurrency") != "default" else 16
        with ThreadPoolExecutor(max_workers=max(1, min(width, len(boards) or 1)),
                                thread_name_prefix="tts") as pool:
            futures = [pool.submit(_register_one, target, b, ledger) for b in boards]
            for fut in as_completed(futures):
                out = fut.result()
                failed += out["status"] in ("failed", "busy")
                if as_json:
                    json_line(out)
                elif out["error"]:
                    err(f"error: {out['deveui']}: {out['error']}")
                else:
                    click.echo(f"{out['deveui']}\t{out['device_id']}\t{out['status']}\t{','.join(out['servers'])}")
    finally:
        if ledger is not None:
            ledger.close()
    if not as_json:
        err(f"{len(boards) - failed}/{len(boards)} boards registered with The Things Stack application {target.app!r}")
    return EXIT_FAILURE if failed else 0


def _register_one(target, b: _Board, ledger) -> dict:
    """One board through the network step's code; in ledger mode it is claimed and recorded like in provision."""
    from flasher.ledger import BoardClaimed
    from flasher.steps.network import end_device, recorded_fields, register_board, servers_recorded

    out = {"deveui": b.dev_eui.hex, "device_id": None, "application_id": target.app, "status": "failed",
           "servers": [], "written": [], "error": b.problem}
    if b.problem is not None or b.app_key is None:
        return out
    try:
        device = end_device(target, b.dev_eui, b.join_eui, b.app_key, b.band)
    except FlasherError as exc:
        out["error"] = str(exc)
        return out
    out["device_id"] = device.device_id
    rec = b.record
    if ledger is None:
        try:
            reg = register_board(target, device, [])
        except FlasherError as exc:
            out["error"] = str(exc)
            return out
        out.update(status="registered" if reg.written else "already_registered", servers=reg.held, written=reg.written)
        return out
    key = b.dev_eui.hex
    assert rec is not None
    try:
        ledger.claim(key)
    except BoardClaimed as exc:
        out.update(status="busy", error=str(exc))
        return out
    try:
        held = servers_recorded(rec, device)
        if rec.steps.get("network") == "ok" and len(held) == 4:
            out.update(status="already_registered", servers=held)
            return out
        try:
            reg = register_board(target, device, held, checkpoint=lambda fields: ledger.note(key, **fields))
        except FlasherError as exc:
            out["error"] = str(exc)
            ledger.step_finished(key, "network", "failed", str(exc), keep_status=True)
            return out
        ledger.step_finished(key, "network", "ok", reg.detail, keep_status=True, **recorded_fields(reg, target.app))
        out.update(status="registered" if reg.written else "already_registered", servers=reg.held,
                   written=reg.written)
        return out
    finally:
        ledger.release(key)


@tts.command("export")
@click.argument("deveuis", nargs=-1, metavar="[DEVEUI...]")
@click.option("--format", "fmt", type=click.Choice(["tts-csv", "tts-json"]),
              help="tts-csv: The Things Stack CSV; tts-json: The Things Stack JSON (one end device a line).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The file to write (mode 0600: it holds every board's AppKey).")
@setting_option("--ledger", name="ledger", type=click.Path(dir_okay=False))
@setting_option("--tts-app", name="tts_app", metavar="APP_ID", help="Application id written into tts-json (optional)")
@setting_option("--tts-device-id-format", name="tts_device_id_format", metavar="FORMAT")
@setting_option("--frequency-plan", name="frequency_plan", metavar="ID")
@setting_option("--lorawan-version", name="lorawan_version", metavar="VERSION")
@setting_option("--lorawan-phy-version", name="lorawan_phy_version", metavar="VERSION")
@secret_options("app_key", "app_key_master")
@config_option
def export_cmd(deveuis, fmt, output, **_options):
    """Write the ledger's boards in The Things Stack's own import formats, for the console's bulk import.

    For a user without API rights: the console (Import end devices) reads the file in
    one go. Each line carries the board's AppKey, so the file is written with mode 0600;
    keep it like the headers. Boards registered already keep their recorded device id.
    A board whose AppKey is unknown is left out with a warning, and the exit code is 1.

    \b
    Example:
      flasher tts export --format tts-csv -o fleet.csv
    """
    from flasher.commands.options import open_ledger
    from flasher.files import atomic_write, check_replaceable
    from flasher.settings import from_click
    from flasher.tts import EndDevice, frequency_plan_for, tts_csv, tts_json

    if fmt is None:
        raise click.UsageError("--format is required: tts-csv or tts-json")
    s = from_click(["ledger", "tts_app", "tts_device_id_format", "frequency_plan", "lorawan_version",
                    "lorawan_phy_version", "join_eui"])
    euis = _parse_euis(deveuis)
    check_replaceable(output, "--output")
    with open_ledger(s, create=False, readonly=True) as ledger:
        boards = _from_ledger(s, ledger, euis)
    devices, skipped = [], []
    for b in boards:
        if b.problem is not None or b.app_key is None or b.record is None:
            skipped.append(f"{b.dev_eui.hex}: {b.problem}")
            continue
        try:
            plan = s.frequency_plan or frequency_plan_for(b.band or "")
        except InputError as exc:
            skipped.append(f"{b.dev_eui.hex}: {exc}")
            continue
        # the same id the network step gives it (or the one it was registered as); no API key is needed here
        device_id = b.record.tts_device_id or s.tts_device_id_format.for_eui(b.dev_eui)
        devices.append(EndDevice(s.tts_app or "", device_id, b.dev_eui, b.join_eui, b.app_key, plan,
                                 s.lorawan_version, s.lorawan_phy_version))
    lines = tts_csv(devices) if fmt == "tts-csv" else tts_json(devices, with_application=bool(s.tts_app))
    try:
        atomic_write(output, "".join(lines), mode=0o600, what="--output")
    except OSError as exc:
        raise FlasherError(f"--output {output!r}: cannot write ({exc.strerror or exc})") from None
    for line in skipped:
        err(f"warning: left out {line}")
    err(f"wrote {len(devices)} end device(s) to {output} ({fmt}; mode 0600: it holds their AppKeys)")
    sys.stdout.flush()
    return EXIT_FAILURE if skipped else 0
