/*
 * kvferry CANN stand-in: a TEST library, not CANN, and no NPU.
 *
 * It exports the ACL subset kvferry calls (docs/ASCEND.md) with the
 * signatures of the real CANN headers: this file includes <acl/acl.h> from
 * the headers kvferry-ascend-sys's build found, so the compiler rejects any
 * definition whose signature differs from CANN's. kvferry's tests load it
 * through KVFERRY_ACL_LIBRARY instead of libascendcl.so.
 *
 * The model, and where it is stricter than hardware needs to be:
 * - "Device" memory is one POSIX shared-memory object per aclrtMalloc
 *   (shm_open + mmap), so that aclrtIpcMemGetExportKey can name it and another
 *   process's aclrtIpcMemImportByKey can map it. The address handed out is a
 *   PROT_NONE reservation: touching device memory from the host faults, as it
 *   does on an NPU. Copies go through a private read-write alias.
 * - The device is per thread (aclrtSetDevice / aclrtSetCurrentContext); every
 *   call that needs one fails with ACL_ERROR_RT_CONTEXT_NULL on a thread that
 *   has not set it.
 * - Async copies queue on their stream and run at
 *   aclrtSynchronizeStreamWithTimeout; aclrtStreamAbort discards them; a stream
 *   with queued work cannot be destroyed.
 * - aclrtPointerGetAttributes fails for host memory ACL does not manage.
 * - IPC: keys are 65 bytes (CANN fixes len at 65); an import needs the
 *   importer's pid allowed by aclrtIpcMemSetImportPid unless exported with
 *   ACL_RT_IPC_MEM_EXPORT_FLAG_DISABLE_PID_VALIDATION; memory imported from
 *   another device's process allows only asynchronous device-to-device copies
 *   (CANN's documented constraint); a key is imported once per process.
 *
 * Failure injection, read from the environment at call time:
 * - KVF_STANDIN_FAIL=<fn>:<n>[=<code>][,...]: the n-th call (1-based; '*' for
 *   every call) of function <fn> fails with <code> (default: a code fitting
 *   the function). <fn> is an ACL name (aclrtMemcpy) or an alias (memcpy,
 *   memcpy_async, memcpy_batch, memcpy_batch_async, malloc, malloc_host,
 *   free, set_device, create_stream, sync, abort, export, set_import_pid,
 *   import, ipc_close, host_register, pointer_attributes, bare_tgid). An
 *   aclrtMemcpyAsync failure surfaces at synchronize, as a failed task does
 *   on hardware; so does an aclrtMemcpyBatchAsync one (at its middle entry:
 *   the entries before it are copied).
 * - KVF_STANDIN_TIMEOUT=1: aclrtSynchronizeStreamWithTimeout on a stream with
 *   queued work waits out the timeout and fails with
 *   ACL_ERROR_RT_STREAM_SYNC_TIMEOUT, leaving the work queued (a hung device).
 * - KVF_STANDIN_DEVICES=<n>: the number of devices (default 8).
 * - KVF_STANDIN_UNREGISTERED=report: aclrtPointerGetAttributes reports
 *   ACL_MEM_LOCATION_TYPE_UNREGISTERED for unmanaged host memory instead of
 *   failing (the header has that type; which a CANN release does varies).
 * Every failure leaves a text for aclGetRecentErrMsg on the calling thread.
 *
 * The build defines KVF_HAS_<function> for each function the headers declare;
 * the newer ones (aclrtPointerGetAttributes, aclrtHostRegister/Unregister,
 * aclrtMemcpyBatch, aclrtStreamAbort, aclrtIpcMem*) are left out, as the
 * headers leave them out, when older CANN headers lack them.
 */
#define _GNU_SOURCE
#include <acl/acl.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* Error codes older headers (ACL 1.12) do not define; the values are ACL's. */
#ifndef ACL_ERROR_RT_STREAM_SYNC_TIMEOUT
#define ACL_ERROR_RT_STREAM_SYNC_TIMEOUT 507046
#endif

#define SI_TAG "[kvferry CANN stand-in] "
#define SI_MAX_DEVICES 64
#define SI_DEFAULT_DEVICES 8
#define SI_PAGE ((size_t)4096)
#define SI_HUGE_PAGE ((size_t)2 << 20)
#define SI_HOST_REGISTER_ALIGN ((size_t)64 << 10)
#define SI_MAX_PIDS 64
#define SI_KEY_PREFIX "kvfsi:"
#define SI_KEY_LEN 65 /* CANN: "len: key length, fixed at 65" */
#define SI_SHM_MAGIC UINT64_C(0x4b56465253544e31) /* "KVFRSTN1" */
#define SI_MAX_SLEEP_MS 10000

/* ------------------------------------------------------------------ errors */

static __thread char t_error[1024];
static __thread int t_error_set;
static __thread char t_error_returned[1024];

__attribute__((format(printf, 2, 3))) static aclError si_fail(aclError code, const char *fmt, ...)
{
    va_list args;
    size_t tag = strlen(SI_TAG);
    memcpy(t_error, SI_TAG, tag);
    va_start(args, fmt);
    vsnprintf(t_error + tag, sizeof t_error - tag, fmt, args);
    va_end(args);
    t_error_set = 1;
    return code;
}

/* Like real ACL: the last failure's text on this thread, once; NULL if none. */
const char *aclGetRecentErrMsg(void)
{
    if (!t_error_set) {
        return NULL;
    }
    memcpy(t_error_returned, t_error, sizeof t_error_returned);
    t_error_set = 0;
    return t_error_returned;
}

/* ------------------------------------------------------- failure injection */

enum si_fn {
    FN_aclInit,
    FN_aclFinalize,
    FN_aclrtSetDevice,
    FN_aclrtGetDevice,
    FN_aclrtGetDeviceCount,
    FN_aclrtGetCurrentContext,
    FN_aclrtSetCurrentContext,
    FN_aclrtCreateStreamWithConfig,
    FN_aclrtDestroyStream,
    FN_aclrtSynchronizeStreamWithTimeout,
    FN_aclrtStreamAbort,
    FN_aclrtMemcpy,
    FN_aclrtMemcpyAsync,
    FN_aclrtMemcpyBatch,
    FN_aclrtPointerGetAttributes,
    FN_aclrtMalloc,
    FN_aclrtFree,
    FN_aclrtMallocHost,
    FN_aclrtFreeHost,
    FN_aclrtHostRegister,
    FN_aclrtHostUnregister,
    FN_aclrtIpcMemGetExportKey,
    FN_aclrtIpcMemSetImportPid,
    FN_aclrtIpcMemImportByKey,
    FN_aclrtIpcMemClose,
    FN_aclrtMemcpyBatchAsync,
    FN_aclrtDeviceGetBareTgid,
    FN_COUNT
};

static const struct {
    const char *name;
    const char *alias;
    aclError code; /* injected by default */
} si_fns[FN_COUNT] = {
    [FN_aclInit] = {"aclInit", "init", ACL_ERROR_INTERNAL_ERROR},
    [FN_aclFinalize] = {"aclFinalize", "finalize", ACL_ERROR_INTERNAL_ERROR},
    [FN_aclrtSetDevice] = {"aclrtSetDevice", "set_device", ACL_ERROR_RT_NO_DEVICE},
    [FN_aclrtGetDevice] = {"aclrtGetDevice", "get_device", ACL_ERROR_RT_INTERNAL_ERROR},
    [FN_aclrtGetDeviceCount] = {"aclrtGetDeviceCount", "device_count", ACL_ERROR_RT_NO_DEVICE},
    [FN_aclrtGetCurrentContext] = {"aclrtGetCurrentContext", "get_context", ACL_ERROR_RT_INTERNAL_ERROR},
    [FN_aclrtSetCurrentContext] = {"aclrtSetCurrentContext", "set_context", ACL_ERROR_RT_INTERNAL_ERROR},
    [FN_aclrtCreateStreamWithConfig] = {"aclrtCreateStreamWithConfig", "create_stream", ACL_ERROR_RT_NO_STREAM_RESOURCE},
    [FN_aclrtDestroyStream] = {"aclrtDestroyStream", "destroy_stream", ACL_ERROR_RT_INTERNAL_ERROR},
    [FN_aclrtSynchronizeStreamWithTimeout] = {"aclrtSynchronizeStreamWithTimeout", "sync", ACL_ERROR_RT_INTERNAL_ERROR},
    [FN_aclrtStreamAbort] = {"aclrtStreamAbort", "abort", ACL_ERROR_RT_INTERNAL_ERROR},
    [FN_aclrtMemcpy] = {"aclrtMemcpy", "memcpy", ACL_ERROR_RT_SYS_DMA},
    [FN_aclrtMemcpyAsync] = {"aclrtMemcpyAsync", "memcpy_async", ACL_ERROR_RT_SYS_DMA},
    [FN_aclrtMemcpyBatch] = {"aclrtMemcpyBatch", "memcpy_batch", ACL_ERROR_RT_SYS_DMA},
    [FN_aclrtPointerGetAttributes] = {"aclrtPointerGetAttributes", "pointer_attributes", ACL_ERROR_RT_INTERNAL_ERROR},
    [FN_aclrtMalloc] = {"aclrtMalloc", "malloc", ACL_ERROR_RT_MEMORY_ALLOCATION},
    [FN_aclrtFree] = {"aclrtFree", "free", ACL_ERROR_RT_MEMORY_FREE},
    [FN_aclrtMallocHost] = {"aclrtMallocHost", "malloc_host", ACL_ERROR_RT_MEMORY_ALLOCATION},
    [FN_aclrtFreeHost] = {"aclrtFreeHost", "free_host", ACL_ERROR_RT_MEMORY_FREE},
    [FN_aclrtHostRegister] = {"aclrtHostRegister", "host_register", ACL_ERROR_RT_MEMORY_ALLOCATION},
    [FN_aclrtHostUnregister] = {"aclrtHostUnregister", "host_unregister", ACL_ERROR_RT_INTERNAL_ERROR},
    [FN_aclrtIpcMemGetExportKey] = {"aclrtIpcMemGetExportKey", "export", ACL_ERROR_RT_IPC_ERROR},
    [FN_aclrtIpcMemSetImportPid] = {"aclrtIpcMemSetImportPid", "set_import_pid", ACL_ERROR_RT_IPC_ERROR},
    [FN_aclrtIpcMemImportByKey] = {"aclrtIpcMemImportByKey", "import", ACL_ERROR_RT_IPC_ERROR},
    [FN_aclrtIpcMemClose] = {"aclrtIpcMemClose", "ipc_close", ACL_ERROR_RT_IPC_ERROR},
    [FN_aclrtMemcpyBatchAsync] = {"aclrtMemcpyBatchAsync", "memcpy_batch_async", ACL_ERROR_RT_SYS_DMA},
    [FN_aclrtDeviceGetBareTgid] = {"aclrtDeviceGetBareTgid", "bare_tgid", ACL_ERROR_RT_INTERNAL_ERROR},
};

