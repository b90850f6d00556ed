"""Option bundles several commands share, and the two ways they print."""

from __future__ import annotations

import functools

import click

from flasher.settings import SECRETS, SETTINGS


def err(msg: str) -> None:
    """People-facing text goes to stderr; stdout is for data."""
    click.echo(msg, err=True)


def json_line(obj) -> None:
    import json

    click.echo(json.dumps(obj))


def config_option(f):
    return click.option("--config", "config_path", type=click.Path(dir_okay=False),
                        help="Settings file [default: ./flasher.toml if present].")(f)


def setting_option(*decls: str, name: str, **kwargs):
    """An option for a declared setting: its help and default come from :data:`flasher.settings.SETTINGS`.

    The option's own default is None, so the resolver can tell "not typed" from a
    value and fall back to the environment, then flasher.toml, then the default.
    """
    s = SETTINGS[name]
    shown = s.default if s.default is not None and not callable(s.default) else None
    shown = kwargs.pop("shown_default", shown)   # a command whose default is worked out, not the setting's
    extra = []
    if s.env:
        extra.append(f"env {s.env}")
    if shown is not None:
        extra.append(f"default: {shown}")
    help_text = kwargs.pop("help", None) or s.help[:1].upper() + s.help[1:]
    help_text += f" [{'; '.join(extra)}]" if extra else ""
    return click.option(*decls, name, default=None, help=help_text, **kwargs)


def secret_options(*names: str):
    """``--group-key``/``--group-key-file`` and friends: a plain value (warns) and a file, per secret."""
    def decorate(f):
        for name in reversed(names):
            sec = SECRETS[name]
            if sec.file_option:
                f = click.option(sec.file_option, f"{name}_file", type=click.Path(dir_okay=False),
                                 help=f"File holding the {sec.what}.")(f)
            if sec.option:
                f = click.option(sec.option, name, metavar="KEY",
                                 help=f"The {sec.what} (visible in the process list: prefer ${sec.env} or a file).")(f)
        return f
    return decorate


def group_key_options(f):
    return secret_options("group_key", "secondary_key")(f)


def board_selection_options(f):
    """``--port``/``--serial-number`` (both repeatable) and ``--all``, resolved into ``targets``.

    ``targets`` is a list of device paths or pyserial URLs, duplicates dropped,
    in the order given. Nothing selected is a usage error: never a prompt.
    """

    @click.option("--port", "ports", multiple=True, metavar="PORT", help="Serial port or pyserial URL (repeatable).")
    @click.option("--serial-number", "serial_numbers", multiple=True, metavar="SN",
                  help="Pick a board by its USB serial number (repeatable); survives re-enumeration.")
    @click.option("--all", "all_boards", is_flag=True, help="Every Seeeduino LoRaWAN board running a sketch.")
    @functools.wraps(f)
    def wrapper(*args, ports, serial_numbers, all_boards, **kwargs):
        from flasher.ports import resolve_targets

        kwargs["targets"] = resolve_targets(list(ports), list(serial_numbers), all_boards)
        return f(*args, **kwargs)

    return wrapper


def ledger_options(f=None, *, help: str | None = None):
    """``--ledger`` and, for a PostgreSQL ledger, ``--ledger-password-file``."""
    def decorate(f):
        f = secret_options("ledger_password")(f)
        return setting_option("--ledger", name="ledger", metavar="FILE|URL", type=click.Path(dir_okay=False),
                              **({"help": help} if help else {}))(f)
    return decorate(f) if f is not None else decorate


def open_ledger(s, **kwargs):
    """The ledger the resolved settings name; a server's password comes from the ledger_password secret, if set,
    else libpq finds it (PGPASSWORD, ~/.pgpass). It is never shown."""
    from flasher.ledger import Ledger, is_url

    password = s.secret("ledger_password", required=False) if is_url(s.ledger) else None
    return Ledger(s.ledger, password=password, **kwargs)


def at_timeout_option(f):
    return setting_option("--timeout", name="at_timeout", metavar="S")(f)


def id_format_option(f):
    return setting_option("--registration-id-format", name="registration_id_format", metavar="FORMAT",
                          help="How a DevEUI becomes a registration id; {deveui} is its 16 lower-case hex digits")(f)


# The Things Stack: the settings the network step, `tts register` and `tts export` read.
TTS_SETTINGS = ["tts_app", "tts_url", "tts_is_url", "tts_js_url", "tts_ns_url", "tts_as_url", "tts_ca_cert",
                "tts_device_id_format", "frequency_plan", "lorawan_version", "lorawan_phy_version", "tts_timeout"]


def tts_options(f):
    """``--tts-app``, ``--tts-url`` (and per-server URLs), the API key file and the end device's LoRaWAN values."""
    for decorate in reversed([
        setting_option("--tts-app", name="tts_app", metavar="APP_ID"),
        setting_option("--tts-url", name="tts_url", metavar="URL"),
        setting_option("--tts-is-url", name="tts_is_url", metavar="URL"),
        setting_option("--tts-js-url", name="tts_js_url", metavar="URL"),
        setting_option("--tts-ns-url", name="tts_ns_url", metavar="URL"),
        setting_option("--tts-as-url", name="tts_as_url", metavar="URL"),
        setting_option("--tts-ca-cert", name="tts_ca_cert", type=click.Path(dir_okay=False)),
        setting_option("--tts-device-id-format", name="tts_device_id_format", metavar="FORMAT"),
        setting_option("--frequency-plan", name="frequency_plan", metavar="ID"),
        setting_option("--lorawan-version", name="lorawan_version", metavar="VERSION"),
        setting_option("--lorawan-phy-version", name="lorawan_phy_version", metavar="VERSION"),
        setting_option("--tts-timeout", name="tts_timeout", metavar="S"),
        secret_options("tts_api_key"),
    ]):
        f = decorate(f)
    return f


