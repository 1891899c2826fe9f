//! The `ascend-ipc` transport: device memory of a peer on the same host,
//! mapped into this process with the IPC key its segment carries, and moved
//! with device-to-device copies.
//!
//! Per job:
//! 1. lease: the peer checks every remote range against its live registry
//!    and pins it (the PIN request the cma transport uses), so no byte lands
//!    in memory the peer's owner may free, and a bad address is refused
//!    before anything moves;
//! 2. once per session, ask the peer to allow this process to import its
//!    keys (a DEVICE_CONTROL request carrying `aclrtDeviceGetBareTgid`);
//! 3. map each peer region once per process (`aclrtIpcMemImportByKey`),
//!    cached until its key leaves the peer's segment or the session ends;
//! 4. per local device, on a pooled stream with that device set on this
//!    thread: `aclrtMemcpyBatchAsync` (else one `aclrtMemcpyAsync` per
//!    slice; CANN allows only asynchronous device-to-device copies on memory
//!    imported from another device's process), then
//!    `aclrtSynchronizeStreamWithTimeout` with what is left of the job's
//!    deadline; on timeout or failure the stream is aborted;
//! 5. release the lease.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{CString, c_void};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use kvferry::transport::Report;
use kvferry::transport::tcp::TcpTransport;
use kvferry::wire::Range;
use kvferry::{DeviceJob, DeviceTransport, Error, Location, Opcode, RegionDesc, Segment};
use kvferry_ascend_sys::ffi;
use parking_lot::Mutex;

use crate::acl::{Import, Rt, acl_error};
use crate::optional::{self, PtrLocation};
use crate::runtime::key_of;

/// "KVFA": device-control requests of the Ascend runtime.
const MAGIC: [u8; 4] = *b"KVFA";
const GRANT: u16 = 1;
const VERSION: u16 = 1;

/// Most entries of one `aclrtMemcpyBatchAsync`.
const BATCH_MAX: usize = 4096;

/// The request "allow process `pid` to import your exports".
pub(crate) fn grant_request(pid: i32) -> Vec<u8> {
    let mut r = Vec::with_capacity(12);
    r.extend_from_slice(&MAGIC);
    r.extend_from_slice(&VERSION.to_le_bytes());
    r.extend_from_slice(&GRANT.to_le_bytes());
    r.extend_from_slice(&pid.to_le_bytes());
    r
}

/// The pid of a grant request, if `request` is one.
pub(crate) fn parse_grant(request: &[u8]) -> Option<i32> {
    let r: &[u8; 12] = request.try_into().ok()?;
    let (magic, rest) = r.split_at(4);
    if magic != MAGIC || rest[..2] != VERSION.to_le_bytes() || rest[2..4] != GRANT.to_le_bytes() {
        return None;
    }
    Some(i32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]))
}

/// Device-to-device transfers with one same-host peer.
#[derive(Debug)]
pub(crate) struct IpcTransport {
    rt: Arc<Rt>,
    tcp: Arc<TcpTransport>,
    /// The peer allowed this process to import its keys.
    granted: AtomicBool,
    /// Keys this transport holds a use of (process-wide imports in `rt`).
    keys: Mutex<HashSet<CString>>,
    /// `aclrtMemcpyBatchAsync` works here (else one async copy per slice).
    batch: AtomicBool,
}

/// One copy: `len` bytes from `src` to `dst`, device addresses of this
/// process.
#[derive(Debug, Clone, Copy)]
struct D2d {
    dst: u64,
    src: u64,
    len: u64,
}

impl IpcTransport {
    pub(crate) fn new(rt: Arc<Rt>, tcp: Arc<TcpTransport>) -> Self {
        let batch = rt.acl.is_available("aclrtMemcpyBatchAsync");
        IpcTransport {
            rt,
            tcp,
            granted: AtomicBool::new(false),
            keys: Mutex::new(HashSet::new()),
            batch: AtomicBool::new(batch),
        }
    }

    fn peer(&self) -> &str {
        self.tcp.peer_name()
    }

    /// Has the peer check and pin every remote range of `job`.
    fn lease(&self, job: &DeviceJob<'_>) -> Result<Vec<(usize, u64)>, Error> {
        let ranges: Vec<Range> = job
            .slices
            .iter()
            .map(|s| Range {
                addr: s.slice.remote,
                len: s.slice.len,
            })
            .collect();
        self.tcp.lease(&ranges, job.deadline)
    }

    /// Once per session: the peer allows this process (as the device knows
    /// it) to import its keys.
    fn ensure_granted(&self, device: u32, deadline: Instant) -> Result<(), Error> {
        if self.granted.load(Ordering::Acquire) {
            return Ok(());
        }
        let pid = {
            let _guard = self.rt.enter(device)?;
            optional::bare_tgid(&self.rt.acl).map_err(|e| {
                acl_error(
                    "reading this process's id for IPC (aclrtDeviceGetBareTgid)",
                    e,
                )
            })?
        };
        self.tcp.device_control(&grant_request(pid), deadline)?;
        self.granted.store(true, Ordering::Release);
        Ok(())
    }

