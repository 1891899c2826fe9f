/*
 * The C API as a user sees it: libkvferry.so and include/kvferry.h only.
 *
 * Two (and more) engines in one process exchange bytes; every error path
 * is checked for its exact documented status, a last-error message naming
 * the context (address in hex, "op N", the peer, the argument), and that
 * nothing moved. Built and run under AddressSanitizer by
 * crates/kvferry-capi/tests/c_programs.rs, so a library access to memory
 * after it was unregistered (and freed here) is caught too.
 *
 * Prints one summary line; exits 1 after any failed check, naming its line.
 */

#define _POSIX_C_SOURCE 200809L

#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>

#include "kvferry.h"

#define U(p) ((uint64_t)(uintptr_t)(p))
#define MIB ((size_t)1 << 20)

/* ---- checks ---------------------------------------------------------- */

#define CHECK_FILE "api_test.c"
#include "check.h"

static void sleep_us(long us) {
  struct timespec ts;
  ts.tv_sec = us / 1000000;
  ts.tv_nsec = (us % 1000000) * 1000;
  nanosleep(&ts, NULL);
}

/* ---- fixtures --------------------------------------------------------- */

/* Deterministic, position-dependent bytes, different for every seed. */
static void fill(uint8_t *p, size_t n, unsigned seed) {
  size_t i;
  uint32_t x = seed * 2654435761u + 1;
  for (i = 0; i < n; i++) {
    x = x * 1103515245u + 12345u;
    p[i] = (uint8_t)(x >> 16);
  }
}

static kvf_engine *new_engine(uint16_t port, uint32_t workers, uint64_t slice) {
  kvf_config *c = NULL;
  kvf_engine *e = NULL;
  REQUIRE(kvf_config_new(&c) == KVF_STATUS_OK && c != NULL);
  REQUIRE(kvf_config_set_hostname(c, "127.0.0.1") == KVF_STATUS_OK);
  REQUIRE(kvf_config_set_port(c, port) == KVF_STATUS_OK);
  if (workers) {
    REQUIRE(kvf_config_set_async_workers(c, workers) == KVF_STATUS_OK);
  }
  if (slice) {
    REQUIRE(kvf_config_set_slice_size(c, slice) == KVF_STATUS_OK);
  }
  if (kvf_engine_new(c, &e) != KVF_STATUS_OK) {
    fprintf(stderr, "kvf_engine_new: %s\n", kvf_last_error());
  }
  REQUIRE(e != NULL);
  kvf_config_free(c);
  return e;
}

static void engine_name(const kvf_engine *e, char *buf, size_t cap) {
  REQUIRE(kvf_engine_name(e, buf, cap, NULL) == KVF_STATUS_OK);
}

static void *xmalloc(size_t n) {
  void *p = malloc(n);
  REQUIRE(p != NULL);
  return p;
}

/* Engines A and B, each with one registered buffer of LEN bytes. A slices
 * at 4 KiB, so ops of a few pages take several slices. */
#define LEN (1 * MIB)
static kvf_engine *A, *B;
static char a_name[64], b_name[64];
static uint8_t *abuf, *bbuf;
/* Snapshots for "nothing moved" checks. */
static uint8_t *a_snap, *b_snap;

static void snapshot(void) {
  memcpy(a_snap, abuf, LEN);
  memcpy(b_snap, bbuf, LEN);
}
static int unchanged(void) {
  return memcmp(a_snap, abuf, LEN) == 0 && memcmp(b_snap, bbuf, LEN) == 0;
}

/* ---- version, status strings, last error ------------------------------ */

static void test_version_and_status_strings(void) {
  static const int32_t known[] = {
      KVF_STATUS_OK,
      KVF_STATUS_IN_PROGRESS,
      KVF_STATUS_INVALID_ARGUMENT,
      KVF_STATUS_NULL_POINTER,
      KVF_STATUS_INTERNAL,
      KVF_STATUS_UNSUPPORTED,
      KVF_STATUS_BUFFER_TOO_SMALL,
      KVF_STATUS_ZERO_LENGTH_REGION,
      KVF_STATUS_REGION_OVERLAP,
      KVF_STATUS_NOT_REGISTERED,
      KVF_STATUS_REGION_BUSY,
      KVF_STATUS_BAD_LOCATION,
      KVF_STATUS_REGION_NOT_MAPPED,
      KVF_STATUS_ZERO_LENGTH_OP,
      KVF_STATUS_ADDRESS_OVERFLOW,
      KVF_STATUS_LOCAL_OUT_OF_RANGE,
      KVF_STATUS_REMOTE_OUT_OF_RANGE,
      KVF_STATUS_BAD_BATCH_ID,
      KVF_STATUS_BATCH_IN_PROGRESS,
      KVF_STATUS_TOO_MANY_BATCHES,
      KVF_STATUS_TIMEOUT,
      KVF_STATUS_BAD_SESSION,
      KVF_STATUS_PEER_UNREACHABLE,
      KVF_STATUS_TRANSFER_FAILED,
      KVF_STATUS_IO,
      KVF_STATUS_TRANSFER_TIMEOUT,
  };
  /* Far outside the blocks in use, so that codes added later (new codes
   * fill gaps in their block) do not turn these into known ones. */
  static const int32_t unknown[] = {-99, -100, -1000, 1000, 65536, INT32_MIN, INT32_MAX};
  enum { NKNOWN = sizeof known / sizeof known[0] };
  char names[NKNOWN][96];
  char buf[96];
  char expected[32];
  size_t i, j;

  /* Version macros of the header against the library's version string. */
  snprintf(expected, sizeof expected, "%d.%d.%d", KVF_VERSION_MAJOR, KVF_VERSION_MINOR,
           KVF_VERSION_PATCH);
  REQUIRE(kvf_version() != NULL);
  check_(strcmp(kvf_version(), expected) == 0, __LINE__, "kvf_version() \"%s\" != macros \"%s\"",
         kvf_version(), expected);
  CHECK(kvf_version() == kvf_version()); /* static */

  for (i = 0; i < NKNOWN; i++) {
    status_name(known[i], names[i], sizeof names[i]);
    check_(names[i][0] != '\0' && strcmp(names[i], "unknown status") != 0, __LINE__,
           "kvf_status_str(%d) = \"%s\"", (int)known[i], names[i]);
    for (j = 0; j < i; j++) {
      check_(strcmp(names[i], names[j]) != 0, __LINE__, "codes %d and %d share the name \"%s\"",
             (int)known[i], (int)known[j], names[i]);
    }
  }
  CHECK(strcmp(status_name(KVF_STATUS_OK, buf, sizeof buf), "ok") == 0);
  CHECK(strcmp(status_name(KVF_STATUS_IN_PROGRESS, buf, sizeof buf), "in progress") == 0);
  for (i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
    status_name(unknown[i], buf, sizeof buf);
    check_(strcmp(buf, "unknown status") == 0, __LINE__, "kvf_status_str(%d) = \"%s\"",
           (int)unknown[i], buf);
  }
  /* The codes themselves are ABI: never renumbered. */
  CHECK(KVF_STATUS_OK == 0 && KVF_STATUS_IN_PROGRESS == 1);
  CHECK(KVF_STATUS_INVALID_ARGUMENT == -1 && KVF_STATUS_BUFFER_TOO_SMALL == -5);
  CHECK(KVF_STATUS_ZERO_LENGTH_REGION == -10 && KVF_STATUS_BAD_LOCATION == -14);
  CHECK(KVF_STATUS_REGION_NOT_MAPPED == -15);
  CHECK(KVF_STATUS_ZERO_LENGTH_OP == -20 && KVF_STATUS_REMOTE_OUT_OF_RANGE == -23);
  CHECK(KVF_STATUS_BAD_BATCH_ID == -30 && KVF_STATUS_TIMEOUT == -33);
  CHECK(KVF_STATUS_BAD_SESSION == -40 && KVF_STATUS_IO == -43);
  CHECK(KVF_STATUS_TRANSFER_TIMEOUT == -47);
  CHECK(KVF_OP_READ == 0 && KVF_OP_WRITE == 1 && KVF_WAIT_FOREVER == UINT64_MAX);
  CHECK(sizeof(kvf_status) == 4);
}

/* ---- configs and engine creation -------------------------------------- */

