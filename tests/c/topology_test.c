/*
 * Rank mapping, block planning and kvf_transfer_blocks as a C user sees
 * them: libkvferry.so and include/kvferry.h only.
 *
 * - every vector and worked example of COMPAT.md sections 2 and 3;
 * - every error path: its exact status, a last-error message set by the call
 *   and naming the value at fault, and out-parameters left alone;
 * - the size-query convention of every call that fills an array;
 * - two engines in one process moving a request's blocks with one call
 *   (pull with head slices, padded strides, a prefix hit; push, async), the
 *   bytes checked against the COMPAT.md formulas applied by hand.
 *
 * Built and run under AddressSanitizer and UBSan by
 * crates/kvferry-capi/tests/c_programs.rs. Prints one summary line; exits 1
 * after any failed check, naming its line.
 */

#define _POSIX_C_SOURCE 200809L

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvferry.h"

#define U(p) ((uint64_t)(uintptr_t)(p))
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

/* ---- checks ---------------------------------------------------------- */

#define CHECK_FILE "topology_test.c"
#include "check.h"

static void *xmalloc(size_t n) {
  void *p = malloc(n);
  REQUIRE(p != NULL);
  return p;
}

static void fill(uint8_t *p, size_t n, unsigned seed) {
  size_t i;
  uint32_t x = seed * 2654435761u + 1;
  for (i = 0; i < n; i++) {
    x = x * 1103515245u + 12345u;
    p[i] = (uint8_t)(x >> 16);
  }
}

static kvf_pd_shape shape(uint32_t p, uint32_t d, uint32_t h, uint32_t attention, uint32_t s) {
  kvf_pd_shape sh;
  sh.prefill_tp = p;
  sh.decode_tp = d;
  sh.prefill_pp = s;
  sh.num_kv_heads = h;
  sh.attention = attention;
  return sh;
}

/* ---- COMPAT.md section 3 ---------------------------------------------- */

struct pull_vector {
  uint32_t p, d, h, attention, s;
  uint32_t pulls;
  size_t list_len;
  uint32_t ranks[16]; /* decode rank i's list at [i * list_len, +list_len) */
};

static const struct pull_vector pull_vectors[] = {
    {8, 8, 8, KVF_ATTENTION_GQA, 1, 1, 1, {0, 1, 2, 3, 4, 5, 6, 7}},
    {8, 4, 8, KVF_ATTENTION_GQA, 1, 2, 2, {0, 1, 2, 3, 4, 5, 6, 7}},
    {8, 4, 4, KVF_ATTENTION_GQA, 1, 1, 1, {1, 3, 5, 7}},
    {16, 4, 4, KVF_ATTENTION_GQA, 1, 1, 1, {3, 7, 11, 15}},
    {8, 4, 0, KVF_ATTENTION_MLA, 1, 1, 1, {6, 7, 1, 0}},
    {4, 2, 4, KVF_ATTENTION_GQA, 2, 2, 4, {0, 1, 4, 5, 2, 3, 6, 7}},
};

static void test_pull_vectors(void) {
  size_t v, i;
  uint64_t seed = 0;

  EXPECT(kvf_topology_request_seed("req-0", &seed), KVF_STATUS_OK, NULL);
  CHECK(seed == UINT64_C(7753214593136781247));

  for (v = 0; v < COUNT(pull_vectors); v++) {
    const struct pull_vector *t = &pull_vectors[v];
    kvf_pd_shape sh = shape(t->p, t->d, t->h, t->attention, t->s);
    uint32_t ranks[16], pulls = 0, union_ranks[16], sorted[16];
    size_t offsets[17], n_ranks = 0, n_offsets = 0, n_union = 0, total = t->d * t->list_len;

    EXPECT(kvf_topology_pulls_per_rank(&sh, &pulls), KVF_STATUS_OK, NULL);
    check_(pulls == t->pulls, __LINE__, "vector %zu: pulls %u, want %u", v, (unsigned)pulls,
           (unsigned)t->pulls);

    /* The size query, then the call. */
    EXPECT(kvf_topology_pull_ranks(&sh, "req-0", NULL, 0, &n_ranks, NULL, 0, &n_offsets),
           KVF_STATUS_BUFFER_TOO_SMALL, "ranks");
    check_(n_ranks == total && n_offsets == t->d + 1u, __LINE__,
           "vector %zu: size query %zu/%zu, want %zu/%u", v, n_ranks, n_offsets, total,
           (unsigned)t->d + 1);
    n_ranks = n_offsets = 0;
    EXPECT(kvf_topology_pull_ranks(&sh, "req-0", ranks, COUNT(ranks), &n_ranks, offsets,
                                   COUNT(offsets), &n_offsets),
           KVF_STATUS_OK, NULL);
    REQUIRE(n_ranks == total && n_offsets == t->d + 1u);
    for (i = 0; i <= t->d; i++) {
      check_(offsets[i] == i * t->list_len, __LINE__, "vector %zu: offsets[%zu] = %zu", v, i,
             offsets[i]);
    }
    for (i = 0; i < total; i++) {
      check_(ranks[i] == t->ranks[i], __LINE__, "vector %zu: entry %zu is %u, want %u", v, i,
             (unsigned)ranks[i], (unsigned)t->ranks[i]);
    }

    /* The prefill-side union is the sorted union of the lists. */
    memcpy(sorted, t->ranks, total * sizeof sorted[0]);
    {
      size_t a, b;
      for (a = 1; a < total; a++) {
        for (b = a; b > 0 && sorted[b - 1] > sorted[b]; b--) {
          uint32_t x = sorted[b];
          sorted[b] = sorted[b - 1];
          sorted[b - 1] = x;
        }
      }
    }
    EXPECT(kvf_topology_prefill_union(&sh, "req-0", NULL, 0, &n_union),
           KVF_STATUS_BUFFER_TOO_SMALL, "ranks");
    CHECK(n_union == total);
    n_union = 0;
    EXPECT(kvf_topology_prefill_union(&sh, "req-0", union_ranks, COUNT(union_ranks), &n_union),
           KVF_STATUS_OK, NULL);
    check_(n_union == total && memcmp(union_ranks, sorted, total * sizeof sorted[0]) == 0,
           __LINE__, "vector %zu: prefill union differs", v);
  }

  /* pulls per rank: 1 under MLA, else max(1, H/D) / max(1, H/P). */
  {
    kvf_pd_shape sh = shape(16, 2, 16, KVF_ATTENTION_GQA, 1);
    uint32_t pulls = 0;
    EXPECT(kvf_topology_pulls_per_rank(&sh, &pulls), KVF_STATUS_OK, NULL);
    CHECK(pulls == 8);
    sh = shape(16, 2, 16, KVF_ATTENTION_MLA, 1);
    EXPECT(kvf_topology_pulls_per_rank(&sh, &pulls), KVF_STATUS_OK, NULL);
    CHECK(pulls == 1);
    sh = shape(32, 4, 8, KVF_ATTENTION_GQA, 1);
    EXPECT(kvf_topology_pulls_per_rank(&sh, &pulls), KVF_STATUS_OK, NULL);
    CHECK(pulls == 2);
  }
}

