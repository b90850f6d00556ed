/* An independent RHF76-052 for benchmarks: N modules on pseudo-terminals, written in C from the AT
 * dialect in RisingHF's command specification (as summarised in the project's reference notes), sharing
 * no code with flasher's own board simulator (flasher/sim/board.py).
 *
 *   gcc -O2 -o rhf76 rhf76.c && ./rhf76 N [LATENCY_MS]
 *
 * Prints each module's pty path on its own line, then serves until stdin closes or SIGTERM.
 * Every module has its own DevEUI (2C:F7:F1:20:AA:xx:xx:xx by index), answers after LATENCY_MS (each on its own
 * clock: one process serves them all without one module's wait holding another's answer),
 * and keeps JoinEUI, AppKey (write-only), mode and band in memory. Commands it does not know get
 * "+CMD: ERROR(-1)". It counts the commands it answered and prints the count to stderr at exit.
 */
#define _XOPEN_SOURCE 700
#define _DEFAULT_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MAXB 1024
#define LINE 600

typedef struct {
    int fd;
    char in[LINE];
    size_t n;
    unsigned char deveui[8], appeui[8];
    char mode[8], band[16];
    int dr;
    char pending[LINE];   /* a command waiting for its answer's due time (the module's latency) */
    int has_pending;
    double due;
} Module;

static double now_ms(void) {
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
}

static volatile sig_atomic_t stopping = 0;
static void on_term(int sig) { (void)sig; stopping = 1; }
static long answered = 0;

static void say(Module *m, const char *text) {
    size_t len = strlen(text), off = 0;
    while (off < len) {
        ssize_t w = write(m->fd, text + off, len - off);
        if (w < 0) { if (errno == EINTR || errno == EAGAIN) continue; return; }
        off += (size_t)w;
    }
}

static void eui_text(const unsigned char *b, int n, char *out) {
    for (int i = 0; i < n; i++) sprintf(out + 3 * i, "%02X%s", b[i], i + 1 < n ? ":" : "");
}

static int parse_hex(const char *s, unsigned char *out, int n) {   /* "70B3D57ED003F06A" (quotes allowed) */
    char digits[64]; int k = 0;
    for (; *s && k < 63; s++) if (isxdigit((unsigned char)*s)) digits[k++] = *s; else if (*s != '"' && *s != ':' && *s != ' ') return -1;
    if (k != 2 * n) return -1;
    for (int i = 0; i < n; i++) { char h[3] = {digits[2 * i], digits[2 * i + 1], 0}; out[i] = (unsigned char)strtol(h, NULL, 16); }
    return 0;
}

static const char *BANDS[] = {"EU868", "US915", "US915HYBRID", "AU915", "AS923", "CN470", "KR920", "IN865", "EU433", NULL};