static atomic_ulong si_calls[FN_COUNT];

/* A malformed KVF_STANDIN_FAIL is a broken test, not a runtime condition. */
__attribute__((noreturn)) static void si_bad_spec(const char *spec, const char *why)
{
    fprintf(stderr, SI_TAG "KVF_STANDIN_FAIL=%s is malformed: %s\n", spec, why);
    abort();
}

/*
 * Counts this call of `fn`; returns 0, or the code to fail it with when
 * KVF_STANDIN_FAIL names it. `call` receives the call's number (1-based).
 */
static aclError si_injected(enum si_fn fn, unsigned long *call)
{
    unsigned long n = atomic_fetch_add(&si_calls[fn], 1) + 1;
    if (call != NULL) {
        *call = n;
    }
    const char *spec = getenv("KVF_STANDIN_FAIL");
    if (spec == NULL || *spec == '\0') {
        return 0;
    }
    const char *p = spec;
    while (*p != '\0') {
        const char *colon = strchr(p, ':');
        if (colon == NULL) {
            si_bad_spec(spec, "an entry lacks ':' (expected <function>:<n>[=<code>])");
        }
        size_t name_len = (size_t)(colon - p);
        int known = 0;
        int match = 0;
        for (int i = 0; i < FN_COUNT; i++) {
            int is = (strlen(si_fns[i].name) == name_len && strncmp(p, si_fns[i].name, name_len) == 0)
                || (strlen(si_fns[i].alias) == name_len && strncmp(p, si_fns[i].alias, name_len) == 0);
            if (is) {
                known = 1;
                match = (i == (int)fn);
            }
        }
        if (!known) {
            si_bad_spec(spec, "unknown function name");
        }
        const char *q = colon + 1;
        int every = 0;
        unsigned long wanted = 0;
        if (*q == '*') {
            every = 1;
            q++;
        } else {
            char *end;
            errno = 0;
            wanted = strtoul(q, &end, 10);
            if (end == q || errno != 0 || wanted == 0) {
                si_bad_spec(spec, "the call number must be a positive integer or '*'");
            }
            q = end;
        }
        aclError code = si_fns[fn].code;
        if (*q == '=') {
            char *end;
            long value = strtol(q + 1, &end, 10);
            if (end == q + 1 || value == 0 || value > INT_MAX || value < INT_MIN) {
                si_bad_spec(spec, "the code after '=' must be a non-zero integer");
            }
            code = (aclError)value;
            q = end;
        }
        if (*q != ',' && *q != '\0') {
            si_bad_spec(spec, "entries are separated by ','");
        }
        if (match && (every || wanted == n)) {
            return code;
        }
        p = (*q == ',') ? q + 1 : q;
    }
    return 0;
}

#define SI_INJECT(fn)                                                                          \
    do {                                                                                       \
        unsigned long si_call_;                                                                \
        aclError si_code_ = si_injected(FN_##fn, &si_call_);                                   \
        if (si_code_ != 0) {                                                                   \
            return si_fail(si_code_, "injected failure of " #fn " call #%lu (KVF_STANDIN_FAIL=%s)", \
                si_call_, getenv("KVF_STANDIN_FAIL"));                                         \
        }                                                                                      \
    } while (0)

/* ------------------------------------------------------ process and thread */

static pthread_mutex_t si_lock = PTHREAD_MUTEX_INITIALIZER;
static int si_initialized;
static __thread int t_device = -1;

struct si_context {
    uint64_t magic;
    int device;
};
#define SI_CONTEXT_MAGIC UINT64_C(0x4b5646434f4e5458)
static struct si_context si_contexts[SI_MAX_DEVICES];

static int si_device_count(void)
{
    const char *value = getenv("KVF_STANDIN_DEVICES");
    if (value == NULL || *value == '\0') {
        return SI_DEFAULT_DEVICES;
    }
    long n = strtol(value, NULL, 10);
    if (n < 1) {
        return 1;
    }
    return n > SI_MAX_DEVICES ? SI_MAX_DEVICES : (int)n;
}

static int si_is_initialized(void)
{
    pthread_mutex_lock(&si_lock);
    int initialized = si_initialized;
    pthread_mutex_unlock(&si_lock);
    return initialized;
}

#define SI_REQUIRE_INIT(fn)                                                                    \
    do {                                                                                       \
        if (!si_is_initialized()) {                                                            \
            return si_fail(ACL_ERROR_UNINITIALIZE, #fn ": aclInit has not been called");        \
        }                                                                                      \
    } while (0)

#define SI_REQUIRE_DEVICE(fn)                                                                  \
    do {                                                                                       \
        if (t_device < 0) {                                                                    \
            return si_fail(ACL_ERROR_RT_CONTEXT_NULL,                                          \
                #fn ": no device is set on this thread (tid %ld): every thread that calls ACL " \
                "must call aclrtSetDevice or aclrtSetCurrentContext first",                    \
                (long)gettid());                                                               \
        }                                                                                      \
    } while (0)

static void si_cleanup_at_exit(void);

aclError aclInit(const char *configPath)
{
    SI_INJECT(aclInit);
    if (configPath != NULL && configPath[0] != '\0' && access(configPath, R_OK) != 0) {
        return si_fail(ACL_ERROR_INVALID_FILE, "aclInit: cannot read the config file %s: %s", configPath,
            strerror(errno));
    }
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, si_cleanup_at_exit);
    pthread_mutex_lock(&si_lock);
    int already = si_initialized;
    si_initialized = 1;
    pthread_mutex_unlock(&si_lock);
    if (already) {
        return si_fail(ACL_ERROR_REPEAT_INITIALIZE, "aclInit: ACL is already initialised in this process");
    }
    return ACL_SUCCESS;
}

aclError aclFinalize(void)
{
    SI_INJECT(aclFinalize);
    pthread_mutex_lock(&si_lock);
    int was = si_initialized;
    si_initialized = 0;
    pthread_mutex_unlock(&si_lock);
    if (!was) {
        return si_fail(ACL_ERROR_REPEAT_FINALIZE, "aclFinalize: ACL is not initialised");
    }
    return ACL_SUCCESS;
}

aclError aclrtGetDeviceCount(uint32_t *count)
{
    SI_INJECT(aclrtGetDeviceCount);
    if (count == NULL) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtGetDeviceCount: count is NULL");
    }
    *count = (uint32_t)si_device_count();
    return ACL_SUCCESS;
}

aclError aclrtSetDevice(int32_t deviceId)
{
    SI_INJECT(aclrtSetDevice);
    SI_REQUIRE_INIT(aclrtSetDevice);
    int count = si_device_count();
    if (deviceId < 0 || deviceId >= count) {
        return si_fail(ACL_ERROR_RT_INVALID_DEVICEID, "aclrtSetDevice: device %d does not exist (%d devices)",
            deviceId, count);
    }
    t_device = deviceId;
    return ACL_SUCCESS;
}

aclError aclrtGetDevice(int32_t *deviceId)
{
    SI_INJECT(aclrtGetDevice);
    if (deviceId == NULL) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtGetDevice: deviceId is NULL");
    }
    SI_REQUIRE_DEVICE(aclrtGetDevice);
    *deviceId = t_device;
    return ACL_SUCCESS;
}

aclError aclrtGetCurrentContext(aclrtContext *context)
{
    SI_INJECT(aclrtGetCurrentContext);
    if (context == NULL) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtGetCurrentContext: context is NULL");
    }
    SI_REQUIRE_DEVICE(aclrtGetCurrentContext);
    struct si_context *ctx = &si_contexts[t_device];
    ctx->magic = SI_CONTEXT_MAGIC;
    ctx->device = t_device;
    *context = ctx;
    return ACL_SUCCESS;
}

aclError aclrtSetCurrentContext(aclrtContext context)
{
    SI_INJECT(aclrtSetCurrentContext);
    SI_REQUIRE_INIT(aclrtSetCurrentContext);
    struct si_context *ctx = context;
    if (ctx < &si_contexts[0] || ctx >= &si_contexts[SI_MAX_DEVICES] || ctx->magic != SI_CONTEXT_MAGIC) {
        return si_fail(ACL_ERROR_INVALID_PARAM,
            "aclrtSetCurrentContext: %p is not a context aclrtGetCurrentContext returned", context);
    }
    t_device = ctx->device;
    return ACL_SUCCESS;
}

