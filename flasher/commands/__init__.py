"""One module per command (or command group). Each parses options, calls the library, prints.

They are imported only when their command runs (:class:`flasher.cli.LazyGroup`), so
``flasher keys`` never pays for the Azure SDK, Jinja2 or the simulators.
"""
