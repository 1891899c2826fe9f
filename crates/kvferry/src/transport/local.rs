//! The `local` transport: both engines live in this process, so an op is a
//! memory copy between their registered regions.

use std::sync::{Arc, Weak};

use crate::engine::Shared;
use crate::error::{Error, Result};
use crate::plan::Opcode;
use crate::segment::Segment;
use crate::transport::{Job, Report, Transport};

/// Reaches a peer engine of this process.
#[derive(Debug)]
pub struct LocalTransport {
    peer: Weak<Shared>,
    peer_name: String,
}

impl LocalTransport {
    pub(crate) fn new(peer: &Arc<Shared>) -> Self {
        LocalTransport {
            peer: Arc::downgrade(peer),
            peer_name: peer.name.clone(),
        }
    }

    /// The peer, or `PeerRestarted` when it was shut down: the engine then
    /// resolves the session again and finds whoever listens there now.
    fn peer(&self) -> Result<Arc<Shared>> {
        self.peer.upgrade().ok_or_else(|| Error::PeerRestarted {
            peer: self.peer_name.clone(),
            detail: "the engine was shut down".into(),
        })
    }
}

impl Transport for LocalTransport {
    fn name(&self) -> &'static str {
        "local"
    }

    fn fetch_segment(&self) -> Result<Segment> {
        Ok(self.peer()?.segment())
    }

    fn notify(&self, from: &str, message: &[u8], _deadline: std::time::Instant) -> Result<()> {
        self.peer()?
            .push_notification(from.to_owned(), message.to_vec())
    }

    fn run(&self, job: &Job<'_>, report: Report<'_>) {
        let peer = match self.peer() {
            Ok(p) => p,
            Err(e) => {
                for i in 0..job.slices.len() {
                    report(i, Err(e.clone()));
                }
                return;
            }
        };
        // Pin every remote range before copying anything: the peer's
        // registry is the truth (it may have unregistered since our segment
        // was cached), and a refused batch must not have moved any byte.
        let mut pins = Vec::with_capacity(job.slices.len().min(64));
        for s in job.slices {
            if pins
                .last()
                .is_some_and(|p: &crate::memory::Pin| p.desc().contains(s.remote, s.len))
            {
                continue;
            }
            match peer.registry.pin(s.remote, s.len) {
                Some(p) => pins.push(p),
                None => {
                    let e = Error::RemoteOutOfRange {
                        index: s.first_op as usize,
                        peer: self.peer_name.clone(),
                        addr: s.remote,
                        len: s.len,
                    };
                    (0..job.slices.len()).for_each(|i| report(i, Err(e.clone())));
                    return;
                }
            }
        }
        for (i, s) in job.slices.iter().enumerate() {
            let (src, dst) = match job.opcode {
                Opcode::Read => (s.remote, s.local),
                Opcode::Write => (s.local, s.remote),
            };
            // SAFETY: both ranges lie inside registered regions pinned for
            // the duration of the copy (local by the plan, remote in `pins`
            // above); their owners promised at registration that the memory
            // is valid until unregistered, and unregistering waits for pins.
            // The ranges may overlap when both engines registered the same
            // memory, hence `copy` (memmove), not `copy_nonoverlapping`.
            unsafe {
                std::ptr::copy(src as *const u8, dst as *mut u8, s.len as usize);
            }
            report(i, Ok(()));
        }
    }
}