/* Push examples of COMPAT.md section 3. */
static void test_push_vectors(void) {
  uint32_t ranks[8];
  size_t n = 0;
  uint64_t offset = 0, q;
  uint32_t p;
  kvf_pd_shape sh;

  /* P8 D4 H8: p -> p/2 at offset p%2, for every request. */
  sh = shape(8, 4, 8, KVF_ATTENTION_GQA, 1);
  for (q = 0; q < 3; q++) {
    for (p = 0; p < 8; p++) {
      EXPECT(kvf_topology_push_targets(&sh, q, p, ranks, COUNT(ranks), &n, &offset),
             KVF_STATUS_OK, NULL);
      check_(n == 1 && ranks[0] == p / 2 && offset == p % 2, __LINE__,
             "P8 D4 H8 q%u p%u: n %zu rank %u offset %u", (unsigned)q, (unsigned)p, n,
             (unsigned)ranks[0], (unsigned)offset);
    }
  }
  /* P8 D2 H4: even requests from ranks {0,2,4,6}, odd from {1,3,5,7};
   * p -> p/4 at offset (p/2)%2. */
  sh = shape(8, 2, 4, KVF_ATTENTION_GQA, 1);
  for (q = 0; q < 4; q++) {
    for (p = 0; p < 8; p++) {
      int sends = (p % 2) == (q % 2);
      n = 99;
      EXPECT(kvf_topology_push_targets(&sh, q, p, ranks, COUNT(ranks), &n, &offset),
             KVF_STATUS_OK, NULL);
      check_(sends ? (n == 1 && ranks[0] == p / 4) : n == 0, __LINE__,
             "P8 D2 H4 q%u p%u: n %zu", (unsigned)q, (unsigned)p, n);
      check_(offset == (p / 2) % 2, __LINE__, "P8 D2 H4 p%u: offset %u", (unsigned)p,
             (unsigned)offset);
    }
  }
  /* P8 D4 MLA: even requests from ranks 0..3, odd from 4..7, offset 0. */
  sh = shape(8, 4, 0, KVF_ATTENTION_MLA, 1);
  for (q = 0; q < 4; q++) {
    for (p = 0; p < 8; p++) {
      int sends = (p / 4) == (q % 2);
      EXPECT(kvf_topology_push_targets(&sh, q, p, ranks, COUNT(ranks), &n, &offset),
             KVF_STATUS_OK, NULL);
      check_(sends ? (n == 1 && ranks[0] == p % 4) : n == 0, __LINE__,
             "P8 D4 MLA q%u p%u: n %zu", (unsigned)q, (unsigned)p, n);
      CHECK(offset == 0);
    }
  }
  /* A rank that sends nothing needs no array at all. */
  sh = shape(8, 2, 4, KVF_ATTENTION_GQA, 1);
  n = 99;
  EXPECT(kvf_topology_push_targets(&sh, 0, 1, NULL, 0, &n, &offset), KVF_STATUS_OK, NULL);
  CHECK(n == 0);
  /* One that sends, asked with no room: the count, and nothing else. */
  offset = 77;
  EXPECT(kvf_topology_push_targets(&sh, 0, 0, NULL, 0, &n, &offset), KVF_STATUS_BUFFER_TOO_SMALL,
         "decode_ranks: capacity 0, but 1 entries are needed");
  CHECK(n == 1 && offset == 77);
}

