//! [`AscendRuntime`]: kvferry's [`DeviceRuntime`] over ACL.

use std::ffi::{CString, c_void};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use kvferry::{
    CopyDirection, CopyRange, DevicePeer, DeviceRuntime, DeviceTransport, Error, Location,
    PinnedBuffer, RegionDesc,
};
use kvferry_ascend_sys::ffi;

use crate::acl::{Export, Handle, Rt, acl_error};
use crate::ipc::{self, IpcTransport};
use crate::optional::{self, PtrLocation};

/// HCCS (and Mooncake's Ascend transport) want device memory registered at
/// 2 MiB alignment; vllm-ascend allocates its KV caches that way.
pub const DEVICE_ALIGNMENT: u64 = 2 << 20;

/// Disables IPC exports and the ascend-ipc transport when off (`0`,
/// `false`, `no`, `off`, any case; `kvferry::config::parse_flag`, which
/// refuses anything else): same-host peers then move device memory over tcp
/// with staging.
pub const IPC_ENV: &str = "KVFERRY_ASCEND_IPC";

/// How to load the Ascend runtime.
#[derive(Debug, Clone, Default)]
pub struct AscendConfig {
    library: Option<PathBuf>,
    ipc: Option<bool>,
}

impl AscendConfig {
    pub fn new() -> Self {
        Self::default()
    }

    /// Load this library instead of `KVFERRY_ACL_LIBRARY` /
    /// `libascendcl.so` (tests point it at the CANN stand-in).
    pub fn library(mut self, path: impl Into<PathBuf>) -> Self {
        self.library = Some(path.into());
        self
    }

    /// Export device regions for same-host peers and map theirs (default:
    /// on, unless `KVFERRY_ASCEND_IPC=0`). Off, same-host peers stage over
    /// tcp like peers on other hosts.
    pub fn ipc(mut self, on: bool) -> Self {
        self.ipc = Some(on);
        self
    }
}

/// What the runtime holds right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AscendStats {
    /// Streams aborted after a failed or timed-out copy, since the start.
    pub streams_aborted: u64,
    /// Idle streams kept for reuse.
    pub pooled_streams: usize,
    /// Device regions of this process exported for IPC.
    pub exports: usize,
    /// Peer regions mapped into this process.
    pub imports: usize,
    /// Imports made since the start (each key is imported once).
    pub imports_made: u64,
}

/// Ascend NPU memory for kvferry engines: a [`DeviceRuntime`] over ACL,
/// loaded at run time (`libascendcl.so`, or `KVFERRY_ACL_LIBRARY`).
///
/// Hand it to [`kvferry::EngineConfig::device_runtime`]. All engines of a
/// process share the one loaded ACL runtime. ACL is initialised (a second
/// initialisation, e.g. by torch_npu, is fine) and never finalised: other
/// users of ACL in the process keep it.
#[derive(Debug)]
pub struct AscendRuntime {
    rt: Arc<Rt>,
    ipc: bool,
    /// The device pinned host memory is allocated with: the first device a
    /// region was registered on (0 until then).
    home: AtomicU32,
}

/// Whether IPC is on: the config's choice, else `KVFERRY_ASCEND_IPC`
/// (`value`), else on. A malformed value is an error naming the variable,
/// even when the config decides, as for the engine's own variables: a
/// typo must not silently leave IPC on.
fn ipc_setting(configured: Option<bool>, value: Option<&str>) -> Result<bool, Error> {
    let from_env = kvferry::config::parse_flag(IPC_ENV, value)?;
    Ok(configured.or(from_env).unwrap_or(true))
}

impl AscendRuntime {
    /// Loads the runtime from `KVFERRY_ACL_LIBRARY`, else `libascendcl.so`.
    /// Fails with `Unsupported` ("Ascend runtime not found: ...") where
    /// there is none: the caller then runs without NPU memory.
    pub fn load() -> Result<Arc<AscendRuntime>, Error> {
        Self::with_config(AscendConfig::new())
    }

