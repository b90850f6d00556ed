"""``flasher register``: DPS registration and a proof message for ids you already have."""

from __future__ import annotations

import json

import click

from flasher.commands.options import (
    AZURE_SETTINGS,
    azure_options,
    config_option,
    err,
    group_key_options,
    group_keys,
    id_format_option,
    registration_payload_from,
    secret_options,
    setting_option,
    transport_from,
)
from flasher.errors import EXIT_FAILURE


@click.command()
@click.argument("ids", nargs=-1, required=True, metavar="ID_OR_EUI...")
@click.option("--enrollment", type=click.Choice(["group", "individual"]), default="group", show_default=True,
              help="Group: the device key is derived from the group key. Individual: the enrollment's own key.")
@setting_option("--id-scope", name="id_scope", metavar="SCOPE")
@setting_option("--dps-host", name="dps_host", metavar="HOST")
@setting_option("--ca-cert", name="ca_cert", type=click.Path(dir_okay=False))
@setting_option("--timeout", name="timeout", metavar="S", help="Seconds allowed per device, all phases")
@click.option("--no-test-message", is_flag=True, help="Register only; do not connect to the hub and send 'TestMessage'.")
@setting_option("--concurrency", name="concurrency", metavar="N", help="Registrations in flight at once")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per device on stdout.")
@azure_options
@secret_options("device_key")
@id_format_option
@group_key_options
@config_option
def register(ids, enrollment, no_test_message, as_json, **_options):
    """Register devices with Azure DPS, then prove each with one hub message.

    Each ID_OR_EUI is a registration id, or a DevEUI that becomes one through
    --registration-id-format. Several ids are registered concurrently and each is
    reported as it finishes; the exit code is 1 if any failed.

    \b
    Example:
      export FLASHER_GROUP_PRIMARY_KEY=...   # never on the command line
      flasher register 2CF7F12024900138 2CF7F12024900139 --id-scope 0ne0001A2B3
      flasher simulate dps --enrollments enrollments.json &   # a local DPS + hub
      flasher register 2CF7F12024900138 --id-scope 0ne00000001 --dps-host 127.0.0.1 \\
          --ca-cert ~/.cache/flasher/dps-emulator/ca.pem --json
      # IoT Central, behind a proxy that only lets 443 out:
      flasher register 2CF7F12024900138 --model-id 'dtmi:com:example:Thermostat;1' \\
          --websockets --proxy http://bench@proxy.corp:3128 --proxy-password-file ~/.proxy-password
    """
    from flasher.dps import DpsError, register_many
    from flasher.keys import decode_symmetric_key, derive_device_key
    from flasher.progress import LiveLine
    from flasher.settings import from_click

    s = from_click(["id_scope", "dps_host", "ca_cert", "timeout", "concurrency", "registration_id_format", "test_message",
                    *AZURE_SETTINGS])
    if not s.id_scope:
        raise click.UsageError("--id-scope is required (or FLASHER_ID_SCOPE, or id_scope in flasher.toml)")
    reg_ids = list(dict.fromkeys(s.registration_id_format.resolve(a)[0] for a in ids))
    payload = registration_payload_from(s)
    transport = transport_from(s)
    other_keys, names = None, ("primary", "secondary")
    if enrollment == "individual":
        if len(reg_ids) != 1:
            raise click.UsageError("--enrollment individual takes one id: each individual enrollment has its own key")
        if s.use_secondary_key or s.check_other_key:
            raise click.UsageError("--use-secondary-key and --check-other-key are for group enrollments; for an "
                                   "individual enrollment, give the key you want as --device-key-file")
        key = s.secret("device_key", prompt=True, warn=err).reveal().strip()
        decode_symmetric_key(key, "device key")
        keys = {reg_ids[0]: key}
    else:
        if _options.get("device_key") or _options.get("device_key_file"):
            raise click.UsageError("--device-key is for --enrollment individual; group device keys are derived")
        group_key, other, names = group_keys(s)
        keys = {r: derive_device_key(group_key.reveal(), r) for r in reg_ids}
        if other is not None:
            other_keys = {r: derive_device_key(other.reveal(), r) for r in reg_ids}

    live = LiveLine(len(reg_ids))
    failed = 0
    try:
        for reg_id, reg in register_many(keys, concurrency=s.concurrency, on_phase=live.phase, id_scope=s.id_scope,
                                         dps_host=s.dps_host, ca_cert=s.ca_cert, timeout=s.timeout,
                                         test_message=None if no_test_message else s.test_message,
                                         transport=transport, payload=payload, model_id=s.model_id,
                                         other_keys=other_keys, key_names=names):
            if isinstance(reg, DpsError):
                failed += 1
                if as_json:
                    live.finished(reg_id, json.dumps({"registration_id": reg_id, "ok": False, "error": reg.kind,
                                                      "message": str(reg)}))
                    err(f"error: {reg}")
                else:
                    live.finished(reg_id, f"error: {reg}", to_err=True)
                continue
            if as_json:
                live.finished(reg_id, json.dumps({**reg.to_dict(), "ok": True}))
            else:
                t = ", ".join(f"{k} {v:.2f} s" for k, v in reg.timings.items())
                live.finished(reg_id, f"{reg.registration_id}\t{reg.status}\t{reg.assigned_hub}\t{reg.device_id}\t"
                                      f"{reg.substatus or '-'}\t({t})")
    finally:
        live.close()
    return EXIT_FAILURE if failed else 0