static void test_topology_errors(void) {
  kvf_pd_shape good = shape(8, 4, 4, KVF_ATTENTION_GQA, 1), sh;
  uint32_t pulls = 77, ranks[8] = {0};
  size_t offsets[8] = {0}, n_ranks = 77, n_offsets = 77;
  uint64_t seed = 77, offset = 77;
  const char bad_utf8[] = {'r', (char)0xff, 0};

  /* NULL arguments, each named. */
  EXPECT(kvf_topology_pulls_per_rank(NULL, &pulls), KVF_STATUS_NULL_POINTER, "shape");
  EXPECT(kvf_topology_pulls_per_rank(&good, NULL), KVF_STATUS_NULL_POINTER, "out_pulls");
  EXPECT(kvf_topology_request_seed(NULL, &seed), KVF_STATUS_NULL_POINTER, "request_id");
  EXPECT(kvf_topology_request_seed("r", NULL), KVF_STATUS_NULL_POINTER, "out_seed");
  EXPECT(kvf_topology_request_seed(bad_utf8, &seed), KVF_STATUS_INVALID_ARGUMENT, "UTF-8");
  EXPECT(kvf_topology_pull_ranks(NULL, "r", ranks, 8, &n_ranks, offsets, 8, &n_offsets),
         KVF_STATUS_NULL_POINTER, "shape");
  EXPECT(kvf_topology_pull_ranks(&good, NULL, ranks, 8, &n_ranks, offsets, 8, &n_offsets),
         KVF_STATUS_NULL_POINTER, "request_id");
  EXPECT(kvf_topology_pull_ranks(&good, "r", ranks, 8, NULL, offsets, 8, &n_offsets),
         KVF_STATUS_NULL_POINTER, "out_num_ranks");
  EXPECT(kvf_topology_pull_ranks(&good, "r", ranks, 8, &n_ranks, offsets, 8, NULL),
         KVF_STATUS_NULL_POINTER, "out_num_offsets");
  /* Enough capacity claimed, but no array. */
  EXPECT(kvf_topology_pull_ranks(&good, "r", NULL, 8, &n_ranks, offsets, 8, &n_offsets),
         KVF_STATUS_NULL_POINTER, "ranks");
  EXPECT(kvf_topology_pull_ranks(&good, "r", ranks, 8, &n_ranks, NULL, 8, &n_offsets),
         KVF_STATUS_NULL_POINTER, "offsets");
  EXPECT(kvf_topology_prefill_union(NULL, "r", ranks, 8, &n_ranks), KVF_STATUS_NULL_POINTER,
         "shape");
  EXPECT(kvf_topology_prefill_union(&good, NULL, ranks, 8, &n_ranks), KVF_STATUS_NULL_POINTER,
         "request_id");
  EXPECT(kvf_topology_prefill_union(&good, "r", ranks, 8, NULL), KVF_STATUS_NULL_POINTER,
         "out_num_ranks");
  EXPECT(kvf_topology_prefill_union(&good, "r", NULL, 8, &n_ranks), KVF_STATUS_NULL_POINTER,
         "ranks");
  EXPECT(kvf_topology_push_targets(NULL, 0, 0, ranks, 8, &n_ranks, &offset),
         KVF_STATUS_NULL_POINTER, "shape");
  EXPECT(kvf_topology_push_targets(&good, 0, 0, ranks, 8, NULL, &offset),
         KVF_STATUS_NULL_POINTER, "out_num_ranks");
  EXPECT(kvf_topology_push_targets(&good, 0, 0, ranks, 8, &n_ranks, NULL),
         KVF_STATUS_NULL_POINTER, "out_offset_index");
  EXPECT(kvf_topology_push_targets(&good, 0, 0, NULL, 8, &n_ranks, &offset),
         KVF_STATUS_NULL_POINTER, "decode_ranks");
  CHECK(pulls == 77 && seed == 77 && offset == 77);

  /* Enum-like integers out of range, and sizes past the documented bound. */
  sh = good;
  sh.attention = 3;
  EXPECT(kvf_topology_pulls_per_rank(&sh, &pulls), KVF_STATUS_INVALID_ARGUMENT, "attention 3",
         "KVF_ATTENTION_GQA");
  sh.attention = UINT32_MAX;
  EXPECT(kvf_topology_push_targets(&sh, 0, 0, ranks, 8, &n_ranks, &offset),
         KVF_STATUS_INVALID_ARGUMENT, "attention 4294967295");
  sh = good;
  sh.prefill_tp = KVF_TOPOLOGY_MAX_SIZE + 1;
  EXPECT(kvf_topology_pull_ranks(&sh, "r", ranks, 8, &n_ranks, offsets, 8, &n_offsets),
         KVF_STATUS_INVALID_ARGUMENT, "prefill_tp 65537", "KVF_TOPOLOGY_MAX_SIZE");
  sh = good;
  sh.prefill_pp = UINT32_MAX;
  EXPECT(kvf_topology_prefill_union(&sh, "r", ranks, 8, &n_ranks), KVF_STATUS_INVALID_ARGUMENT,
         "prefill_pp 4294967295");

  /* Shapes the rules reject: the crate's message, with the shape. */
  sh = shape(2, 4, 4, KVF_ATTENTION_GQA, 1);
  EXPECT(kvf_topology_pulls_per_rank(&sh, &pulls), KVF_STATUS_INVALID_ARGUMENT,
         "prefill tp 2 < decode tp 4", "shape(P=2, D=4, S=1, H=4, gqa)");
  EXPECT(kvf_topology_push_targets(&sh, 0, 0, ranks, 8, &n_ranks, &offset),
         KVF_STATUS_INVALID_ARGUMENT, "prefill tp 2 < decode tp 4");
  sh = shape(0, 0, 4, KVF_ATTENTION_GQA, 1);
  EXPECT(kvf_topology_pull_ranks(&sh, "r", ranks, 8, &n_ranks, offsets, 8, &n_offsets),
         KVF_STATUS_INVALID_ARGUMENT, "prefill tp is 0");
  sh = shape(8, 4, 4, KVF_ATTENTION_GQA, 0);
  EXPECT(kvf_topology_prefill_union(&sh, "r", ranks, 8, &n_ranks), KVF_STATUS_INVALID_ARGUMENT,
         "prefill pp is 0");
  sh = shape(6, 2, 4, KVF_ATTENTION_GQA, 1);
  EXPECT(kvf_topology_pulls_per_rank(&sh, &pulls), KVF_STATUS_INVALID_ARGUMENT,
         "prefill tp 6 and 4 kv heads do not divide one another");
  /* Sparse attention with more heads than decode ranks: ragged pull lists
   * (pull only; pushing treats it as MLA). */
  sh = shape(8, 2, 8, KVF_ATTENTION_SPARSE, 1);
  EXPECT(kvf_topology_pull_ranks(&sh, "r", ranks, 8, &n_ranks, offsets, 8, &n_offsets),
         KVF_STATUS_INVALID_ARGUMENT, "pull rules give");
  EXPECT(kvf_topology_push_targets(&sh, 0, 0, ranks, 8, &n_ranks, &offset), KVF_STATUS_OK, NULL);
  /* A prefill rank outside the TP group. */
  EXPECT(kvf_topology_push_targets(&good, 0, 8, ranks, 8, &n_ranks, &offset),
         KVF_STATUS_INVALID_ARGUMENT, "prefill rank 8 is out of range: must be below 8");
  CHECK(pulls == 77);

  /* Short buffers: BUFFER_TOO_SMALL, both counts, nothing written. */
  sh = shape(8, 4, 8, KVF_ATTENTION_GQA, 1);
  memset(ranks, 0xee, sizeof ranks);
  memset(offsets, 0xee, sizeof offsets);
  EXPECT(kvf_topology_pull_ranks(&sh, "r", ranks, 7, &n_ranks, offsets, 5, &n_offsets),
         KVF_STATUS_BUFFER_TOO_SMALL, "ranks: capacity 7, but 8 entries are needed");
  CHECK(n_ranks == 8 && n_offsets == 5);
  EXPECT(kvf_topology_pull_ranks(&sh, "r", ranks, 8, &n_ranks, offsets, 4, &n_offsets),
         KVF_STATUS_BUFFER_TOO_SMALL, "offsets: capacity 4, but 5 entries are needed");
  CHECK(n_ranks == 8 && n_offsets == 5);
  EXPECT(kvf_topology_prefill_union(&sh, "r", ranks, 7, &n_ranks), KVF_STATUS_BUFFER_TOO_SMALL,
         "ranks: capacity 7, but 8 entries are needed");
  CHECK(ranks[0] == 0xeeeeeeeeu && ranks[7] == 0xeeeeeeeeu);
  CHECK(offsets[0] == (size_t)0xeeeeeeeeeeeeeeeeull || sizeof(size_t) < 8);
}

/* ---- COMPAT.md section 2: plans --------------------------------------- */

static kvf_layout *one_cache(uint64_t num_blocks, uint64_t base, uint64_t block_len,
                             uint64_t stride) {
  kvf_cache_layout c;
  kvf_layout *l = NULL;
  c.base = base;
  c.block_len = block_len;
  c.stride = stride;
  c.scale = 1;
  REQUIRE(kvf_layout_new(num_blocks, 1, 1, &c, &l) == KVF_STATUS_OK && l != NULL);
  return l;
}

static kvf_plan_options options(uint64_t pulls, uint64_t offset_index, uint32_t split) {
  kvf_plan_options o;
  memset(&o, 0, sizeof o);
  o.pulls = pulls;
  o.offset_index = offset_index;
  o.split = split;
  o.prefix = KVF_PREFIX_NONE;
  return o;
}

