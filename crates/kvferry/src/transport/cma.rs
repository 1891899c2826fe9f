//! The `cma` transport: a peer on the same host (same boot id), host
//! memory. Bytes move with `process_vm_readv` / `process_vm_writev`, one
//! syscall per up to 1024 slices, large batches split over threads.
//!
//! The kernel lets us touch the peer's whole address space, so kvferry
//! brings the target's checks itself: before copying, it asks the target
//! (over the tcp control lane) to check and pin the ranges (a lease), and
//! releases the lease afterwards. The target's unregister waits for leases
//! like for any pin, so no byte moves into memory its owner may free.
//!
//! When the kernel refuses (EPERM: ptrace scope, containers), the
//! transport says so in the log and carries this peer over tcp from then on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::net::IOV_MAX;
use crate::plan::{Opcode, Slice};
use crate::segment::Segment;
use crate::transport::tcp::TcpTransport;
use crate::transport::{Job, Report, Transport};
use crate::wire;

/// Batches at least this large are split over threads.
const PARALLEL_MIN_BYTES: u64 = 8 << 20;
const THREADS: usize = 2;

#[derive(Debug)]
pub struct CmaTransport {
    tcp: Arc<TcpTransport>,
    pid: libc::pid_t,
    /// Set once the kernel refused: tcp carries everything afterwards.
    refused: AtomicBool,
}

enum Outcome {
    Done,
    /// EPERM before any byte moved: fall back to tcp.
    Refused(std::io::Error),
}

impl CmaTransport {
    pub fn new(tcp: Arc<TcpTransport>, pid: u32) -> CmaTransport {
        CmaTransport {
            tcp,
            pid: pid as libc::pid_t,
            refused: AtomicBool::new(false),
        }
    }

    fn copy(
        &self,
        opcode: Opcode,
        slices: &[Slice],
        first: usize,
        deadline: Instant,
        report: Report<'_>,
    ) -> Outcome {
        let peer = self.tcp.peer_name();
        let mut idx = 0usize;
        let mut off = 0u64;
        let mut moved_any = false;
        let mut local: Vec<libc::iovec> = Vec::with_capacity(IOV_MAX.min(slices.len()));
        let mut remote: Vec<libc::iovec> = Vec::with_capacity(IOV_MAX.min(slices.len()));
        while idx < slices.len() {
            if Instant::now() >= deadline {
                let e = Error::Timeout {
                    what: format!("cma transfer with {peer}"),
                    ms: 0,
                };
                (idx..slices.len()).for_each(|i| report(first + i, Err(e.clone())));
                return Outcome::Done;
            }
            local.clear();
            remote.clear();
            for (k, s) in slices[idx..].iter().take(IOV_MAX).enumerate() {
                let skip = if k == 0 { off } else { 0 };
                local.push(libc::iovec {
                    iov_base: (s.local + skip) as *mut libc::c_void,
                    iov_len: (s.len - skip) as usize,
                });
                remote.push(libc::iovec {
                    iov_base: (s.remote + skip) as *mut libc::c_void,
                    iov_len: (s.len - skip) as usize,
                });
            }
            let n = local.len() as libc::c_ulong;
            // SAFETY: local iovecs lie in regions the plan pinned for the
            // job; remote iovecs lie in ranges the target checked and
            // pinned under our lease. The kernel validates the remote side
            // against the peer's mappings and never faults us.
            let got = unsafe {
                match opcode {
                    Opcode::Read => {
                        libc::process_vm_readv(self.pid, local.as_ptr(), n, remote.as_ptr(), n, 0)
                    }
                    Opcode::Write => {
                        libc::process_vm_writev(self.pid, local.as_ptr(), n, remote.as_ptr(), n, 0)
                    }
                }
            };
            if got <= 0 {
                let err = std::io::Error::last_os_error();
                if got < 0 && err.raw_os_error() == Some(libc::EPERM) && !moved_any {
                    return Outcome::Refused(err);
                }
                if got < 0 && err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                let e = Error::TransferFailed {
                    peer: peer.to_owned(),
                    reason: format!(
                        "process_vm_{}v: {err}",
                        if opcode == Opcode::Read {
                            "read"
                        } else {
                            "write"
                        }
                    ),
                };
                (idx..slices.len()).for_each(|i| report(first + i, Err(e.clone())));
                return Outcome::Done;
            }
            moved_any = true;
            let mut n = got as u64;
            while n > 0 && idx < slices.len() {
                let rest = slices[idx].len - off;
                if n >= rest {
                    n -= rest;
                    report(first + idx, Ok(()));
                    idx += 1;
                    off = 0;
                } else {
                    off += n;
                    n = 0;
                }
            }
        }
        Outcome::Done
    }