static void test_config_errors(void) {
  kvf_config *c = NULL;
  kvf_engine *sentinel = (kvf_engine *)&checks; /* never dereferenced */
  kvf_engine *e = sentinel;
  uint16_t busy_port = 0;
  char port_text[16];

  EXPECT(kvf_config_new(NULL), KVF_STATUS_NULL_POINTER, "out");
  REQUIRE(kvf_config_new(&c) == KVF_STATUS_OK && c != NULL);

  EXPECT(kvf_config_set_hostname(NULL, "h"), KVF_STATUS_NULL_POINTER, "config");
  EXPECT(kvf_config_set_port(NULL, 1), KVF_STATUS_NULL_POINTER, "config");
  EXPECT(kvf_config_set_port_range(NULL, 1, 2), KVF_STATUS_NULL_POINTER, "config");
  EXPECT(kvf_config_set_connect_timeout_ms(NULL, 1), KVF_STATUS_NULL_POINTER, "config");
  EXPECT(kvf_config_set_transfer_timeout_ms(NULL, 1), KVF_STATUS_NULL_POINTER, "config");
  EXPECT(kvf_config_set_slice_size(NULL, 1), KVF_STATUS_NULL_POINTER, "config");
  EXPECT(kvf_config_set_async_workers(NULL, 1), KVF_STATUS_NULL_POINTER, "config");
  EXPECT(kvf_config_set_max_connections(NULL, 1), KVF_STATUS_NULL_POINTER, "config");
  EXPECT(kvf_config_set_transport(NULL, "auto"), KVF_STATUS_NULL_POINTER, "config");

  EXPECT(kvf_config_set_hostname(c, NULL), KVF_STATUS_NULL_POINTER, "hostname");
  EXPECT(kvf_config_set_transport(c, NULL), KVF_STATUS_NULL_POINTER, "transport");
  EXPECT(kvf_config_set_port_range(c, 10, 9), KVF_STATUS_INVALID_ARGUMENT, "10-9");
  EXPECT(kvf_config_set_slice_size(c, 0), KVF_STATUS_INVALID_ARGUMENT, "slice size");
  EXPECT(kvf_config_set_async_workers(c, 0), KVF_STATUS_INVALID_ARGUMENT, "async_workers");
  EXPECT(kvf_config_set_max_connections(c, 0), KVF_STATUS_INVALID_ARGUMENT, "max_connections");
  EXPECT(kvf_config_set_max_connections(c, 64), KVF_STATUS_OK, NULL);
  EXPECT(kvf_config_set_transport(c, "carrier-pigeon"), KVF_STATUS_INVALID_ARGUMENT,
         "carrier-pigeon");
  EXPECT(kvf_config_set_transport(c, "auto"), KVF_STATUS_OK, NULL);
  EXPECT(kvf_config_set_transport(c, "tcp"), KVF_STATUS_OK, NULL);
  EXPECT(kvf_config_set_port_range(c, 9, 9), KVF_STATUS_OK, NULL);
  EXPECT(kvf_config_set_connect_timeout_ms(c, 100), KVF_STATUS_OK, NULL);
  EXPECT(kvf_config_set_transfer_timeout_ms(c, 100), KVF_STATUS_OK, NULL);
  /* A timeout of 0 would fail every connection or transfer at once. */
  EXPECT(kvf_config_set_connect_timeout_ms(c, 0), KVF_STATUS_INVALID_ARGUMENT,
         "connect timeout of 0 ms");
  EXPECT(kvf_config_set_transfer_timeout_ms(c, 0), KVF_STATUS_INVALID_ARGUMENT,
         "transfer timeout of 0 ms");
  /* Host names: only what a peer can parse back from "host:port". */
  {
    static const char *const bad_hosts[] = {"", "a b", "a b:c", "host:80", "[::1]:80",
                                            "a..b", "1.2.3", "h\xc3\xa9te", "fe80::1%eth0"};
    static const char *const good_hosts[] = {"10.0.0.7", "node-7.cluster", "prefill_0", "::1",
                                             "[::1]"};
    size_t i;
    for (i = 0; i < sizeof bad_hosts / sizeof bad_hosts[0]; i++) {
      EXPECT(kvf_config_set_hostname(c, bad_hosts[i]), KVF_STATUS_INVALID_ARGUMENT, "hostname");
    }
    for (i = 0; i < sizeof good_hosts / sizeof good_hosts[0]; i++) {
      EXPECT(kvf_config_set_hostname(c, good_hosts[i]), KVF_STATUS_OK, NULL);
    }
  }

  /* kvf_engine_new: NULL out, a port that is taken. */
  EXPECT(kvf_engine_new(c, NULL), KVF_STATUS_NULL_POINTER, "out");
  REQUIRE(kvf_engine_rpc_port(A, &busy_port) == KVF_STATUS_OK);
  snprintf(port_text, sizeof port_text, "%u", (unsigned)busy_port);
  EXPECT(kvf_config_set_hostname(c, "127.0.0.1"), KVF_STATUS_OK, NULL);
  EXPECT(kvf_config_set_port(c, busy_port), KVF_STATUS_OK, NULL);
  EXPECT(kvf_engine_new(c, &e), KVF_STATUS_IO, port_text);
  CHECK(e == sentinel);
  kvf_config_free(c);

  /* A NULL config means environment and defaults: the test harness clears
   * KVFERRY_* / MC_* / ASCEND_*, so the default port range applies. */
  e = NULL;
  EXPECT(kvf_engine_new(NULL, &e), KVF_STATUS_OK, NULL);
  if (CHECK(e != NULL)) {
    uint16_t port = 0;
    EXPECT(kvf_engine_rpc_port(e, &port), KVF_STATUS_OK, NULL);
    check_(port >= 15000 && port <= 17000, __LINE__, "default-config port %u outside 15000-17000",
           (unsigned)port);
    kvf_engine_free(e);
  }
}

static void test_engine_identity(void) {
  char buf[64];
  char expected[64];
  size_t len = 12345, name_len;
  uint16_t port = 0, port_b = 0;
  size_t i;
  int untouched = 1;

  EXPECT(kvf_engine_rpc_port(A, &port), KVF_STATUS_OK, NULL);
  EXPECT(kvf_engine_rpc_port(B, &port_b), KVF_STATUS_OK, NULL);
  CHECK(port != 0 && port_b != 0 && port != port_b);
  snprintf(expected, sizeof expected, "127.0.0.1:%u", (unsigned)port);
  EXPECT(kvf_engine_name(A, buf, sizeof buf, &len), KVF_STATUS_OK, NULL);
  check_(strcmp(buf, expected) == 0, __LINE__, "name \"%s\", expected \"%s\"", buf, expected);
  CHECK(len == strlen(expected));
  name_len = len;

  /* Exactly enough room (the NUL included), and out_len may be NULL. */
  memset(buf, 'Z', sizeof buf);
  EXPECT(kvf_engine_name(A, buf, name_len + 1, NULL), KVF_STATUS_OK, NULL);
  CHECK(strcmp(buf, expected) == 0 && buf[name_len + 1] == 'Z');

  /* One byte short: BUFFER_TOO_SMALL, the needed size reported, nothing
   * written. */
  memset(buf, 'Z', sizeof buf);
  len = 0;
  {
    char needed[16];
    snprintf(needed, sizeof needed, "%u", (unsigned)(name_len + 1));
    EXPECT(kvf_engine_name(A, buf, name_len, &len), KVF_STATUS_BUFFER_TOO_SMALL, needed,
           "too small");
  }
  CHECK(len == name_len);
  for (i = 0; i < sizeof buf; i++) {
    untouched &= buf[i] == 'Z';
  }
  CHECK(untouched);
  EXPECT(kvf_engine_name(A, buf, 0, &len), KVF_STATUS_BUFFER_TOO_SMALL, "0 bytes");
  CHECK(buf[0] == 'Z');

  /* NULLs. */
  len = 12345;
  EXPECT(kvf_engine_name(NULL, buf, sizeof buf, &len), KVF_STATUS_NULL_POINTER, "engine");
  CHECK(len == 12345);
  EXPECT(kvf_engine_name(A, NULL, 64, NULL), KVF_STATUS_NULL_POINTER, "buf");
  EXPECT(kvf_engine_rpc_port(NULL, &port), KVF_STATUS_NULL_POINTER, "engine");
  EXPECT(kvf_engine_rpc_port(A, NULL), KVF_STATUS_NULL_POINTER, "out_port");
}

/* ---- memory registration ---------------------------------------------- */

static int is_registered(const kvf_engine *e, uint64_t addr, uint64_t len) {
  /* Registering the region again overlaps it exactly when it is there. */
  kvf_status s = kvf_register_memory(e, addr, len, "cpu:0");
  if (s == KVF_STATUS_OK) {
    REQUIRE(kvf_unregister_memory(e, addr) == KVF_STATUS_OK);
    return 0;
  }
  return s == KVF_STATUS_REGION_OVERLAP;
}

