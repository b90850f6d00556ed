"""Simulators that stand in for the outside world: Seeeduino boards on pseudo-terminals,
and a local DPS + IoT Hub emulator. They are shipped so users can try flasher without
hardware or Azure; product code never imports them."""
