"""Where secrets come from, and the safety net that keeps them out of logs.

Order of precedence: a plain option (visible in the process list, so it warns),
a file, an environment variable, then a hidden prompt when a person is there.
Every secret that is loaded is also registered with :class:`Redactor`, which
masks it in any log record, whatever the logger.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from typing import TYPE_CHECKING

from flasher.errors import SecretError

if TYPE_CHECKING:
    import logging

MASK = "********"
# user:password@ in any URL (a proxy's, most likely): masked in every log record, whatever its length
_URL_PASSWORD = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/\s:@]*):(?P<password>[^@\s/]*)@")


def mask_url_passwords(text: str) -> str:
    """``http://user:secret@host`` -> ``http://user:********@host``, anywhere in ``text``."""
    return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)


class Secret:
    """A secret value that cannot be printed by accident.

    ``repr``/``str`` show only where it came from; the value is registered with the
    log masker when the object is made, and code that must use it asks for it by
    name with :meth:`reveal`, at the last moment (an HMAC, a header, the SDK).
    """

    __slots__ = ("_value", "source")

    def __init__(self, value: str | bytes, source: str = "derived"):
        if isinstance(value, Secret):
            value = value.reveal()
        self._value = value
        self.source = source
        Redactor.add(value)

    def reveal(self):
        return self._value

    def __repr__(self) -> str:
        return f"Secret(<{self.source}>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        import hmac

        if not isinstance(other, Secret):
            return NotImplemented
        a, b = self._value, other._value
        a = a.encode() if isinstance(a, str) else a
        b = b.encode() if isinstance(b, str) else b
        return hmac.compare_digest(a, b)

    def __hash__(self) -> int:
        return hash(self.source)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self):
        raise TypeError("a Secret is not pickled")


class Redactor:
    """Replace every known secret (and its derived keys) in a log record with a mask, and the
    password of any ``scheme://user:password@`` URL (a proxy's), however short it is.

    A log filter (logging takes any object with a ``filter(record)`` method), not a
    subclass of ``logging.Filter``: commands that never log do not import logging for it.
    """

    # Replaced, never changed in place: boards add their keys while other boards' threads scrub (iterating a set
    # that another thread grows raises "Set changed size during iteration").
    _secrets: frozenset[str] = frozenset()
    _adding = threading.Lock()

    @classmethod
    def add(cls, *values: str | bytes | None) -> None:
        new: set[str] = set()
        for v in values:
            if isinstance(v, bytes):
                v = v.hex()
                new.update({v, v.upper()})
            elif v and len(v) >= 8:
                new.add(v)
        if not new <= cls._secrets:
            with cls._adding:
                cls._secrets = cls._secrets | new

    @classmethod
    def known(cls) -> frozenset[str]:
        """Every secret text loaded so far (for scrubbing child environments)."""
        return frozenset(cls._secrets)

    @classmethod
    def scrub(cls, text: str) -> str:
        for s in cls._secrets:
            if s in text:
                text = text.replace(s, MASK)
        return mask_url_passwords(text) if "@" in text else text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a broken format: never let logging's error report print its arguments
            record.msg, record.args = f"(a log record of {record.name} that does not format)", None
            return True
        scrubbed = self.scrub(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        return True


def read_secret_file(path: str | os.PathLike, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except FileNotFoundError:
        raise SecretError(f"{what} file {str(path)!r}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretError(f"{what} file {str(path)!r}: cannot read ({exc.__class__.__name__})") from None
    if not text:
        raise SecretError(f"{what} file {str(path)!r}: empty")
    return text


def resolve_secret(
    what: str,
    *,
    option: str | None = None,
    option_name: str | None = None,
    file: str | os.PathLike | None = None,
    env_var: str | None = None,
    prompt: bool = False,
    required: bool = True,
    warn=lambda msg: print(msg, file=sys.stderr),
) -> str | None:
    """Return the secret text from the first source that has it."""
    value: str | None = None
    if option:
        warn(f"warning: {option_name or what} on the command line is visible in the process list; "
             f"prefer {env_var or 'an environment variable'} or a key file")
        value = option
    elif file:
        value = read_secret_file(file, what)
    elif env_var and os.environ.get(env_var, "").strip():
        value = os.environ[env_var].strip()
    elif prompt and sys.stdin is not None and sys.stdin.isatty():
        import getpass

        value = getpass.getpass(f"{what}: ").strip() or None
    if value is None and required:
        hint = f"set {env_var}" if env_var else "give it"
        raise SecretError(f"{what}: missing ({hint}, or use a key file)")
    Redactor.add(value)
    return value
