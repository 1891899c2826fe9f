// cma_limit.c - physical limit probe: cross-process copy bandwidth via Linux CMA (process_vm_readv /
// process_vm_writev).
// Build: gcc -O2 -pthread -o cma_limit cma_limit.c
// Usage: ./cma_limit [iov_per_call=16] [min_seconds_per_trial=0.3] [remote_MiB=256] [hot|stream] [block_KiB,...]
// (kvferry's copy adds the last, optional argument: the block sizes to measure, in KiB, e.g.
// 16,128,1024,4096, so that scripts/bench measures the limit at exactly the cells kvferry runs;
// without it the output is that of ../shared/bench/cma_limit.c.)
// A forked "owner" process allocates a remote_MiB buffer, fills it and sends
// its address over a pipe; it then only sleeps.  The parent ("reader") copies
// blocks out of (read) / into (write) that buffer by pid+address, with
// iov_per_call blocks per syscall (local and remote iovec arrays of equal
// length).  1 and 2 reader threads.  GB/s = 1e9 payload bytes / s, best of 5.
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static pid_t owner;
static uintptr_t raddr;
static size_t rsize;
static int niov = 16;
static int hot = 0;  // 1: each thread re-reads the same niov remote blocks (cache-hot, like ucx_perftest)

typedef struct {
    int id, nthreads, write;
    size_t block;
    long calls;   // out: calls done
    double dur;
    char *local;
    pthread_barrier_t *bar;
    double t_end;
    int err;
} targ_t;

static void *worker(void *p) {
    targ_t *a = (targ_t *)p;
    cpu_set_t cs;
    CPU_ZERO(&cs);
    CPU_SET(a->id, &cs);
    pthread_setaffinity_np(pthread_self(), sizeof(cs), &cs);
    struct iovec liov[1024], riov[1024];
    size_t region = rsize / a->nthreads;  // each thread its own slice of remote
    uintptr_t rbase = raddr + region * a->id;
    size_t nblk = region / a->block;
    if (hot && nblk > (size_t)niov) nblk = niov;
    for (int j = 0; j < niov; j++) {
        liov[j].iov_base = a->local + (size_t)j * a->block;
        liov[j].iov_len = a->block;
        riov[j].iov_len = a->block;
    }
    size_t per_call = (size_t)niov * a->block;
    pthread_barrier_wait(a->bar);
    size_t bi = 0;
    double t0 = now(), t;
    long c = 0;
    for (;;) {
        for (int j = 0; j < niov; j++) {
            riov[j].iov_base = (void *)(rbase + (bi % nblk) * a->block);
            bi++;
        }
        ssize_t n = a->write ? process_vm_writev(owner, liov, niov, riov, niov, 0)
                             : process_vm_readv(owner, liov, niov, riov, niov, 0);
        if (n != (ssize_t)per_call) {
            a->err = n < 0 ? errno : -1;
            break;
        }
        c++;
        if ((t = now()) - t0 >= a->dur) break;
    }
    a->calls = c;
    a->t_end = now();
    return NULL;
}

static double trial(int nt, int write, size_t block, double dur, char **local) {
    pthread_t th[2];
    targ_t a[2];
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, nt + 1);
    for (int t = 0; t < nt; t++) {
        a[t] = (targ_t){t, nt, write, block, 0, dur, local[t], &bar, 0, 0};
        pthread_create(&th[t], NULL, worker, &a[t]);
    }
    pthread_barrier_wait(&bar);
    double t0 = now(), tend = 0, bytes = 0;
    for (int t = 0; t < nt; t++) {
        pthread_join(th[t], NULL);
        if (a[t].err) {
            fprintf(stderr, "CMA error: %s\n", a[t].err > 0 ? strerror(a[t].err) : "short copy");
            exit(1);
        }
        if (a[t].t_end > tend) tend = a[t].t_end;
        bytes += (double)block * niov * a[t].calls;
    }
    pthread_barrier_destroy(&bar);
    return bytes / (tend - t0) / 1e9;
}

