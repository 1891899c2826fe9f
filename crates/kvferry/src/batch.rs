//! Batches: progress of one submitted set of ops, and the table that hands
//! out their ids.
//!
//! A batch id is a generational handle `(generation << 32) | (slot + 1)`: it
//! is never 0 (Mooncake's failure value), and a freed or made-up id is
//! refused instead of being dereferenced.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::plan::Slice;
use crate::spin;

/// An opaque batch handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BatchId(pub u64);

/// Where one op of a batch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpState {
    Pending,
    Done,
    Failed,
}

/// Where a whole batch stands.
#[derive(Debug, Clone)]
pub enum BatchState {
    InProgress,
    Done,
    /// The first error any slice hit. Never `Error::Timeout`: a batch that
    /// a timeout ended failed with `Error::TransferTimeout`, so that a
    /// caller can tell it from a wait that ran out while the batch goes on.
    Failed(Error),
}

/// The error a batch records for `e`: a timeout that ended it becomes
/// `TransferTimeout` (`Timeout` is kept for waits that ran out).
fn ended_by(e: Error) -> Error {
    match e {
        Error::Timeout { what, ms } => Error::TransferTimeout { what, ms },
        other => other,
    }
}

#[derive(Debug)]
struct Progress {
    op_failed: Vec<bool>,
    slices_left: usize,
    first_error: Option<Error>,
}

/// The progress of one batch; shared by its submitter and whoever runs it.
#[derive(Debug)]
pub struct Batch {
    progress: Mutex<Progress>,
    finished: Condvar,
    /// Set with `finished`'s notification: what a waiter polls before it
    /// sleeps on the condvar (no lock taken).
    ended: AtomicBool,
}

impl Batch {
    pub fn new(num_ops: usize, num_slices: usize) -> Self {
        Batch {
            progress: Mutex::new(Progress {
                op_failed: vec![false; num_ops],
                slices_left: num_slices,
                first_error: None,
            }),
            finished: Condvar::new(),
            ended: AtomicBool::new(num_slices == 0),
        }
    }

    /// Records the outcome of one slice. Called once per slice.
    pub fn complete_slice(&self, slice: &Slice, result: Result<()>) {
        let mut p = self.progress.lock();
        if p.slices_left == 0 {
            return; // already failed as a whole (see fail_all)
        }
        if let Err(e) = result {
            for i in slice.first_op..=slice.last_op {
                if let Some(f) = p.op_failed.get_mut(i as usize) {
                    *f = true;
                }
            }
            p.first_error.get_or_insert_with(|| ended_by(e));
        }
        p.slices_left -= 1;
        if p.slices_left == 0 {
            self.ended.store(true, Ordering::Release);
            self.finished.notify_all();
        }
    }

    /// Fails every op not yet reported (the runner died or the batch could
    /// not be started).
    pub fn fail_all(&self, e: Error) {
        let mut p = self.progress.lock();
        if p.slices_left == 0 {
            return;
        }
        p.op_failed.iter_mut().for_each(|f| *f = true);
        p.first_error.get_or_insert_with(|| ended_by(e));
        p.slices_left = 0;
        self.ended.store(true, Ordering::Release);
        self.finished.notify_all();
    }

    pub fn state(&self) -> BatchState {
        let p = self.progress.lock();
        Self::state_of(&p)
    }

    fn state_of(p: &Progress) -> BatchState {
        match (&p.first_error, p.slices_left) {
            (_, n) if n > 0 => BatchState::InProgress,
            (Some(e), _) => BatchState::Failed(e.clone()),
            (None, _) => BatchState::Done,
        }
    }

    pub fn op_state(&self, index: usize) -> Option<OpState> {
        let p = self.progress.lock();
        let failed = *p.op_failed.get(index)?;
        Some(match (failed, p.slices_left) {
            (true, _) => OpState::Failed,
            (false, 0) => OpState::Done,
            (false, _) => OpState::Pending,
        })
    }

