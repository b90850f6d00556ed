"""Every setting, declared once: its default, its environment variable, its ``flasher.toml`` key.

Precedence is the same for every command: command-line option > environment
variable > ``flasher.toml`` > default. A command asks :func:`resolve` for the
settings it uses; each value is parsed and checked here, once, into its typed form
(an :class:`~flasher.eui.EUI64`, a band, a :class:`~flasher.dps.CaCert` read once…),
and an error names where the bad value came from (``--timeout``, ``FLASHER_ID_SCOPE``
or ``flasher.toml: timeout``). Secrets are declared here too, but only as where
to find them: they are loaded on demand (:meth:`Resolved.secret`) and shown only
by their source.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from flasher.errors import InputError

DEFAULT_LEDGER = "flasher-ledger.sqlite3"
_SHIPPED_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")   # a template name, not a path
_STATION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,62}")


def _str(value: Any, where: str) -> str:
    text = str(value).strip()
    if not text:
        raise InputError(f"{where}: empty")
    return text


def _seconds(low: float, high: float = 86400.0) -> Callable[[Any, str], float]:
    def parse(value: Any, where: str) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            raise InputError(f"{where} {value!r}: not a number of seconds") from None
        if not math.isfinite(seconds) or not low <= seconds <= high:
            raise InputError(f"{where} {value!r}: must be a number of seconds from {low:g} to {high:g}")
        return seconds
    return parse


def _count(low: int, high: int) -> Callable[[Any, str], int]:
    def parse(value: Any, where: str) -> int:
        try:
            n = int(str(value).strip())
        except (TypeError, ValueError):
            raise InputError(f"{where} {value!r}: not a whole number") from None
        if not low <= n <= high:
            raise InputError(f"{where} {value!r}: must be from {low} to {high}")
        return n
    return parse


def _quota(value: Any, where: str) -> str:
    """A DPS quota such as ``1000/min``: checked here, turned into a governor where registrations start."""
    from flasher.governor import parse_quota

    parse_quota(value, where)
    return " ".join(str(value).split())


def _choice(*allowed: str) -> Callable[[Any, str], str]:
    def parse(value: Any, where: str) -> str:
        text = str(value).strip().lower()
        if text not in allowed:
            raise InputError(f"{where} {value!r}: one of {', '.join(allowed)}")
        return text
    return parse


def _id_scope(value: Any, where: str) -> str:
    from flasher.identity import validate_id_scope

    return validate_id_scope(str(value))


def _dps_host(value: Any, where: str) -> str:
    from flasher.identity import validate_host

    return validate_host(str(value), where)


def _band(value: Any, where: str) -> str:
    from flasher.bands import parse_band

    return parse_band(str(value))


def _eui(value: Any, where: str):
    from flasher.eui import EUI64

    return EUI64.parse(str(value), "JoinEUI")


def _id_format(value: Any, where: str):
    from flasher.identity import RegistrationIdPolicy

    return RegistrationIdPolicy(str(value))


def _ledger(value: Any, where: str) -> str:
    """A SQLite file path, or a ``postgresql://`` URL (checked; a password in it is refused)."""
    text = _str(value, where)
    if "://" in text:
        from flasher.ledger import check_url

        return check_url(text, where)
    return text


def _hostname() -> str:
    """station_id's default, found when a command asks (importing socket is not free for `flasher keys`)."""
    import socket

    return socket.gethostname() or "localhost"


def _station_id(value: Any, where: str) -> str:
    text = str(value).strip()
    if not _STATION_ID.fullmatch(text):
        raise InputError(f"{where} {text!r}: a station id is 1 to 63 letters, digits and . _ : @ - "
                         f"(starting with a letter or digit)")
    return text


def _app_key_source(value: Any, where: str):
    from flasher.keys import AppKeySource

    return AppKeySource.parse(str(value), where)


def _ca_cert(value: Any, where: str):
    from flasher.dps import load_ca_cert

    return load_ca_cert(str(value))


def _tts_app(value: Any, where: str) -> str:
    from flasher.tts import validate_id

    return validate_id(str(value), where)


def _tts_url(value: Any, where: str):
    from flasher.tts import parse_url

    return parse_url(str(value), where)


def _tts_device_id_format(value: Any, where: str):
    from flasher.tts import DeviceIdPolicy

    try:
        return DeviceIdPolicy(str(value))
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None


