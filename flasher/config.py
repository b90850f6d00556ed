"""``flasher.toml``: the defaults a bench keeps between runs.

Options on the command line override it. Secrets are only referenced here — the
name of an environment variable or the path of a file — so the file can be shared
or committed; an inline secret is refused rather than silently used.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from flasher.errors import InputError

DEFAULT_NAME = "flasher.toml"

# key -> expected type
KNOWN = {
    "id_scope": str,
    "dps_host": str,
    "ca_cert": str,
    "template": str,
    "band": str,
    "join_eui": str,
    "app_key": str,               # policy: random | derived | given
    "app_key_file": str,
    "app_key_master_env": str,
    "app_key_master_file": str,
    "group_key_env": str,
    "group_key_file": str,
    "secondary_key_env": str,
    "secondary_key_file": str,
    "out_dir": str,
    "ledger": str,
    "registration_id_format": str,
    "timeout": (int, float),
    "concurrency": int,
    "fqbn": str,
    "sketch": str,
    "arduino_cli": str,
    "test_message": str,
}
# Keys someone might use to paste a secret in; each gets told where the secret belongs.
INLINE_SECRETS = {
    "group_key": "group_key_env or group_key_file",
    "group_primary_key": "group_key_env or group_key_file",
    "primary_key": "group_key_env or group_key_file",
    "secondary_key": "secondary_key_env or secondary_key_file",
    "app_key_master": "app_key_master_env or app_key_master_file",
    "master_secret": "app_key_master_env or app_key_master_file",
    "device_key": "an environment variable or a key file",
}
APP_KEY_POLICIES = ("random", "derived", "given")


@dataclass(frozen=True)
class Config:
    path: str | None = None
    id_scope: str | None = None
    dps_host: str | None = None
    ca_cert: str | None = None
    template: str | None = None
    band: str | None = None
    join_eui: str | None = None
    app_key: str | None = None
    app_key_file: str | None = None
    app_key_master_env: str | None = None
    app_key_master_file: str | None = None
    group_key_env: str | None = None
    group_key_file: str | None = None
    secondary_key_env: str | None = None
    secondary_key_file: str | None = None
    out_dir: str | None = None
    ledger: str | None = None
    registration_id_format: str | None = None
    timeout: float | None = None
    concurrency: int | None = None
    fqbn: str | None = None
    sketch: str | None = None
    arduino_cli: str | None = None
    test_message: str | None = None

    def get(self, key: str, override=None, default=None):
        """The command-line value if given, else the file's, else the default."""
        if override is not None:
            return override
        value = getattr(self, key)
        return default if value is None else value


def load_config(path: str | os.PathLike | None = None, *, cwd: str | os.PathLike | None = None) -> Config:
    """Read ``path`` (must exist), or ``flasher.toml`` in ``cwd`` if there is one."""
    if path is None:
        candidate = Path(cwd or os.getcwd()) / DEFAULT_NAME
        if not candidate.is_file():
            return Config()
        path = candidate
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
    values: dict = {}
    for key, value in data.items():
        if key in INLINE_SECRETS:
            raise InputError(f"config {name!r}: {key!r} holds a secret inline; "
                             f"reference it instead with {INLINE_SECRETS[key]}")
        if key not in KNOWN:
            raise InputError(f"config {name!r}: unknown key {key!r}")
        if not isinstance(value, KNOWN[key]) or isinstance(value, bool):
            raise InputError(f"config {name!r}: {key!r} has the wrong type ({type(value).__name__})")
        values[key] = value
    if values.get("app_key") not in (None, *APP_KEY_POLICIES):
        raise InputError(f"config {name!r}: 'app_key' must be one of {', '.join(APP_KEY_POLICIES)} "
                         f"(an AppKey itself belongs in app_key_file)")
    base = p.resolve().parent
    for key in ("ca_cert", "app_key_file", "app_key_master_file", "group_key_file", "secondary_key_file",
                "out_dir", "ledger", "sketch"):
        if key in values and not os.path.isabs(values[key]):
            values[key] = str(base / values[key])  # paths are relative to the file, not the shell
    known = {f.name for f in fields(Config)}
    return Config(path=name, **{k: v for k, v in values.items() if k in known})
