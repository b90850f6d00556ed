"""render: the board's firmware config header, written atomically with mode 0600."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from flasher.steps import Conflict, Done, Step

log = logging.getLogger("flasher.steps.render")


def module_keyed(board) -> bool:
    """Render and program go together: a header is only trusted once the module holds its AppKey."""
    return board.done_earlier("render") and board.done_earlier("program")


def module_app_key(plan, dev_eui, header_text: str | None, header: str):
    """The AppKey a module was programmed with, as a Secret, or None if nothing can tell.

    The header it was programmed from (checked unchanged by the caller) is the truth when
    it carries the key (the shipped device templates do); otherwise a ``derived`` or
    ``given`` key is computed again. A ``random`` key whose header does not carry it is lost.
    """
    from flasher.errors import InputError
    from flasher.header import read_app_key
    from flasher.keys import AppKeySource
    from flasher.secrets import Secret

    if header_text is not None:
        try:
            in_header = read_app_key(header_text)
        except InputError as exc:
            raise Conflict(f"header {header!r}: {exc}") from None
        if in_header is not None:
            return Secret(in_header, f"header {header}")
    if plan is not None and plan.source is not AppKeySource.RANDOM:
        return plan.key_for(dev_eui)
    return None


def _header_data(s, dev_eui, app_key: bytes, registration_id: str, device_key: str):
    from flasher.header import build_header_data

    return build_header_data(dev_eui, join_eui=s.join_eui, app_key=app_key, app_key_source=str(s.app_key.source),
                             band=s.band, id_scope=s.id_scope, registration_id=registration_id,
                             device_key=device_key, extras=s.extras)


class Render(Step):
    name = "render"

    def done(self, board) -> bool:
        return module_keyed(board)

    def resume(self, board) -> None:
        """The module already holds the AppKey in this header: it must be the same file, unchanged."""
        path = Path(board.record.header_path or "")
        try:
            data: bytes | None = path.read_bytes()
        except OSError:
            data = None
        digest = hashlib.sha256(data).hexdigest() if data is not None else None
        if digest != board.record.header_sha256:
            state = "is missing" if digest is None else "changed"
            raise Conflict(f"header {str(path)!r} {state} since the module was programmed; "
                           f"rerun with --force to provision this board again")
        board.header_path = path
        # later steps (network) need the module's AppKey: the header's, or the same source's again; a header
        # that spells it two ways leaves it unknown, which only a step that needs it reports
        assert data is not None
        try:
            board.app_key = module_app_key(board.settings.app_key, board.dev_eui, data.decode("utf-8", "replace"),
                                           str(path))
        except Conflict as exc:
            log.warning("%s: %s", board.deveui, exc)
            board.app_key = None

    def preflight(self, settings) -> None:
        """A trial render with a placeholder board: a missing/broken template or bad --set fails once, here."""
        from flasher.eui import EUI64
        from flasher.header import render_header
        from flasher.keys import derive_device_key

        sample = EUI64(bytes(8))
        data = _header_data(settings, sample, bytes(16), settings.id_policy.for_eui(sample),
                            derive_device_key(settings.group_key.reveal(), "preflight"))
        render_header(data, settings.template)

    def run(self, board) -> Done:
        from flasher.header import render_header, write_header

        s = board.settings
        board.app_key = s.app_key.key_for(board.dev_eui)
        data = _header_data(s, board.dev_eui, board.app_key.reveal(), board.registration_id, board.device_key.reveal())
        path = s.out_dir / f"{board.deveui}.h"
        digest = write_header(render_header(data, s.template), path)
        board.header_path = path
        return Done(str(path), {"header_path": str(path), "header_sha256": digest})