def _frequency_plan(value: Any, where: str) -> str:
    from flasher.tts import parse_frequency_plan

    return parse_frequency_plan(str(value), where)


def _mac_version(value: Any, where: str) -> str:
    from flasher.tts import parse_mac_version

    return parse_mac_version(str(value), where)


def _phy_version(value: Any, where: str) -> str:
    from flasher.tts import parse_phy_version

    return parse_phy_version(str(value), where)
def _id16(value: Any, where: str) -> str:
    """4 upper-case hex digits, as TR005 writes them (and `flasher config` shows them)."""
    from flasher.tr005 import parse_id16

    return f"{parse_id16(str(value), where):04X}"


def _sheet(value: Any, where: str):
    from flasher.labels import parse_sheet

    return parse_sheet(str(value), where)
def _flag(value: Any, where: str) -> bool:
    """A switch: a click flag gives a bool, flasher.toml a TOML boolean."""
    if isinstance(value, bool):
        return value
    raise InputError(f"{where} {value!r}: must be true or false")


def _model_id(value: Any, where: str) -> str:
    from flasher.payload import validate_model_id

    return validate_model_id(value, where)


def _payload_json(value: Any, where: str):
    from flasher.payload import PayloadFile, read_payload_file

    return PayloadFile(str(value), read_payload_file(value, where))


def _proxy(value: Any, where: str):
    from flasher.proxy import parse_proxy

    return parse_proxy(value, where)


class Setting(NamedTuple):
    """One setting. ``name`` is also the keyword a command's option stores into.

    The declarations are NamedTuples rather than frozen dataclasses: as immutable, and every
    command imports them at start-up, where making a dataclass's methods costs milliseconds.
    """

    name: str
    help: str
    default: Any = None                # or a function giving it, called only when it is needed
    env: str | None = None
    toml: str | None = None            # the key in flasher.toml, when it differs from ``name``
    option: str | None = None          # how the command line spells it, for messages
    env_aliases: tuple[str, ...] = ()  # more environment variables, after ``env`` (https_proxy beside HTTPS_PROXY)
    parse: Callable[[Any, str], Any] = _str
    toml_type: type | tuple[type, ...] = str
    path: bool | Callable[[str], bool] = False   # a path in flasher.toml is relative to the file

    def is_path(self, value: str) -> bool:
        return self.path(value) if callable(self.path) else self.path

    @property
    def key(self) -> str:
        return self.toml or self.name

    @property
    def flag(self) -> str:
        return self.option or "--" + self.name.replace("_", "-")


class SecretSetting(NamedTuple):
    """Where a secret may come from. ``flasher.toml`` may only *reference* it: ``<key>_env`` or ``<key>_file``."""

    name: str
    what: str                 # for messages: "group primary key"
    env: str                  # the default environment variable
    toml: str                 # prefix of the flasher.toml references
    option: str | None        # a plain value on the command line (warns: visible in the process list)
    file_option: str | None   # a file on the command line