static void test_plan_examples(void) {
  uint64_t la[8], ra[8], ln[8];
  size_t n = 0;
  kvf_layout *local = one_cache(16, 0x1000, 1024, 1024);
  kvf_layout *remote = one_cache(16, 0x3000, 1024, 1024);
  const uint64_t lids[] = {2, 3, 4}, rids[] = {7, 8, 9};

  /* local [2,3,4], remote [7,8,9], 1024-byte dense blocks, n = 1: one op. */
  EXPECT(kvf_plan_blocks(local, remote, lids, 3, rids, 3, NULL, la, ra, ln, 8, &n), KVF_STATUS_OK,
         NULL);
  CHECK(n == 1 && la[0] == 0x1000 + 2048 && ra[0] == 0x3000 + 7168 && ln[0] == 3072);
  kvf_layout_free(local);
  kvf_layout_free(remote);

  /* Local stride 2048, remote stride 4096: three 1024-byte ops. */
  local = one_cache(16, 0x1000, 1024, 2048);
  remote = one_cache(16, 0x3000, 1024, 4096);
  EXPECT(kvf_plan_blocks(local, remote, lids, 3, rids, 3, NULL, NULL, NULL, NULL, 0, &n),
         KVF_STATUS_BUFFER_TOO_SMALL, "local_addrs, remote_addrs and lens: capacity 0, but 3 entries");
  CHECK(n == 3);
  EXPECT(kvf_plan_blocks(local, remote, lids, 3, rids, 3, NULL, la, ra, ln, 3, &n), KVF_STATUS_OK,
         NULL);
  CHECK(n == 3);
  CHECK(la[0] == 0x1000 + 2 * 2048 && ra[0] == 0x3000 + 7 * 4096 && ln[0] == 1024);
  CHECK(la[1] == 0x1000 + 3 * 2048 && ra[1] == 0x3000 + 8 * 4096 && ln[1] == 1024);
  CHECK(la[2] == 0x1000 + 4 * 2048 && ra[2] == 0x3000 + 9 * 4096 && ln[2] == 1024);
  kvf_layout_free(local);
  kvf_layout_free(remote);

  /* Runs cut where either side jumps: remote [1,2,3,5,6], local
   * [10,11,12,14,15] -> [1,2,3], [5,6]. */
  {
    const uint64_t l2[] = {10, 11, 12, 14, 15}, r2[] = {1, 2, 3, 5, 6};
    local = one_cache(16, 0, 256, 256);
    remote = one_cache(16, 0x10000, 256, 256);
    EXPECT(kvf_plan_blocks(local, remote, l2, 5, r2, 5, NULL, la, ra, ln, 8, &n), KVF_STATUS_OK,
           NULL);
    CHECK(n == 2);
    CHECK(la[0] == 10 * 256 && ra[0] == 0x10000 + 256 && ln[0] == 3 * 256);
    CHECK(la[1] == 14 * 256 && ra[1] == 0x10000 + 5 * 256 && ln[1] == 2 * 256);
    kvf_layout_free(local);
    kvf_layout_free(remote);
  }

  /* n = 2, offset 1: every block its own op, into the second half of the
   * local block; ib = 512. */
  {
    kvf_plan_options o = options(2, 1, KVF_SPLIT_LOCAL);
    const uint64_t l2[] = {4, 5}, r2[] = {0, 1};
    local = one_cache(8, 0x100000, 1024, 1024);
    remote = one_cache(8, 0x200000, 512, 512);
    EXPECT(kvf_plan_blocks(local, remote, l2, 2, r2, 2, &o, la, ra, ln, 8, &n), KVF_STATUS_OK,
           NULL);
    CHECK(n == 2);
    CHECK(la[0] == 0x100000 + 4 * 1024 + 512 && ra[0] == 0x200000 && ln[0] == 512);
    CHECK(la[1] == 0x100000 + 5 * 1024 + 512 && ra[1] == 0x200000 + 512 && ln[1] == 512);
    /* Pushing: the remote (decode) block is split instead. */
    o = options(2, 1, KVF_SPLIT_REMOTE);
    EXPECT(kvf_plan_blocks(remote, local, r2, 2, l2, 2, &o, la, ra, ln, 8, &n), KVF_STATUS_OK,
           NULL);
    CHECK(n == 2 && la[0] == 0x200000 && ra[0] == 0x100000 + 4 * 1024 + 512 && ln[0] == 512);
    kvf_layout_free(local);
    kvf_layout_free(remote);
  }

  /* Prefix hits: 32 computed tokens of 16 per block skip two remote ids;
   * trimming pairs the local list with the remote tail. */
  {
    kvf_plan_options o = options(1, 0, KVF_SPLIT_LOCAL);
    const uint64_t l2[] = {6, 7}, r2[] = {0, 1, 2, 3};
    local = one_cache(8, 0, 64, 64);
    remote = one_cache(8, 0x1000, 64, 64);
    o.prefix = KVF_PREFIX_COMPUTED_TOKENS;
    o.computed_tokens = 32;
    o.tokens_per_block = 16;
    EXPECT(kvf_plan_blocks(local, remote, l2, 2, r2, 4, &o, la, ra, ln, 8, &n), KVF_STATUS_OK,
           NULL);
    CHECK(n == 1 && la[0] == 6 * 64 && ra[0] == 0x1000 + 2 * 64 && ln[0] == 128);
    o.prefix = KVF_PREFIX_TRIM_REMOTE_HEAD;
    EXPECT(kvf_plan_blocks(local, remote, l2, 2, r2, 4, &o, la, ra, ln, 8, &n), KVF_STATUS_OK,
           NULL);
    CHECK(n == 1 && ra[0] == 0x1000 + 2 * 64);
    kvf_layout_free(local);
    kvf_layout_free(remote);
  }

  /* A logical block of two kernel blocks (scale 2), layer-major input. */
  {
    kvf_cache_layout caches[4];
    kvf_layout *l = NULL, *r = NULL;
    const uint64_t id[] = {1};
    size_t i;
    for (i = 0; i < 4; i++) {
      caches[i].base = 0x10000 * (i + 1);
      caches[i].block_len = 128;
      caches[i].stride = 128;
      caches[i].scale = 2;
    }
    REQUIRE(kvf_layout_new(4, 2, 2, caches, &l) == KVF_STATUS_OK);
    REQUIRE(kvf_layout_new(4, 2, 2, caches, &r) == KVF_STATUS_OK);
    EXPECT(kvf_plan_blocks(l, r, id, 1, id, 1, NULL, la, ra, ln, 8, &n), KVF_STATUS_OK, NULL);
    CHECK(n == 4);
    for (i = 0; i < 4; i++) {
      check_(la[i] == 0x10000 * (i + 1) + 256 && ln[i] == 256, __LINE__, "scale op %zu", i);
    }
    kvf_layout_free(l);
    kvf_layout_free(r);
  }
  /* No ids: an empty plan. */
  local = one_cache(8, 0, 64, 64);
  EXPECT(kvf_plan_blocks(local, local, NULL, 0, NULL, 0, NULL, NULL, NULL, NULL, 0, &n),
         KVF_STATUS_OK, NULL);
  CHECK(n == 0);
  kvf_layout_free(local);
}

/* kvf_plan_blocks_spans: a NULL id array with a count is the span
 * first .. first + count; arrays and spans mix; the plan is kvf_plan_blocks'. */
