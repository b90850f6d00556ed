"""``flasher provision``: the one-step job, and ``flasher status``: what the ledger knows."""

from __future__ import annotations

import signal
import sys
from typing import TYPE_CHECKING

import click

from flasher.commands.options import (
    AZURE_SETTINGS,
    TTS_SETTINGS,
    azure_options,
    board_selection_options,
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
    tts_options,
    tts_target,
)
from flasher.errors import EXIT_FAILURE, InputError

if TYPE_CHECKING:
    from flasher.pipeline import Settings

# Every setting provision reads: the file, the environment and the options resolve the same way as elsewhere.
PROVISION_SETTINGS = ["id_scope", "dps_host", "ca_cert", "template", "band", "join_eui", "app_key_source",
                      "out_dir", "ledger", "registration_id_format", "timeout", "at_timeout", "concurrency",
                      "test_message", "fqbn", "sketch", "arduino_cli", "builder", "samd_core", "bossac", *TTS_SETTINGS,
                      "labels", "label_vendor_id", "label_model_id", "station_id", "claim_timeout", *AZURE_SETTINGS]


def app_key_plan(s, source):
    """provision's AppKey: the chosen source, or derived when a master secret is set, else random."""
    from flasher.keys import AppKeyPlan, AppKeySource

    if source in (None, AppKeySource.DERIVED):
        master = s.secret("app_key_master", required=source is AppKeySource.DERIVED)
        if master is not None:
            return AppKeyPlan.derived_from(master.reveal(), master.source)
    if source is AppKeySource.GIVEN:
        key = s.secret("app_key")
        return AppKeyPlan.given_key(key.reveal(), key.source)
    return AppKeyPlan(AppKeySource.RANDOM)


def build_settings(s, *, upload: bool, no_test_message: bool, force: bool, extras) -> Settings:
    """The pipeline's typed Settings from the resolved ones; every check that can fail early fails here."""
    from flasher.header import parse_sets
    from flasher.pipeline import Upload

    if not s.id_scope:
        raise click.UsageError("--id-scope is required (or FLASHER_ID_SCOPE, or id_scope in flasher.toml)")
    payload = registration_payload_from(s)
    transport = transport_from(s)
    plan = app_key_plan(s, s.app_key_source)
    tts = tts_target(s)
    group_key, other_key, key_names = group_keys(s)
    up = None
    if upload:
        from flasher.arduino import default_sketch, make_builder

        tool = make_builder(s.builder, fqbn=s.fqbn, arduino_cli=s.arduino_cli, samd_core=s.samd_core, bossac=s.bossac)
        up = Upload(sketch=str(s.sketch or default_sketch()), fqbn=s.fqbn, arduino_cli=getattr(tool, "executable", None),
                    builder=s.builder, samd_core=str(getattr(tool, "kit", "")) or None, bossac=s.bossac)
    from flasher.governor import RateGovernor
    from flasher.labels import LabelPlan
    from flasher.pipeline import Settings

    labels = LabelPlan(s.labels, int(s.label_vendor_id, 16), int(s.label_model_id, 16)) if s.labels else None
    return Settings(id_scope=s.id_scope, group_key=group_key, dps_host=s.dps_host, ca_cert=s.ca_cert,
                    template=s.template, band=s.band, join_eui=s.join_eui, app_key=plan, out_dir=s.out_dir,
                    id_policy=s.registration_id_format, timeout=s.timeout, at_timeout=s.at_timeout,
                    test_message=None if no_test_message else s.test_message, upload=up, tts=tts, force=force,
                    extras=parse_sets(extras), labels=labels, transport=transport, dps_payload=payload,
                    model_id=s.model_id, other_group_key=other_key, key_names=key_names,
                    governor=RateGovernor.from_text(s.dps_rate, "--dps-rate"),
                    hub_governor=RateGovernor.from_text(s.hub_rate, "--hub-rate"))


