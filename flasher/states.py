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


class Verdict(StrEnum):
    """What ``flasher station`` says of a board when it stops working on it (its ``--json`` ``verdict``)."""

    DONE = "done"                   # provisioned now
    ALREADY_DONE = "already_done"   # the ledger says it was provisioned before, with these settings
    FAILED = "failed"               # failed, conflict, or busy in another run: unplug and replug it to retry
    UNPLUGGED = "unplugged"         # unplugged mid-way: the ledger says where; plugging it back resumes there
    STOPPED = "stopped"             # Ctrl-C or SIGTERM stopped it at a step boundary; the next run resumes there
