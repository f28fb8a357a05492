/* wsload: single-threaded epoll WebSocket (RFC 6455) / raw-TCP load client of selectws's benchmark matrix.
 *
 * Vendored from the project's side-by-side perf harness (shared/perf/client/wsload.c, the C client behind the
 * README's performance table) so that anyone with a clone can rerun the table: benchmarks/matrix/run.py
 * compiles it on first use with the system `cc -O2` into a cache folder ($XDG_CACHE_HOME/selectws-bench,
 * default ~/.cache/selectws-bench) and runs it pinned to its own core (taskset), so that the server, not
 * this client, is the bottleneck (run.py reports the client's CPU share of its core per point).
 * Changes from the original: the `churn` mode below (connections opened and closed at a fixed rate).
 *
 * Modes:
 *   echo      N connections, each keeps W messages in flight; RTT histogram.
 *   broadcast S subscriber connections + 1 publisher; publisher keeps W
 *             messages "in flight" until every subscriber has received them.
 *   idle      open N connections, hold them, then verify each with one echo.
 *   churn     start --rate new connections per second (at most --concurrency
 *             at once) for --warmup + --duration seconds; each one: TCP
 *             connect, upgrade (a --deflate-fraction share, spread evenly,
 *             offers permessage-deflate), one masked text message of --size
 *             bytes, its echo (a compressed echo is counted, not inflated),
 *             a close frame (1000), the server's close frame, then the
 *             server's FIN (waited for up to 2 s, so TIME_WAIT stays on the
 *             server side) and close. Latency = connect to close frame.
 *             Sources rotate over 127.0.0.1 .. 127.0.0.<--churn-sources>.
 *
 * Protocol (same for every server): the URL path picks the role:
 *   /echo  echo every data message back      /sub  receive broadcasts
 *   /pub   every data message is fanned out to all /sub connections
 * Raw-TCP mode (--raw): no WebSocket; the client first sends "<path>\n",
 * then fixed-size messages of --size bytes.
 *
 * Stdout protocol (read by the driver): "START" when measurement begins,
 * "END" when it ends, "READY ..." (idle mode, all connections open), and
 * finally one line "RESULT {json}".
 * Every phase is bounded in time; the process always exits.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

enum { ST_NEW, ST_CONNECTING, ST_HANDSHAKE, ST_OPEN, ST_CLOSED, ST_CLOSING, ST_DRAIN };
enum { R_ECHO, R_SUB, R_PUB };
enum { M_ECHO, M_BCAST, M_IDLE, M_CHURN };

#define HIST_N (256 + 40 * 128)       /* log-linear ns histogram, <1% error, up to ~18 min */
#define RING 4096                   /* broadcast completion ring */

typedef struct {
  int fd, state, role, idx;
  char *rbuf; size_t rlen, rcap;
  uint64_t skip;          /* payload bytes of current frame still to skip */
  int skip_completes;     /* finishing the skip completes a data message */
  uint64_t skip_plen;     /* payload length of the frame being skipped */
  char *obuf; size_t olen, ooff, ocap;
  uint64_t rep_frames; size_t rep_off;  /* repeat mode (large frames) */
  uint64_t *ts; unsigned ts_head, ts_cnt;
  uint64_t sent, recvd;
  uint64_t raw_part;
  int wout;               /* EPOLLOUT registered */
  uint64_t t_start;
  int deflate, negotiated, compressed; /* churn */
  uint64_t deadline;                  /* churn: fail or give up after this */
} conn_t;

/* ---- options ---- */
static const char *o_host = "127.0.0.1";
static int o_port = 8765;
static const char *o_path = "/echo", *o_sub_path = "/sub", *o_pub_path = "/pub";
static int o_mode = M_ECHO, o_conns = 1, o_window = 1, o_text = 0, o_raw = 0;
static size_t o_size = 64;
static double o_warmup = 2, o_duration = 10, o_hold = 2, o_connect_timeout = 60, o_stall = 5;
static long o_per_src = 20000;  /* connections per loopback source address (127.0.0.1, then .2, ...) */
static int o_conc = 64;
static double o_rate = 1000, o_deflate_frac = 0, o_conn_timeout = 10; static int o_churn_src = 4;  /* churn */

/* ---- state ---- */
static int ep;
static conn_t *conns; static int nconns;
static uint64_t *hist;
static int measuring = 0, sending = 1;
static uint64_t m_msgs, m_bytes, m_deliv, m_fanouts;
static uint64_t errors, closed_by_peer;
static char *tmpl; static size_t tmpl_len, tmpl_hdr;   /* client frame template */
static unsigned char maskkey[4] = {0x37, 0xfa, 0x21, 0x3d};
static uint64_t last_progress;
static int pending_open;
/* broadcast */
static uint32_t *bdone; static uint64_t b_completed, b_sent; static int nsubs;
static conn_t *pubc;
/* idle verify */
static int verifying = 0; static uint64_t verified;

static uint64_t now_ns(void) {
  struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000ULL + t.tv_nsec;
}
static void die(const char *m) { perror(m); exit(2); }