    pub fn with_config(config: AscendConfig) -> Result<Arc<AscendRuntime>, Error> {
        let rt = Rt::get(config.library)?;
        let value = std::env::var_os(IPC_ENV).map(|v| v.to_string_lossy().into_owned());
        let ipc = ipc_setting(config.ipc, value.as_deref())?;
        if ipc && !optional::has_ipc(&rt.acl) {
            log::info!(
                "kvferry: the Ascend runtime {} has no IPC by key (aclrtIpcMem*): same-host NPU transfers are staged over tcp",
                rt.acl.library().display()
            );
        }
        Ok(Arc::new(AscendRuntime {
            ipc: ipc && optional::has_ipc(&rt.acl),
            rt,
            home: AtomicU32::new(0),
        }))
    }

    /// The library that was loaded.
    pub fn library(&self) -> &Path {
        self.rt.acl.library()
    }

    /// NPUs the runtime sees.
    pub fn device_count(&self) -> u32 {
        self.rt.device_count
    }

    /// Whether regions are exported and same-host peers' regions mapped.
    pub fn ipc_enabled(&self) -> bool {
        self.ipc
    }

    pub fn stats(&self) -> AscendStats {
        let counters = &self.rt.counters;
        AscendStats {
            streams_aborted: counters.streams_aborted.load(Ordering::Relaxed),
            pooled_streams: self.rt.pooled_streams(),
            exports: self.rt.exports.lock().by_addr.len(),
            imports: self.rt.imports.lock().len(),
            imports_made: counters.imports.load(Ordering::Relaxed),
        }
    }

    /// `len` bytes of device memory on `device` (`aclrtMalloc`, huge pages
    /// first: 2 MiB aligned, as registration for peers wants). For tools,
    /// demos and tests; a serving stack allocates its KV cache itself.
    pub fn alloc_device(&self, device: u32, len: u64) -> Result<DeviceBuffer, Error> {
        let _guard = self.rt.enter(device)?;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: `ptr` is a valid place for the address; the policy is a
        // documented value.
        unsafe {
            self.rt
                .acl
                .aclrtMalloc(&mut ptr, len as usize, ffi::ACL_MEM_MALLOC_HUGE_FIRST)
        }
        .map_err(|e| acl_error(format!("allocating {len} bytes on npu:{device}"), e))?;
        Ok(DeviceBuffer {
            rt: Arc::clone(&self.rt),
            device,
            ptr: Handle(ptr),
            len,
        })
    }

    /// Copies `src` (host memory) to device memory at `dst` on `device`
    /// (`aclrtMemcpy`).
    pub fn upload(&self, device: u32, dst: u64, src: &[u8]) -> Result<(), Error> {
        let _guard = self.rt.enter(device)?;
        // SAFETY: `src` is readable for its length; `dst` is device memory
        // the caller owns (ACL checks it and fails otherwise).
        unsafe {
            self.rt.acl.aclrtMemcpy(
                dst as *mut c_void,
                src.len(),
                src.as_ptr().cast(),
                src.len(),
                ffi::ACL_MEMCPY_HOST_TO_DEVICE,
            )
        }
        .map_err(|e| acl_error(format!("copying {} bytes to npu:{device}", src.len()), e))
    }

    /// Copies device memory at `src` on `device` into `dst` (host memory).
    pub fn download(&self, device: u32, src: u64, dst: &mut [u8]) -> Result<(), Error> {
        let _guard = self.rt.enter(device)?;
        let len = dst.len();
        // SAFETY: `dst` is writable for its length; `src` is device memory
        // the caller owns (ACL checks it and fails otherwise).
        unsafe {
            self.rt.acl.aclrtMemcpy(
                dst.as_mut_ptr().cast(),
                len,
                src as *const c_void,
                len,
                ffi::ACL_MEMCPY_DEVICE_TO_HOST,
            )
        }
        .map_err(|e| acl_error(format!("copying {len} bytes from npu:{device}"), e))
    }

