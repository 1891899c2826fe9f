//! ACL functions that older CANN headers do not declare (stream abort,
//! pointer attributes, batch copies, IPC by key, the bare tgid): one wrapper
//! each, which is the ACL call when the headers kvferry-ascend-sys was built
//! with declare it, and an `Unavailable` error otherwise. The rest of the
//! crate calls these and never needs a `cfg`.

use std::ffi::{CStr, CString, c_void};

use kvferry_ascend_sys::{Acl, AclError, ffi};

/// The error of a function the build's headers did not declare.
#[allow(dead_code, reason = "used only by the fallbacks of older headers")]
fn undeclared(acl: &Acl, function: &'static str) -> AclError {
    AclError::Unavailable {
        function,
        library: acl.library().to_path_buf(),
        reason: "the CANN headers kvferry was built with do not declare it".to_owned(),
    }
}

/// Whether the four IPC-by-key functions can be called.
pub(crate) fn has_ipc(acl: &Acl) -> bool {
    [
        "aclrtIpcMemGetExportKey",
        "aclrtIpcMemSetImportPid",
        "aclrtIpcMemImportByKey",
        "aclrtIpcMemClose",
    ]
    .iter()
    .all(|f| acl.is_available(f))
}

/// `aclrtCreateStreamWithConfig` with `ACL_STREAM_FAST_LAUNCH |
/// ACL_STREAM_FAST_SYNC`, on the calling thread's device.
pub(crate) fn create_stream(acl: &Acl) -> Result<ffi::aclrtStream, AclError> {
    #[cfg(kvferry_acl_has = "aclrtCreateStreamWithConfig")]
    {
        let mut stream: ffi::aclrtStream = std::ptr::null_mut();
        let flags = ffi::ACL_STREAM_FAST_LAUNCH | ffi::ACL_STREAM_FAST_SYNC;
        // SAFETY: `stream` is a valid place for the new handle; priority 0
        // and these flags are documented values.
        unsafe { acl.aclrtCreateStreamWithConfig(&mut stream, 0, flags) }?;
        Ok(stream)
    }
    #[cfg(not(kvferry_acl_has = "aclrtCreateStreamWithConfig"))]
    Err(undeclared(acl, "aclrtCreateStreamWithConfig"))
}

/// `aclrtSynchronizeStreamWithTimeout`.
///
/// # Safety
/// `stream` is a live stream of the calling thread's device.
pub(crate) unsafe fn sync_stream(
    acl: &Acl,
    stream: ffi::aclrtStream,
    timeout_ms: i32,
) -> Result<(), AclError> {
    #[cfg(kvferry_acl_has = "aclrtSynchronizeStreamWithTimeout")]
    {
        // SAFETY: forwarded to the caller.
        unsafe { acl.aclrtSynchronizeStreamWithTimeout(stream, timeout_ms) }
    }
    #[cfg(not(kvferry_acl_has = "aclrtSynchronizeStreamWithTimeout"))]
    {
        let _ = (stream, timeout_ms);
        Err(undeclared(acl, "aclrtSynchronizeStreamWithTimeout"))
    }
}

/// `aclrtStreamAbort`: discards the stream's queued tasks.
///
/// # Safety
/// `stream` is a live stream of the calling thread's device.
pub(crate) unsafe fn abort_stream(acl: &Acl, stream: ffi::aclrtStream) -> Result<(), AclError> {
    #[cfg(kvferry_acl_has = "aclrtStreamAbort")]
    {
        // SAFETY: forwarded to the caller.
        unsafe { acl.aclrtStreamAbort(stream) }
    }
    #[cfg(not(kvferry_acl_has = "aclrtStreamAbort"))]
    {
        let _ = stream;
        Err(undeclared(acl, "aclrtStreamAbort"))
    }
}

/// Where a pointer lives, as `aclrtPointerGetAttributes` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PtrLocation {
    Device(u32),
    /// Host memory ACL manages (pinned or registered).
    Host,
    /// Host memory ACL does not manage (some releases answer this instead
    /// of failing).
    Unregistered,
    Other(u32),
}

