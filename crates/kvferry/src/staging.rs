//! Staging device memory through pinned host buffers, for tcp.
//!
//! Sockets read and write host memory; device memory is not host memory. So
//! a slice whose local side is device memory is copied into (WRITE) or out
//! of (READ) a pinned bounce buffer around the host transport, and a target
//! serving a READ or WRITE of its own device regions does the same around
//! the socket. Both sides take their buffers from the engine's
//! [`StagingPool`] (`ASCEND_BUFFER_POOL` = `count:MiB`, Mooncake's meaning).
//!
//! A buffer is a guard: it goes back to the pool when dropped, on every path
//! out, errors and panics included.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::config::StagingPoolSize;
use crate::device::{CopyDirection, CopyRange, DeviceRuntime, PinnedBuffer, StagingStats};
use crate::engine::Shared;
use crate::error::{Error, Result};
use crate::memory::{Location, Pin};
use crate::net::{self, RawRange};
use crate::plan::{Opcode, Slice};
use crate::transport::{Job, Transport};
use crate::wire::{self, FrameHeader, Kind, Range};

#[derive(Debug, Default)]
struct PoolState {
    free: Vec<Box<dyn PinnedBuffer>>,
    allocated: usize,
}

/// Pinned host buffers, allocated on first use up to the configured count
/// and kept for reuse until the engine is dropped.
#[derive(Debug)]
pub struct StagingPool {
    runtime: Arc<dyn DeviceRuntime>,
    size: StagingPoolSize,
    state: Mutex<PoolState>,
    returned: Condvar,
}

/// A buffer taken from the pool; returned to it when dropped.
#[derive(Debug)]
pub struct StagingBuffer<'a> {
    pool: &'a StagingPool,
    buffer: Option<Box<dyn PinnedBuffer>>,
}

impl StagingBuffer<'_> {
    pub fn addr(&self) -> u64 {
        self.buffer.as_ref().map_or(0, |b| b.addr())
    }
}

impl Drop for StagingBuffer<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.buffer.take() {
            self.pool.state.lock().free.push(b);
            self.pool.returned.notify_one();
        }
    }
}

impl StagingPool {
    pub(crate) fn new(runtime: Arc<dyn DeviceRuntime>, size: StagingPoolSize) -> Self {
        StagingPool {
            runtime,
            size,
            state: Mutex::new(PoolState::default()),
            returned: Condvar::new(),
        }
    }

    pub fn runtime(&self) -> &Arc<dyn DeviceRuntime> {
        &self.runtime
    }

    pub fn buffer_bytes(&self) -> u64 {
        self.size.buffer_bytes
    }

    pub fn stats(&self) -> StagingStats {
        let s = self.state.lock();
        StagingStats {
            allocated: s.allocated,
            in_use: s.allocated - s.free.len(),
            capacity: self.size.count,
            buffer_bytes: self.size.buffer_bytes,
        }
    }

    /// A free buffer, allocating one while fewer than `count` exist, else
    /// waiting for one until `deadline`.
    pub fn acquire(&self, deadline: Instant) -> Result<StagingBuffer<'_>> {
        let waited_from = Instant::now();
        let mut s = self.state.lock();
        loop {
            if let Some(b) = s.free.pop() {
                return Ok(StagingBuffer {
                    pool: self,
                    buffer: Some(b),
                });
            }
            if s.allocated < self.size.count {
                s.allocated += 1;
                drop(s);
                return match self.runtime.alloc_pinned(self.size.buffer_bytes) {
                    Ok(b) => Ok(StagingBuffer {
                        pool: self,
                        buffer: Some(b),
                    }),
                    Err(e) => {
                        self.state.lock().allocated -= 1;
                        Err(e)
                    }
                };
            }
            if self.returned.wait_until(&mut s, deadline).timed_out() && s.free.is_empty() {
                return Err(Error::Timeout {
                    what: format!(
                        "waiting for a staging buffer (all {} of the pool are in use; ASCEND_BUFFER_POOL=count:MiB sets the pool)",
                        self.size.count
                    ),
                    ms: deadline.saturating_duration_since(waited_from).as_millis() as u64,
                });
            }
        }
    }

    /// Runs `copies` (device, range) grouped by device.
    fn copy(
        &self,
        direction: CopyDirection,
        copies: &[(u32, CopyRange)],
        deadline: Instant,
    ) -> Result<()> {
        let mut devices: Vec<u32> = copies.iter().map(|c| c.0).collect();
        devices.sort_unstable();
        devices.dedup();
        for d in devices {
            let ranges: Vec<CopyRange> = copies.iter().filter(|c| c.0 == d).map(|c| c.1).collect();
            self.runtime.copy(d, direction, &ranges, deadline)?;
        }
        Ok(())
    }
}

