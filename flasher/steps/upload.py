"""upload: build the sketch with the board's header through arduino-cli and flash it (``--upload``)."""

from __future__ import annotations

from flasher.steps import Done, Step


class Upload(Step):
    name = "upload"
    needs_port = True

    def skip_reason(self, board) -> str | None:
        return None if board.settings.upload is not None else "--upload not given"

    def done(self, board) -> bool:
        return board.record.steps.get(self.name) == "ok"   # skipped earlier is not uploaded now

    def preflight(self, settings) -> None:
        from flasher.errors import InputError

        up = settings.upload
        if up is not None:
            from pathlib import Path

            sketch = Path(up.sketch)
            if not (sketch / f"{sketch.name}.ino").is_file():
                raise InputError(f"sketch {up.sketch!r}: no {sketch.name}.ino in it")

    def run(self, board) -> Done:
        """The tty may change name after the upload: follow the board by its USB serial number."""
        from flasher.arduino import ArduinoCli, wait_for_serial_number
        from flasher.ports import find_boards

        up = board.settings.upload
        serial_number = next((b.serial_number for b in find_boards() if b.device == board.port), None)
        # builds in a private folder under out_dir; board.stop (Ctrl-C, SIGTERM) cancels arduino-cli at once
        ArduinoCli(up.arduino_cli, up.fqbn).build_and_upload(up.sketch, board.header_path, board.port,
                                                             build_parent=board.settings.out_dir, cancel=board.stop)
        fields = {}
        if serial_number:
            board.port = wait_for_serial_number(serial_number)
            fields = {"port": board.port, "serial_number": serial_number}
        return Done(f"{up.fqbn} on {board.port}", fields)