    /// Pins the job's remote ranges at the target; returns the leases as
    /// (lane, lease id): a lease lives on the connection that took it.
    fn lease(&self, job: &Job<'_>) -> Result<Vec<(usize, u64)>> {
        let ranges: Vec<wire::Range> = job
            .slices
            .iter()
            .map(|s| wire::Range {
                addr: s.remote,
                len: s.len,
            })
            .collect();
        let mut leases = Vec::new();
        for chunk in ranges.chunks(wire::MAX_ENTRIES) {
            let instance = self.tcp.instance();
            let r = self.tcp.with_free_lane(|lane, c| {
                c.pin(self.tcp.peer_name(), instance, chunk, job.deadline)
                    .map(|id| (lane, id))
            });
            match r {
                Ok(id) => leases.push(id),
                Err(e) => {
                    self.release(&leases);
                    return Err(e);
                }
            }
        }
        Ok(leases)
    }

    fn release(&self, leases: &[(usize, u64)]) {
        for &(lane, l) in leases {
            if let Err(e) = self
                .tcp
                .with_lane(lane, |c| c.unpin(self.tcp.peer_name(), l))
            {
                // The target drops a connection's leases when it closes.
                log::debug!(
                    "kvferry: releasing cma lease {l} at {}: {e}",
                    self.tcp.peer_name()
                );
            }
        }
    }
}

impl Transport for CmaTransport {
    fn name(&self) -> &'static str {
        if self.refused.load(Ordering::Relaxed) {
            "tcp"
        } else {
            "cma"
        }
    }

    fn fetch_segment(&self) -> Result<Segment> {
        self.tcp.fetch_segment()
    }

    fn notify(&self, from: &str, message: &[u8], deadline: Instant) -> Result<()> {
        self.tcp.notify(from, message, deadline)
    }

    fn run(&self, job: &Job<'_>, report: Report<'_>) {
        if self.refused.load(Ordering::Relaxed) {
            return self.tcp.run(job, report);
        }
        let leases = match self.lease(job) {
            Ok(l) => l,
            Err(e) => {
                (0..job.slices.len()).for_each(|i| report(i, Err(e.clone())));
                return;
            }
        };
        let total: u64 = job.slices.iter().map(|s| s.len).sum();
        let parts = if total >= PARALLEL_MIN_BYTES && job.slices.len() >= THREADS {
            split_by_bytes(job.slices, THREADS)
        } else {
            vec![(0, job.slices.len())]
        };
        // Each part reports its own slices; a part the kernel refused has
        // reported none and goes over tcp below.
        let refused: Vec<(usize, usize, std::io::Error)> = std::thread::scope(|scope| {
            let handles: Vec<_> = parts[1..]
                .iter()
                .map(|&(a, b)| {
                    scope.spawn(move || {
                        (
                            a,
                            b,
                            self.copy(job.opcode, &job.slices[a..b], a, job.deadline, report),
                        )
                    })
                })
                .collect();
            let (a0, b0) = parts[0];
            let mut outcomes = vec![(
                a0,
                b0,
                self.copy(job.opcode, &job.slices[a0..b0], a0, job.deadline, report),
            )];
            outcomes.extend(handles.into_iter().filter_map(|h| h.join().ok()));
            outcomes
                .into_iter()
                .filter_map(|(a, b, o)| match o {
                    Outcome::Refused(e) => Some((a, b, e)),
                    Outcome::Done => None,
                })
                .collect()
        });
        self.release(&leases);
        for (a, b, err) in refused {
            if !self.refused.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "kvferry: the kernel refused cross-memory attach to {} (pid {}): {err}; using tcp for this peer",
                    self.tcp.peer_name(),
                    self.pid
                );
            }
            let sub = Job {
                opcode: job.opcode,
                slices: &job.slices[a..b],
                deadline: job.deadline,
            };
            self.tcp.run(&sub, &|i, r| report(a + i, r));
        }
    }
}

/// Cuts `slices` into up to `parts` contiguous ranges of about equal bytes.
fn split_by_bytes(slices: &[Slice], parts: usize) -> Vec<(usize, usize)> {
    let total: u64 = slices.iter().map(|s| s.len).sum();
    let mut out = Vec::with_capacity(parts);
    let (mut start, mut acc) = (0usize, 0u64);
    for (i, s) in slices.iter().enumerate() {
        acc += s.len;
        let target = total * (out.len() as u64 + 1) / parts as u64;
        if acc >= target && out.len() + 1 < parts && i + 1 < slices.len() {
            out.push((start, i + 1));
            start = i + 1;
        }
    }
    out.push((start, slices.len()));
    out
}
