/*
 * knp-loadgen: a TCP new-connection load generator and sink for measuring how many new
 * connections per second get through the kube-network-policies dataplane (NFQUEUE agent).
 * It must never be the bottleneck, so everything is non-blocking, epoll-driven and allocation
 * free on the hot path.
 *
 *   knp-loadgen serve   --ports 80,81,8000-8010 [--bind ADDR[,ADDR...]] [--threads N]
 *   knp-loadgen connect --targets IP:PORT[,IP:PORT...] [--duration S] [--concurrency N]
 *                       [--timeout S] [--bind SRCIP[,SRCIP...]] [--threads N] [--json]
 *
 * What counts as a connection, and who is left with TIME_WAIT
 * ----------------------------------------------------------
 * A connection succeeds when the client's three-way handshake completes: the non-blocking
 * connect() reports EPOLLOUT and SO_ERROR is 0. That is exactly the event a network policy
 * decides (the SYN was let through and answered); the server application is not needed for it,
 * since the kernel finishes the handshake before accept(). The server still accepts and closes
 * at once, so its accept queue never fills (a full queue makes the kernel drop SYNs, which the
 * client would see as timeouts) and no per-connection state accumulates.
 *
 * The client closes every socket with SO_LINGER {1, 0}: close() sends a RST and frees the
 * socket and its ephemeral port immediately, so neither side keeps TIME_WAIT and the client
 * only ever holds `concurrency` ports, at any rate (28k ports would last < 0.5 s at 60k conn/s
 * if each sat 60 s in TIME_WAIT). This needs no sysctl: net.ipv4.tcp_tw_reuse is per network
 * namespace and may only be set in our own test namespaces, so the tool does not rely on it.
 * The server closes gracefully (FIN, never RST): a RST from the server racing ahead of the
 * client's EPOLLOUT handling would turn a good connection into ECONNRESET; a FIN leaves
 * SO_ERROR at 0. Whichever close happens first, the RST from the client ends both sides.
 * Rarely (about 1 in 10,000 here) a reused client port meets the server's previous socket for the
 * same 4-tuple (its close still in progress); it answers the SYN with an ACK, the client RSTs
 * it and Linux resends the SYN within a few ms: one extra SYN, a little latency, no failure.
 * With --bind, sockets set IP_BIND_ADDRESS_NO_PORT so the port is chosen at connect() time
 * per 4-tuple (a bind() to port 0 would otherwise reserve a port per source address).
 *
 * Client timing: CLOCK_MONOTONIC before connect() and when epoll_wait() returns the event;
 * latencies go into a log-linear histogram (64 linear sub-buckets per power of two of
 * nanoseconds: < 1.6 % error). A connection still pending after --timeout (default 1 s, just
 * before the kernel's first SYN retransmission) is closed and counted as a timeout. When the
 * duration ends, connections still in flight are closed and reported as "abandoned" only.
 *
 * Build: gcc -O2 -Wall -Wextra -Werror -o knp-loadgen loadgen.c -lpthread
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define MAX_EVENTS 256
#define ACCEPT_BURST 512
#define MAX_THREADS 64

static volatile sig_atomic_t g_stop;

static void on_signal(int sig) {
    (void)sig;
    g_stop = 1;
}

static void die(const char *fmt, ...) {
    va_list ap;
    fputs("knp-loadgen: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

static void usage_error(const char *fmt, ...) {
    va_list ap;
    fputs("knp-loadgen: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputs("\nusage: knp-loadgen serve --ports P[,P|P-Q...] [--bind ADDR[,ADDR...]] [--threads N]\n"
          "       knp-loadgen connect --targets IP:PORT[,...] [--duration S] [--concurrency N]\n"
          "                           [--timeout S] [--bind SRCIP[,...]] [--threads N] [--json]\n",
          stderr);
    exit(2);
}

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- addresses ---------------------------------------------------------------------------- */

struct endpoint {
    struct sockaddr_storage ss;
    socklen_t len;
    int family;
    char text[INET6_ADDRSTRLEN + 10];
};

