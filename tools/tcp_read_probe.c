// tcp_read_probe.c - the smallest initiator of kvferry's wire protocol: reads one range of a
// kvferry target over tcp again and again, as a synchronous batch would, and reports GB/s.
// Build: gcc -O2 -Wall -o tcp_read_probe tcp_read_probe.c
// Usage: ./tcp_read_probe PORT REMOTE_ADDR LEN [seconds=2] [pause_us=0] [quickack=0]
//   with a target from: kvferry bench --mode target --until-stdin-closes --buffer-size LEN
//   (it prints "TARGET host:port addr len"; keep its stdin open while probing).
//
// Why: it separates what the protocol and loopback tcp cost from what kvferry's initiator adds.
// It polls (never sleeps) like kvferry's initiator, sends one READ per batch and receives the
// reply into one buffer. `pause_us` waits (spinning) between a reply and the next request, as a
// caller's own work between batches would; `quickack` sets TCP_QUICKACK after each request (before its reply), as
// kvferry does for receives of 1 MiB or more (crates/kvferry/src/net.rs, QUICK_ACK_MIN_BYTES).
// Without it a pause of a few microseconds costs far more than itself: Linux then treats the
// connection as interactive and delays its ACKs (tools/bench/discussion.md, tcp-large).
//
// Output: tcp_read_probe len=N pause_us=P quickack=Q GB/s=X us/batch=Y
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

// docs/wire-protocol.md: the 32-byte header of every frame, little-endian.
struct header {
    uint32_t magic;
    uint16_t version, kind;
    uint32_t flags;
    int32_t status;
    uint64_t request_id, payload_len;
};
enum { MAGIC = 0x5246564B, HELLO = 1, HELLO_REPLY = 2, READ = 20, READ_DATA = 21 };

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

// Receives exactly n bytes, polling while none are there.
static void recv_all(int s, void *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t k = recv(s, (char *)buf + got, n - got, MSG_DONTWAIT);
        if (k > 0) {
            got += (size_t)k;
        } else if (k < 0 && (errno == EAGAIN || errno == EINTR)) {
            struct pollfd p = {s, POLLIN, 0};
            while (poll(&p, 1, 0) == 0) {
            }
        } else {
            fprintf(stderr, "tcp_read_probe: the target closed the connection\n");
            exit(1);
        }
    }
}

static void send_all(int s, const void *buf, size_t n) {
    if (send(s, buf, n, MSG_NOSIGNAL) != (ssize_t)n) die("send");
}

static struct header frame(uint16_t kind, uint64_t id, uint64_t len) {
    struct header h = {MAGIC, 1, kind, 0, 0, id, len};
    return h;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s PORT REMOTE_ADDR LEN [seconds] [pause_us] [quickack]\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]);
    uint64_t remote = strtoull(argv[2], NULL, 10);
    uint64_t len = strtoull(argv[3], NULL, 10);
    double seconds = argc > 4 ? atof(argv[4]) : 2.0;
    double pause = (argc > 5 ? atof(argv[5]) : 0.0) * 1e-6;
    int quickack = argc > 6 ? atoi(argv[6]) : 0;

    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a)) die("connect");
    int one = 1;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);

    // HELLO: versions 1..1, no nonce, no instance; the reply names the target's instance.
    unsigned char hello[64] = {0};
    struct header h = frame(HELLO, 1, 32);
    memcpy(hello, &h, 32);
    uint16_t versions[2] = {1, 1};
    memcpy(hello + 32, versions, 4);
    send_all(s, hello, sizeof hello);
    struct header r;
    recv_all(s, &r, sizeof r);
    unsigned char reply[128];
    if (r.kind != HELLO_REPLY || r.payload_len > sizeof reply) {
        fprintf(stderr, "tcp_read_probe: no HELLO_REPLY (kind %u); a target with a secret?\n", r.kind);
        return 1;
    }
    recv_all(s, reply, r.payload_len);
    uint64_t instance;
    memcpy(&instance, reply + 24, 8);

    char *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) die("mmap");
    memset(buf, 1, len);  // fault every page in before timing

    // READ: the header, then the table (target instance, one range).
    unsigned char req[64] = {0};
    uint32_t count = 1;
    memcpy(req + 32, &instance, 8);
    memcpy(req + 40, &count, 4);
    memcpy(req + 48, &remote, 8);
    memcpy(req + 56, &len, 8);
    long batches = 0;
    double t0 = now();
    for (uint64_t id = 2; now() - t0 < seconds; id++) {
        if (pause > 0) {
            double p0 = now();
            while (now() - p0 < pause) {
            }
        }
        h = frame(READ, id, 32);
        memcpy(req, &h, 32);
        send_all(s, req, sizeof req);
        // After the request: sending re-arms the interactive mode this leaves.
        if (quickack) setsockopt(s, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
        recv_all(s, &r, sizeof r);
        if (r.kind != READ_DATA || r.payload_len != len) {
            fprintf(stderr, "tcp_read_probe: reply of kind %u, %llu bytes (an ERROR: is the range registered?)\n",
                    r.kind, (unsigned long long)r.payload_len);
            return 1;
        }
        recv_all(s, buf, len);
        batches++;
    }
    double dt = now() - t0;
    printf("tcp_read_probe len=%llu pause_us=%.1f quickack=%d GB/s=%.2f us/batch=%.0f\n", (unsigned long long)len,
           pause * 1e6, quickack, batches * (double)len / dt / 1e9, dt / batches * 1e6);
    return 0;
}