SETTINGS: dict[str, Setting] = {s.name: s for s in [
    Setting("id_scope", "DPS ID scope, e.g. 0ne0001A2B3", env="FLASHER_ID_SCOPE", parse=_id_scope),
    Setting("dps_host", "DPS endpoint (the SDK dials port 8883, or 443 with --websockets)",
            default="global.azure-devices-provisioning.net",
            env="FLASHER_DPS_HOST", parse=_dps_host),
    Setting("ca_cert", "PEM root of trust for a private DPS (the emulator, a gateway)", parse=_ca_cert, path=True),
    Setting("template", "header template: a shipped name or a file path", default="seeed-lorawan",
            path=lambda v: not _SHIPPED_NAME.fullmatch(v)),
    Setting("band", "LoRaWAN band as the RHF76 names it", default="EU868", parse=_band),
    Setting("join_eui", "JoinEUI (AppEUI) to program", default="0000000000000000", parse=_eui),
    Setting("app_key_source", "AppKey per board: random, derived (from the master secret) or given",
            toml="app_key", parse=_app_key_source),
    Setting("registration_id_format", "how a DevEUI becomes a DPS registration id", default="{deveui}",
            parse=_id_format),
    Setting("out_dir", "where headers go, one per board", default="headers", path=True),
    Setting("ledger", "the ledger: a SQLite file, or postgresql://user@host/db shared by stations",
            default=DEFAULT_LEDGER, parse=_ledger, path=lambda v: "://" not in v),
    Setting("station_id", "this station's name in a shared ledger", default=_hostname,
            env="FLASHER_STATION_ID", parse=_station_id),
    Setting("claim_timeout", "seconds without a heartbeat before another station may take over a board",
            default=60.0, parse=_seconds(1.0), toml_type=(int, float)),
    Setting("timeout", "seconds for each DPS registration and test message", default=60.0,
            parse=_seconds(1.0), toml_type=(int, float)),
    Setting("at_timeout", "seconds to wait for each AT answer", default=2.0, option="--timeout",
            parse=_seconds(0.05, 600.0), toml_type=(int, float)),
    # Every attached board at once (= pipeline.DEFAULT_CONCURRENCY). No more: the SDK's MQTT client (paho) waits
    # with select(), which takes descriptors below 1024 only, and each board in DPS holds three of them.
    Setting("concurrency", "boards (or registrations) at once, at most", default=256, parse=_count(1, 256),
            toml_type=int),
    Setting("dps_rate", "DPS registrations allowed per second, minute or hour (the quota of your DPS units); "
            "a 429 slows the run, success speeds it back up", default="1000/min", env="FLASHER_DPS_RATE",
            parse=_quota),
    Setting("hub_rate", "new IoT Hub device connections allowed per second (the hub's throttle for your tier "
            "and units), for the test messages", default="100/s", env="FLASHER_HUB_RATE", parse=_quota),
    Setting("test_message", "the proof message sent from the hub", default="TestMessage"),
    Setting("fqbn", "board FQBN for --upload", default="Seeeduino:samd:rolawan"),
    Setting("sketch", "sketch folder for --upload (default: the shipped flasher_otaa)", path=True),
    Setting("arduino_cli", "arduino-cli executable (default: found on PATH)"),
    # The Things Stack (the network step): on when an application is given.
    Setting("tts_app", "The Things Stack application id; registers every board there (the network step)",
            env="FLASHER_TTS_APP", parse=_tts_app),
    Setting("tts_url", "The Things Stack address, e.g. https://eu1.cloud.thethings.network", env="FLASHER_TTS_URL",
            parse=_tts_url),
    Setting("tts_is_url", "Identity Server address, if not --tts-url (a self-hosted cluster)", env="FLASHER_TTS_IS_URL",
            parse=_tts_url),
    Setting("tts_js_url", "Join Server address, if not --tts-url", env="FLASHER_TTS_JS_URL", parse=_tts_url),
    Setting("tts_ns_url", "Network Server address, if not --tts-url", env="FLASHER_TTS_NS_URL", parse=_tts_url),
    Setting("tts_as_url", "Application Server address, if not --tts-url", env="FLASHER_TTS_AS_URL", parse=_tts_url),
    Setting("tts_ca_cert", "PEM root of trust for a private The Things Stack (the emulator)", parse=_ca_cert,
            path=True),
    Setting("tts_device_id_format", "how a DevEUI becomes an end device id; {deveui} is its lower-case hex",
            default="eui-{deveui}", parse=_tts_device_id_format),
    Setting("frequency_plan", "The Things Stack frequency plan id (default: from the band, see the README)",
            parse=_frequency_plan),
    Setting("lorawan_version", "LoRaWAN MAC version the module speaks (the RHF76-052: 1.0.2)", default="1.0.2",
            parse=_mac_version),
    Setting("lorawan_phy_version", "LoRaWAN regional parameters version (1.0.2-b for the RHF76-052)",
            default="1.0.2-b", parse=_phy_version),
    Setting("tts_timeout", "seconds for each board's network step, retries of 429/503 included", default=60.0,
            parse=_seconds(1.0), toml_type=(int, float)),
    Setting("labels", "write each board's label (TR005 QR code and DevEUI, PNG and SVG) into this folder", path=True),
    Setting("label_vendor_id", "TR005 vendor id on labels: 4 hex digits from the LoRa Alliance", default="0000",
            parse=_id16),
    Setting("label_model_id", "TR005 model id on labels: 4 hex digits of the vendor's choosing", default="0000",
            parse=_id16),
    Setting("label_sheet", "PDF label sheet: a4, a4-65, letter, or PAGE:COLSxROWS", default="a4", option="--sheet",
            parse=_sheet),
    Setting("station_settle", "seconds a newly plugged port must stay before its board is started", default=1.0,
            option="--settle", parse=_seconds(0.0, 60.0), toml_type=(int, float)),
    Setting("model_id", "IoT Plug and Play model id (DTMI) sent in the DPS registration payload, so IoT Central "
            "assigns the device template, e.g. dtmi:com:example:Thermostat;1", parse=_model_id),
    Setting("payload_json", "a file holding the JSON object sent as the DPS registration payload (custom allocation)",
            parse=_payload_json, path=True),
    Setting("websockets", "MQTT over WebSockets on port 443 (for DPS and the hub) instead of port 8883",
            default=False, parse=_flag, toml_type=bool),
    Setting("proxy", "proxy for DPS and the hub: http://[user@]host:port or socks5://..., 'none' for none",
            env="HTTPS_PROXY", env_aliases=("https_proxy",), parse=_proxy),
    Setting("use_secondary_key", "derive device keys from the group's secondary key instead of its primary",
            default=False, parse=_flag, toml_type=bool),
    Setting("check_other_key", "when DPS refuses a device key (401), try the group's other key once and say "
            "whether it works", default=False, parse=_flag, toml_type=bool),
    Setting("builder", "how --upload builds: arduino-cli, or arduino-builder (offline, Debian's, with --samd-core)",
            default="arduino-cli", parse=_choice("arduino-cli", "arduino-builder")),
    Setting("samd_core", "Seeed SAMD core folder for --builder arduino-builder (hardware/Seeeduino/samd, tools/CMSIS-*)",
            env="FLASHER_ARDUINO_SAMD", path=True),
    Setting("bossac", "bossac for --builder arduino-builder uploads (default: found on PATH; must be < 1.8)"),
]}