static unsigned hist_idx(uint64_t v) {
  if (v < 256) return (unsigned)v;
  int msb = 63 - __builtin_clzll(v), shift = msb - 7;
  unsigned i = 256 + (shift - 1) * 128 + (unsigned)((v >> shift) - 128);
  return i < HIST_N ? i : HIST_N - 1;
}
static double hist_val(unsigned i) {
  if (i < 256) return i;
  unsigned k = i - 256, shift = k / 128 + 1; uint64_t sub = k % 128 + 128;
  return (double)(sub << shift) + (double)(1ULL << shift) / 2;
}
static void hist_add(uint64_t ns) { hist[hist_idx(ns)]++; }
static double hist_pct(double p, uint64_t total) {
  if (!total) return -1;
  uint64_t want = (uint64_t)(p * total); if (want >= total) want = total - 1;
  uint64_t acc = 0;
  for (unsigned i = 0; i < HIST_N; i++) { acc += hist[i]; if (acc > want) return hist_val(i) / 1000.0; }
  return -1;
}

/* ---- frame template ---- */
static void build_template(void) {
  size_t n = o_size, h;
  if (o_raw) { tmpl = malloc(n); for (size_t i = 0; i < n; i++) tmpl[i] = 'a' + i % 26; tmpl_len = n; tmpl_hdr = 0; return; }
  h = n < 126 ? 2 : (n < 65536 ? 4 : 10);
  tmpl = malloc(h + 4 + n);
  tmpl[0] = (char)(0x80 | (o_text ? 1 : 2));
  if (n < 126) tmpl[1] = (char)(0x80 | n);
  else if (n < 65536) { tmpl[1] = (char)(0x80 | 126); tmpl[2] = n >> 8; tmpl[3] = n & 255; }
  else { tmpl[1] = (char)(0x80 | 127); for (int i = 0; i < 8; i++) tmpl[2 + i] = (n >> (56 - 8 * i)) & 255; }
  memcpy(tmpl + h, maskkey, 4);
  for (size_t i = 0; i < n; i++) tmpl[h + 4 + i] = (char)(('a' + i % 26) ^ maskkey[i & 3]);
  tmpl_hdr = h + 4; tmpl_len = h + 4 + n;
}

/* ---- output ---- */
static void ep_mod(conn_t *c, int out) {
  struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = c};
  if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl mod");
  c->wout = out;
}
static void obuf_put(conn_t *c, const void *p, size_t n) {
  if (c->olen + n > c->ocap) {
    if (c->ooff) { memmove(c->obuf, c->obuf + c->ooff, c->olen - c->ooff); c->olen -= c->ooff; c->ooff = 0; }
    if (c->olen + n > c->ocap) { c->ocap = (c->olen + n) * 2; c->obuf = realloc(c->obuf, c->ocap); }
  }
  memcpy(c->obuf + c->olen, p, n); c->olen += n;
}
static void conn_fail(conn_t *c, int peer) {
  if (c->state == ST_CLOSED) return;
  if (c->state != ST_OPEN) pending_open--;
  c->state = ST_CLOSED; close(c->fd);
  if (peer) closed_by_peer++; else errors++;
}
static void flush(conn_t *c) {
  while (c->ooff < c->olen) {
    ssize_t w = send(c->fd, c->obuf + c->ooff, c->olen - c->ooff, MSG_NOSIGNAL);
    if (w < 0) { if (errno == EAGAIN) break; conn_fail(c, 0); return; }
    c->ooff += w;
  }
  if (c->ooff == c->olen) c->ooff = c->olen = 0;
  while (c->ooff == c->olen && c->rep_frames) {
    struct iovec iov[64]; int k = 0;
    for (uint64_t f = 0; f < c->rep_frames && k < 64; f++, k++) {
      size_t off = f ? 0 : c->rep_off;
      iov[k].iov_base = tmpl + off; iov[k].iov_len = tmpl_len - off;
    }
    ssize_t w = writev(c->fd, iov, k);
    if (w < 0) { if (errno == EAGAIN) break; conn_fail(c, 0); return; }
    size_t ww = w;
    while (ww) {
      size_t rem = tmpl_len - c->rep_off;
      if (ww >= rem) { ww -= rem; c->rep_off = 0; c->rep_frames--; } else { c->rep_off += ww; ww = 0; }
    }
  }
  int need = (c->ooff < c->olen) || c->rep_frames;
  if (need != c->wout && c->state == ST_OPEN) ep_mod(c, need);
}

static void send_msg(conn_t *c, uint64_t t) {
  if (c->ts) { c->ts[(c->ts_head + c->ts_cnt) % o_window] = t; c->ts_cnt++; }
  c->sent++;
  if (tmpl_len > 65536) c->rep_frames++;
  else obuf_put(c, tmpl, tmpl_len);
}
static void send_seq(conn_t *c, uint64_t seq) {   /* broadcast publisher */
  char hex[9]; snprintf(hex, sizeof hex, "%08llx", (unsigned long long)(seq & 0xffffffffULL));
  size_t at = c->olen; obuf_put(c, tmpl, tmpl_len);
  char *p = c->obuf + at + tmpl_hdr;
  for (int i = 0; i < 8 && (size_t)i < o_size; i++) p[i] = o_raw ? hex[i] : (char)(hex[i] ^ maskkey[i & 3]);
  c->sent++;
}
static uint64_t parse_hex8(const char *p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) { char ch = p[i]; v = v * 16 + (ch <= '9' ? ch - '0' : ch - 'a' + 10); }
  return v;
}

