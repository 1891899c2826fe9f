//! Validation, coalescing and slicing of a batch (`kvferry::plan::plan`):
//! the work the engine does on the caller's thread before any byte moves.
//!
//! Three shapes of 32 and 1024 ops: `scattered` (nothing merges: every op
//! becomes a slice), `contiguous` (all ops merge into one run), and
//! `sliced` (few large ops cut into 4 MiB slices).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvferry::memory::{Location, RegionDesc, Registry};
use kvferry::plan::{Op, Opcode, plan};
use kvferry::segment::Segment;

const LOCAL: u64 = 0x1000_0000;
const REMOTE: u64 = 0x9000_0000;
const REGION: u64 = 1 << 30;

fn setup() -> (Registry, Segment) {
    let local = Registry::new();
    let host = |addr| RegionDesc {
        addr,
        len: REGION,
        location: Location::Host,
    };
    local.register(&[host(LOCAL)]).expect("register");
    let seg = Segment {
        name: "127.0.0.1:1".into(),
        instance_id: 1,
        epoch: 1,
        host_id: "bench".into(),
        pid: 1,
        regions: vec![host(REMOTE)],
        exports: Default::default(),
    };
    (local, seg)
}

fn ops(n: u64, block: u64, contiguous: bool) -> Vec<Op> {
    (0..n)
        .map(|i| {
            let r = if contiguous { i } else { n - 1 - i };
            Op {
                local: LOCAL + i * block,
                remote: REMOTE + r * block,
                len: block,
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let (local, seg) = setup();
    let mut g = c.benchmark_group("plan");
    for n in [32u64, 1024] {
        g.throughput(Throughput::Elements(n));
        for (name, list) in [
            ("scattered", ops(n, 16 << 10, false)),
            ("contiguous", ops(n, 16 << 10, true)),
        ] {
            g.bench_with_input(BenchmarkId::new(name, n), &list, |b, list| {
                b.iter(|| plan(Opcode::Read, list, &local, &seg, 4 << 20).expect("plan"))
            });
        }
    }
    // 8 ops of 64 MiB, scattered: 128 slices of 4 MiB.
    let big = ops(8, 64 << 20, false);
    g.throughput(Throughput::Elements(8));
    g.bench_function("sliced/8x64MiB", |b| {
        b.iter(|| plan(Opcode::Write, &big, &local, &seg, 4 << 20).expect("plan"))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