# --- Azure: IoT Central model id, WebSockets, proxies, key rotation ------------------------------

AZURE_SETTINGS = ["model_id", "payload_json", "websockets", "proxy", "use_secondary_key", "check_other_key", "dps_rate",
                  "hub_rate"]


def azure_options(f):
    """The options of commands that talk to DPS: what to send, how to get out, which group key."""
    decorators = [
        setting_option("--model-id", name="model_id", metavar="DTMI"),
        setting_option("--payload-json", name="payload_json", metavar="FILE", type=click.Path(dir_okay=False)),
        setting_option("--websockets", name="websockets", is_flag=True),
        setting_option("--proxy", name="proxy", metavar="URL",
                       help="Proxy for DPS and the hub: http://[user@]host:port or socks5://[user@]host:port; 'none' "
                            "to ignore HTTPS_PROXY. A password belongs in --proxy-password-file or "
                            "$FLASHER_PROXY_PASSWORD (one in the URL is visible in the process list)"),
        click.option("--proxy-password-file", "proxy_password_file", type=click.Path(dir_okay=False),
                     help="File holding the proxy password (or $FLASHER_PROXY_PASSWORD)."),
        setting_option("--use-secondary-key", name="use_secondary_key", is_flag=True),
        setting_option("--check-other-key", name="check_other_key", is_flag=True),
        setting_option("--dps-rate", name="dps_rate", metavar="N/min"),
        setting_option("--hub-rate", name="hub_rate", metavar="N/s"),
    ]
    for decorate in reversed(decorators):
        f = decorate(f)
    return f


def tts_target(s, *, required: bool = False):
    """The typed :class:`flasher.tts.TtsTarget` from resolved settings, or None when no application is given.

    Every part is checked here, before any board is touched; the API key is loaded
    only when an application is given (``FLASHER_TTS_API_KEY`` or ``--tts-api-key-file``).
    """
    if not s.tts_app:
        if required:
            raise click.UsageError("--tts-app is required (or FLASHER_TTS_APP, or tts_app in flasher.toml)")
        return None
    from flasher.tts import SERVERS, TtsTarget, check_api_key

    endpoints = {srv: getattr(s, f"tts_{srv}_url") or s.tts_url for srv in SERVERS}
    missing = [srv for srv, ep in endpoints.items() if ep is None]
    if missing:
        raise click.UsageError("--tts-url is required with --tts-app (or FLASHER_TTS_URL, or tts_url in flasher.toml; "
                               "or every one of --tts-is-url/--tts-js-url/--tts-ns-url/--tts-as-url)")
    key = check_api_key(s.secret("tts_api_key"))
    return TtsTarget(s.tts_app, endpoints, key, device_ids=s.tts_device_id_format, frequency_plan=s.frequency_plan,
                     lorawan_version=s.lorawan_version, lorawan_phy_version=s.lorawan_phy_version,
                     ca_cert=s.tts_ca_cert, timeout=s.tts_timeout)


def transport_from(s):
    """The :class:`flasher.dps.Transport` of resolved settings, the proxy password loaded as a secret."""
    from flasher.dps import Transport
    from flasher.errors import InputError

    proxy = s.proxy
    password = s.secret("proxy_password", required=False)
    if password is not None:
        if proxy is None:
            raise InputError(f"proxy password ({password.source}): there is no proxy to use it with "
                             f"(--proxy, proxy in flasher.toml, or HTTPS_PROXY)")
        if proxy.password is not None:
            raise InputError(f"proxy password: given twice, in {proxy.source} and in {password.source}")
        proxy = proxy.with_password(password)
    elif proxy is not None and proxy.password is not None and s.source("proxy") == "option":
        err("warning: the password in --proxy is visible in the process list; prefer --proxy-password-file "
            "or $FLASHER_PROXY_PASSWORD")
    return Transport(websockets=s.websockets, proxy=proxy)


def registration_payload_from(s):
    """The DPS registration payload: --payload-json's object, with --model-id's modelId."""
    from flasher.payload import registration_payload

    return registration_payload(s.model_id, s.payload_json)


def group_keys(s, *, prompt: bool = True):
    """``(key, other, names)``: the group key to derive device keys from (raw bytes, as a Secret), the
    other one for --check-other-key (or None), and their names (``("primary", "secondary")`` or the
    reverse with --use-secondary-key)."""
    from flasher.errors import InputError
    from flasher.keys import decode_symmetric_key
    from flasher.secrets import Secret

    use, other = ("secondary_key", "group_key") if s.use_secondary_key else ("group_key", "secondary_key")
    names = ("secondary", "primary") if s.use_secondary_key else ("primary", "secondary")
    loaded = s.secret(use, prompt=prompt, warn=err)
    key = Secret(decode_symmetric_key(loaded.reveal(), f"group {names[0]} key"), loaded.source)
    other_key = None
    if s.check_other_key:
        spare = s.secret(other, required=False, warn=err)
        if spare is None:
            env = "FLASHER_GROUP_PRIMARY_KEY" if s.use_secondary_key else "FLASHER_GROUP_SECONDARY_KEY"
            raise InputError(f"--check-other-key: the group {names[1]} key is not loaded (set {env} or use a key file)")
        other_key = Secret(decode_symmetric_key(spare.reveal(), f"group {names[1]} key"), spare.source)
    return key, other_key, names
