"""C literals: exact output for known cases, and a decoder-based round trip for any text.

The decoder below is written from the C standard's escape rules (not from c_string);
tests/test_compile.py checks the same property with a real compiler.
"""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flasher.cliteral import c_bytes, c_comment, c_identifier, c_string
from flasher.errors import InputError
from flasher.eui import EUI64

_SIMPLE = {"n": 10, "r": 13, "t": 9, "\\": 92, '"': 34, "'": 39, "?": 63, "a": 7, "b": 8, "f": 12, "v": 11}


def decode_c_string(lit: str) -> bytes:
    """Decode one C string literal into its bytes, refusing anything a C compiler would read differently."""
    assert lit[0] == '"' and lit[-1] == '"' and len(lit) >= 2
    body, out, i = lit[1:-1], bytearray(), 0
    assert "??" not in body, "a trigraph could form"
    while i < len(body):
        c = body[i]
        assert c not in '"\n\r' and 0x20 <= ord(c) < 0x7F, f"raw {c!r} in a literal"
        if c != "\\":
            out.append(ord(c))
            i += 1
            continue
        nxt = body[i + 1]
        if nxt in _SIMPLE:
            out.append(_SIMPLE[nxt])
            i += 2
        elif nxt in "01234567":
            m = re.match(r"[0-7]{1,3}", body[i + 1:])
            out.append(int(m.group(), 8))
            i += 1 + len(m.group())
        elif nxt == "x":
            m = re.match(r"[0-9A-Fa-f]+", body[i + 2:])  # \x takes every hex digit that follows
            out.append(int(m.group(), 16))
            i += 2 + len(m.group())
        else:
            raise AssertionError(f"unknown escape \\{nxt}")
    return bytes(out)


@pytest.mark.parametrize("value,literal", [
    ("2CF7F12024900138", '"2CF7F12024900138"'),
    ('say "hi"', r'"say \"hi\""'),
    ("C:\\path", r'"C:\\path"'),
    ("a\nb\rc\td", r'"a\nb\rc\td"'),
    ("\x04" + "1F", r'"\0041F"'),          # a hex escape \x4 would have swallowed 1F
    ("\x1b[0m", r'"\033[0m"'),
    ("é", r'"\303\251"'),                   # UTF-8 bytes, octal
    ("??=", r'"?\?="'),                     # no trigraph
    ("???/", r'"?\?\?/"'),
    ("", '""'),
])
def test_c_string_exact(value, literal):
    assert c_string(value) == literal
    assert decode_c_string(literal) == value.encode("utf-8")


def test_c_string_takes_an_eui():
    assert c_string(EUI64.parse("2c:f7:f1:20:24:90:01:38")) == '"2CF7F12024900138"'


@pytest.mark.parametrize("value,why", [("a\x00b", "NUL"), ("\ud800", "surrogate"), (b"bytes", "expected text"),
                                       (None, "expected text")])
def test_c_string_refuses_naming_the_field(value, why):
    with pytest.raises(InputError, match=why) as e:
        c_string(value, "--set WIFI_PSK")
    assert str(e.value).startswith("--set WIFI_PSK:")
    if isinstance(value, str):
        assert value not in str(e.value)  # the value may be a secret: never echoed


@settings(max_examples=500)
@given(st.text(st.characters(codec="utf-8", exclude_characters="\x00")))
def test_c_string_round_trip_any_text(text):
    lit = c_string(text)
    assert decode_c_string(lit) == text.encode("utf-8")
    assert lit.isascii() and "\n" not in lit


@pytest.mark.parametrize("name", ["WIFI_SSID", "x", "_lower", "Name2", "A" * 63])
def test_identifier_ok(name):
    assert c_identifier(name) == name


@pytest.mark.parametrize("name,why", [
    ("2X", "not a C identifier"), ("A-B", "not a C identifier"), ("", "not a C identifier"), ("A B", "not a C identifier"),
    ("A" * 64, "longer than 63"), ("int", "keyword"), ("class", "keyword"), ("__X", "reserved for the compiler"),
    ("_Upper", "reserved for the compiler"), ("FLASHER_CONFIG_H", "prefix is reserved"), ("flasher_dev_eui", "prefix"),
    ("APPKEY", "already used"), ("EU868", "already used"), ("os_getDevEui", "already used"),
])
def test_identifier_refused(name, why):
    with pytest.raises(InputError, match=why) as e:
        c_identifier(name, "--set name")
    assert str(e.value).startswith("--set name")


def test_c_bytes_orders():
    eui = EUI64.parse("2CF7F12024900138")
    assert c_bytes(eui) == "{ 0x2C, 0xF7, 0xF1, 0x20, 0x24, 0x90, 0x01, 0x38 }"
    assert c_bytes(eui, lsb_first=True) == "{ 0x38, 0x01, 0x90, 0x24, 0x20, 0xF1, 0xF7, 0x2C }"
    assert c_bytes(bytes([1, 0xAB])) == "{ 0x01, 0xAB }"
    assert c_bytes(bytes([1, 0xAB]), lsb_first=True) == "{ 0xAB, 0x01 }"
    with pytest.raises(InputError):
        c_bytes("0102")


@pytest.mark.parametrize("text", ["x */ y", "a\nb", "/* nested", "caf\u00e9", "??/"])
def test_comment_refuses_breakouts(text):
    with pytest.raises(InputError):
        c_comment(text)
    assert c_comment("flasher 0.1.0") == "flasher 0.1.0"
