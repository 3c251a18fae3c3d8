/* The DATA phase of TFTP read transfers, run by a thread of its own, outside Python's interpreter lock.
 *
 * bootfiles/tftp_native.py loads this file's shared object with ctypes. The Python server keeps
 * everything a transfer's start decides (decode, policy, the tree, option negotiation, the OACK's bytes);
 * `cello_pump_start` takes over from there: it sends the first datagram (OACK or DATA 1) in the caller's
 * thread, then this library's thread answers the client's ACKs, retransmits on timeout with the same
 * back-off as bootfiles/tftp_transfer.SendTransfer, answers strangers with error 5 and, at the end,
 * closes the transfer's socket and queues a completion that the event loop collects through an eventfd.
 *
 * The state machine is SendTransfer's, rule for rule (RFC 1350 as fixed by RFC 1123 §4.2.3.1: no
 * retransmission on a duplicate ACK; RFC 2347 OACK; RFC 7440 windows; 16-bit block numbers rolling
 * over), so that the two engines are interchangeable; the tests drive both with the same clients.
 *
 * Why C: per block the Python engine's system calls are most of its time, but the rest (about a fifth)
 * and the interpreter lock held meanwhile put every block of every transfer in line behind the event
 * loop's other work and behind each other; here a block costs its two system calls, on a core of its own.
 * Linux only (epoll, eventfd); elsewhere the Python engine serves.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define OP_DATA 3
#define OP_ACK 4
#define OP_ERROR 5
#define MAX_BLKSIZE 65464
#define SCAN_NS 5000000LL /* timers are looked at every 5 ms: they count in seconds */
#define EVENTS 256
/* In a storm (more than SPIN_MIN transfers running) the thread polls on for SPIN_NS after its last
 * datagram before it sleeps. A lock-step client's next ACK comes within microseconds, and one that finds
 * the thread asleep waits for it to be woken (and on loopback pays for the waking: 7 % more of the
 * client's time per block, bench/tftp_bench.py, where the clients set the pace). A few transfers never
 * cost a spinning core. */
#define SPIN_NS 50000LL
#define SPIN_MIN 8

enum { ST_OACK = 0, ST_DATA = 1 };
enum { OUT_OK = 0, OUT_TSIZE_PROBE = 1, OUT_ABORTED = 2, OUT_TIMEOUT = 3, OUT_ERROR = 4 };

/* What Python passes to start a transfer (mirrored by a ctypes Structure in tftp_native.py). */
struct cello_pump_params {
    uint64_t id;
    int32_t fd;          /* the transfer's socket (its port is the TID); the pump closes it at the end */
    int32_t file_fd;     /* read with pread when data is NULL; never closed here */
    const uint8_t *data; /* the whole file in memory, kept alive by the caller until the completion */
    int64_t size;
    uint32_t blksize;
    uint32_t windowsize;
    double timeout;
    int32_t timeout_from_client;
    int32_t max_retries;
    double backoff_max;
    const uint8_t *oack; /* copied; oack_len 0: no OACK, DATA 1 goes first */
    uint32_t oack_len;
    int32_t tsize_accepted;
    int32_t family;
    uint32_t scope_id;
    uint16_t port;
    char host[64];
};

struct cello_pump_done {
    uint64_t id;
    int32_t outcome;
    uint32_t retransmissions;
    int64_t bytes_acked;
    char error[112];
};

typedef struct transfer {
    struct transfer *prev, *next; /* the pump thread's list (timer scans, shutdown) */
    struct transfer *pending;     /* the hand-over list from the starting thread */
    uint64_t id;
    int fd, file_fd;
    struct sockaddr_storage peer;
    socklen_t peer_len;
    const uint8_t *data;
    int64_t size, total_blocks, acked, sent_upto, deadline;
    uint32_t blksize, windowsize, retransmissions;
    int state, retries, max_retries, timeout_from_client, tsize_accepted;
    double base_timeout, timeout, backoff_max;
    uint8_t *oack;
    uint32_t oack_len;
} transfer_t;