/* Sets the port and the canonical text ("1.2.3.4:80", "[fd00::1]:80"). */
static void endpoint_set_port(struct endpoint *ep, int port) {
    char host[INET6_ADDRSTRLEN];
    if (ep->family == AF_INET6) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ep->ss;
        s6->sin6_port = htons((uint16_t)port);
        inet_ntop(AF_INET6, &s6->sin6_addr, host, sizeof host);
        snprintf(ep->text, sizeof ep->text, "[%s]:%d", host, port);
    } else {
        struct sockaddr_in *s4 = (struct sockaddr_in *)&ep->ss;
        s4->sin_port = htons((uint16_t)port);
        inet_ntop(AF_INET, &s4->sin_addr, host, sizeof host);
        snprintf(ep->text, sizeof ep->text, "%s:%d", host, port);
    }
}

/* Parses "1.2.3.4", "fd00::1", "[fd00::1]" (want_port 0) or "1.2.3.4:80", "[fd00::1]:80". */
static int parse_endpoint(const char *in, int want_port, struct endpoint *ep) {
    char buf[128];
    const char *host = buf;
    long port = 0;
    if (strlen(in) >= sizeof buf)
        return -1;
    strcpy(buf, in);
    char *portstr = NULL;
    if (buf[0] == '[') {
        char *close = strchr(buf, ']');
        if (!close)
            return -1;
        *close = '\0';
        host = buf + 1;
        if (close[1] == ':')
            portstr = close + 2;
        else if (close[1] != '\0')
            return -1;
    } else {
        char *colon = strrchr(buf, ':');
        if (colon && strchr(buf, ':') == colon) { /* exactly one colon: IPv4:port */
            *colon = '\0';
            portstr = colon + 1;
        }
    }
    if (want_port) {
        char *end;
        if (!portstr || !*portstr)
            return -1;
        errno = 0;
        port = strtol(portstr, &end, 10);
        if (errno || *end || port < 1 || port > 65535)
            return -1;
    } else if (portstr) {
        return -1;
    }
    memset(ep, 0, sizeof *ep);
    struct sockaddr_in *s4 = (struct sockaddr_in *)&ep->ss;
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ep->ss;
    if (inet_pton(AF_INET, host, &s4->sin_addr) == 1) {
        s4->sin_family = AF_INET;
        ep->len = sizeof *s4;
        ep->family = AF_INET;
    } else if (inet_pton(AF_INET6, host, &s6->sin6_addr) == 1) {
        s6->sin6_family = AF_INET6;
        ep->len = sizeof *s6;
        ep->family = AF_INET6;
    } else {
        return -1;
    }
    endpoint_set_port(ep, (int)port);
    return 0;
}

/* Splits a comma-separated list in place; returns the count (items point into s). */
static int split_commas(char *s, char **items, int max) {
    int n = 0;
    char *save = NULL;
    for (char *tok = strtok_r(s, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        if (n == max)
            usage_error("too many items in list (max %d)", max);
        items[n++] = tok;
    }
    return n;
}

static long parse_long(const char *s, const char *what, long lo, long hi) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || !*s || *end || v < lo || v > hi)
        usage_error("bad %s '%s' (expected an integer in %ld..%ld)", what, s, lo, hi);
    return v;
}

static double parse_seconds(const char *s, const char *what) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || !*s || *end || !(v > 0) || v > 86400)
        usage_error("bad %s '%s' (expected seconds > 0)", what, s);
    return v;
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void install_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal; /* no SA_RESTART: epoll_wait returns EINTR */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

/* ---- latency histogram (log-linear, nanoseconds) ------------------------------------------ */

#define HIST_SUB_BITS 6
#define HIST_SUB (1u << HIST_SUB_BITS)
#define HIST_BUCKETS ((65 - HIST_SUB_BITS) * HIST_SUB)

static inline unsigned hist_index(uint64_t v) {
    if (v < HIST_SUB)
        return (unsigned)v;
    unsigned shift = (unsigned)(63 - __builtin_clzll(v)) - HIST_SUB_BITS;
    return shift * HIST_SUB + (unsigned)(v >> shift);
}

