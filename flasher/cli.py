"""Command line: parse options, call the library, print. Nothing else lives here.

Data goes to stdout, people-facing text to stderr. One error funnel (:func:`main`)
turns every :class:`FlasherError` and usage error into one line and an exit code:
0 success, 1 failure, 2 bad usage or input. Heavy dependencies (the Azure SDK,
Jinja2) are imported inside the commands that need them.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

import click

from flasher import __version__
from flasher.errors import EXIT_FAILURE, EXIT_USAGE, FlasherError, InputError
from flasher.secrets import Redactor

log = logging.getLogger("flasher")

GROUP_PRIMARY_ENV = "FLASHER_GROUP_PRIMARY_KEY"
GROUP_SECONDARY_ENV = "FLASHER_GROUP_SECONDARY_KEY"
DEFAULT_LEDGER_NAME = "flasher-ledger.sqlite3"  # in the working directory


def err(msg: str) -> None:
    click.echo(msg, err=True)


def _setup_logging(verbose: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(Redactor())
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    # Third-party SDKs print their own tracebacks on disconnects: keep them quiet unless -vv.
    for noisy in ("azure", "paho", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose > 1 else logging.CRITICAL)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="flasher")
@click.option("-v", "--verbose", count=True, help="Log what happens (repeat for SDK internals). Secrets are masked.")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """Provision Seeeduino LoRaWAN boards for Azure IoT DPS.

    Group keys come from FLASHER_GROUP_PRIMARY_KEY / FLASHER_GROUP_SECONDARY_KEY,
    a key file, or a hidden prompt; they are never printed or stored.
    """
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    _setup_logging(verbose)


# --- shared option bundles ----------------------------------------------------

def group_key_options(f):
    """--group-key/--group-key-file and the secondary pair, resolved into ``group_keys``."""

    @click.option("--group-key", "group_key", metavar="KEY", help=f"Group primary key (visible in the process list: prefer ${GROUP_PRIMARY_ENV}).")
    @click.option("--group-key-file", type=click.Path(dir_okay=False), help="File holding the group primary key.")
    @click.option("--secondary-key", "secondary_key", metavar="KEY", help=f"Group secondary key (prefer ${GROUP_SECONDARY_ENV}).")
    @click.option("--secondary-key-file", type=click.Path(dir_okay=False), help="File holding the group secondary key.")
    @functools.wraps(f)
    def wrapper(*args, group_key, group_key_file, secondary_key, secondary_key_file, **kwargs):
        kwargs["group_keys"] = GroupKeySource(group_key, group_key_file, secondary_key, secondary_key_file)
        return f(*args, **kwargs)

    return wrapper


class GroupKeySource:
    """Deferred resolution so a command asks for the key only when it needs one."""

    def __init__(self, primary, primary_file, secondary, secondary_file):
        self._args = (primary, primary_file, secondary, secondary_file)

    def load(self, *, secondary: bool = True, required: bool = True, config=None) -> tuple[bytes | None, bytes | None]:
        """Options first, then what flasher.toml references (a file or an env var name), then the default env vars."""
        from flasher.keys import decode_symmetric_key
        from flasher.secrets import resolve_secret

        primary, primary_file, sec, sec_file = self._args
        cfg = config
        p = resolve_secret("group primary key", option=primary, option_name="--group-key",
                           file=primary_file or (cfg and cfg.group_key_file),
                           env_var=(cfg and cfg.group_key_env) or GROUP_PRIMARY_ENV, prompt=True, required=required)
        s = None
        if secondary:
            s = resolve_secret("group secondary key", option=sec, option_name="--secondary-key",
                               file=sec_file or (cfg and cfg.secondary_key_file),
                               env_var=(cfg and cfg.secondary_key_env) or GROUP_SECONDARY_ENV, required=False)
        return (decode_symmetric_key(p, "group primary key") if p else None,
                decode_symmetric_key(s, "group secondary key") if s else None)


def id_format_option(f):
    return click.option("--registration-id-format", "id_format", default="{deveui}", show_default=True,
                        help="How a DevEUI becomes a DPS registration id; {deveui} is 16 lower-case hex digits.")(f)


# --- keys ----------------------------------------------------------------------

@cli.command()
@click.argument("ids", nargs=-1, metavar="[ID_OR_EUI]...")
@click.option("--input", "input_file", type=click.File("r", encoding="utf-8"), help="Read ids, one per line ('-' for stdin).")
@click.option("--format", "fmt", type=click.Choice(["text", "csv", "json"]), default="text", show_default=True)
@click.option("--on-error", type=click.Choice(["stop", "skip"]), default="stop", show_default=True,
              help="On a bad id: stop at once, or report it and go on. Either way the exit code is 1.")
@id_format_option
@group_key_options
def keys(ids, input_file, fmt, on_error, id_format, group_keys):
    """Derive DPS device keys from the enrollment group's keys.

    Each ID_OR_EUI is a registration id, or a DevEUI that becomes one through
    --registration-id-format. Output streams: any number of ids, constant memory.

    \b
    Example:
      export FLASHER_GROUP_PRIMARY_KEY=...   # never on the command line
      flasher keys 2CF7F12024900138 --format csv
      flasher keys --input deveuis.txt --format json > keys.jsonl
    """
    from flasher.identity import RegistrationIdPolicy
    from flasher.keys import key_rows

    if not ids and input_file is None:
        raise click.UsageError("give ids as arguments or --input FILE")
    policy = RegistrationIdPolicy(id_format)
    primary, secondary = group_keys.load()

    def items():
        for n, a in enumerate(ids, 1):
            yield f"argument {n}", a
        if input_file is not None:
            for n, line in enumerate(input_file, 1):
                if line.strip():
                    yield f"line {n}", line

    # ids cannot contain ',', quotes or backslashes and keys are base64: no CSV quoting or JSON escaping needed
    if fmt == "csv":
        row = "{1},{2},{3}\n".format
    elif fmt == "json":
        row = '{{"registration_id": "{1}", "primary_device_key": "{2}", "secondary_device_key": {3}}}\n'.format
    else:
        row = "{1}\t{2}\t{3}\n".format if secondary else "{1}\t{2}\n".format
    null = "null" if fmt == "json" else ""
    out, batch, failed = sys.stdout, [], 0
    if fmt == "csv":
        batch.append("registration_id,primary_device_key,secondary_device_key\n")
    for where, rid, p, s, exc in key_rows(items(), policy, primary, secondary):
        if exc is not None:
            out.writelines(batch)
            batch.clear()
            out.flush()
            failed += 1
            err(f"error: {where}: {exc}")
            if on_error == "stop":
                return EXIT_FAILURE
            continue
        batch.append(row(where, rid, p, (f'"{s}"' if fmt == "json" else s) if s else null))
        if len(batch) >= 1024:  # constant memory, few syscalls
            out.writelines(batch)
            batch.clear()
    out.writelines(batch)
    return EXIT_FAILURE if failed else 0


# --- simulators ------------------------------------------------------------------

@cli.group()
def simulate():
    """Run the built-in simulators: boards on pseudo-terminals, a local DPS + IoT Hub."""


# --- board commands (ports, eui, verify, simulate boards) --------------------------

def board_selection_options(f):
    """``--port``/``--serial-number`` (both repeatable) and ``--all``, resolved into ``targets``.

    ``targets`` is a list of device paths or pyserial URLs, duplicates dropped,
    in the order given. Nothing selected is a usage error: never a prompt.
    """

    @click.option("--port", "ports", multiple=True, metavar="PORT",
                  help="Serial port or pyserial URL (repeatable).")
    @click.option("--serial-number", "serial_numbers", multiple=True, metavar="SN",
                  help="Pick a board by its USB serial number (repeatable); survives re-enumeration.")
    @click.option("--all", "all_boards", is_flag=True, help="Every Seeeduino LoRaWAN board running a sketch.")
    @functools.wraps(f)
    def wrapper(*args, ports, serial_numbers, all_boards, **kwargs):
        from flasher.ports import resolve_targets

        kwargs["targets"] = resolve_targets(list(ports), list(serial_numbers), all_boards)
        return f(*args, **kwargs)

    return wrapper


def board_timeout_option(f):
    return click.option("--timeout", type=click.FloatRange(min=0.05), default=2.0, show_default=True, metavar="S",
                        help="Seconds to wait for each AT answer.")(f)


def _json_line(obj) -> None:
    import json

    click.echo(json.dumps(obj))


@cli.command("ports")
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
            _json_line(p.to_json())
        else:
            desc = (p.description or "") + (" [simulated]" if p.simulated and "simulated" not in (p.description or "") else "")
            click.echo(f"{p.device}\t{p.board or '-'}\t{p.serial_number or '-'}\t{desc}")
    if not any(p.board for p in found):
        err("no Seeeduino LoRaWAN board found")


@cli.command()
@board_selection_options
@board_timeout_option
@click.option("--json", "as_json", is_flag=True,
              help='One object per board: {"port", "deveui", "appeui", "devaddr", "version"}.')
def eui(targets, timeout, as_json):
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

    def read(port):
        with open_module(port, timeout=timeout) as module:
            return module.read_ids(), (module.version() if as_json else None)

    failed = 0
    for port, res, exc in each_board(targets, read):
        if exc is not None:
            failed += 1
            err(f"error: {exc}")
            continue
        ids, version = res
        if as_json:
            _json_line({"port": port, **ids.to_json(), "version": version})
        else:
            click.echo(ids.dev_eui.hex if len(targets) == 1 else f"{ids.dev_eui.hex}\t{port}")
    return EXIT_FAILURE if failed else 0


@cli.command()
@board_selection_options
@board_timeout_option
@click.option("--expect", multiple=True, metavar="EUI", help="An expected DevEUI (repeatable, any spelling).")
@click.option("--expect-file", type=click.Path(dir_okay=False), help="Expected DevEUIs, one per line.")
@click.option("--join-eui", metavar="EUI", help="Also check the module holds this JoinEUI (and OTAA mode).")
@click.option("--band", metavar="BAND", help="Also check the module's band (and OTAA mode), e.g. EU868.")
@click.option("--ledger", "ledger_path", type=click.Path(dir_okay=False),
              help=f"Expect what the ledger says was written (default when nothing else is given: {DEFAULT_LEDGER_NAME}).")
@click.option("--json", "as_json", is_flag=True, help='One object per board: {"port", "deveui", "ok", "problems"}.')
def verify(targets, timeout, expect, expect_file, join_eui, band, ledger_path, as_json):
    """Verify boards: DevEUI against the expected ones, settings against what was written.

    One verdict per board on stdout: ok|FAIL, port, DevEUI, problems. Exit 1 if
    any board differs or cannot be read.

    \b
    Example:
      flasher verify --all --expect-file deveuis.txt --join-eui 70B3D57ED003F06A --band EU868
    """
    from flasher.eui import EUI64
    from flasher.rhf76 import each_board
    from flasher.verify import parse_expect_file, settings_expectation, verify_board

    expected = None
    if expect or expect_file:
        expected = {EUI64.parse(e, "--expect") for e in expect}
        if expect_file:
            expected |= parse_expect_file(expect_file)
    settings = settings_expectation(join_eui, band)
    provisioned = None
    if ledger_path or (expected is None and settings is None and os.path.exists(DEFAULT_LEDGER_NAME)):
        from flasher.ledger import Ledger
        from flasher.verify import ledger_expectations

        with Ledger(ledger_path or DEFAULT_LEDGER_NAME, create=False) as ledger:
            provisioned = ledger_expectations(ledger.all())
    if expected is None and settings is None and provisioned is None:
        raise click.UsageError("nothing to verify against: give --expect, --expect-file, --join-eui/--band or --ledger")
    verdicts = [res for _, res, _ in each_board(
        targets, lambda port: verify_board(port, expected_deveuis=expected, settings=settings,
                                           provisioned=provisioned, timeout=timeout))]
    for v in verdicts:
        if as_json:
            _json_line(v.to_json())
        else:
            click.echo(v.line())
    return 0 if all(v.ok for v in verdicts) else EXIT_FAILURE


@simulate.command("boards")
@click.option("--count", type=click.IntRange(1, 64), default=1, show_default=True, help="How many boards.")
@click.option("--state", "state_dir", type=click.Path(file_okay=False),
              help="EEPROM directory (board-N.json, ports.json), kept across runs. Default: a temporary one.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for serial numbers and DevEUIs.")
@click.option("--latency", type=click.FloatRange(min=0), default=0.0, metavar="S", help="Delay before every answer.")
@click.option("--boot-noise", is_flag=True, help="Banner and garbage before the first answer.")
@click.option("--echo", "echo_", is_flag=True, help="Echo every command line.")
@click.option("--silent", is_flag=True, help="Read commands, answer nothing.")
@click.option("--corrupt", type=int, default=0, metavar="N", help="Mangle the next N answers (-1: all).")
@click.option("--unplug-after", type=click.IntRange(min=0), metavar="N", help="Vanish on command N+1.")
@click.option("--json", "as_json", is_flag=True, help='One object per board: {"port", "serial_number", "deveui"}.')
def simulate_boards(count, state_dir, seed, latency, boot_noise, echo_, silent, corrupt, unplug_after, as_json):
    """Simulated Seeeduino LoRaWAN boards on pseudo-terminals, until Ctrl-C or SIGTERM.

    Prints each board's port path on stdout. To find them with --all or
    --serial-number, export FLASHER_SIMULATED_PORTS=<state>/ports.json (printed on stderr).

    \b
    Example:
      flasher simulate boards --count 3 --state ./boards &
      FLASHER_SIMULATED_PORTS=./boards/ports.json flasher eui --all
    """
    import signal
    import threading

    from flasher.sim.board import BoardSimulator, Faults

    faults = Faults(latency=latency, boot_noise=boot_noise, silent=silent, unplug_after=unplug_after,
                    corrupt=corrupt, echo=echo_)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with BoardSimulator(count=count, state_dir=state_dir, seed=seed, faults=faults) as sim:
            for b in sim.boards:
                if as_json:
                    _json_line({"port": b.port, "serial_number": b.serial_number, "deveui": b.deveui})
                else:
                    click.echo(b.port)
            sys.stdout.flush()
            err(f"simulating {count} board(s); export FLASHER_SIMULATED_PORTS={sim.ports_file} ; Ctrl-C to stop")
            stop.wait()
            err("stopping simulated boards")
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0


# --- header --------------------------------------------------------------------------

APP_KEY_ENV = "FLASHER_APP_KEY"
APPKEY_MASTER_ENV = "FLASHER_APPKEY_MASTER"
ID_SCOPE_ENV = "FLASHER_ID_SCOPE"


def _app_key_choice(app_key, app_key_file, master_file, random_key) -> dict:
    """Which AppKey source the options (or, failing them, the environment) chose: kwargs for resolve_app_key."""
    from flasher.secrets import Redactor, read_secret_file, resolve_secret

    given = [n for n, v in (("--app-key", app_key), ("--app-key-file", app_key_file),
                            ("--app-key-master-file", master_file), ("--random-app-key", random_key)) if v]
    if len(given) > 1:
        raise click.UsageError(f"{' and '.join(given)} exclude each other: choose one AppKey source")
    if app_key:
        return {"app_key_text": resolve_secret("AppKey", option=app_key, option_name="--app-key", env_var=APP_KEY_ENV,
                                               warn=err)}
    if app_key_file:
        text = read_secret_file(app_key_file, "AppKey")
        Redactor.add(text)
        return {"app_key_text": text}
    if master_file:
        text = read_secret_file(master_file, "AppKey master secret")
        Redactor.add(text)
        return {"master_secret": text}
    if random_key:
        return {"random": True}
    env_key = os.environ.get(APP_KEY_ENV, "").strip()
    env_master = os.environ.get(APPKEY_MASTER_ENV, "").strip()
    if env_key and env_master:
        raise InputError(f"AppKey: both {APP_KEY_ENV} and {APPKEY_MASTER_ENV} are set; unset one or choose with an option")
    if env_key:
        Redactor.add(env_key)
        return {"app_key_text": env_key}
    if env_master:
        Redactor.add(env_master)
        return {"master_secret": env_master}
    raise InputError(f"AppKey: no source; give --app-key-file FILE (or {APP_KEY_ENV}), --app-key-master-file FILE "
                     f"(or {APPKEY_MASTER_ENV}) to derive it from the DevEUI, or --random-app-key")


@cli.command()
@click.argument("dev_eui", metavar="DEVEUI")
@click.option("--join-eui", default="0000000000000000", show_default=True,
              help="JoinEUI (AppEUI). All zeros suits LoRaWAN 1.0.x devices on TTN.")
@click.option("--app-key", "app_key", metavar="HEX",
              help=f"The AppKey, 32 hex digits (visible in the process list: prefer --app-key-file or ${APP_KEY_ENV}).")
@click.option("--app-key-file", type=click.Path(dir_okay=False), help="File holding the AppKey (32 hex digits).")
@click.option("--app-key-master-file", "master_file", type=click.Path(dir_okay=False),
              help=f"Derive the AppKey from the master secret in this file and the DevEUI (or ${APPKEY_MASTER_ENV}): "
                   "first 16 bytes of HMAC-SHA256(master, 'flasher-appkey-v1' + DevEUI bytes).")
@click.option("--random-app-key", "random_key", is_flag=True,
              help="A new random AppKey: it exists only in this header, so the network server must get it from there.")
@click.option("--band", default="EU868", show_default=True,
              help="LoRaWAN band as the RHF76 names it: EU868, US915, US915HYBRID, AU915, AS923, CN470, KR920, IN865, EU433.")
@click.option("--id-scope", metavar="SCOPE", envvar=ID_SCOPE_ENV, help=f"DPS id scope, like 0ne0001A2B3 (or ${ID_SCOPE_ENV}).")
@click.option("--template", default="seeed-lorawan", show_default=True, metavar="NAME|PATH",
              help="A shipped template (seeed-lorawan, lmic, azure-dps) or a Jinja2 file.")
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE", help="Extra string macro #define NAME \"VALUE\" (repeatable).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write here (atomically, mode 0600) instead of stdout.")
@id_format_option
@group_key_options
def header(dev_eui, join_eui, app_key, app_key_file, master_file, random_key, band, id_scope, template, sets, output,
           id_format, group_keys):
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
    from flasher.header import build_header_data, parse_band, parse_sets, render_header, resolve_app_key, write_header
    from flasher.identity import RegistrationIdPolicy
    from flasher.keys import derive_device_key

    dev = EUI64.parse(dev_eui, "DevEUI")
    join = EUI64.parse(join_eui, "JoinEUI")
    band = parse_band(band)
    extras = parse_sets(sets)
    reg_id = RegistrationIdPolicy(id_format).for_eui(dev)
    key, source = resolve_app_key(dev, **_app_key_choice(app_key, app_key_file, master_file, random_key))
    primary, _ = group_keys.load(secondary=False)
    data = build_header_data(dev, join_eui=join, app_key=key, app_key_source=source, band=band, id_scope=id_scope,
                             registration_id=reg_id, device_key=derive_device_key(primary, reg_id), extras=extras)
    text = render_header(data, template)
    log.debug("header for %s: template %s, AppKey %s, registration id %s", dev, template, source, reg_id)
    if output:
        digest = write_header(text, output)
        err(f"wrote {output} (sha256 {digest})")
    else:
        click.echo(text, nl=False)
    if source == "random":
        err("note: the AppKey is random and exists only in this header: hand it to the network server from there")


# --- DPS (register, simulate dps) ----------------------------------------------------

DEVICE_KEY_ENV = "FLASHER_DEVICE_KEY"


@cli.command()
@click.argument("ids", nargs=-1, required=True, metavar="ID_OR_EUI...")
@click.option("--enrollment", type=click.Choice(["group", "individual"]), default="group", show_default=True,
              help="Group: the device key is derived from the group key. Individual: the enrollment's own key.")
@click.option("--id-scope", envvar="FLASHER_ID_SCOPE", metavar="SCOPE", help="DPS ID scope, e.g. 0ne0001A2B3 [env FLASHER_ID_SCOPE].")
@click.option("--dps-host", envvar="FLASHER_DPS_HOST", default="global.azure-devices-provisioning.net", show_default=True,
              help="DPS endpoint (port 8883, fixed by the SDK) [env FLASHER_DPS_HOST].")
@click.option("--ca-cert", type=click.Path(dir_okay=False), help="PEM root of trust for a private endpoint (emulator, gateway).")
@click.option("--timeout", type=click.FloatRange(min=1), default=60.0, show_default=True, help="Seconds allowed per device, all phases.")
@click.option("--no-test-message", is_flag=True, help="Register only; do not connect to the hub and send 'TestMessage'.")
@click.option("--concurrency", type=click.IntRange(1, 64), default=8, show_default=True, help="Registrations in flight at once.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per device on stdout.")
@click.option("--device-key", metavar="KEY", help=f"Individual enrollment key (visible in the process list: prefer ${DEVICE_KEY_ENV}).")
@click.option("--device-key-file", type=click.Path(dir_okay=False), help="File holding the individual enrollment key.")
@id_format_option
@group_key_options
def register(ids, enrollment, id_scope, dps_host, ca_cert, timeout, no_test_message, concurrency, as_json,
             device_key, device_key_file, id_format, group_keys):
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
    """
    import json

    from flasher.dps import DpsError, read_ca_cert, register_many, validate_id_scope
    from flasher.identity import RegistrationIdPolicy
    from flasher.keys import decode_symmetric_key, derive_device_key
    from flasher.progress import LiveLine
    from flasher.secrets import resolve_secret

    if not id_scope:
        raise click.UsageError("--id-scope is required (or set FLASHER_ID_SCOPE)")
    scope = validate_id_scope(id_scope)
    if ca_cert:
        read_ca_cert(ca_cert)  # a bad path fails once, before any registration
    policy = RegistrationIdPolicy(id_format)
    reg_ids = list(dict.fromkeys(policy.resolve(a)[0] for a in ids))
    if enrollment == "individual":
        if len(reg_ids) != 1:
            raise click.UsageError("--enrollment individual takes one id: each individual enrollment has its own key")
        key = resolve_secret("device key", option=device_key, option_name="--device-key", file=device_key_file,
                             env_var=DEVICE_KEY_ENV, prompt=True)
        decode_symmetric_key(key, "device key")
        keys = {reg_ids[0]: key.strip()}
    else:
        if device_key or device_key_file:
            raise click.UsageError("--device-key is for --enrollment individual; group device keys are derived")
        primary, _ = group_keys.load(secondary=False)
        keys = {r: derive_device_key(primary, r) for r in reg_ids}

    live = LiveLine(len(reg_ids))
    failed = 0
    try:
        for reg_id, reg in register_many(keys, concurrency=concurrency, on_phase=live.phase, id_scope=scope,
                                         dps_host=dps_host, ca_cert=ca_cert, timeout=timeout,
                                         test_message=None if no_test_message else "TestMessage"):
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


