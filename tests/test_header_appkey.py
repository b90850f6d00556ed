"""Reading the AppKey back from a rendered header: the only copy of a random AppKey, which a resumed board needs."""

from __future__ import annotations

import pytest

from flasher.errors import InputError
from flasher.eui import EUI64
from flasher.header import build_header_data, read_app_key, render_header, shipped_templates

KEY = bytes.fromhex("2B7E151628AED2A6ABF7158809CF4F3C")


@pytest.mark.parametrize("template", shipped_templates())
def test_every_shipped_template_either_carries_the_key_readably_or_not_at_all(template):
    data = build_header_data(EUI64.parse("2CF7F12024900138"), app_key=KEY, app_key_source="random",
                             id_scope="0ne00000001", device_key="Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc=")
    got = read_app_key(render_header(data, template))
    assert got == (None if template == "azure-dps" else KEY)


def test_comments_and_spacing_do_not_fool_it():
    text = ('/* #define FLASHER_APP_KEY "00000000000000000000000000000000" */\n'
            '// APPKEY[16] = { 0x00, 0x00 };\n'
            '#  define   FLASHER_APP_KEY   "2b7e151628aed2a6abf7158809cf4f3c"\n'
            'static const char *s = "/* not a comment */";\n'
            'static const uint8_t APPKEY [ 16 ] = {0x2B,0x7E,0x15,0x16, 0x28,0xAE,0xD2,0xA6,\n'
            '  0xAB,0xF7,0x15,0x88,0x09,0xCF,0x4F,0x3C};\n')
    assert read_app_key(text) == KEY


def test_two_spellings_that_disagree_are_refused_not_guessed():
    text = ('#define FLASHER_APP_KEY "2B7E151628AED2A6ABF7158809CF4F3C"\n'
            'static const uint8_t APPKEY[16] = {' + ", ".join(["0x00"] * 16) + '};\n')
    with pytest.raises(InputError, match="disagree"):
        read_app_key(text)


def test_a_header_without_a_key_says_so():
    assert read_app_key('#define FLASHER_DEV_EUI "2CF7F12024900138"\n') is None