static uint64_t hist_low(unsigned idx, uint64_t *width) {
    if (idx < 2 * HIST_SUB) {
        *width = 1;
        return idx;
    }
    unsigned shift = idx / HIST_SUB - 1;
    *width = (uint64_t)1 << shift;
    return (uint64_t)(idx - shift * HIST_SUB) << shift;
}

/* Value at quantile q: midpoint of the bucket holding the ceil(q*n)-th sample, capped at max. */
static uint64_t hist_quantile(const uint64_t *h, uint64_t n, uint64_t max, double q) {
    if (n == 0)
        return 0;
    uint64_t rank = (uint64_t)(q * (double)n);
    if ((double)rank < q * (double)n)
        rank++;
    if (rank < 1)
        rank = 1;
    uint64_t seen = 0;
    for (unsigned i = 0; i < HIST_BUCKETS; i++) {
        seen += h[i];
        if (seen >= rank) {
            uint64_t width, low = hist_low(i, &width);
            uint64_t v = low + (width - 1) / 2;
            return v < max ? v : max;
        }
    }
    return max;
}

/* ---- serve ---------------------------------------------------------------------------------- */

struct server {
    int nlisten;
    struct endpoint *addrs; /* nlisten (address, port) combinations */
    int backlog;
    int reuseport;
};

struct serve_thread {
    pthread_t th;
    const struct server *srv;
    int epfd;
    int *fds;
    uint64_t accepted;
};