static void test_plan_spans(void) {
  uint64_t la[8], ra[8], ln[8], la2[8], ra2[8], ln2[8];
  size_t n = 0, n2 = 0;
  const uint64_t lids[] = {2, 3, 4}, rids[] = {7, 8, 9}, frag[] = {10, 11, 12, 14, 15};
  const uint64_t one[] = {1};
  kvf_layout *local = one_cache(16, 0x1000, 1024, 1024);
  kvf_layout *remote = one_cache(16, 0x3000, 1024, 1024);
  kvf_plan_options o = options(1, 0, KVF_SPLIT_LOCAL);

  /* Both spans: local 2..5, remote 7..10, one op as with the arrays. */
  EXPECT(kvf_plan_blocks_spans(local, remote, NULL, 2, 3, NULL, 7, 3, NULL, la, ra, ln, 8, &n),
         KVF_STATUS_OK, NULL);
  CHECK(n == 1 && la[0] == 0x1000 + 2048 && ra[0] == 0x3000 + 7168 && ln[0] == 3072);
  /* Mixed: an array on one side, a span on the other. */
  EXPECT(kvf_plan_blocks_spans(local, remote, lids, 0, 3, NULL, 7, 3, NULL, la2, ra2, ln2, 8, &n2),
         KVF_STATUS_OK, NULL);
  CHECK(n2 == 1 && la2[0] == la[0] && ra2[0] == ra[0] && ln2[0] == ln[0]);
  EXPECT(kvf_plan_blocks_spans(local, remote, frag, 0, 5, NULL, 1, 5, NULL, la, ra, ln, 8, &n),
         KVF_STATUS_OK, NULL);
  CHECK(n == 2 && la[0] == 0x1000 + 10 * 1024 && ln[0] == 3 * 1024 && ra[1] == 0x3000 + 4 * 1024);
  /* The same request through kvf_plan_blocks gives the same ops. */
  EXPECT(kvf_plan_blocks(local, remote, lids, 3, rids, 3, NULL, la2, ra2, ln2, 8, &n2),
         KVF_STATUS_OK, NULL);
  EXPECT(kvf_plan_blocks_spans(local, remote, lids, 0, 3, rids, 0, 3, NULL, la, ra, ln, 8, &n),
         KVF_STATUS_OK, NULL);
  CHECK(n == n2 && la[0] == la2[0] && ra[0] == ra2[0] && ln[0] == ln2[0]);
  /* A prefix hit skips the head of a remote span: remote 0..4, 2 computed. */
  o.prefix = KVF_PREFIX_COMPUTED_TOKENS;
  o.computed_tokens = 32;
  o.tokens_per_block = 16;
  EXPECT(kvf_plan_blocks_spans(local, remote, NULL, 6, 2, NULL, 0, 4, &o, la, ra, ln, 8, &n),
         KVF_STATUS_OK, NULL);
  CHECK(n == 1 && la[0] == 0x1000 + 6 * 1024 && ra[0] == 0x3000 + 2 * 1024 && ln[0] == 2048);
  /* Sizing: too little room gives the count, as kvf_plan_blocks. */
  n = 0;
  EXPECT(kvf_plan_blocks_spans(local, remote, NULL, 0, 4, frag, 0, 4, NULL, NULL, NULL, NULL, 0,
                               &n),
         KVF_STATUS_BUFFER_TOO_SMALL, "capacity 0, but 2 entries");
  CHECK(n == 2);
  /* Empty spans: an empty plan. */
  EXPECT(kvf_plan_blocks_spans(local, remote, NULL, 5, 0, NULL, 9, 0, NULL, NULL, NULL, NULL, 0, &n),
         KVF_STATUS_OK, NULL);
  CHECK(n == 0);

  /* Refusals, nothing written. */
  n = 77;
  la[0] = 0;
  EXPECT(kvf_plan_blocks_spans(local, remote, NULL, 14, 3, NULL, 0, 3, NULL, la, ra, ln, 8, &n),
         KVF_STATUS_INVALID_ARGUMENT, "local_ids: the span 14 .. 14 + 3 goes beyond the layout's 16 blocks");
  EXPECT(kvf_plan_blocks_spans(local, remote, NULL, 0, 3, NULL, UINT64_MAX, 3, NULL, la, ra, ln, 8,
                               &n),
         KVF_STATUS_INVALID_ARGUMENT, "remote_ids: the span");
  EXPECT(kvf_plan_blocks_spans(local, remote, NULL, 0, SIZE_MAX, NULL, 0, SIZE_MAX, NULL, la, ra,
                               ln, 8, &n),
         KVF_STATUS_INVALID_ARGUMENT, "goes beyond the layout's 16 blocks");
  EXPECT(kvf_plan_blocks_spans(local, remote, one, 3, 1, one, 0, 1, NULL, la, ra, ln, 8, &n),
         KVF_STATUS_INVALID_ARGUMENT, "local_ids: first is 3 with an id array");
  EXPECT(kvf_plan_blocks_spans(NULL, remote, NULL, 0, 1, one, 0, 1, NULL, la, ra, ln, 8, &n),
         KVF_STATUS_NULL_POINTER, "local_layout");
  EXPECT(kvf_plan_blocks_spans(local, remote, NULL, 0, 2, one, 0, 1, NULL, la, ra, ln, 8, &n),
         KVF_STATUS_INVALID_ARGUMENT, "cannot pair 2 local block ids with 1 remote block ids");
  EXPECT(kvf_plan_blocks_spans(local, remote, NULL, 0, 1, one, 0, 1, NULL, la, ra, ln, 8, NULL),
         KVF_STATUS_NULL_POINTER, "out_num_ops");
  CHECK(n == 77 && la[0] == 0);
  kvf_layout_free(local);
  kvf_layout_free(remote);
}

/* kvf_plan_blocks_call: kvf_plan_blocks_spans' arguments in one struct. */
static void test_plan_call(void) {
  uint64_t la[8], ra[8], ln[8];
  const uint64_t frag[] = {10, 11, 12, 14, 15};
  kvf_layout *local = one_cache(16, 0x1000, 1024, 1024);
  kvf_layout *remote = one_cache(16, 0x3000, 1024, 1024);
  kvf_plan_call c;
  memset(&c, 0, sizeof c);
  c.local_layout = local;
  c.remote_layout = remote;
  c.local_ids = frag;
  c.n_local = 5;
  c.remote_first = 1; /* remote 1 .. 6: runs [10,11,12]<-[1,2,3], [14,15]<-[4,5] */
  c.n_remote = 5;
  c.num_ops = 77;
  /* Sizing first: the count lands in num_ops. */
  EXPECT(kvf_plan_blocks_call(&c), KVF_STATUS_BUFFER_TOO_SMALL, "capacity 0, but 2 entries");
  CHECK(c.num_ops == 2);
  c.local_addrs = la;
  c.remote_addrs = ra;
  c.lens = ln;
  c.capacity = 8;
  EXPECT(kvf_plan_blocks_call(&c), KVF_STATUS_OK, NULL);
  CHECK(c.num_ops == 2 && la[0] == 0x1000 + 10 * 1024 && ra[0] == 0x3000 + 1024 && ln[0] == 3072);
  CHECK(la[1] == 0x1000 + 14 * 1024 && ra[1] == 0x3000 + 4 * 1024 && ln[1] == 2048);
  /* Refusals: the library's message, num_ops untouched. */
  c.num_ops = 77;
  c.remote_first = 14;
  EXPECT(kvf_plan_blocks_call(&c), KVF_STATUS_INVALID_ARGUMENT, "remote_ids: the span 14 .. 14 + 5");
  CHECK(c.num_ops == 77);
  c.remote_first = 1;
  c.local_layout = NULL;
  EXPECT(kvf_plan_blocks_call(&c), KVF_STATUS_NULL_POINTER, "local_layout");
  EXPECT(kvf_plan_blocks_call(NULL), KVF_STATUS_NULL_POINTER, "call");
  CHECK(c.num_ops == 77);
  kvf_layout_free(local);
  kvf_layout_free(remote);
}

