/*
 * lmic_otaa: the smallest OTAA sketch for MCCI arduino-lmic that takes its identity from a header flasher
 * renders with --template lmic. Not shipped: the real-target tests build it to prove that header compiles
 * and links against the real LMIC (its os_get* callbacks, C linkage, byte orders) for the SAMD21.
 * The pin map is an RFM95 wiring example; the Seeeduino LoRaWAN itself has an RHF76, not a bare radio.
 */
#include <lmic.h>
#include <hal/hal.h>

#include "config.h"

const lmic_pinmap lmic_pins = {
    .nss = 10,
    .rxtx = LMIC_UNUSED_PIN,
    .rst = 9,
    .dio = {2, 6, 7},
};

static osjob_t sendjob;

static void send(osjob_t *j) {
  static uint8_t payload[] = "flasher";
  (void)j;
  if (!(LMIC.opmode & OP_TXRXPEND)) LMIC_setTxData2(1, payload, sizeof payload - 1, 0);
}

void onEvent(ev_t ev) {
  if (ev == EV_JOINED) SerialUSB.println("joined");
}

void setup() {
  SerialUSB.begin(115200);
  os_init();
  LMIC_reset();
  send(&sendjob);
}

void loop() {
  os_runloop_once();
}