static int open_listener(const struct endpoint *ep, int backlog, int reuseport, char *err, size_t errlen) {
    int fd = socket(ep->family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(err, errlen, "socket(%s): %s", ep->text, strerror(errno));
        return -1;
    }
    int one = 1, zero = 0;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) < 0) {
        snprintf(err, errlen, "SO_REUSEPORT(%s): %s", ep->text, strerror(errno));
        close(fd);
        return -1;
    }
    if (ep->family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)&ep->ss;
        if (IN6_IS_ADDR_UNSPECIFIED(&s6->sin6_addr)) /* "::" also accepts IPv4 */
            setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    }
    if (bind(fd, (const struct sockaddr *)&ep->ss, ep->len) < 0 || listen(fd, backlog) < 0) {
        snprintf(err, errlen, "bind/listen %s: %s", ep->text, strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

static void *serve_loop(void *arg) {
    struct serve_thread *t = arg;
    struct epoll_event evs[MAX_EVENTS];
    int emfile_reported = 0;
    while (!g_stop) {
        int n = epoll_wait(t->epfd, evs, MAX_EVENTS, 200);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait: %s", strerror(errno));
        }
        for (int i = 0; i < n; i++) {
            int lfd = evs[i].data.fd;
            for (int k = 0; k < ACCEPT_BURST; k++) {
                int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
                if (fd >= 0) {
                    close(fd); /* graceful FIN; the client's RST ends it (see header) */
                    t->accepted++;
                    continue;
                }
                if (errno == EINTR || errno == ECONNABORTED)
                    continue;
                if (errno != EAGAIN && errno != EWOULDBLOCK && !emfile_reported) {
                    fprintf(stderr, "knp-loadgen: accept4: %s\n", strerror(errno));
                    emfile_reported = 1;
                }
                break;
            }
        }
    }
    return NULL;
}

static int read_somaxconn(void) {
    int v = 0;
    FILE *f = fopen("/proc/sys/net/core/somaxconn", "r");
    if (f) {
        if (fscanf(f, "%d", &v) != 1)
            v = 0;
        fclose(f);
    }
    return v > 0 ? v : 4096;
}

static int add_port_range(const char *item, int *ports, int n, int max) {
    char buf[32];
    if (strlen(item) >= sizeof buf)
        usage_error("bad port '%s'", item);
    strcpy(buf, item);
    char *dash = strchr(buf, '-');
    long lo, hi;
    if (dash) {
        *dash = '\0';
        lo = parse_long(buf, "port", 1, 65535);
        hi = parse_long(dash + 1, "port", 1, 65535);
        if (hi < lo)
            usage_error("bad port range '%s'", item);
    } else {
        lo = hi = parse_long(buf, "port", 1, 65535);
    }
    for (long p = lo; p <= hi; p++) {
        if (n == max)
            usage_error("too many ports (max %d)", max);
        ports[n++] = (int)p;
    }
    return n;
}

static int cmd_serve(int argc, char **argv) {
    char *ports_arg = NULL, *bind_arg = NULL;
    long threads = 1;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc)
            usage_error("option '%s' needs a value or is unknown", a);
        if (!strcmp(a, "--ports"))
            ports_arg = argv[++i];
        else if (!strcmp(a, "--bind"))
            bind_arg = argv[++i];
        else if (!strcmp(a, "--threads"))
            threads = parse_long(argv[++i], "--threads", 1, MAX_THREADS);
        else
            usage_error("unknown serve option '%s'", a);
    }
    if (!ports_arg)
        usage_error("serve needs --ports");

    enum { MAXP = 4096, MAXB = 64 };
    static int ports[MAXP];
    char *items[MAXP];
    int nports = 0;
    int nitems = split_commas(ports_arg, items, MAXP);
    for (int i = 0; i < nitems; i++)
        nports = add_port_range(items[i], ports, nports, MAXP);
    if (nports == 0)
        usage_error("--ports is empty");

    struct endpoint binds[MAXB];
    int nbinds = 0;
    if (bind_arg) {
        char *b[MAXB];
        int nb = split_commas(bind_arg, b, MAXB);
        for (int i = 0; i < nb; i++)
            if (parse_endpoint(b[i], 0, &binds[nbinds++]) < 0)
                usage_error("bad --bind address '%s'", b[i]);
    } else {
        /* Dual-stack "::" unless the kernel has no IPv6, then 0.0.0.0. */
        int probe = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
        parse_endpoint(probe >= 0 ? "::" : "0.0.0.0", 0, &binds[nbinds++]);
        if (probe >= 0)
            close(probe);
    }
    if (nbinds == 0)
        usage_error("--bind is empty");

    struct server srv = {0};
    srv.nlisten = nbinds * nports;
    srv.addrs = calloc((size_t)srv.nlisten, sizeof *srv.addrs);
    if (!srv.addrs)
        die("out of memory");
    for (int b = 0; b < nbinds; b++)
        for (int p = 0; p < nports; p++) {
            struct endpoint *ep = &srv.addrs[b * nports + p];
            *ep = binds[b];
            endpoint_set_port(ep, ports[p]);
        }
    srv.backlog = read_somaxconn(); /* listen() caps the backlog at somaxconn anyway */
    srv.reuseport = threads > 1;

    raise_nofile();
    install_signals();
    struct serve_thread *ts = calloc((size_t)threads, sizeof *ts);
    if (!ts)
        die("out of memory");
    char err[256];
    for (long t = 0; t < threads; t++) {
        ts[t].srv = &srv;
        ts[t].epfd = epoll_create1(EPOLL_CLOEXEC);
        ts[t].fds = calloc((size_t)srv.nlisten, sizeof(int));
        if (ts[t].epfd < 0 || !ts[t].fds)
            die("epoll_create1: %s", strerror(errno));
        for (int i = 0; i < srv.nlisten; i++) {
            int fd = open_listener(&srv.addrs[i], srv.backlog, srv.reuseport, err, sizeof err);
            if (fd < 0)
                die("%s", err);
            struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
            if (epoll_ctl(ts[t].epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
                die("epoll_ctl: %s", strerror(errno));
            ts[t].fds[i] = fd;
        }
    }
    /* One readiness line (the only output before exit): callers wait for it. */
    printf("{\"listening\": [");
    for (int i = 0; i < srv.nlisten; i++)
        printf("%s\"%s\"", i ? ", " : "", srv.addrs[i].text);
    printf("], \"backlog\": %d, \"threads\": %ld, \"pid\": %d}\n", srv.backlog, threads, (int)getpid());
    fflush(stdout);

    for (long t = 1; t < threads; t++)
        if (pthread_create(&ts[t].th, NULL, serve_loop, &ts[t]) != 0)
            die("pthread_create failed");
    serve_loop(&ts[0]);
    uint64_t accepted = ts[0].accepted;
    for (long t = 1; t < threads; t++) {
        pthread_join(ts[t].th, NULL);
        accepted += ts[t].accepted;
    }
    printf("{\"accepted\": %llu}\n", (unsigned long long)accepted);
    fflush(stdout);
    for (long t = 0; t < threads; t++) {
        for (int i = 0; i < srv.nlisten; i++)
            close(ts[t].fds[i]);
        close(ts[t].epfd);
        free(ts[t].fds);
    }
    free(ts);
    free(srv.addrs);
    return 0;
}

/* ---- connect -------------------------------------------------------------------------------- */

struct pair {
    const struct endpoint *dst;
    const struct endpoint *src; /* NULL: let connect() pick the source */
};

enum fail_kind { F_REFUSED, F_UNREACHABLE, F_RESET, F_LOCAL, F_OTHER, F_KINDS };
static const char *const fail_names[F_KINDS] = {"refused", "unreachable", "reset", "local", "other"};

struct slot {
    int fd; /* -1: free */
    uint32_t gen;
    uint64_t start;
    int prev, next; /* pending list, oldest first (one timeout for all => sorted by start) */
};

struct worker {
    pthread_t th;
    int id, concurrency;
    const struct pair *pairs;
    size_t npairs, rr;
    uint64_t timeout_ns, deadline;
    int epfd;
    struct slot *slots;
    int head, tail;
    int *freeq;
    int nfree;
    uint64_t ok, timeouts, abandoned, attempts, max_ns, sum_ns;
    uint64_t fails[F_KINDS];
    uint64_t end;
    uint64_t hist[HIST_BUCKETS];
};

static enum fail_kind classify(int err) {
    switch (err) {
    case ECONNREFUSED:
        return F_REFUSED;
    case EHOSTUNREACH:
    case ENETUNREACH:
    case EHOSTDOWN:
    case ENETDOWN:
        return F_UNREACHABLE;
    case ECONNRESET:
        return F_RESET;
    case EADDRNOTAVAIL:
    case EADDRINUSE:
    case EAGAIN:
    case EMFILE:
    case ENFILE:
    case ENOBUFS:
    case ENOMEM:
    case EPERM:
        return F_LOCAL;
    default:
        return F_OTHER;
    }
}

static inline void list_append(struct worker *w, int i) {
    struct slot *s = &w->slots[i];
    s->prev = w->tail;
    s->next = -1;
    if (w->tail >= 0)
        w->slots[w->tail].next = i;
    else
        w->head = i;
    w->tail = i;
}

static inline void list_remove(struct worker *w, int i) {
    struct slot *s = &w->slots[i];
    if (s->prev >= 0)
        w->slots[s->prev].next = s->next;
    else
        w->head = s->next;
    if (s->next >= 0)
        w->slots[s->next].prev = s->prev;
    else
        w->tail = s->prev;
}

static inline void record_ok(struct worker *w, uint64_t ns) {
    w->ok++;
    w->sum_ns += ns;
    if (ns > w->max_ns)
        w->max_ns = ns;
    w->hist[hist_index(ns)]++;
}

/* Ends slot i's connection (RST via SO_LINGER {1,0}) and queues the slot for a new one. */
static inline void finish(struct worker *w, int i) {
    struct slot *s = &w->slots[i];
    close(s->fd); /* also removes it from the epoll set */
    s->fd = -1;
    list_remove(w, i);
    w->freeq[w->nfree++] = i;
}

/* Starts a connection in free slot i; on an immediate result the slot goes back to freeq. */
static void start_conn(struct worker *w, int i) {
    const struct pair *p = &w->pairs[w->rr];
    if (++w->rr == w->npairs)
        w->rr = 0;
    struct slot *s = &w->slots[i];
    w->attempts++;
    int fd = socket(p->dst->family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        w->fails[classify(errno)]++;
        w->freeq[w->nfree++] = i;
        return;
    }
    static const struct linger rst = {.l_onoff = 1, .l_linger = 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &rst, sizeof rst);
    if (p->src) {
        int one = 1;
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (const struct sockaddr *)&p->src->ss, p->src->len) < 0) {
            w->fails[classify(errno)]++;
            close(fd);
            w->freeq[w->nfree++] = i;
            return;
        }
    }
    uint64_t t0 = now_ns();
    if (connect(fd, (const struct sockaddr *)&p->dst->ss, p->dst->len) == 0) {
        record_ok(w, now_ns() - t0);
        close(fd);
        w->freeq[w->nfree++] = i;
        return;
    }
    if (errno != EINPROGRESS) {
        w->fails[classify(errno)]++;
        close(fd);
        w->freeq[w->nfree++] = i;
        return;
    }
    s->gen++;
    struct epoll_event ev = {.events = EPOLLOUT, .data.u64 = ((uint64_t)s->gen << 32) | (uint32_t)i};
    if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
        die("epoll_ctl: %s", strerror(errno));
    s->fd = fd;
    s->start = t0;
    list_append(w, i);
}