SECRETS: dict[str, SecretSetting] = {s.name: s for s in [
    SecretSetting("group_key", "group primary key", "FLASHER_GROUP_PRIMARY_KEY", "group_key", "--group-key",
                  "--group-key-file"),
    SecretSetting("secondary_key", "group secondary key", "FLASHER_GROUP_SECONDARY_KEY", "secondary_key",
                  "--secondary-key", "--secondary-key-file"),
    SecretSetting("app_key_master", "AppKey master secret", "FLASHER_APPKEY_MASTER", "app_key_master", None,
                  "--app-key-master-file"),
    SecretSetting("app_key", "AppKey", "FLASHER_APP_KEY", "app_key", "--app-key", "--app-key-file"),
    SecretSetting("device_key", "device key", "FLASHER_DEVICE_KEY", "device_key", "--device-key",
                  "--device-key-file"),
    SecretSetting("tts_api_key", "API key for The Things Stack", "FLASHER_TTS_API_KEY", "tts_api_key", None,
                  "--tts-api-key-file"),
    SecretSetting("ledger_password", "ledger password", "PGPASSWORD", "ledger_password", None,
                  "--ledger-password-file"),
    SecretSetting("proxy_password", "proxy password", "FLASHER_PROXY_PASSWORD", "proxy_password", None,
                  "--proxy-password-file"),
]}


def toml_keys() -> dict[str, Setting | SecretSetting]:
    """Every key flasher.toml may hold, and what declares it."""
    keys: dict[str, Setting | SecretSetting] = {s.key: s for s in SETTINGS.values()}
    for sec in SECRETS.values():
        keys[f"{sec.toml}_env"] = sec
        keys[f"{sec.toml}_file"] = sec
    return keys


class SecretOrigin(NamedTuple):
    kind: str            # option | file | env
    label: str           # what `flasher config` and messages show
    ref: str | None      # the file's path or the variable's name
    level: int           # 0 command line, 1 environment, 2 flasher.toml: the precedence order


