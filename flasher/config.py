"""``flasher.toml``: the defaults a bench keeps between runs.

This module only reads the file; what each key means, its type and its place in
the precedence order are declared in :mod:`flasher.settings`. Secrets are only
referenced here (the name of an environment variable or the path of a file), so
the file can be shared or committed; an inline secret is refused, not used.
"""

from __future__ import annotations

import os
from typing import Any

from flasher.errors import InputError

DEFAULT_NAME = "flasher.toml"

# Keys someone might use to paste a secret in; each gets told where the secret belongs.
INLINE_SECRETS = {
    "group_key": "group_key_env or group_key_file",
    "group_primary_key": "group_key_env or group_key_file",
    "primary_key": "group_key_env or group_key_file",
    "secondary_key": "secondary_key_env or secondary_key_file",
    "app_key_master": "app_key_master_env or app_key_master_file",
    "master_secret": "app_key_master_env or app_key_master_file",
    "device_key": "device_key_env or device_key_file",
    "tts_api_key": "tts_api_key_env or tts_api_key_file",
    "api_key": "tts_api_key_env or tts_api_key_file",
}


def load_file(path: str | os.PathLike | None = None, *,
              cwd: str | os.PathLike | None = None) -> tuple[dict[str, Any], str | None]:
    """``(values, path)`` from ``path`` (must exist), or from ``flasher.toml`` in ``cwd`` if there is one.

    Every key must be declared in :mod:`flasher.settings`; relative paths are made
    relative to the file, not to the shell's directory.
    """
    from flasher.settings import Setting, toml_keys

    if path is None:
        candidate = os.path.join(cwd or os.getcwd(), DEFAULT_NAME)
        if not os.path.isfile(candidate):
            return {}, None
        path = candidate
    import tomllib  # only once there is a file to read: most commands have none
    from pathlib import Path

    p = Path(path)
    name = str(p)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise InputError(f"config {name!r}: no such file") from None
    except OSError as exc:
        raise InputError(f"config {name!r}: cannot read ({exc.strerror or exc})") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"config {name!r}: not valid TOML ({exc})") from None
    data = data.get("flasher", data) if isinstance(data.get("flasher"), dict) else data
    known = toml_keys()
    base = p.resolve().parent
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in INLINE_SECRETS:
            raise InputError(f"config {name!r}: {key!r} holds a secret inline; "
                             f"reference it instead with {INLINE_SECRETS[key]}")
        declared = known.get(key)
        if declared is None:
            raise InputError(f"config {name!r}: unknown key {key!r}")
        expected = declared.toml_type if isinstance(declared, Setting) else str
        switch = expected is bool
        if not isinstance(value, expected) or (isinstance(value, bool) and not switch):
            raise InputError(f"config {name!r}: {key!r} has the wrong type ({type(value).__name__})")
        relative = isinstance(value, str) and (declared.is_path(value) if isinstance(declared, Setting)
                                               else key.endswith("_file"))
        if relative and isinstance(value, str) and not os.path.isabs(value):
            value = str(base / value)
        values[key] = value
    if "proxy" in values:
        from flasher.proxy import has_password

        if has_password(values["proxy"]):  # never echo it
            raise InputError(f"config {name!r}: 'proxy' holds a password inline; keep only the user name in the URL "
                             f"and reference the password with proxy_password_env or proxy_password_file")
    if "app_key" in values:
        from flasher.keys import AppKeySource

        if values["app_key"] not in set(AppKeySource):  # never echo it: it may be a pasted key
            raise InputError(f"config {name!r}: 'app_key' must be one of {', '.join(AppKeySource)} "
                             f"(an AppKey itself belongs in app_key_file)")
    return values, name
