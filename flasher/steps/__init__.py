"""The pipeline's steps, one module each; :data:`flasher.pipeline.STEPS` puts them in order.

A step is a small object: ``name``; ``skip_reason(board)`` (None when it applies,
else why not: "--upload not given"); ``done(board)`` (the ledger says an earlier
run finished it) with ``resume(board)`` to restore what later steps need; ``run(board)``
returning :class:`Done` (what to record); ``preflight(settings)`` to refuse, before
any board is touched, what would fail every board. Steps read and fill the shared
:class:`flasher.pipeline.Board`; they never touch the ledger or the display: the
pipeline's recorder does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from flasher.errors import FlasherError

if TYPE_CHECKING:
    from flasher.pipeline import Board, Settings


@dataclass(frozen=True)
class Done:
    """What a finished step records: a one-line ``detail`` and ledger ``fields`` it produced."""

    detail: str = ""
    fields: dict[str, Any] = field(default_factory=dict)


class Conflict(FlasherError):
    """The board is not what the ledger says (other settings, a changed header): leave it alone."""


class Step:
    name: ClassVar[str]
    needs_module: ClassVar[bool] = False   # talks to the LoRaWAN module over the open serial port
    needs_port: ClassVar[bool] = False     # needs the serial port to itself (the module connection is closed first)
    before_claim: ClassVar[bool] = False   # only reads: runs every time, before the board is claimed in the ledger
    sdk_client: ClassVar[bool] = False     # makes an Azure SDK client (see flasher.pipeline's _SdkGarbage)

    def skip_reason(self, board: Board) -> str | None:
        return None

    def done(self, board: Board) -> bool:
        return board.done_earlier(self.name)

    def resume(self, board: Board) -> None:
        """Done earlier: put back on ``board`` what later steps need."""

    def preflight(self, settings: Settings) -> None:
        """Refuse bad settings once, before any board."""

    def run(self, board: Board) -> Done:
        raise NotImplementedError
