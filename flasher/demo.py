"""``flasher demo``: the whole job on the built-in simulators, nothing to install or own.

Three simulated boards on pseudo-terminals, the local The Things Stack emulator
(HTTPS, the four servers), the local DPS + IoT Hub emulator over TLS, the real
azure-iot-device SDK, a real ledger and real headers in a work directory
(``./flasher-demo`` unless told): the whole chain, boards -> The Things Stack -> DPS
-> a hub message. A fresh group key and API key are made for the run and never
shown. Everything it starts is stopped on every path, Ctrl-C included.
"""

from __future__ import annotations

import base64
import os
import shutil
from contextlib import ExitStack
from pathlib import Path

from flasher.errors import InputError

DEMO_SCOPE = "0ne00DE0001"
DEMO_APP = "flasher-demo"
DEFAULT_WORKDIR = "flasher-demo"
MARKER = ".flasher-demo"


def _fresh_workdir(work: Path) -> Path:
    """Each demo starts clean; only a folder an earlier demo made (it has the marker) is ever emptied."""
    marker = work / MARKER
    if work.exists():
        if not work.is_dir():
            raise InputError(f"demo work dir {str(work)!r}: exists and is not a folder")
        if any(work.iterdir()) and not marker.exists():
            raise InputError(f"demo work dir {str(work)!r}: not empty and not made by 'flasher demo'; choose another --workdir")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    marker.write_text("made by flasher demo; emptied by the next one\n")
    return work


def _check_bind(bind: str | None) -> None:
    if bind is not None and not bind.startswith("127."):
        raise InputError(f"--bind {bind!r}: a loopback address (127.x.y.z): the demo's emulator is not for a network")


def _start_emulator(stack: ExitStack, work: Path, host: str):
    """The DPS + IoT Hub emulator with a fresh group key made for this run (never shown); (emulator, key)."""
    from flasher.sim.dps import DpsEmulator

    group_key = os.urandom(64)
    enrollments = {"id_scope": DEMO_SCOPE,
                   "groups": [{"name": "demo-fleet", "primary_key": base64.b64encode(group_key).decode(),
                               "secondary_key": base64.b64encode(os.urandom(64)).decode(), "enabled": True}],
                   "individual": []}
    emu = stack.enter_context(DpsEmulator(enrollments, host=host, cert_dir=work / "dps",
                                          state_file=work / "dps" / "state.json"))
    return emu, group_key


def run_demo(workdir: str | None, boards: int, progress, echo, bind: str | None = None) -> int:
    from flasher.ledger import Ledger
    from flasher.pipeline import Settings, provision_boards
    from flasher.secrets import Secret
    from flasher.sim.board import BoardSimulator
    from flasher.sim.dps import free_loopback
    from flasher.sim.tts import TtsEmulator
    from flasher.tts import TtsTarget

    _check_bind(bind)
    work = _fresh_workdir(Path(workdir or DEFAULT_WORKDIR))
    with ExitStack() as stack:
        host = bind or free_loopback(prefer=("127.0.0.1",))
        sim = stack.enter_context(BoardSimulator(count=boards, state_dir=work / "boards"))
        tts = stack.enter_context(TtsEmulator(host, 0, cert_dir=work / "tts", applications=[DEMO_APP],
                                              state_file=work / "tts" / "state.json"))
        emu, group_key = _start_emulator(stack, work, host)
        echo(f"demo: {boards} simulated boards, DPS + IoT Hub emulator on {host}:8883, The Things Stack emulator on "
             f"{tts.url}, work dir {work}")
        from flasher.dps import load_ca_cert

        assert tts.ca_cert_path is not None
        target = TtsTarget.single(DEMO_APP, tts.url, Secret(tts.add_api_key(app=DEMO_APP), "the demo's own API key"),
                                  ca_cert=load_ca_cert(tts.ca_cert_path))
        settings = Settings(id_scope=DEMO_SCOPE, group_key=Secret(group_key, "the demo's own group key"),
                            dps_host=emu.host, ca_cert=str(emu.ca_cert_path), tts=target,
                            out_dir=work / "headers")
        ledger = stack.enter_context(Ledger(work / "ledger.sqlite3"))
        results = list(provision_boards([p for p in sim.ports if p], settings, ledger, progress))
        progress.close()
        echo("")
        echo("ledger:")
        records = ledger.all()
        for r in records:
            echo(f"  {r.deveui}  {r.status:<12} tts={r.tts_device_id}  hub={r.assigned_hub}  device={r.device_id}  "
                 f"header={r.header_path}")
        echo(f"The Things Stack emulator, application {DEMO_APP} (read back with the API, as the console would):")
        _show_tts(echo, tts, target, records, {b.deveui: b.state.get("appkey") for b in sim.boards})
        state = emu.state()
        echo("DPS emulator registration records:")
        for reg in state["registrations"]:
            echo("  " + "  ".join(f"{k}={reg.get(k)}" for k in ("registrationId", "status", "assignedHub", "deviceId")
                                  if k in reg))
        echo("IoT Hub emulator telemetry:")
        for msg in state["messages"]:
            echo(f"  {msg.get('device_id')}: {msg.get('payload')!r}")
        ok = sum(r.ok for r in results)
    echo(f"demo: {ok}/{len(results)} boards provisioned; the simulators and emulators are stopped")
    echo(f"demo: headers, ledger and emulator state are in {work}/ (try: flasher status --ledger {work / 'ledger.sqlite3'})")
    return 0 if ok == len(results) else 1