typedef struct pump {
    int epfd, notify_fd, wake_fd;
    pthread_t thread;
    pthread_mutex_t lock;           /* guards pending and the completions */
    int running;                    /* transfers on the thread's list (the thread's own) */
    transfer_t *pending;
    transfer_t head;                /* the pump thread's own list, sentinel */
    struct cello_pump_done *done;
    size_t n_done, cap_done;
    atomic_int idle;                /* the thread sleeps with no timer: a start must wake it */
    atomic_int abort_all, quit;
    char abort_reason[96];
    uint8_t buf[4 + MAX_BLKSIZE];   /* the thread's send buffer */
    uint8_t rbuf[65536];
    uint8_t drain[8];               /* the starting thread's (one at a time: the event loop's) */
} pump_t;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void put16(uint8_t *p, unsigned v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static void send_to_peer(transfer_t *t, const uint8_t *buf, size_t len) {
    /* A send that would block is as good as lost on the wire: the retransmission timer recovers. */
    (void)sendto(t->fd, buf, len, MSG_DONTWAIT, (const struct sockaddr *)&t->peer, t->peer_len);
}

static void send_error(int fd, const struct sockaddr *to, socklen_t to_len, unsigned code, const char *msg) {
    uint8_t pkt[128];
    size_t n = strnlen(msg, sizeof pkt - 5);
    put16(pkt, OP_ERROR);
    put16(pkt + 2, code);
    memcpy(pkt + 4, msg, n);
    pkt[4 + n] = 0;
    (void)sendto(fd, pkt, n + 5, MSG_DONTWAIT, to, to_len);
}

/* Blocks acked+1 .. acked+windowsize (at most the last), from `buf`. 0, or -1 when the file cannot be read. */
static int send_window(transfer_t *t, uint8_t *buf, int64_t now) {
    int64_t last = t->acked + t->windowsize;
    if (last > t->total_blocks) last = t->total_blocks;
    for (int64_t block = t->acked + 1; block <= last; block++) {
        int64_t offset = (block - 1) * (int64_t)t->blksize;
        int64_t len = t->size - offset;
        if (len > t->blksize) len = t->blksize;
        if (len < 0) len = 0;
        put16(buf, OP_DATA);
        put16(buf + 2, (unsigned)(block & 0xFFFF));
        if (t->data != NULL) {
            memcpy(buf + 4, t->data + offset, (size_t)len);
        } else if (len > 0) {
            ssize_t got = pread(t->file_fd, buf + 4, (size_t)len, offset);
            if (got < 0) return -1;
            len = got; /* a file cut short under us: what is there, as the Python engine's pread */
        }
        send_to_peer(t, buf, (size_t)len + 4);
    }
    if (last > t->sent_upto) t->sent_upto = last;
    t->deadline = now + (int64_t)(t->timeout * 1e9);
    return 0;
}

static void send_oack(transfer_t *t, int64_t now) {
    send_to_peer(t, t->oack, t->oack_len);
    t->deadline = now + (int64_t)(t->timeout * 1e9);
}

static double current_timeout(const transfer_t *t) {
    if (t->retries == 0 || t->timeout_from_client) return t->base_timeout;
    double grown = t->base_timeout * (double)(1u << (t->retries < 16 ? t->retries : 16));
    double cap = t->backoff_max > t->base_timeout ? t->backoff_max : t->base_timeout;
    return grown < cap ? grown : cap;
}

static void unlink_transfer(pump_t *p, transfer_t *t) {
    if (t->prev != NULL) {
        p->running--;
        t->prev->next = t->next;
        t->next->prev = t->prev;
        t->prev = t->next = NULL;
    }
}

/* The end of a transfer: its socket closed, its completion queued, the event loop told. */
static void finish(pump_t *p, transfer_t *t, int outcome, const char *error) {
    struct cello_pump_done d;
    memset(&d, 0, sizeof d);
    d.id = t->id;
    d.outcome = outcome;
    d.retransmissions = t->retransmissions;
    int64_t bytes = t->acked * (int64_t)t->blksize;
    d.bytes_acked = bytes < t->size ? bytes : t->size;
    if (error != NULL) snprintf(d.error, sizeof d.error, "%s", error);
    epoll_ctl(p->epfd, EPOLL_CTL_DEL, t->fd, NULL);
    close(t->fd);
    unlink_transfer(p, t);
    free(t->oack);
    free(t);
    pthread_mutex_lock(&p->lock);
    if (p->n_done == p->cap_done) {
        size_t cap = p->cap_done ? p->cap_done * 2 : 64;
        struct cello_pump_done *grown = realloc(p->done, cap * sizeof *grown);
        if (grown != NULL) {
            p->done = grown;
            p->cap_done = cap;
        }
    }
    if (p->n_done < p->cap_done) p->done[p->n_done++] = d; /* out of memory: the completion is lost */
    pthread_mutex_unlock(&p->lock);
    uint64_t one = 1;
    (void)!write(p->notify_fd, &one, sizeof one);
}

static int same_peer(const transfer_t *t, const struct sockaddr_storage *from) {
    if (from->ss_family != t->peer.ss_family) return 0;
    if (from->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const void *)from, *b = (const void *)&t->peer;
        return a->sin_port == b->sin_port && a->sin_addr.s_addr == b->sin_addr.s_addr;
    }
    const struct sockaddr_in6 *a = (const void *)from, *b = (const void *)&t->peer;
    return a->sin6_port == b->sin6_port && memcmp(&a->sin6_addr, &b->sin6_addr, sizeof a->sin6_addr) == 0;
}

