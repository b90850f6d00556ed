"""The environment flasher hands to the programs it starts (arduino-cli and whatever that runs).

flasher reads its secrets from ``FLASHER_*`` variables (group keys, the AppKey master
secret, an AppKey, a device key). A child has no use for any of them, and a build tool
that logs or crashes with its environment would spill them. :func:`child_env` is a copy
of the environment without them, for every subprocess flasher starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

#: FLASHER_* variables that carry no secret and may reach a child. Every other FLASHER_* is dropped.
ALLOWED_FLASHER_VARS = frozenset({"FLASHER_SIMULATED_PORTS", "FLASHER_ID_SCOPE", "FLASHER_DPS_HOST"})
#: Proxy variables: a child keeps one without credentials (arduino-cli may need the proxy too), never one with them.
PROXY_VARS = frozenset({"HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "MQTT_PROXY"})


def _loaded_secrets() -> list[str]:
    from flasher.secrets import Redactor

    return [s for s in Redactor.known() if s]


def child_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``base`` (default: ``os.environ``) fit for a child process.

    Dropped: every ``FLASHER_*`` variable not in :data:`ALLOWED_FLASHER_VARS` (so all
    ``*KEY*``, ``*MASTER*``, ``*SECRET*``, ``*PASSWORD*``, ``*TOKEN*`` ones and any added
    later), a proxy variable (``HTTPS_PROXY``...) whose URL carries a password, and any
    variable, whatever its name, whose value is or contains a secret this process has
    loaded (see :class:`flasher.secrets.Redactor`).
    """
    env = dict(os.environ if base is None else base)
    secrets = _loaded_secrets()
    for name in list(env):
        value = env[name]
        if name.upper().startswith("FLASHER_") and name.upper() not in ALLOWED_FLASHER_VARS:
            del env[name]
        elif name.upper() in PROXY_VARS and ":" in value.split("://", 1)[-1].rpartition("@")[0]:
            del env[name]  # user:password@ in a proxy URL
        elif any(s in value for s in secrets):
            del env[name]
    return env