/// Runs `slices[i]` for every `i` of `indices` on `t`, as one job; the
/// outcome of each lands in `out[i]`.
pub(crate) fn run_subset(
    t: &dyn Transport,
    opcode: Opcode,
    slices: &[Slice],
    indices: &[usize],
    deadline: Instant,
    out: &Mutex<Vec<Option<Result<()>>>>,
) {
    if indices.is_empty() {
        return;
    }
    let sub: Vec<Slice> = indices.iter().map(|&i| slices[i]).collect();
    let job = Job {
        opcode,
        slices: &sub,
        deadline,
    };
    t.run(&job, &|j, r| {
        if let Some(&i) = indices.get(j)
            && let Some(slot) = out.lock().get_mut(i)
        {
            slot.get_or_insert(r);
        }
    });
}

/// A piece of a slice small enough for one staging buffer.
#[derive(Debug, Clone, Copy)]
struct Piece {
    slice: usize,
    offset: u64,
    len: u64,
    device: u32,
}

/// Initiator side: runs `slices` on `via`, staging the local side of every
/// slice whose `devices[i]` is `Some` (device memory) through `pool`.
/// Every slice's outcome lands in `out`.
pub(crate) fn run_staged(
    pool: Option<&StagingPool>,
    via: &dyn Transport,
    opcode: Opcode,
    slices: &[Slice],
    devices: &[Option<u32>],
    deadline: Instant,
    out: &Mutex<Vec<Option<Result<()>>>>,
) {
    let direct: Vec<usize> = (0..slices.len())
        .filter(|&i| devices[i].is_none())
        .collect();
    run_subset(via, opcode, slices, &direct, deadline, out);
    let fail = |i: usize, e: &Error| {
        if let Some(slot) = out.lock().get_mut(i) {
            slot.get_or_insert(Err(e.clone()));
        }
    };
    let staged: Vec<usize> = (0..slices.len())
        .filter(|&i| devices[i].is_some())
        .collect();
    if staged.is_empty() {
        return;
    }
    let Some(pool) = pool else {
        let e = Error::Internal {
            what: "device memory to stage, but the engine has no device runtime".into(),
        };
        staged.iter().for_each(|&i| fail(i, &e));
        return;
    };
    stage_all(pool, via, opcode, slices, &staged, devices, deadline, &fail);
    // Every piece of the others went through without an error.
    let mut out = out.lock();
    for &i in &staged {
        if let Some(slot) = out.get_mut(i) {
            slot.get_or_insert(Ok(()));
        }
    }
}

/// The staged slices of [`run_staged`], a buffer's worth at a time;
/// failures go to `fail`.
#[expect(
    clippy::too_many_arguments,
    reason = "the body of run_staged, split out for its early returns"
)]
fn stage_all(
    pool: &StagingPool,
    via: &dyn Transport,
    opcode: Opcode,
    slices: &[Slice],
    staged: &[usize],
    devices: &[Option<u32>],
    deadline: Instant,
    fail: &dyn Fn(usize, &Error),
) {
    let cap = pool.buffer_bytes();
    let mut pieces: Vec<Piece> = Vec::new();
    for &i in staged {
        let device = devices[i].unwrap_or(0);
        let mut offset = 0;
        while offset < slices[i].len {
            let len = (slices[i].len - offset).min(cap);
            pieces.push(Piece {
                slice: i,
                offset,
                len,
                device,
            });
            offset += len;
        }
    }
    let mut k = 0;
    while k < pieces.len() {
        let buffer = match pool.acquire(deadline) {
            Ok(b) => b,
            Err(e) => {
                pieces[k..].iter().for_each(|p| fail(p.slice, &e));
                return;
            }
        };
        let start = k;
        let mut used = 0;
        while k < pieces.len() && used + pieces[k].len <= cap {
            used += pieces[k].len;
            k += 1;
        }
        stage_round(
            pool,
            via,
            opcode,
            slices,
            &pieces[start..k],
            buffer.addr(),
            deadline,
            fail,
        );
        drop(buffer);
    }
}

