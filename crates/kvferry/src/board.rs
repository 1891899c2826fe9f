//! The cma lease board: a small shared-memory page through which same-host
//! initiators tell a target engine "I am copying from / into your
//! registered memory right now", without a round trip per batch.
//!
//! The target creates it (a memfd, mapped `MAP_SHARED`); an initiator that
//! asked for slots over the control lane (LEASE_BOARD, docs/wire-protocol.md)
//! maps the same file through `/proc/<pid>/fd/<fd>` (allowed whenever
//! `process_vm_*` is: the same ptrace check, in a weaker mode).
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
//! The target trusts the board for nothing but waiting: a garbage slot at
//! worst makes an unregister time out with `RegionBusy`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::memory::RetireGuard;

/// `"KVFLEASE"`.
pub const MAGIC: u64 = u64::from_le_bytes(*b"KVFLEASE");
pub const VERSION: u32 = 1;
/// Slots of one board: concurrent fast-path batches of all peers together.
pub const SLOT_COUNT: u32 = 256;
/// Most slots one connection may hold.
pub const MAX_SLOTS_PER_CONN: u32 = 64;
const LINE: usize = 64;
const EPOCH_OFFSET: usize = LINE;
const SLOTS_OFFSET: usize = 2 * LINE;

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
}

impl LeaseBoard {
    /// Creates the memfd, sizes and maps it, writes the header.
    pub fn create(instance_id: u64) -> io::Result<LeaseBoard> {
        let len = board_len(SLOT_COUNT);
        // SAFETY: a NUL-terminated name and valid flags; the result is checked.
        let raw = unsafe { libc::memfd_create(c"kvferry-leases".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our own descriptor; the result is checked.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
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
        self.map.epoch().load(Ordering::SeqCst)
    }

    /// Gives connection `conn` up to `want` free slots (at most
    /// `MAX_SLOTS_PER_CONN` in all). Granted slots start at 0.
    pub fn grant(&self, conn: u64, want: u32) -> Vec<u32> {
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

    /// Frees the slots of connection `conn` (it closed), clearing them, so
    /// a dead initiator never blocks an unregister.
    pub fn release(&self, conn: u64) {
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
        self.map
            .epoch()
            .fetch_add(1, Ordering::SeqCst)
            .wrapping_add(1)
    }

    fn in_flight(&self, epoch: u64) -> usize {
        (0..SLOT_COUNT)
            .filter_map(|i| self.map.slot(i))
            .map(|s| s.load(Ordering::SeqCst))
            // 0: idle; > epoch: a batch checked against this retirement.
            .filter(|&v| v != 0 && v <= epoch)
            .count()
    }
}