static void test_layout_and_plan_errors(void) {
  kvf_cache_layout c = {0x1000, 1024, 1024, 1};
  kvf_layout *sentinel = (kvf_layout *)&checks; /* never dereferenced */
  kvf_layout *l = sentinel, *local, *remote, *two_layers, *half;
  uint64_t la[4] = {0}, ra[4] = {0}, ln[4] = {0};
  size_t n = 77;
  const uint64_t one[] = {1}, two[] = {1, 2}, eight[] = {8};
  kvf_plan_options o;

  kvf_layout_free(NULL);
  EXPECT(kvf_layout_new(4, 1, 1, &c, NULL), KVF_STATUS_NULL_POINTER, "out");
  EXPECT(kvf_layout_new(4, 1, 1, NULL, &l), KVF_STATUS_NULL_POINTER, "caches");
  EXPECT(kvf_layout_new(4, 0, 1, &c, &l), KVF_STATUS_INVALID_ARGUMENT, "0 layers x 1 caches");
  EXPECT(kvf_layout_new(4, 1, 0, &c, &l), KVF_STATUS_INVALID_ARGUMENT, "1 layers x 0 caches");
  EXPECT(kvf_layout_new(4, SIZE_MAX, 2, &c, &l), KVF_STATUS_INVALID_ARGUMENT, "overflows");
  c.block_len = 0;
  EXPECT(kvf_layout_new(4, 1, 1, &c, &l), KVF_STATUS_INVALID_ARGUMENT,
         "layer 0 cache 0: block_len is 0");
  c.block_len = 1024;
  c.stride = 512;
  EXPECT(kvf_layout_new(4, 1, 1, &c, &l), KVF_STATUS_INVALID_ARGUMENT,
         "stride 512 is below block_len 1024");
  c.stride = 1024;
  c.scale = 0;
  EXPECT(kvf_layout_new(4, 1, 1, &c, &l), KVF_STATUS_INVALID_ARGUMENT, "scale is 0");
  c.scale = 1;
  c.base = UINT64_MAX - 100;
  EXPECT(kvf_layout_new(4, 1, 1, &c, &l), KVF_STATUS_INVALID_ARGUMENT, "overflows 64 bits");
  CHECK(l == sentinel);

  local = one_cache(8, 0, 1024, 1024);
  remote = one_cache(8, 1 << 20, 1024, 1024);
  half = one_cache(8, 1 << 21, 512, 512);
  {
    kvf_cache_layout cs[2] = {{0, 1024, 1024, 1}, {0x100000, 1024, 1024, 1}};
    REQUIRE(kvf_layout_new(8, 2, 1, cs, &two_layers) == KVF_STATUS_OK);
  }

  /* NULL arguments. */
  EXPECT(kvf_plan_blocks(NULL, remote, one, 1, one, 1, NULL, la, ra, ln, 4, &n),
         KVF_STATUS_NULL_POINTER, "local_layout");
  EXPECT(kvf_plan_blocks(local, NULL, one, 1, one, 1, NULL, la, ra, ln, 4, &n),
         KVF_STATUS_NULL_POINTER, "remote_layout");
  EXPECT(kvf_plan_blocks(local, remote, NULL, 1, one, 1, NULL, la, ra, ln, 4, &n),
         KVF_STATUS_NULL_POINTER, "local_ids");
  EXPECT(kvf_plan_blocks(local, remote, one, 1, NULL, 1, NULL, la, ra, ln, 4, &n),
         KVF_STATUS_NULL_POINTER, "remote_ids");
  EXPECT(kvf_plan_blocks(local, remote, one, 1, one, 1, NULL, la, ra, ln, 4, NULL),
         KVF_STATUS_NULL_POINTER, "out_num_ops");
  EXPECT(kvf_plan_blocks(local, remote, one, 1, one, 1, NULL, NULL, ra, ln, 4, &n),
         KVF_STATUS_NULL_POINTER, "local_addrs");
  EXPECT(kvf_plan_blocks(local, remote, one, 1, one, 1, NULL, la, NULL, ln, 4, &n),
         KVF_STATUS_NULL_POINTER, "remote_addrs");
  EXPECT(kvf_plan_blocks(local, remote, one, 1, one, 1, NULL, la, ra, NULL, 4, &n),
         KVF_STATUS_NULL_POINTER, "lens");
  CHECK(n == 77 && la[0] == 0 && ln[0] == 0);
  /* The library fills the three arrays in place: they may not overlap. */
  EXPECT(kvf_plan_blocks(local, remote, one, 1, one, 1, NULL, la, la, ln, 4, &n),
         KVF_STATUS_INVALID_ARGUMENT, "local_addrs and remote_addrs overlap");
  EXPECT(kvf_plan_blocks(local, remote, one, 1, one, 1, NULL, la, ra, la + 0, 1, &n),
         KVF_STATUS_INVALID_ARGUMENT, "local_addrs and lens overlap");
  CHECK(n == 77);

  /* Options out of range. */
  o = options(1, 0, 2);
  EXPECT(kvf_plan_blocks(local, remote, one, 1, one, 1, &o, la, ra, ln, 4, &n),
         KVF_STATUS_INVALID_ARGUMENT, "split 2", "KVF_SPLIT_LOCAL");
  o = options(1, 0, KVF_SPLIT_LOCAL);
  o.prefix = 3;
  EXPECT(kvf_plan_blocks(local, remote, one, 1, one, 1, &o, la, ra, ln, 4, &n),
         KVF_STATUS_INVALID_ARGUMENT, "prefix 3", "KVF_PREFIX_NONE");
  o = options(0, 0, KVF_SPLIT_LOCAL);
  EXPECT(kvf_plan_blocks(local, remote, one, 1, one, 1, &o, la, ra, ln, 4, &n),
         KVF_STATUS_INVALID_ARGUMENT, "pulls must be at least 1");
  o = options(2, 2, KVF_SPLIT_LOCAL);
  EXPECT(kvf_plan_blocks(local, half, one, 1, one, 1, &o, la, ra, ln, 4, &n),
         KVF_STATUS_INVALID_ARGUMENT, "offset index 2 is not below 2 pulls");
  /* Block lengths that do not split. */
  o = options(2, 0, KVF_SPLIT_LOCAL);
  EXPECT(kvf_plan_blocks(local, remote, one, 1, one, 1, &o, la, ra, ln, 4, &n),
         KVF_STATUS_INVALID_ARGUMENT, "remote block_len 1024 must equal 512");
  o = options(3, 0, KVF_SPLIT_LOCAL);
  EXPECT(kvf_plan_blocks(local, remote, one, 1, one, 1, &o, la, ra, ln, 4, &n),
         KVF_STATUS_INVALID_ARGUMENT, "local block_len 1024 is not divisible by 3 pulls");
  /* Ids that do not pair, or lie beyond the layout. */
  EXPECT(kvf_plan_blocks(local, remote, two, 2, one, 1, NULL, la, ra, ln, 4, &n),
         KVF_STATUS_INVALID_ARGUMENT, "cannot pair 2 local block ids with 1 remote block ids");
  EXPECT(kvf_plan_blocks(local, remote, eight, 1, one, 1, NULL, la, ra, ln, 4, &n),
         KVF_STATUS_INVALID_ARGUMENT, "local block id 8 at position 0 is not below 8 blocks");
  EXPECT(kvf_plan_blocks(local, remote, one, 1, eight, 1, NULL, la, ra, ln, 4, &n),
         KVF_STATUS_INVALID_ARGUMENT, "remote block id 8");
  o = options(1, 0, KVF_SPLIT_LOCAL);
  o.prefix = KVF_PREFIX_COMPUTED_TOKENS;
  o.computed_tokens = 17;
  o.tokens_per_block = 16;
  EXPECT(kvf_plan_blocks(local, remote, one, 1, two, 2, &o, la, ra, ln, 4, &n),
         KVF_STATUS_INVALID_ARGUMENT, "17 computed tokens is not a multiple of 16");
  o.computed_tokens = 48;
  EXPECT(kvf_plan_blocks(local, remote, one, 1, two, 2, &o, la, ra, ln, 4, &n),
         KVF_STATUS_INVALID_ARGUMENT, "3 computed blocks are more than the remote list holds");
  o.prefix = KVF_PREFIX_TRIM_REMOTE_HEAD;
  EXPECT(kvf_plan_blocks(local, remote, two, 2, one, 1, &o, la, ra, ln, 4, &n),
         KVF_STATUS_INVALID_ARGUMENT, "may not be longer than the remote list");
  /* Layouts of different shapes. */
  EXPECT(kvf_plan_blocks(two_layers, remote, one, 1, one, 1, NULL, la, ra, ln, 4, &n),
         KVF_STATUS_INVALID_ARGUMENT, "local layout has 2 layers, remote layout has 1");
  /* Too little room: the count, nothing written. */
  EXPECT(kvf_plan_blocks(two_layers, two_layers, one, 1, one, 1, NULL, la, ra, ln, 1, &n),
         KVF_STATUS_BUFFER_TOO_SMALL, "capacity 1, but 2 entries");
  CHECK(n == 2 && la[0] == 0 && ra[0] == 0 && ln[0] == 0);
  /* A plan far too large to hold is counted, not built. */
  {
    kvf_cache_layout huge = {0, 1, 2, UINT64_C(1) << 40};
    kvf_layout *h = NULL;
    const uint64_t zero[] = {0};
    REQUIRE(kvf_layout_new(1, 1, 1, &huge, &h) == KVF_STATUS_OK);
    EXPECT(kvf_plan_blocks(h, h, zero, 1, zero, 1, NULL, la, ra, ln, 4, &n),
           KVF_STATUS_BUFFER_TOO_SMALL, "capacity 4, but 1099511627776 entries");
    CHECK(n == (size_t)(UINT64_C(1) << 40));
    kvf_layout_free(h);
  }

  kvf_layout_free(local);
  kvf_layout_free(remote);
  kvf_layout_free(half);
  kvf_layout_free(two_layers);
}

