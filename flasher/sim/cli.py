"""The simulators' commands: ``flasher simulate boards|dps`` and ``flasher demo``.

They live with the simulators they run; product commands never import this.
"""

from __future__ import annotations

import sys

import click

from flasher.commands.options import err, json_line


@click.group()
def simulate():
    """Run the built-in simulators: boards on pseudo-terminals, a local DPS + IoT Hub."""


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
@click.option("--flip-rate", type=click.FloatRange(0, 1), default=0.0, metavar="P",
              help="Flip one bit in this share of answered bytes (line noise).")
@click.option("--json", "as_json", is_flag=True, help='One object per board: {"port", "serial_number", "deveui"}.')
def simulate_boards(count, state_dir, seed, latency, boot_noise, echo_, silent, corrupt, unplug_after, flip_rate,
                    as_json):
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
                    corrupt=corrupt, echo=echo_, flip_rate=flip_rate)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with BoardSimulator(count=count, state_dir=state_dir, seed=seed, faults=faults) as sim:
            for b in sim.boards:
                if as_json:
                    json_line({"port": b.port, "serial_number": b.serial_number, "deveui": b.deveui})
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



@simulate.command("dps")
@click.option("--enrollments", "enrollments_file", required=True, type=click.Path(dir_okay=False),
              help="JSON: {id_scope, groups: [{name, primary_key, secondary_key, enabled, return_payload}], "
                   "individual: [...]}.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; also the assigned hub's host name.")
@click.option("--port", type=click.IntRange(0, 65535), default=8883, show_default=True, help="The SDK only dials 8883.")
@click.option("--websockets", is_flag=True, help="Also serve MQTT over WebSockets (wss://HOST:443/$iothub/websocket).")
@click.option("--websocket-port", type=click.IntRange(0, 65535), default=443, show_default=True,
              help="Port for --websockets (the SDK only dials 443; another port is for other clients).")
@click.option("--websockets-only", is_flag=True, help="Serve only MQTT over WebSockets: port 8883 stays closed.")
@click.option("--cert-dir", type=click.Path(file_okay=False),
              help="Where the CA and server certificate live [~/.cache/flasher/dps-emulator].")
@click.option("--ca-cert-out", type=click.Path(dir_okay=False), help="Also copy the CA certificate (PEM) here, for --ca-cert.")
@click.option("--state", "state_file", type=click.Path(dir_okay=False),
              help="Keep registrations, devices and messages in this JSON file.")
@click.option("--assign-delay", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Seconds DPS spends 'assigning'.")
def simulate_dps(enrollments_file, host, port, websockets, websocket_port, websockets_only, cert_dir, ca_cert_out,
                 state_file, assign_delay):
    """Run a local DPS + IoT Hub emulator (MQTT over TLS) until Ctrl-C or SIGTERM.

    Prints its CA certificate's path on stdout: pass it to `flasher register --ca-cert`.
    With --websockets it also serves MQTT over WebSockets on 443, what `flasher register
    --websockets` dials (binding 443 may need privileges: CAP_NET_BIND_SERVICE, or root).
    """
    import signal
    import threading
    from pathlib import Path

    from flasher.files import atomic_write
    from flasher.sim.dps import DpsEmulator, default_cert_dir

    emu = DpsEmulator(enrollments_file, host=host, port=None if websockets_only else port,
                      websocket_port=websocket_port if websockets or websockets_only else None,
                      cert_dir=cert_dir or default_cert_dir(), assign_delay=assign_delay, state_file=state_file)
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
            err(f"DPS + IoT Hub emulator on {emu.endpoints()}, ID scope {emu.id_scope}, hub {emu.hub_name}")
            err(f"try: flasher register ID --id-scope {emu.id_scope} --dps-host {emu.host} --ca-cert {ca}"
                + (" --websockets" if emu.port is None else ""))
            err("Ctrl-C to stop")
            stop.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    err("DPS emulator stopped")
    return 0


@click.command()
@click.option("--boards", type=click.IntRange(1, 16), default=3, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False),
              help="Where the headers, ledger and emulator state go; emptied first if an earlier demo made it. "
                   "[default: flasher-demo]")
@click.option("--bind", metavar="ADDRESS", help="Loopback address for the DPS emulator (port 8883) [default: 127.0.0.1, "
              "or the first free 127.0.0.x].")
def demo(boards, workdir, bind):
    """Provision simulated boards end to end against the local DPS emulator (no hardware, no Azure)."""
    from flasher import progress as progress_mod
    from flasher.demo import run_demo

    return run_demo(workdir, boards, progress_mod.for_stream(), lambda line: click.echo(line), bind=bind)
