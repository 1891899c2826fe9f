//! TEST SUPPORT ONLY: the kvferry CANN stand-in.
//!
//! `libkvferry_cann_standin.so` is a fake `libascendcl.so` written in C
//! (`tests/cann-standin/standin.c`): it exports the ACL subset kvferry calls,
//! compiled against the real CANN headers so that its signatures are CANN's,
//! keeps "device" memory in POSIX shared memory so that IPC import works across
//! processes, and injects failures on request. Tests point
//! [`kvferry_ascend_sys::LIBRARY_ENV`] (`KVFERRY_ACL_LIBRARY`) at
//! [`STANDIN_LIBRARY`] in the environment of a process they spawn.
//!
//! It proves kvferry's FFI path, error paths and cross-process protocol; it
//! proves nothing about NPU behaviour or performance.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

/// Path of the built stand-in library.
pub const STANDIN_LIBRARY: &str = concat!(env!("OUT_DIR"), "/libkvferry_cann_standin.so");

/// The same stand-in without the functions newer CANN releases added
/// (`aclrtPointerGetAttributes`, `aclrtHostRegister`, `aclrtHostUnregister`,
/// `aclrtStreamAbort`, `aclrtMemcpyBatch`, `aclrtIpcMem*`): an older
/// `libascendcl.so`, for tests of the "not exported at run time" path.
pub const OLDER_STANDIN_LIBRARY: &str =
    concat!(env!("OUT_DIR"), "/libkvferry_cann_standin_older.so");

/// `<function>:<n>[=<code>][,...]`: the n-th call (or `*`: every call) of the
/// ACL function (or alias, e.g. `memcpy`) fails with `code` (default: one that
/// fits the function). Read at call time.
pub const FAIL_ENV: &str = "KVF_STANDIN_FAIL";

/// Non-empty and not `0`: synchronising a stream with queued work waits out
/// the timeout and fails with `ACL_ERROR_RT_STREAM_SYNC_TIMEOUT`.
pub const TIMEOUT_ENV: &str = "KVF_STANDIN_TIMEOUT";

/// The number of stand-in devices (default 8).
pub const DEVICES_ENV: &str = "KVF_STANDIN_DEVICES";

/// `report`: `aclrtPointerGetAttributes` reports unmanaged host memory as
/// `ACL_MEM_LOCATION_TYPE_UNREGISTERED` instead of failing.
pub const UNREGISTERED_ENV: &str = "KVF_STANDIN_UNREGISTERED";