/* ---- kvf_transfer_blocks between two engines --------------------------- */

#define MIB ((size_t)1 << 20)
#define LEN (2 * MIB)
#define LAYERS 3
#define CACHES 2
#define BLOCKS 16
#define SLICE 256 /* bytes one prefill rank holds of a block */

static kvf_engine *D, *P; /* decode and prefill */
static char d_name[64], p_name[64];
static uint8_t *dbuf, *pbuf, *dwant, *pwant;

static kvf_engine *new_engine(void) {
  kvf_config *c = NULL;
  kvf_engine *e = NULL;
  REQUIRE(kvf_config_new(&c) == KVF_STATUS_OK);
  REQUIRE(kvf_config_set_hostname(c, "127.0.0.1") == KVF_STATUS_OK);
  if (kvf_engine_new(c, &e) != KVF_STATUS_OK) {
    fprintf(stderr, "kvf_engine_new: %s\n", kvf_last_error());
  }
  REQUIRE(e != NULL);
  kvf_config_free(c);
  return e;
}

/* A layout of LAYERS x CACHES caches of BLOCKS blocks inside `buf`, cache c
 * of layer l at offset (l * CACHES + c) * 64 KiB + 96, with the given
 * block length and stride padding. */
static kvf_layout *layout_in(uint8_t *buf, uint64_t block_len, uint64_t pad,
                             kvf_cache_layout *caches) {
  kvf_layout *l = NULL;
  size_t i;
  for (i = 0; i < LAYERS * CACHES; i++) {
    caches[i].base = U(buf) + i * 0x10000 + 96;
    caches[i].block_len = block_len;
    caches[i].stride = block_len + (i % 2 ? pad : 0);
    caches[i].scale = 1;
    REQUIRE(caches[i].stride * BLOCKS + 96 <= 0x10000);
  }
  REQUIRE(kvf_layout_new(BLOCKS, LAYERS, CACHES, caches, &l) == KVF_STATUS_OK);
  return l;
}

/* COMPAT.md section 2 by hand: for every cache and id pair, the slice of
 * `len` bytes from `src` to `dst`, at `dst_off` / `src_off` inside the block. */
static void apply(uint8_t *dst_buf, const uint8_t *dst_mem, const kvf_cache_layout *dst,
                  uint64_t dst_off, const uint8_t *src_mem, const kvf_cache_layout *src,
                  uint64_t src_off, uint64_t len, const uint64_t *dst_ids,
                  const uint64_t *src_ids, size_t n) {
  size_t c, i;
  for (c = 0; c < LAYERS * CACHES; c++) {
    for (i = 0; i < n; i++) {
      uint64_t d = dst[c].base + dst_ids[i] * dst[c].stride + dst_off - U(dst_mem);
      uint64_t s = src[c].base + src_ids[i] * src[c].stride + src_off - U(src_mem);
      memcpy(dst_buf + d, src_mem + s, len);
    }
  }
}