static void test_registration(void) {
  uint8_t *spare = xmalloc(4096);
  const uint64_t s = U(spare);
  uint64_t addrs[3], lens[3];
  const char *locs[] = {"cpu:0", "cpu", "cpu:3", "host", "*", "", " cpu:0 "};
  size_t i;

  EXPECT(kvf_register_memory(NULL, s, 64, "cpu:0"), KVF_STATUS_NULL_POINTER, "engine");
  EXPECT(kvf_register_memory(A, s, 0, "cpu:0"), KVF_STATUS_ZERO_LENGTH_REGION, hex(s));
  EXPECT(kvf_register_memory(A, U(abuf) + 16, 32, NULL), KVF_STATUS_REGION_OVERLAP,
         hex(U(abuf) + 16), hex(U(abuf)));
  EXPECT(kvf_register_memory(A, U(abuf), LEN, "cpu:0"), KVF_STATUS_REGION_OVERLAP, hex(U(abuf)));
  EXPECT(kvf_register_memory(A, U(abuf) + LEN - 1, 64, "cpu:0"), KVF_STATUS_REGION_OVERLAP,
         hex(U(abuf) + LEN - 1));
  EXPECT(kvf_register_memory(A, s, 64, "gpu:0"), KVF_STATUS_BAD_LOCATION, "gpu:0");
  EXPECT(kvf_register_memory(A, s, 64, "npu"), KVF_STATUS_BAD_LOCATION, "npu");
  EXPECT(kvf_register_memory(A, s, 64, "cpu:x"), KVF_STATUS_BAD_LOCATION, "cpu:x");
  EXPECT(kvf_register_memory(A, s, 64, "npu:1:2"), KVF_STATUS_BAD_LOCATION, "npu:1:2");
  EXPECT(kvf_register_memory(A, s, 64, "\xff"), KVF_STATUS_INVALID_ARGUMENT, "location");
  /* Device memory needs a device runtime this build does not have. */
  EXPECT(kvf_register_memory(A, s, 64, "npu:0"), KVF_STATUS_UNSUPPORTED, "npu:0");
  EXPECT(kvf_register_memory(A, s, 64, "NPU:7"), KVF_STATUS_UNSUPPORTED, "npu:7");
  EXPECT(kvf_register_memory(A, UINT64_MAX - 1, 4, "cpu:0"), KVF_STATUS_ADDRESS_OVERFLOW,
         "0xfffffffffffffffe");
  /* Host memory must be mapped readable and writable here: a peer's
   * transfer would fault on anything else. 0x1000 lies below the lowest
   * address the kernel maps by default. */
  EXPECT(kvf_register_memory(A, 0x1000, 4096, "cpu:0"), KVF_STATUS_REGION_NOT_MAPPED, "0x1000",
         "nothing is mapped");
  EXPECT(kvf_register_memory(A, 0x1000, 4096, NULL), KVF_STATUS_REGION_NOT_MAPPED, "0x1000");
  addrs[0] = s;
  lens[0] = 64;
  addrs[1] = 0x1000;
  lens[1] = 64;
  EXPECT(kvf_register_memory_batch(A, addrs, lens, 2, "cpu:0"), KVF_STATUS_REGION_NOT_MAPPED,
         "0x1000");
  EXPECT(kvf_unregister_memory(A, 0x1000), KVF_STATUS_NOT_REGISTERED, "0x1000");
  /* None of the refused calls registered anything. */
  CHECK(!is_registered(A, s, 64));

  /* Accepted location strings. */
  for (i = 0; i < sizeof locs / sizeof locs[0]; i++) {
    check_(kvf_register_memory(A, s, 64, locs[i]) == KVF_STATUS_OK, __LINE__,
           "location \"%s\" refused: %s", locs[i], kvf_last_error());
    EXPECT(kvf_unregister_memory(A, s), KVF_STATUS_OK, NULL);
  }

  /* Batches: all or none. */
  addrs[0] = s;
  lens[0] = 64;
  addrs[1] = s + 32; /* overlaps the first of the same batch */
  lens[1] = 64;
  EXPECT(kvf_register_memory_batch(NULL, addrs, lens, 2, NULL), KVF_STATUS_NULL_POINTER,
         "engine");
  EXPECT(kvf_register_memory_batch(A, NULL, lens, 2, NULL), KVF_STATUS_NULL_POINTER, "addrs");
  EXPECT(kvf_register_memory_batch(A, addrs, NULL, 2, NULL), KVF_STATUS_NULL_POINTER, "lens");
  EXPECT(kvf_register_memory_batch(A, addrs, lens, 0, NULL), KVF_STATUS_INVALID_ARGUMENT,
         "n == 0");
  EXPECT(kvf_register_memory_batch(A, NULL, NULL, 0, NULL), KVF_STATUS_INVALID_ARGUMENT,
         "n == 0");
  EXPECT(kvf_register_memory_batch(A, addrs, lens, 2, NULL), KVF_STATUS_REGION_OVERLAP,
         hex(s + 32), hex(s));
  CHECK(!is_registered(A, s, 64));
  addrs[1] = U(abuf) + 8; /* overlaps a region registered earlier */
  lens[1] = 8;
  EXPECT(kvf_register_memory_batch(A, addrs, lens, 2, NULL), KVF_STATUS_REGION_OVERLAP,
         hex(U(abuf) + 8));
  CHECK(!is_registered(A, s, 64));
  lens[1] = 0;
  addrs[1] = s + 1024;
  EXPECT(kvf_register_memory_batch(A, addrs, lens, 2, "cpu:0"), KVF_STATUS_ZERO_LENGTH_REGION,
         hex(s + 1024));
  CHECK(!is_registered(A, s, 64));
  EXPECT(kvf_register_memory_batch(A, addrs, lens, 1, "npu:0"), KVF_STATUS_UNSUPPORTED, "npu:0");
  CHECK(!is_registered(A, s, 64));

  /* Three adjacent regions in one batch (adjacent is not overlapping). */
  for (i = 0; i < 3; i++) {
    addrs[i] = s + 1024 * i;
    lens[i] = 1024;
  }
  EXPECT(kvf_register_memory_batch(A, addrs, lens, 3, "cpu:0"), KVF_STATUS_OK, NULL);
  CHECK(is_registered(A, s + 2048, 1024));

  /* Unregistration: unknown, interior, NULL, n == 0, duplicates, and a
   * batch with one unknown address leaves every region registered. */
  EXPECT(kvf_unregister_memory(NULL, s), KVF_STATUS_NULL_POINTER, "engine");
  EXPECT(kvf_unregister_memory(A, s + 3072), KVF_STATUS_NOT_REGISTERED, hex(s + 3072));
  EXPECT(kvf_unregister_memory(A, s + 1), KVF_STATUS_NOT_REGISTERED, hex(s + 1));
  EXPECT(kvf_unregister_memory(A, 0), KVF_STATUS_NOT_REGISTERED, "0x0");
  EXPECT(kvf_unregister_memory_batch(A, NULL, 1), KVF_STATUS_NULL_POINTER, "addrs");
  EXPECT(kvf_unregister_memory_batch(NULL, addrs, 1), KVF_STATUS_NULL_POINTER, "engine");
  EXPECT(kvf_unregister_memory_batch(A, addrs, 0), KVF_STATUS_INVALID_ARGUMENT, "n == 0");
  addrs[2] = s + 4000;
  EXPECT(kvf_unregister_memory_batch(A, addrs, 3), KVF_STATUS_NOT_REGISTERED, hex(s + 4000));
  addrs[2] = s; /* a duplicate */
  EXPECT(kvf_unregister_memory_batch(A, addrs, 3), KVF_STATUS_NOT_REGISTERED, hex(s));
  CHECK(is_registered(A, s, 1024));
  CHECK(is_registered(A, s + 1024, 1024));
  CHECK(is_registered(A, s + 2048, 1024));
  addrs[2] = s + 2048;
  EXPECT(kvf_unregister_memory_batch(A, addrs, 3), KVF_STATUS_OK, NULL);
  CHECK(!is_registered(A, s, 3072));

  /* Unregistering twice. */
  EXPECT(kvf_register_memory(A, s, 4096, NULL), KVF_STATUS_OK, NULL);
  EXPECT(kvf_unregister_memory(A, s), KVF_STATUS_OK, NULL);
  EXPECT(kvf_unregister_memory(A, s), KVF_STATUS_NOT_REGISTERED, hex(s));
  EXPECT(kvf_unregister_memory_batch(A, addrs, 1), KVF_STATUS_NOT_REGISTERED, hex(s));

  /* Both engines may register the same memory. */
  EXPECT(kvf_register_memory(A, s, 4096, NULL), KVF_STATUS_OK, NULL);
  EXPECT(kvf_register_memory(B, s, 4096, NULL), KVF_STATUS_OK, NULL);
  EXPECT(kvf_unregister_memory(A, s), KVF_STATUS_OK, NULL);
  EXPECT(kvf_unregister_memory(B, s), KVF_STATUS_OK, NULL);
  free(spare);
}

/* ---- synchronous transfers -------------------------------------------- */

/* Ops of mixed sizes at mixed offsets: page-sized, multi-slice (A slices at
 * 4 KiB), single bytes, unaligned, and two contiguous ops that coalesce. */
#define NOPS 7
static const uint64_t op_local_off[NOPS] = {0, 8192, 40000, 40001, 65536, 69632, LEN - 1};
static const uint64_t op_remote_off[NOPS] = {4096, 100000, 7, 300001, 500000, 504096, 0};
static const uint64_t op_len[NOPS] = {4096, 4096 * 5 + 17, 1, 999, 4096, 3000, 1};

static void ops_for(const uint8_t *local, const uint8_t *remote, uint64_t *l, uint64_t *r,
                    uint64_t *n) {
  size_t i;
  for (i = 0; i < NOPS; i++) {
    l[i] = U(local) + op_local_off[i];
    r[i] = U(remote) + op_remote_off[i];
    n[i] = op_len[i];
  }
}

/* What `dst` must hold after the ops moved bytes from `src` into it. */
static void apply_ops(uint8_t *dst, const uint8_t *src, int dst_is_local) {
  size_t i;
  for (i = 0; i < NOPS; i++) {
    if (dst_is_local) {
      memcpy(dst + op_local_off[i], src + op_remote_off[i], op_len[i]);
    } else {
      memcpy(dst + op_remote_off[i], src + op_local_off[i], op_len[i]);
    }
  }
}

static void test_sync_transfers(void) {
  uint64_t l[NOPS], r[NOPS], n[NOPS];
  uint8_t *want = xmalloc(LEN);

  /* Read: B's bytes land in A's buffer at the ops' places, nowhere else. */
  fill(abuf, LEN, 1);
  fill(bbuf, LEN, 2);
  memcpy(want, abuf, LEN);
  apply_ops(want, bbuf, 1);
  ops_for(abuf, bbuf, l, r, n);
  EXPECT(kvf_transfer_sync(A, b_name, KVF_OP_READ, l, r, n, NOPS), KVF_STATUS_OK, NULL);
  CHECK(memcmp(abuf, want, LEN) == 0);

  /* Write: A's bytes land in B's buffer. */
  fill(abuf, LEN, 3);
  fill(bbuf, LEN, 4);
  memcpy(want, bbuf, LEN);
  apply_ops(want, abuf, 0);
  EXPECT(kvf_transfer_sync(A, b_name, KVF_OP_WRITE, l, r, n, NOPS), KVF_STATUS_OK, NULL);
  CHECK(memcmp(bbuf, want, LEN) == 0);

  /* The other direction of initiative: B reads from A. */
  fill(abuf, LEN, 5);
  fill(bbuf, LEN, 6);
  ops_for(bbuf, abuf, l, r, n);
  memcpy(want, bbuf, LEN);
  apply_ops(want, abuf, 1);
  EXPECT(kvf_transfer_sync(B, a_name, KVF_OP_READ, l, r, n, NOPS), KVF_STATUS_OK, NULL);
  CHECK(memcmp(bbuf, want, LEN) == 0);

  /* A whole buffer in one op, and "localhost" names the same engine. */
  {
    char alias[64];
    uint64_t one_l = U(abuf), one_r = U(bbuf), one_n = LEN;
    snprintf(alias, sizeof alias, "localhost:%s", strchr(b_name, ':') + 1);
    fill(bbuf, LEN, 7);
    EXPECT(kvf_transfer_sync(A, alias, KVF_OP_READ, &one_l, &one_r, &one_n, 1), KVF_STATUS_OK,
           NULL);
    CHECK(memcmp(abuf, bbuf, LEN) == 0);
  }
  free(want);
}

/* One refused request, sync and async: the status, the message, nothing
 * moved, and no batch id handed out. */
static void refused_(int line, const char *what, const kvf_engine *e, const char *session,
                     uint32_t opcode, const uint64_t *l, const uint64_t *r, const uint64_t *n,
                     size_t count, kvf_status want, const char *const *frags) {
  uint64_t batch = 0xabad1dea;
  char call[160];
  snprintf(call, sizeof call, "%s (sync, %s)", what, opcode == KVF_OP_WRITE ? "write" : "read");
  snapshot();
  prime_last_error();
  expect_(kvf_transfer_sync(e, session, opcode, l, r, n, count), want, line, call, frags);
  check_(unchanged(), line, "%s: bytes moved although the call was refused", call);

  snprintf(call, sizeof call, "%s (submit, %s)", what, opcode == KVF_OP_WRITE ? "write" : "read");
  prime_last_error();
  expect_(kvf_batch_submit(e, session, opcode, l, r, n, count, &batch), want, line, call, frags);
  check_(batch == 0xabad1dea, line, "%s: out_batch written on failure", call);
  /* Wait a moment: a batch started by mistake would move bytes later. */
  sleep_us(2000);
  check_(unchanged(), line, "%s: bytes moved although the call was refused", call);
}

