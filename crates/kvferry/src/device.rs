//! Device (NPU) memory: the interface a device runtime implements, and the
//! engine's hooks that use it.
//!
//! kvferry knows nothing of Ascend. A runtime (kvferry-ascend's
//! `AscendRuntime`) implements [`DeviceRuntime`] and is handed to the engine
//! with [`EngineConfig::device_runtime`](crate::EngineConfig::device_runtime).
//! With it, the engine
//! - registers `"npu:N"` regions (the runtime checks them and exports each
//!   one for same-host peers; the export travels in the segment) and asks
//!   the runtime where `"*"` memory lives;
//! - sends every slice that touches device memory, on either side, past the
//!   host transports (cma and the in-process copy would treat device
//!   addresses as host memory): to the runtime's same-host transport
//!   ([`DeviceTransport`], Ascend IPC) when the peer exported the region,
//!   else over tcp staged through pinned host buffers by whichever side
//!   holds device memory (see [`crate::staging`]);
//! - serves peers' reads and writes of its device regions through the same
//!   staging pool.
//!
//! An engine without a runtime has host memory only, and still sends slices
//! that touch a peer's device regions over tcp, where the peer stages them.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::StagingPoolSize;
use crate::engine::Shared;
use crate::error::{Error, Result};
use crate::memory::{Location, LocationHint, RegionDesc, Registry, check_host_mapped};
use crate::plan::{Opcode, Slice};
use crate::segment::Segment;
use crate::staging::StagingPool;
use crate::transport::Report;
use crate::transport::tcp::TcpTransport;

/// Which way a staging copy goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyDirection {
    /// Pinned host buffer -> device memory.
    HostToDevice,
    /// Device memory -> pinned host buffer.
    DeviceToHost,
}

/// One copy of `len` bytes from `src` to `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyRange {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
}

/// Page-locked host memory from a device runtime. Dropping it frees it.
pub trait PinnedBuffer: Send + Sync + fmt::Debug {
    fn addr(&self) -> u64;
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a device runtime learns about a peer when a session to it starts.
#[derive(Debug)]
pub struct DevicePeer<'a> {
    /// The peer's session id (`"host:port"`).
    pub name: &'a str,
    /// Its segment as just fetched.
    pub segment: &'a Segment,
    /// The peer runs on this machine (same boot id).
    pub same_host: bool,
    /// The peer is an engine of this very process.
    pub same_process: bool,
    /// The control connection to the peer: for leases (PIN) and
    /// [`TcpTransport::device_control`] requests.
    pub tcp: &'a Arc<TcpTransport>,
}

/// A slice between device memory here and a peer's device memory, with
/// what the runtime needs to reach the peer's side.
#[derive(Debug, Clone, Copy)]
pub struct DeviceSlice<'a> {
    pub slice: Slice,
    /// The local region holding `slice.local`.
    pub local: RegionDesc,
    /// The peer's region holding `slice.remote`, from its segment.
    pub remote: RegionDesc,
    /// That region's export from the segment, if the peer published one.
    pub export: Option<&'a [u8]>,
}

/// Work for a [`DeviceTransport`].
#[derive(Debug)]
pub struct DeviceJob<'a> {
    pub opcode: Opcode,
    pub slices: &'a [DeviceSlice<'a>],
    /// Slices not finished by then fail with `Timeout`.
    pub deadline: Instant,
}

/// A runtime's own way to move bytes between device memory here and a
/// peer's device memory (Ascend: IPC-mapped device-to-device copies).
pub trait DeviceTransport: Send + Sync + fmt::Debug {
    /// "ascend-ipc", ...
    fn name(&self) -> &'static str;

    /// Whether this transport carries a slice from `local` to `remote`
    /// (whose segment export is `export`). Slices it declines go over tcp
    /// with staging.
    fn accepts(&self, local: &RegionDesc, remote: &RegionDesc, export: Option<&[u8]>) -> bool;

    /// The peer's segment changed (re-fetched after a miss): forget what
    /// belonged to regions it no longer has.
    fn segment_changed(&self, segment: &Segment);

    /// Carries out `job`, reporting every slice exactly once. Remote ranges
    /// are checked against the peer's segment by the caller; the transport
    /// must also have the peer check them against its live registry (a
    /// lease) before touching them, as the cma transport does.
    fn run(&self, job: &DeviceJob<'_>, report: Report<'_>);
}

