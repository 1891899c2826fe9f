// tcp_limit.c - physical limit probe: one loopback TCP stream, as iperf3 measures it, but with the
// sender reading from and the receiver writing into buffers of a chosen footprint.
// Build: gcc -O2 -Wall -o tcp_limit tcp_limit.c
// Usage: ./tcp_limit [seconds_per_trial=1] [footprint_KiB,...=1024] [streams,...=1] [sndbuf_KiB=0]
//
// Why: iperf3 sends one buffer of at most 1 MiB over and over and receives into another, so both
// stay in the CPU caches. A KV cache transfer moves each byte once, from a source as large as the
// batch (32 blocks of 1 MiB: 32 MiB) into a destination as large. Loopback TCP copies every byte
// twice (sender into socket buffers, receiver out of them), so once the footprint outgrows the
// caches the stream slows down for everyone. This probe measures exactly that: the sender writes
// 1 MiB chunks walking through a footprint-sized buffer, the receiver reads into its own
// footprint-sized buffer the same way. With a 1 MiB footprint it is iperf3 -l 1M.
//
// With several streams, each sender/receiver pair walks its share of the footprint (a batch spread
// over that many connections, as kvferry spreads large batches over its lanes): once the data
// comes from memory rather than the caches, more copies in flight can go faster.
//
// sndbuf_KiB, when not 0, sets each sender's SO_SNDBUF (the kernel doubles it and stops tuning it):
// small send buffers keep the bytes in flight within the CPU caches, at the price of a wake-up of
// the sender every sndbuf bytes; tools/bench/discussion.md (tcp-large) says what that does here.
//
// Every stream is a forked receiver process and a forked sender process. Output, one line per
// footprint and stream count:
//   tcp_limit footprint_KiB=N streams=S GB/s=X (best of 3 trials; GB/s = 1e9 payload bytes / s)
// and, with a sndbuf, " sndbuf_KiB=B" at the end of each line.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (1 << 20)

static int sndbuf;  // bytes; 0: the kernel's autotuning

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static char *buffer(size_t size) {
    char *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) die("mmap");
    memset(p, 0x5A, size);  // fault every page in before timing
    return p;
}

// Receives until the sender closes; reports (bytes, seconds) over `report`.
static void receiver(int listener, size_t footprint, int report) {
    int s = accept(listener, NULL, NULL);
    if (s < 0) die("accept");
    char *buf = buffer(footprint);
    size_t off = 0;
    double r[2] = {0, 0}, t0 = now();
    for (;;) {
        size_t want = footprint - off < CHUNK ? footprint - off : CHUNK;
        ssize_t n = recv(s, buf + off, want, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) die("recv");
        if (n == 0) break;
        r[0] += (double)n;
        off = (off + (size_t)n) % footprint;
    }
    r[1] = now() - t0;
    if (write(report, r, sizeof r) != sizeof r) die("write");
    close(s);
}

// Sends for `seconds` from a buffer of `footprint` bytes, then closes.
static void sender(struct sockaddr_in *a, size_t footprint, double seconds) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) die("socket");
    if (sndbuf && setsockopt(s, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf)) die("SO_SNDBUF");
    if (connect(s, (struct sockaddr *)a, sizeof *a)) die("connect");
    char *buf = buffer(footprint);
    size_t off = 0;
    double t0 = now();
    do {
        size_t want = footprint - off < CHUNK ? footprint - off : CHUNK;
        ssize_t n = send(s, buf + off, want, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) die("send");
        off = (off + (size_t)n) % footprint;
    } while (now() - t0 < seconds);
    shutdown(s, SHUT_WR);
    close(s);
}

// `streams` sender/receiver process pairs, each walking footprint/streams
// bytes on each side (a batch spread over that many connections).
static double trial(size_t footprint, double seconds, int streams) {
    int pipefd[2];
    if (pipe(pipefd)) die("pipe");
    size_t each = footprint / (size_t)streams;
    for (int i = 0; i < streams; i++) {
        int listener = socket(AF_INET, SOCK_STREAM, 0);
        if (listener < 0) die("socket");
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        socklen_t alen = sizeof a;
        if (bind(listener, (struct sockaddr *)&a, sizeof a) || listen(listener, 1) ||
            getsockname(listener, (struct sockaddr *)&a, &alen))
            die("bind");
        pid_t r = fork();
        if (r < 0) die("fork");
        if (r == 0) {
            receiver(listener, each, pipefd[1]);
            _exit(0);
        }
        close(listener);
        pid_t w = fork();
        if (w < 0) die("fork");
        if (w == 0) {
            sender(&a, each, seconds);
            _exit(0);
        }
    }
    double bytes = 0, longest = 0;
    for (int i = 0; i < streams; i++) {
        double r[2];
        if (read(pipefd[0], r, sizeof r) != sizeof r) die("read");
        bytes += r[0];
        if (r[1] > longest) longest = r[1];
    }
    while (wait(NULL) > 0) {
    }
    close(pipefd[0]);
    close(pipefd[1]);
    return bytes / longest / 1e9;
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 1.0;
    char *sizes = strdup(argc > 2 ? argv[2] : "1024"), *save = NULL;
    const char *stream_list = argc > 3 ? argv[3] : "1";
    sndbuf = argc > 4 ? atoi(argv[4]) << 10 : 0;
    if (sndbuf < 0) {
        fprintf(stderr, "tcp_limit: bad sndbuf %s\n", argv[4]);
        return 2;
    }
    for (char *tok = strtok_r(sizes, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        size_t footprint = (size_t)atol(tok) << 10;
        if (footprint == 0) {
            fprintf(stderr, "tcp_limit: bad footprint %s\n", tok);
            return 2;
        }
        char *streams = strdup(stream_list), *save2 = NULL;
        for (char *st = strtok_r(streams, ",", &save2); st; st = strtok_r(NULL, ",", &save2)) {
            int n = atoi(st);
            if (n < 1 || n > 64 || footprint / (size_t)n < 4096) {
                fprintf(stderr, "tcp_limit: bad stream count %s for %zu KiB\n", st, footprint >> 10);
                return 2;
            }
            double best = 0;
            for (int i = 0; i < 3; i++) {
                double g = trial(footprint, seconds, n);
                if (g > best) best = g;
            }
            printf("tcp_limit footprint_KiB=%zu streams=%d GB/s=%.2f", footprint >> 10, n, best);
            if (sndbuf) printf(" sndbuf_KiB=%d", sndbuf >> 10);
            printf("\n");
            fflush(stdout);
        }
        free(streams);
    }
    free(sizes);
    return 0;
}
