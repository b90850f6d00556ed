"""The TR005 string, checked against The Things Stack's own test vectors
(lorawan-stack pkg/qrcodegenerator/qrcode/enddevices/lora_alliance_tr005_test.go): the strings it decodes, the
fields it reads from them, the canonical form it writes back, and the strings it refuses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flasher.errors import InputError
from flasher.eui import EUI64
from flasher.tr005 import TR005, parse_id16

# lorawan-stack's Decode cases: (data, canonical re-encoding, JoinEUI, DevEUI, vendor, model, owner token)
DECODE = [
    ("LW:D0:42FFFFFFFFFFFFFF:4242FFFFFFFFFFFF:42FFFF42", None,
     "42FFFFFFFFFFFFFF", "4242FFFFFFFFFFFF", 0x42FF, 0xFF42, ""),
    ("LW:D0:42FFFFFFFFFFFFFF:4242FFFFFFFFFFFF:42FFFF42:O:S:P", "LW:D0:42FFFFFFFFFFFFFF:4242FFFFFFFFFFFF:42FFFF42",
     "42FFFFFFFFFFFFFF", "4242FFFFFFFFFFFF", 0x42FF, 0xFF42, ""),
]
# their invalid cases: not TR005 at all, too few parts, a short EUI, a 6-byte product id
INVALID = [
    bytes([0x42, 0xFF, 0x42, 0x42]).decode("latin-1"),
    "LW:D0:42FFFFFFFFFFFFFF:4242FFFFFFFFFFFF",
    "LW:D0:42FFFFFFFFFFFF:4242FFFFFFFFFFFF:42FFFF42",
    "LW:D0:42FFFFFFFFFFFFFF:4242FFFFFFFFFFFF:42FFFF42AABB",
]


@pytest.mark.parametrize("data, canonical, join, dev, vendor, model, owner", DECODE)
def test_lorawan_stack_decode_vectors(data, canonical, join, dev, vendor, model, owner):
    code = TR005.parse(data)
    assert (code.join_eui.hex, code.dev_eui.hex, code.vendor_id, code.model_id, code.owner_token) == \
        (join, dev, vendor, model, owner)
    assert code.text() == (canonical or data)


def test_lorawan_stack_extensions_vector_keeps_owner_token_and_serial():
    # their "Extensions" case; flasher writes no checksum or proprietary part, so those two are read and dropped
    code = TR005.parse("LW:D0:42FFFFFFFFFFFFFF:4242FFFFFFFFFFFF:42FFFF42:CCHECKSUM:O0102:SSERIAL:PPROPRIETARY")
    assert (code.owner_token, code.serial) == ("0102", "SERIAL")
    assert code.text() == "LW:D0:42FFFFFFFFFFFFFF:4242FFFFFFFFFFFF:42FFFF42:O0102:SSERIAL"


def test_lorawan_stack_encode_vector():
    # their "Encode/Simple" device: JoinEUI 70B3D57ED0000000, DevEUI 0102030405060708, claim code ABCD, no ids
    code = TR005(EUI64.parse("70B3D57ED0000000"), EUI64.parse("0102030405060708"), owner_token="ABCD")
    assert code.text() == "LW:D0:70B3D57ED0000000:0102030405060708:00000000:OABCD"


@pytest.mark.parametrize("data", INVALID)
def test_lorawan_stack_invalid_vectors_are_refused(data):
    with pytest.raises(InputError):
        TR005.parse(data)


def test_hex_is_upper_case_and_extensions_cannot_break_the_format():
    code = TR005(EUI64.parse("2c:f7:f1:20:24:90:01:38"), EUI64.parse("70b3d57ed003f06a"), 0x2886, 0x800C,
                 serial="a1b2")
    assert code.text() == "LW:D0:2CF7F12024900138:70B3D57ED003F06A:2886800C:Sa1b2"
    for bad in ("a:b", "has space", "tab\t", "é"):
        with pytest.raises(InputError):
            TR005(code.join_eui, code.dev_eui, serial=bad)
    with pytest.raises(InputError):
        parse_id16("12345", "vendor id")
    assert parse_id16("0x2886", "vendor id") == 0x2886


@given(st.binary(min_size=8, max_size=8), st.binary(min_size=8, max_size=8), st.integers(0, 0xFFFF),
       st.integers(0, 0xFFFF), st.from_regex(r"[0-9A-Z]{0,32}", fullmatch=True))
def test_what_flasher_writes_reads_back_the_same(join, dev, vendor, model, serial):
    code = TR005(EUI64(join), EUI64(dev), vendor, model, serial=serial)
    assert TR005.parse(code.text()) == code