#define REFUSED(what, e, session, opcode, l, r, n, count, want, ...)                  \
  refused_(__LINE__, what, e, session, opcode, l, r, n, count, want,                  \
           (const char *const[]){__VA_ARGS__, NULL})

static void test_refused_transfers(void) {
  /* Op 0 is valid and spans several slices; op 1 is made bad. A refused
   * batch must not move op 0's bytes either. */
  uint64_t l[2], r[2], n[2];
  uint8_t *unregistered = xmalloc(4096);
  const uint32_t opcodes[2] = {KVF_OP_READ, KVF_OP_WRITE};
  char freed_session[64];
  size_t k;

  {
    kvf_engine *gone = new_engine(0, 0, 0);
    engine_name(gone, freed_session, sizeof freed_session);
    kvf_engine_free(gone);
  }
  fill(abuf, LEN, 11);
  fill(bbuf, LEN, 12);

  for (k = 0; k < 2; k++) {
    const uint32_t op = opcodes[k];
#define RESET()                    \
  do {                             \
    l[0] = U(abuf);                \
    r[0] = U(bbuf) + 64;           \
    n[0] = 3 * 4096 + 5;           \
    l[1] = U(abuf) + 200000;       \
    r[1] = U(bbuf) + 300000;       \
    n[1] = 4096;                   \
  } while (0)

    RESET();
    n[1] = 0;
    REFUSED("zero-length op", A, b_name, op, l, r, n, 2, KVF_STATUS_ZERO_LENGTH_OP, "op 1",
            "zero");

    RESET();
    l[1] = U(abuf) + LEN - 8;
    n[1] = 16;
    REFUSED("local range past the region", A, b_name, op, l, r, n, 2,
            KVF_STATUS_LOCAL_OUT_OF_RANGE, "op 1", hex(U(abuf) + LEN - 8), "local");

    RESET();
    l[1] = U(unregistered);
    REFUSED("local range never registered", A, b_name, op, l, r, n, 2,
            KVF_STATUS_LOCAL_OUT_OF_RANGE, "op 1", hex(U(unregistered)));

    RESET();
    r[1] = U(bbuf) + LEN - 8;
    n[1] = 16;
    REFUSED("remote range past the region", A, b_name, op, l, r, n, 2,
            KVF_STATUS_REMOTE_OUT_OF_RANGE, "op 1", hex(U(bbuf) + LEN - 8), b_name);

    RESET();
    r[1] = U(unregistered);
    REFUSED("remote range the peer never registered", A, b_name, op, l, r, n, 2,
            KVF_STATUS_REMOTE_OUT_OF_RANGE, "op 1", hex(U(unregistered)));

    RESET();
    l[1] = UINT64_MAX - 4;
    n[1] = 16;
    REFUSED("local address overflow", A, b_name, op, l, r, n, 2, KVF_STATUS_ADDRESS_OVERFLOW,
            "op 1", "0xfffffffffffffffb", "overflows");

    RESET();
    r[1] = UINT64_MAX - 4;
    n[1] = 16;
    REFUSED("remote address overflow", A, b_name, op, l, r, n, 2, KVF_STATUS_ADDRESS_OVERFLOW,
            "op 1", "0xfffffffffffffffb");

    RESET();
    n[1] = UINT64_MAX;
    REFUSED("length overflow", A, b_name, op, l, r, n, 2, KVF_STATUS_ADDRESS_OVERFLOW, "op 1");

    RESET();
    REFUSED("n == 0", A, b_name, op, l, r, n, 0, KVF_STATUS_INVALID_ARGUMENT, "n == 0");
    REFUSED("n == 0, NULL arrays", A, b_name, op, NULL, NULL, NULL, 0,
            KVF_STATUS_INVALID_ARGUMENT, "n == 0");
    REFUSED("NULL engine", NULL, b_name, op, l, r, n, 2, KVF_STATUS_NULL_POINTER, "engine");
    REFUSED("NULL session", A, NULL, op, l, r, n, 2, KVF_STATUS_NULL_POINTER, "session");
    REFUSED("NULL local_addrs", A, b_name, op, NULL, r, n, 2, KVF_STATUS_NULL_POINTER,
            "local_addrs");
    REFUSED("NULL remote_addrs", A, b_name, op, l, NULL, n, 2, KVF_STATUS_NULL_POINTER,
            "remote_addrs");
    REFUSED("NULL lens", A, b_name, op, l, r, NULL, 2, KVF_STATUS_NULL_POINTER, "lens");

    REFUSED("session without port", A, "nohost", op, l, r, n, 2, KVF_STATUS_BAD_SESSION,
            "nohost");
    REFUSED("session with port 0", A, "host:0", op, l, r, n, 2, KVF_STATUS_BAD_SESSION,
            "host:0", "port 0");
    REFUSED("session with bad IPv6", A, "[zz]:1", op, l, r, n, 2, KVF_STATUS_BAD_SESSION,
            "[zz]:1");
    REFUSED("empty session", A, "", op, l, r, n, 2, KVF_STATUS_BAD_SESSION, "session");
    REFUSED("session port too big", A, "127.0.0.1:65536", op, l, r, n, 2,
            KVF_STATUS_BAD_SESSION, "65536");
    REFUSED("session without host", A, ":80", op, l, r, n, 2, KVF_STATUS_BAD_SESSION, ":80");
    REFUSED("session with a space", A, "a b:80", op, l, r, n, 2, KVF_STATUS_BAD_SESSION,
            "a b:80");
    /* Port 1: no engine of this process listens there (ours use free
     * ephemeral ports or 15000-17000). */
    REFUSED("unreachable session", A, "127.0.0.1:1", op, l, r, n, 2,
            KVF_STATUS_PEER_UNREACHABLE, "127.0.0.1:1");
    REFUSED("session of a freed engine", A, freed_session, op, l, r, n, 2,
            KVF_STATUS_PEER_UNREACHABLE, freed_session);
  }
  RESET();
  REFUSED("opcode 2", A, b_name, 2, l, r, n, 2, KVF_STATUS_INVALID_ARGUMENT, "opcode 2");
  REFUSED("opcode UINT32_MAX", A, b_name, UINT32_MAX, l, r, n, 2, KVF_STATUS_INVALID_ARGUMENT,
          "opcode 4294967295");
#undef RESET

  /* NULL out_batch fails before anything starts. */
  l[0] = U(abuf);
  r[0] = U(bbuf);
  n[0] = 4096;
  snapshot();
  EXPECT(kvf_batch_submit(A, b_name, KVF_OP_READ, l, r, n, 1, NULL), KVF_STATUS_NULL_POINTER,
         "out_batch");
  sleep_us(2000);
  CHECK(unchanged());
  free(unregistered);
}

/* ---- asynchronous batches --------------------------------------------- */

/* Polls until the batch is no longer in progress (at most ~20 s). */
static kvf_status poll_until_done(const kvf_engine *e, uint64_t id, int *saw_in_progress) {
  kvf_status s = KVF_STATUS_IN_PROGRESS;
  long i;
  for (i = 0; i < 200000 && s == KVF_STATUS_IN_PROGRESS; i++) {
    s = kvf_batch_poll(e, id);
    if (s == KVF_STATUS_IN_PROGRESS) {
      if (saw_in_progress) {
        *saw_in_progress = 1;
      }
      sleep_us(100);
    }
  }
  return s;
}