    /// Checks that `[addr, addr + len)` is device memory of `device`:
    /// both ends, by `aclrtPointerGetAttributes` (skipped where the runtime
    /// lacks it).
    fn check_region(&self, addr: u64, len: u64, device: u32) -> Result<(), Error> {
        let acl = &self.rt.acl;
        if !acl.is_available("aclrtPointerGetAttributes") {
            return Ok(());
        }
        let what =
            |end: &str| format!("registering [{addr:#x}, +{len}) as npu:{device}: the {end} byte");
        for (end, probe) in [("first", addr), ("last", addr + len - 1)] {
            match optional::pointer_location(acl, probe) {
                Ok(PtrLocation::Device(d)) if d == device => {}
                Ok(PtrLocation::Device(d)) => {
                    return Err(Error::InvalidArgument {
                        what: format!("{} is memory of npu:{d}, not npu:{device}", what(end)),
                    });
                }
                Ok(other) => {
                    return Err(Error::InvalidArgument {
                        what: format!(
                            "{} is not device memory (ACL says {other:?}); register host memory as \"cpu:0\" or \"*\"",
                            what(end)
                        ),
                    });
                }
                Err(e) => {
                    return Err(acl_error(
                        format!(
                            "{} is not memory ACL allocated (register host memory as \"cpu:0\" or \"*\")",
                            what(end)
                        ),
                        e,
                    ));
                }
            }
        }
        Ok(())
    }

    /// Exports `[addr, addr + len)` of `device` (or shares the export an
    /// engine of this process already made), allowing every importer
    /// granted so far.
    fn export(&self, addr: u64, len: u64, device: u32) -> Result<Vec<u8>, Error> {
        let mut exports = self.rt.exports.lock();
        if let Some(e) = exports.by_addr.get_mut(&addr) {
            if e.len == len && e.device == device {
                e.users += 1;
                return Ok(e.key.as_bytes().to_vec());
            }
            return Err(Error::InvalidArgument {
                what: format!(
                    "[{addr:#x}, +{len}) as npu:{device}: another engine of this process registered [{addr:#x}, +{}) on npu:{}",
                    e.len, e.device
                ),
            });
        }
        let _guard = self.rt.enter(device)?;
        let acl = &self.rt.acl;
        let key = optional::ipc_export(acl, addr, len).map_err(|e| {
            let hint = if !addr.is_multiple_of(DEVICE_ALIGNMENT) || !len.is_multiple_of(DEVICE_ALIGNMENT) {
                "; note: Ascend wants device memory registered at 2 MiB alignment (start and length), as vllm-ascend allocates KV caches for Mooncake, and this region is not"
            } else {
                ""
            };
            acl_error(
                format!(
                    "registering [{addr:#x}, +{len}) as npu:{device}: exporting its IPC key for same-host peers{hint} (set {IPC_ENV}=0 to register without IPC; same-host peers then use tcp with staging)"
                ),
                e,
            )
        })?;
        for &pid in &exports.granted {
            if let Err(e) = optional::ipc_allow(acl, &key, pid) {
                let _ = optional::ipc_close(acl, &key);
                return Err(acl_error(
                    format!(
                        "registering [{addr:#x}, +{len}) as npu:{device}: allowing process {pid} to import it"
                    ),
                    e,
                ));
            }
        }
        let allowed = exports.granted.clone();
        let bytes = key.as_bytes().to_vec();
        exports.by_addr.insert(
            addr,
            Export {
                key,
                device,
                len,
                users: 1,
                allowed,
            },
        );
        Ok(bytes)
    }

    /// A peer's request to import our exports: allow its process on every
    /// export, now and later.
    fn grant(&self, pid: i32) -> Result<usize, Error> {
        let mut exports = self.rt.exports.lock();
        if !exports.granted.contains(&pid) {
            exports.granted.push(pid);
        }
        let mut n = 0;
        for (addr, e) in exports.by_addr.iter_mut() {
            if e.allowed.contains(&pid) {
                n += 1;
                continue;
            }
            let _guard = self.rt.enter(e.device)?;
            optional::ipc_allow(&self.rt.acl, &e.key, pid).map_err(|err| {
                acl_error(
                    format!(
                        "allowing process {pid} to import the region at {addr:#x} (npu:{})",
                        e.device
                    ),
                    err,
                )
            })?;
            e.allowed.push(pid);
            n += 1;
        }
        Ok(n)
    }
}