def _show_tts(echo, tts, target, records, module_keys: dict) -> None:
    """Each board's end device on the four servers, and whether the Join Server's AppKey is the module's."""
    from flasher.tts import TtsClient

    with TtsClient(target) as client:
        _show_each(echo, tts, target, client, records, module_keys)


def _show_each(echo, tts, target, client, records, module_keys: dict) -> None:
    from flasher.eui import EUI64
    from flasher.secrets import Secret
    from flasher.tts import EndDevice, read_back

    for r in records:
        if not r.tts_device_id:
            echo(f"  {r.deveui}: not registered")
            continue
        module_key = bytes.fromhex(module_keys.get(r.deveui) or "00" * 16)   # only the ids are read back with it
        dev = EndDevice(target.app, r.tts_device_id, EUI64.parse(r.deveui), EUI64.parse(r.join_eui or "0" * 16),
                        Secret(module_key, "the simulated module's AppKey"))
        copies = read_back(client, dev)
        on = [s.upper() for s, c in copies.items() if c is not None]
        ns = copies.get("ns") or {}
        js_key = tts.app_key(target.app, r.tts_device_id)
        same = js_key is not None and js_key == (module_keys.get(r.deveui) or "").upper()
        verdict = "is the module's" if same else "DIFFERS from the module's"
        echo(f"  {r.tts_device_id}  on {'+'.join(on) or 'no server'}  {ns.get('frequency_plan_id')} "
             f"{ns.get('lorawan_version')} {ns.get('lorawan_phy_version')}  Join Server AppKey {verdict}")


def run_station_demo(workdir: str | None, boards: int, progress, echo, bind: str | None = None,
                     plug_every: float = 1.5, install_stop=None) -> int:
    """``flasher demo --station``: boards arrive one by one on the simulator and the station provisions each.

    The third board is pulled out half-way through programming and plugged back in a moment later, so the demo
    shows a resume too. It ends by itself once every board has its verdict (or on Ctrl-C through
    ``install_stop(station.stop)``); labels are written to ``<workdir>/labels`` when the labels extra is installed.
    """
    import threading

    from flasher.labels import LabelPlan
    from flasher.ledger import Ledger
    from flasher.pipeline import Settings
    from flasher.progress import StationEvent, StationKind
    from flasher.secrets import Secret
    from flasher.sim.board import BoardSimulator
    from flasher.sim.dps import free_loopback
    from flasher.states import Verdict
    from flasher.station import Station, discover

    _check_bind(bind)
    work = _fresh_workdir(Path(workdir or DEFAULT_WORKDIR))
    try:
        import PIL  # noqa: F401
        import segno  # noqa: F401
        labels = LabelPlan(work / "labels")
    except ImportError:
        labels = None
    flaky = 2 if boards >= 3 else None   # this board is unplugged mid-way, then plugged back in
    timers: list[threading.Timer] = []
    def stop_timers() -> None:
        for timer in timers:
            timer.cancel()
            timer.join()

    with ExitStack() as stack:
        host = bind or free_loopback(prefer=("127.0.0.1",))
        echo(f"demo: station mode, {boards} simulated boards plugged in one every {plug_every:g} s, "
             f"DPS + IoT Hub emulator on {host}:8883, work dir {work}")
        sim = stack.enter_context(BoardSimulator(count=boards, state_dir=work / "boards", plugged=0,
                                                 plug_every=plug_every))
        stack.callback(stop_timers)  # before the simulator closes: no replug may come after
        if flaky is not None:
            sim.boards[flaky].faults.unplug_after = 4   # AT, AT+ID twice, then gone while programming
        emu, group_key = _start_emulator(stack, work, host)
        settings = Settings(id_scope=DEMO_SCOPE, group_key=Secret(group_key, "the demo's own group key"),
                            dps_host=emu.host, ca_cert=str(emu.ca_cert_path), out_dir=work / "headers", labels=labels)
        ledger = stack.enter_context(Ledger(work / "ledger.sqlite3"))
        finished: set[str] = set()

        class Watch:
            """Shows every event; replugs the flaky board; stops the station when every board has its verdict."""

            def emit(self, event) -> None:
                progress.emit(event)
                if not isinstance(event, StationEvent) or event.kind is not StationKind.VERDICT:
                    return
                if event.verdict is Verdict.UNPLUGGED and flaky is not None:
                    timer = threading.Timer(1.0, sim.replug, (flaky,))
                    timers.append(timer)
                    timer.start()
                elif event.verdict is not Verdict.UNPLUGGED:
                    finished.add(event.serial_number or event.port or "")
                    if len(finished) >= boards:
                        bench.stop()

            def close(self) -> None:
                progress.close()

        bench = Station(settings, ledger, Watch(), settle=0.5, poll=0.2, find=lambda: discover(sim.ports_file),
                        udev=False)
        if install_stop is not None:
            install_stop(bench.stop)
        tally = bench.run()
        progress.close()
        echo("")
        echo("ledger:")
        for r in ledger.all():
            echo(f"  {r.deveui}  {r.status:<12} attempts={r.attempts}  hub={r.assigned_hub}  device={r.device_id}")
    echo(f"demo: {tally.text()}; the simulators and emulator are stopped")
    if labels is not None:
        echo(f"demo: labels in {labels.out_dir}/ (print them all: flasher labels --ledger {work / 'ledger.sqlite3'} "
             f"--pdf labels.pdf)")
    else:
        echo("demo: for QR labels, pip install 'flasher[labels]'")
    return 0 if tally.ok else 1
