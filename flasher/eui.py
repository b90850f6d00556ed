"""EUI-64 identifiers (DevEUI, JoinEUI/AppEUI) as a value type.

Boards, network servers and firmware libraries spell the same eight bytes in
many ways; parsing every spelling into one type and formatting from it is what
keeps a DevEUI identical everywhere it is used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from flasher.errors import InputError

_HEX = re.compile(r"[0-9a-fA-F]+")


@dataclass(frozen=True, order=True)
class EUI64:
    """Eight bytes, most significant first (the order in which EUIs are written)."""

    value: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.value, bytes) or len(self.value) != 8:
            raise InputError(f"an EUI-64 is 8 bytes, got {self.value!r}")

    @classmethod
    def parse(cls, text: str, what: str = "EUI") -> EUI64:
        """Accept plain hex, ``0x``-prefixed hex, or bytes separated by one of ``:``, ``-`` or space."""
        if not isinstance(text, str):
            raise InputError(f"{what} {text!r}: expected text")
        s = text.strip()
        if s[:2] in ("0x", "0X"):
            s = s[2:]
        seps = {c for c in s if c in ":- "}
        if len(seps) > 1:
            raise InputError(f"{what} {text!r}: mixed separators")
        if seps:
            parts = s.split(seps.pop())
            if len(parts) != 8 or any(len(p) != 2 for p in parts):
                raise InputError(f"{what} {text!r}: expected 8 two-digit hex bytes")
            s = "".join(parts)
        if not _HEX.fullmatch(s or "-"):
            raise InputError(f"{what} {text!r}: not hexadecimal")
        if len(s) != 16:
            raise InputError(f"{what} {text!r}: expected 16 hex digits, got {len(s)}")
        return cls(bytes.fromhex(s))

    @classmethod
    def coerce(cls, value: EUI64 | str, what: str = "EUI") -> EUI64:
        return value if isinstance(value, EUI64) else cls.parse(value, what)

    # --- formats -------------------------------------------------------------
    @property
    def hex(self) -> str:
        """``2CF7F12024900138``: what the RHF76 and Seeed's LoRaWan library take."""
        return self.value.hex().upper()

    @property
    def lower(self) -> str:
        return self.value.hex()

    @property
    def colon(self) -> str:
        """``2C:F7:F1:20:24:90:01:38``: how the module prints it."""
        return ":".join(f"{b:02X}" for b in self.value)

    def c_array(self, lsb_first: bool = False) -> str:
        """C initializer ``{ 0x2C, ... }``; LMIC wants DevEUI/JoinEUI ``lsb_first``."""
        data = self.value[::-1] if lsb_first else self.value
        return "{ " + ", ".join(f"0x{b:02X}" for b in data) + " }"

    def __str__(self) -> str:
        return self.hex


def c_byte_array(data: bytes) -> str:
    """C initializer for arbitrary bytes, in the order given (AppKey: MSB first)."""
    return "{ " + ", ".join(f"0x{b:02X}" for b in data) + " }"
