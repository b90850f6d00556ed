"""What a device tells DPS about itself when it registers: the registration payload.

IoT Central assigns a device to its device template from the model id in the payload,
``{"modelId": "dtmi:com:example:Thermostat;1"}`` (the SDK's ``provisioning_payload``, sent
inside ``{"registrationId", "payload"}``; a ``modelId`` beside ``registrationId`` is refused
with 400012). A custom allocation policy may want any other JSON object. Both are checked
here, once, before any board is touched.

Sources: https://learn.microsoft.com/azure/iot-dps/how-to-send-additional-data,
https://learn.microsoft.com/azure/iot/concepts-developer-guide-device (model ID
announcement), and the DTMI syntax at
https://github.com/Azure/opendigitaltwins-dtdl/blob/master/DTMI/README.md.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flasher.errors import InputError

MAX_DTMI = 2048       # a user DTMI (the DTMI spec)
MAX_PAYLOAD = 64 * 1024  # far beyond what an allocation webhook wants; keeps a wrong file from going out
_SEGMENT = r"[A-Za-z](?:[A-Za-z0-9_]*[A-Za-z0-9])?"
_DTMI = re.compile(rf"dtmi:{_SEGMENT}(?::{_SEGMENT})*;[1-9][0-9]{{0,8}}(?:\.[1-9][0-9]{{0,5}})?")


def validate_model_id(text: Any, where: str = "--model-id") -> str:
    """A user DTMI with a version (``dtmi:com:example:Thermostat;1``); the error says which rule it breaks."""
    s = str(text).strip() if text is not None else ""
    shown = f"{where} {s[:80]!r}"
    if not s:
        raise InputError(f"{where}: empty (a model id looks like dtmi:com:example:Thermostat;1)")
    if len(s) > MAX_DTMI:
        raise InputError(f"{shown}: longer than {MAX_DTMI} characters")
    if _DTMI.fullmatch(s):
        return s
    if not s.startswith("dtmi:"):
        why = "must start with 'dtmi:' (lower case)"
    elif ";" not in s:
        why = "needs a version after ';' (e.g. ;1), as IoT Central and Plug and Play require"
    else:
        path, _, version = s[5:].rpartition(";")
        bad = next((seg for seg in path.split(":") if not re.fullmatch(_SEGMENT, seg)), None)
        if not path:
            why = "no path between 'dtmi:' and ';'"
        elif bad == "":
            why = "empty path segment ('::')"
        elif bad is not None:
            why = f"path segment {bad!r} must start with a letter, hold only letters, digits and '_', and not end with '_'"
        else:
            why = f"version {version!r} must be a whole number from 1 (no leading zero), optionally .minor"
    raise InputError(f"{shown}: not a valid DTMI: {why}")


@dataclass(frozen=True)
class PayloadFile:
    """``--payload-json``: the file (what `flasher config` shows) and the JSON object read from it, once."""

    path: str
    value: dict

    def __str__(self) -> str:
        return self.path


def read_payload_file(path: Any, where: str = "--payload-json") -> dict:
    """A JSON object from a file, for the DPS registration payload."""
    name = str(path)
    shown = f"{where} {name!r}"
    try:
        raw = Path(name).read_bytes()
    except FileNotFoundError:
        raise InputError(f"{shown}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{shown}: is a directory") from None
    except OSError as exc:
        raise InputError(f"{shown}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > MAX_PAYLOAD:
        raise InputError(f"{shown}: over {MAX_PAYLOAD // 1024} KiB")
    try:
        value = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise InputError(f"{shown}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{shown}: not JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(value, dict):
        raise InputError(f"{shown}: must hold a JSON object ({{...}}), not {_json_type(value)}")
    return value


def registration_payload(model_id: str | None, payload: dict | PayloadFile | None) -> dict | None:
    """What goes in the register request's ``payload``: the file's object, with ``modelId`` set from
    ``--model-id`` (which must agree with a ``modelId`` the file already has)."""
    if isinstance(payload, PayloadFile):
        payload = payload.value
    if model_id is None:
        return payload
    merged = dict(payload or {})
    if "modelId" in merged and merged["modelId"] != model_id:
        raise InputError(f"--model-id {model_id!r} and the payload file's modelId {merged['modelId']!r} differ")
    merged["modelId"] = model_id
    return merged


def canonical(payload: Any) -> str | None:
    """One spelling of a payload (sorted keys, no spaces), for the ledger and comparisons."""
    return None if payload is None else json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
