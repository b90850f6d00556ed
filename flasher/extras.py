"""Optional dependencies, installed as extras (``pip install 'flasher[labels]'``) and imported only when used.

A missing one is a one-line :class:`MissingExtra` naming the extra that brings it, raised before any board is
touched, never an ``ImportError`` traceback from deep inside a step.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from flasher.errors import InputError


class MissingExtra(InputError):
    """An optional dependency is not installed (exit 2: nothing was done)."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` for ``what``, or say which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise MissingExtra(f"{what} needs {top}: pip install 'flasher[{extra}]'") from None
