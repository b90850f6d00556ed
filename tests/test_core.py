import pytest

from flasher.errors import InputError, SecretError
from flasher.eui import EUI64
from flasher.identity import RegistrationIdPolicy, validate_registration_id
from flasher.keys import decode_symmetric_key, derive_device_key

GOLDEN_GROUP_KEY = "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw=="


def test_golden_vector():
    key = decode_symmetric_key(GOLDEN_GROUP_KEY)
    assert derive_device_key(key, "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6") == "Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc="


@pytest.mark.parametrize("text", ["2CF7F12024900138", "2c:f7:f1:20:24:90:01:38", "2C-F7-F1-20-24-90-01-38",
                                  "2C F7 F1 20 24 90 01 38", "0x2CF7F12024900138"])
def test_eui_spellings(text):
    eui = EUI64.parse(text)
    assert eui.hex == "2CF7F12024900138"
    assert eui.colon == "2C:F7:F1:20:24:90:01:38"
    assert eui.c_array(lsb_first=True) == "{ 0x38, 0x01, 0x90, 0x24, 0x20, 0xF1, 0xF7, 0x2C }"


@pytest.mark.parametrize("text,why", [("2CF7F1202490013", "16 hex digits"), ("2CF7F12024900G38", "not hexadecimal"),
                                      ("2C:F7-F1:20:24:90:01:38", "mixed separators"), ("", "not hexadecimal")])
def test_eui_rejects(text, why):
    with pytest.raises(InputError, match=why) as e:
        EUI64.parse(text)
    assert repr(text) in str(e.value)


def test_policy_default_is_lower_hex():
    assert RegistrationIdPolicy().resolve("2C:F7:F1:20:24:90:01:38") == ("2cf7f12024900138", EUI64.parse("2CF7F12024900138"))
    assert RegistrationIdPolicy("lora-{deveui}").for_eui(EUI64.parse("2CF7F12024900138")) == "lora-2cf7f12024900138"
    with pytest.raises(InputError):
        RegistrationIdPolicy("{DEVEUI}")


@pytest.mark.parametrize("rid", ["UPPER", "ends.", "sp ace", "x" * 129, ""])
def test_registration_id_rules(rid):
    with pytest.raises(InputError):
        validate_registration_id(rid)


@pytest.mark.parametrize("key,why", [("not base64!", "base64"), ("AAAA", "decodes to 3 bytes"), ("", "empty")])
def test_symmetric_key_rejects_without_echoing(key, why):
    with pytest.raises(SecretError, match=why) as e:
        decode_symmetric_key(key)
    assert not key or key not in str(e.value)