/* Retries every queued free slot once (slots that fail again are re-queued in place). */
static void refill(struct worker *w) {
    int n = w->nfree;
    w->nfree = 0;
    for (int k = 0; k < n; k++) {
        int i = w->freeq[k]; /* read before start_conn may write freeq[nfree], nfree <= k */
        start_conn(w, i);
    }
}

static void *connect_loop(void *arg) {
    struct worker *w = arg;
    struct epoll_event evs[MAX_EVENTS];
    w->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (w->epfd < 0)
        die("epoll_create1: %s", strerror(errno));
    w->slots = calloc((size_t)w->concurrency, sizeof *w->slots);
    w->freeq = calloc((size_t)w->concurrency, sizeof *w->freeq);
    if (!w->slots || !w->freeq)
        die("out of memory");
    w->head = w->tail = -1;
    for (int i = 0; i < w->concurrency; i++) {
        w->slots[i].fd = -1;
        w->freeq[w->nfree++] = i;
    }
    for (;;) {
        refill(w);
        uint64_t now = now_ns();
        if (g_stop || now >= w->deadline)
            break;
        /* Expire the oldest pending connects; refill() restarts their slots. */
        while (w->head >= 0 && w->slots[w->head].start + w->timeout_ns <= now) {
            w->timeouts++;
            finish(w, w->head);
        }
        uint64_t wake = w->deadline;
        if (w->head >= 0 && w->slots[w->head].start + w->timeout_ns < wake)
            wake = w->slots[w->head].start + w->timeout_ns;
        uint64_t ms = (wake - now + 999999) / 1000000;
        if (ms > 100)
            ms = 100; /* notice signals promptly */
        if (w->nfree)
            ms = 0; /* slots whose connect failed at once: just poll, then retry them */
        int n = epoll_wait(w->epfd, evs, MAX_EVENTS, (int)ms);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait: %s", strerror(errno));
        }
        uint64_t t = now_ns(); /* one timestamp per wakeup: when the kernel reported them */
        for (int e = 0; e < n; e++) {
            int i = (int)(uint32_t)evs[e].data.u64;
            struct slot *s = &w->slots[i];
            if (s->fd < 0 || s->gen != (uint32_t)(evs[e].data.u64 >> 32))
                continue;
            int err = 0;
            socklen_t len = sizeof err;
            if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
                err = errno;
            if (err == 0 && (evs[e].events & EPOLLOUT))
                record_ok(w, t - s->start);
            else if (err == ETIMEDOUT)
                w->timeouts++;
            else
                w->fails[err ? classify(err) : F_OTHER]++;
            finish(w, i);
        }
    }
    w->end = now_ns();
    while (w->head >= 0) {
        w->abandoned++;
        int i = w->head;
        close(w->slots[i].fd);
        w->slots[i].fd = -1;
        list_remove(w, i);
    }
    close(w->epfd);
    return NULL;
}

