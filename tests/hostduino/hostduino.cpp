/*
 * hostduino's main and its serial ports and clock (see Arduino.h). Usage: SKETCH_BINARY MODULE_DEVICE
 * Prints "USB <pty path>" on stdout, then runs setup() once and loop() until SIGTERM/SIGINT, or until the
 * module device goes away (the simulator unplugged it): exit status 3.
 */
#include "Arduino.h"
#include "LoRaWan.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

HostSerial Serial1("module");
HostSerial SerialUSB("usb");
LoRaWanClass lora;

static unsigned long skipped_ms = 0;  // virtual time added by delay() and idle reads
static unsigned long idle_ms = 10;
static struct timespec started;
static unsigned long long rng_state = 1;

static unsigned long real_ms(void) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return (unsigned long)((now.tv_sec - started.tv_sec) * 1000L + (now.tv_nsec - started.tv_nsec) / 1000000L);
}

unsigned long millis(void) { return real_ms() + skipped_ms; }
unsigned long micros(void) { return millis() * 1000UL; }
void delay(unsigned long ms) { skipped_ms += ms; }
void randomSeed(unsigned long seed) { rng_state = seed ? seed : 1; }
long random(long howbig) {
  if (howbig <= 0) return 0;
  rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;  // Knuth's MMIX LCG
  return (long)((rng_state >> 33) % (unsigned long long)howbig);
}
long random(long howsmall, long howbig) { return howsmall >= howbig ? howsmall : howsmall + random(howbig - howsmall); }
int analogRead(uint8_t) { return 0; }
void pinMode(uint8_t, uint8_t) {}
void digitalWrite(uint8_t, uint8_t) {}

bool HostSerial::fill(bool wait) {
  if (pos_ < len_) return true;
  if (fd_ < 0) return false;
  struct pollfd p = {fd_, POLLIN, 0};
  int ready = poll(&p, 1, wait ? 1 : 0);
  if (ready <= 0 || !(p.revents & (POLLIN | POLLHUP | POLLERR))) {
    if (wait) skipped_ms += idle_ms;
    return false;
  }
  ssize_t n = ::read(fd_, buf_, sizeof buf_);
  if (n > 0) {
    pos_ = 0;
    len_ = (size_t)n;
    return true;
  }
  if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
    if (this == &Serial1) {  // the module's pty closed: the board was unplugged
      fprintf(stderr, "hostduino: %s gone (%s)\n", name_, n == 0 ? "EOF" : strerror(errno));
      _exit(3);
    }
    skipped_ms += idle_ms;  // the USB pty with no host attached reads EIO: nothing to read
  }
  return false;
}

int HostSerial::available() { return fill(true) ? (int)(len_ - pos_) : 0; }
int HostSerial::peek() { return fill(false) ? buf_[pos_] : -1; }
int HostSerial::read() { return fill(false) ? buf_[pos_++] : -1; }

size_t HostSerial::write(const uint8_t *buffer, size_t size) {
  size_t done = 0;
  while (fd_ >= 0 && done < size) {
    ssize_t n = ::write(fd_, buffer + done, size - done);
    if (n > 0) {
      done += (size_t)n;
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else {
      break;  // EAGAIN: nobody reads; drop the rest
    }
  }
  return size;
}

#ifndef HOSTDUINO_NO_MAIN  // a test program with its own main() links only the core's functions
static volatile sig_atomic_t stopping = 0;
static void on_signal(int) { stopping = 1; }

static void raw(int fd) {
  struct termios t;
  if (tcgetattr(fd, &t) == 0) {
    cfmakeraw(&t);
    tcsetattr(fd, TCSANOW, &t);
  }
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s MODULE_DEVICE\n", argv[0]);
    return 2;
  }
  clock_gettime(CLOCK_MONOTONIC, &started);
  const char *idle = getenv("HOSTDUINO_IDLE_MS");
  if (idle) idle_ms = strtoul(idle, NULL, 10);

  int module = open(argv[1], O_RDWR | O_NOCTTY | O_NONBLOCK);
  if (module < 0) {
    fprintf(stderr, "hostduino: cannot open %s: %s\n", argv[1], strerror(errno));
    return 2;
  }
  raw(module);
  Serial1.attach(module);

  int usb = posix_openpt(O_RDWR | O_NOCTTY);
  if (usb < 0 || grantpt(usb) != 0 || unlockpt(usb) != 0) {
    fprintf(stderr, "hostduino: no pty: %s\n", strerror(errno));
    return 2;
  }
  const char *path = ptsname(usb);
  int keep = open(path, O_RDWR | O_NOCTTY);  // held open so the host can come and go, as USB CDC allows
  raw(keep);
  fcntl(usb, F_SETFL, fcntl(usb, F_GETFL) | O_NONBLOCK);
  SerialUSB.attach(usb);
  printf("USB %s\n", path);
  fflush(stdout);

  signal(SIGTERM, on_signal);
  signal(SIGINT, on_signal);
  signal(SIGPIPE, SIG_IGN);
  setup();
  while (!stopping) loop();
  close(keep);
  return 0;
}
#endif
