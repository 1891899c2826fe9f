//! The transport of every session: splits each job by memory kind.
//!
//! Host-to-host slices go to the session's host transport (local, cma or
//! tcp) exactly as before. Slices that touch device memory on either side
//! must not: cma and the in-process copy would treat device addresses as
//! host memory. They go
//! - to the device runtime's own transport for the peer (Ascend IPC) when
//!   it takes them (device memory on both sides, the peer exported the
//!   region, same host);
//! - else, when the peer's side is device memory, over tcp, where the peer
//!   stages its side through its pinned pool; when only the local side is
//!   device memory, over the host transport;
//!
//! in both of the last cases the local side is staged here when it is
//! device memory (see [`crate::staging`]).
//!
//! With no device memory on either side, a job goes to the host transport
//! untouched: one check of two flags.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use parking_lot::{Mutex, RwLock};

use crate::device::{DeviceJob, DevicePeer, DeviceSlice, DeviceTransport};
use crate::engine::Shared;
use crate::error::{Error, Result};
use crate::memory::{Location, RegionDesc};
use crate::segment::Segment;
use crate::staging;
use crate::transport::tcp::TcpTransport;
use crate::transport::{Job, Report, Transport};

/// A session's transport: host transport plus the device paths.
#[derive(Debug)]
pub(crate) struct SplitTransport {
    host: Arc<dyn Transport>,
    tcp: Arc<TcpTransport>,
    device: Option<Arc<dyn DeviceTransport>>,
    shared: Arc<Shared>,
    /// The peer's segment as last fetched (the session's view): where its
    /// device regions are, and their exports.
    segment: RwLock<Arc<Segment>>,
    /// Whether that segment has device regions (the fast path's check).
    remote_device: AtomicBool,
}

impl SplitTransport {
    /// Wraps `host`, the transport chosen by locality, for a session whose
    /// peer has `segment`.
    pub(crate) fn new(
        shared: &Arc<Shared>,
        host: Arc<dyn Transport>,
        tcp: Arc<TcpTransport>,
        segment: &Segment,
        same_process: bool,
        allow_device_transport: bool,
    ) -> SplitTransport {
        let device = match (&shared.device.runtime, allow_device_transport) {
            (Some(rt), true) => rt.peer_transport(&DevicePeer {
                name: tcp.peer_name(),
                segment,
                same_host: segment.host_id == shared.host_id,
                same_process,
                tcp: &tcp,
            }),
            _ => None,
        };
        SplitTransport {
            host,
            tcp,
            device,
            shared: Arc::clone(shared),
            remote_device: AtomicBool::new(segment.has_device_regions()),
            segment: RwLock::new(Arc::new(segment.clone())),
        }
    }
}

/// Where one slice goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Host,
    Device,
    /// Over the host transport, local side staged.
    StagedHost,
    /// Over tcp, the peer stages its side; the local side is staged when
    /// it is device memory.
    StagedTcp,
}

fn device_of(location: Location) -> Option<u32> {
    match location {
        Location::Npu(n) => Some(n),
        Location::Host => None,
    }
}