impl DeviceRuntime for AscendRuntime {
    fn name(&self) -> &'static str {
        "ascend"
    }

    fn locate(&self, addr: u64, _len: u64) -> Result<Location, Error> {
        // Memory ACL does not manage (plain malloc) fails or answers
        // UNREGISTERED, depending on the CANN release: host memory both ways.
        Ok(match optional::pointer_location(&self.rt.acl, addr) {
            Ok(PtrLocation::Device(d)) => Location::Npu(d),
            Ok(_) => Location::Host,
            Err(e) => {
                log::debug!("kvferry: {addr:#x} is host memory ({e})");
                Location::Host
            }
        })
    }

    fn register_region(&self, region: &RegionDesc) -> Result<Option<Vec<u8>>, Error> {
        let Location::Npu(device) = region.location else {
            return Ok(None);
        };
        self.rt.check_device(device)?;
        self.check_region(region.addr, region.len, device)?;
        let _ = self
            .home
            .compare_exchange(0, device, Ordering::AcqRel, Ordering::Acquire);
        if !self.ipc {
            return Ok(None);
        }
        self.export(region.addr, region.len, device).map(Some)
    }

    fn unregister_region(&self, region: &RegionDesc) {
        let Location::Npu(device) = region.location else {
            return;
        };
        let mut exports = self.rt.exports.lock();
        let Some(e) = exports.by_addr.get_mut(&region.addr) else {
            return;
        };
        e.users = e.users.saturating_sub(1);
        if e.users > 0 {
            return;
        }
        let Some(e) = exports.by_addr.remove(&region.addr) else {
            return;
        };
        let closed = self.rt.enter(device).and_then(|_guard| {
            optional::ipc_close(&self.rt.acl, &e.key)
                .map_err(|err| acl_error("closing the export", err))
        });
        if let Err(err) = closed {
            log::warn!(
                "kvferry: unregistering [{:#x}, +{}) on npu:{device}: {err}",
                region.addr,
                region.len
            );
        }
    }

    fn copy(
        &self,
        device: u32,
        direction: CopyDirection,
        ranges: &[CopyRange],
        deadline: Instant,
    ) -> Result<(), Error> {
        if ranges.is_empty() {
            return Ok(());
        }
        let (kind, way) = match direction {
            CopyDirection::HostToDevice => (ffi::ACL_MEMCPY_HOST_TO_DEVICE, "to"),
            CopyDirection::DeviceToHost => (ffi::ACL_MEMCPY_DEVICE_TO_HOST, "from"),
        };
        let bytes: u64 = ranges.iter().map(|r| r.len).sum();
        let what = || format!("staging {bytes} bytes {way} npu:{device}");
        self.rt.on_stream(device, deadline, &what, |stream| {
            for r in ranges {
                // SAFETY: one side is pinned host memory from the staging
                // pool and the other device memory of a region pinned for
                // the transfer, both valid for `len` until the stream is
                // synchronised or aborted (on_stream does one of the two
                // before returning).
                unsafe {
                    self.rt.acl.aclrtMemcpyAsync(
                        r.dst as *mut c_void,
                        r.len as usize,
                        r.src as *const c_void,
                        r.len as usize,
                        kind,
                        stream,
                    )
                }
                .map_err(|e| acl_error(format!("{}: queueing a copy", what()), e))?;
            }
            Ok(())
        })
    }

    fn alloc_pinned(&self, len: u64) -> Result<Box<dyn PinnedBuffer>, Error> {
        let device = self.home.load(Ordering::Acquire);
        let _guard = self.rt.enter(device)?;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: `ptr` is a valid place for the address.
        unsafe { self.rt.acl.aclrtMallocHost(&mut ptr, len as usize) }.map_err(|e| {
            acl_error(
                format!("allocating a {len}-byte pinned staging buffer (ASCEND_BUFFER_POOL sets count:MiB)"),
                e,
            )
        })?;
        Ok(Box::new(PinnedHost {
            rt: Arc::clone(&self.rt),
            device,
            ptr: Handle(ptr),
            len,
        }))
    }

    fn serve_control(&self, request: &[u8]) -> Result<Vec<u8>, Error> {
        let pid = ipc::parse_grant(request).ok_or_else(|| Error::InvalidArgument {
            what: format!(
                "a device-control request of {} bytes this runtime does not know",
                request.len()
            ),
        })?;
        if !self.ipc {
            return Err(Error::Unsupported {
                what: format!(
                    "this engine does not export NPU memory ({IPC_ENV}=0, or no IPC in its CANN)"
                ),
            });
        }
        let n = self.grant(pid)?;
        Ok((n as u32).to_le_bytes().to_vec())
    }

    fn peer_transport(&self, peer: &DevicePeer<'_>) -> Option<Arc<dyn DeviceTransport>> {
        // In one process both sides' device pointers are valid here, but an
        // engine pair of one process is rare enough to take tcp staging.
        if !self.ipc || !peer.same_host || peer.same_process {
            return None;
        }
        Some(Arc::new(IpcTransport::new(
            Arc::clone(&self.rt),
            Arc::clone(peer.tcp),
        )))
    }
}

