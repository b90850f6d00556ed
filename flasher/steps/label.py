"""label: the board's TR005 QR label (PNG and SVG) in the ``--labels`` folder, for the operator to print and stick on.

Last in the pipeline, so only a board that is registered and proven gets one. The label carries the DevEUI, the
JoinEUI and the USB serial number, which it also records in the ledger so ``flasher labels`` can print the same label
again later; never a key.
"""

from __future__ import annotations

from flasher.steps import Done, Step


class Label(Step):
    name = "label"

    def skip_reason(self, board) -> str | None:
        return None if board.settings.labels is not None else "--labels not given"

    def done(self, board) -> bool:
        return board.record.steps.get(self.name) == "ok"   # skipped earlier (no --labels then) is not labelled now

    def preflight(self, settings) -> None:
        """The extra is installed and the folder can be made: both fail here, once, not on every board."""
        plan = settings.labels
        if plan is None:
            return
        from flasher.errors import InputError
        from flasher.extras import require
        from flasher.files import make_private_dirs

        require("segno", "labels", "--labels")
        require("PIL.Image", "labels", "--labels")
        try:
            make_private_dirs(plan.out_dir)
        except OSError as exc:
            raise InputError(f"--labels {str(plan.out_dir)!r}: cannot make the folder "
                             f"({exc.strerror or exc.__class__.__name__})") from None

    def run(self, board) -> Done:
        from flasher.labels import label_for, write_label_files
        from flasher.ports import find_boards

        s, plan = board.settings, board.settings.labels
        serial = board.serial_number or next((p.serial_number for p in find_boards() if p.device == board.port), None)
        label = label_for(board.dev_eui, s.join_eui, vendor_id=plan.vendor_id, model_id=plan.model_id, serial=serial)
        try:
            paths = write_label_files(label, plan.out_dir)
        except OSError as exc:
            from flasher.errors import FlasherError

            raise FlasherError(f"label {str(plan.out_dir)!r}: cannot write ({exc.strerror or exc})") from None
        return Done(str(paths[0]), {"serial_number": serial} if serial else {})