class Resolved:
    """The settings one command uses: typed values and where each came from.

    ``repr`` shows sources and non-secret values only; secrets are loaded lazily
    by :meth:`secret` and come back as :class:`~flasher.secrets.Secret`.
    """

    def __init__(self, values: dict[str, Any], sources: dict[str, str], file_values: dict[str, Any],
                 options: dict[str, Any], config_path: str | None):
        self._values, self._sources = values, sources
        self._file, self._options, self.config_path = file_values, options, config_path

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def source(self, name: str) -> str:
        return self._sources[name]

    def items(self) -> Iterable[tuple[str, Any, str]]:
        for name, value in self._values.items():
            yield name, value, self._sources[name]

    def __repr__(self) -> str:
        shown = ", ".join(f"{n}={v!r} ({s})" for n, v, s in self.items())
        return f"Resolved({shown})"

    def secret_origin(self, name: str) -> SecretOrigin | None:
        """Where secret ``name`` would come from, without reading it."""
        sec = SECRETS[name]
        opt = self._options.get(sec.name) if sec.option else None
        opt_file = self._options.get(f"{sec.name}_file") if sec.file_option else None
        if opt:
            return SecretOrigin("option", f"{sec.option} (command line)", None, 0)
        if opt_file:
            return SecretOrigin("file", f"{sec.file_option} {opt_file}", str(opt_file), 0)
        if os.environ.get(sec.env, "").strip():
            return SecretOrigin("env", f"${sec.env}", sec.env, 1)
        env_ref, file_ref = self._file.get(f"{sec.toml}_env"), self._file.get(f"{sec.toml}_file")
        if env_ref:
            return SecretOrigin("env", f"${env_ref} (flasher.toml {sec.toml}_env)", env_ref, 2)
        if file_ref:
            return SecretOrigin("file", f"{file_ref} (flasher.toml {sec.toml}_file)", file_ref, 2)
        return None

    def secret(self, name: str, *, required: bool = True, prompt: bool = False, warn=None):
        """Load secret ``name`` from the first source that has it, as a Secret (or None)."""
        from flasher.secrets import Secret, read_secret_file, resolve_secret

        sec = SECRETS[name]
        origin = self.secret_origin(name)
        if origin is None:
            text = resolve_secret(sec.what, env_var=sec.env, prompt=prompt, required=required)
            return None if text is None else Secret(text, "prompt")
        kind, label, ref = origin.kind, origin.label, origin.ref or ""
        if kind == "option":
            kwargs = {} if warn is None else {"warn": warn}
            text = resolve_secret(sec.what, option=self._options[sec.name], option_name=sec.option, env_var=sec.env,
                                  **kwargs)
        elif kind == "file":
            text = read_secret_file(ref, sec.what)
        else:
            text = os.environ.get(ref, "").strip()
            if not text:
                if not required:
                    return None
                raise InputError(f"{sec.what}: ${ref} (named in flasher.toml) is not set")
        if text is None:
            raise InputError(f"{sec.what}: missing")
        return Secret(text, label)


def resolve(options: dict[str, Any], names: Iterable[str], *, config_path: str | None = None,
            given: Callable[[str], bool] | None = None, cwd: str | None = None) -> Resolved:
    """Resolve ``names`` for one command.

    ``options`` are the command's parsed options (an option's keyword is the setting's
    name); ``given(name)`` says whether the user actually typed it (click's parameter
    source), so a flag's default never overrides the environment or the file.
    """
    from flasher.config import load_file

    file_values, path = load_file(config_path, cwd=cwd)
    typed = given or (lambda n: options.get(n) is not None)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in names:
        s = SETTINGS[name]
        env = next((e for e in (s.env, *s.env_aliases) if e and os.environ.get(e, "").strip()), None)
        if name in options and options[name] is not None and typed(name):
            raw, where, src = options[name], s.flag, "option"
        elif env is not None:
            raw, where, src = os.environ[env], f"${env}", f"env {env}"
        elif s.key in file_values:
            raw, where, src = file_values[s.key], f"{path}: {s.key}", f"file {path}"
        else:
            default = s.default() if callable(s.default) else s.default
            values[name], sources[name] = (s.parse(default, "default") if default is not None else None), "default"
            continue
        values[name], sources[name] = s.parse(raw, where), src
    return Resolved(values, sources, file_values, options, path)


def from_click(names: Iterable[str]) -> Resolved:
    """:func:`resolve` for the running click command (its options and its ``--config``)."""
    import click
    from click.core import ParameterSource

    ctx = click.get_current_context()
    params = ctx.params

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.PROMPT)

    return resolve(params, names, config_path=params.get("config_path"), given=given)