static void test_async_batches(void) {
  uint64_t l[NOPS], r[NOPS], n[NOPS];
  uint8_t *want = xmalloc(LEN);
  uint64_t id = 0, id2 = 0;
  kvf_status st;
  size_t i;
  char index_text[32];

  /* Read. */
  fill(abuf, LEN, 21);
  fill(bbuf, LEN, 22);
  memcpy(want, abuf, LEN);
  apply_ops(want, bbuf, 1);
  ops_for(abuf, bbuf, l, r, n);
  EXPECT(kvf_batch_submit(A, b_name, KVF_OP_READ, l, r, n, NOPS, &id), KVF_STATUS_OK, NULL);
  CHECK(id != 0);
  EXPECT(poll_until_done(A, id, NULL), KVF_STATUS_OK, NULL);
  EXPECT(kvf_batch_wait(A, id, KVF_WAIT_FOREVER), KVF_STATUS_OK, NULL);
  EXPECT(kvf_batch_wait(A, id, 0), KVF_STATUS_OK, NULL);
  for (i = 0; i < NOPS; i++) {
    kvf_status os = KVF_STATUS_INTERNAL;
    EXPECT(kvf_batch_op_status(A, id, i, &os), KVF_STATUS_OK, NULL);
    check_(os == KVF_STATUS_OK, __LINE__, "op %u: status %d", (unsigned)i, (int)os);
  }
  CHECK(memcmp(abuf, want, LEN) == 0);

  /* op_status: index out of range, NULL out, NULL engine. */
  snprintf(index_text, sizeof index_text, "op index %d", NOPS);
  st = 77;
  EXPECT(kvf_batch_op_status(A, id, NOPS, &st), KVF_STATUS_INVALID_ARGUMENT, index_text, hex(id));
  CHECK(st == 77);
  EXPECT(kvf_batch_op_status(A, id, SIZE_MAX, &st), KVF_STATUS_INVALID_ARGUMENT, "op index");
  EXPECT(kvf_batch_op_status(A, id, 0, NULL), KVF_STATUS_NULL_POINTER, "out_status");
  EXPECT(kvf_batch_op_status(NULL, id, 0, &st), KVF_STATUS_NULL_POINTER, "engine");
  EXPECT(kvf_batch_poll(NULL, id), KVF_STATUS_NULL_POINTER, "engine");
  EXPECT(kvf_batch_wait(NULL, id, 0), KVF_STATUS_NULL_POINTER, "engine");
  EXPECT(kvf_batch_free(NULL, id), KVF_STATUS_NULL_POINTER, "engine");
  CHECK(st == 77);

  /* Ids are per engine: B has no such batch. */
  EXPECT(kvf_batch_poll(B, id), KVF_STATUS_BAD_BATCH_ID, hex(id));

  /* Free, then every use of the id is refused, freeing again too. */
  EXPECT(kvf_batch_free(A, id), KVF_STATUS_OK, NULL);
  EXPECT(kvf_batch_free(A, id), KVF_STATUS_BAD_BATCH_ID, hex(id));
  EXPECT(kvf_batch_poll(A, id), KVF_STATUS_BAD_BATCH_ID, hex(id));
  EXPECT(kvf_batch_wait(A, id, KVF_WAIT_FOREVER), KVF_STATUS_BAD_BATCH_ID, hex(id));
  EXPECT(kvf_batch_op_status(A, id, 0, &st), KVF_STATUS_BAD_BATCH_ID, hex(id));
  CHECK(st == 77);

  /* Write, waited for without polling; its slot is reused under a new id,
   * and the old id stays invalid. */
  fill(abuf, LEN, 23);
  fill(bbuf, LEN, 24);
  memcpy(want, bbuf, LEN);
  apply_ops(want, abuf, 0);
  EXPECT(kvf_batch_submit(A, b_name, KVF_OP_WRITE, l, r, n, NOPS, &id2), KVF_STATUS_OK, NULL);
  CHECK(id2 != 0 && id2 != id);
  EXPECT(kvf_batch_poll(A, id), KVF_STATUS_BAD_BATCH_ID, hex(id));
  EXPECT(kvf_batch_wait(A, id2, KVF_WAIT_FOREVER), KVF_STATUS_OK, NULL);
  EXPECT(kvf_batch_poll(A, id2), KVF_STATUS_OK, NULL);
  CHECK(memcmp(bbuf, want, LEN) == 0);

  /* Made-up ids, including neighbours of a live one. */
  EXPECT(kvf_batch_poll(A, 0), KVF_STATUS_BAD_BATCH_ID, "0x0");
  EXPECT(kvf_batch_wait(A, 0, 0), KVF_STATUS_BAD_BATCH_ID, "0x0");
  EXPECT(kvf_batch_free(A, 0), KVF_STATUS_BAD_BATCH_ID, "0x0");
  EXPECT(kvf_batch_op_status(A, 0, 0, &st), KVF_STATUS_BAD_BATCH_ID, "0x0");
  EXPECT(kvf_batch_poll(A, UINT64_C(0xdeadbeefcafef00d)), KVF_STATUS_BAD_BATCH_ID,
         "0xdeadbeefcafef00d");
  EXPECT(kvf_batch_free(A, UINT64_C(0xdeadbeefcafef00d)), KVF_STATUS_BAD_BATCH_ID,
         "0xdeadbeefcafef00d");
  EXPECT(kvf_batch_poll(A, UINT64_MAX), KVF_STATUS_BAD_BATCH_ID, "0xffffffffffffffff");
  EXPECT(kvf_batch_poll(A, id2 + 1), KVF_STATUS_BAD_BATCH_ID, hex(id2 + 1));
  EXPECT(kvf_batch_poll(A, id2 ^ (UINT64_C(1) << 32)), KVF_STATUS_BAD_BATCH_ID,
         hex(id2 ^ (UINT64_C(1) << 32)));
  EXPECT(kvf_batch_poll(A, id2 & 0xffffffffu), KVF_STATUS_BAD_BATCH_ID, hex(id2 & 0xffffffffu));
  /* None of that disturbed the live batch. */
  EXPECT(kvf_batch_poll(A, id2), KVF_STATUS_OK, NULL);
  EXPECT(kvf_batch_free(A, id2), KVF_STATUS_OK, NULL);
  EXPECT(kvf_batch_free(A, id2), KVF_STATUS_BAD_BATCH_ID, hex(id2));
  free(want);
}

/* Engines with one async worker run batches one after the other: a batch
 * submitted behind a 24 MiB one is in progress for a while. The checks that
 * need a batch in progress retry until they have seen it (a loaded machine
 * could let the big batch finish before the next call). The big batch
 * fills big_w[0, BIG_WORK); the rest of big_w is for the batches queued
 * behind it. */
#define BIG (32 * MIB)
#define BIG_WORK (24 * MIB)
static kvf_engine *W; /* one async worker */
static char w_name[64];
static uint8_t *big_b, *big_w; /* BIG bytes, registered on B and W */

static uint64_t submit_big(uint32_t opcode) {
  uint64_t l[8], r[8], n[8], id = 0;
  size_t i;
  for (i = 0; i < 8; i++) {
    l[i] = U(big_w) + i * (BIG_WORK / 8);
    r[i] = U(big_b) + i * (BIG_WORK / 8);
    n[i] = BIG_WORK / 8;
  }
  REQUIRE(kvf_batch_submit(W, b_name, opcode, l, r, n, 8, &id) == KVF_STATUS_OK);
  return id;
}

static void finish_batch(const kvf_engine *e, uint64_t id) {
  EXPECT(kvf_batch_wait(e, id, KVF_WAIT_FOREVER), KVF_STATUS_OK, NULL);
  EXPECT(kvf_batch_free(e, id), KVF_STATUS_OK, NULL);
}

static void test_batch_in_progress(void) {
  int saw_poll = 0, saw_op = 0, saw_timeout = 0, saw_busy = 0, attempt;
  for (attempt = 0; attempt < 6 && !(saw_poll && saw_op && saw_timeout && saw_busy);
       attempt++) {
    uint64_t big, small = 0;
    uint64_t l[2], r[2], n[2];
    kvf_status s, os = KVF_STATUS_INTERNAL;
    fill(big_b, BIG, 30 + attempt);
    memset(big_w, 0, BIG);
    big = submit_big(KVF_OP_READ);
    /* Two ops, queued behind the big batch on W's one worker. */
    l[0] = U(big_w) + BIG - 8192;
    r[0] = U(bbuf);
    n[0] = 4096;
    l[1] = U(big_w) + BIG - 4096;
    r[1] = U(bbuf) + 8192;
    n[1] = 4096;
    REQUIRE(kvf_batch_submit(W, b_name, KVF_OP_READ, l, r, n, 2, &small) == KVF_STATUS_OK);

    s = kvf_batch_poll(W, small);
    CHECK(s == KVF_STATUS_IN_PROGRESS || s == KVF_STATUS_OK);
    saw_poll |= s == KVF_STATUS_IN_PROGRESS;

    EXPECT(kvf_batch_op_status(W, small, 1, &os), KVF_STATUS_OK, NULL);
    CHECK(os == KVF_STATUS_IN_PROGRESS || os == KVF_STATUS_OK);
    saw_op |= os == KVF_STATUS_IN_PROGRESS;

    prime_last_error();
    s = kvf_batch_wait(W, small, 0);
    if (s == KVF_STATUS_TIMEOUT) {
      saw_timeout = 1;
      EXPECT_GOT(s, KVF_STATUS_TIMEOUT, "timed out");
      /* It keeps running: wait again. */
    } else {
      EXPECT_GOT(s, KVF_STATUS_OK, NULL);
    }

    prime_last_error();
    s = kvf_batch_free(W, small);
    if (s == KVF_STATUS_BATCH_IN_PROGRESS) {
      saw_busy = 1;
      EXPECT_GOT(s, KVF_STATUS_BATCH_IN_PROGRESS, hex(small), "in progress");
      /* Refused: the batch is still there and finishes normally. */
      finish_batch(W, small);
    } else {
      EXPECT_GOT(s, KVF_STATUS_OK, NULL);
    }
    finish_batch(W, big);
    CHECK(memcmp(big_w, big_b, BIG_WORK) == 0);
    CHECK(memcmp(big_w + BIG - 8192, bbuf, 4096) == 0);
    CHECK(memcmp(big_w + BIG - 4096, bbuf + 8192, 4096) == 0);
  }
  CHECK(saw_poll);    /* kvf_batch_poll gave KVF_STATUS_IN_PROGRESS */
  CHECK(saw_op);      /* kvf_batch_op_status gave KVF_STATUS_IN_PROGRESS */
  CHECK(saw_timeout); /* kvf_batch_wait(0) gave KVF_STATUS_TIMEOUT */
  CHECK(saw_busy);    /* kvf_batch_free gave KVF_STATUS_BATCH_IN_PROGRESS */
}

/* A batch that fails while it runs (not at validation): W learned B's
 * regions earlier; B unregisters one; W's next batch into it passes the
 * check against W's cached view and fails when the copy finds the region
 * gone. (If the library ever re-validates at submit, the submit itself
 * fails with the same status: also accepted.) */
static void test_batch_failing_at_run_time(void) {
  uint8_t *gone = xmalloc(8192);
  uint64_t l = U(big_w), r = U(gone) + 100, n = 4096, id = 0;
  kvf_status s, os = KVF_STATUS_INTERNAL;

  memset(gone, 0x5a, 8192);
  REQUIRE(kvf_register_memory(B, U(gone), 8192, NULL) == KVF_STATUS_OK);
  EXPECT(kvf_transfer_sync(W, b_name, KVF_OP_READ, &l, &r, &n, 1), KVF_STATUS_OK, NULL);
  EXPECT(kvf_unregister_memory(B, U(gone)), KVF_STATUS_OK, NULL);
  fill(big_w, 4096, 40);

  prime_last_error();
  s = kvf_batch_submit(W, b_name, KVF_OP_WRITE, &l, &r, &n, 1, &id);
  if (s == KVF_STATUS_OK) {
    EXPECT(kvf_batch_wait(W, id, KVF_WAIT_FOREVER), KVF_STATUS_REMOTE_OUT_OF_RANGE, "op 0",
           hex(r), b_name);
    EXPECT(kvf_batch_poll(W, id), KVF_STATUS_REMOTE_OUT_OF_RANGE, "op 0", hex(r));
    EXPECT(kvf_batch_op_status(W, id, 0, &os), KVF_STATUS_OK, NULL);
    CHECK(os == KVF_STATUS_REMOTE_OUT_OF_RANGE);
    EXPECT(kvf_batch_free(W, id), KVF_STATUS_OK, NULL);
  } else {
    EXPECT_GOT(s, KVF_STATUS_REMOTE_OUT_OF_RANGE, "op 0", hex(r));
  }
  /* The sync path reports the same, and nothing was written either way. */
  EXPECT(kvf_transfer_sync(W, b_name, KVF_OP_WRITE, &l, &r, &n, 1),
         KVF_STATUS_REMOTE_OUT_OF_RANGE, "op 0", hex(r));
  {
    size_t i;
    int intact = 1;
    for (i = 0; i < 8192; i++) {
      intact &= gone[i] == 0x5a;
    }
    CHECK(intact);
  }
  free(gone);
}