/* ------------------------------------------------------------------ memory */

/* The first page of every device allocation's shared-memory object. */
struct si_shm_header {
    uint64_t magic;
    uint64_t size;      /* bytes of the allocation */
    int32_t device;     /* the device it was allocated on */
    int32_t owner_pid;
    uint32_t exported;  /* 1 while an export is open (aclrtIpcMemClose revokes) */
    uint32_t check_pid; /* 0 when exported with DISABLE_PID_VALIDATION */
    uint32_t npids;     /* published after the pids it counts */
    int32_t pids[SI_MAX_PIDS];
};

enum si_kind { SI_DEVICE = 1, SI_IMPORTED, SI_HOST_PINNED, SI_HOST_REGISTERED };

struct si_region {
    enum si_kind kind;
    char *base;  /* the address the caller sees */
    char *rw;    /* where the stand-in reads and writes the bytes at base */
    size_t size;
    int device;
    size_t page_size;               /* reported by aclrtPointerGetAttributes */
    char *reserve;                  /* PROT_NONE reservation holding base */
    size_t reserve_len;
    char *shm_map;                  /* header + data mapping (device kinds) */
    size_t shm_map_len;
    char shm_name[64];              /* SI_DEVICE: the object it owns */
    char key[SI_KEY_LEN];           /* SI_IMPORTED: the key it came from */
    struct si_region *next;
};

static struct si_region *si_regions; /* under si_lock */
static atomic_ulong si_shm_serial;

static int si_is_device_kind(enum si_kind kind)
{
    return kind == SI_DEVICE || kind == SI_IMPORTED;
}

/* The region holding address p, under si_lock. */
static struct si_region *si_find_locked(const void *p)
{
    const char *c = p;
    for (struct si_region *r = si_regions; r != NULL; r = r->next) {
        if (c >= r->base && c < r->base + r->size) {
            return r;
        }
    }
    return NULL;
}

static void si_unlink_all(void)
{
    pthread_mutex_lock(&si_lock);
    for (struct si_region *r = si_regions; r != NULL; r = r->next) {
        if (r->kind == SI_DEVICE) {
            shm_unlink(r->shm_name);
        }
    }
    pthread_mutex_unlock(&si_lock);
}

/* Device memory dies with its process: no shared-memory object outlives it. */
static void si_cleanup_at_exit(void)
{
    atexit(si_unlink_all);
}

static size_t si_round_up(size_t n, size_t to)
{
    return (n + to - 1) / to * to;
}

/* A PROT_NONE range of `len` bytes aligned to `align`: device addresses. */
static char *si_reserve(size_t len, size_t align, char **reserve, size_t *reserve_len)
{
    size_t total = len + align;
    char *p = mmap(NULL, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        return NULL;
    }
    *reserve = p;
    *reserve_len = total;
    return (char *)si_round_up((uintptr_t)p, align);
}

static size_t si_policy_page(aclrtMemMallocPolicy policy)
{
    switch (policy & 0xffU) {
    case ACL_MEM_MALLOC_NORMAL_ONLY:
    case ACL_MEM_MALLOC_NORMAL_ONLY_P2P:
        return SI_PAGE;
    default: /* HUGE_FIRST (the usual), HUGE_ONLY, their P2P forms, 1G */
        return SI_HUGE_PAGE;
    }
}

aclError aclrtMalloc(void **devPtr, size_t size, aclrtMemMallocPolicy policy)
{
    SI_INJECT(aclrtMalloc);
    if (devPtr == NULL) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtMalloc: devPtr is NULL");
    }
    if (size == 0) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtMalloc: size must be greater than zero");
    }
    SI_REQUIRE_DEVICE(aclrtMalloc);
    struct si_region *r = calloc(1, sizeof *r);
    if (r == NULL) {
        return si_fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "aclrtMalloc: out of host memory for bookkeeping");
    }
    snprintf(r->shm_name, sizeof r->shm_name, "/kvfsi-%d-%lu", (int)getpid(),
        atomic_fetch_add(&si_shm_serial, 1));
    int fd = shm_open(r->shm_name, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0) {
        aclError err = si_fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "aclrtMalloc: shm_open(%s): %s", r->shm_name,
            strerror(errno));
        free(r);
        return err;
    }
    size_t data_len = si_round_up(size, SI_PAGE);
    r->shm_map_len = SI_PAGE + data_len;
    if (ftruncate(fd, (off_t)r->shm_map_len) != 0) {
        int err = errno;
        close(fd);
        shm_unlink(r->shm_name);
        free(r);
        return si_fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "aclrtMalloc: %zu bytes: %s", size, strerror(err));
    }
    r->shm_map = mmap(NULL, r->shm_map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    r->page_size = si_policy_page(policy);
    r->base = si_reserve(size, r->page_size, &r->reserve, &r->reserve_len);
    if (r->shm_map == MAP_FAILED || r->base == NULL) {
        if (r->shm_map != MAP_FAILED) {
            munmap(r->shm_map, r->shm_map_len);
        }
        shm_unlink(r->shm_name);
        free(r);
        return si_fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "aclrtMalloc: cannot map %zu bytes", size);
    }
    struct si_shm_header *h = (struct si_shm_header *)r->shm_map;
    h->size = size;
    h->device = t_device;
    h->owner_pid = (int32_t)getpid();
    h->check_pid = 1;
    __atomic_store_n(&h->magic, SI_SHM_MAGIC, __ATOMIC_RELEASE);
    r->kind = SI_DEVICE;
    r->rw = r->shm_map + SI_PAGE;
    r->size = size;
    r->device = t_device;
    pthread_mutex_lock(&si_lock);
    r->next = si_regions;
    si_regions = r;
    pthread_mutex_unlock(&si_lock);
    *devPtr = r->base;
    return ACL_SUCCESS;
}

static void si_unmap(struct si_region *r)
{
    if (r->shm_map != NULL) {
        munmap(r->shm_map, r->shm_map_len);
    }
    if (r->reserve != NULL) {
        munmap(r->reserve, r->reserve_len);
    }
}

/* Unlinks and returns the region starting at `p` of kind `kind`, or NULL. */
static struct si_region *si_take_locked(const void *p, enum si_kind kind)
{
    for (struct si_region **link = &si_regions; *link != NULL; link = &(*link)->next) {
        struct si_region *r = *link;
        if (r->base == p && r->kind == kind) {
            *link = r->next;
            return r;
        }
    }
    return NULL;
}

static const char *si_kind_name(enum si_kind kind)
{
    switch (kind) {
    case SI_DEVICE:
        return "device memory from aclrtMalloc";
    case SI_IMPORTED:
        return "device memory from aclrtIpcMemImportByKey (close it with aclrtIpcMemClose)";
    case SI_HOST_PINNED:
        return "host memory from aclrtMallocHost (free it with aclrtFreeHost)";
    case SI_HOST_REGISTERED:
        return "host memory registered with aclrtHostRegister";
    }
    return "memory";
}

aclError aclrtFree(void *devPtr)
{
    SI_INJECT(aclrtFree);
    if (devPtr == NULL) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtFree: devPtr is NULL");
    }
    SI_REQUIRE_DEVICE(aclrtFree);
    pthread_mutex_lock(&si_lock);
    struct si_region *r = si_take_locked(devPtr, SI_DEVICE);
    struct si_region *other = r == NULL ? si_find_locked(devPtr) : NULL;
    enum si_kind other_kind = other != NULL ? other->kind : SI_DEVICE;
    int other_at_start = other != NULL && other->base == devPtr;
    pthread_mutex_unlock(&si_lock);
    if (r == NULL) {
        if (other != NULL) {
            return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtFree: %p is %s%s", devPtr, si_kind_name(other_kind),
                other_at_start ? "" : ", and not the start of it");
        }
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtFree: %p is not an address aclrtMalloc returned", devPtr);
    }
    shm_unlink(r->shm_name);
    si_unmap(r);
    free(r);
    return ACL_SUCCESS;
}

aclError aclrtMallocHost(void **hostPtr, size_t size)
{
    SI_INJECT(aclrtMallocHost);
    if (hostPtr == NULL) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtMallocHost: hostPtr is NULL");
    }
    if (size == 0) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtMallocHost: size must be greater than zero");
    }
    SI_REQUIRE_DEVICE(aclrtMallocHost);
    struct si_region *r = calloc(1, sizeof *r);
    if (r == NULL) {
        return si_fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "aclrtMallocHost: out of host memory");
    }
    size_t len = si_round_up(size, SI_PAGE);
    char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        free(r);
        return si_fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "aclrtMallocHost: %zu bytes: %s", size, strerror(errno));
    }
    r->kind = SI_HOST_PINNED;
    r->base = r->rw = p;
    r->size = size;
    r->page_size = SI_PAGE;
    r->reserve = p;
    r->reserve_len = len;
    pthread_mutex_lock(&si_lock);
    r->next = si_regions;
    si_regions = r;
    pthread_mutex_unlock(&si_lock);
    *hostPtr = p;
    return ACL_SUCCESS;
}

aclError aclrtFreeHost(void *hostPtr)
{
    SI_INJECT(aclrtFreeHost);
    if (hostPtr == NULL) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtFreeHost: hostPtr is NULL");
    }
    pthread_mutex_lock(&si_lock);
    struct si_region *r = si_take_locked(hostPtr, SI_HOST_PINNED);
    pthread_mutex_unlock(&si_lock);
    if (r == NULL) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtFreeHost: %p is not an address aclrtMallocHost returned",
            hostPtr);
    }
    si_unmap(r);
    free(r);
    return ACL_SUCCESS;
}

