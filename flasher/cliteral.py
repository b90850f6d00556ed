"""C literals that no input can break out of.

Everything the tool writes into a generated header passes through one of these
functions. They are pure and small enough to prove by compiling their output
(tests/test_compile.py does, with gcc, for arbitrary strings).

* :func:`c_string` - a complete ``"..."`` literal for any text without NUL.
  Printable ASCII stays readable; quotes and backslashes are escaped; ``\\n``,
  ``\\r`` and ``\\t`` get their short escapes; every other byte of the UTF-8
  encoding (control characters, DEL, non-ASCII) becomes a three-digit octal
  escape. Octal escapes stop after three digits, so unlike ``\\x4`` (which would
  swallow a following ``1`` or ``F``) they can be followed by anything. A
  ``?`` directly after a ``?`` is escaped so that no trigraph (``??/`` is a
  backslash in C89/C99!) can form.
* :func:`c_identifier` - a macro name the user chose with ``--set NAME=VALUE``.
* :func:`c_bytes` - an array initializer for bytes or an EUI-64.
* :func:`c_comment` - text for inside a ``/* ... */`` comment.
"""

from __future__ import annotations

import re

from flasher.errors import InputError
from flasher.eui import EUI64, c_byte_array

_SHORT = {ord("\\"): "\\\\", ord('"'): '\\"', ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_IDENTIFIER = 63  # C99 guarantees 63 significant characters in a macro name

# C (C11) and C++ keywords: the sketch is compiled as C++, a host test as C.
_C_KEYWORDS = frozenset("""
auto break case char const continue default do double else enum extern float for goto if inline int long
register restrict return short signed sizeof static struct switch typedef union unsigned void volatile while
_Alignas _Alignof _Atomic _Bool _Complex _Generic _Imaginary _Noreturn _Static_assert _Thread_local
alignas alignof and and_eq asm bitand bitor bool catch char16_t char32_t char8_t class compl concept consteval
constexpr constinit const_cast co_await co_return co_yield decltype delete dynamic_cast explicit export false
friend mutable namespace new noexcept not not_eq nullptr operator or or_eq private protected public
reinterpret_cast requires static_assert static_cast template this thread_local throw true try typeid typename
using virtual wchar_t xor xor_eq
defined NULL
""".split())

# Names the shipped templates and the firmware use themselves. FLASHER_* as a whole
# (include guard, every generated macro) is reserved by prefix.
RESERVED_PREFIX = "FLASHER_"
_RESERVED = frozenset("""
APPEUI DEVEUI APPKEY os_getArtEui os_getDevEui os_getDevKey u1_t PROGMEM memcpy_P memcpy
lora LoRaWan LWABP LWOTAA TEST JOIN FORCE CLASS_A CLASS_B CLASS_C
EU434 EU433 EU868 US915 US915HYBRID AU915 AU915OLD AS923 CN470 CN779 KR920 IN865
DR0 DR1 DR2 DR3 DR4 DR5 DR6 DR7 DR8 DR9 DR10 DR11 DR12 DR13 DR14 DR15
Serial SerialUSB Serial1 HIGH LOW INPUT OUTPUT setup loop main
""".split())


def c_string(value: str, what: str = "value") -> str:
    """Return a complete C string literal (with the quotes) whose bytes are ``value`` in UTF-8.

    Raises :class:`InputError` naming ``what`` (never quoting the value, which may be
    a secret) for NUL characters, unencodable text or a non-string.
    """
    if isinstance(value, EUI64):
        value = value.hex
    if not isinstance(value, str):
        raise InputError(f"{what}: expected text, got {type(value).__name__}")
    if "\x00" in value:
        raise InputError(f"{what}: contains a NUL character, which cannot be carried in a C string")
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{what}: not valid Unicode text (lone surrogate)") from None
    out = ['"']
    prev = 0
    for b in data:
        if b in _SHORT:
            out.append(_SHORT[b])
        elif b == 0x3F and prev == 0x3F:  # "??" would start a trigraph
            out.append("\\?")
        elif 0x20 <= b < 0x7F:
            out.append(chr(b))
        else:
            out.append(f"\\{b:03o}")
        prev = b
    out.append('"')
    return "".join(out)


def c_identifier(name: str, what: str = "macro name") -> str:
    """Check a user-chosen macro name: a plain C identifier that cannot clash with the header's own."""
    if not isinstance(name, str) or not _IDENT.fullmatch(name):
        raise InputError(f"{what} {name!r}: not a C identifier (letters, digits and _; not starting with a digit)")
    if len(name) > MAX_IDENTIFIER:
        raise InputError(f"{what} {name[:20]!r}...: longer than {MAX_IDENTIFIER} characters")
    if name in _C_KEYWORDS:
        raise InputError(f"{what} {name!r}: a C/C++ keyword")
    if name.startswith("__") or (name[0] == "_" and name[1:2].isupper()):
        raise InputError(f"{what} {name!r}: reserved for the compiler (leading __ or _ and a capital)")
    if name.upper().startswith(RESERVED_PREFIX):
        raise InputError(f"{what} {name!r}: the {RESERVED_PREFIX} prefix is reserved for the header's own macros")
    if name in _RESERVED:
        raise InputError(f"{what} {name!r}: already used by the generated header or the firmware")
    return name


def c_bytes(value: bytes | EUI64, lsb_first: bool = False) -> str:
    """``{ 0x2C, ... }`` for bytes or an EUI-64; ``lsb_first`` reverses the order (LMIC EUIs)."""
    if isinstance(value, EUI64):
        return value.c_array(lsb_first=lsb_first)
    if not isinstance(value, (bytes, bytearray)):
        raise InputError(f"byte array: expected bytes, got {type(value).__name__}")
    data = bytes(value)
    return c_byte_array(data[::-1] if lsb_first else data)


def c_comment(value: object, what: str = "comment text") -> str:
    """Text that is safe inside a ``/* ... */`` comment: one line of printable ASCII, no ``*/``."""
    text = str(value)
    if "*/" in text or "/*" in text or not all(0x20 <= ord(c) < 0x7F for c in text) or "??" in text:
        raise InputError(f"{what}: cannot go into a C comment (line breaks, non-ASCII, comment markers or ??)")
    return text