static void on_ack(pump_t *p, transfer_t *t, unsigned block, int64_t now) {
    if (t->state == ST_OACK) {
        if (block == 0) {
            t->state = ST_DATA;
            t->retries = 0;
            t->timeout = t->base_timeout;
            if (send_window(t, p->buf, now) < 0) finish(p, t, OUT_ERROR, "the file could not be read");
        }
        return;
    }
    int64_t advance = (int64_t)((block - (unsigned)(t->acked & 0xFFFF)) & 0xFFFF);
    if (advance == 0 || advance > t->sent_upto - t->acked) return; /* duplicate or late: never a resend */
    t->acked += advance;
    if (t->retries) {
        t->retries = 0;
        t->timeout = t->base_timeout;
    }
    if (t->acked >= t->total_blocks) {
        finish(p, t, OUT_OK, NULL);
        return;
    }
    if (send_window(t, p->buf, now) < 0) finish(p, t, OUT_ERROR, "the file could not be read");
}

static void on_readable(pump_t *p, transfer_t *t, int64_t now) {
    struct sockaddr_storage from;
    socklen_t from_len = sizeof from;
    ssize_t n = recvfrom(t->fd, p->rbuf, sizeof p->rbuf, MSG_DONTWAIT, (struct sockaddr *)&from, &from_len);
    if (n < 0) return; /* EAGAIN, or an ICMP error for an earlier send: the timer copes */
    const uint8_t *b = p->rbuf;
    if (!same_peer(t, &from)) {
        if (n >= 2 && !(b[0] == 0 && b[1] == OP_ERROR)) /* RFC 1350 §4: error 5, the transfer goes on */
            send_error(t->fd, (struct sockaddr *)&from, from_len, 5, "unknown TID");
        return;
    }
    if (n >= 4 && b[0] == 0 && b[1] == OP_ACK) {
        on_ack(p, t, ((unsigned)b[2] << 8) | b[3], now);
    } else if (n >= 4 && b[0] == 0 && b[1] == OP_ERROR) {
        char msg[112];
        size_t len = (size_t)n - 4;
        const uint8_t *end = memchr(b + 4, 0, len);
        if (end != NULL) len = (size_t)(end - (b + 4));
        snprintf(msg, sizeof msg, "client error %u: %.*s", ((unsigned)b[2] << 8) | b[3], (int)(len > 80 ? 80 : len),
                 (const char *)b + 4);
        /* RFC 2347 §4: UEFI's MTFTP refuses an OACK on purpose to learn tsize, then asks again. */
        finish(p, t, t->state == ST_OACK && t->tsize_accepted ? OUT_TSIZE_PROBE : OUT_ABORTED, msg);
    }
    /* Anything else on a read transfer is ignored: answering it could start a storm with a confused peer. */
}

static void on_timer(pump_t *p, transfer_t *t, int64_t now) {
    if (now < t->deadline) return;
    if (t->retries >= t->max_retries) {
        char msg[64];
        snprintf(msg, sizeof msg, "no ACK after %d retransmissions", t->retries);
        send_error(t->fd, (struct sockaddr *)&t->peer, t->peer_len, 0, "timeout");
        finish(p, t, OUT_TIMEOUT, msg);
        return;
    }
    t->retries++;
    t->timeout = current_timeout(t);
    t->retransmissions++;
    if (t->state == ST_OACK) {
        send_oack(t, now);
    } else if (send_window(t, p->buf, now) < 0) {
        finish(p, t, OUT_ERROR, "the file could not be read");
    }
}

/* The transfers handed over since the last look, onto the thread's own list. */
static void adopt(pump_t *p) {
    pthread_mutex_lock(&p->lock);
    transfer_t *t = p->pending;
    p->pending = NULL;
    pthread_mutex_unlock(&p->lock);
    while (t != NULL) {
        transfer_t *next = t->pending;
        t->pending = NULL;
        p->running++;
        t->next = p->head.next;
        t->prev = &p->head;
        p->head.next->prev = t;
        p->head.next = t;
        t = next;
    }
}