#if defined(KVF_HAS_aclrtHostRegister) && defined(KVF_HAS_aclrtHostUnregister)
aclError aclrtHostRegister(void *ptr, uint64_t size, aclrtHostRegisterType type, void **devPtr)
{
    SI_INJECT(aclrtHostRegister);
    if (ptr == NULL || devPtr == NULL) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtHostRegister: ptr and devPtr must not be NULL");
    }
    if (size == 0) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtHostRegister: size must be greater than zero");
    }
    if (type != ACL_HOST_REGISTER_MAPPED && type != ACL_HOST_REGISTER_IOMEMORY
        && type != ACL_HOST_REGISTER_READONLY) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtHostRegister: unknown type %d", (int)type);
    }
    SI_REQUIRE_DEVICE(aclrtHostRegister);
    if ((uintptr_t)ptr % SI_HOST_REGISTER_ALIGN != 0) {
        return si_fail(ACL_ERROR_RT_ADDR_UNALIGNED,
            "aclrtHostRegister: %p is not 64 KiB aligned (malloc'd memory usually is not): "
            "allocate with aclrtMallocHost, or with mmap / posix_memalign(65536)", ptr);
    }
    pthread_mutex_lock(&si_lock);
    struct si_region *existing = si_find_locked(ptr);
    pthread_mutex_unlock(&si_lock);
    if (existing != NULL) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtHostRegister: %p is already %s", ptr,
            si_kind_name(existing->kind));
    }
    struct si_region *r = calloc(1, sizeof *r);
    if (r == NULL) {
        return si_fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "aclrtHostRegister: out of host memory");
    }
    r->kind = SI_HOST_REGISTERED;
    r->base = r->rw = ptr;
    r->size = (size_t)size;
    r->page_size = SI_PAGE;
    pthread_mutex_lock(&si_lock);
    r->next = si_regions;
    si_regions = r;
    pthread_mutex_unlock(&si_lock);
    /* The stand-in's device sees host memory at the same address. */
    *devPtr = ptr;
    return ACL_SUCCESS;
}

aclError aclrtHostUnregister(void *ptr)
{
    SI_INJECT(aclrtHostUnregister);
    if (ptr == NULL) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtHostUnregister: ptr is NULL");
    }
    pthread_mutex_lock(&si_lock);
    struct si_region *r = si_take_locked(ptr, SI_HOST_REGISTERED);
    pthread_mutex_unlock(&si_lock);
    if (r == NULL) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtHostUnregister: %p was not registered with aclrtHostRegister",
            ptr);
    }
    free(r);
    return ACL_SUCCESS;
}
#endif /* aclrtHostRegister */

#ifdef KVF_HAS_aclrtPointerGetAttributes
aclError aclrtPointerGetAttributes(const void *ptr, aclrtPtrAttributes *attributes)
{
    SI_INJECT(aclrtPointerGetAttributes);
    if (ptr == NULL || attributes == NULL) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtPointerGetAttributes: ptr and attributes must not be NULL");
    }
    memset(attributes, 0, sizeof *attributes);
    pthread_mutex_lock(&si_lock);
    struct si_region *r = si_find_locked(ptr);
    int found = r != NULL;
    enum si_kind kind = found ? r->kind : SI_DEVICE;
    int device = found ? r->device : 0;
    size_t page = found ? r->page_size : SI_PAGE;
    pthread_mutex_unlock(&si_lock);
    if (!found) {
        const char *mode = getenv("KVF_STANDIN_UNREGISTERED");
        if (mode != NULL && strcmp(mode, "report") == 0) {
            attributes->location.type = ACL_MEM_LOCATION_TYPE_UNREGISTERED;
            attributes->pageSize = (uint32_t)SI_PAGE;
            return ACL_SUCCESS;
        }
        return si_fail(ACL_ERROR_INVALID_PARAM,
            "aclrtPointerGetAttributes: %p is not memory ACL manages (not from aclrtMalloc, aclrtMallocHost, "
            "aclrtHostRegister or aclrtIpcMemImportByKey)", ptr);
    }
    if (si_is_device_kind(kind)) {
        attributes->location.type = ACL_MEM_LOCATION_TYPE_DEVICE;
        attributes->location.id = (uint32_t)device;
    } else {
        attributes->location.type = ACL_MEM_LOCATION_TYPE_HOST;
        attributes->location.id = 0;
    }
    attributes->pageSize = (uint32_t)page;
    return ACL_SUCCESS;
}
#endif /* KVF_HAS_aclrtPointerGetAttributes */

/* ------------------------------------------------------------------ copies */

/*
 * aclrtMemcpyKind values that older headers (ACL 1.12) do not name; the
 * values are ACL's ABI and do not change.
 */
#define SI_MEMCPY_DEFAULT 4
#define SI_MEMCPY_HOST_TO_BUF_TO_DEVICE 5
#define SI_MEMCPY_INNER_DEVICE_TO_DEVICE 6
#define SI_MEMCPY_INTER_DEVICE_TO_DEVICE 7

static const char *si_kind_text(aclrtMemcpyKind kind)
{
    switch ((int)kind) {
    case ACL_MEMCPY_HOST_TO_HOST:
        return "ACL_MEMCPY_HOST_TO_HOST";
    case ACL_MEMCPY_HOST_TO_DEVICE:
        return "ACL_MEMCPY_HOST_TO_DEVICE";
    case ACL_MEMCPY_DEVICE_TO_HOST:
        return "ACL_MEMCPY_DEVICE_TO_HOST";
    case ACL_MEMCPY_DEVICE_TO_DEVICE:
        return "ACL_MEMCPY_DEVICE_TO_DEVICE";
    case SI_MEMCPY_DEFAULT:
        return "ACL_MEMCPY_DEFAULT";
    case SI_MEMCPY_HOST_TO_BUF_TO_DEVICE:
        return "ACL_MEMCPY_HOST_TO_BUF_TO_DEVICE";
    case SI_MEMCPY_INNER_DEVICE_TO_DEVICE:
        return "ACL_MEMCPY_INNER_DEVICE_TO_DEVICE";
    case SI_MEMCPY_INTER_DEVICE_TO_DEVICE:
        return "ACL_MEMCPY_INTER_DEVICE_TO_DEVICE";
    }
    return "an unknown kind";
}

/* Which sides a kind says are device memory: -1 = either (DEFAULT). */
static int si_kind_sides(aclrtMemcpyKind kind, int *dst_device, int *src_device)
{
    switch ((int)kind) {
    case ACL_MEMCPY_HOST_TO_HOST:
        *dst_device = 0;
        *src_device = 0;
        return 1;
    case ACL_MEMCPY_HOST_TO_DEVICE:
    case SI_MEMCPY_HOST_TO_BUF_TO_DEVICE:
        *dst_device = 1;
        *src_device = 0;
        return 1;
    case ACL_MEMCPY_DEVICE_TO_HOST:
        *dst_device = 0;
        *src_device = 1;
        return 1;
    case ACL_MEMCPY_DEVICE_TO_DEVICE:
    case SI_MEMCPY_INNER_DEVICE_TO_DEVICE:
    case SI_MEMCPY_INTER_DEVICE_TO_DEVICE:
        *dst_device = 1;
        *src_device = 1;
        return 1;
    case SI_MEMCPY_DEFAULT:
        *dst_device = -1;
        *src_device = -1;
        return 1;
    }
    return 0;
}

/*
 * Resolves one side of a copy: device memory to its read-write alias, host
 * memory as it is. `want_device` 1/0/-1 (either); `want_id` the device the
 * caller says it is on (-1: any). `device_out` receives the region's device or -1.
 */
static aclError si_resolve(const char *fn, const char *side, const void *p, size_t count, int want_device,
    int want_id, const char *says, char **out, int *device_out)
{
    pthread_mutex_lock(&si_lock);
    struct si_region *r = si_find_locked(p);
    int is_device = r != NULL && si_is_device_kind(r->kind);
    int device = is_device ? r->device : -1;
    char *base = r != NULL ? r->base : NULL;
    char *rw = r != NULL ? r->rw : NULL;
    size_t size = r != NULL ? r->size : 0;
    pthread_mutex_unlock(&si_lock);
    if (want_device == 1 && !is_device) {
        return si_fail(ACL_ERROR_INVALID_PARAM,
            "%s: %s %p is not device memory (from aclrtMalloc or aclrtIpcMemImportByKey), but %s says it is",
            fn, side, p, says);
    }
    if (want_device == 0 && is_device) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "%s: %s %p is device memory, but %s says host memory",
            fn, side, p, says);
    }
    if (!is_device) {
        *out = (char *)p;
        *device_out = -1;
        return ACL_SUCCESS;
    }
    size_t offset = (size_t)((const char *)p - base);
    if (count > size - offset) {
        return si_fail(ACL_ERROR_INVALID_PARAM,
            "%s: %s range %p + %zu runs past the end of its device allocation (%p, %zu bytes)", fn, side, p, count,
            (void *)base, size);
    }
    if (want_id >= 0 && want_id != device) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "%s: %s %p is memory of device %d, but the location says device %d",
            fn, side, p, device, want_id);
    }
    *out = rw + offset;
    *device_out = device;
    return ACL_SUCCESS;
}

/*
 * The device of the IPC-imported memory holding `p` when that is another
 * device than the caller's, else -1.
 */
static int si_foreign_import(const void *p, int caller_device)
{
    pthread_mutex_lock(&si_lock);
    struct si_region *r = si_find_locked(p);
    int device = (r != NULL && r->kind == SI_IMPORTED && r->device != caller_device) ? r->device : -1;
    pthread_mutex_unlock(&si_lock);
    return device;
}

