//! The cma lease board: a small shared-memory page through which same-host
//! initiators tell a target engine "I am copying from / into your
//! registered memory right now", without a round trip per batch.
//!
//! The target creates it (a memfd, mapped `MAP_SHARED`); an initiator that
//! asked for slots over the control lane (LEASE_BOARD, docs/wire-protocol.md)
//! maps the same file through `/proc/<pid>/fd/<fd>` (allowed whenever
//! `process_vm_*` is; note the converse does not hold: ptrace *read* access,
//! which e.g. any same-user process has under Yama scope 1, is enough).
//!
//! Layout (every word little-endian, 8-byte aligned, each group on its own
//! 64-byte cache line):
//!
//! | offset | word |
//! | --- | --- |
//! | 0 | magic `"KVFLEASE"` |
//! | 8 | version (low 32 bits) and slot count (high 32 bits) |
//! | 16 | the target engine's instance id |
//! | 64 | `retire_epoch` |
//! | 128 + 64 i | slot `i` |
//!
//! A slot is 0 when idle, else `e + 1` where `e` is the `retire_epoch` the
//! initiator's batch was checked against. The protocol, a Dekker pattern:
//!
//! - initiator, per batch: `e = retire_epoch`; `slot = e + 1`; re-read
//!   `retire_epoch` (must still be `e`, else clear and retry); check every
//!   remote range against its copy of the region list stamped `e`; copy;
//!   `slot = 0`.
//! - target, `unregister`: mark the regions closing; `E = ++retire_epoch`;
//!   wait until every slot is 0 or `>= E + 1`.
//! - whoever lists regions for an initiator reads `retire_epoch` before
//!   listing the regions that are not closing.
//!
//! All four steps are sequentially consistent. Either the initiator's
//! re-read comes after the target's increment in that order (it sees the
//! new epoch and refreshes its list, which then excludes the closing
//! regions), or its slot store comes before the increment, and the target's
//! later scan sees the slot (or a later value: 0 after the copy, or a newer
//! epoch's lease) and waits. A list stamped `e >= E` was read after the
//! increment, hence after `closing` was set, so it never shows the region.
//!
//! What a process that can open the board can and cannot do (it needs
//! ptrace read access to the target, less than cma needs):
//! - it cannot truncate or grow it (sealed: `F_SEAL_SHRINK | F_SEAL_GROW |
//!   F_SEAL_SEAL`; initiators refuse an unsealed board), which would kill
//!   the target and every initiator with SIGBUS;
//! - it cannot shorten an unregister through the epoch: the authoritative
//!   `retire_epoch` is private to the target (tokens and list stamps come
//!   from it), the board holds a published copy;
//! - it can still clear other initiators' slots or rewrite the published
//!   epoch, which can let an honest initiator copy into memory being
//!   unregistered. Closing that needs the epoch in a read-only memfd
//!   (`F_SEAL_FUTURE_WRITE`) and per-connection slot memfds passed with
//!   `SCM_RIGHTS` (no `/proc` path to them): not built yet.
//!
//! Slots belong to connections, at most `MAX_SLOTS_PER_CONN` each (what
//! initiators ask for). A cleanly closed connection's slots are cleared and
//! freed. One that ended otherwise (this side dropped it after an error or
//! a timeout) may belong to an initiator that still copies under them on
//! another thread, and that keeps using them until it notices the loss:
//! such slots must not be given to anyone else, nor cleared, while it may
//! (a new owner's grant would zero a slot the old one still announces a
//! copy in). An initiator writes its slots through its own mapping of the
//! board, kept as long as it may use them; so the slots stay, values
//! untouched, only if the pid the connection gave in LEASE_BOARD maps this
//! board, and until that process exits (a pidfd). Anything else is freed at
//! once: a peer that names pid 1, or any process that is no initiator of
//! ours, gets nothing kept (`LeaseBoard::may_still_copy`).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::memory::{MapsLine, RetireGuard};