static void end_all(pump_t *p, int outcome, const char *reason, int tell_client) {
    adopt(p);
    while (p->head.next != &p->head) {
        transfer_t *t = p->head.next;
        if (tell_client) send_error(t->fd, (struct sockaddr *)&t->peer, t->peer_len, 0, reason);
        finish(p, t, outcome, reason);
    }
}

static void *run(void *arg) {
    pump_t *p = arg;
    struct epoll_event events[EVENTS];
    int64_t next_scan = now_ns() + SCAN_NS;
    int64_t last_busy = 0;
    for (;;) {
        int timeout_ms = (int)(SCAN_NS / 1000000);
        if (p->running > SPIN_MIN && now_ns() - last_busy < SPIN_NS) {
            timeout_ms = 0;
        } else if (p->head.next == &p->head) {
            /* Nothing to time: sleep until a start or a stop says so (the order makes a start that
             * races this check either seen here or told to wake us). */
            atomic_store(&p->idle, 1);
            pthread_mutex_lock(&p->lock);
            int empty = p->pending == NULL;
            pthread_mutex_unlock(&p->lock);
            if (empty && !atomic_load(&p->quit) && !atomic_load(&p->abort_all)) timeout_ms = -1;
            else atomic_store(&p->idle, 0);
        }
        int n = epoll_wait(p->epfd, events, EVENTS, timeout_ms);
        atomic_store(&p->idle, 0);
        adopt(p); /* before the events: one may be a transfer's that was handed over just now */
        int64_t now = now_ns();
        if (n > 0) last_busy = now;
        for (int i = 0; i < n; i++) {
            if (events[i].data.ptr == NULL) { /* the wake eventfd */
                uint64_t v;
                (void)!read(p->wake_fd, &v, sizeof v);
                continue;
            }
            on_readable(p, events[i].data.ptr, now);
        }
        /* An abort asked for before the stop is carried out first: its clients are told. */
        if (atomic_exchange(&p->abort_all, 0)) {
            end_all(p, OUT_ABORTED, p->abort_reason, 1);
        }
        if (atomic_load(&p->quit)) {
            end_all(p, OUT_ABORTED, "server shutting down", 0);
            return NULL;
        }
        if (now >= next_scan) {
            next_scan = now + SCAN_NS;
            for (transfer_t *t = p->head.next, *next; t != &p->head; t = next) {
                next = t->next; /* on_timer may free t */
                on_timer(p, t, now);
            }
        }
    }
}

static void wake(pump_t *p) {
    uint64_t one = 1;
    (void)!write(p->wake_fd, &one, sizeof one);
}

void *cello_pump_new(void) {
    pump_t *p = calloc(1, sizeof *p);
    if (p == NULL) return NULL;
    p->head.next = p->head.prev = &p->head;
    p->epfd = epoll_create1(EPOLL_CLOEXEC);
    p->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    p->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (p->epfd < 0 || p->notify_fd < 0 || p->wake_fd < 0 || epoll_ctl(p->epfd, EPOLL_CTL_ADD, p->wake_fd, &ev) < 0 ||
        pthread_mutex_init(&p->lock, NULL) != 0) {
        goto fail;
    }
    if (pthread_create(&p->thread, NULL, run, p) != 0) {
        pthread_mutex_destroy(&p->lock);
        goto fail;
    }
    return p;
fail:
    if (p->epfd >= 0) close(p->epfd);
    if (p->notify_fd >= 0) close(p->notify_fd);
    if (p->wake_fd >= 0) close(p->wake_fd);
    free(p);
    return NULL;
}

/* The sizes of the two structures ctypes mirrors (tftp_native.py refuses a library they disagree with). */
uint32_t cello_pump_abi(void) {
    return (uint32_t)(sizeof(struct cello_pump_params) << 16 | sizeof(struct cello_pump_done));
}

/* The eventfd that is readable while completions wait for `cello_pump_take`. */
int cello_pump_notify_fd(void *handle) { return ((pump_t *)handle)->notify_fd; }

/* 0: the pump owns params->fd from now on (and has sent the first datagram); else -errno and the
 * caller still owns it. */