/*
 * CANN documents (aclrtIpcMemGetExportKey, constraints) that a process using
 * memory another device's process shared with it can neither let ACL infer
 * the direction, nor copy between it and the host (sync or async), nor copy
 * it synchronously: only asynchronous device-to-device copies work.
 */
static aclError si_check_foreign_ipc(const char *fn, const void *dst, const void *src, aclrtMemcpyKind kind,
    int is_async)
{
    int dst_from = si_foreign_import(dst, t_device);
    int src_from = si_foreign_import(src, t_device);
    if (dst_from < 0 && src_from < 0) {
        return ACL_SUCCESS;
    }
    const char *side = dst_from >= 0 ? "dst" : "src";
    const void *p = dst_from >= 0 ? dst : src;
    int from = dst_from >= 0 ? dst_from : src_from;
    const char *why = NULL;
    if ((int)kind == SI_MEMCPY_DEFAULT) {
        why = "ACL cannot infer the direction (ACL_MEMCPY_DEFAULT) for it";
    } else if (kind != ACL_MEMCPY_DEVICE_TO_DEVICE && (int)kind != SI_MEMCPY_INNER_DEVICE_TO_DEVICE
        && (int)kind != SI_MEMCPY_INTER_DEVICE_TO_DEVICE) {
        why = "it cannot be copied to or from host memory, synchronously or not";
    } else if (!is_async) {
        why = "it can only be copied asynchronously (aclrtMemcpyAsync), device to device";
    }
    if (why == NULL) {
        return ACL_SUCCESS;
    }
    return si_fail(ACL_ERROR_RT_FEATURE_NOT_SUPPORT,
        "%s: %s %p is IPC memory of device %d imported on device %d: %s (CANN's aclrtIpcMemGetExportKey "
        "constraints)", fn, side, p, from, t_device, why);
}

/* One copy now; `sync_call`: as aclrtMemcpy (checked against the IPC rule). */
static aclError si_copy(const char *fn, void *dst, size_t destMax, const void *src, size_t count,
    aclrtMemcpyKind kind, int sync_call)
{
    int dst_device;
    int src_device;
    if (!si_kind_sides(kind, &dst_device, &src_device)) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "%s: kind %d is not an aclrtMemcpyKind", fn, (int)kind);
    }
    if (count > destMax) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "%s: count %zu is larger than destMax %zu", fn, count, destMax);
    }
    if (count == 0) {
        return ACL_SUCCESS;
    }
    if (dst == NULL || src == NULL) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "%s: dst and src must not be NULL", fn);
    }
    char *d;
    char *s;
    int d_dev;
    int s_dev;
    aclError err = si_resolve(fn, "dst", dst, count, dst_device, -1, si_kind_text(kind), &d, &d_dev);
    if (err == ACL_SUCCESS) {
        err = si_resolve(fn, "src", src, count, src_device, -1, si_kind_text(kind), &s, &s_dev);
    }
    if (err == ACL_SUCCESS && sync_call) {
        err = si_check_foreign_ipc(fn, dst, src, kind, 0);
    }
    if (err != ACL_SUCCESS) {
        return err;
    }
    memmove(d, s, count);
    return ACL_SUCCESS;
}

aclError aclrtMemcpy(void *dst, size_t destMax, const void *src, size_t count, aclrtMemcpyKind kind)
{
    SI_INJECT(aclrtMemcpy);
    SI_REQUIRE_DEVICE(aclrtMemcpy);
    return si_copy("aclrtMemcpy", dst, destMax, src, count, kind, 1);
}

#ifdef KVF_HAS_aclrtMemcpyBatch
aclError aclrtMemcpyBatch(void **dsts, size_t *destMaxs, void **srcs, size_t *sizes, size_t numBatches,
    aclrtMemcpyBatchAttr *attrs, size_t *attrsIndexes, size_t numAttrs, size_t *failIndex)
{
    const char *fn = "aclrtMemcpyBatch";
    if (failIndex != NULL) {
        *failIndex = SIZE_MAX;
    }
    unsigned long call;
    aclError injected = si_injected(FN_aclrtMemcpyBatch, &call);
    SI_REQUIRE_DEVICE(aclrtMemcpyBatch);
    if (dsts == NULL || destMaxs == NULL || srcs == NULL || sizes == NULL || attrs == NULL || attrsIndexes == NULL
        || failIndex == NULL) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "%s: no array argument may be NULL", fn);
    }
    if (numBatches == 0 || numAttrs == 0 || numAttrs > numBatches) {
        return si_fail(ACL_ERROR_INVALID_PARAM,
            "%s: need numBatches >= 1 and 1 <= numAttrs <= numBatches (got %zu and %zu)", fn, numBatches, numAttrs);
    }
    if (attrsIndexes[0] != 0) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "%s: attrsIndexes[0] must be 0", fn);
    }
    for (size_t j = 1; j < numAttrs; j++) {
        if (attrsIndexes[j] <= attrsIndexes[j - 1] || attrsIndexes[j] >= numBatches) {
            return si_fail(ACL_ERROR_INVALID_PARAM, "%s: attrsIndexes must rise strictly below numBatches (index %zu)",
                fn, j);
        }
    }
    /* Every entry is checked before any byte moves. */
    char **d = calloc(numBatches, sizeof *d);
    char **s = calloc(numBatches, sizeof *s);
    if (d == NULL || s == NULL) {
        free(d);
        free(s);
        return si_fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "%s: out of host memory", fn);
    }
    size_t a = 0;
    aclError err = ACL_SUCCESS;
    for (size_t i = 0; i < numBatches && err == ACL_SUCCESS; i++) {
        while (a + 1 < numAttrs && attrsIndexes[a + 1] <= i) {
            a++;
        }
        const aclrtMemcpyBatchAttr *at = &attrs[a];
        if (sizes[i] > destMaxs[i]) {
            err = si_fail(ACL_ERROR_INVALID_PARAM, "%s: entry %zu: size %zu is larger than destMax %zu", fn, i,
                sizes[i], destMaxs[i]);
        } else if (sizes[i] > 0 && (dsts[i] == NULL || srcs[i] == NULL)) {
            err = si_fail(ACL_ERROR_INVALID_PARAM, "%s: entry %zu: NULL address", fn, i);
        } else if (sizes[i] > 0) {
            int dd;
            int sd;
            int dst_dev = at->dstLoc.type == ACL_MEM_LOCATION_TYPE_DEVICE;
            int src_dev = at->srcLoc.type == ACL_MEM_LOCATION_TYPE_DEVICE;
            char side[32];
            snprintf(side, sizeof side, "entry %zu dst", i);
            err = si_resolve(fn, side, dsts[i], sizes[i], dst_dev, dst_dev ? (int)at->dstLoc.id : -1,
                "its aclrtMemcpyBatchAttr dstLoc", &d[i], &dd);
            if (err == ACL_SUCCESS) {
                snprintf(side, sizeof side, "entry %zu src", i);
                err = si_resolve(fn, side, srcs[i], sizes[i], src_dev, src_dev ? (int)at->srcLoc.id : -1,
                    "its aclrtMemcpyBatchAttr srcLoc", &s[i], &sd);
            }
            if (err == ACL_SUCCESS) {
                aclrtMemcpyKind kind = dst_dev ? (src_dev ? ACL_MEMCPY_DEVICE_TO_DEVICE : ACL_MEMCPY_HOST_TO_DEVICE)
                                               : (src_dev ? ACL_MEMCPY_DEVICE_TO_HOST : ACL_MEMCPY_HOST_TO_HOST);
                err = si_check_foreign_ipc(fn, dsts[i], srcs[i], kind, 0);
            }
        }
        if (err != ACL_SUCCESS) {
            *failIndex = i;
        }
    }
    if (err == ACL_SUCCESS && injected != 0) {
        size_t stop = numBatches / 2;
        for (size_t i = 0; i < stop; i++) {
            memmove(d[i], s[i], sizes[i]);
        }
        *failIndex = stop;
        err = si_fail(injected,
            "injected failure of aclrtMemcpyBatch call #%lu at entry %zu of %zu; entries before it were copied "
            "(KVF_STANDIN_FAIL=%s)", call, stop, numBatches, getenv("KVF_STANDIN_FAIL"));
    } else if (err == ACL_SUCCESS) {
        for (size_t i = 0; i < numBatches; i++) {
            if (sizes[i] > 0) {
                memmove(d[i], s[i], sizes[i]);
            }
        }
    }
    free(d);
    free(s);
    return err;
}
#endif /* KVF_HAS_aclrtMemcpyBatch */

/* ----------------------------------------------------------------- streams */

struct si_task {
    void *dst;
    const void *src;
    size_t destMax;
    size_t count;
    aclrtMemcpyKind kind;
    unsigned long call;   /* the submitting function's call number */
    aclError injected;    /* fails when it runs, if non-zero */
    const char *fn;       /* the submitting function */
};

struct si_stream {
    uint64_t magic;
    int device;
    uint32_t flags;
    struct si_task *tasks;
    size_t ntasks;
    size_t cap;
    struct si_stream *next;
};
#define SI_STREAM_MAGIC UINT64_C(0x4b56465354524d31)

static struct si_stream *si_streams; /* under si_lock */
static struct si_stream si_default_stream = {SI_STREAM_MAGIC, -1, 0, NULL, 0, 0, NULL};

/* The live stream behind `handle` (NULL: the default stream), under si_lock. */
static struct si_stream *si_stream_locked(aclrtStream handle)
{
    if (handle == NULL) {
        return &si_default_stream;
    }
    for (struct si_stream *s = si_streams; s != NULL; s = s->next) {
        if ((void *)s == handle) {
            return s;
        }
    }
    return NULL;
}