    /// Waits until the batch ends or `timeout` passes: `Ok` when all ops are
    /// done, the first error when one failed, `Timeout` when still running
    /// (and only then: see [`BatchState::Failed`]).
    pub fn wait(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now().checked_add(timeout);
        // A batch about to end: poll rather than pay a wake-up (never past
        // the deadline).
        if !timeout.is_zero() {
            spin::poll_briefly(|| {
                self.ended.load(Ordering::Acquire) || deadline.is_some_and(|d| Instant::now() >= d)
            });
        }
        let mut p = self.progress.lock();
        while p.slices_left > 0 {
            match deadline {
                Some(d) => {
                    if self.finished.wait_until(&mut p, d).timed_out() && p.slices_left > 0 {
                        return Err(Error::Timeout {
                            what: "waiting for the batch".into(),
                            ms: timeout.as_millis() as u64,
                        });
                    }
                }
                None => self.finished.wait(&mut p),
            }
        }
        match Self::state_of(&p) {
            BatchState::Failed(e) => Err(e),
            _ => Ok(()),
        }
    }
}

#[derive(Debug)]
struct Slot {
    generation: u32,
    batch: Option<Arc<Batch>>,
}

#[derive(Debug, Default)]
struct Table {
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
}

/// Live batches of an engine, by id.
#[derive(Debug)]
pub struct BatchTable {
    table: Mutex<Table>,
    limit: usize,
    /// Random first generation, so ids of different engines differ and an
    /// id handed to the wrong engine is refused, not mistaken for its own.
    salt: u32,
}

impl BatchTable {
    pub fn new(limit: usize) -> Self {
        BatchTable {
            table: Mutex::new(Table::default()),
            limit: limit.min(u32::MAX as usize - 1),
            salt: crate::segment::random_instance_id() as u32,
        }
    }

    pub fn insert(&self, batch: Arc<Batch>) -> Result<BatchId> {
        let mut t = self.table.lock();
        if t.live >= self.limit {
            return Err(Error::TooManyBatches { limit: self.limit });
        }
        let index = match t.free.pop() {
            Some(i) => i,
            None => {
                t.slots.push(Slot {
                    generation: self.salt,
                    batch: None,
                });
                (t.slots.len() - 1) as u32
            }
        };
        let slot = &mut t.slots[index as usize];
        // Generations start at 1 and skip 0 on wrap, so no id is ever 0.
        slot.generation = slot.generation.wrapping_add(1).max(1);
        slot.batch = Some(batch);
        let id = (u64::from(slot.generation) << 32) | (u64::from(index) + 1);
        t.live += 1;
        Ok(BatchId(id))
    }

    fn locate(t: &Table, id: BatchId) -> Result<usize> {
        let bad = Error::BadBatchId { id: id.0 };
        let index = (id.0 & 0xffff_ffff).checked_sub(1).ok_or(bad.clone())? as usize;
        let generation = (id.0 >> 32) as u32;
        match t.slots.get(index) {
            Some(s) if s.generation == generation && s.batch.is_some() => Ok(index),
            _ => Err(bad),
        }
    }

    pub fn get(&self, id: BatchId) -> Result<Arc<Batch>> {
        let t = self.table.lock();
        let i = Self::locate(&t, id)?;
        t.slots[i]
            .batch
            .clone()
            .ok_or(Error::BadBatchId { id: id.0 })
    }

