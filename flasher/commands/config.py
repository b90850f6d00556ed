"""``flasher config``: the settings every command would use here, and where each comes from."""

from __future__ import annotations

import click

from flasher.commands.options import config_option, json_line


@click.command("config")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per setting.")
@config_option
def config_cmd(as_json, config_path):
    """Show the resolved settings: value and source (option, env, file or default).

    Secrets are shown only by where they would be read from, never by value.
    Precedence, for every command: option > environment variable > flasher.toml > default.
    """
    from flasher.settings import SECRETS, SETTINGS, resolve

    s = resolve({}, list(SETTINGS), config_path=config_path)
    rows = [(name, _show(value), source) for name, value, source in s.items()]
    for name in SECRETS:
        origin = s.secret_origin(name)
        rows.append((name, "(secret)", origin.label if origin else "not set"))
    if as_json:
        for name, value, source in rows:
            json_line({"name": name, "value": value, "source": source})
        return 0
    click.echo(f"# settings file: {s.config_path or '(none: no ./flasher.toml)'}")
    width = max(len(n) for n, _, _ in rows)
    for name, value, source in rows:
        click.echo(f"{name:<{width}}  {value if value is not None else '-'}  ({source})")
    return 0


def _show(value):
    from flasher.dps import CaCert
    from flasher.eui import EUI64
    from flasher.identity import RegistrationIdPolicy

    if isinstance(value, CaCert):
        return value.path
    if isinstance(value, EUI64):
        return value.hex
    if isinstance(value, RegistrationIdPolicy):
        return value.template
    return value if value is None or isinstance(value, (int, float)) else str(value)
