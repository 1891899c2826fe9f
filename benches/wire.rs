//! Frame encoding and decoding (`kvferry::wire`): the per-request work of
//! the tcp transport and the server besides the data itself.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvferry::memory::{Location, RegionDesc};
use kvferry::segment::Segment;
use kvferry::wire::{self, FrameHeader, Kind, Range};

fn ranges(n: u64) -> Vec<Range> {
    (0..n)
        .map(|i| Range {
            addr: 0x7f00_0000_0000 + i * (256 << 10),
            len: 128 << 10,
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire");
    g.bench_function("header/write+read+validate", |b| {
        let mut buf = Vec::with_capacity(64);
        b.iter(|| {
            buf.clear();
            let h = FrameHeader::new(Kind::ReadData, 42, 1 << 20);
            wire::write_frame(&mut buf, &h, &[]).expect("write");
            let got = wire::read_header(&mut buf.as_slice())
                .expect("read")
                .expect("header");
            got.validate().expect("valid")
        })
    });
    for n in [32u64, 1024] {
        let r = ranges(n);
        let table = wire::encode_table(7, &r);
        g.throughput(Throughput::Elements(n));
        g.bench_with_input(BenchmarkId::new("table/encode", n), &r, |b, r| {
            b.iter(|| wire::encode_table(7, r))
        });
        g.bench_with_input(BenchmarkId::new("table/decode", n), &table, |b, t| {
            b.iter(|| {
                let head = wire::decode_table_head(&t[..wire::TABLE_HEAD_LEN], t.len() as u64)
                    .expect("head");
                let (ranges, total) =
                    wire::decode_ranges(&t[wire::TABLE_HEAD_LEN..]).expect("ranges");
                (head.count, ranges.len(), total)
            })
        });
    }
    let seg = Segment {
        name: "10.0.0.7:15000".into(),
        instance_id: 0x1234,
        epoch: 9,
        host_id: "0123456789abcdef0123456789abcdef".into(),
        pid: 4242,
        regions: (0..128u64)
            .map(|i| RegionDesc {
                addr: 0x7f00_0000_0000 + i * (1 << 30),
                len: 1 << 29,
                location: Location::Host,
            })
            .collect(),
        exports: Default::default(),
    };
    let bytes = wire::encode_segment(&seg);
    g.throughput(Throughput::Elements(128));
    g.bench_function("segment/encode/128_regions", |b| {
        b.iter(|| wire::encode_segment(&seg))
    });
    g.bench_function("segment/decode/128_regions", |b| {
        b.iter(|| wire::decode_segment(&bytes).expect("segment"))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
