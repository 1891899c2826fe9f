//! The `cma` transport: a peer on the same host (same boot id), host
//! memory. Bytes move with `process_vm_readv` / `process_vm_writev`, one
//! syscall per up to 1024 slices; batches of `SPLIT_MIN_BYTES` or more are
//! cut in chunks by bytes (a coalesced slice anywhere) that this thread and
//! the engine's copy thread claim in turn.
//!
//! The kernel lets us touch the peer's whole address space, so kvferry
//! brings the target's checks itself. The fast path uses the target's lease
//! board (board.rs): the batch announces itself in a slot of the shared
//! board, checks every remote range against the target's region list
//! stamped with the board's current epoch, copies, and clears the slot; the
//! target's unregister waits for slots of older epochs. No round trip per
//! batch. When the board is unavailable (no memfd, `/proc/<pid>/fd` not
//! openable, all slots busy, the list keeps changing) the batch takes a PIN
//! lease instead: it asks the target over the tcp control lane to check and
//! pin the ranges, and releases the lease afterwards.
//!
//! When the kernel refuses (EPERM: ptrace scope, containers), the
//! transport says so in the log and carries this peer over tcp from then on.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};

use crate::board::{self, Mapping};
use crate::config::TestHooks;
use crate::error::{Error, Result};
use crate::net::IOV_MAX;
use crate::plan::{Opcode, Slice};
use crate::segment::Segment;
use crate::socket_owner;
use crate::spin;
use crate::transport::tcp::{Conn, TcpTransport};
use crate::transport::{Job, Report, Transport};
use crate::wire;

/// Batches at least this large are copied on two threads. Measured on a
/// 2-vCPU KVM guest (tools/bench/discussion.md, cma-large): below it the
/// second thread gains nothing even on an idle machine, and on a busy one
/// waiting for a preempted worker costs more than the whole batch.
const SPLIT_MIN_BYTES: u64 = 2 << 20;
/// A split batch is cut in about this many chunks, each of
/// `MIN_CHUNK..=MAX_CHUNK` bytes, claimed in turn by both threads.
const SPLIT_CHUNKS: u64 = 8;
const MIN_CHUNK: u64 = 128 << 10;
const MAX_CHUNK: u64 = 4 << 20;
/// Lease board slots asked for per peer (concurrent fast-path batches):
/// as many as a target gives one connection.
const BOARD_SLOTS: u32 = board::MAX_SLOTS_PER_CONN;
/// Attempts to enter the fast path before a batch takes a PIN lease.
const ENTER_ATTEMPTS: usize = 4;

/// A contiguous piece of a copy: local and remote start, length.
#[derive(Debug, Clone, Copy)]
struct Piece {
    local: u64,
    remote: u64,
    len: u64,
}

impl From<&Slice> for Piece {
    fn from(s: &Slice) -> Piece {
        Piece {
            local: s.local,
            remote: s.remote,
            len: s.len,
        }
    }
}

/// What one `copy_pieces` achieved.
#[derive(Debug)]
struct CopyOutcome {
    /// Bytes moved from the start of the pieces.
    moved: u64,
    error: Option<CopyError>,
}

#[derive(Debug)]
enum CopyError {
    /// EPERM before any byte moved: fall back to tcp.
    Refused(std::io::Error),
    Failed(Error),
}

