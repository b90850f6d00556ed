"""The ``flasher`` command group and its one error funnel.

Commands live one per module in :mod:`flasher.commands` (the simulators' in
:mod:`flasher.sim.cli`) and are imported only when they run. Data goes to stdout,
people-facing text to stderr. :func:`main` turns every :class:`FlasherError` and
usage error into one line and an exit code: 0 success, 1 failure, 2 bad usage or
input.
"""

from __future__ import annotations

import errno
import importlib
import importlib.machinery
import os
import sys

import click

from flasher import __version__
from flasher.errors import EXIT_FAILURE, EXIT_USAGE, FlasherError
from flasher.secrets import Redactor

# name -> "module:attribute"; the order is the order of `flasher --help`.
COMMANDS = {
    "provision": "flasher.commands.provision:provision",
    "station": "flasher.commands.station:station",
    "status": "flasher.commands.provision:status",
    "keys": "flasher.commands.keys:keys",
    "header": "flasher.commands.header:header",
    "build": "flasher.commands.build:build_cmd",
    "register": "flasher.commands.register:register",
    "tts": "flasher.commands.tts:tts",
    "ports": "flasher.commands.board:ports_cmd",
    "eui": "flasher.commands.board:eui",
    "verify": "flasher.commands.board:verify",
    "labels": "flasher.commands.labels:labels",
    "config": "flasher.commands.config:config_cmd",
    "ledger": "flasher.commands.ledger:ledger",
    "simulate": "flasher.sim.cli:simulate",
    "demo": "flasher.sim.cli:demo",
}


class LazyGroup(click.Group):
    """A group whose commands are imported when used, so start-up stays light."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


def _setup_logging(verbose: int) -> None:
    """Log to stderr through the Redactor: now if logging is loaded (or -v asks for it), else as it loads.

    Importing logging costs a fifth of a quick command's start-up (``flasher keys ID``), and
    nothing can log without importing it first, so a command that never logs need not pay for it.
    """
    if verbose or "logging" in sys.modules:
        _configure_logging(verbose)
    else:
        _ConfigureOnImport.install(verbose)


class _ConfigureOnImport:
    """A meta path finder that lets ``logging`` load as usual, then configures it before the importer gets it."""

    def __init__(self, verbose: int):
        self.verbose = verbose

    @classmethod
    def install(cls, verbose: int) -> None:
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, cls)]
        sys.meta_path.insert(0, cls(verbose))

    def find_spec(self, name, path=None, target=None):
        if name != "logging":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            _configure_logging(self.verbose)   # an unusual interpreter: load and configure it here and now
            return None
        spec.loader = _ThenConfigure(spec.loader, self.verbose)  # type: ignore[assignment]  # a loader by its methods
        return spec


class _ThenConfigure:
    """A module loader that runs the real one, then configures logging."""

    def __init__(self, loader, verbose: int):
        self._loader, self._verbose = loader, verbose

    def __getattr__(self, name):   # get_source, is_package, ...: the real loader's
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _configure_logging(self._verbose)


def _configure_logging(verbose: int) -> None:
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(Redactor())
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    # Third-party SDKs print their own tracebacks on disconnects: keep them quiet unless -vv.
    for noisy in ("azure", "paho", "urllib3", "asyncio", "psycopg"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose > 1 else logging.CRITICAL)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="flasher")
@click.option("-v", "--verbose", count=True, help="Log what happens (repeat for SDK internals). Secrets are masked.")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """Provision Seeeduino LoRaWAN boards for Azure IoT DPS.

    Group keys come from FLASHER_GROUP_PRIMARY_KEY / FLASHER_GROUP_SECONDARY_KEY,
    a key file, or a hidden prompt; they are never printed or stored. Settings come
    from options, then environment variables, then ./flasher.toml (see `flasher config`).
    """
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    _setup_logging(verbose)


def _err(msg: str) -> None:
    click.echo(msg, err=True)


def _quiet_stdout() -> None:
    """After a failed write to stdout, make the interpreter's final flush a no-op."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass  # no real stdout (captured by a test): nothing left to flush into a dead pipe


def main(argv: list[str] | None = None, prog_name: str = "flasher") -> None:
    """Run the CLI and exit with its code; known failures become one line on stderr."""
    try:
        rv = cli.main(args=argv, prog_name=prog_name, standalone_mode=False)
        sys.stdout.flush()  # a full disk or a closed pipe shows here, inside the funnel
    except (click.exceptions.Abort, KeyboardInterrupt):
        _err("error: interrupted")
        sys.exit(130)
    except click.UsageError as exc:
        where = f"{exc.ctx.command_path}: " if exc.ctx else ""
        _err(f"error: {where}{exc.format_message()}")
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        _err(f"error: {exc.format_message()}")
        sys.exit(exc.exit_code)
    except FlasherError as exc:
        _err(f"error: {exc}")
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        # `flasher keys ... | head`: the reader left; that is not our failure.
        _quiet_stdout()
        sys.exit(0)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EFBIG, errno.EROFS):
            raise
        # writing our output failed (`> /dev/full`): say so once, and keep the final flush quiet
        _quiet_stdout()
        _err(f"error: output: cannot write ({exc.strerror or exc})")
        sys.exit(EXIT_FAILURE)
    sys.exit(rv if isinstance(rv, int) else 0)
