"""The words the ledger, the pipeline and the output share.

String-valued enums: a member *is* its text, so what the ledger stores and what
``--json`` prints stay exactly as before, while code gets names a typo cannot
silently miss.
"""

from __future__ import annotations

from enum import StrEnum


class StepOutcome(StrEnum):
    """One step of one board, as a ``steps`` row in the ledger records it."""

    STARTED = "started"
    OK = "ok"
    SKIPPED = "skipped"
    FAILED = "failed"


class BoardStatus(StrEnum):
    """A board's row in the ledger."""

    IN_PROGRESS = "in_progress"
    PROVISIONED = "provisioned"
    FAILED = "failed"
    CONFLICT = "conflict"


class ResultStatus(StrEnum):
    """What one run did with one board (``provision --json``'s ``status``)."""

    PROVISIONED = "provisioned"
    ALREADY_PROVISIONED = "already_provisioned"
    FAILED = "failed"
    CONFLICT = "conflict"   # provisioned earlier with other settings, or its header changed: left alone
    BUSY = "busy"           # another run holds the board's claim in the ledger
