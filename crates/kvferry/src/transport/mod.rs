//! The transport interface and the transports of the core crate.
//!
//! A [`Transport`] is one way of reaching one peer: the engine creates one per
//! session (peer), picks it by locality and memory kind, and hands it plans.
//! The tcp, cma and Ascend transports implement the same trait.

use std::fmt;
use std::time::Instant;

use crate::error::Result;
use crate::plan::{Opcode, Slice};
use crate::segment::Segment;

pub mod cma;
pub mod local;
pub(crate) mod split;
pub mod tcp;

/// Work handed to a transport: every slice of one plan, in one direction.
#[derive(Debug)]
pub struct Job<'a> {
    pub opcode: Opcode,
    pub slices: &'a [Slice],
    /// Slices not finished by then fail with `Timeout`.
    pub deadline: Instant,
}

/// How outcomes come back: `report(slice_index, result)`, exactly once per
/// slice, from any thread.
pub type Report<'a> = &'a (dyn Fn(usize, Result<()>) + Sync);

/// One way of moving bytes between this engine and one peer.
pub trait Transport: Send + Sync + fmt::Debug {
    /// Short name for logs and reports: "local", "cma", "tcp", ...
    fn name(&self) -> &'static str;

    /// The peer's current segment (what remote addresses are checked against).
    fn fetch_segment(&self) -> Result<Segment>;

    /// Delivers a notification from engine `from` to the peer, returning
    /// once the peer has queued it.
    fn notify(&self, from: &str, message: &[u8], deadline: Instant) -> Result<()>;

    /// Carries out `job`. Returns when every slice has been reported. The
    /// local side of every slice is validated and pinned by the caller; the
    /// transport (or the target) checks the remote side against the peer's
    /// live registry before touching it.
    fn run(&self, job: &Job<'_>, report: Report<'_>);

    /// What carries slices that touch device memory: `Some("ascend-ipc")`,
    /// `Some("tcp")` (staged), or `None` for a transport that does not
    /// split by memory kind.
    fn device_path(&self) -> Option<&'static str> {
        None
    }
}
