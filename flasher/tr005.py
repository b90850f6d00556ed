"""LoRa Alliance TR005 device identification QR codes: the text inside the code.

``LW:D0:<JoinEUI>:<DevEUI>:<VendorID><ModelID>[:O<owner token>][:S<serial>]``, EUIs and ids in upper-case hex, read
the way The Things Stack reads it (``pkg/qrcodegenerator/qrcode/enddevices/lora_alliance_tr005.go``): at least five
``:``-separated parts, ``LW`` then ``D0``, two EUI-64s, exactly four bytes of vendor and model id, then extensions
``C`` (checksum), ``O`` (owner token), ``S`` (serial number), ``P`` (proprietary), empty ones ignored, none containing
``:``. Upper-case hex keeps the whole string in the QR alphanumeric alphabet, so the code stays small.

There is deliberately no field for a key: a label is printed and stuck on a board, and a QR code is claimable by
anyone who photographs it. The AppKey never goes near one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from flasher.errors import InputError
from flasher.eui import EUI64

_HEX4 = re.compile(r"[0-9A-Fa-f]{4}")
_HEX8 = re.compile(r"[0-9A-Fa-f]{8}")
_PRINTABLE = re.compile(r"[\x21-\x7e]*")  # visible ASCII: no blanks, no control characters


def parse_id16(value: str | int, what: str) -> int:
    """A TR005 vendor or model id: 4 hex digits (``0x`` allowed) -> 0..0xFFFF."""
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value <= 0xFFFF:
            return value
        raise InputError(f"{what} {value!r}: must be 4 hex digits (0000 to FFFF)")
    text = str(value).strip()
    digits = text[2:] if text[:2] in ("0x", "0X") else text
    if not _HEX4.fullmatch(digits):
        raise InputError(f"{what} {text!r}: must be 4 hex digits (0000 to FFFF)")
    return int(digits, 16)


def _extension(value: str | None, what: str) -> str:
    if not value:
        return ""
    if ":" in value or not _PRINTABLE.fullmatch(value):
        raise InputError(f"TR005 {what} {value!r}: only visible ASCII characters other than ':'")
    return value


@dataclass(frozen=True)
class TR005:
    """One device's QR code content. ``owner_token`` and ``serial`` are optional extensions."""

    join_eui: EUI64
    dev_eui: EUI64
    vendor_id: int = 0
    model_id: int = 0
    owner_token: str = ""
    serial: str = ""

    def __post_init__(self) -> None:
        for name in ("vendor_id", "model_id"):
            parse_id16(getattr(self, name), name.replace("_", " "))
        _extension(self.owner_token, "owner token")
        _extension(self.serial, "serial number")

    def text(self) -> str:
        """The string a network server's scanner reads."""
        ext = (f":O{self.owner_token}" if self.owner_token else "") + (f":S{self.serial}" if self.serial else "")
        return f"LW:D0:{self.join_eui.hex}:{self.dev_eui.hex}:{self.vendor_id:04X}{self.model_id:04X}{ext}"

    __str__ = text

    @classmethod
    def parse(cls, text: str) -> TR005:
        """Read a TR005 string as The Things Stack does; checksum and proprietary extensions are accepted and dropped."""
        parts = text.split(":")
        if len(parts) < 5 or parts[0] != "LW" or parts[1] != "D0":
            raise InputError(f"TR005 {text!r}: expected LW:D0:<JoinEUI>:<DevEUI>:<VendorID><ModelID>[:...]")
        join_eui, dev_eui = (EUI64.parse(p, what) if re.fullmatch(r"[0-9A-Fa-f]{16}", p) else _bad_eui(text, p, what)
                             for p, what in ((parts[2], "JoinEUI"), (parts[3], "DevEUI")))
        if not _HEX8.fullmatch(parts[4]):
            raise InputError(f"TR005 {text!r}: vendor and model id {parts[4]!r} must be 8 hex digits")
        found: dict[str, str] = {}
        for ext in parts[5:]:
            if len(ext) > 1:
                found[ext[0]] = ext[1:]
        return cls(join_eui, dev_eui, int(parts[4][:4], 16), int(parts[4][4:], 16),
                   owner_token=found.get("O", ""), serial=found.get("S", ""))


def _bad_eui(text: str, part: str, what: str) -> EUI64:
    raise InputError(f"TR005 {text!r}: {what} {part!r} must be 16 hex digits")
