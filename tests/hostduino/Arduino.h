/*
 * hostduino: a stand-in for the Arduino core, so a sketch compiles and runs on the host (Linux, g++).
 * NOT the SAMD core: only what flasher's sketches use. The real-target build (tests/test_firmware_target.py)
 * checks the same sketches against the real Seeed core.
 *
 * Serial1 is the LoRaWAN module: a serial device path (a board simulator's pty) given on the command line.
 * SerialUSB is the host side: a pty this process creates; its path is the first line on stdout.
 *
 * Time is virtual and runs ahead of the wall clock: delay() returns at once and adds its milliseconds, and a
 * read that finds nothing waits 1 ms of real time for input and adds HOSTDUINO_IDLE_MS (default 10) ms.
 * So back-offs of minutes take a fraction of a second, and a simulator's answers still arrive in order.
 * millis() never goes backwards and never runs slower than the wall clock.
 */
#ifndef HOSTDUINO_ARDUINO_H
#define HOSTDUINO_ARDUINO_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEC 10
#define HEX 16
#define A0 14
#define INPUT 0
#define OUTPUT 1
#define LOW 0
#define HIGH 1

unsigned long millis(void);
unsigned long micros(void);
void delay(unsigned long ms);
long random(long howbig);
long random(long howsmall, long howbig);
void randomSeed(unsigned long seed);
int analogRead(uint8_t pin);
void pinMode(uint8_t pin, uint8_t mode);
void digitalWrite(uint8_t pin, uint8_t value);

class Print {
 public:
  virtual ~Print() {}
  virtual size_t write(uint8_t c) = 0;
  virtual size_t write(const uint8_t *buffer, size_t size) {
    size_t n = 0;
    while (size--) n += write(*buffer++);
    return n;
  }
  size_t write(const char *s) { return s ? write((const uint8_t *)s, strlen(s)) : 0; }
  size_t print(const char *s) { return write(s); }
  size_t print(char c) { return write((uint8_t)c); }
  size_t print(unsigned long n, int base = DEC) { return number(n, base, false); }
  size_t print(long n, int base = DEC) { return n < 0 ? print('-') + number(-(unsigned long)n, base, false) : number(n, base, false); }
  size_t print(unsigned int n, int base = DEC) { return print((unsigned long)n, base); }
  size_t print(int n, int base = DEC) { return print((long)n, base); }
  size_t println(void) { return write("\r\n"); }
  template <typename T> size_t println(T v) { return print(v) + println(); }

 private:
  size_t number(unsigned long n, int base, bool) {
    char text[40];
    snprintf(text, sizeof text, base == HEX ? "%lX" : "%lu", n);
    return write(text);
  }
};

class Stream : public Print {
 public:
  virtual int available() = 0;
  virtual int read() = 0;
  virtual int peek() = 0;
  virtual void flush() {}
};

/** A serial port over a file descriptor. Writes never block: with nobody reading they are dropped,
 * as the SAMD21's USB CDC drops them without a host. */
class HostSerial : public Stream {
 public:
  explicit HostSerial(const char *name) : name_(name), fd_(-1), len_(0), pos_(0) {}
  void attach(int fd) { fd_ = fd; }
  void begin(unsigned long) {}
  void end() {}
  operator bool() { return fd_ >= 0; }
  int available() override;
  int read() override;
  int peek() override;
  size_t write(uint8_t c) override { return write(&c, 1); }
  size_t write(const uint8_t *buffer, size_t size) override;
  using Print::write;

 private:
  bool fill(bool wait);
  const char *name_;
  int fd_;
  uint8_t buf_[512];
  size_t len_, pos_;
};

extern HostSerial Serial1;
extern HostSerial SerialUSB;
#define Serial SerialUSB

void setup(void);
void loop(void);

#endif
