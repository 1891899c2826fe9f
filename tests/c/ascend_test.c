/*
 * The C API with NPU memory: kvf_config_use_ascend, "npu:N" registration and
 * a transfer between two engines' device buffers.
 *
 * argv[1] is an ACL runtime: the CANN stand-in in the tests
 * (crates/kvferry-capi/tests/c_programs.rs), libascendcl.so on an Ascend
 * machine. The program allocates device memory with it itself, as
 * torch_npu does in a serving process, then hands the addresses to kvferry,
 * which loads the same runtime (KVFERRY_ACL_LIBRARY).
 */
/* setenv, dlopen: POSIX, hidden by -std=c99 otherwise. */
#define _POSIX_C_SOURCE 200809L

#include "kvferry.h"

#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;

#define CHECK(cond, ...)                                                                   \
  do {                                                                                     \
    if (!(cond)) {                                                                         \
      failures++;                                                                          \
      fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond);            \
      fprintf(stderr, __VA_ARGS__);                                                        \
      fprintf(stderr, " (last error: %s)\n", kvf_last_error());                            \
    }                                                                                      \
  } while (0)

/* The few ACL functions the program itself calls, as CANN declares them
 * (aclError is int; the enums are int-sized). */
typedef int (*acl_init_fn)(const char *);
typedef int (*acl_set_device_fn)(int32_t);
typedef int (*acl_malloc_fn)(void **, size_t, int);
typedef int (*acl_free_fn)(void *);
typedef int (*acl_memcpy_fn)(void *, size_t, const void *, size_t, int);

#define ACL_MEMCPY_HOST_TO_DEVICE 1
#define ACL_MEMCPY_DEVICE_TO_HOST 2
#define ACL_MEM_MALLOC_HUGE_FIRST 0
#define ACL_ERROR_REPEAT_INITIALIZE 100002

static struct {
  acl_init_fn init;
  acl_set_device_fn set_device;
  acl_malloc_fn malloc;
  acl_free_fn free;
  acl_memcpy_fn memcpy;
} acl;

/* dlsym's object pointer into a function pointer, without the cast ISO C
 * leaves undefined. */
static int load_symbol(void *lib, const char *name, void *fn, size_t size) {
  void *p = dlsym(lib, name);
  if (p == NULL) {
    fprintf(stderr, "%s: %s\n", name, dlerror());
    return 0;
  }
  memcpy(fn, &p, size);
  return 1;
}

#define LOAD(lib, field, name) load_symbol(lib, name, &acl.field, sizeof acl.field)

enum { LEN = 4 << 20, BLOCK = 64 << 10, N = LEN / BLOCK };

static unsigned char pattern(size_t i) { return (unsigned char)(i * 13 + (i >> 11)); }

/* Without an ACL runtime: a clear refusal, and host memory still works. */
static void test_without_runtime(void) {
  kvf_config *config = NULL;
  kvf_engine *engine = NULL;
  CHECK(setenv("KVFERRY_ACL_LIBRARY", "/nonexistent/libascendcl.so", 1) == 0, "setenv");
  CHECK(kvf_config_new(&config) == KVF_STATUS_OK, "config");
  CHECK(kvf_config_use_ascend(config) == KVF_STATUS_UNSUPPORTED, "no runtime");
  CHECK(strstr(kvf_last_error(), "Ascend runtime not found") != NULL, "the error says so");
  CHECK(kvf_config_set_port(config, 0) == KVF_STATUS_OK, "the config is still usable");
  CHECK(kvf_engine_new(config, &engine) == KVF_STATUS_OK, "an engine without NPU memory");
  unsigned char *host = malloc(4096);
  CHECK(kvf_register_memory(engine, (uint64_t)(uintptr_t)host, 4096, "cpu:0") == KVF_STATUS_OK,
        "host memory");
  CHECK(kvf_register_memory(engine, (uint64_t)(uintptr_t)host + 8192, 16, "npu:0") ==
            KVF_STATUS_UNSUPPORTED,
        "npu without a runtime");
  kvf_engine_free(engine);
  kvf_config_free(config);
  free(host);
}

static kvf_engine *ascend_engine(void) {
  kvf_config *config = NULL;
  kvf_engine *engine = NULL;
  CHECK(kvf_config_new(&config) == KVF_STATUS_OK, "config");
  CHECK(kvf_config_use_ascend(config) == KVF_STATUS_OK, "use ascend");
  CHECK(kvf_config_set_port(config, 0) == KVF_STATUS_OK, "port");
  CHECK(kvf_engine_new(config, &engine) == KVF_STATUS_OK, "engine");
  kvf_config_free(config);
  return engine;
}

