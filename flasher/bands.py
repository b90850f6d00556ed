"""LoRaWAN bands as the RHF76 names them (``AT+DR=<band>``): the one table every command uses."""

from __future__ import annotations

from flasher.errors import InputError

# RHF76 band name -> the Seeed LoRaWan library's `_physical_type_t` enumerator: every band the library can
# select (LoRaWan.cpp setDataRate). The module calls the 433 MHz band EU433; the library's enum spells it EU434.
BANDS: dict[str, str] = {
    "EU868": "EU868",
    "US915": "US915",
    "US915HYBRID": "US915HYBRID",
    "AU915": "AU915",
    "AU915OLD": "AU915OLD",
    "AS923": "AS923",
    "CN470": "CN470",
    "CN779": "CN779",
    "KR920": "KR920",
    "IN865": "IN865",
    "EU433": "EU434",
}


def parse_band(text: str) -> str:
    band = (text or "").strip().upper()
    if band not in BANDS:
        raise InputError(f"band {text!r}: unknown (one of {', '.join(BANDS)})")
    return band