    /// The peer region with `key`, mapped into this process (once per
    /// process); returns its base here and its device as this process
    /// numbers it. Call with `device` current on the thread.
    fn import(&self, key: &CString, remote: &RegionDesc, device: u32) -> Result<(u64, u32), Error> {
        let mut imports = self.rt.imports.lock();
        if let Some(imp) = imports.get_mut(key) {
            if self.keys.lock().insert(key.clone()) {
                imp.users += 1;
            }
            return Ok((imp.base, imp.device));
        }
        let remote_device = match remote.location {
            Location::Npu(n) => n,
            Location::Host => device,
        };
        // Memory of another device is reached through the interconnect.
        let peer_access = remote_device != device;
        let base = optional::ipc_import(&self.rt.acl, key, peer_access).map_err(|e| {
            acl_error(
                format!(
                    "ascend-ipc: mapping {}'s region [{:#x}, +{}) (npu:{remote_device}) into this process on npu:{device} with its IPC key",
                    self.peer(),
                    remote.addr,
                    remote.len
                ),
                e,
            )
        })?;
        let seen = match optional::pointer_location(&self.rt.acl, base) {
            Ok(PtrLocation::Device(d)) => d,
            _ => remote_device,
        };
        imports.insert(
            key.clone(),
            Import {
                base,
                device: seen,
                opened_on: device,
                users: 1,
            },
        );
        self.keys.lock().insert(key.clone());
        self.rt.counters.imports.fetch_add(1, Ordering::Relaxed);
        Ok((base, seen))
    }

    /// Lets go of this transport's use of `key`; the last user closes it.
    fn forget(&self, key: &CString) {
        if !self.keys.lock().remove(key) {
            return;
        }
        let mut imports = self.rt.imports.lock();
        let Some(imp) = imports.get_mut(key) else {
            return;
        };
        imp.users = imp.users.saturating_sub(1);
        if imp.users > 0 {
            return;
        }
        let Some(imp) = imports.remove(key) else {
            return;
        };
        let closed = self.rt.enter(imp.opened_on).and_then(|_guard| {
            optional::ipc_close(&self.rt.acl, key)
                .map_err(|e| acl_error("closing an IPC import", e))
        });
        if let Err(e) = closed {
            log::warn!("kvferry: ascend-ipc with {}: {e}", self.peer());
        }
    }

    /// Copies the slices `indices` of `job`, whose local side is on
    /// `device`: mapped, queued and waited for on one stream.
    fn copy_group(&self, job: &DeviceJob<'_>, device: u32, indices: &[usize]) -> Result<(), Error> {
        let _guard = self.rt.enter(device)?;
        // Per device of the peer's memory (batch attributes name it).
        let mut by_remote: BTreeMap<u32, Vec<D2d>> = BTreeMap::new();
        let mut bytes = 0u64;
        for &i in indices {
            let s = &job.slices[i];
            let key = s.export.and_then(key_of).ok_or_else(|| Error::Internal {
                what: "ascend-ipc got a slice without an IPC key".into(),
            })?;
            let (base, remote_device) = self.import(&key, &s.remote, device)?;
            let remote = base + (s.slice.remote - s.remote.addr);
            let copy = match job.opcode {
                Opcode::Read => D2d {
                    dst: s.slice.local,
                    src: remote,
                    len: s.slice.len,
                },
                Opcode::Write => D2d {
                    dst: remote,
                    src: s.slice.local,
                    len: s.slice.len,
                },
            };
            bytes += s.slice.len;
            by_remote.entry(remote_device).or_default().push(copy);
        }
        let what = || {
            format!(
                "ascend-ipc {} of {} slice(s), {bytes} bytes, npu:{device} {} {}",
                if job.opcode == Opcode::Read {
                    "read"
                } else {
                    "write"
                },
                indices.len(),
                if job.opcode == Opcode::Read {
                    "<-"
                } else {
                    "->"
                },
                self.peer()
            )
        };
        self.rt.on_stream(device, job.deadline, &what, |stream| {
            for (&remote_device, copies) in &by_remote {
                let (dst_device, src_device) = match job.opcode {
                    Opcode::Read => (device, remote_device),
                    Opcode::Write => (remote_device, device),
                };
                self.submit(stream, copies, dst_device, src_device, &what)?;
            }
            Ok(())
        })
    }