/* ---- message completion ---- */
static void on_message(conn_t *c, const char *payload8, uint64_t plen, uint64_t t) {
  last_progress = t;
  c->recvd++;
  if (c->role == R_SUB) {
    uint64_t seq = payload8 ? parse_hex8(payload8) : 0;
    if (measuring) { m_deliv++; m_bytes += plen; }
    if (++bdone[seq % RING] == (uint32_t)nsubs) {
      bdone[seq % RING] = 0;
      if (seq + 1 > b_completed) b_completed = seq + 1;
      if (measuring) m_fanouts++;
    }
    return;
  }
  if (c->role == R_PUB) return;
  /* echo */
  if (verifying) { verified++; return; }
  if (c->ts_cnt) {
    uint64_t ts = c->ts[c->ts_head]; c->ts_head = (c->ts_head + 1) % o_window; c->ts_cnt--;
    if (measuring) hist_add(t - ts);
  }
  if (measuring) { m_msgs++; m_bytes += plen; }
  if (sending && o_mode == M_ECHO) send_msg(c, t);
}

/* ---- input parsing ---- */
static void parse_ws(conn_t *c, uint64_t t) {
  size_t pos = 0;
  for (;;) {
    if (c->skip) {
      size_t avail = c->rlen - pos, k = avail < c->skip ? avail : c->skip;
      pos += k; c->skip -= k;
      if (c->skip) break;
      if (c->skip_completes) { c->skip_completes = 0; on_message(c, NULL, c->skip_plen, t); }
      continue;
    }
    size_t avail = c->rlen - pos;
    if (avail < 2) break;
    unsigned char *h = (unsigned char *)c->rbuf + pos;
    int fin = h[0] & 0x80, op = h[0] & 15, masked = h[1] & 0x80;
    uint64_t plen = h[1] & 127; size_t hl = 2;
    if (plen == 126) { if (avail < 4) break; plen = (h[2] << 8) | h[3]; hl = 4; }
    else if (plen == 127) { if (avail < 10) break; plen = 0; for (int i = 0; i < 8; i++) plen = (plen << 8) | h[2 + i]; hl = 10; }
    if (masked) hl += 4;
    if (op >= 8) {      /* control frame: need it whole */
      if (avail < hl + plen) break;
      if (op == 9) {    /* ping -> pong */
        char fr[256]; fr[0] = (char)0x8a; fr[1] = (char)(0x80 | plen); memcpy(fr + 2, maskkey, 4);
        for (uint64_t i = 0; i < plen; i++) fr[6 + i] = (char)(c->rbuf[pos + hl + i] ^ (masked ? c->rbuf[pos + hl - 4 + (i & 3)] : 0) ^ maskkey[i & 3]);
        obuf_put(c, fr, 6 + plen);
      } else if (op == 8) { pos += hl + plen; conn_fail(c, 1); return; }
      pos += hl + plen; continue;
    }
    int data_end = fin && (op == 0 || op == 1 || op == 2);
    if (c->role == R_SUB && data_end) {   /* need first 8 payload bytes for seq */
      size_t need = hl + (plen < 8 ? plen : 8);
      if (avail < need) break;
      const char *p8 = plen >= 8 ? c->rbuf + pos + hl : NULL;
      char tmp[8];
      if (p8 && masked) { for (int i = 0; i < 8; i++) tmp[i] = p8[i] ^ c->rbuf[pos + hl - 4 + (i & 3)]; p8 = tmp; }
      pos += hl;
      size_t k = avail - hl < plen ? avail - hl : plen;
      pos += k;
      if (k < plen) { c->skip = plen - k; c->skip_completes = 0; on_message(c, p8, plen, t); }  /* seq known already */
      else on_message(c, p8, plen, t);
      continue;
    }
    if (avail < hl) break;
    pos += hl;
    size_t k = c->rlen - pos < plen ? c->rlen - pos : plen;
    pos += k;
    if (k < plen) { c->skip = plen - k; c->skip_completes = data_end; c->skip_plen = plen; break; }
    if (data_end) on_message(c, NULL, plen, t);
  }
  if (pos) { memmove(c->rbuf, c->rbuf + pos, c->rlen - pos); c->rlen -= pos; }
}
static void parse_raw(conn_t *c, size_t n, uint64_t t) {
  if (c->role == R_SUB) {
    size_t pos = 0;
    while (c->rlen - pos >= o_size) { on_message(c, c->rbuf + pos, o_size, t); pos += o_size; }
    if (pos) { memmove(c->rbuf, c->rbuf + pos, c->rlen - pos); c->rlen -= pos; }
    return;
  }
  c->rlen = 0;
  c->raw_part += n;
  while (c->raw_part >= o_size) { c->raw_part -= o_size; on_message(c, NULL, o_size, t); }
}

static void on_open(conn_t *c) {
  c->state = ST_OPEN; pending_open--;
}

static void start_connect(conn_t *c) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  if (fd < 0) die("socket");
  int one = 1; setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(o_port)};
  inet_pton(AF_INET, o_host, &a.sin_addr);
  if (o_per_src > 0 && !strncmp(o_host, "127.", 4)) {
    /* past o_per_src connections, spread sources over 127.0.0.2, .3, ... (ephemeral ports run out per address) */
    long idx = (long)(c - conns), k = idx / o_per_src;
    if (k > 0) {
      struct sockaddr_in s = {.sin_family = AF_INET, .sin_port = 0};
      s.sin_addr.s_addr = htonl(0x7f000001u + (uint32_t)k);
      if (bind(fd, (struct sockaddr *)&s, sizeof s) < 0) die("bind source");
    }
  }
  c->fd = fd; c->state = ST_CONNECTING; pending_open++; c->t_start = now_ns();
  struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.ptr = c};
  if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl add");
  c->wout = 1;
  if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0 && errno != EINPROGRESS) conn_fail(c, 0);
}

