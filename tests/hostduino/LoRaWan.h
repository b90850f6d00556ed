/*
 * A stand-in for Seeed's LoRaWan.h (hardware/Seeeduino/samd/libraries/LoRaWan), for host builds only:
 * the names flasher_otaa takes from it. The enumerations are the library's own, line for line
 * (tests/test_firmware_host.py compares them with the real header when the kit is present).
 */
#ifndef _LORAWAN_H_
#define _LORAWAN_H_

#include <Arduino.h>

#define SerialLoRa          Serial1

enum _class_type_t { CLASS_A = 0, CLASS_C };
enum _physical_type_t { EU434 = 0, EU868, US915, US915HYBRID, AU915, AU915OLD, CN470, CN779, AS923, KR920, IN865 };
enum _device_mode_t { LWABP = 0, LWOTAA, TEST };
enum _otaa_join_cmd_t { JOIN = 0, FORCE };

class LoRaWanClass {
 public:
  void init(void) { SerialLoRa.begin(9600); }
};

extern LoRaWanClass lora;

#endif
