/*
 * at_passthrough: what a Seeeduino LoRaWAN runs while flasher talks to its
 * RHF76-052 LoRaWAN module. Bytes from the host (native USB, SerialUSB) go to
 * the module (Serial1, 9600 8N1) unchanged, and the module's answers come back.
 *
 * No echo, no line editing, no buffering beyond the cores' own: the host sends
 * `AT+...\r\n` and reads `+...` lines exactly as the module writes them. The
 * USB side ignores the baud rate the host asks for.
 */

static const unsigned long MODULE_BAUD = 9600UL;

void setup(void) {
  SerialUSB.begin(115200);
  Serial1.begin(MODULE_BAUD);
}

void loop(void) {
  while (SerialUSB.available() > 0) {
    Serial1.write((uint8_t)SerialUSB.read());
  }
  while (Serial1.available() > 0) {
    SerialUSB.write((uint8_t)Serial1.read());
  }
}