/// Copies `pieces` in order with `process_vm_readv` / `writev`, up to
/// `IOV_MAX` pieces per call, resuming after partial copies, until
/// `deadline`: the batch had `budget` for it (what a timeout reports).
///
/// # Safety
/// Local pieces must lie in memory pinned for the whole call; remote
/// pieces in ranges the target checked and leased (PIN or lease board).
unsafe fn copy_pieces(
    pid: libc::pid_t,
    peer: &str,
    opcode: Opcode,
    pieces: &[Piece],
    deadline: Instant,
    budget: Duration,
) -> CopyOutcome {
    let mut idx = 0usize;
    let mut off = 0u64;
    let mut moved = 0u64;
    let n_iov = IOV_MAX.min(pieces.len());
    let mut local: Vec<libc::iovec> = Vec::with_capacity(n_iov);
    let mut remote: Vec<libc::iovec> = Vec::with_capacity(n_iov);
    let fail = |moved, e| CopyOutcome {
        moved,
        error: Some(CopyError::Failed(e)),
    };
    while idx < pieces.len() {
        if Instant::now() >= deadline {
            let e = Error::Timeout {
                what: format!("cma transfer with {peer}"),
                ms: budget.as_millis() as u64,
            };
            return fail(moved, e);
        }
        local.clear();
        remote.clear();
        for (k, s) in pieces[idx..].iter().take(IOV_MAX).enumerate() {
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
        // SAFETY: per the caller's contract, local iovecs lie in pinned
        // registered memory and remote ones in leased target ranges. The
        // kernel validates the remote side against the peer's mappings and
        // never faults us.
        let got = unsafe {
            match opcode {
                Opcode::Read => {
                    libc::process_vm_readv(pid, local.as_ptr(), n, remote.as_ptr(), n, 0)
                }
                Opcode::Write => {
                    libc::process_vm_writev(pid, local.as_ptr(), n, remote.as_ptr(), n, 0)
                }
            }
        };
        if got <= 0 {
            let err = std::io::Error::last_os_error();
            if got < 0 && err.raw_os_error() == Some(libc::EPERM) && moved == 0 {
                return CopyOutcome {
                    moved,
                    error: Some(CopyError::Refused(err)),
                };
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
            return fail(moved, e);
        }
        let mut n = got as u64;
        moved += n;
        while n > 0 && idx < pieces.len() {
            let rest = pieces[idx].len - off;
            if n >= rest {
                n -= rest;
                idx += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
    }
    CopyOutcome { moved, error: None }
}

/// Cuts the slices' bytes into chunks of `chunk` bytes (the last one
/// shorter; a slice may be cut anywhere).
fn chunk_pieces(slices: &[Slice], chunk: u64) -> Vec<Vec<Piece>> {
    let mut out: Vec<Vec<Piece>> = vec![Vec::new()];
    let mut room = chunk;
    for s in slices {
        let mut p = Piece::from(s);
        while p.len > 0 {
            if room == 0 {
                out.push(Vec::new());
                room = chunk;
            }
            let take = p.len.min(room);
            if let Some(last) = out.last_mut() {
                last.push(Piece { len: take, ..p });
            }
            p.local += take;
            p.remote += take;
            p.len -= take;
            room -= take;
        }
    }
    out
}

// ---- the copy pool -----------------------------------------------------------

/// A batch cut in chunks, copied by the caller and the pool's thread
/// together: each claims the next chunk until none is left, so a thread
/// that is slow to wake (or preempted) delays the batch by one chunk at
/// most.
#[derive(Debug)]
struct Work {
    pid: libc::pid_t,
    peer: String,
    opcode: Opcode,
    deadline: Instant,
    /// What the batch was given (`copy_pieces`).
    budget: Duration,
    chunks: Vec<Vec<Piece>>,
    /// The next chunk to claim.
    next: AtomicUsize,
    /// Per chunk, once copied (or failed).
    outcomes: Mutex<Vec<Option<CopyOutcome>>>,
    /// Chunks copied; changed under the pool's state lock.
    done: AtomicUsize,
}

impl Work {
    /// Claims and copies chunks until none is left.
    ///
    /// # Safety
    /// As `copy_pieces`: whoever posted the work keeps the memory pinned
    /// and leased until every claimed chunk is done.
    unsafe fn drain(&self, pool: &PoolInner) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(chunk) = self.chunks.get(i) else {
                return;
            };
            // A panic must not skip the bookkeeping below: the poster waits
            // for every chunk (on the worker) or unwinds while the worker
            // still copies (on the poster). It fails the chunk instead.
            let o = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                // SAFETY: forwarded to the poster (see `CopyPool::copy`).
                unsafe {
                    copy_pieces(
                        self.pid,
                        &self.peer,
                        self.opcode,
                        chunk,
                        self.deadline,
                        self.budget,
                    )
                }
            }))
            .unwrap_or_else(|_| CopyOutcome {
                moved: 0,
                error: Some(CopyError::Failed(Error::Internal {
                    what: "a cma copy panicked".into(),
                })),
            });
            if let Some(slot) = self.outcomes.lock().get_mut(i) {
                *slot = Some(o);
            }
            {
                let mut st = pool.state.lock();
                if self.done.fetch_add(1, Ordering::Release) + 1 == self.chunks.len() {
                    st.finished_at = Some(Instant::now());
                }
            }
            pool.done_cv.notify_all();
        }
    }
}

