"""identify: read the board's identity over AT; everything else is keyed on its DevEUI."""

from __future__ import annotations

from flasher.steps import Done, Step


class Identify(Step):
    name = "identify"
    needs_module = True
    before_claim = True

    def run(self, board) -> Done:
        ids = board.module.read_ids()
        board.dev_eui = ids.dev_eui
        return Done(ids.dev_eui.hex)