/// `"KVFLEASE"`.
pub const MAGIC: u64 = u64::from_le_bytes(*b"KVFLEASE");
pub const VERSION: u32 = 1;
/// Slots of one board: concurrent fast-path batches of all peers together.
pub const SLOT_COUNT: u32 = 256;
/// Seals every board carries (checked by initiators before they map it):
/// its size is fixed, so no one can truncate it under a mapping.
pub const REQUIRED_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
/// Most slots one connection may hold: what initiators ask for (one per
/// concurrent fast-path batch), so that 32 connections share the board
/// rather than 4.
pub const MAX_SLOTS_PER_CONN: u32 = 8;
const _: () = assert!(MAX_SLOTS_PER_CONN <= crate::wire::MAX_GRANT);
/// The memfd's name; mappings of it show as `/memfd:kvferry-leases`.
const NAME: &std::ffi::CStr = c"kvferry-leases";
const LINE: usize = 64;
const EPOCH_OFFSET: usize = LINE;
const SLOTS_OFFSET: usize = 2 * LINE;

/// A pidfd of process `pid`: it names that process only, even once its
/// pid is handed to another one.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; the result is checked.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as RawFd) })
}

/// Whether the process of `pidfd` has exited (one `poll`: a pidfd polls
/// readable once its process has exited). A failed `poll` is the caller's
/// to weigh: the board keeps an orphan's slots then, cma stops copying.
pub fn pidfd_exited(pidfd: &OwnedFd) -> std::io::Result<bool> {
    crate::net::wait_fd(pidfd.as_raw_fd(), libc::POLLIN, std::time::Duration::ZERO)
}

/// Bytes of a board with `slots` slots, rounded up to whole pages.
pub fn board_len(slots: u32) -> usize {
    let raw = SLOTS_OFFSET + LINE * slots as usize;
    raw.div_ceil(4096) * 4096
}

/// A shared mapping of a board file, read and written only through atomics.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; every access goes through
// `AtomicU64` references, which are Sync.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` shared, readable and writable.
    pub fn map(fd: RawFd, len: usize) -> io::Result<Mapping> {
        if len < SLOTS_OFFSET {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "board too small",
            ));
        }
        // SAFETY: a fresh mapping chosen by the kernel; no existing memory
        // is affected. The result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        Ok(Mapping { ptr, len })
    }

    /// The 8-byte word at `offset` (8-aligned, inside the mapping).
    fn word(&self, offset: usize) -> Option<&AtomicU64> {
        if !offset.is_multiple_of(8) || offset.checked_add(8)? > self.len {
            return None;
        }
        // SAFETY: in bounds and 8-aligned (the mapping is page-aligned);
        // the memory lives as long as `self`, and is only ever accessed
        // atomically (by this process and by peers).
        Some(unsafe { &*self.ptr.as_ptr().add(offset).cast::<AtomicU64>() })
    }

    pub fn magic(&self) -> u64 {
        self.word(0).map_or(0, |w| w.load(Ordering::Acquire))
    }

    /// (version, slot count) as written by the target.
    pub fn version_and_slots(&self) -> (u32, u32) {
        let v = self.word(8).map_or(0, |w| w.load(Ordering::Acquire));
        (v as u32, (v >> 32) as u32)
    }

    pub fn instance_id(&self) -> u64 {
        self.word(16).map_or(0, |w| w.load(Ordering::Acquire))
    }

    /// `retire_epoch`.
    pub fn epoch(&self) -> &AtomicU64 {
        // The constructor refuses mappings shorter than the header.
        self.word(EPOCH_OFFSET)
            .unwrap_or_else(|| unreachable_word())
    }

    /// Slot `i`, if the mapping holds it.
    pub fn slot(&self, i: u32) -> Option<&AtomicU64> {
        self.word(SLOTS_OFFSET + LINE * i as usize)
    }

    pub fn byte_len(&self) -> usize {
        self.len
    }
}

/// Never called: `Mapping::map` refuses mappings without a header.
#[cold]
fn unreachable_word() -> &'static AtomicU64 {
    static ZERO: AtomicU64 = AtomicU64::new(0);
    &ZERO
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `map` created; no reference
        // into it outlives `self` (they borrow it).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The target's board: the memfd, its mapping, and which connection holds
/// which slot.
#[derive(Debug)]
pub struct LeaseBoard {
    fd: OwnedFd,
    map: Mapping,
    /// Per slot: the id of the connection holding it, 0 when free.
    owners: Mutex<Vec<u64>>,
    /// The authoritative `retire_epoch`; the board holds a published copy.
    /// Anyone who can open the board can write it, so the tokens unregister
    /// waits with and the stamps of region lists come from here.
    epoch: Mutex<u64>,
    /// The memfd's inode: how the board shows in `/proc/<pid>/maps`.
    inode: u64,
    /// Per connection holding slots: its initiator's pid and a pidfd of it.
    peers: Mutex<HashMap<u64, (u32, OwnedFd)>>,
    /// Connections that ended uncleanly, with their initiator's pidfd:
    /// their slots stay taken until that process exits.
    orphans: Mutex<Vec<(u64, OwnedFd)>>,
}