#[derive(Debug, Default)]
struct PoolState {
    work: Option<Arc<Work>>,
    stop: bool,
    /// When the posted work's last chunk was done: how late a worker was,
    /// apart from how long the poster took to see it.
    finished_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct PoolInner {
    state: Mutex<PoolState>,
    /// Work was posted (polled before sleeping on `work_cv`).
    posted: AtomicBool,
    work_cv: Condvar,
    done_cv: Condvar,
}

/// The engine's second copy thread for cma batches: one worker, started
/// on first use, that polls for work for `spin::SPIN_BEFORE_SLEEP` (while
/// `spin::polling_pays`) before it sleeps (waking a halted vCPU costs tens of microseconds, see spin.rs).
/// One batch uses it at a time; a batch that finds it busy copies alone.
#[derive(Debug, Default)]
pub struct CopyPool {
    inner: Arc<PoolInner>,
    worker: Mutex<Option<JoinHandle<()>>>,
    /// Held by the batch using the worker.
    busy: AtomicBool,
    /// The worker could not be started: never try again.
    failed: AtomicBool,
    /// Batches still to copy alone because the worker was late (another
    /// process holds its CPU): waiting for a preempted thread costs more
    /// than copying everything here.
    backoff: AtomicU32,
}

/// Batches copied alone after the worker kept one waiting.
const BACKOFF_BATCHES: u32 = 64;

impl CopyPool {
    pub fn new() -> CopyPool {
        CopyPool::default()
    }

    /// Takes the worker for one batch, starting it the first time.
    fn acquire(&self) -> bool {
        let left = self.backoff.load(Ordering::Relaxed);
        if left > 0 {
            self.backoff.store(left - 1, Ordering::Relaxed);
            return false;
        }
        if self.failed.load(Ordering::Relaxed)
            || self
                .busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return false;
        }
        let mut w = self.worker.lock();
        if w.is_none() {
            let inner = Arc::clone(&self.inner);
            match std::thread::Builder::new()
                .name("kvferry-copy".into())
                .spawn(move || worker_loop(&inner))
            {
                Ok(h) => *w = Some(h),
                Err(e) => {
                    log::debug!("kvferry: no cma copy thread ({e}); copying on one thread");
                    self.failed.store(true, Ordering::Relaxed);
                    self.busy.store(false, Ordering::Release);
                    return false;
                }
            }
        }
        true
    }

    /// Copies `work` on this thread and the worker, returning once every
    /// chunk is done. The caller holds the pool (`acquire`).
    ///
    /// # Safety
    /// As `copy_pieces` for every chunk. When this returns, every chunk was
    /// claimed and copied: the worker touches none of the memory any more.
    unsafe fn copy(&self, work: Arc<Work>) -> Arc<Work> {
        let inner = &*self.inner;
        {
            let mut st = inner.state.lock();
            st.work = Some(Arc::clone(&work));
            inner.posted.store(true, Ordering::Release);
        }
        inner.work_cv.notify_one();
        let began = Instant::now();
        // SAFETY: forwarded to the caller.
        unsafe { work.drain(inner) };
        // Every chunk is claimed; wait for those the worker is copying.
        let all = work.chunks.len();
        let start = Instant::now();
        let own = start - began;
        spin::poll_briefly(|| work.done.load(Ordering::Acquire) >= all);
        let finished = {
            let mut st = inner.state.lock();
            // Not picked up (the worker is still waking): it never will be.
            if st.work.take().is_some() {
                inner.posted.store(false, Ordering::Relaxed);
            }
            while work.done.load(Ordering::Acquire) < all {
                inner.done_cv.wait(&mut st);
            }
            st.finished_at.take().unwrap_or(start)
        };
        // A healthy worker ends its last chunk well within the time this
        // thread copied its share; ending later means it lost its CPU. (When
        // it ended, not when this thread, perhaps asleep, saw it.)
        if finished.saturating_duration_since(start) > own {
            self.backoff.store(BACKOFF_BATCHES, Ordering::Relaxed);
        }
        self.busy.store(false, Ordering::Release);
        work
    }
}

impl Drop for CopyPool {
    fn drop(&mut self) {
        self.inner.state.lock().stop = true;
        self.inner.work_cv.notify_all();
        if let Some(h) = self.worker.lock().take() {
            let _ = h.join();
        }
    }
}

fn worker_loop(inner: &PoolInner) {
    loop {
        spin::poll_briefly(|| inner.posted.load(Ordering::Acquire));
        let work = {
            let mut st = inner.state.lock();
            loop {
                if st.stop {
                    return;
                }
                if let Some(w) = st.work.take() {
                    inner.posted.store(false, Ordering::Relaxed);
                    break w;
                }
                inner.work_cv.wait(&mut st);
            }
        };
        // SAFETY: the poster waits until every chunk it or we claimed is
        // done before it releases the memory's pins and lease
        // (`CopyPool::copy`); a chunk claimed after that does not exist.
        unsafe { work.drain(inner) };
    }
}