/// A device runtime: what the engine needs to handle device memory.
///
/// Every method may be called from any thread; a runtime whose API binds a
/// device to the calling thread (ACL) sets it itself on each call.
pub trait DeviceRuntime: Send + Sync + fmt::Debug {
    /// Short name for logs: "ascend".
    fn name(&self) -> &'static str;

    /// Where `[addr, addr + len)` lives, for registrations with location
    /// `"*"`: `Location::Npu(n)` for this runtime's device memory, else
    /// `Location::Host` (memory the runtime does not manage is host memory).
    fn locate(&self, addr: u64, len: u64) -> Result<Location>;

    /// Checks that `region` (location `Npu(n)`) is device memory of device
    /// `n`, and prepares it for peers. Returns the export same-host peers
    /// map it with (an IPC key), published in the segment, or `None`.
    /// Errors say what the device requires (alignment, allocation).
    fn register_region(&self, region: &RegionDesc) -> Result<Option<Vec<u8>>>;

    /// Undoes [`DeviceRuntime::register_region`] once the region has left
    /// the registry and no transfer uses it. Failures are logged, not
    /// returned: the region is gone either way.
    fn unregister_region(&self, region: &RegionDesc);

    /// Copies between pinned host memory (from
    /// [`DeviceRuntime::alloc_pinned`]) and device memory of `device`, every
    /// range in `direction`. Returns when all bytes landed, or fails by
    /// `deadline` with nothing left queued on the device.
    fn copy(
        &self,
        device: u32,
        direction: CopyDirection,
        ranges: &[CopyRange],
        deadline: Instant,
    ) -> Result<()>;

    /// `len` bytes of page-locked host memory, for the staging pool.
    fn alloc_pinned(&self, len: u64) -> Result<Box<dyn PinnedBuffer>>;

    /// Serves a peer's device-control request (a DEVICE_CONTROL frame,
    /// e.g. "allow my process to import your exports") and returns the reply.
    fn serve_control(&self, request: &[u8]) -> Result<Vec<u8>>;

    /// A transport for device memory of `peer`, if this runtime has one for
    /// it (Ascend: same host, IPC available).
    fn peer_transport(&self, peer: &DevicePeer<'_>) -> Option<Arc<dyn DeviceTransport>>;
}

/// A device region the runtime prepared, and its export.
#[derive(Debug, Clone)]
struct Prepared {
    desc: RegionDesc,
    export: Option<Vec<u8>>,
}

/// The engine's device side: the runtime, the staging pool, and the device
/// regions it prepared.
#[derive(Debug)]
pub(crate) struct DeviceState {
    pub(crate) runtime: Option<Arc<dyn DeviceRuntime>>,
    pub(crate) pool: Option<StagingPool>,
    /// Locked across registry changes of device regions and across
    /// segment snapshots, so a segment never lists a device region without
    /// its export (a peer would cache that view).
    prepared: Mutex<BTreeMap<u64, Prepared>>,
    device_regions: AtomicUsize,
}

impl DeviceState {
    pub(crate) fn new(runtime: Option<Arc<dyn DeviceRuntime>>, pool: StagingPoolSize) -> Self {
        DeviceState {
            pool: runtime
                .as_ref()
                .map(|rt| StagingPool::new(Arc::clone(rt), pool)),
            runtime,
            prepared: Mutex::new(BTreeMap::new()),
            device_regions: AtomicUsize::new(0),
        }
    }

    /// Whether this engine has device regions registered.
    pub(crate) fn has_device_regions(&self) -> bool {
        self.device_regions.load(Ordering::Acquire) > 0
    }

    /// The registered regions and the exports of the device ones, as one
    /// consistent view.
    pub(crate) fn snapshot(
        &self,
        registry: &Registry,
    ) -> (Vec<RegionDesc>, BTreeMap<u64, Vec<u8>>) {
        let prepared = self.prepared.lock();
        let regions = registry.descs();
        let exports = regions
            .iter()
            .filter_map(|r| {
                let p = prepared.get(&r.addr)?;
                Some((r.addr, p.export.clone()?))
            })
            .collect();
        (regions, exports)
    }