aclError aclrtCreateStreamWithConfig(aclrtStream *stream, uint32_t priority, uint32_t flag)
{
    SI_INJECT(aclrtCreateStreamWithConfig);
    if (stream == NULL) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtCreateStreamWithConfig: stream is NULL");
    }
    /* The flags the headers define (older ones define fewer). */
    uint32_t known = ACL_STREAM_FAST_LAUNCH | ACL_STREAM_FAST_SYNC;
#ifdef ACL_STREAM_PERSISTENT
    known |= ACL_STREAM_PERSISTENT;
#endif
#ifdef ACL_STREAM_HUGE
    known |= ACL_STREAM_HUGE;
#endif
#ifdef ACL_STREAM_CPU_SCHEDULE
    known |= ACL_STREAM_CPU_SCHEDULE;
#endif
#ifdef ACL_STREAM_DEVICE_USE_ONLY
    known |= ACL_STREAM_DEVICE_USE_ONLY;
#endif
    if ((flag & ~known) != 0) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtCreateStreamWithConfig: unknown flag bits 0x%x",
            flag & ~known);
    }
    (void)priority;
    SI_REQUIRE_DEVICE(aclrtCreateStreamWithConfig);
    struct si_stream *s = calloc(1, sizeof *s);
    if (s == NULL) {
        return si_fail(ACL_ERROR_RT_NO_STREAM_RESOURCE, "aclrtCreateStreamWithConfig: out of host memory");
    }
    s->magic = SI_STREAM_MAGIC;
    s->device = t_device;
    s->flags = flag;
    pthread_mutex_lock(&si_lock);
    s->next = si_streams;
    si_streams = s;
    pthread_mutex_unlock(&si_lock);
    *stream = s;
    return ACL_SUCCESS;
}

aclError aclrtDestroyStream(aclrtStream stream)
{
    SI_INJECT(aclrtDestroyStream);
    if (stream == NULL) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtDestroyStream: stream is NULL");
    }
    SI_REQUIRE_DEVICE(aclrtDestroyStream);
    pthread_mutex_lock(&si_lock);
    struct si_stream **link = &si_streams;
    while (*link != NULL && (void *)*link != stream) {
        link = &(*link)->next;
    }
    struct si_stream *s = *link;
    size_t pending = s != NULL ? s->ntasks : 0;
    if (s != NULL && pending == 0) {
        *link = s->next;
    }
    pthread_mutex_unlock(&si_lock);
    if (s == NULL) {
        return si_fail(ACL_ERROR_RT_INVALID_HANDLE, "aclrtDestroyStream: %p is not a live stream", stream);
    }
    if (pending != 0) {
        return si_fail(ACL_ERROR_RT_STREAM_NOT_COMPLETE,
            "aclrtDestroyStream: stream %p still has %zu queued tasks: synchronize or abort it first", stream,
            pending);
    }
    free(s->tasks);
    s->magic = 0;
    free(s);
    return ACL_SUCCESS;
}

aclError aclrtMemcpyAsync(void *dst, size_t destMax, const void *src, size_t count, aclrtMemcpyKind kind,
    aclrtStream stream)
{
    unsigned long call;
    aclError injected = si_injected(FN_aclrtMemcpyAsync, &call);
    SI_REQUIRE_DEVICE(aclrtMemcpyAsync);
    int dst_device;
    int src_device;
    if (!si_kind_sides(kind, &dst_device, &src_device)) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtMemcpyAsync: kind %d is not an aclrtMemcpyKind", (int)kind);
    }
    if (count > destMax) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtMemcpyAsync: count %zu is larger than destMax %zu", count,
            destMax);
    }
    if (count > 0) {
        /* Checked now, as ACL checks arguments at submission; run at synchronize. */
        char *d;
        char *s;
        int dd;
        int sd;
        if (dst == NULL || src == NULL) {
            return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtMemcpyAsync: dst and src must not be NULL");
        }
        aclError err = si_resolve("aclrtMemcpyAsync", "dst", dst, count, dst_device, -1, si_kind_text(kind), &d, &dd);
        if (err == ACL_SUCCESS) {
            err = si_resolve("aclrtMemcpyAsync", "src", src, count, src_device, -1, si_kind_text(kind), &s, &sd);
        }
        if (err == ACL_SUCCESS) {
            err = si_check_foreign_ipc("aclrtMemcpyAsync", dst, src, kind, 1);
        }
        if (err != ACL_SUCCESS) {
            return err;
        }
    }
    pthread_mutex_lock(&si_lock);
    struct si_stream *st = si_stream_locked(stream);
    aclError err = ACL_SUCCESS;
    if (st == NULL) {
        err = si_fail(ACL_ERROR_RT_INVALID_HANDLE, "aclrtMemcpyAsync: %p is not a live stream", stream);
    } else if (st->device >= 0 && st->device != t_device) {
        err = si_fail(ACL_ERROR_RT_STREAM_CONTEXT,
            "aclrtMemcpyAsync: stream %p belongs to device %d, but this thread's device is %d", stream, st->device,
            t_device);
    } else {
        if (st->ntasks == st->cap) {
            size_t cap = st->cap == 0 ? 16 : st->cap * 2;
            struct si_task *tasks = realloc(st->tasks, cap * sizeof *tasks);
            if (tasks == NULL) {
                err = si_fail(ACL_ERROR_RT_STREAM_TASK_FULL, "aclrtMemcpyAsync: out of host memory for the task");
            } else {
                st->tasks = tasks;
                st->cap = cap;
            }
        }
        if (err == ACL_SUCCESS) {
            st->tasks[st->ntasks++] = (struct si_task){dst, src, destMax, count, kind, call, injected, "aclrtMemcpyAsync"};
        }
    }
    pthread_mutex_unlock(&si_lock);
    return err;
}

#ifdef KVF_HAS_aclrtMemcpyBatchAsync
/*
 * Like aclrtMemcpyBatch, but queued on `stream` and run at synchronize. Every
 * entry is checked at submission (nothing is queued when one is wrong), with
 * the asynchronous form of CANN's rule for memory imported from another
 * device's process (device-to-device only). An injected failure marks the
 * middle entry's task: it fails at synchronize, after the entries before it.
 */
aclError aclrtMemcpyBatchAsync(void **dsts, size_t *destMaxs, void **srcs, size_t *sizes, size_t numBatches,
    aclrtMemcpyBatchAttr *attrs, size_t *attrsIndexes, size_t numAttrs, size_t *failIndex, aclrtStream stream)
{
    const char *fn = "aclrtMemcpyBatchAsync";
    if (failIndex != NULL) {
        *failIndex = SIZE_MAX;
    }
    unsigned long call;
    aclError injected = si_injected(FN_aclrtMemcpyBatchAsync, &call);
    SI_REQUIRE_DEVICE(aclrtMemcpyBatchAsync);
    if (dsts == NULL || destMaxs == NULL || srcs == NULL || sizes == NULL || attrs == NULL || attrsIndexes == NULL
        || failIndex == NULL) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "%s: no array argument may be NULL", fn);
    }
    if (numBatches == 0 || numAttrs == 0 || numAttrs > numBatches) {
        return si_fail(ACL_ERROR_INVALID_PARAM,
            "%s: need numBatches >= 1 and 1 <= numAttrs <= numBatches (got %zu and %zu)", fn, numBatches, numAttrs);
    }
    if (attrsIndexes[0] != 0) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "%s: attrsIndexes[0] must be 0", fn);
    }
    for (size_t j = 1; j < numAttrs; j++) {
        if (attrsIndexes[j] <= attrsIndexes[j - 1] || attrsIndexes[j] >= numBatches) {
            return si_fail(ACL_ERROR_INVALID_PARAM, "%s: attrsIndexes must rise strictly below numBatches (index %zu)",
                fn, j);
        }
    }
    aclrtMemcpyKind *kinds = calloc(numBatches, sizeof *kinds);
    if (kinds == NULL) {
        return si_fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "%s: out of host memory", fn);
    }
    size_t a = 0;
    aclError err = ACL_SUCCESS;
    for (size_t i = 0; i < numBatches && err == ACL_SUCCESS; i++) {
        while (a + 1 < numAttrs && attrsIndexes[a + 1] <= i) {
            a++;
        }
        const aclrtMemcpyBatchAttr *at = &attrs[a];
        int dst_dev = at->dstLoc.type == ACL_MEM_LOCATION_TYPE_DEVICE;
        int src_dev = at->srcLoc.type == ACL_MEM_LOCATION_TYPE_DEVICE;
        kinds[i] = dst_dev ? (src_dev ? ACL_MEMCPY_DEVICE_TO_DEVICE : ACL_MEMCPY_HOST_TO_DEVICE)
                           : (src_dev ? ACL_MEMCPY_DEVICE_TO_HOST : ACL_MEMCPY_HOST_TO_HOST);
        if (sizes[i] > destMaxs[i]) {
            err = si_fail(ACL_ERROR_INVALID_PARAM, "%s: entry %zu: size %zu is larger than destMax %zu", fn, i,
                sizes[i], destMaxs[i]);
        } else if (sizes[i] > 0 && (dsts[i] == NULL || srcs[i] == NULL)) {
            err = si_fail(ACL_ERROR_INVALID_PARAM, "%s: entry %zu: NULL address", fn, i);
        } else if (sizes[i] > 0) {
            char *d;
            char *s;
            int dd;
            int sd;
            char side[32];
            snprintf(side, sizeof side, "entry %zu dst", i);
            err = si_resolve(fn, side, dsts[i], sizes[i], dst_dev, dst_dev ? (int)at->dstLoc.id : -1,
                "its aclrtMemcpyBatchAttr dstLoc", &d, &dd);
            if (err == ACL_SUCCESS) {
                snprintf(side, sizeof side, "entry %zu src", i);
                err = si_resolve(fn, side, srcs[i], sizes[i], src_dev, src_dev ? (int)at->srcLoc.id : -1,
                    "its aclrtMemcpyBatchAttr srcLoc", &s, &sd);
            }
            if (err == ACL_SUCCESS) {
                err = si_check_foreign_ipc(fn, dsts[i], srcs[i], kinds[i], 1);
            }
        }
        if (err != ACL_SUCCESS) {
            *failIndex = i;
        }
    }
    if (err != ACL_SUCCESS) {
        free(kinds);
        return err;
    }
    pthread_mutex_lock(&si_lock);
    struct si_stream *st = si_stream_locked(stream);
    if (st == NULL) {
        err = si_fail(ACL_ERROR_RT_INVALID_HANDLE, "%s: %p is not a live stream", fn, stream);
    } else if (st->device >= 0 && st->device != t_device) {
        err = si_fail(ACL_ERROR_RT_STREAM_CONTEXT, "%s: stream %p belongs to device %d, but this thread's device is %d",
            fn, stream, st->device, t_device);
    } else if (st->ntasks + numBatches > st->cap) {
        size_t cap = st->cap == 0 ? 16 : st->cap;
        while (cap < st->ntasks + numBatches) {
            cap *= 2;
        }
        struct si_task *tasks = realloc(st->tasks, cap * sizeof *tasks);
        if (tasks == NULL) {
            err = si_fail(ACL_ERROR_RT_STREAM_TASK_FULL, "%s: out of host memory for %zu tasks", fn, numBatches);
        } else {
            st->tasks = tasks;
            st->cap = cap;
        }
    }
    if (err == ACL_SUCCESS) {
        for (size_t i = 0; i < numBatches; i++) {
            if (sizes[i] == 0) {
                continue;
            }
            aclError fails = (injected != 0 && i == numBatches / 2) ? injected : 0;
            st->tasks[st->ntasks++] = (struct si_task){dsts[i], srcs[i], destMaxs[i], sizes[i], kinds[i], call, fails,
                "aclrtMemcpyBatchAsync"};
        }
    }
    pthread_mutex_unlock(&si_lock);
    free(kinds);
    return err;
}
#endif /* KVF_HAS_aclrtMemcpyBatchAsync */