// ---- the lease board, initiator side ----------------------------------------

/// The target's regions as of one lease board epoch.
#[derive(Debug)]
struct RegionList {
    /// The board's `retire_epoch` read before the target listed them.
    epoch: u64,
    regions: Vec<wire::Range>,
}

impl RegionList {
    /// The index of the first slice whose remote range is in no region.
    fn first_miss(&self, slices: &[Slice]) -> Option<usize> {
        let mut last: Option<&wire::Range> = None;
        for (i, s) in slices.iter().enumerate() {
            let inside = |r: &wire::Range| s.remote >= r.addr && s.remote + s.len <= r.addr + r.len;
            if last.is_some_and(inside) {
                continue;
            }
            let k = self.regions.partition_point(|r| r.addr <= s.remote);
            match k.checked_sub(1).map(|k| &self.regions[k]) {
                Some(r) if inside(r) => last = Some(r),
                _ => return Some(i),
            }
        }
        None
    }
}

/// This initiator's view of one target's lease board.
#[derive(Debug)]
struct BoardClient {
    map: Mapping,
    /// Our slots, and whether a batch holds each.
    slots: Vec<(u32, AtomicBool)>,
    /// The connection that owns the slots (the target frees them when it
    /// closes). Never closed before the transport drops: a batch may hold
    /// a slot on another thread.
    conn: Mutex<Conn>,
    list: RwLock<Arc<RegionList>>,
    /// The target process (exit shows as readable): its pid is never
    /// reused under our feet while we see it alive.
    pidfd: OwnedFd,
    /// Set after an error on `conn`: the fast path is off for good.
    dead: AtomicBool,
    /// When `pidfd` last showed the target alive, in ns after `born`.
    seen_alive: AtomicU64,
    born: Instant,
}

/// How long after seeing the target alive a batch may copy without
/// looking again first (the look after every copy is never skipped).
/// Linux hands pids out in turn: a pid comes back only once the whole pid
/// space (32768 and more) was handed out since, not within 100 µs of its
/// process being seen alive. Back-to-back batches of small blocks (20 µs
/// each) so save one `poll` each.
const ALIVE_FRESH: Duration = Duration::from_micros(100);

/// A slot held by one batch; cleared (the copy is over) when dropped.
#[derive(Debug)]
struct SlotGuard<'a> {
    word: &'a AtomicU64,
    held: &'a AtomicBool,
}

impl SlotGuard<'_> {
    fn clear(&self) {
        self.word.store(0, Ordering::SeqCst);
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        // Everything the copy did happens before the target sees 0.
        self.word.store(0, Ordering::Release);
        self.held.store(false, Ordering::Release);
    }
}

enum Enter<'a> {
    /// Ranges checked, slot set: copy, then drop the guard.
    Go(SlotGuard<'a>),
    /// A range is in none of the target's regions: nothing moves.
    Refused(Error),
    /// Take a PIN lease instead.
    Unavailable,
}

/// Why the lease board could not be used.
#[derive(Debug)]
enum SetupError {
    /// The process our pid names is not shown to be the target: it holds
    /// no end of our connection to the peer (a stranger on the peer's
    /// port, another pid namespace), or we could not tell. No cma at all.
    NotTheTarget(String),
    /// Anything else, once the pid is shown to serve the peer: PIN leases.
    Other(String),
}

impl From<String> for SetupError {
    fn from(m: String) -> Self {
        SetupError::Other(m)
    }
}

impl From<&str> for SetupError {
    fn from(m: &str) -> Self {
        SetupError::Other(m.to_owned())
    }
}

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SetupError::NotTheTarget(m) | SetupError::Other(m) => f.write_str(m),
        }
    }
}

