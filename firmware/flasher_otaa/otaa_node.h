/*
 * otaa_node.h: what flasher_otaa does, over two Streams (USB to the host, Serial1 to the RHF76 module).
 *
 * Why not Seeed's LoRaWan library calls: its setters wait blind for a second each, setOTAAJoin() returns
 * true unless it sees "Join failed"/"modem is busy" (a silent module or an ERROR reads as joined), and
 * nothing it does lets the host talk to the module while the sketch runs. Here every exchange reads the
 * module's own answer line by line, and the host is served between and during exchanges.
 *
 * The node never blocks in loop(): each state does one exchange or waits by returning (in small delay()
 * steps), so a host line starting with "AT" on USB is noticed within a quarter of a second:
 *   - between exchanges it switches the node to MAINTENANCE: bytes are forwarded USB <-> module
 *     unchanged (what at_passthrough does) until the host has been quiet for MAINTENANCE_IDLE_MS;
 *   - during a long exchange (a join takes up to 20 s) the node answers "+AT: BUSY <seconds>" at once,
 *     holds the host's next line, and forwards it when the exchange ends. flasher waits that long.
 * The node's own messages never contain '+', so the host's AT parser cannot mistake them for answers.
 *
 * Header-only (included once, from flasher_otaa.ino) so the Arduino builder's prototype generation never
 * sees it, and so a host build (tests/hostduino) compiles exactly this code against a stand-in core.
 */
#ifndef FLASHER_OTAA_NODE_H
#define FLASHER_OTAA_NODE_H

#include <Arduino.h>
#include <ctype.h>
#include <stdio.h>
#include <string.h>

namespace otaa {

// --- timing ------------------------------------------------------------------------------------
// A join-request at DR0 (SF12/125 kHz, 23 bytes) is on air for about 1.48 s. A 1 % duty-cycle sub-band
// (EU868's join channels) then allows the next one after 148 s, and LoRaWAN 1.0.x's join back-off allows
// 36 s of join airtime in the first hour, 36 s in the next ten, then 8.7 s a day (about 5 joins a day).
// Doubling from 150 s to a 6 h cap keeps inside all three: 5 joins in hour 1, 4 in hours 1-11, 4 a day
// after. The jitter (up to +25 %) keeps boards that lost the network together from retrying together.
static const unsigned long JOIN_BACKOFF_MIN_MS = 150UL * 1000UL;
static const unsigned long JOIN_BACKOFF_MAX_MS = 6UL * 3600UL * 1000UL;
static const unsigned long JOIN_TIMEOUT_MS = 20UL * 1000UL;    // real joins answer within 6-14 s
static const unsigned long COMMAND_TIMEOUT_MS = 3UL * 1000UL;  // one-line answers come in milliseconds
static const unsigned long UPLINK_TIMEOUT_MS = 15UL * 1000UL;  // TX, then both receive windows
// TTN's fair use is 30 s of airtime a day: about one SF12 uplink an hour. ADR raises the data rate later.
#ifndef FLASHER_UPLINK_INTERVAL_MS
#define FLASHER_UPLINK_INTERVAL_MS (15UL * 60UL * 1000UL)
#endif
static const unsigned long RETRY_MS = 10UL * 1000UL;           // a module that did not answer a read/write
static const unsigned long REFUSAL_REPEAT_MS = 30UL * 1000UL;  // so a serial monitor opened late sees why
static const unsigned long MAINTENANCE_IDLE_MS = 60UL * 1000UL;
static const unsigned long POLL_MS = 250UL;                    // how long a wait sleeps between host checks

static const size_t LINE_MAX = 128;  // module lines we keep; longer ones are cut (payloads are short)
static const size_t HOST_LINE_MAX = 530;  // the module's own limit, 528, plus CR LF
static const uint8_t ANSWER_LINES = 6;

/** The wait before join attempt ``failures + 1``, after ``failures`` (>= 1) failed ones. ``jitter`` is
 * a random number the caller draws; the result is base + (jitter mod (base / 4 + 1)). */
static inline unsigned long joinBackoffMs(unsigned failures, unsigned long jitter) {
  unsigned long base = JOIN_BACKOFF_MIN_MS;
  for (unsigned i = 1; i < failures && base < JOIN_BACKOFF_MAX_MS; i++) {
    base = base > JOIN_BACKOFF_MAX_MS / 2 ? JOIN_BACKOFF_MAX_MS : base * 2;
  }
  if (base > JOIN_BACKOFF_MAX_MS) base = JOIN_BACKOFF_MAX_MS;
  return base + jitter % (base / 4 + 1);
}

/** Upper-case hex digits of ``text`` (separators dropped) into ``out``; returns how many. */
static inline size_t hexDigits(const char *text, char *out, size_t size) {
  size_t n = 0;
  for (; *text && n + 1 < size; text++) {
    if (isxdigit((unsigned char)*text)) out[n++] = (char)toupper((unsigned char)*text);
  }
  out[n] = 0;
  return n;
}

struct Config {
  const char *devEui;  // 16 hex digits, as config.h has them
  const char *appEui;
  const char *appKey;  // 32 hex digits; sent to the module, never printed
  const char *band;    // the module's name for it (AT+DR=<band>)
};

/** What one exchange with the module brought back: the payloads of its "+NAME: " lines. */
struct Answer {
  char lines[ANSWER_LINES][LINE_MAX];
  uint8_t count;
  bool complete;  // the final line arrived
  bool error;     // "+NAME: ERROR(n)" (or "+AT: ERROR(n)" for an unknown command)
  bool heard;     // any byte at all came back

