"""Writing files so that a crash or a full disk never leaves half of one behind.

Two rules for whatever flasher writes (headers, build folders, a CA copy):

* a target that exists must be a regular file. A device node, a FIFO, a socket
  or a directory is refused before anything is written (``-o /dev/null`` as root
  would otherwise replace /dev/null with a regular file), and so is a symbolic
  link: flasher does not replace a link with a file, nor write through it to
  wherever it points (a link planted in a shared folder could point anywhere);
  give the path of the file itself.
* folders flasher creates are private (0700) whatever the umask; folders that
  already exist are left as they are.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from flasher.errors import InputError

PRIVATE_DIR_MODE = 0o700

_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"))


def file_kind(mode: int) -> str:
    """``st_mode`` -> "a regular file", "a FIFO", "a character device", ..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in _KINDS if test(mode)), "not a file")


def check_replaceable(path: str | os.PathLike, what: str = "output") -> None:
    """Refuse (:class:`InputError`) a ``path`` that exists and is not a regular file.

    The check uses ``lstat``: a symbolic link is refused whatever it points to.
    A path that does not exist is fine.
    """
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # nothing there (or a parent is a file: the write says so)
        return
    if stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{what} {str(path)!r}: is a directory")
    if stat.S_ISLNK(st.st_mode):
        raise InputError(f"{what} {str(path)!r}: is a symbolic link; flasher does not replace links "
                         f"(give the path of the file itself)")
    raise InputError(f"{what} {str(path)!r}: not a regular file ({file_kind(st.st_mode)})")


def make_private_dirs(path: str | os.PathLike) -> Path:
    """Create ``path`` and any missing parents with mode 0700 whatever the umask; return it.

    Folders that already exist keep their mode. A non-folder in the way raises
    :class:`FileExistsError` / :class:`NotADirectoryError` (callers word it).
    """
    target = Path(path)
    missing: list[Path] = []
    p = target
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, PRIVATE_DIR_MODE)
        except FileExistsError:
            if not d.is_dir():
                raise
            continue  # someone else made it meanwhile: theirs, left alone
        os.chmod(d, PRIVATE_DIR_MODE)  # the umask may have taken bits from the mkdir mode
    return target


def atomic_write(path: str | os.PathLike, data: bytes | str, *, mode: int = 0o600, fsync: bool = False,
                 what: str = "output") -> None:
    """Write to a temp file beside ``path`` (created with ``mode``), then rename it over ``path``.

    Readers see the old file or the new one, never a mix; on any failure the temp file
    is removed and the error propagates (callers turn OSError into their own message).
    A ``path`` that exists and is not a regular file (see :func:`check_replaceable`)
    is an :class:`InputError` naming it (``what``), and nothing is written.
    """
    target = Path(path)
    check_replaceable(target, what)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            f.write(raw)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        if not hasattr(os, "fchmod"):  # Windows: no fchmod; chmod by name before it is visible
            os.chmod(tmp, mode)
        check_replaceable(target, what)  # narrow the window in which something else took the name
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