impl BoardClient {
    fn setup(
        tcp: &TcpTransport,
        pid: libc::pid_t,
        hooks: &TestHooks,
        deadline: Instant,
    ) -> std::result::Result<BoardClient, SetupError> {
        let peer = tcp.peer_name();
        let instance = tcp.instance();
        // Until `pid` is shown to serve the peer, nothing may be copied
        // into it (socket_owner.rs): every failure before that is
        // `NotTheTarget`, and the peer goes over tcp.
        let unproven = |m: String| SetupError::NotTheTarget(m);
        let mut conn = tcp
            .open_conn()
            .map_err(|e| unproven(format!("cannot check that pid {pid} serves {peer}: {e}")))?;
        let pidfd = board::pidfd_open(pid as u32)
            .map_err(|e| unproven(format!("pidfd_open({pid}): {e}")))?;
        match socket_owner::holds_peer_end(pid as u32, conn.stream()) {
            Ok(true) => {}
            Ok(false) => {
                return Err(unproven(format!(
                    "pid {pid} holds no end of our connection to {peer}"
                )));
            }
            Err(e) => {
                return Err(unproven(format!(
                    "cannot tell whether pid {pid} serves {peer}: {e}"
                )));
            }
        }
        // Alive after the look: the pid was not handed to another process
        // while we looked (pidfd_open came first).
        // Unsure (poll failed) counts as exited: no copy on a doubt.
        if board::pidfd_exited(&pidfd).unwrap_or(true) {
            return Err(unproven(format!("pid {pid} exited")));
        }
        let (grant, slots) = conn
            .lease_board(peer, instance, BOARD_SLOTS, deadline)
            .map_err(|e| e.to_string())?;
        if grant.pid as libc::pid_t != pid {
            return Err(
                format!("the board is in pid {}, the segment says {pid}", grant.pid).into(),
            );
        }
        if slots.is_empty() {
            return Err("no free slot".into());
        }
        let len = usize::try_from(grant.board_len).unwrap_or(usize::MAX);
        // Ours are 20 KiB; anything far off is not a kvferry board.
        if len < board::board_len(1) || len > 16 << 20 {
            return Err(format!("a board of {len} bytes").into());
        }
        let path = format!("/proc/{pid}/fd/{}", grant.fd);
        if hooks.board_open_fails {
            return Err(format!("{path}: refused (test hook)").into());
        }
        if hooks.board_in_another_process {
            return Err(SetupError::NotTheTarget(format!(
                "{path} belongs to another engine instance (test hook)"
            )));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| {
                let m = format!("{path}: {e}");
                // No such process or descriptor here: the pid the target
                // reported names another process in our pid namespace.
                if e.kind() == std::io::ErrorKind::NotFound {
                    SetupError::NotTheTarget(m)
                } else {
                    SetupError::Other(m)
                }
            })?;
        // SAFETY: fcntl on a descriptor we own; the result is checked.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & board::REQUIRED_SEALS != board::REQUIRED_SEALS {
            // An unsealed file could be truncated under our mapping (SIGBUS).
            return Err(SetupError::NotTheTarget(format!(
                "{path} is not a sealed lease board"
            )));
        }
        let size = file.metadata().map_err(|e| format!("{path}: {e}"))?.len();
        if size < grant.board_len {
            return Err(format!("{path} has {size} bytes, the grant says {len}").into());
        }
        let map = Mapping::map(file.as_raw_fd(), len).map_err(|e| format!("{path}: {e}"))?;
        let (version, count) = map.version_and_slots();
        if map.magic() != board::MAGIC || version != board::VERSION {
            return Err(SetupError::NotTheTarget(format!(
                "{path} is not a version {} board",
                board::VERSION
            )));
        }
        if map.instance_id() != instance {
            return Err(SetupError::NotTheTarget(format!(
                "{path} belongs to another engine instance"
            )));
        }
        if slots.iter().any(|&s| s >= count || map.slot(s).is_none()) {
            return Err("the grant names slots outside the board".into());
        }
        Ok(BoardClient {
            map,
            slots: slots
                .into_iter()
                .map(|s| (s, AtomicBool::new(false)))
                .collect(),
            conn: Mutex::new(conn),
            list: RwLock::new(Arc::new(RegionList {
                epoch: u64::MAX,
                regions: Vec::new(),
            })),
            pidfd,
            dead: AtomicBool::new(false),
            seen_alive: AtomicU64::new(0),
            born: Instant::now(),
        })
    }

    /// Whether the target process still runs (one `poll`).
    fn alive(&self) -> bool {
        let alive = !board::pidfd_exited(&self.pidfd).unwrap_or(true);
        if alive {
            let ns = self.born.elapsed().as_nanos() as u64;
            self.seen_alive.fetch_max(ns, Ordering::Relaxed);
        }
        alive
    }

    /// `alive`, or true without a `poll` when it was seen alive within
    /// `ALIVE_FRESH`.
    fn recently_alive(&self) -> bool {
        let seen = Duration::from_nanos(self.seen_alive.load(Ordering::Relaxed));
        let fresh = self.born.elapsed().saturating_sub(seen) < ALIVE_FRESH;
        (fresh && seen > Duration::ZERO) || self.alive()
    }

    fn take_slot(&self) -> Option<SlotGuard<'_>> {
        self.slots.iter().find_map(|(i, held)| {
            let word = self.map.slot(*i)?;
            held.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .ok()
                .map(|_| SlotGuard { word, held })
        })
    }

    /// Fetches the region list again (unless `only_if_stale` and another
    /// batch already fetched one for the current epoch).
    fn refresh(&self, tcp: &TcpTransport, only_if_stale: bool, deadline: Instant) -> bool {
        let mut conn = self.conn.lock();
        if self.dead.load(Ordering::Relaxed) {
            return false;
        }
        if only_if_stale && self.list.read().epoch == self.map.epoch().load(Ordering::SeqCst) {
            return true;
        }
        match conn.lease_regions(tcp.peer_name(), tcp.instance(), deadline) {
            Ok((epoch, regions)) => {
                *self.list.write() = Arc::new(RegionList { epoch, regions });
                true
            }
            Err(e) => {
                log::debug!(
                    "kvferry: cma lease board of {} off: {e}; using PIN leases",
                    tcp.peer_name()
                );
                self.dead.store(true, Ordering::Relaxed);
                false
            }
        }
    }

    /// The fast path's entry (board.rs explains why it is safe).
    fn enter(&self, tcp: &TcpTransport, job: &Job<'_>) -> Enter<'_> {
        if self.dead.load(Ordering::Relaxed) || !self.recently_alive() {
            return Enter::Unavailable;
        }
        let Some(slot) = self.take_slot() else {
            return Enter::Unavailable;
        };
        let epoch = self.map.epoch();
        let mut fresh = false;
        for _ in 0..ENTER_ATTEMPTS {
            let e = epoch.load(Ordering::SeqCst);
            slot.word.store(e.wrapping_add(1), Ordering::SeqCst);
            if epoch.load(Ordering::SeqCst) != e {
                slot.clear(); // an unregister started: look again
                continue;
            }
            let list = Arc::clone(&self.list.read());
            if list.epoch != e {
                slot.clear();
                if !self.refresh(tcp, true, job.deadline) {
                    return Enter::Unavailable;
                }
                fresh = true;
                continue;
            }
            let Some(i) = list.first_miss(job.slices) else {
                return Enter::Go(slot);
            };
            slot.clear();
            if fresh {
                // The error the target gives a PIN of this range.
                let s = &job.slices[i];
                return Enter::Refused(Error::RequestRefused {
                    peer: tcp.peer_name().to_owned(),
                    message: format!(
                        "range {i} [{:#x}, +{}) is not inside one region registered with {}",
                        s.remote,
                        s.len,
                        tcp.peer_name()
                    ),
                });
            }
            // Perhaps registered since our list was made.
            if !self.refresh(tcp, false, job.deadline) {
                return Enter::Unavailable;
            }
            fresh = true;
        }
        Enter::Unavailable
    }
}

