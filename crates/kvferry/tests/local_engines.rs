//! Two engines in one process, through the public API, as a user drives them.

use std::sync::Arc;
use std::time::Duration;

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