#ifdef KVF_HAS_aclrtDeviceGetBareTgid
/* The stand-in's processes are not in containers: the device sees getpid(). */
aclError aclrtDeviceGetBareTgid(int32_t *pid)
{
    SI_INJECT(aclrtDeviceGetBareTgid);
    if (pid == NULL) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtDeviceGetBareTgid: pid is NULL");
    }
    SI_REQUIRE_DEVICE(aclrtDeviceGetBareTgid);
    *pid = (int32_t)getpid();
    return ACL_SUCCESS;
}
#endif /* KVF_HAS_aclrtDeviceGetBareTgid */

static int si_env_flag(const char *name)
{
    const char *value = getenv(name);
    return value != NULL && value[0] != '\0' && strcmp(value, "0") != 0;
}

aclError aclrtSynchronizeStreamWithTimeout(aclrtStream stream, int32_t timeout)
{
    SI_INJECT(aclrtSynchronizeStreamWithTimeout);
    SI_REQUIRE_DEVICE(aclrtSynchronizeStreamWithTimeout);
    if (timeout < -1) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtSynchronizeStreamWithTimeout: timeout %d ms is below -1",
            (int)timeout);
    }
    pthread_mutex_lock(&si_lock);
    struct si_stream *st = si_stream_locked(stream);
    if (st == NULL) {
        pthread_mutex_unlock(&si_lock);
        return si_fail(ACL_ERROR_RT_INVALID_HANDLE, "aclrtSynchronizeStreamWithTimeout: %p is not a live stream",
            stream);
    }
    size_t pending = st->ntasks;
    if (pending > 0 && si_env_flag("KVF_STANDIN_TIMEOUT")) {
        pthread_mutex_unlock(&si_lock);
        if (timeout > 0) {
            long ms = timeout > SI_MAX_SLEEP_MS ? SI_MAX_SLEEP_MS : timeout;
            struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
            nanosleep(&ts, NULL);
        }
        return si_fail(ACL_ERROR_RT_STREAM_SYNC_TIMEOUT,
            "aclrtSynchronizeStreamWithTimeout: stream %p did not finish its %zu queued tasks within %d ms%s "
            "(KVF_STANDIN_TIMEOUT); they stay queued: abort the stream with aclrtStreamAbort",
            stream, pending, (int)timeout, timeout == -1 ? " (-1: a real device would block forever)" : "");
    }
    /* Take the queue, run it outside the lock. */
    struct si_task *tasks = st->tasks;
    st->tasks = NULL;
    st->ntasks = 0;
    st->cap = 0;
    pthread_mutex_unlock(&si_lock);
    aclError err = ACL_SUCCESS;
    for (size_t i = 0; i < pending && err == ACL_SUCCESS; i++) {
        struct si_task *t = &tasks[i];
        if (t->injected != 0) {
            err = si_fail(t->injected,
                "aclrtSynchronizeStreamWithTimeout: task %zu of %zu (%s call #%lu) failed on the "
                "device: injected (KVF_STANDIN_FAIL=%s); the %zu later task(s) were discarded",
                i + 1, pending, t->fn, t->call, getenv("KVF_STANDIN_FAIL"), pending - i - 1);
        } else {
            err = si_copy("aclrtSynchronizeStreamWithTimeout (running a queued aclrtMemcpyAsync)", t->dst,
                t->destMax, t->src, t->count, t->kind, 0);
        }
    }
    free(tasks);
    return err;
}

#ifdef KVF_HAS_aclrtStreamAbort
aclError aclrtStreamAbort(aclrtStream stream)
{
    SI_INJECT(aclrtStreamAbort);
    SI_REQUIRE_DEVICE(aclrtStreamAbort);
    pthread_mutex_lock(&si_lock);
    struct si_stream *st = si_stream_locked(stream);
    if (st != NULL) {
        free(st->tasks);
        st->tasks = NULL;
        st->ntasks = 0;
        st->cap = 0;
    }
    pthread_mutex_unlock(&si_lock);
    if (st == NULL) {
        return si_fail(ACL_ERROR_RT_INVALID_HANDLE, "aclrtStreamAbort: %p is not a live stream", stream);
    }
    return ACL_SUCCESS;
}
#endif /* KVF_HAS_aclrtStreamAbort */

/* --------------------------------------------------------------------- IPC */

/* The four IPC-by-key functions arrived together in CANN. */
#if defined(KVF_HAS_aclrtIpcMemGetExportKey) && defined(KVF_HAS_aclrtIpcMemSetImportPid) \
    && defined(KVF_HAS_aclrtIpcMemImportByKey) && defined(KVF_HAS_aclrtIpcMemClose)

/* Parses "kvfsi:<shm name>:<offset>:<size>". */
static int si_parse_key(const char *key, char *name, size_t name_len, size_t *offset, size_t *size)
{
    if (strnlen(key, SI_KEY_LEN) >= SI_KEY_LEN) {
        return 0;
    }
    if (strncmp(key, SI_KEY_PREFIX, strlen(SI_KEY_PREFIX)) != 0) {
        return 0;
    }
    const char *p = key + strlen(SI_KEY_PREFIX);
    const char *colon = strchr(p, ':');
    if (colon == NULL || colon == p || (size_t)(colon - p) >= name_len) {
        return 0;
    }
    memcpy(name, p, (size_t)(colon - p));
    name[colon - p] = '\0';
    char *end;
    errno = 0;
    unsigned long long off = strtoull(colon + 1, &end, 10);
    if (*end != ':' || errno != 0) {
        return 0;
    }
    unsigned long long len = strtoull(end + 1, &end, 10);
    if (*end != '\0' || errno != 0 || len == 0) {
        return 0;
    }
    *offset = (size_t)off;
    *size = (size_t)len;
    return 1;
}

/* The shm header of this process's own allocation named `name`, under si_lock. */
static struct si_shm_header *si_own_header_locked(const char *name)
{
    for (struct si_region *r = si_regions; r != NULL; r = r->next) {
        if (r->kind == SI_DEVICE && strcmp(r->shm_name, name) == 0) {
            return (struct si_shm_header *)r->shm_map;
        }
    }
    return NULL;
}

