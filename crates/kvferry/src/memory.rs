//! Registered memory: locations, regions and the per-engine registry.
//!
//! A region is `[addr, addr + len)` that the owner promised stays valid until
//! it is unregistered. Transfers pin the regions they touch (an `Arc` clone);
//! unregistering waits for pins to drop, so kvferry never touches memory the
//! owner has been told it may free.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use crate::error::{Error, Result};

/// Where a region lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Location {
    /// Host memory.
    Host,
    /// Device memory of NPU `N`.
    Npu(u32),
}

/// What a caller asked for: a concrete location, or `"*"` (detect).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LocationHint {
    Exactly(Location),
    /// Mooncake's `"*"`: ask the device runtime, host memory when none claims it.
    Detect,
}

impl FromStr for LocationHint {
    type Err = Error;

    /// Accepts Mooncake's strings: `"cpu"`, `"cpu:N"`, `"host"`, `"npu:N"`, `"*"`
    /// and the empty string (same as `"*"`).
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::BadLocation {
            location: s.to_owned(),
        };
        let t = s.trim();
        if t.is_empty() || t == "*" {
            return Ok(LocationHint::Detect);
        }
        let (kind, index) = match t.split_once(':') {
            Some((k, i)) => (k, Some(i)),
            None => (t, None),
        };
        let index = match index {
            Some(i) => Some(i.parse::<u32>().map_err(|_| bad())?),
            None => None,
        };
        match (kind.to_ascii_lowercase().as_str(), index) {
            ("cpu" | "host", _) => Ok(LocationHint::Exactly(Location::Host)),
            ("npu", Some(n)) => Ok(LocationHint::Exactly(Location::Npu(n))),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Host => write!(f, "cpu:0"),
            Location::Npu(n) => write!(f, "npu:{n}"),
        }
    }
}

/// The public description of a region, as peers see it in a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RegionDesc {
    pub addr: u64,
    pub len: u64,
    pub location: Location,
}

impl RegionDesc {
    /// One past the last byte. Registration guarantees it does not overflow.
    pub fn end(&self) -> u64 {
        self.addr + self.len
    }

    /// Whether `[addr, addr + len)` lies inside this region. `addr + len`
    /// must already be known not to overflow.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.addr && addr + len <= self.end()
    }
}

/// A registered region. Transfers hold an `Arc<Region>` (a pin) while they
/// touch its bytes.
#[derive(Debug)]
pub struct Region {
    desc: RegionDesc,
    /// Set when unregistration starts: lookups stop handing out new pins.
    closing: AtomicBool,
}

impl Region {
    pub fn desc(&self) -> RegionDesc {
        self.desc
    }
}

/// A pinned region: while it lives, the region is not unregistered.
pub type Pin = Arc<Region>;

/// Transfers the registry cannot see as pins: users of a region who
/// checked it against a published list instead (the cma lease board,
/// board.rs). `unregister` calls `retire` once the regions are marked
/// closing, then waits while `in_flight` is non-zero, as it waits for pins.
pub trait RetireGuard: Send + Sync + fmt::Debug {
    /// Starts a retirement (after the regions were marked closing) and
    /// returns its token.
    fn retire(&self) -> u64;
    /// How many transfers that may have checked their ranges before
    /// retirement `token` are still running.
    fn in_flight(&self, token: u64) -> usize;
}

/// The regions of one engine. Regions never overlap.
#[derive(Debug, Default)]
pub struct Registry {
    regions: RwLock<BTreeMap<u64, Arc<Region>>>,
    /// Bumped on every successful register / unregister.
    epoch: AtomicU64,
    /// Set once by the engine when it has a lease board.
    guard: OnceLock<Arc<dyn RetireGuard>>,
}

