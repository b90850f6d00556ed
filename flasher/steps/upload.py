"""upload: build the sketch with the board's header (arduino-cli or arduino-builder) and flash it (``--upload``)."""

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
        """The tty may change name: the board is followed into its bootloader by its USB location (the
        bootloader reports no serial number) and found again running the sketch by its serial number."""
        from flasher.arduino import make_builder, wait_for_serial_number
        from flasher.ports import find_boards

        up = board.settings.upload
        here = next((b for b in find_boards() if b.device == board.port), None)
        serial_number, location = (here.serial_number, here.location) if here else (None, None)
        tool = make_builder(up.builder, fqbn=up.fqbn, arduino_cli=up.arduino_cli, samd_core=up.samd_core,
                            bossac=up.bossac)
        # builds in a private folder under out_dir; board.stop (Ctrl-C, SIGTERM) cancels the builder at once
        tool.build_and_upload(up.sketch, board.header_path, board.port, build_parent=board.settings.out_dir,
                              cancel=board.stop, location=location)
        fields = {}
        if serial_number or location:
            board.port = wait_for_serial_number(serial_number, location=location)
            fields = {"port": board.port, **({"serial_number": serial_number} if serial_number else {})}
        return Done(f"{up.fqbn} on {board.port} ({tool.name})", fields)