    /// Queues `copies` on `stream`: in batches when the runtime can, else
    /// one by one.
    fn submit(
        &self,
        stream: ffi::aclrtStream,
        copies: &[D2d],
        dst_device: u32,
        src_device: u32,
        what: &dyn Fn() -> String,
    ) -> Result<(), Error> {
        let mut done = 0;
        while self.batch.load(Ordering::Relaxed) && done < copies.len() {
            let chunk = &copies[done..copies.len().min(done + BATCH_MAX)];
            let mut dsts: Vec<*mut c_void> = chunk.iter().map(|c| c.dst as *mut c_void).collect();
            let mut srcs: Vec<*mut c_void> = chunk.iter().map(|c| c.src as *mut c_void).collect();
            let mut sizes: Vec<usize> = chunk.iter().map(|c| c.len as usize).collect();
            // SAFETY: the ranges are device memory of pinned regions (local:
            // the plan's pins; remote: the peer's lease over the mapping),
            // valid until on_stream synchronises or aborts the stream, which
            // is live and of the device current on this thread.
            let r = unsafe {
                optional::memcpy_batch_async(
                    &self.rt.acl,
                    &mut dsts,
                    &mut srcs,
                    &mut sizes,
                    dst_device,
                    src_device,
                    stream,
                )
            };
            match r {
                Ok(()) => done += chunk.len(),
                Err((e, _))
                    if done == 0
                        && matches!(
                            e.code(),
                            Some(
                                ffi::ACL_ERROR_API_NOT_SUPPORT | ffi::ACL_ERROR_FEATURE_UNSUPPORTED
                            )
                        ) =>
                {
                    log::info!(
                        "kvferry: aclrtMemcpyBatchAsync is not supported here ({e}); copying one slice at a time"
                    );
                    self.batch.store(false, Ordering::Relaxed);
                }
                Err((e, index)) => {
                    let at = if index == usize::MAX {
                        String::new()
                    } else {
                        format!(" (entry {})", done + index)
                    };
                    return Err(acl_error(format!("{}: queueing the copies{at}", what()), e));
                }
            }
        }
        for c in &copies[done..] {
            // SAFETY: as for the batch above.
            unsafe {
                self.rt.acl.aclrtMemcpyAsync(
                    c.dst as *mut c_void,
                    c.len as usize,
                    c.src as *const c_void,
                    c.len as usize,
                    ffi::ACL_MEMCPY_DEVICE_TO_DEVICE,
                    stream,
                )
            }
            .map_err(|e| acl_error(format!("{}: queueing a copy", what()), e))?;
        }
        Ok(())
    }
}

impl DeviceTransport for IpcTransport {
    fn name(&self) -> &'static str {
        "ascend-ipc"
    }

    fn accepts(&self, local: &RegionDesc, remote: &RegionDesc, export: Option<&[u8]>) -> bool {
        matches!(local.location, Location::Npu(_))
            && matches!(remote.location, Location::Npu(_))
            && export.and_then(key_of).is_some()
    }

    fn segment_changed(&self, segment: &Segment) {
        let live: HashSet<&[u8]> = segment.exports.values().map(Vec::as_slice).collect();
        let stale: Vec<CString> = self
            .keys
            .lock()
            .iter()
            .filter(|k| !live.contains(k.as_bytes()))
            .cloned()
            .collect();
        for key in &stale {
            self.forget(key);
        }
    }

    fn run(&self, job: &DeviceJob<'_>, report: Report<'_>) {
        let fail_all = |e: &Error| (0..job.slices.len()).for_each(|i| report(i, Err(e.clone())));
        let mut groups: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, s) in job.slices.iter().enumerate() {
            let device = match s.local.location {
                Location::Npu(n) => n,
                Location::Host => 0,
            };
            groups.entry(device).or_default().push(i);
        }
        let Some(&first_device) = groups.keys().next() else {
            return;
        };
        let leases = match self.lease(job) {
            Ok(l) => l,
            Err(e) => return fail_all(&e),
        };
        if let Err(e) = self.ensure_granted(first_device, job.deadline) {
            self.tcp.release_leases(&leases);
            return fail_all(&e);
        }
        for (device, indices) in &groups {
            let r = self.copy_group(job, *device, indices);
            for &i in indices {
                report(i, r.clone());
            }
        }
        self.tcp.release_leases(&leases);
    }
}

impl Drop for IpcTransport {
    fn drop(&mut self) {
        let keys: Vec<CString> = self.keys.lock().iter().cloned().collect();
        for key in &keys {
            self.forget(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_requests_round_trip_and_refuse_others() {
        assert_eq!(parse_grant(&grant_request(4242)), Some(4242));
        assert_eq!(parse_grant(&grant_request(-7)), Some(-7));
        let mut bad = grant_request(1);
        bad[0] = b'X';
        assert_eq!(parse_grant(&bad), None);
        assert_eq!(parse_grant(&grant_request(1)[..11]), None);
        let mut other = grant_request(1);
        other[6] = 9;
        assert_eq!(parse_grant(&other), None);
    }
}
