"""Key material: DPS symmetric keys, group-derived device keys, LoRaWAN AppKeys.

Pure functions; callers decide where secrets come from and where derived keys go.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field
from enum import StrEnum

from flasher.errors import InputError, SecretError
from flasher.eui import EUI64
from flasher.secrets import Secret

MIN_KEY_BYTES, MAX_KEY_BYTES = 16, 64  # what DPS accepts for symmetric keys
APPKEY_LABEL = b"flasher-appkey-v1"
_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def decode_symmetric_key(text: str, what: str = "group key") -> bytes:
    """Decode and check a DPS symmetric key; the error names ``what``, never the value."""
    s = (text or "").strip()
    if not s:
        raise SecretError(f"{what}: empty")
    if not _B64.fullmatch(s) or len(s) % 4:
        raise SecretError(f"{what}: not valid base64")
    try:
        raw = base64.b64decode(s, validate=True)
    except binascii.Error:
        raise SecretError(f"{what}: not valid base64") from None
    if not MIN_KEY_BYTES <= len(raw) <= MAX_KEY_BYTES:
        raise SecretError(f"{what}: decodes to {len(raw)} bytes; DPS accepts {MIN_KEY_BYTES} to {MAX_KEY_BYTES}")
    return raw


def derive_device_key(group_key: bytes, registration_id: str) -> str:
    """DPS group enrollment: base64(HMAC-SHA256(groupKey, registrationId as UTF-8))."""
    return DeviceKeyDeriver(group_key)(registration_id)


def key_check(device_key: Secret | str) -> str:
    """A short one-way tag of a device key, so a resumed board (or a pre-registered id) notices the group key
    changed, without the ledger holding the key."""
    text = device_key.reveal() if isinstance(device_key, Secret) else device_key
    return hashlib.sha256(b"flasher-device-key-check\0" + text.encode()).hexdigest()[:16]


class DeviceKeyDeriver:
    """The same derivation for many ids, on the one-shot C path of :func:`hmac.digest`."""

    def __init__(self, group_key: bytes):
        self._key = group_key

    def __call__(self, registration_id: str) -> str:
        return base64.b64encode(hmac.digest(self._key, registration_id.encode("utf-8"), "sha256")).decode("ascii")


def key_rows(items, policy, primary: bytes, secondary: bytes | None = None):
    """Stream ``(where, registration_id, primary_key, secondary_key, error)`` for ``(where, text)`` items.

    A bad id yields its :class:`InputError` in place of keys, so the caller decides
    whether to stop; nothing is held beyond the current item.
    """
    # Everything the loop calls is bound to a local: for 100,000 ids the loop is the cost.
    digest, b64 = hmac.digest, binascii.b2a_base64
    resolve, plain_eui, fmt = policy.resolve, policy.plain_eui, policy.template.format
    for where, text in items:
        text = text.strip()
        if plain_eui(text):  # the common case, inlined for 100,000-line inputs
            rid = fmt(deveui=text.lower())
        else:
            try:
                rid = resolve(text)[0]
            except InputError as exc:
                yield where, None, None, None, exc
                continue
        raw = rid.encode()
        yield (where, rid, b64(digest(primary, raw, "sha256"), newline=False).decode(),
               b64(digest(secondary, raw, "sha256"), newline=False).decode() if secondary else None, None)


def parse_app_key(text: str) -> bytes:
    s = (text or "").strip().replace(" ", "").replace(":", "")
    if s[:2] in ("0x", "0X"):
        s = s[2:]
    if not re.fullmatch(r"[0-9a-fA-F]{32}", s):
        raise SecretError("AppKey: expected 32 hex digits (16 bytes)")
    return bytes.fromhex(s)


def check_master_secret(text: str) -> bytes:
    raw = (text or "").encode("utf-8")
    if len(raw) < 16:
        raise SecretError("AppKey master secret: at least 16 bytes needed")
    return raw


def derive_app_key(master_secret: bytes, dev_eui: EUI64) -> bytes:
    """AppKey = first 16 bytes of HMAC-SHA256(master secret, "flasher-appkey-v1" + DevEUI bytes).

    Documented in the README so a network-server integration can recompute it.
    """
    return hmac.new(master_secret, APPKEY_LABEL + dev_eui.value, hashlib.sha256).digest()[:16]


def random_app_key() -> bytes:
    return os.urandom(16)


class AppKeySource(StrEnum):
    """Where a board's AppKey comes from (stored in the ledger and the header comment as this text)."""

    RANDOM = "random"     # 16 bytes from the OS: the header is the only copy
    DERIVED = "derived"   # HMAC of a master secret and the DevEUI: recomputable by a network-server integration
    GIVEN = "given"       # one key for every board

    @classmethod
    def parse(cls, text: str, where: str = "AppKey source", hint: str = "") -> AppKeySource:
        try:
            return cls(str(text).strip().lower())
        except ValueError:
            raise InputError(f"{where} {text!r}: must be one of {', '.join(cls)}{hint}") from None


@dataclass(frozen=True)
class AppKeyPlan:
    """One AppKey source and the secret it needs: what ``header`` and ``provision`` both use."""

    source: AppKeySource
    given: Secret | None = field(default=None, repr=False)    # for GIVEN: the key (16 bytes)
    master: Secret | None = field(default=None, repr=False)   # for DERIVED: the master secret (bytes, >= 16)

    def __post_init__(self) -> None:
        if self.source is AppKeySource.GIVEN and not self.given:
            raise InputError("AppKey source 'given' needs an AppKey (--app-key-file or $FLASHER_APP_KEY)")
        if self.source is AppKeySource.DERIVED and not self.master:
            raise InputError("AppKey source 'derived' needs a master secret "
                             "(--app-key-master-file or $FLASHER_APPKEY_MASTER)")

    @classmethod
    def given_key(cls, text: str, label: str = "given") -> AppKeyPlan:
        return cls(AppKeySource.GIVEN, given=Secret(parse_app_key(text), label))

    @classmethod
    def derived_from(cls, text: str, label: str = "given") -> AppKeyPlan:
        return cls(AppKeySource.DERIVED, master=Secret(check_master_secret(text), label))

    def key_for(self, dev_eui: EUI64) -> Secret:
        """This board's AppKey (a new one each call for RANDOM)."""
        if self.source is AppKeySource.GIVEN:
            assert self.given is not None
            return self.given
        if self.source is AppKeySource.DERIVED:
            assert self.master is not None
            return Secret(derive_app_key(self.master.reveal(), dev_eui), "derived")
        return Secret(random_app_key(), "random")
