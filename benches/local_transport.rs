//! The in-process path against plain memcpy of the same bytes, in the same
//! run: batches of 32 ops of 4 KiB, 64 KiB, 1 MiB and 16 MiB.
//!
//! Ops are separated by a 4 KiB gap so the engine cannot coalesce them:
//! both sides copy exactly the same 32 ranges. The ratio of the two
//! throughputs is what matters (docs/benchmarks.md).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvferry::{Engine, EngineConfig, Op};

const BATCH: u64 = 32;
const GAP: u64 = 4096;

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("local_batch32");
    for size in [4u64 << 10, 64 << 10, 1 << 20, 16 << 20] {
        let span = (BATCH * (size + GAP)) as usize;
        // Filled (not just allocated) so page faults stay out of the loop.
        let mut src = vec![0xa5u8; span];
        let mut dst = vec![0x5au8; span];
        let ops: Vec<Op> = (0..BATCH)
            .map(|i| Op {
                local: dst.as_ptr() as u64 + i * (size + GAP),
                remote: src.as_ptr() as u64 + i * (size + GAP),
                len: size,
            })
            .collect();
        group.throughput(Throughput::Bytes(BATCH * size));

        group.bench_with_input(BenchmarkId::new("memcpy", size), &size, |b, &size| {
            b.iter(|| {
                for op in &ops {
                    // SAFETY: both ranges lie inside `src` / `dst`, which
                    // outlive the loop; they do not overlap.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            op.remote as *const u8,
                            op.local as *mut u8,
                            size as usize,
                        )
                    };
                }
            })
        });

        let reader = Engine::new(EngineConfig::new().port(0)).expect("engine");
        let owner = Engine::new(EngineConfig::new().port(0)).expect("engine");
        // SAFETY: the engines are dropped at the end of this iteration of
        // the size loop, before `src` and `dst`.
        unsafe {
            reader
                .register_memory(dst.as_mut_ptr() as u64, span as u64, "cpu:0")
                .expect("register");
            owner
                .register_memory(src.as_mut_ptr() as u64, span as u64, "cpu:0")
                .expect("register");
        }
        let peer = owner.name().to_owned();
        group.bench_with_input(BenchmarkId::new("kvferry_read", size), &size, |b, _| {
            b.iter(|| reader.read(&peer, &ops).expect("read"))
        });
        drop((reader, owner));
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