@simulate.command("dps")
@click.option("--enrollments", "enrollments_file", required=True, type=click.Path(dir_okay=False),
              help="JSON: {id_scope, groups: [{name, primary_key, secondary_key, enabled}], individual: [...]}.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; also the assigned hub's host name.")
@click.option("--port", type=click.IntRange(0, 65535), default=8883, show_default=True, help="The SDK only dials 8883.")
@click.option("--cert-dir", type=click.Path(file_okay=False), help="Where the CA and server certificate live [~/.cache/flasher/dps-emulator].")
@click.option("--ca-cert-out", type=click.Path(dir_okay=False), help="Also copy the CA certificate (PEM) here, for --ca-cert.")
@click.option("--state", "state_file", type=click.Path(dir_okay=False), help="Keep registrations, devices and messages in this JSON file.")
@click.option("--assign-delay", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Seconds DPS spends 'assigning'.")
def simulate_dps(enrollments_file, host, port, cert_dir, ca_cert_out, state_file, assign_delay):
    """Run a local DPS + IoT Hub emulator (MQTT over TLS) until Ctrl-C or SIGTERM.

    Prints its CA certificate's path on stdout: pass it to `flasher register --ca-cert`.
    """
    import signal
    import threading
    from pathlib import Path

    from flasher.files import atomic_write
    from flasher.sim.dps import DpsEmulator, default_cert_dir

    emu = DpsEmulator(enrollments_file, host=host, port=port, cert_dir=cert_dir or default_cert_dir(),
                      assign_delay=assign_delay, state_file=state_file)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with emu:
            ca = emu.ca_cert_path
            if ca_cert_out:
                atomic_write(ca_cert_out, ca.read_bytes(), mode=0o644)
                ca = Path(ca_cert_out)
            click.echo(str(ca))
            sys.stdout.flush()
            err(f"DPS + IoT Hub emulator on {emu.host}:{emu.port}, ID scope {emu.id_scope}, hub {emu.hub_name}")
            err(f"try: flasher register ID --id-scope {emu.id_scope} --dps-host {emu.host} --ca-cert {ca}")
            err("Ctrl-C to stop")
            stop.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    err("DPS emulator stopped")
    return 0


# --- provisioning (provision, status, demo) ------------------------------------------

def _config(path):
    from flasher.config import load_config

    return load_config(path)


@cli.command()
@board_selection_options
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Defaults file (default: ./flasher.toml if present).")
@click.option("--id-scope", envvar=ID_SCOPE_ENV, help=f"DPS ID scope, e.g. 0ne0001A2B3 (or ${ID_SCOPE_ENV}).")
@click.option("--dps-host", envvar="FLASHER_DPS_HOST", help="DPS endpoint (or $FLASHER_DPS_HOST) [default: global.azure-devices-provisioning.net].")
@click.option("--ca-cert", type=click.Path(dir_okay=False), help="PEM root certificate for a private DPS (the emulator, a gateway).")
@click.option("--template", help="Header template: a shipped name or a file path [default: seeed-lorawan].")
@click.option("--band", help="LoRaWAN band [default: EU868].")
@click.option("--join-eui", help="JoinEUI/AppEUI to program [default: 0000000000000000].")
@click.option("--app-key-source", type=click.Choice(["random", "derived", "given"]),
              help="AppKey per board: random; derived from the master secret and the DevEUI; or given (one key for all). "
                   "[default: derived when a master secret is set, else random]")
@click.option("--app-key-file", type=click.Path(dir_okay=False), help="File holding the AppKey for --app-key-source given (or $FLASHER_APP_KEY).")
@click.option("--app-key-master-file", type=click.Path(dir_okay=False), help="File holding the AppKey master secret (or $FLASHER_APPKEY_MASTER).")
@click.option("--out-dir", type=click.Path(file_okay=False), help="Where headers go, one per board [default: headers].")
@click.option("--ledger", "ledger_path", type=click.Path(dir_okay=False), help=f"Ledger file [default: {DEFAULT_LEDGER_NAME}].")
@click.option("--registration-id-format", "id_format", help="How a DevEUI becomes a registration id [default: {deveui}].")
@click.option("--timeout", type=float, help="Seconds for each board's DPS registration and test message [default: 60].")
@click.option("--no-test-message", is_flag=True, help="Register only; do not send the proof message.")
@click.option("--upload", is_flag=True, help="Build and upload the firmware sketch with the header through arduino-cli.")
@click.option("--fqbn", help="Board FQBN for --upload [default: Seeeduino:samd:rolawan].")
@click.option("--sketch", type=click.Path(file_okay=False), help="Sketch folder for --upload [default: the shipped flasher_otaa].")
@click.option("--arduino-cli", help="arduino-cli executable [default: found on PATH].")
@click.option("--set", "extras", multiple=True, metavar="NAME=VALUE", help="Extra header value (repeatable).")
@click.option("--force", is_flag=True, help="Provision again boards the ledger says are done.")
@click.option("--concurrency", type=click.IntRange(1, 64), help="Boards at once [default: 16].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per board on stdout as each finishes.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@group_key_options
def provision(config_path, id_scope, dps_host, ca_cert, template, band, join_eui, app_key_source, app_key_file,
              app_key_master_file, out_dir, ledger_path, id_format, timeout, no_test_message, upload, fqbn, sketch,
              arduino_cli, extras, force, concurrency, as_json, quiet, group_keys, targets):
    """Provision boards in one step: read DevEUI, derive key, render header, program, register, prove, record.

    Each board's steps are recorded in the ledger as they happen; a rerun resumes
    where a board stopped and skips finished boards (unless --force).

    \b
    Example:
      export FLASHER_GROUP_PRIMARY_KEY=...
      flasher provision --all --id-scope 0ne0001A2B3
      flasher provision --port /dev/ttyACM0 --json > result.jsonl
    """
    from pathlib import Path

    from flasher import progress as progress_mod
    from flasher.dps import validate_id_scope
    from flasher.eui import EUI64
    from flasher.identity import RegistrationIdPolicy
    from flasher.keys import check_master_secret, parse_app_key
    from flasher.ledger import Ledger
    from flasher.pipeline import Settings, Upload, preflight, provision_boards
    from flasher.secrets import resolve_secret

    cfg = _config(config_path)
    scope = cfg.get("id_scope", id_scope)
    if not scope:
        raise click.UsageError("--id-scope is required (or id_scope in flasher.toml)")
    policy_name = cfg.get("app_key", app_key_source)
    master = None
    if policy_name in (None, "derived"):
        master = resolve_secret("AppKey master secret", file=app_key_master_file or cfg.app_key_master_file,
                                env_var=cfg.app_key_master_env or APPKEY_MASTER_ENV, required=policy_name == "derived")
    policy_name = policy_name or ("derived" if master else "random")
    given = None
    if policy_name == "given":
        given = parse_app_key(resolve_secret("AppKey", file=app_key_file or cfg.app_key_file, env_var=APP_KEY_ENV))
    ports = targets
    primary, _ = group_keys.load(secondary=False, config=cfg)
    upload_cfg = None
    if upload:
        from flasher.arduino import DEFAULT_FQBN, default_sketch, find_arduino_cli

        upload_cfg = Upload(sketch=str(cfg.get("sketch", sketch, default_sketch())), fqbn=cfg.get("fqbn", fqbn, DEFAULT_FQBN),
                            arduino_cli=find_arduino_cli(cfg.get("arduino_cli", arduino_cli)))
    from flasher.header import parse_band, parse_sets

    settings = Settings(
        id_scope=validate_id_scope(scope), group_key=primary,
        dps_host=cfg.get("dps_host", dps_host, "global.azure-devices-provisioning.net"),
        ca_cert=cfg.get("ca_cert", ca_cert), template=cfg.get("template", template, "seeed-lorawan"),
        band=parse_band(cfg.get("band", band, "EU868")), join_eui=EUI64.parse(cfg.get("join_eui", join_eui, "0" * 16), "JoinEUI"),
        app_key_policy=policy_name, app_key=given, master_secret=check_master_secret(master) if master else None,
        out_dir=Path(cfg.get("out_dir", out_dir, "headers")), id_policy=RegistrationIdPolicy(cfg.get("registration_id_format", id_format, "{deveui}")),
        timeout=cfg.get("timeout", timeout, 60.0), test_message=None if no_test_message else cfg.get("test_message", None, "TestMessage"),
        upload=upload_cfg, force=force, extras=parse_sets(extras))
    preflight(settings, ports)  # everything checkable is checked before a board or the ledger is touched
    ledger = Ledger(cfg.get("ledger", ledger_path, DEFAULT_LEDGER_NAME))
    show = progress_mod.for_stream(quiet=quiet)
    failures, already = [], 0
    try:
        for result in provision_boards(ports, settings, ledger, show, concurrency=cfg.get("concurrency", concurrency, 16)):
            already += result.status == "already_provisioned"
            if not result.ok:
                failures.append(result)
            if as_json:
                _json_line(result.to_dict())
    finally:
        if hasattr(show, "close"):
            show.close()
        ledger.close()
    for r in failures:
        err(f"error: {r.deveui or r.port}: {r.failed_step}: {r.error}")
    if not as_json and not quiet:
        err(f"{len(ports) - len(failures)}/{len(ports)} boards provisioned"
            + (f" ({already} already were)" if already else "")
            + (f"; {len(failures)} failed (rerun to resume where each stopped)" if failures else ""))
    return EXIT_FAILURE if failures else 0


@cli.command()
@click.option("--ledger", "ledger_path", type=click.Path(dir_okay=False), help=f"Ledger file [default: {DEFAULT_LEDGER_NAME}].")
@click.option("--config", "config_path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per board.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV (doubles as an onboarding list for the network server).")
def status(ledger_path, config_path, as_json, as_csv):
    """List the boards in the ledger and where each one stands."""
    from flasher.ledger import Ledger, export_csv, export_json

    if as_json and as_csv:
        raise click.UsageError("--json and --csv are exclusive")
    cfg = _config(config_path)
    with Ledger(cfg.get("ledger", ledger_path, DEFAULT_LEDGER_NAME), create=False) as ledger:
        records = ledger.all()
    if as_json:
        click.echo(export_json(records), nl=False)
    elif as_csv:
        click.echo(export_csv(records), nl=False)
    else:
        click.echo(f"{'DEVEUI':<16}  {'STATUS':<12} {'STEP':<9} {'HUB':<28} {'DEVICE':<18} ATTEMPTS  LAST ERROR")
        for r in records:
            click.echo(f"{r.deveui:<16}  {r.status:<12} {r.current_step or '-':<9} {r.assigned_hub or '-':<28} "
                       f"{r.device_id or '-':<18} {r.attempts:>8}  {r.last_error or ''}")
    return 0


@cli.command()
@click.option("--boards", type=click.IntRange(1, 16), default=3, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False), help="Where the headers, ledger and emulator state go; emptied first if an earlier demo made it.  [default: flasher-demo]")
def demo(boards, workdir):
    """Provision simulated boards end to end against the local DPS emulator (no hardware, no Azure)."""
    from flasher import progress as progress_mod
    from flasher.demo import run_demo

    return run_demo(workdir, boards, progress_mod.for_stream(), lambda line: click.echo(line))


# --- the error funnel ----------------------------------------------------------

def main(argv: list[str] | None = None, prog_name: str = "flasher") -> None:
    """Run the CLI and exit with its code; known failures become one line on stderr."""
    try:
        rv = cli.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort:
        err("error: interrupted")
        sys.exit(130)
    except KeyboardInterrupt:
        err("error: interrupted")
        sys.exit(130)
    except click.UsageError as exc:
        where = f"{exc.ctx.command_path}: " if exc.ctx else ""
        err(f"error: {where}{exc.format_message()}")
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        err(f"error: {exc.format_message()}")
        sys.exit(exc.exit_code)
    except FlasherError as exc:
        err(f"error: {exc}")
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        # `flasher keys ... | head`: the reader left; that is not our failure.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    sys.exit(rv if isinstance(rv, int) else 0)
