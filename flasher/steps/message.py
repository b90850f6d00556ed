"""message: connect to the assigned hub as the device and send the proof message ("TestMessage")."""

from __future__ import annotations

from flasher.steps import Done, Step


class Message(Step):
    name = "message"

    def skip_reason(self, board) -> str | None:
        return None if board.settings.test_message is not None else "--no-test-message"

    def done(self, board) -> bool:
        return board.record.steps.get(self.name) == "ok"

    def run(self, board) -> Done:
        from flasher import dps

        s = board.settings
        dps.send_test_message(board.device_id, board.assigned_hub, board.device_key.reveal(), ca_cert=s.ca_cert,
                              timeout=s.timeout, message=s.test_message, on_phase=board.phase, transport=s.transport,
                              model_id=s.model_id, governor=s.hub_governor)
        return Done()