    fn release(&self, taken: Vec<Prepared>) {
        if let Some(rt) = &self.runtime {
            for p in &taken {
                rt.unregister_region(&p.desc);
            }
        }
    }
}

impl Drop for DeviceState {
    fn drop(&mut self) {
        let taken: Vec<Prepared> = std::mem::take(&mut *self.prepared.lock())
            .into_values()
            .collect();
        self.release(taken);
    }
}

/// Where a region of a registration goes: the caller's location, or, for
/// `"*"`, what the runtime says (host memory without a runtime).
fn locate(
    runtime: Option<&Arc<dyn DeviceRuntime>>,
    hint: LocationHint,
    addr: u64,
    len: u64,
) -> Result<Location> {
    match (hint, runtime) {
        (LocationHint::Exactly(Location::Npu(n)), None) => Err(Error::Unsupported {
            what: format!(
                "location npu:{n}: this engine has no device runtime (create it with one, e.g. kvf_config_use_ascend)"
            ),
        }),
        (LocationHint::Exactly(location), _) => Ok(location),
        (LocationHint::Detect, None) => Ok(Location::Host),
        // The registry refuses these; the runtime need not be asked.
        (LocationHint::Detect, Some(_)) if len == 0 || addr.checked_add(len).is_none() => {
            Ok(Location::Host)
        }
        (LocationHint::Detect, Some(rt)) => rt.locate(addr, len),
    }
}

/// Registers `regions` at `location`, all or none: host regions must be
/// mapped readable and writable in this process (a peer's transfer would
/// fault on anything else), device regions are checked and exported by the
/// runtime, and what the runtime prepared is undone on any failure.
pub(crate) fn register(shared: &Shared, regions: &[(u64, u64)], location: &str) -> Result<()> {
    let hint: LocationHint = location.parse()?;
    let state = &shared.device;
    let runtime = state.runtime.as_ref();
    let mut descs = Vec::with_capacity(regions.len());
    for &(addr, len) in regions {
        descs.push(RegionDesc {
            addr,
            len,
            location: locate(runtime, hint, addr, len)?,
        });
    }
    // Before the runtime prepares anything: nothing to undo if it fails.
    check_host_mapped(&descs)?;
    let Some(rt) = runtime else {
        return shared.registry.register(&descs);
    };
    let mut done: Vec<Prepared> = Vec::new();
    for d in descs.iter().filter(|d| d.location != Location::Host) {
        if d.len == 0 || d.addr.checked_add(d.len).is_none() {
            continue; // the registry refuses it below, naming it
        }
        match rt.register_region(d) {
            Ok(export) => done.push(Prepared { desc: *d, export }),
            Err(e) => {
                state.release(done);
                return Err(e);
            }
        }
    }
    let mut prepared = state.prepared.lock();
    if let Err(e) = shared.registry.register(&descs) {
        drop(prepared);
        state.release(done);
        return Err(e);
    }
    state.device_regions.fetch_add(done.len(), Ordering::AcqRel);
    for p in done {
        prepared.insert(p.desc.addr, p);
    }
    Ok(())
}

/// Unregisters the regions at `addrs`, all or none (waiting up to `wait`
/// for in-flight transfers), then lets the runtime release the device ones.
pub(crate) fn unregister(shared: &Shared, addrs: &[u64], wait: Duration) -> Result<()> {
    shared.registry.unregister(addrs, wait)?;
    release(shared, addrs);
    Ok(())
}

/// Releases what the runtime prepared for regions that left the registry.
fn release(shared: &Shared, addrs: &[u64]) {
    let state = &shared.device;
    let taken: Vec<Prepared> = {
        let mut prepared = state.prepared.lock();
        addrs.iter().filter_map(|a| prepared.remove(a)).collect()
    };
    state
        .device_regions
        .fetch_sub(taken.len(), Ordering::AcqRel);
    state.release(taken);
}

/// At engine shutdown: releases every device region still prepared (the
/// owner may free the memory once the engine is gone).
pub(crate) fn release_all(shared: &Shared) {
    let addrs: Vec<u64> = shared.device.prepared.lock().keys().copied().collect();
    release(shared, &addrs);
}

/// What the staging pool holds: buffers allocated, and those in use now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StagingStats {
    pub allocated: usize,
    pub in_use: usize,
    /// The pool's size: `count` buffers of `buffer_bytes`.
    pub capacity: usize,
    pub buffer_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npu_without_a_runtime_is_unsupported_and_star_is_host() {
        let e = locate(None, "npu:2".parse().unwrap(), 0x1000, 16).unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{e}");
        assert!(e.to_string().contains("npu:2"));
        assert_eq!(
            locate(None, "*".parse().unwrap(), 0x1000, 16).unwrap(),
            Location::Host
        );
        assert_eq!(
            locate(None, "cpu:0".parse().unwrap(), 0x1000, 16).unwrap(),
            Location::Host
        );
    }
}