/// Device memory from [`AscendRuntime::alloc_device`]; freed on drop.
#[derive(Debug)]
pub struct DeviceBuffer {
    rt: Arc<Rt>,
    device: u32,
    ptr: Handle,
    len: u64,
}

impl DeviceBuffer {
    /// The device address (not host-accessible).
    pub fn addr(&self) -> u64 {
        self.ptr.0 as u64
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn device(&self) -> u32 {
        self.device
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let freed = self.rt.enter(self.device).and_then(|_guard| {
            // SAFETY: the pointer came from aclrtMalloc and is freed once.
            unsafe { self.rt.acl.aclrtFree(self.ptr.0) }
                .map_err(|e| acl_error("freeing device memory", e))
        });
        if let Err(e) = freed {
            log::warn!("kvferry: npu:{}: {e}", self.device);
        }
    }
}

/// Page-locked host memory from `aclrtMallocHost`; freed on drop.
#[derive(Debug)]
struct PinnedHost {
    rt: Arc<Rt>,
    device: u32,
    ptr: Handle,
    len: u64,
}

impl PinnedBuffer for PinnedHost {
    fn addr(&self) -> u64 {
        self.ptr.0 as u64
    }

    fn len(&self) -> u64 {
        self.len
    }
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        let freed = self.rt.enter(self.device).and_then(|_guard| {
            // SAFETY: the pointer came from aclrtMallocHost and is freed once;
            // the staging pool drops a buffer only when no copy uses it.
            unsafe { self.rt.acl.aclrtFreeHost(self.ptr.0) }
                .map_err(|e| acl_error("freeing a pinned staging buffer", e))
        });
        if let Err(e) = freed {
            log::warn!("kvferry: {e}");
        }
    }
}

/// A region's export as a C string, if it can be one.
pub(crate) fn key_of(export: &[u8]) -> Option<CString> {
    if export.is_empty() || export.len() >= optional::IPC_KEY_LEN {
        return None;
    }
    CString::new(export).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipc_is_on_unless_configured_or_switched_off_and_typos_are_errors() {
        assert!(ipc_setting(None, None).unwrap());
        assert!(ipc_setting(None, Some("")).unwrap());
        for off in ["0", "false", "False", "NO", "off", "OFF"] {
            assert!(!ipc_setting(None, Some(off)).unwrap(), "{off:?}");
        }
        for on in ["1", "TRUE", "yes", "On"] {
            assert!(ipc_setting(None, Some(on)).unwrap(), "{on:?}");
        }
        for bad in ["of", "disable", "2"] {
            let e = ipc_setting(None, Some(bad)).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument { .. }), "{bad:?}: {e}");
            assert!(e.to_string().contains("KVFERRY_ASCEND_IPC"), "{e}");
        }
        // The config's choice wins; a malformed variable is still an error.
        assert!(!ipc_setting(Some(false), Some("1")).unwrap());
        assert!(ipc_setting(Some(true), Some("0")).unwrap());
        assert!(ipc_setting(Some(true), Some("bogus")).is_err());
    }
}