impl Transport for SplitTransport {
    fn name(&self) -> &'static str {
        self.host.name()
    }

    fn device_path(&self) -> Option<&'static str> {
        Some(self.device.as_ref().map_or("tcp", |d| d.name()))
    }

    fn fetch_segment(&self) -> Result<Segment> {
        let fresh = self.host.fetch_segment()?;
        if let Some(d) = &self.device {
            d.segment_changed(&fresh);
        }
        let mut cached = self.segment.write();
        self.remote_device
            .store(fresh.has_device_regions(), Ordering::Release);
        *cached = Arc::new(fresh.clone());
        Ok(fresh)
    }

    fn notify(&self, from: &str, message: &[u8], deadline: Instant) -> Result<()> {
        self.host.notify(from, message, deadline)
    }

    fn run(&self, job: &Job<'_>, report: Report<'_>) {
        if !self.shared.device.has_device_regions() && !self.remote_device.load(Ordering::Acquire) {
            return self.host.run(job, report);
        }
        let segment = Arc::clone(&self.segment.read());
        let n = job.slices.len();
        let mut routes = Vec::with_capacity(n);
        let mut local_devices = Vec::with_capacity(n);
        let mut regions: Vec<Option<(RegionDesc, RegionDesc)>> = Vec::with_capacity(n);
        for s in job.slices {
            // The plan pinned the local side; the segment is the one it was
            // planned against. An unknown remote range goes over tcp, where
            // the peer checks it.
            let local = self.shared.registry.pin(s.local, s.len).map(|p| p.desc());
            let remote = segment.find(s.remote, s.len).copied();
            let local_loc = local.map_or(Location::Host, |d| d.location);
            let remote_loc = remote.map(|d| d.location);
            let route = match (local_loc, remote_loc) {
                (Location::Host, Some(Location::Host)) => Route::Host,
                (_, Some(Location::Host)) => Route::StagedHost,
                (Location::Npu(_), Some(Location::Npu(_))) => match (&self.device, local, remote) {
                    (Some(d), Some(l), Some(r)) if d.accepts(&l, &r, segment.export(r.addr)) => {
                        Route::Device
                    }
                    _ => Route::StagedTcp,
                },
                _ => Route::StagedTcp,
            };
            routes.push(route);
            local_devices.push(device_of(local_loc));
            regions.push(local.zip(remote));
        }
        if routes.iter().all(|r| *r == Route::Host) {
            return self.host.run(job, report);
        }
        let out: Mutex<Vec<Option<Result<()>>>> = Mutex::new(vec![None; n]);
        let pick =
            |route: Route| -> Vec<usize> { (0..n).filter(|&i| routes[i] == route).collect() };

        let host = pick(Route::Host);
        staging::run_subset(
            &*self.host,
            job.opcode,
            job.slices,
            &host,
            job.deadline,
            &out,
        );

        // Device routes were only chosen with both regions known.
        let (device, slices): (Vec<usize>, Vec<DeviceSlice<'_>>) = (0..n)
            .filter(|&i| routes[i] == Route::Device)
            .filter_map(|i| {
                let (local, remote) = regions[i]?;
                let slice = DeviceSlice {
                    slice: job.slices[i],
                    local,
                    remote,
                    export: segment.export(remote.addr),
                };
                Some((i, slice))
            })
            .unzip();
        if let (Some(d), false) = (&self.device, device.is_empty()) {
            let dj = DeviceJob {
                opcode: job.opcode,
                slices: &slices,
                deadline: job.deadline,
            };
            d.run(&dj, &|j, r| {
                if let Some(&i) = device.get(j)
                    && let Some(slot) = out.lock().get_mut(i)
                {
                    slot.get_or_insert(r);
                }
            });
        }

        let pool = self.shared.device.pool.as_ref();
        for (route, via) in [
            (Route::StagedHost, &*self.host),
            (Route::StagedTcp, &*self.tcp as &dyn Transport),
        ] {
            let idx = pick(route);
            if idx.is_empty() {
                continue;
            }
            let slices: Vec<_> = idx.iter().map(|&i| job.slices[i]).collect();
            let devices: Vec<_> = idx.iter().map(|&i| local_devices[i]).collect();
            let sub: Mutex<Vec<Option<Result<()>>>> = Mutex::new(vec![None; idx.len()]);
            staging::run_staged(pool, via, job.opcode, &slices, &devices, job.deadline, &sub);
            let mut out = out.lock();
            for (k, r) in sub.into_inner().into_iter().enumerate() {
                if let (Some(slot), Some(r)) = (out.get_mut(idx[k]), r) {
                    slot.get_or_insert(r);
                }
            }
        }

        for (i, r) in out.into_inner().into_iter().enumerate() {
            report(
                i,
                r.unwrap_or_else(|| {
                    Err(Error::Internal {
                        what: format!("a {:?} slice was left unreported", routes[i]),
                    })
                }),
            );
        }
    }
}
