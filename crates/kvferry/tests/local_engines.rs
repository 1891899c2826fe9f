//! Two engines in one process, through the public API, as a user drives them.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Mapping, PAGE};
use kvferry::{BatchId, BatchState, Engine, EngineConfig, Error, Op, OpState, Opcode};

/// Memory that outlives the engines registered on it in every test.
struct Buf(Vec<u8>);

impl Buf {
    fn pattern(len: usize, seed: u8) -> Buf {
        Buf((0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect())
    }
    fn zeros(len: usize) -> Buf {
        Buf(vec![0; len])
    }
    fn addr(&self) -> u64 {
        self.0.as_ptr() as u64
    }
}

fn engine() -> Engine {
    Engine::new(
        EngineConfig::new()
            .port(0)
            .transfer_timeout(Duration::from_millis(300)),
    )
    .unwrap()
}

fn register(e: &Engine, b: &mut Buf) {
    // SAFETY: every test drops its engines before its buffers.
    unsafe { e.register_memory(b.0.as_mut_ptr() as u64, b.0.len() as u64, "cpu:0") }.unwrap();
}

#[test]
fn sync_read_and_write_move_exact_bytes() {
    let (mut src, mut dst) = (Buf::pattern(1 << 20, 3), Buf::zeros(1 << 20));
    let (a, b) = (engine(), engine());
    register(&a, &mut dst);
    register(&b, &mut src);
    // Read blocks in reverse order, 64 KiB each, plus an odd tail.
    let ops: Vec<Op> = (0..15)
        .rev()
        .map(|i| Op {
            local: dst.addr() + i * 65536,
            remote: src.addr() + i * 65536,
            len: 65536,
        })
        .chain([Op {
            local: dst.addr() + 15 * 65536,
            remote: src.addr() + 15 * 65536,
            len: 65535,
        }])
        .collect();
    a.read(b.name(), &ops).unwrap();
    assert_eq!(&dst.0[..(1 << 20) - 1], &src.0[..(1 << 20) - 1]);
    assert_eq!(
        dst.0[(1 << 20) - 1],
        0,
        "a byte outside every op was written"
    );

    // Write back a changed first block.
    dst.0[..4096].fill(0xee);
    a.write(
        b.name(),
        &[Op {
            local: dst.addr(),
            remote: src.addr() + 8192,
            len: 4096,
        }],
    )
    .unwrap();
    drop((a, b));
    assert!(src.0[8192..12288].iter().all(|&x| x == 0xee));
}

#[test]
fn async_submit_poll_wait_and_per_op_status() {
    let (mut src, mut dst) = (Buf::pattern(256 << 10, 9), Buf::zeros(256 << 10));
    let (a, b) = (engine(), engine());
    register(&a, &mut dst);
    register(&b, &mut src);
    let ops: Vec<Op> = (0..32)
        .map(|i| Op {
            local: dst.addr() + i * 8192,
            remote: src.addr() + i * 8192,
            len: 8192,
        })
        .collect();
    let id = a.submit(b.name(), Opcode::Read, &ops).unwrap();
    assert_ne!(id.0, 0);
    a.wait(id, Duration::from_secs(5)).unwrap();
    assert!(matches!(a.poll(id).unwrap(), BatchState::Done));
    assert_eq!(a.op_state(id, 31).unwrap(), OpState::Done);
    assert!(a.op_state(id, 32).is_err());
    a.free_batch(id).unwrap();
    assert!(matches!(a.poll(id), Err(Error::BadBatchId { .. })));
    assert!(matches!(a.free_batch(id), Err(Error::BadBatchId { .. })));
    assert!(matches!(
        a.wait(BatchId(0xdead_beef), Duration::ZERO),
        Err(Error::BadBatchId { .. })
    ));
    drop((a, b));
    assert_eq!(dst.0, src.0);
}

#[test]
fn bad_ops_are_refused_and_nothing_moves() {
    let (mut src, mut dst) = (Buf::pattern(8192, 1), Buf::zeros(8192));
    let (a, b) = (engine(), engine());
    register(&a, &mut dst);
    register(&b, &mut src);
    let good = Op {
        local: dst.addr(),
        remote: src.addr(),
        len: 4096,
    };
    let bad_ops = [
        Op { len: 0, ..good },
        Op {
            local: dst.addr() + 4096,
            len: 4097,
            ..good
        },
        Op {
            remote: src.addr() + 8000,
            ..good
        },
        Op {
            local: 0x10,
            ..good
        },
        Op {
            remote: u64::MAX - 10,
            ..good
        },
    ];
    for bad in bad_ops {
        let e = a.read(b.name(), &[good, bad]).unwrap_err();
        assert!(e.to_string().contains("op 1"), "{e}");
        assert!(a.submit(b.name(), Opcode::Write, &[good, bad]).is_err());
    }
    for peer in ["nohost", "127.0.0.1:0", "127.0.0.1:1", "[x]:5"] {
        assert!(a.read(peer, &[good]).is_err(), "{peer}");
    }
    drop((a, b));
    assert!(dst.0.iter().all(|&x| x == 0), "a refused batch moved data");
}

#[test]
fn remote_regions_registered_later_are_found_by_refresh() {
    let (mut s1, mut s2, mut dst) = (
        Buf::pattern(4096, 1),
        Buf::pattern(4096, 2),
        Buf::zeros(4096),
    );
    let (a, b) = (engine(), engine());
    register(&a, &mut dst);
    register(&b, &mut s1);
    a.read(
        b.name(),
        &[Op {
            local: dst.addr(),
            remote: s1.addr(),
            len: 4096,
        }],
    )
    .unwrap();
    register(&b, &mut s2); // the session's cached segment lacks it
    a.read(
        b.name(),
        &[Op {
            local: dst.addr(),
            remote: s2.addr(),
            len: 4096,
        }],
    )
    .unwrap();
    assert_eq!(dst.0, s2.0);
    b.unregister_memory(s2.addr()).unwrap();
    let e = a
        .read(
            b.name(),
            &[Op {
                local: dst.addr(),
                remote: s2.addr(),
                len: 4096,
            }],
        )
        .unwrap_err();
    assert!(matches!(e, Error::RemoteOutOfRange { .. }), "{e}");
    drop((a, b));
}

#[test]
fn unregister_waits_for_in_flight_copies() {
    // A large batch on a one-worker engine keeps the region pinned while
    // another thread unregisters it: unregister must wait, never cut it short.
    let (mut src, mut dst) = (Buf::pattern(64 << 20, 5), Buf::zeros(64 << 20));
    let a = Arc::new(
        Engine::new(
            EngineConfig::new()
                .port(0)
                .async_workers(1)
                .transfer_timeout(Duration::from_secs(30)),
        )
        .unwrap(),
    );
    let b = engine();
    register(&a, &mut dst);
    register(&b, &mut src);
    let ops: Vec<Op> = (0..64)
        .map(|i| Op {
            local: dst.addr() + (i << 20),
            remote: src.addr() + (i << 20),
            len: 1 << 20,
        })
        .collect();
    let ids: Vec<_> = (0..8)
        .map(|_| a.submit(b.name(), Opcode::Read, &ops).unwrap())
        .collect();
    a.unregister_memory(dst.addr()).unwrap();
    for id in ids {
        // Every batch either finished before the unregister returned...
        assert!(matches!(a.poll(id).unwrap(), BatchState::Done));
    }
    drop((a, b));
    assert_eq!(dst.0, src.0);
}

#[test]
fn register_errors() {
    let a = engine();
    let mut m = Buf::zeros(8192);
    register(&a, &mut m);
    // SAFETY: the calls below are all refused before touching memory.
    unsafe {
        assert!(matches!(
            a.register_memory(m.addr(), 0, "cpu:0"),
            Err(Error::ZeroLengthRegion { .. })
        ));
        assert!(matches!(
            a.register_memory(m.addr() + 4096, 1, "*"),
            Err(Error::RegionOverlap { .. })
        ));
        assert!(matches!(
            a.register_memory(m.addr(), 1, "gpu:0"),
            Err(Error::BadLocation { .. })
        ));
        assert!(matches!(
            a.register_memory(m.addr(), 1, "npu:0"),
            Err(Error::Unsupported { .. })
        ));
    }
    assert!(matches!(
        a.unregister_memory(m.addr() + 1),
        Err(Error::NotRegistered { .. })
    ));
    a.unregister_memory(m.addr()).unwrap();
    assert!(matches!(
        a.unregister_memory(m.addr()),
        Err(Error::NotRegistered { .. })
    ));
}

fn not_mapped(e: &Engine, regions: &[(u64, u64)]) -> String {
    // SAFETY: refused before anything is registered (asserted below).
    match unsafe { e.register_memory_batch(regions, "cpu:0") } {
        Err(e @ Error::RegionNotMapped { .. }) => {
            assert_eq!(e.status(), kvferry::Status::RegionNotMapped);
            e.to_string()
        }
        other => panic!("{regions:x?}: {other:?}"),
    }
}

/// Registering host memory that is not readable and writable here was
/// accepted, and a peer engine of this process reading it then crashed the
/// process (SIGSEGV in the in-process copy). Now registration refuses it,
/// and the peer's read fails as any read outside registered memory does.
#[test]
fn host_memory_that_is_not_mapped_read_write_is_refused() {
    let (a, b) = (engine(), engine());
    let mut dst = Buf::zeros(4096);
    register(&a, &mut dst);

    // Unmapped (below the lowest address the kernel maps by default).
    let msg = not_mapped(&b, &[(0x1000, 4096)]);
    assert!(msg.contains("[0x1000, +4096)"), "{msg}");
    assert!(msg.contains("nothing is mapped at 0x1000"), "{msg}");
    let op = Op {
        local: dst.addr(),
        remote: 0x1000,
        len: 4096,
    };
    let e = a.read(b.name(), &[op]).unwrap_err();
    assert!(matches!(e, Error::RemoteOutOfRange { .. }), "{e}");
    // The path that would have copied from it.
    assert_eq!(a.transport_to(b.name()).unwrap(), "local");

    // Read-only memory: a peer's write would fault.
    let ro = Mapping::new(PAGE, libc::PROT_READ);
    let msg = not_mapped(&b, &[(ro.addr(), 4096)]);
    assert!(msg.contains("with permissions r--p"), "{msg}");

    // A range running past the end of its mapping (into a guard page),
    // and a batch whose other region is fine: nothing of it registered.
    let mut two = Mapping::new(2 * PAGE, libc::PROT_READ | libc::PROT_WRITE);
    two.protect(PAGE, PAGE, libc::PROT_NONE);
    let msg = not_mapped(&b, &[(two.addr(), 4097)]);
    assert!(msg.contains(&format!("{:#x}", two.addr() + 4096)), "{msg}");
    assert!(msg.contains("---p"), "{msg}");
    let mut good = Buf::zeros(4096);
    not_mapped(&b, &[(good.addr(), 4096), (0x1000, 1)]);
    assert!(b.segment().regions.is_empty());
    register(&b, &mut good);
    assert!(matches!(
        b.unregister_memory(0x1000),
        Err(Error::NotRegistered { .. })
    ));

    // Good memory over two mappings (their protections differ) is one
    // range; the inside of a mapping and the whole of one are fine too.
    let mut rw = Mapping::new(2 * PAGE, libc::PROT_READ | libc::PROT_WRITE);
    rw.protect(
        PAGE,
        PAGE,
        libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
    );
    // SAFETY: `rw` and `two` outlive `b` (dropped first below).
    unsafe {
        b.register_memory(rw.addr(), 8192, "cpu:0").unwrap();
        b.register_memory(two.addr() + 8, 4088, "cpu:0").unwrap();
    }
    // 200 bytes across the two mappings, there and back.
    dst.0[..200].copy_from_slice(&Buf::pattern(200, 3).0);
    let across = Op {
        local: dst.addr(),
        remote: rw.addr() + 4000,
        len: 200,
    };
    a.write(b.name(), &[across]).unwrap();
    // SAFETY: `rw` is mapped readable for its 8192 bytes; the write is done.
    let landed = unsafe { rw.bytes(4000, 200) };
    assert_eq!(landed, &dst.0[..200], "the write across the two mappings");
    let back = Op {
        local: dst.addr() + 1024,
        ..across
    };
    a.read(b.name(), &[back]).unwrap();
    assert_eq!(dst.0[1024..1224], dst.0[..200], "the read across them");
    drop((a, b));
}

#[test]
fn many_threads_share_one_engine() {
    let (mut src, mut dst) = (Buf::pattern(1 << 20, 7), Buf::zeros(1 << 20));
    let (a, b) = (engine(), engine());
    register(&a, &mut dst);
    register(&b, &mut src);
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let (a, b, d, r) = (&a, &b, dst.addr(), src.addr());
            s.spawn(move || {
                for k in 0..16u64 {
                    let off = (t * 16 + k) * 8192;
                    let op = Op {
                        local: d + off,
                        remote: r + off,
                        len: 8192,
                    };
                    if k % 2 == 0 {
                        a.read(b.name(), &[op]).unwrap();
                    } else {
                        let id = a.submit(b.name(), Opcode::Read, &[op]).unwrap();
                        a.wait(id, Duration::from_secs(10)).unwrap();
                        a.free_batch(id).unwrap();
                    }
                }
            });
        }
    });
    drop((a, b));
    assert_eq!(dst.0, src.0);
}