impl LeaseBoard {
    /// Creates the memfd, sizes and maps it, writes the header.
    pub fn create(instance_id: u64) -> io::Result<LeaseBoard> {
        let len = board_len(SLOT_COUNT);
        // SAFETY: a NUL-terminated name and valid flags; the result is checked.
        let raw = unsafe {
            libc::memfd_create(NAME.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our own descriptor; the result is checked.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // Sealed at its size: whoever can open the file (ptrace read access
        // to this process is enough, less than process_vm_* needs) cannot
        // truncate it under our mapping, which would kill this process
        // (SIGBUS) and every initiator's at the next access.
        // SAFETY: fcntl on our own descriptor; the result is checked.
        if unsafe {
            libc::fcntl(
                fd.as_raw_fd(),
                libc::F_ADD_SEALS,
                REQUIRED_SEALS | libc::F_SEAL_SEAL,
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        let inode = std::fs::File::from(fd.try_clone()?).metadata()?.ino();
        let map = Mapping::map(fd.as_raw_fd(), len)?;
        let store = |off: usize, v: u64| {
            if let Some(w) = map.word(off) {
                w.store(v, Ordering::Release);
            }
        };
        store(16, instance_id);
        store(8, u64::from(VERSION) | (u64::from(SLOT_COUNT) << 32));
        store(0, MAGIC);
        Ok(LeaseBoard {
            fd,
            map,
            owners: Mutex::new(vec![0; SLOT_COUNT as usize]),
            epoch: Mutex::new(0),
            inode,
            peers: Mutex::new(HashMap::new()),
            orphans: Mutex::new(Vec::new()),
        })
    }

    /// The descriptor number peers open as `/proc/<pid>/fd/<n>`.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn byte_len(&self) -> usize {
        self.map.byte_len()
    }

    /// `retire_epoch`, read before listing regions for a peer.
    pub fn epoch(&self) -> u64 {
        *self.epoch.lock()
    }

    /// Gives connection `conn` up to `want` free slots (at most
    /// `MAX_SLOTS_PER_CONN` in all). Granted slots start at 0. `pid` is the
    /// initiator's process (0: unknown), watched through a pidfd so that
    /// `orphan` can keep its slots as long as it may be copying.
    pub fn grant(&self, conn: u64, want: u32, pid: u32) -> Vec<u32> {
        self.reap();
        if pid != 0
            && !self.peers.lock().contains_key(&conn)
            && let Ok(fd) = pidfd_open(pid)
        {
            self.peers.lock().insert(conn, (pid, fd));
        }
        let mut owners = self.owners.lock();
        let held = owners.iter().filter(|&&o| o == conn).count() as u32;
        let want = want.min(MAX_SLOTS_PER_CONN.saturating_sub(held)) as usize;
        let mut out = Vec::with_capacity(want);
        for (i, o) in owners.iter_mut().enumerate() {
            if out.len() >= want {
                break;
            }
            if *o == 0 {
                *o = conn;
                if let Some(s) = self.map.slot(i as u32) {
                    s.store(0, Ordering::SeqCst);
                }
                out.push(i as u32);
            }
        }
        out
    }

    /// A connection that ended without a clean close: its peer may still be
    /// copying on another thread (this side dropped it after an error or a
    /// timeout), so if it may (`may_still_copy`), its slots keep their
    /// values and stay taken until the peer's process exits (`reap`).
    /// Otherwise, or without a pidfd, they are freed as for a clean close.
    pub fn orphan(&self, conn: u64) {
        let peer = self.peers.lock().remove(&conn);
        match peer {
            Some((pid, fd)) if self.may_still_copy(pid) => self.orphans.lock().push((conn, fd)),
            _ => self.clear(conn),
        }
    }

    /// Whether process `pid`, named by a connection this side dropped, may
    /// still copy under that connection's slots. An initiator announces its
    /// copies through its own mapping of this board, which it keeps as long
    /// as it may use its slots; a process that does not map the board has
    /// none in use.
    /// - 0 (not given), or this process: no (engines of one process reach
    ///   each other with the in-process copy, not cma, outside the
    ///   `cma_in_process` test hook; and this process maps its own board,
    ///   so the test below would always say yes);
    /// - else what `/proc/<pid>/maps` says: yes if it maps this board (a
    ///   process that is gone has no maps: no);
    /// - maps we may not read (a process more privileged than this one):
    ///   yes, unless it is pid 1, the pid a confused or hostile peer names
    ///   to have slots kept forever (an initiator that is the first process
    ///   of a container, with this target in the same container, run under
    ///   other credentials, would lose the protection).
    fn may_still_copy(&self, pid: u32) -> bool {
        if pid == 0 || pid == std::process::id() {
            return false;
        }
        match std::fs::read(format!("/proc/{pid}/maps")) {
            Ok(maps) => maps
                .split(|&b| b == b'\n')
                .filter_map(MapsLine::parse)
                .any(|m| self.is_board_mapping(&m)),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => pid != 1,
            Err(_) => false,
        }
    }

    /// Whether a mapping of some process is this board: its inode, and the
    /// memfd's name (the kernel may add " (deleted)" after it).
    fn is_board_mapping(&self, m: &MapsLine<'_>) -> bool {
        let first_word = m.path.split(|&b| b == b' ').next().unwrap_or_default();
        m.inode == self.inode
            && first_word.strip_prefix(b"/memfd:".as_slice()) == Some(NAME.to_bytes())
    }

    /// Frees the slots of orphaned connections whose process has exited.
    fn reap(&self) {
        let gone: Vec<u64> = {
            let mut orphans = self.orphans.lock();
            let mut gone = Vec::new();
            orphans.retain(|(conn, fd)| {
                // Unsure (poll failed): keep the slots, the safe side.
                let exited = pidfd_exited(fd).unwrap_or(false);
                if exited {
                    gone.push(*conn);
                }
                !exited
            });
            gone
        };
        for conn in gone {
            self.clear(conn);
        }
    }

    /// Frees the slots of connection `conn` (it closed cleanly), clearing
    /// them, so a finished initiator never blocks an unregister.
    pub fn release(&self, conn: u64) {
        self.peers.lock().remove(&conn);
        self.clear(conn);
    }

    fn clear(&self, conn: u64) {
        let mut owners = self.owners.lock();
        for (i, o) in owners.iter_mut().enumerate() {
            if *o == conn {
                if let Some(s) = self.map.slot(i as u32) {
                    s.store(0, Ordering::SeqCst);
                }
                *o = 0;
            }
        }
    }
}

impl RetireGuard for LeaseBoard {
    fn retire(&self) -> u64 {
        // Under the lock, so that concurrent retirements publish in order.
        let mut e = self.epoch.lock();
        *e += 1;
        self.map.epoch().store(*e, Ordering::SeqCst);
        *e
    }

    fn in_flight(&self, epoch: u64) -> usize {
        self.reap();
        (0..SLOT_COUNT)
            .filter_map(|i| self.map.slot(i))
            .map(|s| s.load(Ordering::SeqCst))
            // 0: idle; > epoch: a batch checked against this retirement.
            .filter(|&v| v != 0 && v <= epoch)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot_value(b: &LeaseBoard, i: u32) -> &AtomicU64 {
        b.map.slot(i).unwrap()
    }

    #[test]
    fn the_board_cannot_be_resized_under_its_mappings() {
        let b = LeaseBoard::create(7).unwrap();
        // SAFETY: ftruncate on the board's own descriptor; it must fail.
        let r = unsafe { libc::ftruncate(b.fd(), 0) };
        assert_eq!(r, -1);
        // SAFETY: fcntl on the board's own descriptor.
        let seals = unsafe { libc::fcntl(b.fd(), libc::F_GET_SEALS) };
        assert_eq!(seals & REQUIRED_SEALS, REQUIRED_SEALS);
        assert_ne!(
            seals & libc::F_SEAL_SEAL,
            0,
            "the seals themselves are final"
        );
    }

    #[test]
    fn a_rewritten_published_epoch_does_not_shorten_unregister() {
        let b = LeaseBoard::create(7).unwrap();
        let s = b.grant(1, 1, 0)[0];
        slot_value(&b, s).store(1, Ordering::SeqCst); // a batch checked at epoch 0
        // Someone who opened the board writes a huge epoch: the next token
        // must not wrap to 0 and stop seeing the batch.
        b.map.epoch().store(u64::MAX, Ordering::SeqCst);
        let token = b.retire();
        assert_eq!(token, 1);
        assert_eq!(b.in_flight(token), 1);
        assert_eq!(b.epoch(), 1);
    }

    /// Every slot still free, granted to new connections from `first` on.
    fn take_all(b: &LeaseBoard, first: u64) -> Vec<u32> {
        let mut all = Vec::new();
        for conn in first.. {
            let got = b.grant(conn, SLOT_COUNT, 0);
            if got.is_empty() {
                return all;
            }
            all.extend(got);
        }
        all
    }

    /// Env var that makes `child_maps_the_board` map the board at
    /// `"<path> <len>"`, as an initiator does, and keep it mapped until it
    /// is killed or its stdin closes (the parent's `Child` dropped, as when
    /// a test fails before killing it: no child outlives its test).
    const MAP_BOARD: &str = "KVFERRY_TEST_MAP_BOARD";

    /// Not a test of its own: the child of the test below.
    #[test]
    fn child_maps_the_board() {
        let Ok(spec) = std::env::var(MAP_BOARD) else {
            return;
        };
        let (path, len) = spec.split_once(' ').unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let _map = Mapping::map(file.as_raw_fd(), len.parse().unwrap()).unwrap();
        drop(file);
        println!("MAPPED");
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
    }

    /// A child process that maps `b` as an initiator does.
    fn initiator_process(b: &LeaseBoard) -> std::process::Child {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "board::tests::child_maps_the_board",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(
                MAP_BOARD,
                format!(
                    "/proc/{}/fd/{} {}",
                    std::process::id(),
                    b.fd(),
                    b.byte_len()
                ),
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mapped = out
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("MAPPED"));
        assert!(mapped, "the child did not map the board");
        child
    }

    #[test]
    fn an_unclean_close_keeps_the_slots_until_the_process_exits() {
        let b = LeaseBoard::create(7).unwrap();
        let mut child = initiator_process(&b);
        let s = b.grant(1, 1, child.id())[0];
        slot_value(&b, s).store(1, Ordering::SeqCst); // copying, checked at epoch 0
        let token = b.retire();
        b.orphan(1);
        // The peer may still be copying: the slot is neither cleared nor
        // given to another connection.
        assert_eq!(b.in_flight(token), 1);
        assert!(!take_all(&b, 2).contains(&s));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(
            b.in_flight(token),
            0,
            "its process is gone: the slot is freed"
        );
        assert_eq!(b.grant(100, SLOT_COUNT, 0), vec![s]);
    }

    #[test]
    fn a_connection_gets_at_most_what_initiators_ask_for() {
        let b = LeaseBoard::create(7).unwrap();
        assert_eq!(b.grant(1, u32::MAX, 0).len(), MAX_SLOTS_PER_CONN as usize);
        assert!(b.grant(1, 1, 0).is_empty(), "the cap counts slots held");
        assert_eq!(
            take_all(&b, 2).len(),
            (SLOT_COUNT - MAX_SLOTS_PER_CONN) as usize
        );
    }

    /// Slots of a dropped connection whose pid is not a process mapping
    /// the board (pid 1, this process, a process of no engine, none) are
    /// freed at once: nobody can be copying under them.
    #[test]
    fn an_unclean_close_of_a_process_without_the_board_frees_the_slots() {
        let mut stranger = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let b = LeaseBoard::create(7).unwrap();
        for pid in [1, std::process::id(), stranger.id(), 0, u32::MAX - 1] {
            let s = b.grant(1, SLOT_COUNT, pid);
            assert_eq!(s.len(), MAX_SLOTS_PER_CONN as usize);
            slot_value(&b, s[0]).store(1, Ordering::SeqCst);
            b.orphan(1);
            assert_eq!(b.in_flight(u64::MAX), 0, "pid {pid}: slot cleared");
            assert_eq!(take_all(&b, 2).len(), SLOT_COUNT as usize, "pid {pid}");
            for conn in 2..2 + u64::from(SLOT_COUNT) {
                b.release(conn);
            }
        }
        stranger.kill().unwrap();
        stranger.wait().unwrap();
    }

    #[test]
    fn a_clean_close_frees_the_slots_at_once() {
        let b = LeaseBoard::create(7).unwrap();
        let s = b.grant(1, 2, std::process::id());
        slot_value(&b, s[0]).store(1, Ordering::SeqCst);
        let token = b.retire();
        assert_eq!(b.in_flight(token), 1);
        b.release(1);
        assert_eq!(b.in_flight(token), 0);
        assert!(b.grant(2, 2, 0).iter().all(|i| s.contains(i)));
    }
}
