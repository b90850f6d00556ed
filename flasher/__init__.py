"""flasher: provision Seeeduino LoRaWAN boards for Azure IoT (DPS group enrollment, symmetric keys)."""

__version__ = "0.1.0"