  const char *last() const { return count ? lines[count - 1] : ""; }
  bool has(const char *prefix) const {
    for (uint8_t i = 0; i < count; i++) {
      if (strncmp(lines[i], prefix, strlen(prefix)) == 0) return true;
    }
    return false;
  }
};

typedef bool (*FinalFn)(const char *payload);

static inline bool anyLine(const char *) { return true; }
static inline bool joinFinal(const char *p) {
  return !strcmp(p, "Done") || !strcmp(p, "Not in OTAA mode") || !strcmp(p, "Joined already") ||
         !strncmp(p, "LoRaWAN modem is busy", 21);
}
static inline bool msgFinal(const char *p) {
  return !strcmp(p, "Done") || !strcmp(p, "Please join network first") || !strncmp(p, "LoRaWAN modem is busy", 21) ||
         !strncmp(p, "No free channel", 15) || !strncmp(p, "No band in", 10) || !strncmp(p, "Length error", 12);
}

enum State { CHECK_ID, REFUSED, CONFIGURE, JOIN, UPLINK, MAINTENANCE };

class Node {
 public:
  Node(Stream &usb, Stream &module, const Config &config)
      : usb_(usb), module_(module), cfg_(config), state_(CHECK_ID), configured_(false), failures_(0), uplinks_(0),
        waitStart_(0), waitMs_(0), hostLen_(0), hostReady_(false), toldBusy_(false), lastHostMs_(0) {
    devAddr_[0] = 0;
  }

  State state() const { return state_; }

  /** One step: serve the host, or do what the state asks once it is due. Call it from loop(). */
  void step() {
    if (state_ == MAINTENANCE) {
      maintain();
      return;
    }
    if (pollHost(false, 0)) {
      enterMaintenance();
      return;
    }
    unsigned long now = millis();
    if (now - waitStart_ < waitMs_) {
      unsigned long left = waitMs_ - (now - waitStart_);
      delay(left < POLL_MS ? left : POLL_MS);
      return;
    }
    switch (state_) {
      case CHECK_ID: checkId(); break;
      case REFUSED: refuse(); break;
      case CONFIGURE: configure(); break;
      case JOIN: join(); break;
      case UPLINK: uplink(); break;
      case MAINTENANCE: break;
    }
  }

 private:
  Stream &usb_;
  Stream &module_;
  Config cfg_;
  State state_;
  bool configured_;
  unsigned failures_;
  unsigned long uplinks_;
  unsigned long waitStart_, waitMs_;
  char devAddr_[12];
  char moduleEui_[20];
  char hostLine_[HOST_LINE_MAX];
  size_t hostLen_;
  bool hostReady_;  // hostLine_ holds a whole line starting with AT, waiting to be forwarded
  bool toldBusy_;   // the host has been told BUSY during this exchange
  unsigned long lastHostMs_;
  char cmd_[96];
  Answer answer_;

