// The ACL functions kvferry binds: the subset of ../shared/docs/ASCEND.md,
// in the order of that list, plus two it needs beyond it. One list for the
// build script (bindgen's allowlist, the declared/missing check) and the
// library (`kvferry_ascend_sys::FUNCTIONS`): both `include!` this file.

/// The ACL functions this crate binds, whether or not the headers used at
/// build time declared them all.
pub const FUNCTIONS: &[&str] = &[
    "aclInit",
    "aclFinalize",
    "aclGetRecentErrMsg",
    "aclrtSetDevice",
    "aclrtGetDevice",
    "aclrtGetDeviceCount",
    "aclrtGetCurrentContext",
    "aclrtSetCurrentContext",
    "aclrtCreateStreamWithConfig",
    "aclrtDestroyStream",
    "aclrtSynchronizeStreamWithTimeout",
    "aclrtStreamAbort",
    "aclrtMemcpy",
    "aclrtMemcpyAsync",
    "aclrtMemcpyBatch",
    // Beyond docs/ASCEND.md's list: CANN documents that memory imported
    // from another device's process takes asynchronous device-to-device
    // copies only, and aclrtMemcpyBatch is synchronous.
    "aclrtMemcpyBatchAsync",
    "aclrtPointerGetAttributes",
    "aclrtMalloc",
    "aclrtFree",
    "aclrtMallocHost",
    "aclrtFreeHost",
    "aclrtHostRegister",
    "aclrtHostUnregister",
    "aclrtIpcMemGetExportKey",
    "aclrtIpcMemSetImportPid",
    "aclrtIpcMemImportByKey",
    "aclrtIpcMemClose",
    // Beyond docs/ASCEND.md's list: CANN's aclrtIpcMemSetImportPid wants the
    // importer's pid as this function gives it (the host-side tgid, which
    // differs from getpid() inside containers and VMs).
    "aclrtDeviceGetBareTgid",
];