// ---- the transport ---------------------------------------------------------------

#[derive(Debug)]
pub struct CmaTransport {
    tcp: Arc<TcpTransport>,
    pid: libc::pid_t,
    /// Set once the kernel refused: tcp carries everything afterwards.
    refused: AtomicBool,
    pool: Arc<CopyPool>,
    /// Set up on the first batch; `None`: PIN leases for every batch.
    board: OnceLock<Option<BoardClient>>,
    hooks: TestHooks,
}

/// How a batch's remote ranges are held while it copies.
enum Lease<'a> {
    Board(SlotGuard<'a>),
    Pins(Vec<(usize, u64)>),
}

impl CmaTransport {
    pub fn new(
        tcp: Arc<TcpTransport>,
        pid: u32,
        pool: Arc<CopyPool>,
        hooks: TestHooks,
    ) -> CmaTransport {
        CmaTransport {
            tcp,
            pid: pid as libc::pid_t,
            refused: AtomicBool::new(false),
            pool,
            board: OnceLock::new(),
            hooks,
        }
    }

    fn board(&self, deadline: Instant) -> Option<&BoardClient> {
        self.board
            .get_or_init(
                || match BoardClient::setup(&self.tcp, self.pid, &self.hooks, deadline) {
                    Ok(b) => Some(b),
                    Err(SetupError::NotTheTarget(e)) => {
                        // process_vm_* on this pid would touch another
                        // process: this peer goes over tcp from now on.
                        self.refused.store(true, Ordering::Relaxed);
                        log::warn!(
                            "kvferry: pid {} is not {} here ({e}); using tcp for this peer",
                            self.pid,
                            self.tcp.peer_name()
                        );
                        None
                    }
                    Err(e) => {
                        log::debug!(
                            "kvferry: no cma lease board with {} ({e}); using PIN leases",
                            self.tcp.peer_name()
                        );
                        None
                    }
                },
            )
            .as_ref()
    }

