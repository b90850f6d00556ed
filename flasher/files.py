"""Writing files so that a crash or a full disk never leaves half of one behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: bytes | str, *, mode: int = 0o600, fsync: bool = False) -> None:
    """Write to a temp file beside ``path`` (created with ``mode``), then rename it over ``path``.

    Readers see the old file or the new one, never a mix; on any failure the temp file
    is removed and the error propagates (callers turn OSError into their own message).
    """
    target = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(raw)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def shipped(name: str):
    """The shipped data folder ``templates`` or ``firmware``, installed or in a source checkout.

    Installed, they are the packages ``flasher.templates`` / ``flasher.firmware``
    (pyproject maps the top-level folders there). Run from a checkout without
    installing (``python -m flasher`` at the repo root), ``flasher/`` has no such
    subpackage, so the top-level folder beside it is used.
    """
    from importlib.resources import files

    try:
        return files(f"flasher.{name}")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / name
