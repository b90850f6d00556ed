"""register: the identity in Azure DPS, through the azure-iot-device SDK; DPS assigns a hub."""

from __future__ import annotations

from flasher.steps import Done, Step


class Register(Step):
    name = "register"

    def resume(self, board) -> None:
        board.assigned_hub, board.device_id = board.record.assigned_hub, board.record.device_id

    def run(self, board) -> Done:
        from flasher import dps

        s = board.settings
        reg = dps.register_device(board.registration_id, board.device_key.reveal(), id_scope=s.id_scope,
                                  dps_host=s.dps_host, ca_cert=s.ca_cert, timeout=s.timeout, test_message=None,
                                  on_phase=board.phase)
        board.assigned_hub, board.device_id = reg.assigned_hub, reg.device_id
        return Done(f"{reg.device_id}@{reg.assigned_hub}", {"assigned_hub": reg.assigned_hub, "device_id": reg.device_id})
