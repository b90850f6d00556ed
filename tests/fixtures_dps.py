"""Fixtures for the local DPS + IoT Hub emulator (see flasher.sim.dps)."""
