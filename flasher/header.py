"""Firmware config headers: the data that goes into one, rendering it, writing it.

Three steps the provisioning pipeline calls in order:

* :func:`build_header_data` checks every input and returns a frozen :class:`HeaderData`;
* :func:`render_header` renders a Jinja2 template (a shipped NAME or a PATH) with it;
* :func:`write_header` writes the text atomically with mode 0600 and returns its SHA-256.

Rendering is strict: an undefined variable is an error naming it, and every
``{{ ... }}`` in a template must go through one of the C filters (``c_string``,
``c_bytes``, ``c_ident``, ``c_comment``) or be a number - raw text is refused, so a
template cannot forget to escape a value. Jinja2 is imported only when rendering.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from flasher import __version__
from flasher.bands import BANDS, parse_band
from flasher.cliteral import c_comment, c_identifier, c_string
from flasher.errors import FlasherError, InputError
from flasher.eui import EUI64
from flasher.files import atomic_write, check_replaceable, make_private_dirs, shipped
from flasher.identity import RegistrationIdPolicy, validate_id_scope, validate_registration_id
from flasher.keys import check_master_secret, decode_symmetric_key, derive_app_key, parse_app_key, random_app_key
from flasher.secrets import Redactor

if TYPE_CHECKING:
    from flasher.sandbox import RenderLimits

DEFAULT_TEMPLATE = "seeed-lorawan"
TEMPLATE_SUFFIX = ".h.j2"
DEFAULT_JOIN_EUI = "0000000000000000"
DEFAULT_BAND = "EU868"
APP_KEY_SOURCES = ("given", "derived", "random")

_TEMPLATE_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")


@dataclass(frozen=True)
class HeaderData:
    """Everything a config header carries, already checked. Build it with :func:`build_header_data`."""

    dev_eui: EUI64
    join_eui: EUI64
    app_key: bytes = field(repr=False)
    app_key_source: str
    band: str
    id_scope: str | None
    registration_id: str
    device_key: str | None = field(repr=False)
    extras: Mapping[str, str] = field(default_factory=dict)
    tool_version: str = __version__

    @property
    def band_seeed(self) -> str:
        return BANDS[self.band]

    def context(self) -> dict[str, object]:
        """Template variables. Values that are absent (None) are left out, so a template
        that needs one fails naming it, and ``{% if x is defined %}`` tests for it."""
        ctx: dict[str, object] = {
            "dev_eui": self.dev_eui,
            "join_eui": self.join_eui,
            "app_eui": self.join_eui,
            "app_key": self.app_key,
            "app_key_hex": self.app_key.hex().upper(),
            "app_key_source": self.app_key_source,
            "band": self.band,
            "band_seeed": self.band_seeed,
            "registration_id": self.registration_id,
            "extras": list(self.extras.items()),
            "tool_version": self.tool_version,
            "guard": "FLASHER_CONFIG_H",
        }
        if self.id_scope is not None:
            ctx["id_scope"] = self.id_scope
        if self.device_key is not None:
            ctx["device_key"] = self.device_key
        return ctx


def parse_sets(items: Iterable[str]) -> dict[str, str]:
    """``--set NAME=VALUE`` items -> an ordered dict; names are checked, duplicates refused."""
    extras: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--set {item!r}: expected NAME=VALUE")
        c_identifier(name, "--set name")
        if name in extras:
            raise InputError(f"--set {name}: given twice")
        c_string(value, f"--set {name}")
        extras[name] = value
    return extras


def resolve_app_key(dev_eui: EUI64, *, app_key_text: str | None = None,
                    master_secret: str | bytes | None = None, random: bool = False) -> tuple[bytes, str]:
    """Return ``(app_key, source)`` from exactly one explicit choice.

    * ``app_key_text``: 32 hex digits -> source ``"given"``;
    * ``master_secret``: AppKey = :func:`flasher.keys.derive_app_key` (master, DevEUI) -> ``"derived"``
      (text is taken as its UTF-8 bytes, at least 16);
    * ``random=True``: 16 bytes from the OS -> ``"random"``.

    None of them, or more than one, is an :class:`InputError`: an AppKey is never chosen silently.
    """
    chosen = [n for n, v in (("an AppKey", app_key_text), ("an AppKey master secret", master_secret),
                             ("a random AppKey", random or None)) if v is not None and v != ""]
    if len(chosen) != 1:
        what = " and ".join(chosen) if chosen else "no source"
        raise InputError(f"AppKey: choose exactly one source (a key, a master secret to derive it from, "
                         f"or random); got {what}")
    if app_key_text:
        key, source = parse_app_key(app_key_text), "given"
    elif master_secret:
        raw = master_secret if isinstance(master_secret, bytes) else check_master_secret(master_secret)
        if len(raw) < 16:
            raise InputError("AppKey master secret: at least 16 bytes needed")
        key, source = derive_app_key(raw, EUI64.coerce(dev_eui, "DevEUI")), "derived"
    else:
        key, source = random_app_key(), "random"
    Redactor.add(key)
    return key, source


def build_header_data(dev_eui: EUI64 | str, *, app_key: bytes, app_key_source: str,
                      join_eui: EUI64 | str = DEFAULT_JOIN_EUI, band: str = DEFAULT_BAND,
                      id_scope: str | None = None, registration_id: str | None = None,
                      device_key: str | None = None, extras: Mapping[str, str] | None = None,
                      tool_version: str = __version__) -> HeaderData:
    """Check every input and return the header's data. ``registration_id`` defaults to the
    standard policy (16 lower-case hex digits of the DevEUI)."""
    dev = EUI64.coerce(dev_eui, "DevEUI")
    join = EUI64.coerce(join_eui, "JoinEUI")
    if not isinstance(app_key, bytes) or len(app_key) != 16:
        raise InputError("AppKey: expected 16 bytes")
    if app_key_source == "file":  # the pipeline's name for a key that was given
        app_key_source = "given"
    if app_key_source not in APP_KEY_SOURCES:
        raise InputError(f"AppKey source {app_key_source!r}: one of {', '.join(APP_KEY_SOURCES)}")
    if id_scope is not None:
        id_scope = validate_id_scope(id_scope)
    reg = validate_registration_id(registration_id) if registration_id is not None \
        else RegistrationIdPolicy().for_eui(dev)
    if device_key is not None:
        decode_symmetric_key(device_key, "device key")
    checked: dict[str, str] = {}
    for name, value in (extras or {}).items():
        c_identifier(name, "--set name")
        c_string(value, f"--set {name}")
        checked[name] = value
    c_comment(tool_version, "tool version")
    return HeaderData(dev_eui=dev, join_eui=join, app_key=app_key, app_key_source=app_key_source,
                      band=parse_band(band), id_scope=id_scope, registration_id=reg, device_key=device_key,
                      extras=checked, tool_version=tool_version)


# --- rendering -------------------------------------------------------------------

def shipped_templates() -> list[str]:
    """Names of the templates shipped in the package (``flasher.templates``)."""
    return list(_shipped_names())


@functools.lru_cache(maxsize=1)
def _shipped_names() -> tuple[str, ...]:
    return tuple(sorted(p.name[: -len(TEMPLATE_SUFFIX)] for p in shipped("templates").iterdir()
                        if p.name.endswith(TEMPLATE_SUFFIX) and not p.name.startswith("_")))


def render_header(data: HeaderData, template: str = DEFAULT_TEMPLATE, *, limits: RenderLimits | None = None) -> str:
    """Render ``template`` (a shipped name such as ``seeed-lorawan``, or a path) with ``data``.

    A template is untrusted input: it renders in a sandbox with limits (see
    :mod:`flasher.sandbox`), and any failure is one :class:`InputError` naming it.
    """
    from flasher import sandbox

    secrets = [data.app_key.hex(), data.app_key.hex().upper(), *([data.device_key] if data.device_key else []),
               *Redactor.known()]
    if _TEMPLATE_NAME.fullmatch(template):
        names = shipped_templates()
        if template not in names:
            raise InputError(f"template {template!r}: no such shipped template "
                             f"(shipped: {', '.join(names)}; or give a path)")
        return sandbox.render(template + TEMPLATE_SUFFIX, data.context(), folder=None, label=template,
                              secrets=secrets, limits=limits)
    folder, name = sandbox.resolve_path(template, limits)
    return sandbox.render(name, data.context(), folder=folder, label=template, secrets=secrets, limits=limits)


# --- writing ---------------------------------------------------------------------

def write_header(text: str, path: str | os.PathLike) -> str:
    """Write ``text`` to ``path`` atomically (temp file in the same directory, then rename),
    mode 0600, creating missing parent folders with mode 0700. Returns the SHA-256 (hex)
    of the bytes written. A ``path`` that exists and is not a regular file (a directory,
    a device node, a FIFO, a socket, a symbolic link) is refused and nothing is written."""
    target = Path(path)
    check_replaceable(target, "output")
    data = text.encode("utf-8")
    try:
        make_private_dirs(target.parent)
    except OSError as exc:
        raise FlasherError(f"output {str(target)!r}: cannot create ({exc.strerror or exc.__class__.__name__})") from None
    try:
        atomic_write(target, data, mode=0o600, fsync=True, what="output")
    except OSError as exc:
        verb = "cannot create" if not target.parent.is_dir() else "cannot write"
        raise FlasherError(f"output {str(target)!r}: {verb} ({exc.strerror or exc.__class__.__name__})") from None
    return hashlib.sha256(data).hexdigest()


# --- reading back ----------------------------------------------------------------

_APP_KEY_MACRO = re.compile(r'#[ \t]*define[ \t]+FLASHER_APP_KEY[ \t]+"([0-9A-Fa-f]{32})"')
_APP_KEY_ARRAY = re.compile(r"\bAPPKEY[ \t]*\[[ \t]*16[ \t]*\][ \t]*=[ \t]*\{([^}]*)\}")
_BYTE = re.compile(r"0[xX]([0-9A-Fa-f]{1,2})")


def _strip_comments(text: str) -> str:
    """C source without its comments (string and character literals kept whole)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
            out.append(" ")
        elif text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        else:
            out.append(c)
            i += 1
    return "".join(out)


def read_app_key(text: str) -> bytes | None:
    """The AppKey a rendered header carries, or None if it carries none.

    The shipped templates write it as ``#define FLASHER_APP_KEY "<32 hex>"`` (``_common.h.j2``)
    and, for LMIC, as ``APPKEY[16] = { 0x.., ... }`` (most significant byte first). A header
    is the only copy of a ``random`` AppKey, so a resumed board reads it back from there.
    Two spellings that disagree are refused rather than guessed between.
    """
    code = _strip_comments(text)
    found: list[bytes] = [bytes.fromhex(m.group(1)) for m in _APP_KEY_MACRO.finditer(code)]
    for m in _APP_KEY_ARRAY.finditer(code):
        items = [x.strip() for x in m.group(1).split(",") if x.strip()]
        values = [_BYTE.fullmatch(x) for x in items]
        if len(items) == 16 and all(values):
            found.append(bytes(int(v.group(1), 16) for v in values if v))
    if not found:
        return None
    if any(k != found[0] for k in found):
        raise InputError("header: its AppKey spellings disagree (FLASHER_APP_KEY and APPKEY[16] differ)")
    Redactor.add(found[0])
    return found[0]
