"""Option bundles several commands share, and the two ways they print."""

from __future__ import annotations

import functools
import json

import click

from flasher.settings import SECRETS, SETTINGS


def err(msg: str) -> None:
    """People-facing text goes to stderr; stdout is for data."""
    click.echo(msg, err=True)


def json_line(obj) -> None:
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