int cello_pump_start(void *handle, const struct cello_pump_params *params) {
    pump_t *p = handle;
    if (params->blksize < 8 || params->blksize > MAX_BLKSIZE || params->windowsize < 1 || params->size < 0 ||
        (params->data == NULL && params->file_fd < 0) || (params->oack_len > 0 && params->oack == NULL))
        return -EINVAL;
    char host[sizeof params->host + 1]; /* terminated here whatever the caller left in the field */
    memcpy(host, params->host, sizeof params->host);
    host[sizeof params->host] = 0;
    transfer_t *t = calloc(1, sizeof *t);
    if (t == NULL) return -ENOMEM;
    if (params->family == AF_INET) {
        struct sockaddr_in *a = (void *)&t->peer;
        a->sin_family = AF_INET;
        a->sin_port = htons(params->port);
        if (inet_pton(AF_INET, host, &a->sin_addr) != 1) goto invalid;
        t->peer_len = sizeof *a;
    } else if (params->family == AF_INET6) {
        struct sockaddr_in6 *a = (void *)&t->peer;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(params->port);
        a->sin6_scope_id = params->scope_id;
        if (inet_pton(AF_INET6, host, &a->sin6_addr) != 1) goto invalid;
        t->peer_len = sizeof *a;
    } else {
        goto invalid;
    }
    if (params->oack_len > 0) {
        t->oack = malloc(params->oack_len);
        if (t->oack == NULL) {
            free(t);
            return -ENOMEM;
        }
        memcpy(t->oack, params->oack, params->oack_len);
        t->oack_len = params->oack_len;
    }
    t->id = params->id;
    t->fd = params->fd;
    t->file_fd = params->file_fd;
    t->data = params->data;
    t->size = params->size;
    t->blksize = params->blksize;
    t->windowsize = params->windowsize;
    t->total_blocks = params->size / params->blksize + 1; /* n*blksize bytes end with an empty block */
    t->base_timeout = t->timeout = params->timeout;
    t->timeout_from_client = params->timeout_from_client;
    t->max_retries = params->max_retries;
    t->backoff_max = params->backoff_max;
    t->tsize_accepted = params->tsize_accepted;
    /* What reached the port before it was this transfer's (a spare bound ahead) was for nobody: dropped. */
    while (recv(t->fd, p->drain, sizeof p->drain, MSG_DONTWAIT) >= 0) {
    }
    int64_t now = now_ns();
    /* The first answer leaves from the caller's thread: no hand-over in front of a storm's first byte. */
    if (t->oack_len > 0) {
        t->state = ST_OACK;
        send_oack(t, now);
    } else {
        uint8_t buf[4 + MAX_BLKSIZE];
        t->state = ST_DATA;
        if (send_window(t, buf, now) < 0) {
            free(t->oack);
            free(t);
            return -EIO;
        }
    }
    pthread_mutex_lock(&p->lock);
    t->pending = p->pending;
    p->pending = t;
    pthread_mutex_unlock(&p->lock);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = t};
    if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, t->fd, &ev) < 0) {
        /* Registered nowhere: the timer scan still retransmits, and the socket is read by nobody, so the
         * transfer times out and reports it; that path needs no second owner of the descriptor. */
    }
    if (atomic_exchange(&p->idle, 0)) wake(p);
    return 0;
invalid:
    free(t);
    return -EINVAL;
}

/* Up to `max` completions into `out`; how many. */
int cello_pump_take(void *handle, struct cello_pump_done *out, int max) {
    pump_t *p = handle;
    uint64_t v;
    (void)!read(p->notify_fd, &v, sizeof v);
    pthread_mutex_lock(&p->lock);
    int n = (int)(p->n_done < (size_t)max ? p->n_done : (size_t)max);
    memcpy(out, p->done, (size_t)n * sizeof *out);
    memmove(p->done, p->done + n, (p->n_done - (size_t)n) * sizeof *out);
    p->n_done -= (size_t)n;
    int more = p->n_done > 0;
    pthread_mutex_unlock(&p->lock);
    if (more) {
        uint64_t one = 1;
        (void)!write(p->notify_fd, &one, sizeof one); /* still readable for the rest */
    }
    return n;
}

/* Every running transfer ends with an ERROR to its client and an "aborted" completion (server stop). */
void cello_pump_abort_all(void *handle, const char *reason) {
    pump_t *p = handle;
    pthread_mutex_lock(&p->lock);
    snprintf(p->abort_reason, sizeof p->abort_reason, "%s", reason);
    pthread_mutex_unlock(&p->lock);
    atomic_store(&p->abort_all, 1);
    wake(p);
}

/* Stops the thread, closes what is left, frees the pump. Completions not taken are dropped. */
void cello_pump_free(void *handle) {
    pump_t *p = handle;
    atomic_store(&p->quit, 1);
    wake(p);
    pthread_join(p->thread, NULL);
    close(p->epfd);
    close(p->notify_fd);
    close(p->wake_fd);
    pthread_mutex_destroy(&p->lock);
    free(p->done);
    free(p);
}