static void handle(conn_t *c, uint32_t evs, uint64_t t) {
  if (c->state == ST_CONNECTING) {
    if (!(evs & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
    int err = 0; socklen_t l = sizeof err; getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
    if (err) { conn_fail(c, 0); return; }
    const char *path = c->role == R_SUB ? o_sub_path : c->role == R_PUB ? o_pub_path : o_path;
    char req[512]; int n;
    if (o_raw) n = snprintf(req, sizeof req, "%s\n", path);
    else n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", path, o_host, o_port);
    if (send(c->fd, req, n, MSG_NOSIGNAL) != n) { conn_fail(c, 0); return; }
    if (o_raw) { on_open(c); ep_mod(c, 0); return; }
    c->state = ST_HANDSHAKE; ep_mod(c, 0);
    return;
  }
  if (evs & EPOLLIN) {
    for (int loops = 0; loops < 4; loops++) {
      if (c->rlen == c->rcap) { /* only possible in handshake / sub parse: grow */
        c->rcap *= 2; c->rbuf = realloc(c->rbuf, c->rcap);
      }
      ssize_t r = recv(c->fd, c->rbuf + c->rlen, c->rcap - c->rlen, 0);
      if (r == 0) { conn_fail(c, 1); return; }
      if (r < 0) { if (errno == EAGAIN) break; conn_fail(c, 0); return; }
      c->rlen += r;
      if (c->state == ST_HANDSHAKE) {
        char *e = memmem(c->rbuf, c->rlen, "\r\n\r\n", 4);
        if (!e) continue;
        if (c->rlen < 12 || memcmp(c->rbuf + 9, "101", 3) != 0) {
          fprintf(stderr, "handshake rejected: %.*s\n", (int)(c->rlen < 200 ? c->rlen : 200), c->rbuf);
          conn_fail(c, 0); return;
        }
        size_t hl = e + 4 - c->rbuf;
        memmove(c->rbuf, c->rbuf + hl, c->rlen - hl); c->rlen -= hl;
        on_open(c);
      }
      if (c->state == ST_OPEN) { if (o_raw) parse_raw(c, r, t); else parse_ws(c, t); }
      if (c->state != ST_OPEN) return;
      if ((size_t)r < c->rcap / 2) break;
    }
  }
  if (c->state == ST_OPEN) flush(c);
}

static void run_loop_until(uint64_t deadline, int (*done)(void)) {
  struct epoll_event evs[512];
  while (now_ns() < deadline) {
    if (done && done()) return;
    int n = epoll_wait(ep, evs, 512, 5);
    if (n < 0) { if (errno == EINTR) continue; die("epoll_wait"); }
    uint64_t t = now_ns();
    for (int i = 0; i < n; i++) handle(evs[i].data.ptr, evs[i].events, t);
    if (o_mode == M_BCAST && pubc && pubc->state == ST_OPEN && sending) {
      int any = 0;
      while (b_sent - b_completed < (uint64_t)o_window) { send_seq(pubc, b_sent++); any = 1; }
      if (any) flush(pubc);
    }
    if (o_stall > 0 && sending && last_progress && t > last_progress && t - last_progress > (uint64_t)(o_stall * 1e9)) {
      fprintf(stderr, "stall: no progress for %.1fs\n", o_stall); return;
    }
  }
}

/* connect conns[from..to) with bounded concurrency and deadline */
static int connect_all(int from, int to, uint64_t deadline) {
  int next = from;
  struct epoll_event evs[512];
  while (now_ns() < deadline) {
    while (next < to && pending_open < o_conc) start_connect(&conns[next++]);
    if (next == to && pending_open == 0) break;
    int n = epoll_wait(ep, evs, 512, 5);
    uint64_t t = now_ns();
    for (int i = 0; i < n; i++) handle(evs[i].data.ptr, evs[i].events, t);
  }
  int ok = 0;
  for (int i = from; i < to; i++) ok += conns[i].state == ST_OPEN;
  return ok;
}

static void alloc_conn(conn_t *c, int idx, int role, size_t rcap) {
  memset(c, 0, sizeof *c);
  c->idx = idx; c->role = role; c->fd = -1;
  c->rcap = rcap; c->rbuf = malloc(rcap);
  c->ocap = 0; c->obuf = NULL;
  if (role == R_ECHO) c->ts = calloc(o_window, sizeof(uint64_t));
}

static int verify_done(void) { return verified >= (uint64_t)nconns - errors - closed_by_peer; }

/* ---- churn mode ---- */
static uint64_t ch_started, ch_done, ch_missed;                  /* in the measured window */
static uint64_t ch_total_started, ch_total_done, ch_offered, ch_accepted, ch_compressed, ch_drain_timeouts;
static uint64_t ch_f_connect, ch_f_handshake, ch_f_echo, ch_f_close, ch_f_timeout;   /* failures, whole run */
static int *ch_free, ch_nfree, ch_inflight, ch_rejected_shown;

static void churn_release(conn_t *c) {
  if (c->fd >= 0) { close(c->fd); c->fd = -1; }     /* close() also leaves the epoll set */
  c->state = ST_NEW; ch_inflight--;
  ch_free[ch_nfree++] = c->idx;
}
static uint64_t *churn_stage_counter(conn_t *c) {
  switch (c->state) {
    case ST_CONNECTING: return &ch_f_connect;
    case ST_HANDSHAKE: return &ch_f_handshake;
    case ST_OPEN: return &ch_f_echo;
    default: return &ch_f_close;
  }
}
static void churn_fail(conn_t *c) { (*churn_stage_counter(c))++; churn_release(c); }

static int churn_send(conn_t *c, const void *p, size_t n) {     /* tiny writes on a fresh socket: all or fail */
  ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL);
  if (w != (ssize_t)n) { churn_fail(c); return -1; }
  return 0;
}

static void churn_start(uint64_t t) {
  conn_t *c = &conns[ch_free[--ch_nfree]];
  uint64_t seq = ch_total_started++;
  if (measuring) ch_started++;
  c->rlen = 0; c->olen = c->ooff = 0; c->skip = 0; c->wout = 1;
  c->deflate = (uint64_t)((seq + 1) * o_deflate_frac) > (uint64_t)(seq * o_deflate_frac);
  c->negotiated = c->compressed = 0;
  c->t_start = t; c->deadline = t + (uint64_t)(o_conn_timeout * 1e9);
  c->state = ST_CONNECTING; ch_inflight++;
  if (c->deflate) ch_offered++;
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  if (fd < 0) { churn_fail(c); return; }
  c->fd = fd;
  int one = 1; setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (o_churn_src > 1 && !strncmp(o_host, "127.", 4)) {
    /* rotate the source address; the port is picked at connect() for the whole 4-tuple */
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    struct sockaddr_in s = {.sin_family = AF_INET, .sin_port = 0};
    s.sin_addr.s_addr = htonl(0x7f000001u + (uint32_t)(seq % (uint64_t)o_churn_src));
    if (bind(fd, (struct sockaddr *)&s, sizeof s) < 0) { churn_fail(c); return; }
  }
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(o_port)};
  inet_pton(AF_INET, o_host, &a.sin_addr);
  struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.ptr = c};
  if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl add");
  if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0 && errno != EINPROGRESS) churn_fail(c);
}

