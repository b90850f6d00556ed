"""register: the identity in Azure DPS, through the azure-iot-device SDK; DPS assigns a hub.

The registration payload (IoT Central's model id) goes with it, over the configured
transport (8883 or 443, maybe through a proxy); what DPS hands back in
``registrationState.payload`` is recorded.
"""

from __future__ import annotations

from flasher.steps import Done, Step


class Register(Step):
    name = "register"
    sdk_client = True

    def resume(self, board) -> None:
        board.assigned_hub, board.device_id = board.record.assigned_hub, board.record.device_id

    def run(self, board) -> Done:
        from flasher import dps
        from flasher.keys import derive_device_key
        from flasher.payload import canonical

        s = board.settings
        other = derive_device_key(s.other_group_key.reveal(), board.registration_id) if s.other_group_key else None
        paced = {"governor": s.governor} if s.governor is not None else {}  # the run's DPS pace, when it has one
        reg = dps.register_device(board.registration_id, board.device_key.reveal(), id_scope=s.id_scope,
                                  dps_host=s.dps_host, ca_cert=s.ca_cert, timeout=s.timeout, test_message=None,
                                  on_phase=board.phase, transport=s.transport, payload=s.dps_payload,
                                  model_id=s.model_id, other_key=other, key_names=s.key_names, **paced)
        board.assigned_hub, board.device_id = reg.assigned_hub, reg.device_id
        return Done(f"{reg.device_id}@{reg.assigned_hub}", {"assigned_hub": reg.assigned_hub, "device_id": reg.device_id,
                                                            "registration_payload": canonical(reg.payload)})
