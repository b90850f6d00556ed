"""Verify boards: does what a board reports match what we expect of it?

The comparison (:func:`compare`) is pure. Expectations come from three places:
an explicit set of DevEUIs (``--expect``/``--expect-file``), settings given on
the command line, and -- through the ``provisioned`` hook -- a mapping DevEUI ->
:class:`Expectation` that the provisioning ledger will supply: a board found in
it must also carry the JoinEUI, mode and band that were written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from flasher.at import ATError
from flasher.bands import parse_band
from flasher.errors import InputError
from flasher.eui import EUI64
from flasher.rhf76 import ModuleIds, ModuleSettings, open_module


@dataclass(frozen=True)
class Expectation:
    """What a provisioned board's module must hold. None means "not checked"."""

    join_eui: EUI64 | None = None
    mode: str | None = "LWOTAA"
    band: str | None = None

    @property
    def needs_settings(self) -> bool:
        return any(v is not None for v in (self.join_eui, self.mode, self.band))


@dataclass
class Verdict:
    port: str
    deveui: str | None
    ok: bool
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"port": self.port, "deveui": self.deveui, "ok": self.ok, "problems": list(self.problems)}

    def line(self) -> str:
        head = f"{'ok' if self.ok else 'FAIL'}\t{self.port}\t{self.deveui or '-'}"
        return head + (f"\t{'; '.join(self.problems)}" if self.problems else "")


def parse_expect_file(path: str | os.PathLike) -> set[EUI64]:
    """One EUI per line, any spelling :meth:`EUI64.parse` accepts; blank lines and ``#`` comments skipped."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # a BOM (Windows editors) is not part of the first EUI
            lines = f.readlines()
    except FileNotFoundError:
        raise InputError(f"expect file {str(path)!r}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"expect file {str(path)!r}: cannot read ({exc.__class__.__name__})") from None
    out = set()
    for n, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if text:
            try:
                out.add(EUI64.parse(text))
            except InputError as exc:
                raise InputError(f"expect file {str(path)!r} line {n}: {exc}") from None
    return out


def compare(port: str, ids: ModuleIds, settings: ModuleSettings | None = None, *,
            expected_deveuis: set[EUI64] | None = None,
            expectation: Expectation | None = None) -> Verdict:
    """Pure: a board's ids (and settings, when an expectation needs them) against expectations."""
    problems = []
    if expected_deveuis is not None and ids.dev_eui not in expected_deveuis:
        problems.append(f"DevEUI {ids.dev_eui.hex} not expected")
    if expectation is not None and expectation.needs_settings:
        if settings is None:
            problems.append("settings not read")
        else:
            if expectation.join_eui is not None and settings.join_eui != expectation.join_eui:
                problems.append(f"JoinEUI {settings.join_eui.hex}, expected {expectation.join_eui.hex}")
            if expectation.mode is not None and settings.mode.upper() != expectation.mode.upper():
                problems.append(f"mode {settings.mode}, expected {expectation.mode.upper()}")
            if expectation.band is not None and settings.band.upper() != expectation.band.upper():
                problems.append(f"band {settings.band}, expected {expectation.band.upper()}")
    return Verdict(port, ids.dev_eui.hex, not problems, problems)


def expectation_for(dev_eui: EUI64, *, settings: Expectation | None,
                    provisioned: Mapping[EUI64, Expectation] | None) -> Expectation | None:
    """The ledger's record for this board wins over command-line settings."""
    if provisioned is not None and dev_eui in provisioned:
        return provisioned[dev_eui]
    return settings


def verify_board(port: str, *, expected_deveuis: set[EUI64] | None = None, settings: Expectation | None = None,
                 provisioned: Mapping[EUI64, Expectation] | None = None,
                 timeout: float = 2.0, retries: int = 2) -> Verdict:
    """Read one board and judge it; an unreadable board is a failed verdict, not an exception.

    A ``port`` that is not a serial port at all (``/dev/null``) is the caller's mistake and
    raises :class:`~flasher.at.NotSerialPort` (an :class:`InputError`) instead.

    ``provisioned`` is the ledger hook: DevEUI -> what was written. When given and
    ``expected_deveuis`` is None, the ledger's keys are the expected DevEUIs.
    """
    if expected_deveuis is None and provisioned is not None:
        expected_deveuis = set(provisioned)
    if expected_deveuis is None and settings is None:
        raise InputError("nothing to verify against: give --expect, --expect-file or --join-eui/--band")
    try:
        with open_module(port, timeout=timeout, retries=retries) as module:
            ids = module.read_ids()
            exp = expectation_for(ids.dev_eui, settings=settings, provisioned=provisioned)
            current = module.read_settings() if exp is not None and exp.needs_settings else None
    except ATError as exc:
        return Verdict(port, None, False, [f"unreadable: {exc}"])
    return compare(port, ids, current, expected_deveuis=expected_deveuis, expectation=exp)


def settings_expectation(join_eui: str | None, band: str | None) -> Expectation | None:
    """From ``--join-eui``/``--band``: mode LWOTAA is implied by either."""
    if join_eui is None and band is None:
        return None
    return Expectation(join_eui=EUI64.parse(join_eui, "--join-eui") if join_eui else None,
                       band=parse_band(band) if band else None)


def ledger_expectations(records) -> dict[EUI64, Expectation]:
    """From the ledger: every board whose module was programmed, with what was written to it."""
    return {EUI64.parse(r.deveui): Expectation(join_eui=EUI64.parse(r.join_eui) if r.join_eui else None,
                                               band=r.band)
            for r in records if r.done("program")}