/// One buffer's worth of pieces: device -> buffer, the network, buffer ->
/// device. A piece that fails at any step fails its slice.
#[expect(
    clippy::too_many_arguments,
    reason = "one round of run_staged, split out for reading"
)]
fn stage_round(
    pool: &StagingPool,
    via: &dyn Transport,
    opcode: Opcode,
    slices: &[Slice],
    round: &[Piece],
    base: u64,
    deadline: Instant,
    fail: &dyn Fn(usize, &Error),
) {
    let mut offsets = Vec::with_capacity(round.len());
    let mut at = base;
    for p in round {
        offsets.push(at);
        at += p.len;
    }
    let mut ok = vec![true; round.len()];
    // Copies of one device succeed or fail together.
    let copy = |direction: CopyDirection, ok: &mut Vec<bool>| {
        let mut devices: Vec<u32> = round
            .iter()
            .zip(ok.iter())
            .filter(|(_, ok)| **ok)
            .map(|(p, _)| p.device)
            .collect();
        devices.sort_unstable();
        devices.dedup();
        for d in devices {
            let members: Vec<usize> = (0..round.len())
                .filter(|&j| ok[j] && round[j].device == d)
                .collect();
            let ranges: Vec<(u32, CopyRange)> = members
                .iter()
                .map(|&j| {
                    let device_addr = slices[round[j].slice].local + round[j].offset;
                    let range = match direction {
                        CopyDirection::DeviceToHost => CopyRange {
                            dst: offsets[j],
                            src: device_addr,
                            len: round[j].len,
                        },
                        CopyDirection::HostToDevice => CopyRange {
                            dst: device_addr,
                            src: offsets[j],
                            len: round[j].len,
                        },
                    };
                    (d, range)
                })
                .collect();
            if let Err(e) = pool.copy(direction, &ranges, deadline) {
                for &j in &members {
                    ok[j] = false;
                    fail(round[j].slice, &e);
                }
            }
        }
    };
    if opcode == Opcode::Write {
        copy(CopyDirection::DeviceToHost, &mut ok);
    }
    let live: Vec<usize> = (0..round.len()).filter(|&j| ok[j]).collect();
    let sub: Vec<Slice> = live
        .iter()
        .map(|&j| {
            let s = slices[round[j].slice];
            Slice {
                local: offsets[j],
                remote: s.remote + round[j].offset,
                len: round[j].len,
                first_op: s.first_op,
                last_op: s.last_op,
            }
        })
        .collect();
    if !sub.is_empty() {
        let results: Mutex<Vec<Option<Result<()>>>> = Mutex::new(vec![None; sub.len()]);
        let job = Job {
            opcode,
            slices: &sub,
            deadline,
        };
        via.run(&job, &|j, r| {
            if let Some(slot) = results.lock().get_mut(j) {
                slot.get_or_insert(r);
            }
        });
        for (n, r) in results.into_inner().into_iter().enumerate() {
            let j = live[n];
            let r = r.unwrap_or_else(|| {
                Err(Error::Internal {
                    what: format!(
                        "the {} transport left a staged slice unreported",
                        via.name()
                    ),
                })
            });
            if let Err(e) = r {
                ok[j] = false;
                fail(round[j].slice, &e);
            }
        }
    }
    if opcode == Opcode::Read {
        copy(CopyDirection::HostToDevice, &mut ok);
    }
}

// ---- target side -------------------------------------------------------