static void test_npu_transfer(const char *library) {
  CHECK(setenv("KVFERRY_ACL_LIBRARY", library, 1) == 0, "setenv");
  void *lib = dlopen(library, RTLD_NOW | RTLD_LOCAL);
  CHECK(lib != NULL, "dlopen %s: %s", library, dlerror());
  if (lib == NULL) {
    return;
  }
  if (!(LOAD(lib, init, "aclInit") && LOAD(lib, set_device, "aclrtSetDevice") &&
        LOAD(lib, malloc, "aclrtMalloc") && LOAD(lib, free, "aclrtFree") &&
        LOAD(lib, memcpy, "aclrtMemcpy"))) {
    failures++;
    dlclose(lib);
    return;
  }
  int rc = acl.init(NULL);
  CHECK(rc == 0 || rc == ACL_ERROR_REPEAT_INITIALIZE, "aclInit: %d", rc);

  /* The prefill side's KV cache on npu:0, the decode side's on npu:1. */
  void *src = NULL;
  void *dst = NULL;
  unsigned char *host = malloc(LEN);
  for (size_t i = 0; i < LEN; i++) {
    host[i] = pattern(i);
  }
  CHECK(acl.set_device(0) == 0, "set device 0");
  CHECK(acl.malloc(&src, LEN, ACL_MEM_MALLOC_HUGE_FIRST) == 0, "malloc on npu:0");
  CHECK(acl.memcpy(src, LEN, host, LEN, ACL_MEMCPY_HOST_TO_DEVICE) == 0, "fill npu:0");
  CHECK(acl.set_device(1) == 0, "set device 1");
  CHECK(acl.malloc(&dst, LEN, ACL_MEM_MALLOC_HUGE_FIRST) == 0, "malloc on npu:1");

  kvf_engine *prefill = ascend_engine();
  kvf_engine *decode = ascend_engine();
  CHECK(kvf_register_memory(prefill, (uint64_t)(uintptr_t)src, LEN, "npu:0") == KVF_STATUS_OK,
        "register npu:0");
  CHECK(kvf_register_memory(decode, (uint64_t)(uintptr_t)dst, LEN, "*") == KVF_STATUS_OK,
        "register npu:1, detected");
  /* Host memory is not device memory: refused with ACL's own words. */
  CHECK(kvf_register_memory(decode, (uint64_t)(uintptr_t)host, 4096, "npu:1") == KVF_STATUS_DEVICE,
        "host memory as npu:1");
  CHECK(strstr(kvf_last_error(), "aclrtPointerGetAttributes") != NULL, "names the ACL call");

  char name[128];
  size_t name_len = 0;
  CHECK(kvf_engine_name(prefill, name, sizeof name, &name_len) == KVF_STATUS_OK, "name");
  uint64_t local[N];
  uint64_t remote[N];
  uint64_t lens[N];
  for (size_t k = 0; k < N; k++) {
    /* Blocks in reverse order, so nothing coalesces. */
    local[k] = (uint64_t)(uintptr_t)dst + (uint64_t)(N - 1 - k) * BLOCK;
    remote[k] = (uint64_t)(uintptr_t)src + (uint64_t)(N - 1 - k) * BLOCK;
    lens[k] = BLOCK;
  }
  CHECK(kvf_transfer_sync(decode, name, KVF_OP_READ, local, remote, lens, N) == KVF_STATUS_OK,
        "read npu:0 -> npu:1");
  memset(host, 0, LEN);
  CHECK(acl.set_device(1) == 0, "set device 1");
  CHECK(acl.memcpy(host, LEN, dst, LEN, ACL_MEMCPY_DEVICE_TO_HOST) == 0, "read back npu:1");
  size_t bad = 0;
  while (bad < LEN && host[bad] == pattern(bad)) {
    bad++;
  }
  CHECK(bad == LEN, "byte %zu differs", bad);

  kvf_engine_free(decode);
  kvf_engine_free(prefill);
  CHECK(acl.free(dst) == 0, "free npu:1");
  CHECK(acl.set_device(0) == 0, "set device 0");
  CHECK(acl.free(src) == 0, "free npu:0");
  free(host);
  dlclose(lib);
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s <libascendcl.so or the CANN stand-in>\n", argv[0]);
    return 2;
  }
  test_without_runtime();
  test_npu_transfer(argv[1]);
  if (failures > 0) {
    fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  printf("ascend_test: ok\n");
  return 0;
}
