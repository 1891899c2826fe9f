/*
 * Checks shared by the C test programs: counters, CHECK / REQUIRE, and
 * EXPECT(call, status, fragments...), which asserts a call's status and
 * that kvf_last_error() was set by that very call and names its context.
 * Each program defines CHECK_FILE (its name, for messages) before including
 * this, and sets `marker_config` to a config before the first EXPECT.
 */
#ifndef KVFERRY_TEST_CHECK_H
#define KVFERRY_TEST_CHECK_H

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvferry.h"

static const char *const check_file = CHECK_FILE;

static int checks;
static int failures;

static int check_(int ok, int line, const char *fmt, ...) {
  checks++;
  if (!ok) {
    va_list ap;
    failures++;
    fprintf(stderr, "%s:%d: check failed: ", check_file, line);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
  }
  return ok;
}

#define CHECK(cond) check_((cond) != 0, __LINE__, "%s", #cond)
/* A failed REQUIRE stops the program: what follows depends on it. */
#define REQUIRE(cond)                                       \
  do {                                                      \
    if (!CHECK(cond)) {                                     \
      fprintf(stderr, "%s:%d: fatal\n", check_file, __LINE__); \
      exit(1);                                              \
    }                                                       \
  } while (0)

/* Copies kvf_status_str's (static) string, for tables of names. */
static inline const char *status_name(int32_t code, char *buf, size_t cap) {
  snprintf(buf, cap, "%s", kvf_status_str(code));
  return buf;
}

/* "0x..." as Rust's {:#x} prints it. Rotating buffers, so that several
 * can appear in one expression. */
static inline const char *hex(uint64_t v) {
  static char bufs[16][24];
  static unsigned next;
  char *b = bufs[next++ % 16];
  snprintf(b, sizeof bufs[0], "0x%" PRIx64, v);
  return b;
}

/* Sets the last error to a marker, so a message checked afterwards is known
 * to come from the call under test and not from an earlier one. */
static kvf_config *marker_config;
#define MARKER "kvferry-test-marker"
static void prime_last_error(void) {
  (void)kvf_config_set_transport(marker_config, MARKER);
}

/* `got` must be `want`; for an error, kvf_last_error() must be non-empty,
 * set by this call, and contain every fragment of the NULL-terminated
 * list `frags`. */
static int expect_(kvf_status got, kvf_status want, int line, const char *call,
                   const char *const *frags) {
  const char *msg;
  char g[64], w[64];
  checks++;
  if (got != want) {
    failures++;
    fprintf(stderr,
            "%s:%d: %s\n  returned %d (%s), expected %d (%s)\n  last error: %s\n",
            check_file, line, call, (int)got, status_name(got, g, sizeof g), (int)want,
            status_name(want, w, sizeof w), kvf_last_error());
    return 0;
  }
  if (want == KVF_STATUS_OK || want == KVF_STATUS_IN_PROGRESS) {
    return 1;
  }
  msg = kvf_last_error();
  if (msg == NULL || msg[0] == '\0' || strstr(msg, MARKER) != NULL) {
    failures++;
    fprintf(stderr, "%s:%d: %s\n  left no message of its own: \"%s\"\n", check_file, line, call,
            msg ? msg : "(NULL)");
    return 0;
  }
  for (; *frags != NULL; frags++) {
    if (strstr(msg, *frags) == NULL) {
      failures++;
      fprintf(stderr, "%s:%d: %s\n  message \"%s\" does not mention \"%s\"\n", check_file, line,
              call, msg, *frags);
      return 0;
    }
  }
  return 1;
}

/* EXPECT(call, status, fragment...): pass NULL as the only fragment when
 * nothing is to be looked for in the message. */
#define EXPECT(call, want, ...)                                  \
  (prime_last_error(),                                           \
   expect_((call), (want), __LINE__, #call, (const char *const[]){__VA_ARGS__, NULL}))
/* The same for a status already returned by a call made right after
 * prime_last_error(). */
#define EXPECT_GOT(status, want, ...) \
  expect_((status), (want), __LINE__, #status, (const char *const[]){__VA_ARGS__, NULL})

#endif /* KVFERRY_TEST_CHECK_H */