    /// Frees a finished batch; its id becomes invalid.
    pub fn remove(&self, id: BatchId) -> Result<()> {
        let mut t = self.table.lock();
        let i = Self::locate(&t, id)?;
        if let Some(b) = &t.slots[i].batch
            && matches!(b.state(), BatchState::InProgress)
        {
            return Err(Error::BatchInProgress { id: id.0 });
        }
        t.slots[i].batch = None;
        t.free.push(i as u32);
        t.live -= 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(first: u32, last: u32) -> Slice {
        Slice {
            local: 0,
            remote: 0,
            len: 1,
            first_op: first,
            last_op: last,
        }
    }

    #[test]
    fn a_waiter_sees_the_batch_end_on_another_thread() {
        // Ended soon after the waiter started (busy-waited, not slept: a
        // sleep's timer slack alone can outlast the polling window), and
        // long after it (the waiter asleep on the condvar): both Ok.
        for delay in [Duration::from_micros(10), Duration::from_millis(50)] {
            let b = Arc::new(Batch::new(1, 1));
            let b2 = Arc::clone(&b);
            let start = Arc::new(std::sync::Barrier::new(2));
            let start2 = Arc::clone(&start);
            let t = std::thread::spawn(move || {
                start2.wait();
                let t0 = Instant::now();
                while t0.elapsed() < delay {
                    std::hint::spin_loop();
                }
                b2.complete_slice(&slice(0, 0), Ok(()));
            });
            start.wait();
            b.wait(Duration::from_secs(10)).unwrap();
            t.join().unwrap();
        }
        // A wait shorter than the polling window stops at its deadline,
        // not at the end of the window: the fastest of a few tries (the
        // scheduler may delay any one) stays under the window.
        let b = Batch::new(1, 1);
        let fastest = (0..20)
            .map(|_| {
                let t0 = Instant::now();
                assert!(matches!(
                    b.wait(Duration::from_micros(5)),
                    Err(Error::Timeout { .. })
                ));
                t0.elapsed()
            })
            .min()
            .unwrap();
        assert!(fastest < spin::SPIN_BEFORE_SLEEP, "{fastest:?}");
        assert!(matches!(b.state(), BatchState::InProgress));
    }

    #[test]
    fn ids_are_generational() {
        let t = BatchTable::new(4);
        let a = t.insert(Arc::new(Batch::new(1, 0))).unwrap();
        assert_ne!(a.0, 0);
        t.remove(a).unwrap();
        assert!(matches!(t.get(a), Err(Error::BadBatchId { .. })));
        assert!(matches!(t.remove(a), Err(Error::BadBatchId { .. })));
        let b = t.insert(Arc::new(Batch::new(1, 0))).unwrap();
        assert_ne!(a, b, "slot reuse gives a new id");
        for bogus in [0, 1, u64::MAX, b.0 + 1, b.0 ^ (1 << 32)] {
            assert!(t.get(BatchId(bogus)).is_err(), "{bogus:#x}");
        }
    }

    #[test]
    fn limit_and_in_progress() {
        let t = BatchTable::new(1);
        let a = t.insert(Arc::new(Batch::new(1, 1))).unwrap();
        assert!(matches!(
            t.insert(Arc::new(Batch::new(1, 1))),
            Err(Error::TooManyBatches { .. })
        ));
        assert!(matches!(t.remove(a), Err(Error::BatchInProgress { .. })));
        t.get(a).unwrap().complete_slice(&slice(0, 0), Ok(()));
        t.remove(a).unwrap();
    }

    #[test]
    fn per_op_status_and_first_error() {
        let b = Batch::new(3, 2);
        assert_eq!(b.op_state(0), Some(OpState::Pending));
        assert!(matches!(
            b.wait(Duration::from_millis(1)),
            Err(Error::Timeout { .. })
        ));
        b.complete_slice(&slice(1, 2), Err(Error::invalid("first")));
        b.complete_slice(&slice(0, 0), Ok(()));
        assert_eq!(b.op_state(0), Some(OpState::Done));
        assert_eq!(b.op_state(2), Some(OpState::Failed));
        assert_eq!(b.op_state(3), None);
        let e = b.wait(Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("first"));
    }

    /// `Timeout` from a wait means "still running": a batch that a timeout
    /// ended must say something else, or a caller waiting in a loop until
    /// the answer is not `Timeout` would never stop.
    #[test]
    fn a_batch_ended_by_a_timeout_is_not_still_running() {
        let running = Batch::new(2, 2);
        running.complete_slice(&slice(0, 0), Ok(()));
        assert!(matches!(
            running.wait(Duration::from_millis(1)),
            Err(Error::Timeout { .. })
        ));
        let timed_out = |e: &Error| {
            matches!(e, Error::TransferTimeout { what, ms: 300 } if what == "read with peer")
                && e.status() == crate::Status::TransferTimeout
        };
        let peer_silent = || Error::Timeout {
            what: "read with peer".into(),
            ms: 300,
        };
        running.complete_slice(&slice(1, 1), Err(peer_silent()));
        let e = running.wait(Duration::from_millis(1)).unwrap_err();
        assert!(timed_out(&e), "{e:?}");
        assert!(timed_out(&running.wait(Duration::MAX).unwrap_err()));
        assert!(matches!(running.state(), BatchState::Failed(ref e) if timed_out(e)));
        assert_eq!(running.op_state(1), Some(OpState::Failed));

        let failed_whole = Batch::new(1, 3);
        failed_whole.fail_all(peer_silent());
        assert!(timed_out(&failed_whole.wait(Duration::ZERO).unwrap_err()));
    }
}