  // --- messages ------------------------------------------------------------------------------
  void say(const char *a, const char *b = "", const char *c = "", const char *d = "") {
    usb_.print("flasher_otaa: ");
    usb_.print(a);
    usb_.print(b);
    usb_.print(c);
    usb_.print(d);
    usb_.print("\r\n");
  }
  void sayNumber(const char *a, unsigned long n, const char *b) {
    char text[24];
    snprintf(text, sizeof text, "%lu", n);
    say(a, text, b);
  }
  /** A module line, quoted for a person: '+' becomes '*' so no host parser takes it for an answer. */
  const char *quote(const char *line) {
    static char out[LINE_MAX];
    size_t i = 0;
    for (; line[i] && i + 1 < sizeof out; i++) out[i] = line[i] == '+' ? '*' : line[i];
    out[i] = 0;
    return out;
  }

  void waitFor(unsigned long ms) {
    waitStart_ = millis();
    waitMs_ = ms;
  }

  // --- the host side -----------------------------------------------------------------------------
  /** Read what the host sent. True when a whole line starting with "AT" is ready to forward. During an
   * exchange (``busy``) the first such line is answered "+AT: BUSY <s>" and dropped; the next is held. */
  bool pollHost(bool busy, unsigned long remainingMs) {
    while (!hostReady_ && usb_.available() > 0) {
      int c = usb_.read();
      if (c < 0) break;
      lastHostMs_ = millis();
      if (hostLen_ < sizeof hostLine_ - 1) hostLine_[hostLen_++] = (char)c;
      if (c != '\n') continue;
      hostLine_[hostLen_] = 0;
      const char *p = hostLine_;
      while (*p == ' ' || *p == '\r') p++;
      bool at = (p[0] == 'A' || p[0] == 'a') && (p[1] == 'T' || p[1] == 't');
      if (!at) {  // a person typing something else: say how to reach the module
        say("send a line starting with AT to talk to the module");
        hostLen_ = 0;
      } else if (busy && !toldBusy_) {
        char text[32];
        snprintf(text, sizeof text, "+AT: BUSY %lu\r\n", remainingMs / 1000UL + 1UL);
        usb_.print(text);
        toldBusy_ = true;
        hostLen_ = 0;
      } else {
        hostReady_ = true;
      }
    }
    return hostReady_ && !busy;
  }

  void enterMaintenance() {
    module_.write((const uint8_t *)hostLine_, hostLen_);
    hostLen_ = 0;
    hostReady_ = false;
    lastHostMs_ = millis();
    state_ = MAINTENANCE;
  }

  /** Forward both ways, byte for byte, until the host has been quiet for MAINTENANCE_IDLE_MS. */
  void maintain() {
    bool moved = false;
    while (usb_.available() > 0) {
      int c = usb_.read();
      if (c < 0) break;
      module_.write((uint8_t)c);
      lastHostMs_ = millis();
      moved = true;
    }
    while (module_.available() > 0) {
      int c = module_.read();
      if (c < 0) break;
      usb_.write((uint8_t)c);
      moved = true;
    }
    if (millis() - lastHostMs_ >= MAINTENANCE_IDLE_MS) {
      say("maintenance over; checking the module again");
      state_ = CHECK_ID;  // the host may have changed the module: check its DevEUI, then rejoin
      waitFor(0);
    } else if (!moved) {
      delay(1);
    }
  }

