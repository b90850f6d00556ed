/*
 * flasher_otaa: join a LoRaWAN network over OTAA from a Seeeduino LoRaWAN (SAMD21 + RisingHF RHF76-052 on
 * Serial1, Seeed's LoRaWan library's SerialLoRa), then send an uplink periodically.
 *
 * Every identity value comes from config.h, which `flasher header` generates for one board (template
 * seeed-lorawan). `flasher provision --upload` puts it beside this file in a private copy and builds; by hand:
 *
 *   flasher header 2CF7F12024900138 --app-key-file appkey.txt --band EU868 -o firmware/flasher_otaa/config.h
 *   arduino-cli compile --fqbn Seeeduino:samd:rolawan firmware/flasher_otaa
 *
 * config.h holds the board's AppKey: never commit it.
 *
 * What it does (otaa_node.h): reads the module's DevEUI first and refuses to write or join when config.h
 * was generated for another board; writes JoinEUI, AppKey, OTAA mode, band, DR0 and ADR, checking each
 * echo; joins only on the module's word (a DevAddr), retrying with a duty-cycle-respecting back-off; then
 * sends "flasher <n>" every FLASHER_UPLINK_INTERVAL_MS. A host line starting with "AT" on USB switches it
 * to a maintenance pass-through (USB <-> module) until the host is quiet for a minute, so `flasher eui`,
 * `flasher verify` and `flasher provision` keep working on a board running this sketch.
 */
#include <LoRaWan.h>

#include "config.h"

#ifndef FLASHER_LORA_BAND
#error "config.h was not generated with the seeed-lorawan template (FLASHER_LORA_BAND missing)"
#endif

#include "otaa_node.h"

// The header's band must be one of the library's enumerators: a wrong one fails the build here.
static const _physical_type_t LIBRARY_BAND = FLASHER_LORA_BAND;

static const unsigned long USB_WAIT_MS = 3000UL;  // let a serial monitor attach, but never hang without one

static const otaa::Config CONFIG = {FLASHER_DEV_EUI, FLASHER_APP_EUI, FLASHER_APP_KEY, FLASHER_BAND};
static otaa::Node node(SerialUSB, SerialLoRa, CONFIG);

void setup(void) {
  SerialUSB.begin(115200);
  for (unsigned long t0 = millis(); !SerialUSB && millis() - t0 < USB_WAIT_MS;) {
  }
  lora.init();  // SerialLoRa (Serial1) at the module's 9600 baud
  // Back-off jitter: boards that lost the network together must not retry together.
  unsigned long seed = micros();
  for (const char *p = FLASHER_DEV_EUI; *p; p++) seed = seed * 31UL + (unsigned char)*p;
  randomSeed(seed ^ (unsigned long)analogRead(A0));
  SerialUSB.print("flasher_otaa: for DevEUI " FLASHER_DEV_EUI ", band " FLASHER_BAND "\r\n");
  (void)LIBRARY_BAND;
}

void loop(void) {
  node.step();
}