int main(int argc, char **argv) {
    niov = argc > 1 ? atoi(argv[1]) : 16;
    double min_s = argc > 2 ? atof(argv[2]) : 0.3;
    rsize = (size_t)(argc > 3 ? atoi(argv[3]) : 256) << 20;
    hot = argc > 4 && strcmp(argv[4], "hot") == 0;
    if (niov < 1 || niov > 1024) { fprintf(stderr, "bad iov count\n"); return 1; }
    int p2c[2], c2p[2];
    if (pipe(p2c) || pipe(c2p)) { perror("pipe"); return 1; }
    owner = fork();
    if (owner == 0) {  // owner process
        close(p2c[1]);
        close(c2p[0]);
        char *buf;
        if (posix_memalign((void **)&buf, 4096, rsize)) _exit(1);
        for (size_t i = 0; i < rsize; i++) buf[i] = (char)(i * 131 + 7);
        uintptr_t a = (uintptr_t)buf;
        if (write(c2p[1], &a, sizeof(a)) != sizeof(a)) _exit(1);
        char x;
        while (read(p2c[0], &x, 1) > 0) {}  // wait until parent closes pipe
        _exit(0);
    }
    close(p2c[0]);
    close(c2p[1]);
    if (read(c2p[0], &raddr, sizeof(raddr)) != sizeof(raddr)) { fprintf(stderr, "no addr\n"); return 1; }
    printf("owner pid=%d remote buffer=%p size=%zu MiB, iovecs/call=%d, remote access=%s\n", owner, (void *)raddr,
           rsize >> 20, niov, hot ? "hot (same niov blocks every call)" : "streaming over whole buffer");

    // correctness spot-check
    {
        char chk[4096];
        struct iovec l = {chk, sizeof chk}, r = {(void *)(raddr + 8192), sizeof chk};
        if (process_vm_readv(owner, &l, 1, &r, 1, 0) != sizeof chk) { perror("process_vm_readv"); return 1; }
        for (size_t i = 0; i < sizeof chk; i++)
            if (chk[i] != (char)((i + 8192) * 131 + 7)) { fprintf(stderr, "data mismatch\n"); return 1; }
        printf("spot-check OK\n");
    }

    size_t blocks[16] = {4 << 10, 64 << 10, 1 << 20, 16 << 20};
    char names[16][32] = {"4KiB", "64KiB", "1MiB", "16MiB"};
    int nblocks = 4;
    if (argc > 5) {
        nblocks = 0;
        for (char *tok = strtok(argv[5], ","); tok && nblocks < 16; tok = strtok(NULL, ",")) {
            long kib = atol(tok);
            if (kib <= 0) { fprintf(stderr, "bad block size %s\n", tok); return 1; }
            blocks[nblocks] = (size_t)kib << 10;
            if (kib % 1024 == 0) snprintf(names[nblocks], sizeof names[0], "%ldMiB", kib >> 10);
            else snprintf(names[nblocks], sizeof names[0], "%ldKiB", kib);
            nblocks++;
        }
    }
    printf("%-6s %-6s %-8s %12s %12s %10s\n", "op", "block", "threads", "best_GB/s", "median_GB/s", "calls/s/thr");
    for (int w = 0; w <= 1; w++) {
        for (int bi = 0; bi < nblocks; bi++) {
            size_t block = blocks[bi];
            for (int nt = 1; nt <= 2; nt++) {
                if (block * niov * nt > rsize * 2 || block * nt > rsize) {  // keep buffers bounded
                    printf("%-6s %-6s %-8d skipped (local buffer too large)\n", w ? "write" : "read", names[bi], nt);
                    continue;
                }
                char *local[2];
                for (int t = 0; t < nt; t++) {
                    if (posix_memalign((void **)&local[t], 4096, block * niov)) { perror("alloc"); return 1; }
                    memset(local[t], 1, block * niov);
                }
                trial(nt, w, block, 0.1, local);  // warm-up
                double r[5], best = 0;
                for (int k = 0; k < 5; k++) {
                    r[k] = trial(nt, w, block, min_s, local);
                    if (r[k] > best) best = r[k];
                }
                for (int i = 0; i < 5; i++)
                    for (int j = i + 1; j < 5; j++)
                        if (r[j] < r[i]) { double x = r[i]; r[i] = r[j]; r[j] = x; }
                printf("%-6s %-6s %-8d %12.2f %12.2f %10.0f\n", w ? "write" : "read", names[bi], nt, best, r[2],
                       best * 1e9 / (block * niov * nt));
                fflush(stdout);
                for (int t = 0; t < nt; t++) free(local[t]);
            }
        }
    }
    close(p2c[1]);
    waitpid(owner, NULL, 0);
    return 0;
}