class _Terminated(BaseException):
    """SIGTERM or SIGHUP: stop like Ctrl-C, at each board's next step boundary."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, _frame):
    raise _Terminated(signum)


@click.command()
@board_selection_options
@setting_option("--id-scope", name="id_scope", metavar="SCOPE")
@setting_option("--dps-host", name="dps_host", metavar="HOST")
@setting_option("--ca-cert", name="ca_cert", type=click.Path(dir_okay=False))
@setting_option("--template", name="template", metavar="NAME|PATH")
@setting_option("--band", name="band")
@setting_option("--join-eui", name="join_eui", metavar="EUI")
@setting_option("--app-key-source", name="app_key_source", type=click.Choice(["random", "derived", "given"]),
                help="AppKey per board: random; derived from the master secret and the DevEUI; or given (one key "
                     "for all) [default: derived when a master secret is set, else random]")
@secret_options("app_key", "app_key_master")
@setting_option("--out-dir", name="out_dir", type=click.Path(file_okay=False))
@ledger_options
@setting_option("--station-id", name="station_id", metavar="NAME",
                help="This station's name in a shared ledger, recorded with each step and claim (default: the "
                     "hostname)")
@setting_option("--claim-timeout", name="claim_timeout", metavar="S")
@id_format_option
@setting_option("--timeout", name="timeout", metavar="S")
@click.option("--no-test-message", is_flag=True, help="Register only; do not send the proof message.")
@click.option("--upload", is_flag=True, help="Build and upload the firmware sketch with the header (--builder).")
@setting_option("--fqbn", name="fqbn")
@setting_option("--sketch", name="sketch", type=click.Path(file_okay=False))
@setting_option("--arduino-cli", name="arduino_cli", metavar="PATH")
@setting_option("--builder", name="builder", type=click.Choice(["arduino-cli", "arduino-builder"]))
@setting_option("--samd-core", name="samd_core", metavar="DIR", type=click.Path(file_okay=False))
@setting_option("--bossac", name="bossac", metavar="PATH")
@click.option("--set", "extras", multiple=True, metavar="NAME=VALUE", help="Extra header value (repeatable).")
@setting_option("--labels", name="labels", metavar="DIR", type=click.Path(file_okay=False))
@setting_option("--label-vendor-id", name="label_vendor_id", metavar="HEX")
@setting_option("--label-model-id", name="label_model_id", metavar="HEX")
@click.option("--force", is_flag=True, help="Provision again boards the ledger says are done, or that conflict with it.")
@setting_option("--concurrency", name="concurrency", metavar="N")
@tts_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per board on stdout as each finishes.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@azure_options
@group_key_options
@config_option
def provision(targets, no_test_message, upload, extras, force, as_json, quiet, **_options):
    """Provision boards in one step: read DevEUI, derive key, render header, program, register, prove, record.

    With --tts-app (and --tts-url, FLASHER_TTS_API_KEY) each board is also registered
    with The Things Stack (the network step), with the AppKey its module holds.
    Each board's steps are recorded in the ledger as they happen; a rerun resumes
    where a board stopped and skips finished boards (unless --force). A finished
    board whose settings differ now is reported as a conflict and left alone.
    Ctrl-C, SIGTERM or SIGHUP stop every board at its next step boundary.

    \b
    Example:
      export FLASHER_GROUP_PRIMARY_KEY=...
      flasher provision --all --id-scope 0ne0001A2B3
      flasher provision --port /dev/ttyACM0 --json > result.jsonl
    """
    from flasher import progress as progress_mod
    from flasher.pipeline import preflight, provision_boards
    from flasher.settings import from_click

    s = from_click(PROVISION_SETTINGS)
    if _options.get("app_key") and s.app_key_source not in (None, "given"):
        raise InputError("--app-key is for --app-key-source given")
    settings = build_settings(s, upload=upload, no_test_message=no_test_message, force=force, extras=extras)
    preflight(settings, targets)  # everything checkable is checked before a board or the ledger is touched
    ledger = open_ledger(s, station=s.station_id, stale_after=s.claim_timeout)
    show = progress_mod.for_stream(quiet=quiet)
    failures, already, stopped_by = [], 0, None
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        for result in provision_boards(targets, settings, ledger, show, concurrency=s.concurrency):
            already += result.status == "already_provisioned"
            if not result.ok:
                failures.append(result)
            if as_json:
                json_line(result.to_dict())
    except _Terminated as exc:  # the boards have stopped at their step boundary by now (the generator closed)
        stopped_by = exc.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        show.close()
        ledger.close()
    if stopped_by is not None:
        err(f"error: stopped by {signal.Signals(stopped_by).name}; the ledger says where each board stopped, "
            f"a rerun resumes there")
        sys.exit(128 + stopped_by)
    for r in failures:
        err(f"error: {r.deveui or r.port}: {r.failed_step}: {r.error}")
    if not as_json and not quiet:
        err(f"{len(targets) - len(failures)}/{len(targets)} boards provisioned"
            + (f" ({already} already were)" if already else "")
            + (f"; {len(failures)} failed or left alone (rerun to resume where each stopped)" if failures else ""))
    return EXIT_FAILURE if failures else 0


def _list_registrations(ledger, station: str | None, as_json: bool, as_csv: bool, out) -> None:
    """`status --registrations`: the registrations table as a table, JSON lines or CSV, a page at a time."""
    import csv
    import json

    from flasher.ledger import REGISTRATION_LIST

    pages = ledger.iter_registrations(station=station)
    if as_csv:
        w = csv.writer(out, lineterminator="\n")
        w.writerow(REGISTRATION_LIST)
        for rows in pages:
            w.writerows(rows)
        return
    at = {f: i for i, f in enumerate(REGISTRATION_LIST)}
    if as_json:
        for rows in pages:
            out.write("".join(json.dumps({**dict(zip(REGISTRATION_LIST, row, strict=True)),
                                          "message_sent": bool(row[at["message_sent"]])}) + "\n" for row in rows))
        return
    out.write(f"{'REGISTRATION ID':<24} {'STATUS':<12} {'ID SCOPE':<12} {'HUB':<28} {'DEVICE':<24} MESSAGE  "
              f"ATTEMPTS  {'STATION':<16} LAST ERROR\n")
    for rows in pages:
        out.write("".join(f"{r[at['registration_id']]:<24} {r[at['status']]:<12} {r[at['id_scope']]:<12} "
                          f"{r[at['assigned_hub']] or '-':<28} {r[at['device_id']] or '-':<24} "
                          f"{'sent' if r[at['message_sent']] else '-':<7}  {r[at['attempts']]:>8}  "
                          f"{r[at['station']] or '-':<16} {r[at['last_error']] or ''}\n" for r in rows))


def _network(record) -> str:
    """The network step at a glance: ok, skipped, failed, or the servers that hold the device so far (is,js)."""
    outcome = record.steps.get("network")
    if outcome in (None, "ok", "skipped") or not record.tts_servers:
        return outcome or "-"
    return f"{outcome}({record.tts_servers})"


@click.command()
@ledger_options
@click.option("--station", metavar="NAME", help="Only the boards this station last worked on (a shared ledger).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per board.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV (doubles as an onboarding list for the network server).")
@click.option("--registrations", is_flag=True,
              help="The ids pre-registered with `flasher register` instead of the boards (with --json or --csv too).")
@config_option
def status(station, as_json, as_csv, registrations, **_options):
    """List the boards in the ledger and where each one stands.

    NETWORK is The Things Stack step (ok, skipped, or failed/started with the servers that
    hold the end device so far, e.g. failed(is,js)); TTS DEVICE its end device id. Against a
    shared ledger (postgresql://…) that is every station's boards; STATION says which one
    last worked on each. --json and --csv add tts_app, tts_device_id, tts_servers and station
    (and --json each step's outcome).

    --registrations lists the ids `flasher register` has recorded instead: assigned,
    failed (a rerun retries them), or registering (a run was killed with it in flight: a
    rerun asks DPS about it first).
    """
    from flasher.ledger import write_json
    from flasher.settings import from_click

    if as_json and as_csv:
        raise click.UsageError("--json and --csv are exclusive")
    s = from_click(["ledger"])
    out = sys.stdout
    with open_ledger(s, create=False, readonly=True) as ledger:    # reading never writes, nor migrates
        if registrations:
            _list_registrations(ledger, station, as_json, as_csv, out)
            return 0
        records = ledger.iter_records(station=station)             # streamed: any number of boards
        if as_json:
            write_json(records, out)
        elif as_csv:
            for text in ledger.iter_csv(station=station):            # one query, a page of text per write
                out.write(text)
        else:
            out.write(f"{'DEVEUI':<16}  {'STATUS':<12} {'STEP':<9} {'HUB':<28} {'DEVICE':<18} {'NETWORK':<16} "
                      f"{'TTS DEVICE':<22} ATTEMPTS  {'STATION':<16} LAST ERROR\n")
            for r in records:
                out.write(f"{r.deveui:<16}  {r.status:<12} {r.current_step or '-':<9} {r.assigned_hub or '-':<28} "
                          f"{r.device_id or '-':<18} {_network(r):<16} {r.tts_device_id or '-':<22} {r.attempts:>8}  "
                          f"{r.station or '-':<16} {r.last_error or ''}\n")
    return 0
