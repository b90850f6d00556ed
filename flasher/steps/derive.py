"""derive: the DPS registration id and device key, base64(HMAC-SHA256(groupKey, registrationId))."""

from __future__ import annotations

from flasher.keys import derive_device_key
from flasher.secrets import Secret
from flasher.steps import Done, Step


class Derive(Step):
    name = "derive"
    before_claim = True

    def run(self, board) -> Done:
        s = board.settings
        board.registration_id = s.id_policy.for_eui(board.dev_eui)
        board.device_key = Secret(derive_device_key(s.group_key.reveal(), board.registration_id), "device key")
        return Done(board.registration_id)
