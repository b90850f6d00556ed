"""network: the board's end device on The Things Stack's four servers, so it can join (``--tts-app``).

The AppKey sent to the Join Server is the one the module was programmed with (the
render step's, or read back from the board's header when render was done in an
earlier run). Progress is reported server by server through ``board.checkpoint``, so
a board interrupted between two servers resumes at the missing one. ``flasher tts
register`` runs the same code (:func:`register_board`) for boards provisioned earlier.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from flasher.errors import FlasherError
from flasher.steps import Done, Step

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable

    from flasher.eui import EUI64
    from flasher.ledger import BoardRecord
    from flasher.secrets import Secret
    from flasher.tts import EndDevice, Registration, TtsTarget


def end_device(target: TtsTarget, dev_eui: EUI64, join_eui: EUI64, app_key: Secret, band: str | None) -> EndDevice:
    """The end device a board is registered as: its id from the DevEUI, its plan from its band."""
    from flasher.tts import EndDevice

    return EndDevice(app=target.app, device_id=target.device_ids.for_eui(dev_eui), dev_eui=dev_eui,
                     join_eui=join_eui, app_key=app_key, frequency_plan_id=target.plan_for(band),
                     lorawan_version=target.lorawan_version, lorawan_phy_version=target.lorawan_phy_version)


def servers_recorded(record: BoardRecord | None, device: EndDevice) -> list[str]:
    """The servers the ledger says hold this very end device (none after a reset or another id/application)."""
    from flasher.tts import SERVERS

    if record is None or record.steps.get("network") is None:
        return []
    if record.tts_device_id != device.device_id or record.tts_app != device.app:
        return []
    return [s for s in (record.tts_servers or "").split(",") if s in SERVERS]


def register_board(target: TtsTarget, device: EndDevice, held: list[str], *, cancel: threading.Event | None = None,
                   on_phase: Callable[[str], None] | None = None,
                   checkpoint: Callable[[dict], None] | None = None) -> Registration:
    """Register ``device`` on whichever servers lack it, within ``target.timeout``; report progress per server."""
    from flasher.tts import TtsClient, register_end_device

    note = checkpoint or (lambda _fields: None)
    with TtsClient(target, cancel=cancel, on_phase=on_phase) as client:
        return register_end_device(
            client, device, held, deadline=time.monotonic() + target.timeout,
            on_held=lambda servers: note({"tts_app": device.app, "tts_device_id": device.device_id,
                                          "tts_servers": ",".join(servers)}))


def recorded_fields(reg: Registration, app: str) -> dict:
    return {"tts_app": app, "tts_device_id": reg.device_id, "tts_servers": ",".join(reg.held)}


def check_key_carried(settings) -> None:
    """A ``random`` AppKey lives only in the header: refuse, before any board, a template that drops it.

    Otherwise a board interrupted after programming could never be registered with the key its module holds.
    """
    from flasher.errors import InputError
    from flasher.eui import EUI64
    from flasher.header import build_header_data, read_app_key, render_header
    from flasher.keys import AppKeySource, derive_device_key

    if settings.app_key.source is not AppKeySource.RANDOM:
        return
    sample = bytes(range(0xA1, 0xB1))
    data = build_header_data(EUI64(bytes(8)), app_key=sample, app_key_source="random", join_eui=settings.join_eui,
                             band=settings.band, id_scope=settings.id_scope,
                             registration_id=settings.id_policy.for_eui(EUI64(bytes(8))), extras=settings.extras,
                             device_key=derive_device_key(settings.group_key.reveal(), "preflight"))
    if read_app_key(render_header(data, settings.template)) != sample:
        raise InputError(f"--template {settings.template!r} does not write the AppKey (as FLASHER_APP_KEY or "
                         f"APPKEY[16]), and with --app-key-source random the header is its only copy: with "
                         f"--tts-app use a template that carries it, or --app-key-source derived/given")


class Network(Step):
    name = "network"

    def skip_reason(self, board) -> str | None:
        return None if board.settings.tts is not None else "--tts-app not given"

    def done(self, board) -> bool:
        return board.record.steps.get(self.name) == "ok"   # skipped earlier (no --tts-app then) is not registered now

    def resume(self, board) -> None:
        board.tts_device_id = board.record.tts_device_id

    def preflight(self, settings) -> None:
        if settings.tts is None:
            return
        settings.tts.plan_for(settings.band)
        check_key_carried(settings)

    def run(self, board) -> Done:
        s = board.settings
        if board.app_key is None:
            raise FlasherError(f"the module's AppKey is unknown: header {str(board.header_path)!r} does not carry it "
                               f"readably (AppKey source {s.app_key.source}); rerun with --force to program a new one")
        device = end_device(s.tts, board.dev_eui, s.join_eui, board.app_key, s.band)
        reg = register_board(s.tts, device, servers_recorded(board.record, device), cancel=board.stop,
                             on_phase=board.phase, checkpoint=board.checkpoint)
        board.tts_device_id = reg.device_id
        return Done(reg.detail, recorded_fields(reg, s.tts.app))