    /// Copies the whole job (large ones in chunks on two threads when the
    /// pool is free), which had `budget` when it reached this transport.
    /// Per slice: done, or why not.
    fn copy(&self, job: &Job<'_>, budget: Duration) -> Vec<SliceOutcome> {
        let total: u64 = job.slices.iter().map(|s| s.len).sum();
        let split = total >= SPLIT_MIN_BYTES && self.pool.acquire();
        // Per chunk, in order: its length and how its copy went.
        let results: Vec<(u64, Option<CopyOutcome>)> = if split {
            let chunk = (total / SPLIT_CHUNKS).clamp(MIN_CHUNK, MAX_CHUNK);
            let chunks = chunk_pieces(job.slices, chunk);
            let work = Arc::new(Work {
                pid: self.pid,
                peer: self.tcp.peer_name().to_owned(),
                opcode: job.opcode,
                deadline: job.deadline,
                budget,
                outcomes: Mutex::new((0..chunks.len()).map(|_| None).collect()),
                chunks,
                next: AtomicUsize::new(0),
                done: AtomicUsize::new(0),
            });
            // SAFETY: local ranges are pinned by the plan and remote ones
            // leased by the caller until after `copy` returns, and the pool
            // returns only when every chunk is done.
            let work = unsafe { self.pool.copy(work) };
            let outcomes = std::mem::take(&mut *work.outcomes.lock());
            let lens = work.chunks.iter().map(|c| c.iter().map(|p| p.len).sum());
            lens.zip(outcomes).collect()
        } else {
            // One chunk, on this thread: nothing to share with the pool.
            let pieces: Vec<Piece> = job.slices.iter().map(Piece::from).collect();
            // SAFETY: as above.
            let o = unsafe {
                copy_pieces(
                    self.pid,
                    self.tcp.peer_name(),
                    job.opcode,
                    &pieces,
                    job.deadline,
                    budget,
                )
            };
            vec![(total, Some(o))]
        };
        // Bytes done: per chunk, its first `moved` bytes.
        let (mut refused, mut failure) = (None, None);
        let mut done: Vec<(u64, u64, u64)> = Vec::with_capacity(results.len());
        let mut at = 0u64;
        for (len, o) in results {
            let moved = match o {
                Some(o) => {
                    match o.error {
                        Some(CopyError::Refused(e)) => refused = Some(e.to_string()),
                        Some(CopyError::Failed(e)) => failure = failure.or(Some(e)),
                        None => {}
                    }
                    o.moved
                }
                None => 0,
            };
            done.push((at, at + len, at + moved));
            at += len;
        }
        let mut pos = 0u64;
        job.slices
            .iter()
            .map(|s| {
                let (start, end) = (pos, pos + s.len);
                pos = end;
                // Every chunk overlapping the slice moved its part of it.
                let ok = done
                    .iter()
                    .filter(|&&(a, b, _)| a < end && b > start)
                    .all(|&(_, b, moved_to)| end.min(b) <= moved_to);
                if ok {
                    SliceOutcome::Done
                } else if let Some(why) = &refused {
                    SliceOutcome::Refused(why.clone())
                } else {
                    SliceOutcome::Failed(failure.clone().unwrap_or_else(|| Error::Internal {
                        what: "a cma copy stopped without an error".into(),
                    }))
                }
            })
            .collect()
    }

    /// Pins the job's remote ranges at the target (PIN leases).
    fn lease(&self, job: &Job<'_>) -> Result<Vec<(usize, u64)>> {
        let ranges: Vec<wire::Range> = job
            .slices
            .iter()
            .map(|s| wire::Range {
                addr: s.remote,
                len: s.len,
            })
            .collect();
        self.tcp.lease(&ranges, job.deadline)
    }
}