aclError aclrtIpcMemGetExportKey(void *devPtr, size_t size, char *key, size_t len, uint64_t flags)
{
    SI_INJECT(aclrtIpcMemGetExportKey);
    if (devPtr == NULL || key == NULL || size == 0) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemGetExportKey: devPtr and key must not be NULL, size not 0");
    }
    if ((flags & ~(uint64_t)ACL_RT_IPC_MEM_EXPORT_FLAG_DISABLE_PID_VALIDATION) != 0) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemGetExportKey: unknown flags 0x%" PRIx64, flags);
    }
    SI_REQUIRE_DEVICE(aclrtIpcMemGetExportKey);
    pthread_mutex_lock(&si_lock);
    struct si_region *r = si_find_locked(devPtr);
    if (r == NULL || r->kind != SI_DEVICE) {
        enum si_kind kind = r != NULL ? r->kind : SI_DEVICE;
        pthread_mutex_unlock(&si_lock);
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemGetExportKey: %p is %s", devPtr,
            r != NULL ? si_kind_name(kind) : "not device memory from aclrtMalloc");
    }
    size_t offset = (size_t)((char *)devPtr - r->base);
    if (size > r->size - offset) {
        size_t have = r->size - offset;
        pthread_mutex_unlock(&si_lock);
        return si_fail(ACL_ERROR_INVALID_PARAM,
            "aclrtIpcMemGetExportKey: %zu bytes from %p run past its allocation (%zu bytes left)", size, devPtr,
            have);
    }
    if (len != SI_KEY_LEN) {
        pthread_mutex_unlock(&si_lock);
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemGetExportKey: len is %zu; CANN documents it as fixed at "
            "%d", len, SI_KEY_LEN);
    }
    char text[SI_KEY_LEN];
    int need = snprintf(text, sizeof text, SI_KEY_PREFIX "%s:%zu:%zu", r->shm_name, offset, size);
    if (need < 0 || (size_t)need + 1 > sizeof text) {
        pthread_mutex_unlock(&si_lock);
        return si_fail(ACL_ERROR_RT_INTERNAL_ERROR, "aclrtIpcMemGetExportKey: stand-in key too long");
    }
    struct si_shm_header *h = (struct si_shm_header *)r->shm_map;
    __atomic_store_n(&h->check_pid,
        (flags & ACL_RT_IPC_MEM_EXPORT_FLAG_DISABLE_PID_VALIDATION) ? 0U : 1U, __ATOMIC_RELEASE);
    __atomic_store_n(&h->exported, 1U, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&si_lock);
    memcpy(key, text, (size_t)need + 1);
    return ACL_SUCCESS;
}

aclError aclrtIpcMemSetImportPid(const char *key, int32_t *pid, size_t num)
{
    SI_INJECT(aclrtIpcMemSetImportPid);
    if (key == NULL || pid == NULL || num == 0) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemSetImportPid: key and pid must not be NULL, num not 0");
    }
    SI_REQUIRE_DEVICE(aclrtIpcMemSetImportPid);
    char name[64];
    size_t offset;
    size_t size;
    if (!si_parse_key(key, name, sizeof name, &offset, &size)) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemSetImportPid: \"%s\" is not an IPC key", key);
    }
    pthread_mutex_lock(&si_lock);
    struct si_shm_header *h = si_own_header_locked(name);
    aclError err = ACL_SUCCESS;
    if (h == NULL || !__atomic_load_n(&h->exported, __ATOMIC_ACQUIRE)) {
        err = si_fail(ACL_ERROR_RT_IPC_ERROR,
            "aclrtIpcMemSetImportPid: key \"%s\" is not an open export of this process", key);
    } else {
        uint32_t n = h->npids;
        if (n + num > SI_MAX_PIDS) {
            err = si_fail(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemSetImportPid: at most %d pids per allocation",
                SI_MAX_PIDS);
        } else {
            for (size_t i = 0; i < num; i++) {
                h->pids[n + i] = pid[i];
            }
            __atomic_store_n(&h->npids, n + (uint32_t)num, __ATOMIC_RELEASE);
        }
    }
    pthread_mutex_unlock(&si_lock);
    return err;
}

aclError aclrtIpcMemImportByKey(void **devPtr, const char *key, uint64_t flags)
{
    SI_INJECT(aclrtIpcMemImportByKey);
    if (devPtr == NULL || key == NULL) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemImportByKey: devPtr and key must not be NULL");
    }
    if ((flags & ~(uint64_t)ACL_RT_IPC_MEM_IMPORT_FLAG_ENABLE_PEER_ACCESS) != 0) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemImportByKey: unknown flags 0x%" PRIx64, flags);
    }
    SI_REQUIRE_DEVICE(aclrtIpcMemImportByKey);
    char name[64];
    size_t offset;
    size_t size;
    if (!si_parse_key(key, name, sizeof name, &offset, &size)) {
        return si_fail(ACL_ERROR_RT_IPC_ERROR, "aclrtIpcMemImportByKey: unknown IPC key \"%s\" (not a key "
            "aclrtIpcMemGetExportKey made)", key);
    }
    pthread_mutex_lock(&si_lock);
    for (struct si_region *r = si_regions; r != NULL; r = r->next) {
        if (r->kind == SI_IMPORTED && strcmp(r->key, key) == 0) {
            pthread_mutex_unlock(&si_lock);
            return si_fail(ACL_ERROR_RT_IPC_ERROR, "aclrtIpcMemImportByKey: key \"%s\" is already imported in "
                "this process: import once and reuse the mapping", key);
        }
    }
    pthread_mutex_unlock(&si_lock);
    int fd = shm_open(name, O_RDWR, 0);
    if (fd < 0) {
        return si_fail(ACL_ERROR_RT_IPC_ERROR, "aclrtIpcMemImportByKey: unknown IPC key \"%s\": its memory does not "
            "exist (freed, or its process exited)", key);
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || (size_t)st.st_size < SI_PAGE) {
        close(fd);
        return si_fail(ACL_ERROR_RT_IPC_ERROR, "aclrtIpcMemImportByKey: key \"%s\" names no stand-in allocation",
            key);
    }
    size_t map_len = (size_t)st.st_size;
    char *map = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED) {
        return si_fail(ACL_ERROR_RT_IPC_ERROR, "aclrtIpcMemImportByKey: cannot map \"%s\": %s", key,
            strerror(errno));
    }
    struct si_shm_header *h = (struct si_shm_header *)map;
    aclError err = ACL_SUCCESS;
    int32_t me = (int32_t)getpid();
    if (__atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) != SI_SHM_MAGIC) {
        err = si_fail(ACL_ERROR_RT_IPC_ERROR, "aclrtIpcMemImportByKey: key \"%s\" names no stand-in allocation", key);
    } else if (!__atomic_load_n(&h->exported, __ATOMIC_ACQUIRE)) {
        err = si_fail(ACL_ERROR_RT_IPC_ERROR, "aclrtIpcMemImportByKey: key \"%s\" is not exported (never, or its "
            "export was closed)", key);
    } else if (offset > h->size || size > h->size - offset) {
        err = si_fail(ACL_ERROR_RT_IPC_ERROR, "aclrtIpcMemImportByKey: key \"%s\" does not fit its allocation", key);
    } else if (__atomic_load_n(&h->check_pid, __ATOMIC_ACQUIRE)) {
        uint32_t n = __atomic_load_n(&h->npids, __ATOMIC_ACQUIRE);
        int allowed = 0;
        for (uint32_t i = 0; i < n && i < SI_MAX_PIDS; i++) {
            allowed |= h->pids[i] == me;
        }
        if (!allowed) {
            err = si_fail(ACL_ERROR_RT_NO_PERMISSION, "aclrtIpcMemImportByKey: process %d may not import key \"%s\": "
                "the exporting process (pid %d) has not allowed it with aclrtIpcMemSetImportPid (%u pids allowed)",
                (int)me, key, (int)h->owner_pid, n);
        }
    }
    struct si_region *r = NULL;
    if (err == ACL_SUCCESS) {
        r = calloc(1, sizeof *r);
        if (r == NULL) {
            err = si_fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "aclrtIpcMemImportByKey: out of host memory");
        }
    }
    if (err == ACL_SUCCESS) {
        r->base = si_reserve(size, SI_PAGE, &r->reserve, &r->reserve_len);
        if (r->base == NULL) {
            free(r);
            err = si_fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "aclrtIpcMemImportByKey: cannot reserve %zu bytes", size);
        }
    }
    if (err != ACL_SUCCESS) {
        munmap(map, map_len);
        return err;
    }
    r->kind = SI_IMPORTED;
    r->rw = map + SI_PAGE + offset;
    r->size = size;
    r->device = h->device;
    r->page_size = SI_PAGE;
    r->shm_map = map;
    r->shm_map_len = map_len;
    snprintf(r->key, sizeof r->key, "%s", key);
    pthread_mutex_lock(&si_lock);
    r->next = si_regions;
    si_regions = r;
    pthread_mutex_unlock(&si_lock);
    *devPtr = r->base;
    return ACL_SUCCESS;
}

aclError aclrtIpcMemClose(const char *key)
{
    SI_INJECT(aclrtIpcMemClose);
    if (key == NULL) {
        return si_fail(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemClose: key is NULL");
    }
    SI_REQUIRE_DEVICE(aclrtIpcMemClose);
    char name[64];
    size_t offset;
    size_t size;
    if (!si_parse_key(key, name, sizeof name, &offset, &size)) {
        return si_fail(ACL_ERROR_RT_IPC_ERROR, "aclrtIpcMemClose: unknown IPC key \"%s\"", key);
    }
    pthread_mutex_lock(&si_lock);
    struct si_region *imported = NULL;
    for (struct si_region **link = &si_regions; *link != NULL; link = &(*link)->next) {
        if ((*link)->kind == SI_IMPORTED && strcmp((*link)->key, key) == 0) {
            imported = *link;
            *link = imported->next;
            break;
        }
    }
    struct si_shm_header *own = imported == NULL ? si_own_header_locked(name) : NULL;
    if (own != NULL) {
        /* The exporter closes: no new imports (existing ones keep their mapping). */
        __atomic_store_n(&own->exported, 0U, __ATOMIC_RELEASE);
        __atomic_store_n(&own->npids, 0U, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&si_lock);
    if (imported != NULL) {
        si_unmap(imported);
        free(imported);
        return ACL_SUCCESS;
    }
    if (own != NULL) {
        return ACL_SUCCESS;
    }
    return si_fail(ACL_ERROR_RT_IPC_ERROR, "aclrtIpcMemClose: key \"%s\" is neither imported nor exported by this "
        "process", key);
}
#endif /* IPC */