static int cmd_connect(int argc, char **argv) {
    char *targets_arg = NULL, *bind_arg = NULL;
    double duration = 5, timeout = 1;
    long concurrency = 64, threads = 1;
    int json = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--json")) {
            json = 1;
            continue;
        }
        if (i + 1 >= argc)
            usage_error("option '%s' needs a value or is unknown", a);
        if (!strcmp(a, "--targets"))
            targets_arg = argv[++i];
        else if (!strcmp(a, "--bind"))
            bind_arg = argv[++i];
        else if (!strcmp(a, "--duration"))
            duration = parse_seconds(argv[++i], "--duration");
        else if (!strcmp(a, "--timeout"))
            timeout = parse_seconds(argv[++i], "--timeout");
        else if (!strcmp(a, "--concurrency"))
            concurrency = parse_long(argv[++i], "--concurrency", 1, 1000000);
        else if (!strcmp(a, "--threads"))
            threads = parse_long(argv[++i], "--threads", 1, MAX_THREADS);
        else
            usage_error("unknown connect option '%s'", a);
    }
    if (!targets_arg)
        usage_error("connect needs --targets");

    enum { MAXT = 4096, MAXB = 256 };
    static struct endpoint dsts[MAXT], srcs[MAXB];
    char *items[MAXT];
    int ndst = split_commas(targets_arg, items, MAXT);
    for (int i = 0; i < ndst; i++)
        if (parse_endpoint(items[i], 1, &dsts[i]) < 0)
            usage_error("bad target '%s' (want IPv4:PORT or [IPv6]:PORT)", items[i]);
    if (ndst == 0)
        usage_error("--targets is empty");
    int nsrc = 0;
    if (bind_arg) {
        nsrc = split_commas(bind_arg, items, MAXB);
        for (int i = 0; i < nsrc; i++)
            if (parse_endpoint(items[i], 0, &srcs[i]) < 0)
                usage_error("bad --bind address '%s'", items[i]);
    }
    /* Every (target, source of the same family) combination, target-major. */
    struct pair *pairs = calloc((size_t)ndst * (size_t)(nsrc ? nsrc : 1), sizeof *pairs);
    if (!pairs)
        die("out of memory");
    size_t npairs = 0;
    for (int d = 0; d < ndst; d++) {
        if (!nsrc) {
            pairs[npairs++] = (struct pair){&dsts[d], NULL};
            continue;
        }
        size_t before = npairs;
        for (int s = 0; s < nsrc; s++)
            if (srcs[s].family == dsts[d].family)
                pairs[npairs++] = (struct pair){&dsts[d], &srcs[s]};
        if (npairs == before)
            usage_error("no --bind address of the same family as target %s", dsts[d].text);
    }

    if (threads > concurrency)
        threads = concurrency;
    raise_nofile();
    install_signals();
    static struct worker ws[MAX_THREADS]; /* large (histograms): keep off the stack */
    uint64_t start = now_ns();
    uint64_t deadline = start + (uint64_t)(duration * 1e9);
    for (long t = 0; t < threads; t++) {
        struct worker *w = &ws[t];
        w->id = (int)t;
        w->concurrency = (int)(concurrency / threads + (t < concurrency % threads));
        w->pairs = pairs;
        w->npairs = npairs;
        w->rr = (size_t)t % npairs;
        w->timeout_ns = (uint64_t)(timeout * 1e9);
        w->deadline = deadline;
        if (t > 0 && pthread_create(&w->th, NULL, connect_loop, w) != 0)
            die("pthread_create failed");
    }
    connect_loop(&ws[0]);
    for (long t = 1; t < threads; t++)
        pthread_join(ws[t].th, NULL);

    /* Merge. */
    static uint64_t hist[HIST_BUCKETS];
    uint64_t ok = 0, timeouts = 0, abandoned = 0, attempts = 0, max_ns = 0, sum_ns = 0, end = start;
    uint64_t fails[F_KINDS] = {0}, failures = 0;
    for (long t = 0; t < threads; t++) {
        struct worker *w = &ws[t];
        ok += w->ok;
        timeouts += w->timeouts;
        abandoned += w->abandoned;
        attempts += w->attempts;
        sum_ns += w->sum_ns;
        if (w->max_ns > max_ns)
            max_ns = w->max_ns;
        if (w->end > end)
            end = w->end;
        for (int k = 0; k < F_KINDS; k++) {
            fails[k] += w->fails[k];
            failures += w->fails[k];
        }
        for (unsigned b = 0; b < HIST_BUCKETS; b++)
            hist[b] += w->hist[b];
    }
    double secs = (double)(end - start) / 1e9;
    double rate = secs > 0 ? (double)ok / secs : 0;
    double p50 = hist_quantile(hist, ok, max_ns, 0.50) / 1e3;
    double p90 = hist_quantile(hist, ok, max_ns, 0.90) / 1e3;
    double p99 = hist_quantile(hist, ok, max_ns, 0.99) / 1e3;
    double p999 = hist_quantile(hist, ok, max_ns, 0.999) / 1e3;
    double mean = ok ? (double)sum_ns / (double)ok / 1e3 : 0;
    double maxu = (double)max_ns / 1e3;
    if (json) {
        printf("{\"connections\": %llu, \"failures\": %llu, \"timeouts\": %llu, \"seconds\": %.3f, "
               "\"conn_per_s\": %.1f, \"latency_us\": {\"p50\": %.1f, \"p90\": %.1f, \"p99\": %.1f, "
               "\"p999\": %.1f, \"max\": %.1f, \"mean\": %.1f}, \"failure_kinds\": {",
               (unsigned long long)ok, (unsigned long long)failures, (unsigned long long)timeouts, secs,
               rate, p50, p90, p99, p999, maxu, mean);
        for (int k = 0; k < F_KINDS; k++)
            printf("%s\"%s\": %llu", k ? ", " : "", fail_names[k], (unsigned long long)fails[k]);
        printf("}, \"attempts\": %llu, \"abandoned\": %llu, \"concurrency\": %ld, \"threads\": %ld, "
               "\"pairs\": %zu, \"timeout_s\": %.3f, \"interrupted\": %s}\n",
               (unsigned long long)attempts, (unsigned long long)abandoned, concurrency, threads, npairs,
               timeout, g_stop ? "true" : "false");
    } else {
        printf("connections  %llu in %.3f s = %.0f conn/s (concurrency %ld, %ld thread%s, %zu pair%s)\n",
               (unsigned long long)ok, secs, rate, concurrency, threads, threads == 1 ? "" : "s", npairs,
               npairs == 1 ? "" : "s");
        printf("failures     %llu (", (unsigned long long)failures);
        for (int k = 0; k < F_KINDS; k++)
            printf("%s%s %llu", k ? ", " : "", fail_names[k], (unsigned long long)fails[k]);
        printf(")\ntimeouts     %llu (> %.3f s); abandoned at the end: %llu\n", (unsigned long long)timeouts,
               timeout, (unsigned long long)abandoned);
        printf("latency us   p50 %.1f  p90 %.1f  p99 %.1f  p99.9 %.1f  max %.1f  mean %.1f\n", p50, p90, p99,
               p999, maxu, mean);
    }
    fflush(stdout);
    for (long t = 0; t < threads; t++) {
        free(ws[t].slots);
        free(ws[t].freeq);
    }
    free(pairs);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2)
        usage_error("missing mode");
    if (!strcmp(argv[1], "serve"))
        return cmd_serve(argc - 2, argv + 2);
    if (!strcmp(argv[1], "connect"))
        return cmd_connect(argc - 2, argv + 2);
    if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        printf("knp-loadgen serve | connect; see the comment at the top of loadgen.c\n");
        return 0;
    }
    usage_error("unknown mode '%s'", argv[1]);
    return 2;
}
