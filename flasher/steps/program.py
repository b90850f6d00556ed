"""program: write JoinEUI, AppKey, OTAA mode and band to the RHF76, and read back what it lets us read."""

from __future__ import annotations

from flasher.steps import Done, Step
from flasher.steps.render import module_keyed


class Program(Step):
    name = "program"
    needs_module = True

    def done(self, board) -> bool:
        return module_keyed(board)

    def run(self, board) -> Done:
        s = board.settings
        board.module.program(s.join_eui, board.app_key.reveal(), band=s.band)
        return Done(f"JoinEUI {s.join_eui.hex}, {s.band}, OTAA")