static void test_transfer_blocks(void) {
  kvf_cache_layout dc[LAYERS * CACHES], pc[LAYERS * CACHES], d1c[LAYERS * CACHES];
  /* Decode blocks hold two prefill slices (n = 2); odd caches padded. */
  kvf_layout *dl = layout_in(dbuf, 2 * SLICE, 64, dc);
  kvf_layout *pl = layout_in(pbuf, SLICE, 0, pc);
  /* The same head count on both sides (n = 1). */
  kvf_layout *d1 = layout_in(dbuf, SLICE, 32, d1c);
  const uint64_t dids[] = {3, 4, 5, 9, 10}, pids[] = {0, 1, 2, 7, 15};
  kvf_plan_options o;
  uint64_t batch = 0;

  /* Pull: decode reads its second head slice from the prefill rank. */
  fill(dbuf, LEN, 1);
  fill(pbuf, LEN, 2);
  memcpy(dwant, dbuf, LEN);
  apply(dwant, dbuf, dc, SLICE, pbuf, pc, 0, SLICE, dids, pids, 5);
  o = options(2, 1, KVF_SPLIT_LOCAL);
  EXPECT(kvf_transfer_blocks(D, p_name, KVF_OP_READ, dl, pl, dids, 5, pids, 5, &o), KVF_STATUS_OK,
         NULL);
  CHECK(memcmp(dbuf, dwant, LEN) == 0);

  /* n = 1 with a prefix hit: the first two remote ids are already local. */
  {
    const uint64_t local_ids[] = {6, 7, 8}, remote_ids[] = {0, 1, 2, 3, 4};
    fill(dbuf, LEN, 3);
    memcpy(dwant, dbuf, LEN);
    apply(dwant, dbuf, d1c, 0, pbuf, pc, 0, SLICE, local_ids, remote_ids + 2, 3);
    o = options(1, 0, KVF_SPLIT_LOCAL);
    o.prefix = KVF_PREFIX_COMPUTED_TOKENS;
    o.computed_tokens = 256;
    o.tokens_per_block = 128;
    EXPECT(kvf_transfer_blocks(D, p_name, KVF_OP_READ, d1, pl, local_ids, 3, remote_ids, 5, &o),
           KVF_STATUS_OK, NULL);
    CHECK(memcmp(dbuf, dwant, LEN) == 0);
  }

  /* Push, asynchronously: the prefill rank writes its slice into the first
   * half of the decode blocks. */
  fill(dbuf, LEN, 4);
  fill(pbuf, LEN, 5);
  memcpy(dwant, dbuf, LEN);
  apply(dwant, dbuf, dc, 0, pbuf, pc, 0, SLICE, dids, pids, 5);
  o = options(2, 0, KVF_SPLIT_REMOTE);
  EXPECT(kvf_batch_submit_blocks(P, d_name, KVF_OP_WRITE, pl, dl, pids, 5, dids, 5, &o, &batch),
         KVF_STATUS_OK, NULL);
  CHECK(batch != 0);
  EXPECT(kvf_batch_wait(P, batch, KVF_WAIT_FOREVER), KVF_STATUS_OK, NULL);
  EXPECT(kvf_batch_free(P, batch), KVF_STATUS_OK, NULL);
  CHECK(memcmp(dbuf, dwant, LEN) == 0);

  /* No ids: nothing to move is success synchronously, and no batch. */
  EXPECT(kvf_transfer_blocks(D, p_name, KVF_OP_READ, d1, pl, NULL, 0, NULL, 0, NULL),
         KVF_STATUS_OK, NULL);
  batch = 0xabad1dea;
  EXPECT(kvf_batch_submit_blocks(D, p_name, KVF_OP_READ, d1, pl, NULL, 0, NULL, 0, NULL, &batch),
         KVF_STATUS_INVALID_ARGUMENT, "no blocks to transfer");
  CHECK(batch == 0xabad1dea);

  /* Refusals move nothing and hand out no batch. */
  memcpy(dwant, dbuf, LEN);
  memcpy(pwant, pbuf, LEN);
  o = options(2, 1, KVF_SPLIT_LOCAL);
  EXPECT(kvf_transfer_blocks(NULL, p_name, KVF_OP_READ, dl, pl, dids, 5, pids, 5, &o),
         KVF_STATUS_NULL_POINTER, "engine");
  EXPECT(kvf_transfer_blocks(D, NULL, KVF_OP_READ, dl, pl, dids, 5, pids, 5, &o),
         KVF_STATUS_NULL_POINTER, "session");
  EXPECT(kvf_transfer_blocks(D, p_name, 2, dl, pl, dids, 5, pids, 5, &o),
         KVF_STATUS_INVALID_ARGUMENT, "opcode 2");
  EXPECT(kvf_transfer_blocks(D, p_name, KVF_OP_READ, NULL, pl, dids, 5, pids, 5, &o),
         KVF_STATUS_NULL_POINTER, "local_layout");
  EXPECT(kvf_batch_submit_blocks(D, p_name, KVF_OP_READ, dl, pl, dids, 5, pids, 5, &o, NULL),
         KVF_STATUS_NULL_POINTER, "out_batch");
  /* The last id pair is bad: the valid ones before it do not move either. */
  {
    const uint64_t bad_pids[] = {0, 1, 2, 7, 16};
    EXPECT(kvf_transfer_blocks(D, p_name, KVF_OP_READ, dl, pl, dids, 5, bad_pids, 5, &o),
           KVF_STATUS_INVALID_ARGUMENT, "remote block id 16 at position 4");
    EXPECT(kvf_batch_submit_blocks(D, p_name, KVF_OP_READ, dl, pl, dids, 5, bad_pids, 5, &o,
                                   &batch),
           KVF_STATUS_INVALID_ARGUMENT, "remote block id 16");
  }
  /* n = 1 across layouts whose blocks differ: refused before any I/O. */
  EXPECT(kvf_transfer_blocks(D, p_name, KVF_OP_READ, dl, pl, dids, 5, pids, 5, NULL),
         KVF_STATUS_INVALID_ARGUMENT, "block_len 256 must equal 512");
  /* A layout over memory the engine does not know: the engine's status. */
  {
    uint8_t *stray = xmalloc(LAYERS * CACHES * 0x10000);
    kvf_cache_layout sc[LAYERS * CACHES];
    kvf_layout *sl = layout_in(stray, 2 * SLICE, 64, sc);
    EXPECT(kvf_transfer_blocks(D, p_name, KVF_OP_READ, sl, pl, dids, 5, pids, 5, &o),
           KVF_STATUS_LOCAL_OUT_OF_RANGE, "op 0");
    /* ... and on the peer's side. */
    o = options(2, 1, KVF_SPLIT_REMOTE);
    EXPECT(kvf_transfer_blocks(P, d_name, KVF_OP_WRITE, pl, sl, pids, 5, dids, 5, &o),
           KVF_STATUS_REMOTE_OUT_OF_RANGE, "op 0");
    kvf_layout_free(sl);
    free(stray);
  }
  EXPECT(kvf_transfer_blocks(D, "127.0.0.1:1", KVF_OP_READ, d1, pl, dids, 5, pids, 5, NULL),
         KVF_STATUS_PEER_UNREACHABLE, "127.0.0.1:1");
  EXPECT(kvf_transfer_blocks(D, "no port", KVF_OP_READ, d1, pl, dids, 5, pids, 5, NULL),
         KVF_STATUS_BAD_SESSION, "no port");
  CHECK(batch == 0xabad1dea);
  CHECK(memcmp(dbuf, dwant, LEN) == 0 && memcmp(pbuf, pwant, LEN) == 0);

  kvf_layout_free(dl);
  kvf_layout_free(pl);
  kvf_layout_free(d1);
}

int main(void) {
  REQUIRE(kvf_config_new(&marker_config) == KVF_STATUS_OK);
  prime_last_error();
  REQUIRE(strstr(kvf_last_error(), MARKER) != NULL);

  CHECK(KVF_ATTENTION_GQA == 0 && KVF_ATTENTION_MLA == 1 && KVF_ATTENTION_SPARSE == 2);
  CHECK(KVF_SPLIT_LOCAL == 0 && KVF_SPLIT_REMOTE == 1);
  CHECK(KVF_PREFIX_NONE == 0 && KVF_PREFIX_COMPUTED_TOKENS == 1 &&
        KVF_PREFIX_TRIM_REMOTE_HEAD == 2);

  test_pull_vectors();
  test_push_vectors();
  test_topology_errors();
  test_plan_examples();
  test_plan_spans();
  test_plan_call();
  test_layout_and_plan_errors();

  dbuf = xmalloc(LEN);
  pbuf = xmalloc(LEN);
  dwant = xmalloc(LEN);
  pwant = xmalloc(LEN);
  D = new_engine();
  P = new_engine();
  REQUIRE(kvf_engine_name(D, d_name, sizeof d_name, NULL) == KVF_STATUS_OK);
  REQUIRE(kvf_engine_name(P, p_name, sizeof p_name, NULL) == KVF_STATUS_OK);
  REQUIRE(kvf_register_memory(D, U(dbuf), LEN, "cpu:0") == KVF_STATUS_OK);
  REQUIRE(kvf_register_memory(P, U(pbuf), LEN, "cpu:0") == KVF_STATUS_OK);

  test_transfer_blocks();

  kvf_engine_free(D);
  kvf_engine_free(P);
  kvf_config_free(marker_config);
  free(dbuf);
  free(pbuf);
  free(dwant);
  free(pwant);

  printf("kvferry C topology test (%s, engines %s %s): %d checks, %d failed\n", kvf_version(),
         d_name, p_name, checks, failures);
  return failures == 0 ? 0 : 1;
}
