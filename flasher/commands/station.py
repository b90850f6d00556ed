"""``flasher station``: provision each board as it is plugged in, until Ctrl-C.

It takes every option ``flasher provision`` takes (they are copied from it, so the two can never drift apart),
except the board selection: the station selects boards by watching them arrive.
"""

from __future__ import annotations

import signal
import sys

import click

from flasher.commands.options import setting_option
from flasher.commands.provision import PROVISION_SETTINGS, build_settings, provision
from flasher.errors import EXIT_FAILURE, InputError

STATION_SETTINGS = [*PROVISION_SETTINGS, "station_settle"]
_NOT_FROM_PROVISION = {"ports", "serial_numbers", "all_boards", "as_json", "quiet"}


@click.command()
@setting_option("--settle", name="station_settle", metavar="SECONDS")
@click.option("--udev/--no-udev", default=None,
              help="Wake on udev events as well as polling (Linux; pip install 'flasher[udev]') [default: when available].")
@click.option("--no-bell", is_flag=True, help="No terminal bell when a board is done (one) or failed (three).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per event on stdout: steps, plugs, unplugs, verdicts and the final tally.")
@click.option("-q", "--quiet", is_flag=True, help="No screen or lines on stderr.")
def station(udev, no_bell, as_json, quiet, no_test_message, upload, extras, force, **_options):
    """Provision every board plugged in, one after another, until Ctrl-C.

    Each board starts once its port has been there for --settle seconds and runs
    through the same steps, ledger and settings as `flasher provision`, alongside
    the boards already running. A board the ledger says is done is reported as
    already done; one unplugged mid-way stops where it was and resumes when it is
    plugged back in; a failed one is tried again when it is replugged. Ctrl-C
    (or SIGTERM) lets each board finish its current step, then prints the tally.

    On a terminal: a live screen with a coloured verdict per board and a bell.
    Otherwise one line per event on stderr; --json adds JSON events on stdout.
    Exit 0 when every board ended done or already done, else 1.

    \b
    Example:
      export FLASHER_GROUP_PRIMARY_KEY=...
      flasher station --id-scope 0ne0001A2B3 --labels labels/
      flasher station --json --no-bell | my-stack-light
    """
    from flasher import progress
    from flasher.commands.options import open_ledger
    from flasher.pipeline import preflight
    from flasher.settings import from_click
    from flasher.station import Station, discover

    s = from_click(STATION_SETTINGS)
    if _options.get("app_key") and s.app_key_source not in (None, "given"):
        raise InputError("--app-key is for --app-key-source given")
    settings = build_settings(s, upload=upload, no_test_message=no_test_message, force=force, extras=extras)
    preflight(settings, [])   # everything checkable is checked before the ledger or a board is touched
    discover(strict=True)     # and so is the port listing ($FLASHER_SIMULATED_PORTS naming no file, say)
    ledger = open_ledger(s, station=s.station_id, stale_after=s.claim_timeout)
    reporter = progress.for_station(json_stream=sys.stdout if as_json else None, bell=not no_bell, quiet=quiet)
    bench = Station(settings, ledger, reporter, settle=s.station_settle, concurrency=s.concurrency, udev=udev)
    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, lambda *_: bench.stop()) for sig in stop_signals}
    try:
        tally = bench.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        reporter.close()
        ledger.close()
    return 0 if tally.ok else EXIT_FAILURE


# provision's options, as provision declares them (settings, secrets, --upload, --labels, --force, ...)
station.params[:0] = [p for p in provision.params if p.name not in _NOT_FROM_PROVISION]