static void answer(Module *m, char *line) {
    char out[LINE * 2], t[64], word[32] = {0}, *arg = NULL;
    size_t len = strlen(line);
    while (len && (line[len - 1] == '\r' || line[len - 1] == ' ')) line[--len] = 0;
    if (len == 0) return;
    if (strncasecmp(line, "AT", 2) != 0) { say(m, "+AT: ERROR(-1)\r\n"); return; }
    char *cmd = line + 2;
    if (*cmd == 0) { say(m, "+AT: OK\r\n"); answered++; return; }
    if (*cmd != '+') { say(m, "+AT: ERROR(-1)\r\n"); return; }
    cmd++;
    size_t w = 0;
    while (cmd[w] && cmd[w] != '=' && cmd[w] != '?' && w < sizeof word - 1) { word[w] = (char)toupper((unsigned char)cmd[w]); w++; }
    if (cmd[w] == '=') arg = cmd + w + 1;
    if (arg && (strcmp(arg, "?") == 0 || *arg == 0)) arg = NULL;   /* AT+CMD=? is a query */
    answered++;
    if (strcmp(word, "VER") == 0) { say(m, "+VER: 2.0.10\r\n"); return; }
    if (strcmp(word, "ID") == 0) {
        char dev[32], app[32], addr[16];
        eui_text(m->deveui, 8, dev); eui_text(m->appeui, 8, app); eui_text(m->deveui + 4, 4, addr);
        if (!arg) { snprintf(out, sizeof out, "+ID: DevAddr, %s\r\n+ID: DevEui, %s\r\n+ID: AppEui, %s\r\n", addr, dev, app); say(m, out); return; }
        if (strncasecmp(arg, "AppEui", 6) == 0) {
            if (arg[6] == ',' && parse_hex(arg + 7, m->appeui, 8) != 0) { say(m, "+ID: ERROR(-1)\r\n"); return; }
            eui_text(m->appeui, 8, app); snprintf(out, sizeof out, "+ID: AppEui, %s\r\n", app); say(m, out); return;
        }
        if (strncasecmp(arg, "DevEui", 6) == 0 && arg[6] == 0) { snprintf(out, sizeof out, "+ID: DevEui, %s\r\n", dev); say(m, out); return; }
        say(m, "+ID: ERROR(-1)\r\n"); return;
    }
    if (strcmp(word, "KEY") == 0) {
        unsigned char key[16];
        if (!arg || strncasecmp(arg, "APPKEY,", 7) != 0 || parse_hex(arg + 7, key, 16) != 0) { say(m, "+KEY: ERROR(-1)\r\n"); return; }
        strcpy(out, "+KEY: APPKEY ");
        for (int i = 0; i < 16; i++) { sprintf(t, "%02X", key[i]); strcat(out, t); }
        strcat(out, "\r\n"); say(m, out); return;
    }
    if (strcmp(word, "MODE") == 0) {
        if (arg) {
            if (strcasecmp(arg, "LWOTAA") && strcasecmp(arg, "LWABP") && strcasecmp(arg, "TEST")) { say(m, "+MODE: ERROR(-1)\r\n"); return; }
            for (int i = 0; arg[i] && i < 7; i++) m->mode[i] = (char)toupper((unsigned char)arg[i]);
            m->mode[strlen(arg) < 7 ? strlen(arg) : 7] = 0;
        }
        snprintf(out, sizeof out, "+MODE: %s\r\n", m->mode); say(m, out); return;
    }
    if (strcmp(word, "DR") == 0) {
        if (!arg) { snprintf(out, sizeof out, "+DR: DR%d\r\n+DR: %s DR%d  SF12 BW125K \r\n", m->dr, m->band, m->dr); say(m, out); return; }
        const char *a = arg; if (strncasecmp(a, "DR", 2) == 0) a += 2;
        if (isdigit((unsigned char)*a)) { m->dr = atoi(a); snprintf(out, sizeof out, "+DR: DR%d\r\n", m->dr); say(m, out); return; }
        for (int i = 0; BANDS[i]; i++) if (strcasecmp(arg, BANDS[i]) == 0) {
            snprintf(m->band, sizeof m->band, "%s", BANDS[i]); snprintf(out, sizeof out, "+DR: %s\r\n", m->band); say(m, out); return;
        }
        say(m, "+DR: ERROR(-1)\r\n"); return;
    }
    answered--;
    snprintf(out, sizeof out, "+%s: ERROR(-1)\r\n", word); say(m, out);
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 1;
    long latency_ms = argc > 2 ? atol(argv[2]) : 0;
    if (n < 1 || n > MAXB) { fprintf(stderr, "usage: rhf76 N [LATENCY_MS] (1 <= N <= %d)\n", MAXB); return 2; }
    static Module mods[MAXB];
    struct sigaction sa = {0}; sa.sa_handler = on_term; sigaction(SIGTERM, &sa, NULL); sigaction(SIGINT, &sa, NULL);
    for (int i = 0; i < n; i++) {
        Module *m = &mods[i];
        m->fd = posix_openpt(O_RDWR | O_NOCTTY);
        if (m->fd < 0 || grantpt(m->fd) || unlockpt(m->fd)) { perror("posix_openpt"); return 1; }
        struct termios tio; int slave = open(ptsname(m->fd), O_RDWR | O_NOCTTY);
        if (slave < 0 || tcgetattr(slave, &tio)) { perror("pty"); return 1; }
        cfmakeraw(&tio); tcsetattr(slave, TCSANOW, &tio);   /* keep the slave open: no EIO between the host's opens */
        unsigned char dev[8] = {0x2C, 0xF7, 0xF1, 0x20, 0xAA, (unsigned char)(i >> 16), (unsigned char)(i >> 8), (unsigned char)i};
        memcpy(m->deveui, dev, 8); memset(m->appeui, 0, 8); m->appeui[0] = 0x80; m->appeui[7] = 0x06;
        strcpy(m->mode, "LWABP"); strcpy(m->band, "EU868");
        printf("%s\n", ptsname(m->fd));
    }
    fflush(stdout);
    struct pollfd fds[MAXB + 1];
    while (!stopping) {
        double next = now_ms() + 500;
        for (int i = 0; i < n; i++) {
            fds[i].fd = mods[i].fd; fds[i].events = POLLIN;
            if (mods[i].has_pending && mods[i].due < next) next = mods[i].due;
        }
        fds[n].fd = 0; fds[n].events = POLLIN;
        double wait = next - now_ms();
        int r = poll(fds, (nfds_t)n + 1, wait > 0 ? (int)wait + 1 : 0);
        if (r < 0) { if (errno == EINTR) continue; perror("poll"); break; }
        if (fds[n].revents & (POLLIN | POLLHUP)) { char b[64]; if (read(0, b, sizeof b) <= 0) break; }
        for (int i = 0; i < n; i++) {
            if (!(fds[i].revents & POLLIN)) continue;
            Module *m = &mods[i];
            char buf[256]; ssize_t got = read(m->fd, buf, sizeof buf);
            for (ssize_t k = 0; k < got; k++) {
                if (buf[k] == '\n') {
                    m->in[m->n] = 0; m->n = 0;
                    if (latency_ms == 0) { answer(m, m->in); continue; }
                    memcpy(m->pending, m->in, LINE); m->has_pending = 1; m->due = now_ms() + (double)latency_ms;
                } else if (m->n < LINE - 1) m->in[m->n++] = buf[k];
            }
        }
        double t = now_ms();   /* every module answers when its own latency is up: one slow answer never holds another */
        for (int i = 0; i < n; i++)
            if (mods[i].has_pending && mods[i].due <= t) { mods[i].has_pending = 0; answer(&mods[i], mods[i].pending); }
    }
    fprintf(stderr, "rhf76: %ld commands answered\n", answered);
    return 0;
}
