"""The simulators' commands: ``flasher simulate boards|dps`` and ``flasher demo``.

They live with the simulators they run; product commands never import this.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager

import click

from flasher.commands.options import err, json_line


@contextmanager
def until_signalled():
    """An Event that Ctrl-C or SIGTERM sets while a simulator runs; the previous handlers come back after."""
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@click.group()
def simulate():
    """Run the built-in simulators: boards on pseudo-terminals, a local DPS + IoT Hub, a local The Things Stack."""


@simulate.command("boards")
@click.option("--count", type=click.IntRange(1, 256), default=1, show_default=True, help="How many boards.")
@click.option("--state", "state_dir", type=click.Path(file_okay=False),
              help="EEPROM directory (board-N.json, ports.json), kept across runs. Default: a temporary one.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for serial numbers and DevEUIs.")
@click.option("--latency", type=click.FloatRange(min=0), default=0.0, metavar="S", help="Delay before every answer.")
@click.option("--boot-noise", is_flag=True, help="Banner and garbage before the first answer.")
@click.option("--echo", "echo_", is_flag=True, help="Echo every command line.")
@click.option("--silent", is_flag=True, help="Read commands, answer nothing.")
@click.option("--corrupt", type=int, default=0, metavar="N", help="Mangle the next N answers (-1: all).")
@click.option("--unplug-after", type=click.IntRange(min=0), metavar="N", help="Vanish on command N+1.")
@click.option("--flip-rate", type=click.FloatRange(0, 1), default=0.0, metavar="P",
              help="Flip one bit in this share of answered bytes (line noise).")
@click.option("--plugged", type=click.IntRange(min=0), metavar="N",
              help="Boards plugged in at the start [default: all; none with --plug-every].")
@click.option("--plug-every", type=click.FloatRange(min=0.01), metavar="SECONDS",
              help="Plug in the next board that has not arrived yet every SECONDS (a bench, for demos).")
@click.option("--json", "as_json", is_flag=True, help='One object per board: {"port", "serial_number", "deveui"}.')
def simulate_boards(count, state_dir, seed, latency, boot_noise, echo_, silent, corrupt, unplug_after, flip_rate,
                    plugged, plug_every, as_json):
    """Simulated Seeeduino LoRaWAN boards on pseudo-terminals, until Ctrl-C or SIGTERM.

    Prints each plugged-in board's port path on stdout. To find them with --all,
    --serial-number or `flasher station`, export FLASHER_SIMULATED_PORTS=<state>/ports.json
    (printed on stderr). Boards can be plugged and unplugged while it runs:
    `flasher simulate plug|unplug --state DIR`, or --plug-every.

    \b
    Example:
      flasher simulate boards --count 3 --state ./boards &
      FLASHER_SIMULATED_PORTS=./boards/ports.json flasher eui --all
      flasher simulate unplug --state ./boards 1
    """

    from flasher.sim.board import BoardSimulator, Faults

    faults = Faults(latency=latency, boot_noise=boot_noise, silent=silent, unplug_after=unplug_after,
                    corrupt=corrupt, echo=echo_, flip_rate=flip_rate)
    if plugged is None and plug_every is not None:
        plugged = 0

    def changed(i: int, port: str | None) -> None:
        err(f"board {i} plugged in at {port}" if port else f"board {i} unplugged")

    with until_signalled() as stop:
        with BoardSimulator(count=count, state_dir=state_dir, seed=seed, faults=faults, plugged=plugged,
                            plug_every=plug_every, control=True, on_change=changed) as sim:
            for b in sim.boards:
                if b.port is None:
                    continue
                if as_json:
                    json_line({"port": b.port, "serial_number": b.serial_number, "deveui": b.deveui})
                else:
                    click.echo(b.port)
            sys.stdout.flush()
            err(f"simulating {count} board(s); export FLASHER_SIMULATED_PORTS={sim.ports_file} ; Ctrl-C to stop")
            err(f"plug or unplug one: flasher simulate plug|unplug --state {sim.state_dir} N")
            stop.wait()
            err("stopping simulated boards")
    return 0


@simulate.command("plug")
@click.option("--state", "state_dir", required=True, type=click.Path(file_okay=False),
              help="The running simulator's --state folder.")
@click.argument("board", required=False, type=click.IntRange(min=0))
def simulate_plug(state_dir, board):
    """Plug simulated board BOARD back in (no BOARD: the first one unplugged, else a new board).

    Prints {"board", "port", "serial_number", "deveui"} as JSON.
    """
    from flasher.sim.board import control_request

    reply = control_request(state_dir, "plug" if board is None else f"plug {board}")
    reply.pop("ok")
    json_line(reply)
    return 0


@simulate.command("unplug")
@click.option("--state", "state_dir", required=True, type=click.Path(file_okay=False),
              help="The running simulator's --state folder.")
@click.argument("board", type=click.IntRange(min=0))
def simulate_unplug(state_dir, board):
    """Pull simulated board BOARD's cable: its port disappears, as a USB device does."""
    from flasher.sim.board import control_request

    reply = control_request(state_dir, f"unplug {board}")
    reply.pop("ok")
    json_line(reply)
    return 0


