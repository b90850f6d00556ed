"""The error funnel's vocabulary.

Library code raises these instead of exiting; ``cli.main`` turns them into one
line on stderr and an exit code. Anything else escaping is a bug and keeps its
traceback.
"""

EXIT_FAILURE = 1
EXIT_USAGE = 2


class FlasherError(Exception):
    """A failure the user can act on: the message is the whole story."""

    exit_code = EXIT_FAILURE


class InputError(FlasherError, ValueError):
    """Bad input from the user (an EUI, a key, a file, an option): exit 2."""

    exit_code = EXIT_USAGE


class SecretError(InputError):
    """A secret was missing or malformed. The message never contains it."""