/// What became of one slice's copy.
#[derive(Debug)]
enum SliceOutcome {
    Done,
    /// The kernel refused cross-memory attach: carry it over tcp.
    Refused(String),
    Failed(Error),
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
        // What a copy that runs out reports it had, as tcp's `Conn::arm`.
        let budget = job.deadline.saturating_duration_since(Instant::now());
        let board = self.board(job.deadline);
        if self.refused.load(Ordering::Relaxed) {
            return self.tcp.run(job, report);
        }
        let fast = match &board {
            Some(b) => b.enter(&self.tcp, job),
            None => Enter::Unavailable,
        };
        let lease = match fast {
            Enter::Go(slot) => {
                if let Some(h) = &self.hooks.before_cma_copy {
                    h();
                }
                Lease::Board(slot)
            }
            Enter::Refused(e) => {
                (0..job.slices.len()).for_each(|i| report(i, Err(e.clone())));
                return;
            }
            Enter::Unavailable => match self.lease(job) {
                Ok(l) => Lease::Pins(l),
                Err(e) => {
                    (0..job.slices.len()).for_each(|i| report(i, Err(e.clone())));
                    return;
                }
            },
        };
        let mut outcomes = self.copy(job, budget);
        let on_board = matches!(lease, Lease::Board(_));
        match lease {
            Lease::Board(slot) => drop(slot),
            Lease::Pins(l) => self.tcp.release_leases(&l),
        }
        // The pidfd does not reserve the pid: a target that exited during
        // the copy may have handed its pid to another process before the
        // last syscall. Nothing of such a batch counts as done.
        if on_board
            && let Some(b) = &board
            && !b.alive()
        {
            let e = Error::TransferFailed {
                peer: self.tcp.peer_name().to_owned(),
                reason: format!(
                    "the target process (pid {}) exited during the copy",
                    self.pid
                ),
            };
            outcomes = outcomes
                .into_iter()
                .map(|_| SliceOutcome::Failed(e.clone()))
                .collect();
        }
        let mut again: Vec<usize> = Vec::new();
        let mut why = String::new();
        for (i, o) in outcomes.into_iter().enumerate() {
            match o {
                SliceOutcome::Done => report(i, Ok(())),
                SliceOutcome::Failed(e) => report(i, Err(e)),
                SliceOutcome::Refused(w) => {
                    again.push(i);
                    why = w;
                }
            }
        }
        if again.is_empty() {
            return;
        }
        if !self.refused.swap(true, Ordering::Relaxed) {
            log::warn!(
                "kvferry: the kernel refused cross-memory attach to {} (pid {}): {why}; using tcp for this peer",
                self.tcp.peer_name(),
                self.pid
            );
        }
        let slices: Vec<Slice> = again.iter().map(|&i| job.slices[i]).collect();
        let sub = Job {
            opcode: job.opcode,
            slices: &slices,
            deadline: job.deadline,
        };
        self.tcp.run(&sub, &|k, r| report(again[k], r));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(local: u64, remote: u64, len: u64) -> Slice {
        Slice {
            local,
            remote,
            len,
            first_op: 0,
            last_op: 0,
        }
    }

    #[test]
    fn chunks_cut_inside_slices() {
        let c = chunk_pieces(&[slice(0, 1000, 10)], 4);
        let lens: Vec<Vec<(u64, u64, u64)>> = c
            .iter()
            .map(|c| c.iter().map(|p| (p.local, p.remote, p.len)).collect())
            .collect();
        assert_eq!(
            lens,
            vec![vec![(0, 1000, 4)], vec![(4, 1004, 4)], vec![(8, 1008, 2)]]
        );
        let c = chunk_pieces(&[slice(0, 100, 3), slice(50, 200, 3)], 4);
        assert_eq!(c.len(), 2);
        assert_eq!((c[0][1].local, c[0][1].remote, c[0][1].len), (50, 200, 1));
        assert_eq!((c[1][0].local, c[1][0].remote, c[1][0].len), (51, 201, 2));
    }

    #[test]
    fn region_list_lookup() {
        let l = RegionList {
            epoch: 0,
            regions: vec![
                wire::Range {
                    addr: 100,
                    len: 100,
                },
                wire::Range { addr: 200, len: 50 },
            ],
        };
        assert_eq!(l.first_miss(&[slice(0, 100, 100), slice(0, 200, 50)]), None);
        assert_eq!(
            l.first_miss(&[slice(0, 150, 10), slice(0, 190, 20)]),
            Some(1)
        );
        assert_eq!(l.first_miss(&[slice(0, 99, 1)]), Some(0));
        assert_eq!(l.first_miss(&[slice(0, 249, 2)]), Some(0));
    }
}
