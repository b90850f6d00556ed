"""Property tests: every spelling of an EUI-64 parses back to the same eight bytes."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flasher.errors import InputError
from flasher.eui import EUI64
from flasher.identity import RegistrationIdPolicy

euis = st.binary(min_size=8, max_size=8).map(EUI64)


def _mixed_case(text: str, flips: list[bool]) -> str:
    return "".join(c.upper() if f else c.lower() for c, f in zip(text, (flips + [False] * len(text))[:len(text)], strict=True))


@given(euis, st.sampled_from([":", "-", " "]), st.lists(st.booleans(), max_size=23))
def test_every_format_round_trips(eui, sep, flips):
    assert EUI64.parse(eui.hex) == eui
    assert EUI64.parse(eui.lower) == eui
    assert EUI64.parse(eui.colon) == eui
    assert EUI64.parse(str(eui)) == eui
    assert EUI64.parse("0x" + eui.lower) == eui
    assert EUI64.parse(f"  {eui.hex}\n") == eui
    spaced = sep.join(eui.colon.split(":"))
    assert EUI64.parse(_mixed_case(spaced, flips)) == eui


@given(euis)
def test_formats_agree(eui):
    assert eui.hex == eui.value.hex().upper() and len(eui.hex) == 16
    assert eui.lower == eui.hex.lower()
    assert eui.colon.replace(":", "") == eui.hex
    msb = [int(b, 16) for b in eui.c_array().strip("{} ").split(", ")]
    lsb = [int(b, 16) for b in eui.c_array(lsb_first=True).strip("{} ").split(", ")]
    assert bytes(msb) == eui.value and bytes(lsb) == eui.value[::-1]


@given(euis, st.sampled_from(["{deveui}", "lora-{deveui}", "site.a:{deveui}-x"]))
def test_registration_id_from_any_spelling(eui, fmt):
    policy = RegistrationIdPolicy(fmt)
    want = fmt.format(deveui=eui.lower)
    assert policy.for_eui(eui) == want
    for spelling in (eui.hex, eui.lower, eui.colon, "0x" + eui.hex):
        assert policy.resolve(spelling)[0] == want


@given(st.text("0123456789abcdefABCDEF", max_size=40).filter(lambda s: len(s) != 16))
def test_wrong_length_is_refused(text):
    with pytest.raises(InputError, match="EUI"):
        EUI64.parse(text)


@given(euis, st.integers(0, 15), st.sampled_from("gGzZ!#_"))
def test_one_bad_character_is_refused(eui, pos, bad):
    text = eui.hex[:pos] + bad + eui.hex[pos + 1:]
    with pytest.raises(InputError, match="not hexadecimal"):
        EUI64.parse(text)


@given(st.binary().filter(lambda b: len(b) != 8))
def test_value_type_needs_eight_bytes(raw):
    with pytest.raises(InputError):
        EUI64(raw)