@simulate.command("dps")
@click.option("--enrollments", "enrollments_file", required=True, type=click.Path(dir_okay=False),
              help="JSON: {id_scope, groups: [{name, primary_key, secondary_key, enabled, return_payload, "
                   "allocation_error}], individual: [...]}.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; also the assigned hub's host name.")
@click.option("--port", type=click.IntRange(0, 65535), default=8883, show_default=True, help="The SDK only dials 8883.")
@click.option("--websockets", is_flag=True, help="Also serve MQTT over WebSockets (wss://HOST:443/$iothub/websocket).")
@click.option("--https", "https_api", is_flag=True,
              help="Also serve DPS's HTTPS registration API (https://HOST:443/{idScope}/registrations/...); "
                   "the same port as --websockets, which serves it too.")
@click.option("--websocket-port", type=click.IntRange(0, 65535), default=443, show_default=True,
              help="Port for --websockets and --https (the SDKs only dial 443; another port is for other clients).")
@click.option("--websockets-only", is_flag=True, help="Serve only port 443 (WebSockets, HTTPS): port 8883 stays closed.")
@click.option("--cert-dir", type=click.Path(file_okay=False),
              help="Where the CA and server certificate live [~/.cache/flasher/dps-emulator].")
@click.option("--ca-cert-out", type=click.Path(dir_okay=False), help="Also copy the CA certificate (PEM) here, for --ca-cert.")
@click.option("--state", "state_file", type=click.Path(dir_okay=False),
              help="Keep registrations, devices and messages in this JSON file.")