/// Serves a READ or WRITE whose ranges touch this engine's device regions,
/// staging them through the pool; host ranges of the same request move
/// straight as usual. `None` when no range is device memory: the caller
/// serves the request itself. `Some(Ok)` when the request was answered (data
/// and ack, or an ERROR frame) and the connection is in step; `Some(Err)`
/// when it must close (a failure after part of a READ's data went out).
/// Everything, the device copies too, is done by `deadline` (the frame's).
pub(crate) fn serve(
    shared: &Shared,
    stream: &mut net::Stream,
    deadline: Instant,
    kind: Kind,
    rid: u64,
    ranges: &[Range],
    pins: &[Pin],
) -> Option<io::Result<()>> {
    if !matches!(kind, Kind::Read | Kind::Write)
        || pins.iter().all(|p| p.desc().location == Location::Host)
    {
        return None;
    }
    let devices: Vec<Option<u32>> = ranges
        .iter()
        .map(|r| {
            let pin = pins.iter().find(|p| p.desc().contains(r.addr, r.len))?;
            match pin.desc().location {
                Location::Npu(n) => Some(n),
                Location::Host => None,
            }
        })
        .collect();
    let data: u64 = ranges.iter().map(|r| r.len).sum();
    let Some(pool) = shared.device.pool.as_ref() else {
        let e = Error::Internal {
            what: "device regions without a device runtime".into(),
        };
        return Some(answer_error(stream, deadline, kind, rid, data, &e));
    };
    let mut stager = TargetStager {
        pool,
        stream,
        rid,
        deadline,
        buffer: None,
        used: 0,
        out: Vec::new(),
        copies: Vec::new(),
        header_sent: false,
        failure: None,
        left: data,
        total: data,
    };
    Some(match kind {
        Kind::Read => stager.read(ranges, &devices),
        _ => stager.write(ranges, &devices),
    })
}

/// Sends an ERROR frame for a request, draining a WRITE's `data` first so
/// the stream stays in step.
fn answer_error(
    stream: &mut net::Stream,
    deadline: Instant,
    kind: Kind,
    rid: u64,
    data: u64,
    e: &Error,
) -> io::Result<()> {
    if kind == Kind::Write {
        stream.discard(data, deadline)?;
    }
    let (h, msg) = wire::error_frame(rid, e.status(), &e.to_string());
    stream.write_frame(&h, &[&msg], deadline)
}

/// The target's staging of one request: host ranges and pieces of device
/// ranges in stream order; device pieces go through one pool buffer, which
/// is flushed whenever it is full.
struct TargetStager<'a> {
    pool: &'a StagingPool,
    stream: &'a mut net::Stream,
    rid: u64,
    deadline: Instant,
    buffer: Option<StagingBuffer<'a>>,
    used: u64,
    /// Where the next bytes of the stream go to (WRITE) or come from (READ).
    out: Vec<RawRange>,
    /// Device copies for the buffered pieces.
    copies: Vec<(u32, CopyRange)>,
    header_sent: bool,
    /// WRITE: the first failure; the rest of the data is drained.
    failure: Option<Error>,
    /// WRITE: data bytes not yet taken off the stream.
    left: u64,
    /// The request's data bytes.
    total: u64,
}

