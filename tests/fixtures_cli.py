"""Running the CLI in process, the way a test wants it: exit code, stdout, stderr."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture
def cli(capsys):
    """Run ``flasher ARGS`` through :func:`flasher.cli.main`: (exit code, stdout, stderr).

    main() configures the root logger for the command; it is put back afterwards so
    one test's -v does not leak into the next.
    """
    from flasher.cli import main

    root = logging.getLogger()

    def run(*args):
        handlers, level = root.handlers[:], root.level
        try:
            with pytest.raises(SystemExit) as e:
                main([str(a) for a in args])
        finally:
            root.handlers[:], root.level = handlers, level
        out, err = capsys.readouterr()
        return e.value.code, out, err

    return run