/* Parse what c->rbuf holds; returns -1 when the connection was released. */
static int churn_parse(conn_t *c, uint64_t t) {
  if (c->state == ST_HANDSHAKE) {
    char *e = memmem(c->rbuf, c->rlen, "\r\n\r\n", 4);
    if (!e) { if (c->rlen > 8192) { churn_fail(c); return -1; } return 0; }
    if (c->rlen < 12 || memcmp(c->rbuf + 9, "101", 3) != 0) {
      if (!ch_rejected_shown++)
        fprintf(stderr, "handshake rejected: %.*s\n", (int)(c->rlen < 200 ? c->rlen : 200), c->rbuf);
      churn_fail(c); return -1;
    }
    size_t hl = e + 4 - c->rbuf;
    if (memmem(c->rbuf, hl, "permessage-deflate", 18)) {
      if (!c->deflate) { churn_fail(c); return -1; }          /* accepted but never offered */
      c->negotiated = 1; ch_accepted++;
    }
    memmove(c->rbuf, c->rbuf + hl, c->rlen - hl); c->rlen -= hl;
    c->state = ST_OPEN;
    if (churn_send(c, tmpl, tmpl_len) < 0) return -1;
  }
  size_t pos = 0;
  while (c->state == ST_OPEN || c->state == ST_CLOSING) {
    size_t avail = c->rlen - pos;
    if (avail < 2) break;
    unsigned char *h = (unsigned char *)c->rbuf + pos;
    int fin = h[0] & 0x80, rsv1 = h[0] & 0x40, op = h[0] & 15;
    uint64_t plen = h[1] & 127; size_t hl = 2;
    if (plen == 126) { if (avail < 4) break; plen = (h[2] << 8) | h[3]; hl = 4; }
    else if (plen == 127) { if (avail < 10) break; plen = 0; for (int i = 0; i < 8; i++) plen = (plen << 8) | h[2 + i]; hl = 10; }
    if (h[1] & 0x80) hl += 4;
    if (plen > (1 << 20)) { churn_fail(c); return -1; }
    if (avail < hl + plen) {
      if (hl + plen > c->rcap) { c->rcap = hl + plen; c->rbuf = realloc(c->rbuf, c->rcap); }
      break;
    }
    if (op == 9) {                                   /* ping -> pong (payload of a ping is < 126 bytes) */
      char fr[256]; fr[0] = (char)0x8a; fr[1] = (char)(0x80 | plen); memcpy(fr + 2, maskkey, 4);
      for (uint64_t i = 0; i < plen; i++) fr[6 + i] = (char)(c->rbuf[pos + hl + i] ^ maskkey[i & 3]);
      if (churn_send(c, fr, 6 + plen) < 0) return -1;
    } else if (op == 10) {
    } else if (c->state == ST_OPEN) {
      if (op != 1 || !fin || (rsv1 && !c->negotiated) || (!rsv1 && plen != o_size)) { churn_fail(c); return -1; }
      if (rsv1) { c->compressed = 1; ch_compressed++; }
      char fr[8] = {(char)0x88, (char)0x82};
      memcpy(fr + 2, maskkey, 4); fr[6] = (char)(0x03 ^ maskkey[0]); fr[7] = (char)(0xe8 ^ maskkey[1]);  /* 1000 */
      c->state = ST_CLOSING;
      if (churn_send(c, fr, 8) < 0) return -1;
    } else {                                         /* ST_CLOSING: the server's close frame, 1000 */
      if (op != 8 || plen < 2 || ((h[hl] << 8) | h[hl + 1]) != 1000) { churn_fail(c); return -1; }
      ch_total_done++;
      if (measuring) { ch_done++; hist_add(t - c->t_start); }
      last_progress = t;
      c->state = ST_DRAIN; c->deadline = t + 2000000000ULL;   /* the server closes TCP first */
    }
    pos += hl + plen;
  }
  if (pos) { memmove(c->rbuf, c->rbuf + pos, c->rlen - pos); c->rlen -= pos; }
  return 0;
}