impl TargetStager<'_> {
    /// Lays out `ranges` in pieces, calling `flush` whenever the buffer is
    /// full and once at the end.
    fn walk(
        &mut self,
        ranges: &[Range],
        devices: &[Option<u32>],
        direction: CopyDirection,
        flush: fn(&mut Self) -> io::Result<()>,
    ) -> io::Result<()> {
        let cap = self.pool.buffer_bytes();
        for (r, dev) in ranges.iter().zip(devices) {
            let Some(d) = *dev else {
                self.out.push(RawRange {
                    addr: r.addr,
                    len: r.len,
                });
                continue;
            };
            let mut offset = 0;
            while offset < r.len {
                if self.used == cap {
                    flush(self)?;
                }
                if self.buffer.is_none() {
                    match self.pool.acquire(self.deadline) {
                        Ok(b) => self.buffer = Some(b),
                        Err(e) => return self.fail(e),
                    }
                }
                let base = self.buffer.as_ref().map_or(0, StagingBuffer::addr) + self.used;
                let len = (r.len - offset).min(cap - self.used);
                let device_addr = r.addr + offset;
                let range = match direction {
                    CopyDirection::DeviceToHost => CopyRange {
                        dst: base,
                        src: device_addr,
                        len,
                    },
                    CopyDirection::HostToDevice => CopyRange {
                        dst: device_addr,
                        src: base,
                        len,
                    },
                };
                self.copies.push((d, range));
                self.out.push(RawRange { addr: base, len });
                self.used += len;
                offset += len;
            }
        }
        flush(self)
    }

    /// A staging failure, carried out of `walk` to `read` / `write`: a READ
    /// answers with an ERROR frame if no data went out yet (else the
    /// connection closes); a WRITE drains the rest of its data, then answers
    /// with the error.
    fn fail(&mut self, e: Error) -> io::Result<()> {
        Err(io::Error::other(StagingFailed(e)))
    }

    fn read(&mut self, ranges: &[Range], devices: &[Option<u32>]) -> io::Result<()> {
        let r = self.walk(
            ranges,
            devices,
            CopyDirection::DeviceToHost,
            Self::flush_read,
        );
        // The buffer goes back before the answer, so whoever sees the
        // answer sees the pool whole.
        self.buffer = None;
        match r {
            Err(e) if !self.header_sent => match staging_error(&e) {
                Some(err) => {
                    let (h, msg) = wire::error_frame(self.rid, err.status(), &err.to_string());
                    self.stream.write_frame(&h, &[&msg], self.deadline)
                }
                None => Err(e),
            },
            Err(e) => {
                log::warn!(
                    "kvferry: a staged READ of {} bytes failed after its reply started; closing the connection: {e}",
                    self.total
                );
                Err(e)
            }
            Ok(()) => Ok(()),
        }
    }

    fn flush_read(&mut self) -> io::Result<()> {
        if let Err(e) = self
            .pool
            .copy(CopyDirection::DeviceToHost, &self.copies, self.deadline)
        {
            return self.fail(e);
        }
        // The header announces the whole reply; it goes out with the first
        // buffer, once that buffer's copies succeeded.
        let header = FrameHeader::new(Kind::ReadData, self.rid, self.total);
        let header_bytes: &[u8] = bytemuck::bytes_of(&header);
        let head: &[&[u8]] = if self.header_sent {
            &[]
        } else {
            std::slice::from_ref(&header_bytes)
        };
        // SAFETY: every range is inside a region pinned for the request
        // (host ranges) or inside the pool buffer this stager holds, which
        // the copies above filled.
        unsafe { self.stream.send_ranges(head, &self.out, self.deadline) }?;
        self.header_sent = true;
        self.out.clear();
        self.copies.clear();
        self.used = 0;
        Ok(())
    }

    fn write(&mut self, ranges: &[Range], devices: &[Option<u32>]) -> io::Result<()> {
        let r = self.walk(
            ranges,
            devices,
            CopyDirection::HostToDevice,
            Self::flush_write,
        );
        if let Err(e) = r {
            match staging_error(&e) {
                Some(err) => {
                    self.failure.get_or_insert(err);
                }
                None => return Err(e),
            }
        }
        self.stream.discard(self.left, self.deadline)?;
        self.buffer = None;
        match self.failure.take() {
            Some(e) => {
                let (h, msg) = wire::error_frame(self.rid, e.status(), &e.to_string());
                self.stream.write_frame(&h, &[&msg], self.deadline)
            }
            None => self.stream.write_frame(
                &FrameHeader::new(Kind::WriteAck, self.rid, 0),
                &[],
                self.deadline,
            ),
        }
    }

    fn flush_write(&mut self) -> io::Result<()> {
        let bytes: u64 = self.out.iter().map(|r| r.len).sum();
        if self.failure.is_none() {
            // SAFETY: every range is inside a region pinned for the request
            // (host ranges) or inside the pool buffer this stager holds.
            unsafe { self.stream.recv_ranges(&self.out, self.deadline) }?;
            self.left -= bytes;
            if let Err(e) = self
                .pool
                .copy(CopyDirection::HostToDevice, &self.copies, self.deadline)
            {
                self.failure = Some(e);
            }
        }
        self.out.clear();
        self.copies.clear();
        self.used = 0;
        Ok(())
    }
}

/// A staging failure carried through `io::Error` to where it is answered.
#[derive(Debug)]
struct StagingFailed(Error);

impl std::fmt::Display for StagingFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "staging failed: {}", self.0)
    }
}

impl std::error::Error for StagingFailed {}

fn staging_error(e: &io::Error) -> Option<Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<StagingFailed>())
        .map(|s| s.0.clone())
}
