//! What an engine publishes about itself to its peers.

use std::collections::BTreeMap;

use crate::memory::{Location, RegionDesc};

/// An engine's public description: peers validate remote addresses against
/// it and use its identity to notice restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// The engine's `"host:port"`.
    pub name: String,
    /// Random per engine start: a different value means the peer restarted.
    pub instance_id: u64,
    /// Bumped on every (un)registration.
    pub epoch: u64,
    /// Identifies the machine (same value = same host, so cma can be used).
    pub host_id: String,
    pub pid: u32,
    /// Registered regions, sorted by address, non-overlapping.
    pub regions: Vec<RegionDesc>,
    /// Per device region (by start address), what its device runtime
    /// exported for same-host peers to map it (an Ascend IPC key). Absent
    /// for host regions and for device regions that were not exported.
    pub exports: BTreeMap<u64, Vec<u8>>,
}

impl Segment {
    /// The region holding all of `[addr, addr + len)`, if any. `addr + len`
    /// must already be known not to overflow.
    pub fn find(&self, addr: u64, len: u64) -> Option<&RegionDesc> {
        let i = self.regions.partition_point(|r| r.addr <= addr);
        let r = self.regions.get(i.checked_sub(1)?)?;
        r.contains(addr, len).then_some(r)
    }

    /// Whether any region is device memory (such regions never go through
    /// the host transports: their bytes are not in the owner's host memory).
    pub fn has_device_regions(&self) -> bool {
        self.regions.iter().any(|r| r.location != Location::Host)
    }

    /// The export of the region starting at `region_addr`, if it has one.
    pub fn export(&self, region_addr: u64) -> Option<&[u8]> {
        self.exports.get(&region_addr).map(Vec::as_slice)
    }
}

/// A random 64-bit id, different for every engine started on any host.
///
/// Mixes the clock, the pid, a process-wide counter and the address of a
/// stack value through SplitMix64; enough to tell two starts of a peer apart,
/// which is all an instance id is for.
pub(crate) fn random_instance_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let local = 0u8;
    let mut x = nanos
        ^ (u64::from(std::process::id()) << 32)
        ^ COUNTER.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
        ^ (&local as *const u8 as u64);
    // SplitMix64 finaliser.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (x ^ (x >> 31)).max(1)
}

/// This machine's identity: the kernel's boot id (unique per boot of a host),
/// else the hostname.
pub(crate) fn host_identity() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_needs_one_region() {
        let r = |addr, len| RegionDesc {
            addr,
            len,
            location: Location::Host,
        };
        let s = Segment {
            name: "h:1".into(),
            instance_id: 1,
            epoch: 1,
            host_id: String::new(),
            pid: 1,
            regions: vec![r(0x1000, 0x100), r(0x1100, 0x100), r(0x4000, 0x10)],
            exports: BTreeMap::new(),
        };
        assert_eq!(s.find(0x1000, 0x100).map(|r| r.addr), Some(0x1000));
        assert_eq!(s.find(0x1150, 0xb0).map(|r| r.addr), Some(0x1100));
        assert!(s.find(0x10f0, 0x20).is_none());
        assert!(s.find(0x0, 1).is_none());
        assert!(s.find(0x4010, 1).is_none());
        assert!(s.find(0x2000, 1).is_none());
    }

    #[test]
    fn instance_ids_differ() {
        let a = random_instance_id();
        let b = random_instance_id();
        assert_ne!(a, b);
        assert_ne!(a, 0);
    }
}
