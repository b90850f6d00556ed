"""``flasher header``: one board's firmware config header."""

from __future__ import annotations

import logging

import click

from flasher.commands.options import config_option, err, group_key_options, id_format_option, setting_option
from flasher.errors import InputError
from flasher.files import check_replaceable

log = logging.getLogger("flasher")


def choose_app_key(settings, *, random_key: bool):
    """The AppKey source the options (or, failing them, the environment or flasher.toml) chose: an AppKeyPlan.

    ``header`` never picks one silently: exactly one source must be given.
    """
    from flasher.keys import AppKeyPlan, AppKeySource
    from flasher.settings import SECRETS

    given = settings.secret_origin("app_key")
    master = settings.secret_origin("app_key_master")
    if random_key:  # an option: it outranks what the environment or flasher.toml hold
        given = given if given and given.level == 0 else None
        master = master if master and master.level == 0 else None
    elif given and master and given.level != master.level:  # the nearer source wins
        given, master = (given, None) if given.level < master.level else (None, master)
    chosen = [label for label, origin in (("an AppKey", given), ("an AppKey master secret", master)) if origin]
    if random_key:
        chosen.append("--random-app-key")
    if len(chosen) > 1:
        if given and master and given.kind == master.kind == "env":
            raise InputError(f"AppKey: both {SECRETS['app_key'].env} and {SECRETS['app_key_master'].env} are set; "
                             f"unset one or choose with an option")
        raise InputError(f"AppKey: {' and '.join(chosen)} exclude each other: choose one AppKey source")
    if random_key:
        return AppKeyPlan(AppKeySource.RANDOM)
    if given:
        return AppKeyPlan.given_key(settings.secret("app_key", warn=err).reveal(), given.label)
    if master:
        return AppKeyPlan.derived_from(settings.secret("app_key_master").reveal(), master.label)
    raise InputError(f"AppKey: no source; give --app-key-file FILE (or {SECRETS['app_key'].env}), "
                     f"--app-key-master-file FILE (or {SECRETS['app_key_master'].env}) to derive it from the DevEUI, "
                     f"or --random-app-key")


@click.command()
@click.argument("dev_eui", metavar="DEVEUI")
@setting_option("--join-eui", name="join_eui", help="JoinEUI (AppEUI); all zeros suits LoRaWAN 1.0.x devices on TTN")
@click.option("--app-key", "app_key", metavar="HEX",
              help="The AppKey, 32 hex digits (visible in the process list: prefer --app-key-file or $FLASHER_APP_KEY).")
@click.option("--app-key-file", type=click.Path(dir_okay=False), help="File holding the AppKey (32 hex digits).")
@click.option("--app-key-master-file", "app_key_master_file", type=click.Path(dir_okay=False),
              help="Derive the AppKey from the master secret in this file and the DevEUI (or $FLASHER_APPKEY_MASTER): "
                   "first 16 bytes of HMAC-SHA256(master, 'flasher-appkey-v1' + DevEUI bytes).")
@click.option("--random-app-key", "random_key", is_flag=True,
              help="A new random AppKey: it exists only in this header, so the network server must get it from there.")
@setting_option("--band", name="band", help="LoRaWAN band as the RHF76 names it: EU868, US915, US915HYBRID, AU915, "
                "AS923, CN470, KR920, IN865, EU433")
@setting_option("--id-scope", name="id_scope", metavar="SCOPE")
@setting_option("--template", name="template", metavar="NAME|PATH",
                help="A shipped template (seeed-lorawan, lmic, azure-dps) or a Jinja2 file")
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE",
              help="Extra string macro #define NAME \"VALUE\" (repeatable).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write here (atomically, mode 0600) instead of stdout.")
@id_format_option
@group_key_options
@config_option
def header(dev_eui, random_key, sets, output, **_options):
    """Render a firmware config header (C) for one board.

    It carries the DevEUI, JoinEUI, AppKey and band for the LoRaWAN library, and the DPS
    id scope, registration id and device key (derived from the group key). The AppKey
    source is always explicit. No secret appears in the header's comment, and the group
    key never appears at all.

    \b
    Example:
      export FLASHER_GROUP_PRIMARY_KEY=... FLASHER_APPKEY_MASTER=...
      flasher header 2CF7F12024900138 --id-scope 0ne0001A2B3 -o firmware/flasher_otaa/config.h
      flasher header 2CF7F12024900138 --random-app-key --template lmic --set WIFI_SSID=lab
    """
    from flasher.eui import EUI64
    from flasher.header import build_header_data, parse_sets, render_header, write_header
    from flasher.keys import decode_symmetric_key, derive_device_key
    from flasher.settings import from_click

    s = from_click(["join_eui", "band", "id_scope", "template", "registration_id_format"])
    dev = EUI64.parse(dev_eui, "DevEUI")
    extras = parse_sets(sets)
    reg_id = s.registration_id_format.for_eui(dev)
    plan = choose_app_key(s, random_key=random_key)
    primary = decode_symmetric_key(s.secret("group_key", prompt=True, warn=err).reveal(), "group primary key")
    if output:
        check_replaceable(output, "output")   # before any key is derived: -o /dev/null is refused, not replaced
    app_key = plan.key_for(dev)
    data = build_header_data(dev, join_eui=s.join_eui, app_key=app_key.reveal(), app_key_source=str(plan.source),
                             band=s.band, id_scope=s.id_scope, registration_id=reg_id,
                             device_key=derive_device_key(primary, reg_id), extras=extras)
    text = render_header(data, s.template)
    log.debug("header for %s: template %s, AppKey %s, registration id %s", dev, s.template, plan.source, reg_id)
    if output:
        digest = write_header(text, output)
        err(f"wrote {output} (sha256 {digest})")
    else:
        click.echo(text, nl=False)
    if plan.source == "random":
        err("note: the AppKey is random and exists only in this header: hand it to the network server from there")