fn check_new(map: &BTreeMap<u64, Arc<Region>>, desc: &RegionDesc) -> Result<()> {
    if desc.len == 0 {
        return Err(Error::ZeroLengthRegion { addr: desc.addr });
    }
    let end = desc
        .addr
        .checked_add(desc.len)
        .ok_or(Error::RegionOverflow {
            addr: desc.addr,
            len: desc.len,
        })?;
    // The only candidates for overlap: the last region starting before `end`.
    if let Some((_, r)) = map.range(..end).next_back()
        && r.desc.end() > desc.addr
    {
        return Err(Error::RegionOverlap {
            addr: desc.addr,
            len: desc.len,
            other_addr: r.desc.addr,
            other_len: r.desc.len,
        });
    }
    Ok(())
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Installs the guard `unregister` waits on besides pins (once; a
    /// second call is ignored).
    pub fn set_retire_guard(&self, guard: Arc<dyn RetireGuard>) {
        let _ = self.guard.set(guard);
    }

    /// The current epoch: changes whenever the set of regions changes.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Registers all regions or none: on any error nothing changes.
    pub fn register(&self, descs: &[RegionDesc]) -> Result<()> {
        let mut map = self.regions.write();
        // Validate against the map and against each other before inserting.
        let mut staged: BTreeMap<u64, Arc<Region>> = BTreeMap::new();
        for d in descs {
            check_new(&map, d)?;
            check_new(&staged, d)?;
            staged.insert(
                d.addr,
                Arc::new(Region {
                    desc: *d,
                    closing: AtomicBool::new(false),
                }),
            );
        }
        map.append(&mut staged);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Unregisters all regions starting at `addrs`, or none.
    ///
    /// Waits up to `wait` for in-flight transfers that pinned them (and for
    /// those the retire guard knows of); if they are still running then,
    /// the regions stay registered and `RegionBusy` is returned, so the
    /// caller never frees memory under a transfer.
    pub fn unregister(&self, addrs: &[u64], wait: Duration) -> Result<()> {
        let targets: Vec<Arc<Region>> = {
            // Write lock: checking and marking `closing` must be one step, so
            // two racing unregisters of one region cannot both succeed.
            let map = self.regions.write();
            let mut seen = std::collections::HashSet::new();
            let mut out = Vec::with_capacity(addrs.len());
            for &a in addrs {
                let r = map.get(&a).ok_or(Error::NotRegistered { addr: a })?;
                if r.closing.load(Ordering::Acquire) || !seen.insert(a) {
                    return Err(Error::NotRegistered { addr: a });
                }
                out.push(Arc::clone(r));
            }
            for r in &out {
                r.closing.store(true, Ordering::Release);
            }
            out
        };
        // After `closing` is set: lists built from now on leave the regions
        // out, and the guard waits for users of older lists (board.rs).
        let retired = self.guard.get().map(|g| (g, g.retire()));
        let start = Instant::now();
        // Pins: the map's reference and `targets`' own are not transfers.
        let busy = |r: &Arc<Region>| Arc::strong_count(r).saturating_sub(2);
        let guarded = || retired.map_or(0, |(g, token)| g.in_flight(token));
        let mut pause = Duration::from_micros(20);
        loop {
            let stuck = targets
                .iter()
                .find(|r| busy(r) > 0)
                .map(|r| (r.desc.addr, busy(r)))
                .or_else(|| {
                    let n = guarded();
                    (n > 0).then(|| (targets.first().map_or(0, |r| r.desc.addr), n))
                });
            let Some((addr, in_flight)) = stuck else {
                break;
            };
            if start.elapsed() >= wait {
                // Registered again; the guard's retirement only makes its
                // users refresh their lists.
                for r in &targets {
                    r.closing.store(false, Ordering::Release);
                }
                return Err(Error::RegionBusy {
                    addr,
                    in_flight,
                    waited_ms: wait.as_millis() as u64,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
        let mut map = self.regions.write();
        for r in &targets {
            map.remove(&r.desc.addr);
        }
        self.epoch.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Pins the region that holds all of `[addr, addr + len)`, if one does.
    /// `addr + len` must already be known not to overflow.
    pub fn pin(&self, addr: u64, len: u64) -> Option<Pin> {
        let map = self.regions.read();
        let (_, r) = map.range(..=addr).next_back()?;
        if r.desc.contains(addr, len) && !r.closing.load(Ordering::Acquire) {
            Some(Arc::clone(r))
        } else {
            None
        }
    }

    /// A snapshot of all regions, in address order.
    pub fn descs(&self) -> Vec<RegionDesc> {
        self.regions
            .read()
            .values()
            .filter(|r| !r.closing.load(Ordering::Acquire))
            .map(|r| r.desc)
            .collect()
    }

    /// The starting addresses of all regions (used when an engine shuts down).
    pub fn addrs(&self) -> Vec<u64> {
        self.regions.read().keys().copied().collect()
    }
}

/// The memory mappings of this process, from `/proc/self/maps`, in address
/// order.
///
/// Registration checks host regions against them: a peer engine of this
/// process copies to and from registered memory with `memcpy` (the local
/// transport), so a range that is not mapped readable and writable here
/// would crash the process (SIGSEGV) on that peer's first transfer instead
/// of failing its registration (the socket and cma paths would fail with
/// EFAULT, later than they need to). The kernel has the only complete
/// view; reading and parsing it took 1.7 ms for 8000 mappings (release
/// build, 2-core VM), and is done once per registration call, however many
/// regions it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostMappings {
    maps: Vec<MapRange>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MapRange {
    start: u64,
    end: u64,
    /// The permission field as the kernel writes it: `rw-p`, `r--s`, ...
    perms: [u8; 4],
}

impl MapRange {
    fn read_write(&self) -> bool {
        self.perms[0] == b'r' && self.perms[1] == b'w'
    }
}

const MAPS: &str = "/proc/self/maps";

/// One line of a `/proc/<pid>/maps` file: `start-end perms offset dev
/// inode [path]`, addresses in hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MapsLine<'a> {
    pub start: u64,
    pub end: u64,
    /// The permission field as the kernel writes it: `rw-p`, `r--s`, ...
    pub perms: [u8; 4],
    pub inode: u64,
    /// Empty for an anonymous mapping. Bytes: file names need not be UTF-8.
    pub path: &'a [u8],
}

impl<'a> MapsLine<'a> {
    /// The line's fields, or None when it is not a maps line.
    pub(crate) fn parse(line: &'a [u8]) -> Option<MapsLine<'a>> {
        let mut fields = line.split(|&b| b == b' ').filter(|f| !f.is_empty());
        let text = |f: &'a [u8]| std::str::from_utf8(f).ok();
        let (start, end) = text(fields.next()?)?.split_once('-')?;
        let start = u64::from_str_radix(start, 16).ok()?;
        let end = u64::from_str_radix(end, 16).ok()?;
        let perms: [u8; 4] = fields.next()?.try_into().ok()?;
        let inode = text(fields.nth(2)?)?.parse().ok()?;
        // The path is the rest of the line, spaces included.
        let path = match fields.next() {
            Some(first) => {
                let at = first.as_ptr() as usize - line.as_ptr() as usize;
                &line[at..]
            }
            None => &[],
        };
        (start <= end).then_some(MapsLine {
            start,
            end,
            perms,
            inode,
            path,
        })
    }
}

impl HostMappings {
    /// This process's mappings now.
    pub fn of_this_process() -> Result<Self> {
        // Bytes, not a String: mapped file names need not be UTF-8.
        let text = std::fs::read(MAPS).map_err(|e| {
            Error::io(
                format!("reading {MAPS} to check that host memory to register is mapped"),
                e,
            )
        })?;
        Self::parse(&text)
    }

    /// Parses the text of a `maps` file ([`MapsLine`]); a line that is not
    /// one is an error, not a guess.
    pub fn parse(text: &[u8]) -> Result<Self> {
        let mut maps = Vec::new();
        for (n, line) in text.split(|&b| b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let m = MapsLine::parse(line).ok_or_else(|| Error::Internal {
                what: format!(
                    "{MAPS} line {}: cannot parse {:?}",
                    n + 1,
                    String::from_utf8_lossy(line)
                ),
            })?;
            maps.push(MapRange {
                start: m.start,
                end: m.end,
                perms: m.perms,
            });
        }
        // The walk below relies on address order: the kernel's, made sure.
        maps.sort_by_key(|m| m.start);
        Ok(HostMappings { maps })
    }

    /// Where `[addr, end)` is not readable and writable memory, if it is
    /// not: the first such address, and what is there ("nothing is mapped
    /// at ..." or the mapping and its permissions). Adjacent mappings count
    /// as one (a buffer may span mappings the kernel keeps apart, e.g.
    /// after an `mprotect` of a neighbour or across a file mapping placed
    /// at its end).
    pub fn find_gap(&self, addr: u64, end: u64) -> Option<String> {
        let mut gap = addr;
        // The first mapping that ends past `gap`: the one holding it, if any.
        let holder = loop {
            if gap >= end {
                return None;
            }
            let i = self.maps.partition_point(|m| m.end <= gap);
            match self.maps.get(i) {
                Some(m) if m.start <= gap && m.read_write() => gap = m.end,
                other => break other.filter(|m| m.start <= gap),
            }
        };
        Some(match holder {
            Some(m) => format!(
                "{gap:#x} lies in the mapping [{:#x}, {:#x}) with permissions {}",
                m.start,
                m.end,
                String::from_utf8_lossy(&m.perms)
            ),
            _ => format!("nothing is mapped at {gap:#x}"),
        })
    }

    /// Refuses `desc` unless all of it is readable and writable memory here.
    /// `desc.addr + desc.len` must already be known not to overflow.
    pub fn check(&self, desc: &RegionDesc) -> Result<()> {
        match self.find_gap(desc.addr, desc.end()) {
            None => Ok(()),
            Some(detail) => Err(Error::RegionNotMapped {
                addr: desc.addr,
                len: desc.len,
                detail,
            }),
        }
    }
}

/// Refuses host regions of `descs` that are not wholly readable and
/// writable memory of this process ([`HostMappings`]), reading the mappings
/// once for all of them. Device regions are the device runtime's to check
/// (their addresses need not be host mappings at all), and regions of zero
/// length or that overflow are left to the registry, which names them.
pub fn check_host_mapped(descs: &[RegionDesc]) -> Result<()> {
    let mut host = descs
        .iter()
        .filter(|d| {
            d.location == Location::Host && d.len > 0 && d.addr.checked_add(d.len).is_some()
        })
        .peekable();
    if host.peek().is_none() {
        return Ok(());
    }
    let maps = HostMappings::of_this_process()?;
    host.try_for_each(|d| maps.check(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(addr: u64, len: u64) -> RegionDesc {
        RegionDesc {
            addr,
            len,
            location: Location::Host,
        }
    }

    #[test]
    fn location_strings() {
        use LocationHint::*;
        assert_eq!(
            "cpu:0".parse::<LocationHint>().ok(),
            Some(Exactly(Location::Host))
        );
        assert_eq!(
            "npu:3".parse::<LocationHint>().ok(),
            Some(Exactly(Location::Npu(3)))
        );
        assert_eq!("*".parse::<LocationHint>().ok(), Some(Detect));
        assert_eq!("".parse::<LocationHint>().ok(), Some(Detect));
        for bad in ["npu", "npu:x", "gpu:0", "cpu:-1", "npu:1:2"] {
            assert!(
                matches!(bad.parse::<LocationHint>(), Err(Error::BadLocation { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn register_rejects_bad_regions_atomically() {
        let r = Registry::new();
        r.register(&[host(0x1000, 0x1000)]).unwrap();
        let e0 = r.epoch();
        assert!(matches!(
            r.register(&[host(0x5000, 0)]),
            Err(Error::ZeroLengthRegion { .. })
        ));
        assert!(matches!(
            r.register(&[host(0x1800, 0x10)]),
            Err(Error::RegionOverlap { .. })
        ));
        assert!(matches!(
            r.register(&[host(0x800, 0x801)]),
            Err(Error::RegionOverlap { .. })
        ));
        // Overlap inside one batch: nothing of the batch is registered.
        assert!(matches!(
            r.register(&[host(0x9000, 0x100), host(0x9050, 0x100)]),
            Err(Error::RegionOverlap { .. })
        ));
        assert!(r.pin(0x9000, 1).is_none());
        assert!(matches!(
            r.register(&[host(u64::MAX - 1, 4)]),
            Err(Error::RegionOverflow { .. })
        ));
        assert_eq!(r.epoch(), e0);
        // Adjacent is fine.
        r.register(&[host(0x2000, 0x10), host(0x800, 0x800)])
            .unwrap();
        assert_eq!(r.descs().len(), 3);
    }

    #[test]
    fn unregister_rules() {
        let r = Registry::new();
        r.register(&[host(0x1000, 0x100), host(0x2000, 0x100)])
            .unwrap();
        let w = Duration::from_millis(10);
        assert!(matches!(
            r.unregister(&[0x1001], w),
            Err(Error::NotRegistered { .. })
        ));
        // All or nothing: one unknown address leaves the other registered.
        assert!(r.unregister(&[0x1000, 0x3000], w).is_err());
        assert!(r.pin(0x1000, 1).is_some());
        r.unregister(&[0x1000], w).unwrap();
        assert!(matches!(
            r.unregister(&[0x1000], w),
            Err(Error::NotRegistered { .. })
        ));
        assert!(r.pin(0x1000, 1).is_none());
    }

    #[test]
    fn pinned_region_is_not_unregistered_until_released() {
        let r = Arc::new(Registry::new());
        r.register(&[host(0x1000, 0x100)]).unwrap();
        let pin = r.pin(0x1010, 0x10).unwrap();
        let e = r
            .unregister(&[0x1000], Duration::from_millis(20))
            .unwrap_err();
        assert!(matches!(e, Error::RegionBusy { in_flight: 1, .. }), "{e}");
        // Still registered and usable.
        assert!(r.pin(0x1000, 0x100).is_some());
        let r2 = Arc::clone(&r);
        let t = std::thread::spawn(move || r2.unregister(&[0x1000], Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(30));
        drop(pin);
        t.join().unwrap().unwrap();
        assert!(r.pin(0x1000, 1).is_none());
    }

    /// A guard that records what the registry showed when it was called.
    #[derive(Debug, Default)]
    struct FakeGuard {
        registry: OnceLock<std::sync::Weak<Registry>>,
        listed_at_retire: std::sync::Mutex<Vec<usize>>,
        users: AtomicU64,
    }

    impl RetireGuard for FakeGuard {
        fn retire(&self) -> u64 {
            let n = self
                .registry
                .get()
                .and_then(|w| w.upgrade())
                .map_or(usize::MAX, |r| r.descs().len());
            self.listed_at_retire.lock().unwrap().push(n);
            7
        }
        fn in_flight(&self, token: u64) -> usize {
            assert_eq!(token, 7);
            self.users.load(Ordering::SeqCst) as usize
        }
    }

    #[test]
    fn unregister_retires_after_closing_and_waits_for_the_guard() {
        let r = Arc::new(Registry::new());
        let g = Arc::new(FakeGuard::default());
        g.registry.set(Arc::downgrade(&r)).unwrap();
        r.set_retire_guard(g.clone());
        r.register(&[host(0x1000, 0x100), host(0x2000, 0x100)])
            .unwrap();
        g.users.store(1, Ordering::SeqCst);
        let e = r
            .unregister(&[0x1000], Duration::from_millis(20))
            .unwrap_err();
        assert!(matches!(e, Error::RegionBusy { in_flight: 1, .. }), "{e}");
        // Rolled back: listed and usable again.
        assert_eq!(r.descs().len(), 2);
        assert!(r.pin(0x1000, 1).is_some());
        let (r2, g2) = (Arc::clone(&r), Arc::clone(&g));
        let t = std::thread::spawn(move || r2.unregister(&[0x1000], Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(30));
        g2.users.store(0, Ordering::SeqCst);
        t.join().unwrap().unwrap();
        // Each retirement saw the region already out of the list.
        assert_eq!(*g.listed_at_retire.lock().unwrap(), vec![1, 1]);
        assert_eq!(r.descs().len(), 1);
    }

    const MAPS_TEXT: &[u8] = b"\
55d0c0a00000-55d0c0a21000 r--p 00000000 fd:01 1234   /usr/bin/python3.12
55d0c0a21000-55d0c0a40000 rw-p 00021000 fd:01 1234   /usr/bin/python3.12
55d0c0a40000-55d0c0a60000 rw-p 00000000 00:00 0      [heap]
7f0000000000-7f0000001000 ---p 00000000 00:00 0
7f0000001000-7f0000002000 rw-s 00000000 00:01 99     /memfd:kv\xff (deleted)
7f0000003000-7f0000004000 r--p 00000000 00:00 0
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]
";

    fn not_mapped(maps: &HostMappings, addr: u64, len: u64) -> String {
        match maps.check(&host(addr, len)) {
            Err(e @ Error::RegionNotMapped { .. }) => e.to_string(),
            other => panic!("[{addr:#x}, +{len}): {other:?}"),
        }
    }

    #[test]
    fn maps_are_parsed_and_adjacent_writable_mappings_merge() {
        let maps = HostMappings::parse(MAPS_TEXT).unwrap();
        assert_eq!(maps.maps.len(), 7);
        // The path is the rest of the line, whatever its bytes and spaces.
        let memfd = MAPS_TEXT.split(|&b| b == b'\n').nth(4).unwrap();
        let m = MapsLine::parse(memfd).unwrap();
        assert_eq!(
            (m.start, m.end, m.inode),
            (0x7f0000001000, 0x7f0000002000, 99)
        );
        assert_eq!(
            (&m.perms, m.path),
            (b"rw-s", &b"/memfd:kv\xff (deleted)"[..])
        );
        let anon = MAPS_TEXT.split(|&b| b == b'\n').nth(3).unwrap();
        assert_eq!(MapsLine::parse(anon).unwrap().path, b"");
        // One rw mapping; two adjacent ones (data segment, heap) as one.
        maps.check(&host(0x55d0c0a21000, 0x100)).unwrap();
        maps.check(&host(0x55d0c0a21000, 0x3f000)).unwrap();
        maps.check(&host(0x7f0000001000, 0x1000)).unwrap();
        // Read-only, guard (---p), and the read-only mapping before a rw one.
        let e = not_mapped(&maps, 0x55d0c0a1f000, 0x2000);
        assert!(e.contains("with permissions r--p"), "{e}");
        assert!(e.contains("0x55d0c0a1f000"), "{e}");
        let e = not_mapped(&maps, 0x7f0000000800, 16);
        assert!(e.contains("---p"), "{e}");
        // Past the end of a mapping: into a gap, and into a read-only one.
        let e = not_mapped(&maps, 0x55d0c0a5f000, 0x2000);
        assert!(e.contains("nothing is mapped at 0x55d0c0a60000"), "{e}");
        let e = not_mapped(&maps, 0x7f0000001000, 0x1001);
        assert!(e.contains("nothing is mapped at 0x7f0000002000"), "{e}");
        let e = not_mapped(&maps, 0x7f0000003000, 1);
        assert!(e.contains("r--p"), "{e}");
        let e = not_mapped(&maps, 0x1000, 4096);
        assert!(e.contains("[0x1000, +4096)"), "{e}");
        assert!(e.contains("nothing is mapped at 0x1000"), "{e}");
        not_mapped(&maps, 0xffffffffff600000, 8);
        assert!(HostMappings::parse(b"").unwrap().maps.is_empty());
    }

    #[test]
    fn unparsable_maps_are_an_error_not_a_guess() {
        for bad in [
            &b"55d0c0a00000 rw-p 0 0:0 0\n"[..],
            b"55d0c0a00000-zz rw-p 0 0:0 0\n",
            b"2000-1000 rw-p 0 0:0 0\n",
            b"1000-2000\n",
            b"1000-2000 rw 0 0:0 0\n",
        ] {
            let e = HostMappings::parse(bad).unwrap_err();
            assert!(e.to_string().contains("/proc/self/maps line 1"), "{e}");
        }
    }

    #[test]
    fn check_host_mapped_reads_this_process() {
        let mut buf = vec![0u8; 8192];
        let a = buf.as_mut_ptr() as u64;
        check_host_mapped(&[host(a, 8192), host(a + 100, 1)]).unwrap();
        // Zero lengths and overflows are the registry's to name.
        check_host_mapped(&[host(0x1000, 0), host(u64::MAX - 1, 4)]).unwrap();
        // Device regions are the runtime's to check.
        check_host_mapped(&[RegionDesc {
            addr: 0x1000,
            len: 4096,
            location: Location::Npu(0),
        }])
        .unwrap();
        let e = check_host_mapped(&[host(a, 8192), host(0x1000, 4096)]).unwrap_err();
        assert!(
            matches!(e, Error::RegionNotMapped { addr: 0x1000, .. }),
            "{e}"
        );
        drop(buf);
    }

    #[test]
    fn pin_requires_whole_range_in_one_region() {
        let r = Registry::new();
        r.register(&[host(0x1000, 0x100), host(0x1100, 0x100)])
            .unwrap();
        assert!(r.pin(0x1000, 0x100).is_some());
        assert!(r.pin(0x10ff, 2).is_none(), "spans two regions");
        assert!(r.pin(0xfff, 1).is_none());
        assert!(r.pin(0x1200, 1).is_none());
    }
}