/* Unregistering local memory that submitted batches still use returns OK
 * only once they are all complete; then the memory is freed (ASan would
 * catch a later access). */
static void test_unregister_waits_for_local_batches(void) {
  int attempt, saw_in_flight = 0;
  for (attempt = 0; attempt < 4 && !saw_in_flight; attempt++) {
    uint8_t *dst = xmalloc(BIG / 2);
    uint64_t ids[4];
    size_t i;
    fill(big_b, BIG, 50 + attempt);
    REQUIRE(kvf_register_memory(W, U(dst), BIG / 2, "cpu:0") == KVF_STATUS_OK);
    for (i = 0; i < 4; i++) {
      uint64_t l = U(dst) + i * (BIG / 8), r = U(big_b) + i * (BIG / 8), n = BIG / 8;
      REQUIRE(kvf_batch_submit(W, b_name, KVF_OP_READ, &l, &r, &n, 1, &ids[i]) ==
              KVF_STATUS_OK);
    }
    saw_in_flight = kvf_batch_poll(W, ids[3]) == KVF_STATUS_IN_PROGRESS;
    EXPECT(kvf_unregister_memory(W, U(dst)), KVF_STATUS_OK, NULL);
    for (i = 0; i < 4; i++) {
      /* Complete the moment unregistration returned: no waiting here. */
      EXPECT(kvf_batch_poll(W, ids[i]), KVF_STATUS_OK, NULL);
      EXPECT(kvf_batch_free(W, ids[i]), KVF_STATUS_OK, NULL);
    }
    CHECK(memcmp(dst, big_b, BIG / 2) == 0);
    /* It is unregistered: new batches into it are refused. */
    {
      uint64_t l = U(dst), r = U(big_b), n = 1;
      EXPECT(kvf_transfer_sync(W, b_name, KVF_OP_READ, &l, &r, &n, 1),
             KVF_STATUS_LOCAL_OUT_OF_RANGE, "op 0", hex(U(dst)));
    }
    free(dst);
  }
  CHECK(saw_in_flight);
}

/* The peer unregistering memory that queued writes target: each write
 * either completed before or fails with REMOTE_OUT_OF_RANGE; nothing is
 * written after unregistration returned (the memory is freed at once). */
static void test_peer_unregisters_under_writes(void) {
  int attempt, saw_failure = 0;
  for (attempt = 0; attempt < 6 && !saw_failure; attempt++) {
    uint8_t *target = xmalloc(4 * MIB);
    uint64_t big, ids[4];
    size_t i;
    REQUIRE(kvf_register_memory(B, U(target), 4 * MIB, NULL) == KVF_STATUS_OK);
    big = submit_big(KVF_OP_READ); /* keeps W's only worker busy */
    for (i = 0; i < 4; i++) {
      uint64_t l = U(big_w) + i * MIB, r = U(target) + i * MIB, n = MIB;
      REQUIRE(kvf_batch_submit(W, b_name, KVF_OP_WRITE, &l, &r, &n, 1, &ids[i]) ==
              KVF_STATUS_OK);
    }
    EXPECT(kvf_unregister_memory(B, U(target)), KVF_STATUS_OK, NULL);
    free(target);
    for (i = 0; i < 4; i++) {
      kvf_status s;
      prime_last_error();
      s = kvf_batch_wait(W, ids[i], KVF_WAIT_FOREVER);
      if (s != KVF_STATUS_OK) {
        kvf_status os = KVF_STATUS_INTERNAL;
        saw_failure = 1;
        EXPECT_GOT(s, KVF_STATUS_REMOTE_OUT_OF_RANGE, "op 0", b_name);
        EXPECT(kvf_batch_op_status(W, ids[i], 0, &os), KVF_STATUS_OK, NULL);
        CHECK(os == KVF_STATUS_REMOTE_OUT_OF_RANGE);
      }
      EXPECT(kvf_batch_free(W, ids[i]), KVF_STATUS_OK, NULL);
    }
    finish_batch(W, big);
  }
  CHECK(saw_failure);
}

/* kvf_engine_free waits for the engine's own batches: their bytes are all
 * there when it returns. */
static void test_engine_free_waits_for_batches(void) {
  kvf_engine *e = new_engine(0, 1, 0);
  uint8_t *dst = xmalloc(BIG);
  size_t i;
  memset(dst, 0, BIG);
  fill(big_b, BIG, 60);
  REQUIRE(kvf_register_memory(e, U(dst), BIG, "cpu:0") == KVF_STATUS_OK);
  for (i = 0; i < 4; i++) {
    uint64_t l = U(dst) + i * (BIG / 4), r = U(big_b) + i * (BIG / 4), n = BIG / 4, id;
    REQUIRE(kvf_batch_submit(e, b_name, KVF_OP_READ, &l, &r, &n, 1, &id) == KVF_STATUS_OK);
  }
  kvf_engine_free(e); /* the batches are never freed by id: the engine frees them */
  CHECK(memcmp(dst, big_b, BIG) == 0);
  free(dst);
}

/* A peer engine freed while another reads from it: its memory may be freed
 * once kvf_engine_free returns; readers get data or a clean error. */
static void test_peer_freed_under_reads(void) {
  kvf_engine *p = new_engine(0, 0, 0);
  char p_name[64];
  uint8_t *src = xmalloc(4 * MIB);
  uint64_t big, ids[4];
  size_t i;
  engine_name(p, p_name, sizeof p_name);
  fill(src, 4 * MIB, 70);
  REQUIRE(kvf_register_memory(p, U(src), 4 * MIB, NULL) == KVF_STATUS_OK);
  big = submit_big(KVF_OP_READ);
  for (i = 0; i < 4; i++) {
    uint64_t l = U(big_w) + BIG_WORK + i * MIB, r = U(src) + i * MIB, n = MIB;
    REQUIRE(kvf_batch_submit(W, p_name, KVF_OP_READ, &l, &r, &n, 1, &ids[i]) == KVF_STATUS_OK);
  }
  kvf_engine_free(p);
  free(src);
  for (i = 0; i < 4; i++) {
    kvf_status s = kvf_batch_wait(W, ids[i], KVF_WAIT_FOREVER);
    check_(s == KVF_STATUS_OK || s == KVF_STATUS_PEER_UNREACHABLE ||
               s == KVF_STATUS_REMOTE_OUT_OF_RANGE,
           __LINE__, "batch %u ended with %d: %s", (unsigned)i, (int)s, kvf_last_error());
    EXPECT(kvf_batch_free(W, ids[i]), KVF_STATUS_OK, NULL);
  }
  finish_batch(W, big);
  {
    uint64_t l = U(big_w), r = U(big_b), n = 1;
    EXPECT(kvf_transfer_sync(W, p_name, KVF_OP_READ, &l, &r, &n, 1),
           KVF_STATUS_PEER_UNREACHABLE, p_name);
  }
}

/* kvf_engine_close while another thread is inside a call: a timeout short
 * of that call changes nothing; an unbounded close waits for it; afterwards
 * every call fails cleanly and the handle stays valid until freed. */
struct blocked_call {
  kvf_engine *e;
  const char *session;
  uint64_t local;
  kvf_status status;
};

static void *blocked_call_main(void *arg) {
  struct blocked_call *c = arg;
  uint64_t r = 0x1000, n = 8;
  c->status = kvf_transfer_sync(c->e, c->session, KVF_OP_READ, &c->local, &r, &n, 1);
  return NULL;
}

static void test_engine_close(void) {
  kvf_config *cfg = NULL;
  kvf_engine *e = NULL;
  uint8_t *buf = xmalloc(4096);
  char session[64];
  struct sockaddr_in addr;
  socklen_t alen = sizeof addr;
  int silent = socket(AF_INET, SOCK_STREAM, 0);
  pthread_t t;
  struct blocked_call call;

  /* A "peer" that accepts connections and never answers. */
  memset(&addr, 0, sizeof addr);
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(silent >= 0 && bind(silent, (struct sockaddr *)&addr, sizeof addr) == 0);
  REQUIRE(listen(silent, 16) == 0);
  REQUIRE(getsockname(silent, (struct sockaddr *)&addr, &alen) == 0);
  snprintf(session, sizeof session, "127.0.0.1:%u", (unsigned)ntohs(addr.sin_port));

  REQUIRE(kvf_config_new(&cfg) == KVF_STATUS_OK);
  REQUIRE(kvf_config_set_hostname(cfg, "127.0.0.1") == KVF_STATUS_OK);
  REQUIRE(kvf_config_set_connect_timeout_ms(cfg, 1500) == KVF_STATUS_OK);
  REQUIRE(kvf_engine_new(cfg, &e) == KVF_STATUS_OK);
  kvf_config_free(cfg);
  REQUIRE(kvf_register_memory(e, U(buf), 4096, "cpu:0") == KVF_STATUS_OK);

  call.e = e;
  call.session = session;
  call.local = U(buf);
  call.status = KVF_STATUS_OK;
  REQUIRE(pthread_create(&t, NULL, blocked_call_main, &call) == 0);
  {
    struct timespec pause = {0, 200 * 1000 * 1000};
    nanosleep(&pause, NULL); /* the call is waiting for the silent peer */
  }
  EXPECT(kvf_engine_close(e, 10), KVF_STATUS_TIMEOUT, "still running");
  /* Nothing changed: the engine still works. */
  {
    uint16_t port = 0;
    EXPECT(kvf_engine_rpc_port(e, &port), KVF_STATUS_OK, NULL);
    CHECK(port != 0);
  }
  EXPECT(kvf_engine_close(e, KVF_WAIT_FOREVER), KVF_STATUS_OK, NULL);
  REQUIRE(pthread_join(t, NULL) == 0);
  CHECK(call.status != KVF_STATUS_OK); /* it failed on its own, then close went on */
  /* Closed: calls fail with a message, closing again is a no-op. */
  EXPECT(kvf_register_memory(e, U(buf), 4096, "cpu:0"), KVF_STATUS_INVALID_ARGUMENT,
         "engine is closed");
  {
    uint64_t l = U(buf), r = U(bbuf), n = 8;
    EXPECT(kvf_transfer_sync(e, b_name, KVF_OP_READ, &l, &r, &n, 1), KVF_STATUS_INVALID_ARGUMENT,
           "engine is closed");
  }
  EXPECT(kvf_engine_close(e, 0), KVF_STATUS_OK, NULL);
  EXPECT(kvf_engine_close(NULL, 0), KVF_STATUS_NULL_POINTER, "engine");
  kvf_engine_free(e);
  close(silent);
  free(buf);
}

