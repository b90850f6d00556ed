"""Registration ids: one policy that turns a DevEUI into the id a board registers with.

The DPS device key is an HMAC over the exact registration id string, so every
command must spell it the same way; this module is the only place that does.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from flasher.errors import InputError
from flasher.eui import EUI64

DEFAULT_POLICY = "{deveui}"
MAX_LENGTH = 128
# DPS: up to 128 characters, alphanumerics and - . _ : ; the last one alphanumeric or '-'.
# Upper case is case-insensitive on paper but rejected in practice, and the HMAC is over
# the exact bytes, so only lower case is admitted.
_PLAIN_EUI = re.compile(r"[0-9A-Fa-f]{16}")
_ID = re.compile(r"[a-z0-9\-._:]*[a-z0-9\-]")


def validate_registration_id(text: str) -> str:
    if not isinstance(text, str) or not text:
        raise InputError("registration id '': empty")
    if len(text) > MAX_LENGTH:
        raise InputError(f"registration id {text[:20]!r}...: longer than {MAX_LENGTH} characters")
    if _ID.fullmatch(text):
        return text
    if text != text.lower() and _ID.fullmatch(text.lower()):
        raise InputError(f"registration id {text!r}: upper-case letters "
                         f"(DPS ids must be lower case: the key is derived over the exact string)")
    if text[-1] in "._:":
        raise InputError(f"registration id {text!r}: must end with a letter, digit or '-'")
    bad = next(c for c in text if not _ID.fullmatch(c) and c not in "._:")
    raise InputError(f"registration id {text!r}: character {bad!r} not allowed (letters, digits, - . _ : only)")


def check_deveui_format(template: str, what: str) -> None:
    """A format over the DevEUI: ``{deveui}`` exactly once, no other field, no spec or conversion.

    A spec (``{deveui:.2}``) or a second field could cut the DevEUI and give many boards one id.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise InputError(f"{what} {template!r}: {exc}") from None
    if [f for _, f, _, _ in parsed if f is not None] != ["deveui"]:
        raise InputError(f"{what} {template!r}: must contain {{deveui}} exactly once "
                         f"and no other field (the whole DevEUI keeps ids unique per board)")
    if any(spec or conv for _, f, spec, conv in parsed if f is not None):
        raise InputError(f"{what} {template!r}: {{deveui}} takes no format spec or "
                         f"conversion (they could cut the DevEUI and give boards the same id)")


@dataclass(frozen=True)
class RegistrationIdPolicy:
    """A format string over the DevEUI; ``{deveui}`` is its 16 lower-case hex digits."""

    template: str = DEFAULT_POLICY
    plain_eui = staticmethod(_PLAIN_EUI.fullmatch)  # 16 bare hex digits: the fast path of resolve()

    def __post_init__(self) -> None:
        check_deveui_format(self.template, "registration id policy")
        validate_registration_id(self.template.format(deveui="0" * 16))

    def for_eui(self, dev_eui: EUI64) -> str:
        return self.template.format(deveui=dev_eui.lower)

    def resolve(self, text: str) -> tuple[str, EUI64 | None]:
        """An argument that parses as an EUI goes through the policy; anything else must be a valid id."""
        try:
            eui = EUI64.parse(text)
        except InputError:
            return validate_registration_id(text.strip()), None
        return self.for_eui(eui), eui


_SCOPE = re.compile(r"[0-9A-Za-z]{1,64}")


def validate_id_scope(text: str) -> str:
    """An ID scope as DPS issues it (``0ne`` and 8 hex digits; other letters and digits for private endpoints)."""
    s = (text or "").strip() if isinstance(text, str) else ""
    if not s:
        raise InputError("ID scope '': empty (find it on the DPS overview page, e.g. 0ne0001A2B3)")
    if not _SCOPE.fullmatch(s):
        raise InputError(f"ID scope {s!r}: only letters and digits, at most 64 (e.g. 0ne0001A2B3)")
    return s


_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62})?)*\.?")


def validate_host(text: str, what: str = "DPS host") -> str:
    """A host name or IPv4 address (no scheme, no port: the SDK dials 8883, or 443 with WebSockets)."""
    host = (text or "").strip()
    if not host or len(host) > 253 or not _HOST.fullmatch(host):
        raise InputError(f"{what} {text!r}: expected a host name such as global.azure-devices-provisioning.net "
                         f"(no scheme or port: the SDK picks 8883, or 443 with --websockets)")
    return host