static void churn_handle(conn_t *c, uint32_t evs, uint64_t t) {
  if (c->state == ST_NEW) return;                    /* released earlier in this batch */
  if (c->state == ST_CONNECTING) {
    if (!(evs & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
    int err = 0; socklen_t l = sizeof err; getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
    if (err) { churn_fail(c); return; }
    char req[512];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n%s\r\n", o_path, o_host,
                     o_port, c->deflate ? "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" : "");
    c->state = ST_HANDSHAKE;
    if (churn_send(c, req, n) < 0) return;
    ep_mod(c, 0);
    return;
  }
  int eof = 0;
  for (;;) {
    if (c->rlen == c->rcap) { c->rcap *= 2; c->rbuf = realloc(c->rbuf, c->rcap); }
    ssize_t r = recv(c->fd, c->rbuf + c->rlen, c->rcap - c->rlen, 0);
    if (r == 0) { eof = 1; break; }
    if (r < 0) { if (errno == EAGAIN) break; eof = 1; break; }
    c->rlen += r;
  }
  if (c->rlen && churn_parse(c, t) < 0) return;
  if (eof) { if (c->state == ST_DRAIN) churn_release(c); else churn_fail(c); }
}

static void churn_sweep(uint64_t t) {
  for (int i = 0; i < o_conc; i++) {
    conn_t *c = &conns[i];
    if (c->state == ST_NEW || t <= c->deadline) continue;
    if (c->state == ST_DRAIN) { ch_drain_timeouts++; churn_release(c); }
    else { ch_f_timeout++; churn_release(c); }
  }
}

static double run_churn(void) {
  conns = calloc(o_conc, sizeof(conn_t)); ch_free = calloc(o_conc, sizeof(int));
  for (int i = 0; i < o_conc; i++) { alloc_conn(&conns[i], i, R_ECHO, 4096); conns[i].state = ST_NEW; ch_free[ch_nfree++] = i; }
  nconns = o_conc;
  struct epoll_event evs[512];
  uint64_t t0 = now_ns(), t_start = t0 + (uint64_t)(o_warmup * 1e9), t_end = t_start + (uint64_t)(o_duration * 1e9);
  uint64_t issued = 0, next_sweep = t0, ms = 0, t = t0;
  int started = 0;
  while ((t = now_ns()) < t_end) {
    if (!started && t >= t_start) { started = 1; measuring = 1; ms = t; memset(hist, 0, HIST_N * sizeof(uint64_t)); printf("START\n"); fflush(stdout); }
    uint64_t due = (uint64_t)(o_rate * (double)(t - t0) / 1e9);
    if (due > issued + (uint64_t)o_rate) { if (measuring) ch_missed += due - issued - (uint64_t)o_rate; issued = due - (uint64_t)o_rate; }
    while (issued < due) {
      issued++;
      if (ch_nfree) churn_start(t); else if (measuring) ch_missed++;
    }
    int n = epoll_wait(ep, evs, 512, 1);
    if (n < 0) { if (errno == EINTR) continue; die("epoll_wait"); }
    t = now_ns();
    for (int i = 0; i < n; i++) churn_handle(evs[i].data.ptr, evs[i].events, t);
    if (t >= next_sweep) { churn_sweep(t); next_sweep = t + 50000000ULL; }
  }
  double meas_s = started ? (now_ns() - ms) / 1e9 : 0;
  measuring = 0;
  printf("END\n"); fflush(stdout);
  uint64_t drain_end = now_ns() + (uint64_t)((o_conn_timeout + 2.5) * 1e9);
  while (ch_inflight > 0 && (t = now_ns()) < drain_end) {      /* let the last connections finish */
    int n = epoll_wait(ep, evs, 512, 5);
    if (n < 0) { if (errno == EINTR) continue; die("epoll_wait"); }
    t = now_ns();
    for (int i = 0; i < n; i++) churn_handle(evs[i].data.ptr, evs[i].events, t);
    churn_sweep(t);
  }
  for (int i = 0; i < o_conc; i++) if (conns[i].state != ST_NEW) { ch_f_timeout++; churn_release(&conns[i]); }
  return meas_s;
}

static void churn_result(double meas_s) {
  uint64_t tot = 0; for (unsigned i = 0; i < HIST_N; i++) tot += hist[i];
  uint64_t failed = ch_f_connect + ch_f_handshake + ch_f_echo + ch_f_close + ch_f_timeout;
  printf("RESULT {\"mode\":\"churn\",\"status\":\"%s\",\"rate\":%.1f,\"deflate_fraction\":%.3f,\"size\":%zu,"
         "\"concurrency\":%d,\"measure_s\":%.3f,\"started\":%llu,\"completed\":%llu,\"missed\":%llu,"
         "\"started_per_s\":%.1f,\"completed_per_s\":%.1f,\"total_started\":%llu,\"total_completed\":%llu,"
         "\"failed\":%llu,\"failed_connect\":%llu,\"failed_handshake\":%llu,\"failed_echo\":%llu,\"failed_close\":%llu,"
         "\"failed_timeout\":%llu,\"drain_timeouts\":%llu,\"deflate_offered\":%llu,\"deflate_accepted\":%llu,"
         "\"compressed_echoes\":%llu,\"p50_us\":%.1f,\"p90_us\":%.1f,\"p99_us\":%.1f}\n",
         failed || ch_missed ? "failures" : "ok", o_rate, o_deflate_frac, o_size, o_conc, meas_s,
         (unsigned long long)ch_started, (unsigned long long)ch_done, (unsigned long long)ch_missed,
         meas_s > 0 ? ch_started / meas_s : 0, meas_s > 0 ? ch_done / meas_s : 0,
         (unsigned long long)ch_total_started, (unsigned long long)ch_total_done, (unsigned long long)failed,
         (unsigned long long)ch_f_connect, (unsigned long long)ch_f_handshake, (unsigned long long)ch_f_echo,
         (unsigned long long)ch_f_close, (unsigned long long)ch_f_timeout, (unsigned long long)ch_drain_timeouts,
         (unsigned long long)ch_offered, (unsigned long long)ch_accepted, (unsigned long long)ch_compressed,
         hist_pct(.5, tot), hist_pct(.9, tot), hist_pct(.99, tot));
  fflush(stdout);
}

int main(int argc, char **argv) {
  static struct option lo[] = {
    {"host", 1, 0, 'h'}, {"port", 1, 0, 'p'}, {"path", 1, 0, 'P'}, {"mode", 1, 0, 'm'},
    {"conns", 1, 0, 'c'}, {"window", 1, 0, 'w'}, {"size", 1, 0, 's'}, {"text", 0, 0, 't'},
    {"raw", 0, 0, 'r'}, {"warmup", 1, 0, 'W'}, {"duration", 1, 0, 'd'}, {"hold", 1, 0, 'H'},
    {"connect-timeout", 1, 0, 'T'}, {"concurrency", 1, 0, 'C'}, {"sub-path", 1, 0, 'S'},
    {"pub-path", 1, 0, 'U'}, {"stall", 1, 0, 'x'}, {"per-source", 1, 0, 'R'}, {"rate", 1, 0, 'a'},
    {"deflate-fraction", 1, 0, 'D'}, {"conn-timeout", 1, 0, 'o'}, {"churn-sources", 1, 0, 'n'}, {0, 0, 0, 0}};
  int o;
  while ((o = getopt_long(argc, argv, "", lo, NULL)) != -1) {
    switch (o) {
      case 'h': o_host = optarg; break; case 'p': o_port = atoi(optarg); break;
      case 'P': o_path = optarg; break;
      case 'm': o_mode = !strcmp(optarg, "broadcast") ? M_BCAST : !strcmp(optarg, "idle") ? M_IDLE
                       : !strcmp(optarg, "churn") ? M_CHURN : M_ECHO; break;
      case 'c': o_conns = atoi(optarg); break; case 'w': o_window = atoi(optarg); break;
      case 's': o_size = strtoull(optarg, 0, 10); break; case 't': o_text = 1; break;
      case 'r': o_raw = 1; break; case 'W': o_warmup = atof(optarg); break;
      case 'd': o_duration = atof(optarg); break; case 'H': o_hold = atof(optarg); break;
      case 'T': o_connect_timeout = atof(optarg); break; case 'C': o_conc = atoi(optarg); break;
      case 'S': o_sub_path = optarg; break; case 'U': o_pub_path = optarg; break;
      case 'x': o_stall = atof(optarg); break;
      case 'R': o_per_src = atol(optarg); break;
      case 'a': o_rate = atof(optarg); break; case 'D': o_deflate_frac = atof(optarg); break;
      case 'o': o_conn_timeout = atof(optarg); break; case 'n': o_churn_src = atoi(optarg); break;
      default: fprintf(stderr, "bad option\n"); return 2;
    }
  }
  if (o_window < 1 || o_window > RING / 2) { fprintf(stderr, "window out of range\n"); return 2; }
  if (o_mode == M_BCAST && o_size < 8) o_size = 8;
  if (o_mode == M_CHURN) {
    if (o_raw || o_rate <= 0 || o_rate > 1e6 || o_deflate_frac < 0 || o_deflate_frac > 1 || o_conc < 1 || o_size > 65535 ||
        o_churn_src < 1 || o_churn_src > 250) { fprintf(stderr, "churn: bad --rate/--deflate-fraction/--concurrency/--size\n"); return 2; }
    o_text = 1;
  }
  signal(SIGPIPE, SIG_IGN);
  struct rlimit rl; getrlimit(RLIMIT_NOFILE, &rl); rl.rlim_cur = rl.rlim_max; setrlimit(RLIMIT_NOFILE, &rl);
  ep = epoll_create1(0);
  hist = calloc(HIST_N, sizeof(uint64_t));
  build_template();
  size_t rcap = o_conns <= 4 ? (1 << 20) : (16 << 10);

  if (o_mode == M_CHURN) { churn_result(run_churn()); return 0; }

  uint64_t t0 = now_ns(), topen = 0;
  double open_s = 0;
  int ok;
  if (o_mode == M_BCAST) {
    nsubs = o_conns; nconns = nsubs + 1;
    conns = calloc(nconns, sizeof(conn_t));
    bdone = calloc(RING, sizeof(uint32_t));
    for (int i = 0; i < nsubs; i++) alloc_conn(&conns[i], i, R_SUB, 16 << 10);
    alloc_conn(&conns[nsubs], nsubs, R_PUB, 16 << 10);
    pubc = &conns[nsubs];
    ok = connect_all(0, nsubs, t0 + (uint64_t)(o_connect_timeout * 1e9));
    open_s = (now_ns() - t0) / 1e9;
    run_loop_until(now_ns() + 300000000ULL, NULL);   /* let the server register subscribers */
    ok += connect_all(nsubs, nconns, now_ns() + (uint64_t)(o_connect_timeout * 1e9));
  } else {
    nconns = o_conns;
    conns = calloc(nconns, sizeof(conn_t));
    for (int i = 0; i < nconns; i++) alloc_conn(&conns[i], i, R_ECHO, rcap);
    ok = connect_all(0, nconns, t0 + (uint64_t)(o_connect_timeout * 1e9));
    open_s = (now_ns() - t0) / 1e9;
  }
  topen = now_ns();
  if (ok < nconns) fprintf(stderr, "only %d/%d connections opened\n", ok, nconns);

  double meas_s = 0;
  const char *status = ok == nconns ? "ok" : "partial";
  if (o_mode == M_IDLE) {
    printf("READY open_s=%.3f conns=%d\n", open_s, ok); fflush(stdout);
    run_loop_until(topen + (uint64_t)(o_hold * 1e9), NULL);
    verifying = 1; sending = 0;
    uint64_t tv = now_ns();
    for (int i = 0; i < nconns; i++) if (conns[i].state == ST_OPEN) { send_msg(&conns[i], tv); flush(&conns[i]); }
    run_loop_until(tv + 30000000000ULL, verify_done);
    meas_s = (now_ns() - tv) / 1e9;
  } else if (ok > 0) {
    uint64_t t = now_ns(); last_progress = t;
    if (o_mode == M_ECHO)
      for (int i = 0; i < nconns; i++) if (conns[i].state == ST_OPEN) { for (int k = 0; k < o_window; k++) send_msg(&conns[i], t); flush(&conns[i]); }
    run_loop_until(t + (uint64_t)(o_warmup * 1e9), NULL);
    memset(hist, 0, HIST_N * sizeof(uint64_t));
    printf("START\n"); fflush(stdout);
    measuring = 1; uint64_t ms = now_ns(); last_progress = ms;
    run_loop_until(ms + (uint64_t)(o_duration * 1e9), NULL);
    meas_s = (now_ns() - ms) / 1e9;
    measuring = 0; sending = 0;
    printf("END\n"); fflush(stdout);
    if (meas_s < o_duration * 0.95) status = "stalled";
  }
  int still_open = 0;
  for (int i = 0; i < nconns; i++) still_open += conns[i].state == ST_OPEN;
  uint64_t tot = 0; for (unsigned i = 0; i < HIST_N; i++) tot += hist[i];
  printf("RESULT {\"mode\":\"%s\",\"raw\":%d,\"text\":%d,\"conns\":%d,\"window\":%d,\"size\":%zu,"
         "\"status\":\"%s\",\"opened\":%d,\"still_open\":%d,\"errors\":%llu,\"closed_by_peer\":%llu,\"open_s\":%.3f,\"measure_s\":%.3f,",
         o_mode == M_ECHO ? "echo" : o_mode == M_BCAST ? "broadcast" : "idle", o_raw, o_text, o_conns, o_window, o_size,
         status, ok, still_open, (unsigned long long)errors, (unsigned long long)closed_by_peer, open_s, meas_s);
  if (o_mode == M_ECHO)
    printf("\"msgs\":%llu,\"msgs_per_s\":%.1f,\"MB_per_s\":%.2f,\"p50_us\":%.1f,\"p90_us\":%.1f,\"p99_us\":%.1f,\"p999_us\":%.1f}\n",
           (unsigned long long)m_msgs, meas_s > 0 ? m_msgs / meas_s : 0, meas_s > 0 ? m_bytes / meas_s / 1e6 : 0,
           hist_pct(.5, tot), hist_pct(.9, tot), hist_pct(.99, tot), hist_pct(.999, tot));
  else if (o_mode == M_BCAST)
    printf("\"subs\":%d,\"deliveries\":%llu,\"deliveries_per_s\":%.1f,\"fanouts_per_s\":%.1f}\n", nsubs,
           (unsigned long long)m_deliv, meas_s > 0 ? m_deliv / meas_s : 0, meas_s > 0 ? m_fanouts / meas_s : 0);
  else
    printf("\"verified\":%llu,\"verify_s\":%.3f}\n", (unsigned long long)verified, meas_s);
  fflush(stdout);
  return 0;
}