/// `aclrtPointerGetAttributes` for `addr`.
pub(crate) fn pointer_location(acl: &Acl, addr: u64) -> Result<PtrLocation, AclError> {
    #[cfg(kvferry_acl_has = "aclrtPointerGetAttributes")]
    {
        let mut attributes = ffi::aclrtPtrAttributes::default();
        // SAFETY: the function only inspects the address (it never
        // dereferences it) and writes `attributes`, a valid place.
        unsafe { acl.aclrtPointerGetAttributes(addr as *const c_void, &mut attributes) }?;
        Ok(match attributes.location.type_ {
            ffi::ACL_MEM_LOCATION_TYPE_DEVICE => PtrLocation::Device(attributes.location.id),
            ffi::ACL_MEM_LOCATION_TYPE_HOST => PtrLocation::Host,
            ffi::ACL_MEM_LOCATION_TYPE_UNREGISTERED => PtrLocation::Unregistered,
            other => PtrLocation::Other(other),
        })
    }
    #[cfg(not(kvferry_acl_has = "aclrtPointerGetAttributes"))]
    {
        let _ = addr;
        Err(undeclared(acl, "aclrtPointerGetAttributes"))
    }
}

/// Device-to-device copies queued on `stream` with one
/// `aclrtMemcpyBatchAsync`: entry `i` copies `sizes[i]` bytes from `srcs[i]`
/// (on `src_device`) to `dsts[i]` (on `dst_device`). On failure, also the
/// index of the entry ACL blamed (`usize::MAX`: none).
///
/// # Safety
/// Every range is device memory valid for its size until the stream is
/// synchronised or aborted; `stream` is a live stream of the calling
/// thread's device; the four slices have one length.
pub(crate) unsafe fn memcpy_batch_async(
    acl: &Acl,
    dsts: &mut [*mut c_void],
    srcs: &mut [*mut c_void],
    sizes: &mut [usize],
    dst_device: u32,
    src_device: u32,
    stream: ffi::aclrtStream,
) -> Result<(), (AclError, usize)> {
    #[cfg(kvferry_acl_has = "aclrtMemcpyBatchAsync")]
    {
        let mut dest_maxs: Vec<usize> = sizes.to_vec();
        let location = |id| ffi::aclrtMemLocation {
            id,
            type_: ffi::ACL_MEM_LOCATION_TYPE_DEVICE,
        };
        let mut attrs = [ffi::aclrtMemcpyBatchAttr {
            dstLoc: location(dst_device),
            srcLoc: location(src_device),
            rsv: [0; 16],
        }];
        let mut attr_indexes = [0usize];
        let mut fail_index = usize::MAX;
        // SAFETY: the arrays have `sizes.len()` entries (caller's promise
        // for `dsts` / `srcs`), one attribute applies from entry 0, and the
        // ranges are valid device memory (caller's promise).
        let r = unsafe {
            acl.aclrtMemcpyBatchAsync(
                dsts.as_mut_ptr(),
                dest_maxs.as_mut_ptr(),
                srcs.as_mut_ptr(),
                sizes.as_mut_ptr(),
                sizes.len(),
                attrs.as_mut_ptr(),
                attr_indexes.as_mut_ptr(),
                1,
                &mut fail_index,
                stream,
            )
        };
        r.map_err(|e| (e, fail_index))
    }
    #[cfg(not(kvferry_acl_has = "aclrtMemcpyBatchAsync"))]
    {
        let _ = (dsts, srcs, sizes, dst_device, src_device, stream);
        Err((undeclared(acl, "aclrtMemcpyBatchAsync"), usize::MAX))
    }
}

/// CANN fixes the IPC key buffer at 65 bytes.
pub(crate) const IPC_KEY_LEN: usize = 65;