/* A peer that stops answering mid-batch (SIGSTOP: its engine handshook,
 * then froze). KVF_STATUS_TIMEOUT must mean "still running, wait again"
 * and nothing else: a batch that the transfer timeout ended reports
 * KVF_STATUS_TRANSFER_TIMEOUT from every wait, poll and op status, so a
 * caller that loops while kvf_batch_wait says TIMEOUT stops. (It did not:
 * the batch's own failure was KVF_STATUS_TIMEOUT too.) */
#define SILENT_PEER_ARG "--silent-peer"

/* The child's side: an engine with 64 KiB registered, its name and the
 * buffer's address on stdout, then nothing until it is killed. */
static int run_silent_peer(void) {
  kvf_engine *e = new_engine(0, 0, 0);
  uint8_t *mem = xmalloc(65536);
  char name[64];
  memset(mem, 0x3c, 65536);
  REQUIRE(kvf_register_memory(e, U(mem), 65536, "cpu:0") == KVF_STATUS_OK);
  engine_name(e, name, sizeof name);
  printf("%s %" PRIu64 "\n", name, U(mem));
  fflush(stdout);
  for (;;) {
    pause();
  }
}

static void test_batch_ended_by_transfer_timeout(void) {
  int fds[2];
  pid_t pid;
  FILE *from_peer;
  char line[160], peer[64], transport[16];
  uint64_t remote = 0, id = 0, l, n = 4096;
  uint8_t *buf = xmalloc(65536);
  kvf_config *cfg = NULL;
  kvf_engine *e = NULL;
  kvf_status s, os = KVF_STATUS_OK;
  int rounds;

  REQUIRE(pipe(fds) == 0);
  pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    /* Only async-signal-safe calls between fork and exec. */
    dup2(fds[1], STDOUT_FILENO);
    close(fds[0]);
    close(fds[1]);
    execl("/proc/self/exe", "api_test", SILENT_PEER_ARG, (char *)NULL);
    _exit(127);
  }
  close(fds[1]);
  from_peer = fdopen(fds[0], "r");
  REQUIRE(from_peer != NULL && fgets(line, sizeof line, from_peer) != NULL);
  REQUIRE(sscanf(line, "%63s %" SCNu64, peer, &remote) == 2);

  /* tcp, so that the frozen process has to answer every request. */
  REQUIRE(kvf_config_new(&cfg) == KVF_STATUS_OK);
  REQUIRE(kvf_config_set_hostname(cfg, "127.0.0.1") == KVF_STATUS_OK);
  REQUIRE(kvf_config_set_port(cfg, 0) == KVF_STATUS_OK);
  REQUIRE(kvf_config_set_transport(cfg, "tcp") == KVF_STATUS_OK);
  REQUIRE(kvf_config_set_connect_timeout_ms(cfg, 1000) == KVF_STATUS_OK);
  REQUIRE(kvf_config_set_transfer_timeout_ms(cfg, 600) == KVF_STATUS_OK);
  REQUIRE(kvf_engine_new(cfg, &e) == KVF_STATUS_OK);
  kvf_config_free(cfg);
  REQUIRE(kvf_register_memory(e, U(buf), 65536, "cpu:0") == KVF_STATUS_OK);
  l = U(buf);
  /* Handshake while the peer answers; then it freezes. */
  EXPECT(kvf_engine_transport_to(e, peer, transport, sizeof transport, NULL), KVF_STATUS_OK,
         NULL);
  CHECK(strcmp(transport, "tcp") == 0);
  EXPECT(kvf_transfer_sync(e, peer, KVF_OP_READ, &l, &remote, &n, 1), KVF_STATUS_OK, NULL);
  CHECK(buf[0] == 0x3c && buf[4095] == 0x3c);
  REQUIRE(kill(pid, SIGSTOP) == 0);
  { /* Stopped, not just signalled: until then it may still answer. */
    int st = 0;
    REQUIRE(waitpid(pid, &st, WUNTRACED) == pid && WIFSTOPPED(st));
  }

  REQUIRE(kvf_batch_submit(e, peer, KVF_OP_READ, &l, &remote, &n, 1, &id) == KVF_STATUS_OK);
  /* Running: a short wait runs out, and says so. */
  EXPECT(kvf_batch_wait(e, id, 50), KVF_STATUS_TIMEOUT, hex(id));
  /* What a C caller does: wait again while TIMEOUT. It must end. */
  rounds = 0;
  do {
    prime_last_error();
    s = kvf_batch_wait(e, id, 10);
  } while (s == KVF_STATUS_TIMEOUT && ++rounds < 1000);
  EXPECT_GOT(s, KVF_STATUS_TRANSFER_TIMEOUT, "timed out", peer);
  /* Ended: every way of asking says TRANSFER_TIMEOUT, never TIMEOUT. */
  EXPECT(kvf_batch_wait(e, id, 0), KVF_STATUS_TRANSFER_TIMEOUT, "timed out");
  EXPECT(kvf_batch_wait(e, id, 10), KVF_STATUS_TRANSFER_TIMEOUT, "timed out");
  EXPECT(kvf_batch_wait(e, id, KVF_WAIT_FOREVER), KVF_STATUS_TRANSFER_TIMEOUT, "timed out");
  EXPECT(kvf_batch_poll(e, id), KVF_STATUS_TRANSFER_TIMEOUT, "timed out");
  EXPECT(kvf_batch_op_status(e, id, 0, &os), KVF_STATUS_OK, NULL);
  CHECK(os == KVF_STATUS_TRANSFER_TIMEOUT);
  EXPECT(kvf_batch_free(e, id), KVF_STATUS_OK, NULL);
  /* A synchronous transfer reports the same. */
  EXPECT(kvf_transfer_sync(e, peer, KVF_OP_READ, &l, &remote, &n, 1),
         KVF_STATUS_TRANSFER_TIMEOUT, "timed out");

  kvf_engine_free(e);
  kill(pid, SIGKILL);
  REQUIRE(waitpid(pid, NULL, 0) == pid);
  fclose(from_peer);
  free(buf);
}

/* ---- threads ---------------------------------------------------------- */

#define THREADS 4
#define ROUNDS 32
#define CHUNK 4096

struct worker {
  int index;
  int failures; /* counted here, reported by the main thread */
  char first_error[256];
};

static void *worker_main(void *arg) {
  struct worker *w = arg;
  const char *msg = kvf_last_error();
  int k;
  /* The last error is per thread: a new thread has none. */
  if (msg == NULL || msg[0] != '\0') {
    w->failures++;
    snprintf(w->first_error, sizeof w->first_error, "fresh thread's last error: %s",
             msg ? msg : "(NULL)");
  }
  for (k = 0; k < ROUNDS; k++) {
    /* Distinct areas per thread and round. */
    const size_t off = ((size_t)w->index * ROUNDS + (size_t)k) * CHUNK;
    uint64_t l = U(abuf) + off, r = U(bbuf) + off, n = CHUNK;
    uint32_t op = (k % 2) ? KVF_OP_WRITE : KVF_OP_READ;
    kvf_status s = kvf_transfer_sync(A, b_name, op, &l, &r, &n, 1);
    if (s != KVF_STATUS_OK || memcmp(abuf + off, bbuf + off, CHUNK) != 0) {
      if (w->failures++ == 0) {
        snprintf(w->first_error, sizeof w->first_error, "round %d: status %d: %s", k, (int)s,
                 kvf_last_error());
      }
    }
  }
  {
    /* hex() is not thread-safe: format here. */
    uint64_t bogus = UINT64_C(0x7700000000) + (uint64_t)w->index;
    char text[24];
    snprintf(text, sizeof text, "0x%" PRIx64, bogus);
    if (kvf_unregister_memory(A, bogus) != KVF_STATUS_NOT_REGISTERED ||
        strstr(kvf_last_error(), text) == NULL) {
      if (w->failures++ == 0) {
        snprintf(w->first_error, sizeof w->first_error, "own error not seen: %s",
                 kvf_last_error());
      }
    }
  }
  return NULL;
}

static void test_threads(void) {
  pthread_t t[THREADS];
  struct worker w[THREADS];
  char before[256];
  int i;
  fill(abuf, LEN, 80);
  fill(bbuf, LEN, 81);
  /* This thread's last error must survive the others' failures. */
  EXPECT(kvf_unregister_memory(A, 0x4242), KVF_STATUS_NOT_REGISTERED, "0x4242");
  snprintf(before, sizeof before, "%s", kvf_last_error());
  for (i = 0; i < THREADS; i++) {
    memset(&w[i], 0, sizeof w[i]);
    w[i].index = i;
    REQUIRE(pthread_create(&t[i], NULL, worker_main, &w[i]) == 0);
  }
  for (i = 0; i < THREADS; i++) {
    REQUIRE(pthread_join(t[i], NULL) == 0);
    check_(w[i].failures == 0, __LINE__, "thread %d: %d failures, first: %s", i, w[i].failures,
           w[i].first_error);
  }
  CHECK(strcmp(before, kvf_last_error()) == 0);
}

/* A peer that was freed and restarted on the same port is reachable again
 * under the same session id (the old session must not stick). */