  // --- the module side ---------------------------------------------------------------------------
  /** Send ``command`` and collect the payloads of the module's "+NAME: " lines until ``final`` says
   * one is the last (or an ERROR line, or the timeout). Serves the host meanwhile. */
  const Answer &exchange(const char *command, FinalFn final, unsigned long timeoutMs) {
    char name[16];
    size_t n = 0;
    const char *w = command + 2;  // after "AT"
    if (*w == '+') w++;
    while (n + 1 < sizeof name && (isalnum((unsigned char)*w))) name[n++] = (char)toupper((unsigned char)*w++);
    name[n] = 0;
    if (n == 0) strcpy(name, "AT");

    memset(&answer_, 0, sizeof answer_);
    while (module_.available() > 0) module_.read();  // stale output of an earlier exchange
    module_.print(command);
    module_.print("\r\n");
    toldBusy_ = false;

    char line[LINE_MAX];
    size_t len = 0;
    unsigned long start = millis();
    while (millis() - start < timeoutMs) {
      pollHost(true, timeoutMs - (millis() - start));
      if (module_.available() <= 0) continue;
      int c = module_.read();
      if (c < 0) continue;
      answer_.heard = true;
      if (c != '\n') {
        if (len < sizeof line - 1) line[len++] = (char)c;
        continue;
      }
      while (len && (line[len - 1] == '\r' || line[len - 1] == ' ')) len--;
      line[len] = 0;
      len = 0;
      const char *plus = strchr(line, '+');  // boot noise before the '+' is skipped
      if (!plus) continue;
      size_t nameLen = strlen(name);
      bool ours = strncmp(plus + 1, name, nameLen) == 0 && plus[1 + nameLen] == ':';
      bool unknown = strncmp(plus + 1, "AT: ERROR", 9) == 0;
      if (!ours && !unknown) continue;
      const char *payload = unknown ? plus + 5 : plus + 2 + nameLen;
      while (*payload == ' ') payload++;
      if (answer_.count < ANSWER_LINES) {
        strncpy(answer_.lines[answer_.count], payload, LINE_MAX - 1);
        answer_.count++;
      }
      if (strncmp(payload, "ERROR", 5) == 0) {
        answer_.error = answer_.complete = true;
        break;
      }
      if (final(payload)) {
        answer_.complete = true;
        break;
      }
    }
    return answer_;
  }

  /** Why an exchange did not give what was asked, in words: the module's last telling line. */
  const char *why(const Answer &a) {
    if (!a.heard) return "no answer from the module";
    for (int i = (int)a.count - 1; i >= 0; i--) {
      const char *p = a.lines[i];
      if (strcmp(p, "Done") && strcmp(p, "Starting") && strcmp(p, "Start") && strcmp(p, "NORMAL")) return quote(p);
    }
    return a.complete ? "no join-accept" : "incomplete answer";
  }

  // --- states ------------------------------------------------------------------------------------
  /** The module's DevEUI is read before anything is written: the header must be this board's. */
  void checkId() {
    const Answer &a = exchange("AT+ID=DevEui", anyLine, COMMAND_TIMEOUT_MS);
    if (!a.complete || a.error || strncmp(a.lines[0], "DevEui", 6) != 0 ||
        hexDigits(a.lines[0] + 6, moduleEui_, sizeof moduleEui_) != 16) {
      say("cannot read the module's DevEUI (", why(a), "); not joining, asking again in 10 s");
      waitFor(RETRY_MS);
      return;
    }
    char want[20];
    hexDigits(cfg_.devEui, want, sizeof want);
    if (strcmp(want, moduleEui_) != 0) {
      state_ = REFUSED;
      waitFor(0);
      return;
    }
    say("DevEUI ", moduleEui_, " matches config.h");
    state_ = configured_ ? JOIN : CONFIGURE;
    waitFor(0);
  }

  void refuse() {
    char want[20];
    hexDigits(cfg_.devEui, want, sizeof want);
    say("REFUSING TO JOIN: config.h was generated for DevEUI ", want, ", but this board's module has DevEUI ",
        moduleEui_);
    say("generate the header for this board (flasher header ", moduleEui_, " ...) and upload again");
    waitFor(REFUSAL_REPEAT_MS);
  }

  /** One write, checked against its echo (hex compared without separators). */
  bool write(const char *command, const char *expectWord, const char *expectHex) {
    const Answer &a = exchange(command, anyLine, COMMAND_TIMEOUT_MS);
    bool ok = a.complete && !a.error;
    if (ok && expectWord) ok = strncmp(a.lines[0], expectWord, strlen(expectWord)) == 0;
    if (ok && expectHex) {
      char got[40], want[40];
      const char *value = a.lines[0] + (expectWord ? strlen(expectWord) : 0);
      hexDigits(value, got, sizeof got);
      hexDigits(expectHex, want, sizeof want);
      ok = strcmp(got, want) == 0;
    }
    if (!ok) {
      char shown[24];
      snprintf(shown, sizeof shown, "%.20s", command + 3);  // "ID=AppEui,..." / "KEY=APPKEY,..." cut before the key
      char *key = strstr(shown, "KEY,");
      if (key) key[4] = 0;
      say("writing ", shown, " failed: ", why(a));
    }
    return ok;
  }

