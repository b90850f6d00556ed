"""Commands that talk to boards over USB serial: ``ports``, ``eui``, ``verify``."""

from __future__ import annotations

import os

import click

from flasher.commands.options import (
    at_timeout_option,
    board_selection_options,
    config_option,
    err,
    json_line,
    ledger_options,
    open_ledger,
    setting_option,
)
from flasher.errors import EXIT_FAILURE


@click.command("ports")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per port.")
def ports_cmd(as_json):
    """List serial ports; Seeeduino LoRaWAN boards are recognised by USB id.

    Columns: device, board (app, bootloader or -), USB serial number, description.
    Simulated boards appear when FLASHER_SIMULATED_PORTS names the simulator's ports.json.

    \b
    Example:
      flasher ports
      flasher ports --json | jq -r 'select(.board == "app") | .serial_number'
    """
    from flasher.ports import list_ports

    found = list_ports()
    for p in found:
        if as_json:
            json_line(p.to_json())
        else:
            desc = (p.description or "") + (" [simulated]" if p.simulated and "simulated" not in (p.description or "") else "")
            click.echo(f"{p.device}\t{p.board or '-'}\t{p.serial_number or '-'}\t{desc}")
    if not any(p.board for p in found):
        err("no Seeeduino LoRaWAN board found")


@click.command()
@board_selection_options
@at_timeout_option
@click.option("--json", "as_json", is_flag=True,
              help='One object per board: {"port", "deveui", "appeui", "devaddr", "version"}.')
@config_option
def eui(targets, as_json, **_options):
    """Print each selected board's DevEUI (16 upper-case hex digits).

    With one board the output is the DevEUI alone; with several, DEVEUI<TAB>PORT
    per board in the order selected. A board that cannot be read gets one error
    line on stderr and makes the exit code 1; the others are still printed.

    \b
    Example:
      flasher eui --port /dev/ttyACM0
      flasher eui --all --json
    """
    from flasher.rhf76 import each_board, open_module
    from flasher.settings import from_click

    timeout = from_click(["at_timeout"]).at_timeout

    def read(port):
        with open_module(port, timeout=timeout) as module:
            return module.read_ids(), (module.version() if as_json else None)

    failed = 0
    for port, res, exc in each_board(targets, read):
        if exc is not None:
            failed += 1
            err(f"error: {exc}")
            continue
        assert res is not None
        ids, version = res
        if as_json:
            json_line({"port": port, **ids.to_json(), "version": version})
        else:
            click.echo(ids.dev_eui.hex if len(targets) == 1 else f"{ids.dev_eui.hex}\t{port}")
    return EXIT_FAILURE if failed else 0


@click.command()
@board_selection_options
@at_timeout_option
@click.option("--expect", multiple=True, metavar="EUI", help="An expected DevEUI (repeatable, any spelling).")
@click.option("--expect-file", type=click.Path(dir_okay=False), help="Expected DevEUIs, one per line.")
@setting_option("--join-eui", name="join_eui", metavar="EUI",
                help="Also check the module holds this JoinEUI (and OTAA mode); from flasher.toml too")
@setting_option("--band", name="band", metavar="BAND", help="Also check the module's band (and OTAA mode), e.g. EU868; "
                "from flasher.toml too")
@ledger_options(help="Expect what the ledger (a file or postgresql://…) says was written (used when nothing else "
                     "is given)")
@click.option("--json", "as_json", is_flag=True, help='One object per board: {"port", "deveui", "ok", "problems"}.')
@config_option
def verify(targets, expect, expect_file, as_json, **_options):
    """Verify boards: DevEUI against the expected ones, settings against what was written.

    One verdict per board on stdout: ok|FAIL, port, DevEUI, problems. Exit 1 if
    any board differs or cannot be read.

    \b
    Example:
      flasher verify --all --expect-file deveuis.txt --join-eui 70B3D57ED003F06A --band EU868
    """
    from flasher.eui import EUI64
    from flasher.rhf76 import each_board
    from flasher.settings import from_click
    from flasher.verify import parse_expect_file, settings_expectation, verify_board

    s = from_click(["at_timeout", "join_eui", "band", "ledger"])
    expected = None
    if expect or expect_file:
        expected = {EUI64.parse(e, "--expect") for e in expect}
        if expect_file:
            expected |= parse_expect_file(expect_file)
    # a JoinEUI or band is checked when someone set it (option, env, flasher.toml), not by default
    join = s.join_eui.hex if s.source("join_eui") != "default" else None
    band = s.band if s.source("band") != "default" else None
    settings = settings_expectation(join, band)
    provisioned = None
    if s.source("ledger") != "default" or (expected is None and settings is None and os.path.exists(s.ledger)):
        from flasher.verify import ledger_expectations

        with open_ledger(s, create=False, readonly=True) as ledger:
            provisioned = ledger_expectations(ledger.all())
    if expected is None and settings is None and provisioned is None:
        raise click.UsageError("nothing to verify against: give --expect, --expect-file, --join-eui/--band or --ledger")
    verdicts = [res for _, res, _ in each_board(  # verify_board turns every failure into a verdict

        targets, lambda port: verify_board(port, expected_deveuis=expected, settings=settings,
                                           provisioned=provisioned, timeout=s.at_timeout)) if res is not None]
    for v in verdicts:
        if as_json:
            json_line(v.to_json())
        else:
            click.echo(v.line())
    return 0 if all(v.ok for v in verdicts) else EXIT_FAILURE