static void test_peer_restarted_on_same_port(void) {
  kvf_engine *p = new_engine(0, 0, 0);
  uint16_t port = 0;
  char p_name[64];
  uint64_t l = U(abuf), r = U(bbuf), n = 16;
  REQUIRE(kvf_engine_rpc_port(p, &port) == KVF_STATUS_OK);
  engine_name(p, p_name, sizeof p_name);
  REQUIRE(kvf_register_memory(p, U(bbuf), LEN, NULL) == KVF_STATUS_OK);
  EXPECT(kvf_transfer_sync(A, p_name, KVF_OP_READ, &l, &r, &n, 1), KVF_STATUS_OK, NULL);
  kvf_engine_free(p);
  EXPECT(kvf_transfer_sync(A, p_name, KVF_OP_READ, &l, &r, &n, 1), KVF_STATUS_PEER_UNREACHABLE,
         p_name);
  p = new_engine(port, 0, 0);
  REQUIRE(kvf_register_memory(p, U(bbuf), LEN, NULL) == KVF_STATUS_OK);
  fill(bbuf, 16, 90);
  EXPECT(kvf_transfer_sync(A, p_name, KVF_OP_READ, &l, &r, &n, 1), KVF_STATUS_OK, NULL);
  CHECK(memcmp(abuf, bbuf, 16) == 0);
  kvf_engine_free(p);
}

/* ---- regressions: bugs this program found, each checked since ---------- */

static void test_fixed_bugs(void) {
  /* 1. A refused kvf_config_set_* resets every earlier setting (config.rs
   *    `update` takes the config out before the closure can fail). */
  {
    kvf_config *c = NULL;
    kvf_engine *e = NULL;
    char name[64];
    REQUIRE(kvf_config_new(&c) == KVF_STATUS_OK);
    REQUIRE(kvf_config_set_hostname(c, "localhost") == KVF_STATUS_OK);
    REQUIRE(kvf_config_set_port(c, 0) == KVF_STATUS_OK);
    EXPECT(kvf_config_set_slice_size(c, 0), KVF_STATUS_INVALID_ARGUMENT, "slice size");
    REQUIRE(kvf_engine_new(c, &e) == KVF_STATUS_OK);
    engine_name(e, name, sizeof name);
    check_(strncmp(name, "localhost:", 10) == 0, __LINE__,
           "refused setter wiped the hostname: engine is %s", name);
    kvf_engine_free(e);
    kvf_config_free(c);
  }
  /* 2. A batch refused with REMOTE_OUT_OF_RANGE has moved op 0 already when
   *    the initiator's cached segment was stale. */
  {
    uint8_t *r1 = xmalloc(4096), *r2 = xmalloc(4096);
    uint64_t l[2] = {U(abuf), U(abuf) + 4096}, r[2] = {U(r1), U(r2)}, n[2] = {4096, 4096};
    REQUIRE(kvf_register_memory(B, U(r1), 4096, NULL) == KVF_STATUS_OK);
    REQUIRE(kvf_register_memory(B, U(r2), 4096, NULL) == KVF_STATUS_OK);
    EXPECT(kvf_transfer_sync(A, b_name, KVF_OP_READ, l, r, n, 2), KVF_STATUS_OK, NULL);
    EXPECT(kvf_unregister_memory(B, U(r2)), KVF_STATUS_OK, NULL);
    memset(abuf, 1, 8192);
    memset(r1, 2, 4096);
    EXPECT(kvf_transfer_sync(A, b_name, KVF_OP_WRITE, l, r, n, 2),
           KVF_STATUS_REMOTE_OUT_OF_RANGE, "op 1");
    CHECK(r1[0] == 2); /* nothing moved */
    EXPECT(kvf_unregister_memory(B, U(r1)), KVF_STATUS_OK, NULL);
    free(r1);
    free(r2);
  }
  /* 3. Registering an overflowing region blames "op 0". */
  EXPECT(kvf_register_memory(A, UINT64_MAX - 1, 4, NULL), KVF_STATUS_ADDRESS_OVERFLOW,
         "0xfffffffffffffffe");
  CHECK(strstr(kvf_last_error(), "op 0") == NULL);
  /* 4. kvf_batch_wait's TIMEOUT message does not name the batch. */
  {
    uint64_t big = submit_big(KVF_OP_READ), small = 0, l = U(big_w), r = U(big_b), n = 16;
    REQUIRE(kvf_batch_submit(W, b_name, KVF_OP_READ, &l, &r, &n, 1, &small) == KVF_STATUS_OK);
    if (kvf_batch_wait(W, small, 0) == KVF_STATUS_TIMEOUT) {
      check_(strstr(kvf_last_error(), hex(small)) != NULL, __LINE__,
             "timeout message without the batch id: %s", kvf_last_error());
    }
    finish_batch(W, small);
    finish_batch(W, big);
  }
  /* 5. Last, as ASan stops the program here: kvf_status_str's result is
   *    documented static, but the next call frees it. */
  {
    const char *ok = kvf_status_str(KVF_STATUS_OK);
    const char *other = kvf_status_str(KVF_STATUS_IO);
    CHECK(strcmp(ok, "ok") == 0 && strcmp(other, "I/O error") == 0);
  }
}

/* ---- main ------------------------------------------------------------- */

/* What A learns of B's registrations: both regions, sorted by address; the
 * count alone with capacity 0; a short capacity writes nothing. */
static void test_peer_regions(void) {
  uint64_t addrs[4] = {0}, lens[4] = {0}, lo = U(bbuf) < U(big_b) ? U(bbuf) : U(big_b);
  size_t count = 0;
  EXPECT(kvf_engine_peer_regions(A, b_name, NULL, NULL, 0, &count), KVF_STATUS_BUFFER_TOO_SMALL,
         NULL);
  CHECK(count == 2);
  count = 0;
  EXPECT(kvf_engine_peer_regions(A, b_name, addrs, lens, 1, &count), KVF_STATUS_BUFFER_TOO_SMALL,
         "capacity 1, but 2 entries are needed");
  CHECK(count == 2 && addrs[0] == 0 && lens[0] == 0);
  EXPECT(kvf_engine_peer_regions(A, b_name, addrs, lens, 4, &count), KVF_STATUS_OK, NULL);
  CHECK(count == 2 && addrs[0] == lo && addrs[0] < addrs[1]);
  CHECK(lens[0] == (lo == U(bbuf) ? LEN : BIG) && lens[1] == (lo == U(bbuf) ? BIG : LEN));
  EXPECT(kvf_engine_peer_regions(A, b_name, addrs, lens, 4, NULL), KVF_STATUS_NULL_POINTER,
         "out_count");
  EXPECT(kvf_engine_peer_regions(A, b_name, NULL, lens, 4, &count), KVF_STATUS_NULL_POINTER,
         "addrs");
  EXPECT(kvf_engine_peer_regions(A, b_name, addrs, addrs, 4, &count),
         KVF_STATUS_INVALID_ARGUMENT, "overlap");
  EXPECT(kvf_engine_peer_regions(A, "127.0.0.1:1", addrs, lens, 4, &count),
         KVF_STATUS_PEER_UNREACHABLE, NULL);
  EXPECT(kvf_engine_peer_regions(NULL, b_name, addrs, lens, 4, &count), KVF_STATUS_NULL_POINTER,
         "engine");
}

int main(int argc, char **argv) {
  const char *first;
  if (argc > 1 && strcmp(argv[1], SILENT_PEER_ARG) == 0) {
    return run_silent_peer();
  }
  first = kvf_last_error();
  /* Before any failure on this thread the last error is empty. */
  CHECK(first != NULL && first[0] == '\0');
  REQUIRE(kvf_config_new(&marker_config) == KVF_STATUS_OK);

  test_version_and_status_strings();

  /* kvf_*_free(NULL) is a no-op. */
  kvf_config_free(NULL);
  kvf_engine_free(NULL);

  abuf = xmalloc(LEN);
  bbuf = xmalloc(LEN);
  a_snap = xmalloc(LEN);
  b_snap = xmalloc(LEN);
  big_b = xmalloc(BIG);
  big_w = xmalloc(BIG);
  A = new_engine(0, 0, 4096);
  B = new_engine(0, 0, 0);
  W = new_engine(0, 1, 0);
  engine_name(A, a_name, sizeof a_name);
  engine_name(B, b_name, sizeof b_name);
  engine_name(W, w_name, sizeof w_name);
  EXPECT(kvf_register_memory(A, U(abuf), LEN, "cpu:0"), KVF_STATUS_OK, NULL);
  EXPECT(kvf_register_memory(B, U(bbuf), LEN, NULL), KVF_STATUS_OK, NULL);
  EXPECT(kvf_register_memory(B, U(big_b), BIG, "*"), KVF_STATUS_OK, NULL);
  EXPECT(kvf_register_memory(W, U(big_w), BIG, "cpu:0"), KVF_STATUS_OK, NULL);

  test_config_errors();
  test_engine_identity();
  test_registration();
  test_sync_transfers();
  test_peer_regions();
  test_refused_transfers();
  test_async_batches();
  test_batch_in_progress();
  test_batch_failing_at_run_time();
  test_unregister_waits_for_local_batches();
  test_peer_unregisters_under_writes();
  test_engine_free_waits_for_batches();
  test_peer_freed_under_reads();
  test_engine_close();
  test_batch_ended_by_transfer_timeout();
  test_threads();
  test_peer_restarted_on_same_port();
  test_fixed_bugs();

  /* Teardown: explicit unregistration, then the engines free the rest. */
  EXPECT(kvf_unregister_memory(A, U(abuf)), KVF_STATUS_OK, NULL);
  EXPECT(kvf_unregister_memory(W, U(big_w)), KVF_STATUS_OK, NULL);
  kvf_engine_free(A);
  kvf_engine_free(B); /* still has bbuf and big_b registered */
  kvf_engine_free(W);
  kvf_config_free(marker_config);
  free(abuf);
  free(bbuf);
  free(a_snap);
  free(b_snap);
  free(big_b);
  free(big_w);

  printf("kvferry C API test (%s, engines %s %s %s): %d checks, %d failed\n", kvf_version(),
         a_name, b_name, w_name, checks, failures);
  return failures == 0 ? 0 : 1;
}