  void configure() {
    snprintf(cmd_, sizeof cmd_, "AT+ID=AppEui,\"%s\"", cfg_.appEui);
    bool ok = write(cmd_, "AppEui", cfg_.appEui);
    if (ok) {
      snprintf(cmd_, sizeof cmd_, "AT+KEY=APPKEY,\"%s\"", cfg_.appKey);
      ok = write(cmd_, "APPKEY", cfg_.appKey);
      memset(cmd_, 0, sizeof cmd_);
    }
    if (ok) ok = write("AT+MODE=LWOTAA", "LWOTAA", NULL);
    if (ok) {
      snprintf(cmd_, sizeof cmd_, "AT+DR=%s", cfg_.band);
      ok = write(cmd_, cfg_.band, NULL);
    }
    if (ok) ok = write("AT+DR=DR0", "DR0", NULL);
    if (ok) ok = write("AT+ADR=ON", "ON", NULL);
    if (!ok) {
      say("module not configured; trying again in 10 s");
      waitFor(RETRY_MS);
      return;
    }
    say("module configured: JoinEUI ", cfg_.appEui, ", OTAA, band ", cfg_.band);
    configured_ = true;
    state_ = JOIN;
    failures_ = 0;
    waitFor(0);
  }

  /** Joined only on the module's word: a "NetID ... DevAddr ..." line, "Network joined" then "Done",
   * or "Joined already". Silence, ERROR, "Join failed", "busy", "Not in OTAA mode": not joined. */
  void join() {
    sayNumber("join attempt ", failures_ + 1, "");
    const Answer &a = exchange("AT+JOIN", joinFinal, JOIN_TIMEOUT_MS);
    bool joined = a.has("Joined already") || (a.has("Network joined") && a.complete && !strcmp(a.last(), "Done"));
    for (uint8_t i = 0; i < a.count; i++) {
      const char *d = strstr(a.lines[i], "DevAddr");
      if (d && hexDigits(d + 7, devAddr_, sizeof devAddr_) == 8) joined = true;
    }
    if (joined && !a.error) {
      say("joined", devAddr_[0] ? ", DevAddr " : "", devAddr_);
      state_ = UPLINK;
      failures_ = 0;
      waitFor(0);
      return;
    }
    if (a.has("Not in OTAA mode")) configured_ = false;  // someone changed the mode: configure again first
    failures_++;
    unsigned long wait = joinBackoffMs(failures_, (unsigned long)random(0x7FFFFFFFL));
    char seconds[24];
    snprintf(seconds, sizeof seconds, "%lu", wait / 1000UL);
    say("join failed (", why(a), "); next attempt in ", seconds);
    if (!configured_) state_ = CONFIGURE;
    waitFor(wait);
  }

  void uplink() {
    snprintf(cmd_, sizeof cmd_, "AT+MSG=\"flasher %lu\"", uplinks_);
    const Answer &a = exchange(cmd_, msgFinal, UPLINK_TIMEOUT_MS);
    if (a.has("Please join network first")) {
      say("the module has no session; joining again");
      state_ = JOIN;
      waitFor(0);
      return;
    }
    bool sent = a.complete && !a.error && !strcmp(a.last(), "Done");
    sayNumber(sent ? "uplink " : "uplink failed: ", uplinks_, sent ? " sent" : "");
    if (!sent) say("  ", why(a));
    for (uint8_t i = 0; i < a.count; i++) {
      if (strstr(a.lines[i], "RX: ")) say("downlink: ", quote(a.lines[i]));
    }
    uplinks_++;
    waitFor(FLASHER_UPLINK_INTERVAL_MS);
  }
};

}  // namespace otaa

#endif  // FLASHER_OTAA_NODE_H
