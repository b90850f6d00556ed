/*
 * flasher_otaa: join a LoRaWAN network over OTAA from a Seeeduino LoRaWAN
 * (SAMD21 + RisingHF RHF76-052 on Serial1) with Seeed's LoRaWan library, then
 * send an uplink periodically.
 *
 * Every identity value comes from config.h, which `flasher header` generates for
 * one board (template seeed-lorawan). Put it beside this file before building:
 *
 *   flasher header 2CF7F12024900138 --app-key-file appkey.txt --band EU868 \
 *       -o firmware/flasher_otaa/config.h
 *   arduino-cli compile --fqbn Seeeduino:samd:rolawan firmware/flasher_otaa
 *
 * config.h holds the board's AppKey: never commit it.
 */
#include <LoRaWan.h>

#include "config.h"

#ifndef FLASHER_LORA_BAND
#error "config.h was not generated with the seeed-lorawan template (FLASHER_LORA_BAND missing)"
#endif

static const unsigned long UPLINK_INTERVAL_MS = 60UL * 1000UL;  // mind your band's duty cycle
static const unsigned long JOIN_RETRY_MS = 10UL * 1000UL;
static const unsigned char JOIN_TIMEOUT_S = 20;  // real joins take 6-14 s
static const unsigned long USB_WAIT_MS = 3000UL;  // do not hang without a host attached

// The library's setters take char *; give them writable copies of the header's literals.
static char devEui[] = FLASHER_DEV_EUI;
static char appEui[] = FLASHER_APP_EUI;
static char appKey[] = FLASHER_APP_KEY;

static char buffer[256];
static unsigned long counter = 0;

static void joinNetwork(void) {
  for (;;) {
    SerialUSB.println("joining (OTAA)...");
    if (lora.setOTAAJoin(JOIN, JOIN_TIMEOUT_S)) {
      SerialUSB.println("joined");
      return;
    }
    delay(JOIN_RETRY_MS);
  }
}

void setup(void) {
  SerialUSB.begin(115200);
  for (unsigned long t0 = millis(); !SerialUSB && millis() - t0 < USB_WAIT_MS;) {
  }

  lora.init();

  memset(buffer, 0, sizeof buffer);
  lora.getVersion(buffer, sizeof buffer, 1);
  SerialUSB.print(buffer);

  lora.setId(NULL, devEui, appEui);
  lora.setKey(NULL, NULL, appKey);
  lora.setDeciveMode(LWOTAA);  // sic: the spelling of the LoRaWan library in Seeed's SAMD core
  lora.setDataRate(DR0, FLASHER_LORA_BAND);
  lora.setAdaptiveDataRate(true);

  memset(buffer, 0, sizeof buffer);
  lora.getId(buffer, sizeof buffer, 1);
  SerialUSB.print(buffer);
  SerialUSB.print("expected DevEUI ");
  SerialUSB.println(FLASHER_DEV_EUI);

  joinNetwork();
}

void loop(void) {
  char payload[32];
  snprintf(payload, sizeof payload, "flasher %lu", counter++);
  bool ok = lora.transferPacket(payload, 10);
  SerialUSB.print(ok ? "uplink sent: " : "uplink failed: ");
  SerialUSB.println(payload);
  if (ok) {
    short length;
    short rssi;
    memset(buffer, 0, sizeof buffer);
    length = lora.receivePacket(buffer, sizeof buffer, &rssi);
    if (length > 0) {
      SerialUSB.print("downlink, RSSI ");
      SerialUSB.print(rssi);
      SerialUSB.print(", ");
      SerialUSB.print(length);
      SerialUSB.println(" bytes");
    }
  }
  delay(UPLINK_INTERVAL_MS);
}