@click.option("--assign-delay", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Seconds DPS spends 'assigning'.")
@click.option("--hub-name", metavar="HOST",
              help="Host name of the assigned hub (in the certificate too) [default: --host].")
@click.option("--throttle", type=click.IntRange(min=0), default=0, metavar="N",
              help="Answer the next N register requests 429 (--throttle-status), with --throttle-retry-after.")
@click.option("--throttle-status", type=click.Choice(["429", "500", "503"]), default="429", show_default=True,
              help="The status --throttle answers.")
@click.option("--throttle-retry-after", type=click.IntRange(min=0), default=1, show_default=True, metavar="S",
              help="The retry-after --throttle sends, in seconds.")
@click.option("--registration-quota", metavar="RATE",
              help="At most this many register requests in any sliding window, like DPS's quota (e.g. 1000/min); "
                   "beyond it, 429 with retry-after.")
def simulate_dps(enrollments_file, host, port, websockets, https_api, websocket_port, websockets_only, cert_dir,
                 ca_cert_out, state_file, assign_delay, hub_name, throttle, throttle_status, throttle_retry_after,
                 registration_quota):
    """Run a local DPS + IoT Hub emulator (MQTT over TLS) until Ctrl-C or SIGTERM.

    Prints its CA certificate's path on stdout: pass it to `flasher register --ca-cert`.
    With --websockets it also serves MQTT over WebSockets on 443, what `flasher register
    --websockets` dials, and with --https (or --websockets) DPS's HTTPS registration API
    there, for the Node and C SDKs' HTTP transports and curl (binding 443 may need
    privileges: CAP_NET_BIND_SERVICE, or root).
    """
    from pathlib import Path

    from flasher.files import atomic_write
    from flasher.sim.dps import DpsEmulator, default_cert_dir

    if throttle_retry_after != 1 and not throttle:
        raise click.UsageError("--throttle-retry-after: only with --throttle N")
    open_443 = websockets or https_api or websockets_only
    emu = DpsEmulator(enrollments_file, host=host, port=None if websockets_only else port,
                      websocket_port=websocket_port if open_443 else None,
                      cert_dir=cert_dir or default_cert_dir(), assign_delay=assign_delay, state_file=state_file,
                      hub_name=hub_name, registration_quota=registration_quota)
    if throttle:
        emu.throttle(throttle, retry_after=throttle_retry_after, status=int(throttle_status))
    with until_signalled() as stop:
        with emu:
            ca = emu.ca_cert_path
            if ca_cert_out:
                atomic_write(ca_cert_out, ca.read_bytes(), mode=0o644)
                ca = Path(ca_cert_out)
            click.echo(str(ca))
            sys.stdout.flush()
            err(f"DPS + IoT Hub emulator on {emu.endpoints()}, ID scope {emu.id_scope}, hub {emu.hub_name}"
                + (f", registration quota {registration_quota}" if registration_quota else ""))
            err(f"try: flasher register ID --id-scope {emu.id_scope} --dps-host {emu.host} --ca-cert {ca}"
                + (" --websockets" if emu.port is None else ""))
            err("Ctrl-C to stop")
            stop.wait()
    err("DPS emulator stopped")
    return 0


@simulate.command("tts")
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback address to bind.")
@click.option("--port", type=click.IntRange(0, 65535), default=8885, show_default=True,
              help="Port for all four servers (0: any free one).")
@click.option("--app", "apps", multiple=True, metavar="APP_ID",
              help="An application to create (repeatable) [default: flasher].")
@click.option("--cert-dir", type=click.Path(file_okay=False),
              help="Where the CA, server certificate and API key file live [~/.cache/flasher/tts-emulator].")
@click.option("--ca-cert-out", type=click.Path(dir_okay=False), help="Also copy the CA certificate (PEM) here.")
@click.option("--state", "state_file", type=click.Path(dir_okay=False),
              help="Keep applications, devices and request counts in this JSON file (AppKeys masked).")
@click.option("--latency", type=click.FloatRange(min=0), default=0.0, metavar="S", help="Delay before every answer.")
@click.option("--throttle", type=click.IntRange(min=0), default=0, metavar="N",
              help="Answer the first N requests 429 (X-Rate-Limit-Retry: 1).")
@click.option("--unavailable", type=click.IntRange(min=0), default=0, metavar="N",
              help="Answer the first N requests 503.")
@click.option("--refuse", "refused", multiple=True, type=click.Choice(["is", "js", "ns", "as"]),
              help="This server answers 503 to everything (repeatable).")
def simulate_tts(host, port, apps, cert_dir, ca_cert_out, state_file, latency, throttle, unavailable, refused):
    """Run a local The Things Stack (Identity, Join, Network, Application Server) over HTTPS until Ctrl-C.

    Prints its base URL on stdout. The API key (all rights on every application) is in
    <cert-dir>/api-key (mode 0600), kept across restarts like the CA: pass it with
    --tts-api-key-file, and the CA with --tts-ca-cert.

    \b
    Example:
      flasher simulate tts --app my-fleet &
      flasher provision --all ... --tts-app my-fleet --tts-url https://127.0.0.1:8885 \\
          --tts-ca-cert ~/.cache/flasher/tts-emulator/ca.pem --tts-api-key-file ~/.cache/flasher/tts-emulator/api-key
    """
    from pathlib import Path

    from flasher.errors import InputError
    from flasher.files import atomic_write, make_private_dirs
    from flasher.sim.tts import TtsEmulator, default_cert_dir, read_or_make_key

    if not host.startswith("127.") and host not in ("localhost", "::1"):
        raise InputError(f"--host {host!r}: a loopback address: the emulator is for this machine only")
    folder = Path(cert_dir) if cert_dir else default_cert_dir()
    make_private_dirs(folder)
    emu = TtsEmulator(host, port, cert_dir=folder, applications=list(apps) or ["flasher"], state_file=state_file)
    key_file = folder / "api-key"
    read_or_make_key(emu, key_file)
    if latency:
        emu.set_latency(latency)
    if throttle:
        emu.fail_next(throttle, 429)
    if unavailable:
        emu.fail_next(unavailable, 503)
    for server in refused:
        emu.refuse(server)
    with until_signalled() as stop:
        with emu:
            assert emu.ca_cert_path is not None
            ca = emu.ca_cert_path
            if ca_cert_out:
                atomic_write(ca_cert_out, ca.read_bytes(), mode=0o644)
                ca = Path(ca_cert_out)
            click.echo(emu.url)
            sys.stdout.flush()
            err(f"The Things Stack emulator (IS, JS, NS, AS) on {emu.url}, application(s) "
                f"{', '.join(emu.state()['applications'])}; API key (all rights) in {key_file}")
            err(f"try: flasher tts register ... --tts-app {emu.state()['applications'][0]} --tts-url {emu.url} "
                f"--tts-ca-cert {ca} --tts-api-key-file {key_file}")
            err("Ctrl-C to stop")
            stop.wait()
    err("The Things Stack emulator stopped")
    return 0


@click.command()
@click.option("--boards", type=click.IntRange(1, 16), default=3, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False),
              help="Where the headers, ledger and emulator state go; emptied first if an earlier demo made it. "
                   "[default: flasher-demo]")
@click.option("--bind", metavar="ADDRESS", help="Loopback address for the DPS emulator (port 8883) [default: 127.0.0.1, "
              "or the first free 127.0.0.x].")
@click.option("--station", "station_mode", is_flag=True,
              help="Station mode: boards are plugged in one after another and each is provisioned as it arrives.")
@click.option("--plug-every", type=click.FloatRange(min=0.1), default=1.5, show_default=True, metavar="SECONDS",
              help="With --station: seconds between two boards being plugged in.")
@click.option("--no-bell", is_flag=True, help="With --station: no terminal bell.")
def demo(boards, workdir, bind, station_mode, plug_every, no_bell):
    """Provision simulated boards end to end against the local DPS emulator (no hardware, no Azure)."""
    from flasher import progress as progress_mod
    from flasher.demo import run_demo, run_station_demo

    if not station_mode:
        return run_demo(workdir, boards, progress_mod.for_stream(), lambda line: click.echo(line), bind=bind)
    import signal

    previous: dict = {}

    def install_stop(stop) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop())

    try:
        return run_station_demo(workdir, boards, progress_mod.for_station(bell=not no_bell),
                                lambda line: click.echo(line), bind=bind, plug_every=plug_every,
                                install_stop=install_stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
