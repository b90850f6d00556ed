"""Fixtures for the local The Things Stack emulator (see flasher.sim.tts).

``make_tts(**kwargs)`` starts an emulator on a free loopback port with its own CA and
stops it (server, connections, request threads) at teardown, whatever happened.
``tts_target(emu, key, **kwargs)`` points the adapter at it.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest

from flasher.dps import load_ca_cert
from flasher.eui import EUI64
from flasher.secrets import Secret
from flasher.tts import EndDevice, TtsTarget

APP = "fleet"
OTHER_APP = "elsewhere"
JOIN_EUI = EUI64.parse("70B3D57ED003F06A")


def tts_target(emu, key: str, app: str = APP, **kwargs) -> TtsTarget:
    kwargs.setdefault("timeout", 15.0)
    return TtsTarget.single(app, emu.url, Secret(key, "test API key"), ca_cert=load_ca_cert(emu.ca_cert_path),
                            **kwargs)


def end_device(deveui: str, app: str = APP, key: bytes | None = None, **kwargs) -> EndDevice:
    eui = EUI64.parse(deveui)
    app_key = key if key is not None else bytes.fromhex(deveui * 2)[::-1]
    return EndDevice(app, f"eui-{eui.lower}", eui, kwargs.pop("join_eui", JOIN_EUI), Secret(app_key, "test AppKey"),
                     **kwargs)


@pytest.fixture
def make_tts(tmp_path):
    from flasher.sim.tts import TtsEmulator

    with contextlib.ExitStack() as stack:
        n = itertools.count()

        def make(**kwargs):
            kwargs.setdefault("applications", [APP, OTHER_APP])
            kwargs.setdefault("cert_dir", tmp_path / f"tts-certs{next(n)}")
            return stack.enter_context(TtsEmulator(**kwargs))

        yield make