/// `aclrtIpcMemGetExportKey` for `[addr, addr + len)`, with pid validation
/// (importers must be allowed with [`ipc_allow`]).
pub(crate) fn ipc_export(acl: &Acl, addr: u64, len: u64) -> Result<CString, AclError> {
    #[cfg(kvferry_acl_has = "aclrtIpcMemGetExportKey")]
    {
        let mut key = [0 as std::ffi::c_char; IPC_KEY_LEN];
        // SAFETY: `addr..addr+len` is registered device memory (checked by
        // the caller with aclrtPointerGetAttributes); `key` has the 65 bytes
        // CANN documents.
        unsafe {
            acl.aclrtIpcMemGetExportKey(
                addr as *mut c_void,
                len as usize,
                key.as_mut_ptr(),
                IPC_KEY_LEN,
                u64::from(ffi::ACL_RT_IPC_MEM_EXPORT_FLAG_DEFAULT),
            )
        }?;
        // ACL wrote a NUL-terminated key; in case it filled all 65 bytes:
        key[IPC_KEY_LEN - 1] = 0;
        // SAFETY: `key` is NUL-terminated (above) and lives for the call.
        Ok(unsafe { CStr::from_ptr(key.as_ptr()) }.to_owned())
    }
    #[cfg(not(kvferry_acl_has = "aclrtIpcMemGetExportKey"))]
    {
        let _ = (addr, len);
        Err(undeclared(acl, "aclrtIpcMemGetExportKey"))
    }
}

/// `aclrtIpcMemSetImportPid`: lets process `pid` import `key`.
pub(crate) fn ipc_allow(acl: &Acl, key: &CStr, pid: i32) -> Result<(), AclError> {
    #[cfg(kvferry_acl_has = "aclrtIpcMemSetImportPid")]
    {
        let mut pids = [pid];
        // SAFETY: `key` is NUL-terminated; `pids` holds one pid.
        unsafe { acl.aclrtIpcMemSetImportPid(key.as_ptr(), pids.as_mut_ptr(), 1) }
    }
    #[cfg(not(kvferry_acl_has = "aclrtIpcMemSetImportPid"))]
    {
        let _ = (key, pid);
        Err(undeclared(acl, "aclrtIpcMemSetImportPid"))
    }
}

/// `aclrtIpcMemImportByKey`: maps another process's exported memory;
/// returns its address in this process.
pub(crate) fn ipc_import(acl: &Acl, key: &CStr, peer_access: bool) -> Result<u64, AclError> {
    #[cfg(kvferry_acl_has = "aclrtIpcMemImportByKey")]
    {
        let flags = if peer_access {
            ffi::ACL_RT_IPC_MEM_IMPORT_FLAG_ENABLE_PEER_ACCESS
        } else {
            ffi::ACL_RT_IPC_MEM_IMPORT_FLAG_DEFAULT
        };
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: `ptr` is a valid place for the mapping's address; `key`
        // is NUL-terminated.
        unsafe { acl.aclrtIpcMemImportByKey(&mut ptr, key.as_ptr(), u64::from(flags)) }?;
        Ok(ptr as u64)
    }
    #[cfg(not(kvferry_acl_has = "aclrtIpcMemImportByKey"))]
    {
        let _ = (key, peer_access);
        Err(undeclared(acl, "aclrtIpcMemImportByKey"))
    }
}

/// `aclrtIpcMemClose`: ends an import (importer) or an export (exporter).
pub(crate) fn ipc_close(acl: &Acl, key: &CStr) -> Result<(), AclError> {
    #[cfg(kvferry_acl_has = "aclrtIpcMemClose")]
    {
        // SAFETY: `key` is NUL-terminated.
        unsafe { acl.aclrtIpcMemClose(key.as_ptr()) }
    }
    #[cfg(not(kvferry_acl_has = "aclrtIpcMemClose"))]
    {
        let _ = key;
        Err(undeclared(acl, "aclrtIpcMemClose"))
    }
}

/// `aclrtDeviceGetBareTgid`: this process as the device knows it (what an
/// exporter must allow); `getpid()` where the runtime lacks the function.
pub(crate) fn bare_tgid(acl: &Acl) -> Result<i32, AclError> {
    #[cfg(kvferry_acl_has = "aclrtDeviceGetBareTgid")]
    if acl.is_available("aclrtDeviceGetBareTgid") {
        let mut pid = 0i32;
        // SAFETY: `pid` is a valid place for the id.
        unsafe { acl.aclrtDeviceGetBareTgid(&mut pid) }?;
        return Ok(pid);
    }
    let _ = acl;
    Ok(std::process::id() as i32)
}
