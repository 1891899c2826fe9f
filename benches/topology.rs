//! Rank mapping and block planning: the Rust crate, then, in the same run,
//! the same scenarios through kvferry's Python API and as the pure-Python
//! loop the connectors run today (benches/topology_python.py), reported as
//! ratios.
//!
//! Plans: 61 layers x 2 caches, 256 and 2048 blocks per request, with ids
//! contiguous (one op per cache), fragmented (a hole after every 8 blocks:
//! one op per run of 8) and split (n = 2 pulls per rank: one op per block).
//! Pull lists: one request's lists for four deployment shapes (SHA-256 of
//! the request id and CPython's `sample` included). The Python API is timed
//! with the ids as lists (as the connectors hold them), and as array('Q'),
//! range and numpy ids (no conversion), next to the list conversion alone.
//!
//! The Python side needs `python3` (the first on PATH: put a virtualenv
//! with numpy first for the numpy column) and imports this checkout's
//! `python/kvferry`; its API column needs libkvferry.so
//! (`KVFERRY_LIBRARY`, else target/release/libkvferry.so: run
//! `cargo build --release -p kvferry-capi` first). Without them the Rust
//! numbers still come out. `KVFERRY_BENCH_NO_PYTHON=1` skips the comparison.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use kvferry_topology::{
    Attention, CacheLayout, PdShape, PlanRequest, PullMapping, SideLayout, plan_blocks,
};
use serde_json::Value;

const LAYERS: usize = 61;
const CACHES: usize = 2;
const SLICE: u64 = 16384;
const BASE: u64 = 0x7F3A_0000_0000;
const REQUEST: &str = "cmpl-8f1d6a2c-4b7e-4f0a-9c3e-2d5b7a9e1c44-0";
const BLOCKS: [u64; 2] = [256, 2048];
const KINDS: [&str; 3] = ["contiguous", "fragmented", "split"];

/// The same numbers as `scenario()` in benches/topology_python.py.
struct Scenario {
    name: String,
    local: SideLayout,
    remote: SideLayout,
    local_ids: Vec<u64>,
    remote_ids: Vec<u64>,
    pulls: u64,
}

fn scenario(blocks: u64, kind: &str) -> Scenario {
    let pulls = if kind == "split" { 2 } else { 1 };
    let local_ids: Vec<u64> = if kind == "fragmented" {
        (0..blocks).map(|i| i + i / 8).collect()
    } else {
        (0..blocks).collect()
    };
    let remote_ids: Vec<u64> = (0..blocks).collect();
    let num_blocks = blocks + blocks / 8 + 1;
    let layout = |base: u64, block_len: u64| {
        let caches: Vec<CacheLayout> = (0..(LAYERS * CACHES) as u64)
            .map(|c| CacheLayout::dense(base + c * block_len * num_blocks, block_len))
            .collect();
        SideLayout::new(
            num_blocks,
            caches.chunks(CACHES).map(<[CacheLayout]>::to_vec).collect(),
        )
        .expect("valid layout")
    };
    Scenario {
        name: format!("{LAYERS}x{CACHES}x{blocks}/{kind}"),
        local: layout(BASE, SLICE * pulls),
        remote: layout(BASE + (1 << 40), SLICE),
        local_ids,
        remote_ids,
        pulls,
    }
}

impl Scenario {
    fn request(&self) -> PlanRequest<'_> {
        PlanRequest::new(&self.local_ids, &self.remote_ids).with_pulls(self.pulls, 0)
    }

    fn plan_len(&self) -> usize {
        plan_blocks(&self.local, &self.remote, &self.request())
            .expect("plan")
            .len()
    }
}

fn pull_shapes() -> Vec<(String, PdShape)> {
    [
        (8, 4, 4, Attention::Gqa, 1),
        (16, 2, 16, Attention::Gqa, 1),
        (8, 4, 1, Attention::Mla, 1),
        (32, 8, 8, Attention::Gqa, 2),
    ]
    .into_iter()
    .map(|(p, d, h, kind, s)| {
        (
            format!("P{p}-D{d}-H{h}-{kind}-S{s}"),
            PdShape::new(p, d, s, h, kind),
        )
    })
    .collect()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("plan_blocks");
    for blocks in BLOCKS {
        for kind in KINDS {
            let s = scenario(blocks, kind);
            group.throughput(Throughput::Elements(s.plan_len() as u64));
            group.bench_with_input(BenchmarkId::from_parameter(&s.name), &s, |b, s| {
                b.iter(|| plan_blocks(&s.local, &s.remote, &s.request()).expect("plan"))
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("pull_ranks");
    for (name, shape) in pull_shapes() {
        let mapping = PullMapping::new(shape).expect("accepted shape");
        group.bench_with_input(BenchmarkId::from_parameter(&name), &mapping, |b, m| {
            b.iter(|| m.pull_ranks(REQUEST).expect("lists"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);

/// Median over 7 rounds of the mean time of one call, each round about
/// 60 ms: the same method as the Python side.
fn seconds_per_call(mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    f();
    let once = start.elapsed().max(Duration::from_nanos(100));
    let n = ((0.4 / 7.0) / once.as_secs_f64()).max(1.0) as u32;
    let mut samples: Vec<f64> = (0..7)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..n {
                f();
            }
            start.elapsed().as_secs_f64() / f64::from(n)
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[3]
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// libkvferry.so for the Python API column: `KVFERRY_LIBRARY`, else the
/// release build of this checkout.
fn library() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("KVFERRY_LIBRARY") {
        return Some(PathBuf::from(path));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    let lib = target.join("release").join("libkvferry.so");
    lib.is_file().then_some(lib)
}

fn python_side() -> Result<Value, String> {
    let mut cmd = Command::new("python3");
    // This checkout's package, not an installed copy (which may be older).
    let mut path = std::ffi::OsString::from(repo().join("python"));
    if let Some(old) = std::env::var_os("PYTHONPATH") {
        path.push(":");
        path.push(old);
    }
    cmd.arg(repo().join("benches/topology_python.py"))
        .arg("--json")
        .env("PYTHONPATH", path);
    match library() {
        Some(lib) => {
            cmd.env("KVFERRY_LIBRARY", lib);
        }
        None => {
            cmd.env("KVFERRY_LIBRARY", "/nonexistent/libkvferry.so");
        }
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "benches/topology_python.py failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("bad JSON from benches/topology_python.py: {e}"))
}

fn us(seconds: f64) -> String {
    format!("{:>10.1} us", seconds * 1e6)
}

fn ratio(a: f64, b: Option<f64>) -> String {
    b.map_or_else(|| format!("{:>9}", "-"), |b| format!("{:>8.1}x", a / b))
}

fn compare_with_python() {
    if std::env::var_os("KVFERRY_BENCH_NO_PYTHON").is_some() {
        return;
    }
    let python = match python_side() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("\ntopology: no Python comparison: {e}");
            return;
        }
    };
    println!("\ntopology: Rust vs kvferry's Python API vs the connectors' pure-Python loop");
    println!(
        "(python {}; seconds per call, median of 7 rounds; loop/x = how many times faster than the Python loop)",
        python.get("python").and_then(|v| v.as_str()).unwrap_or("?")
    );
    if let Some(why) = python.get("api_error").and_then(|v| v.as_str()) {
        println!("Python API not measured: {why}");
    }
    println!(
        "{:<34}{:>8} {:>13} {:>13} {:>13} {:>9} {:>9}",
        "plan", "ops", "rust", "python api", "python loop", "loop/rust", "loop/api"
    );
    for blocks in BLOCKS {
        for kind in KINDS {
            let s = scenario(blocks, kind);
            let ops = s.plan_len();
            let rust = seconds_per_call(|| {
                drop(plan_blocks(&s.local, &s.remote, &s.request()).expect("plan"))
            });
            let Some(row) = python.get("plan").and_then(|p| p.get(&s.name)) else {
                continue;
            };
            let py_ops = row.get("ops").and_then(Value::as_u64);
            assert_eq!(
                py_ops,
                Some(ops as u64),
                "{}: Python planned another op count",
                s.name
            );
            let loop_s = row.get("loop").and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
            let api = row.get("api").and_then(|v| v.as_f64());
            println!(
                "{:<34}{:>8} {} {} {} {} {}",
                s.name,
                ops,
                us(rust),
                api.map_or_else(|| format!("{:>13}", "-"), us),
                us(loop_s),
                ratio(loop_s, Some(rust)),
                ratio(loop_s, api)
            );
        }
    }
    println!(
        "\nthe same plans with ids a connector could keep without conversion (loop/x as above),\n\
         and the two list-to-array('Q') conversions alone: the ceiling of loop/api with lists"
    );
    println!(
        "{:<34}{:>13} {:>9} {:>13} {:>9} {:>13} {:>9} {:>13} {:>9}",
        "plan",
        "array('Q')",
        "loop/x",
        "range",
        "loop/x",
        "numpy",
        "loop/x",
        "conversion",
        "loop/x"
    );
    for blocks in BLOCKS {
        for kind in KINDS {
            let name = format!("{LAYERS}x{CACHES}x{blocks}/{kind}");
            let Some(row) = python.get("plan").and_then(|p| p.get(&name)) else {
                continue;
            };
            let loop_s = row.get("loop").and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
            let mut line = format!("{name:<34}");
            for key in ["api_array", "api_range", "api_numpy", "convert"] {
                let t = row.get(key).and_then(|v| v.as_f64());
                line.push_str(&format!(
                    "{} {}",
                    t.map_or_else(|| format!("{:>13}", "-"), us),
                    ratio(loop_s, t)
                ));
            }
            println!("{line}");
        }
    }
    println!(
        "\n{:<34}{:>8} {:>13} {:>13} {:>13} {:>9} {:>9}",
        "pull_ranks", "", "rust", "python api", "python loop", "loop/rust", "loop/api"
    );
    for (name, shape) in pull_shapes() {
        let mapping = PullMapping::new(shape).expect("accepted shape");
        let rust = seconds_per_call(|| drop(mapping.pull_ranks(REQUEST).expect("lists")));
        let Some(row) = python.get("pull").and_then(|p| p.get(&name)) else {
            continue;
        };
        let loop_s = row.get("loop").and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
        let api = row.get("api").and_then(|v| v.as_f64());
        println!(
            "{:<34}{:>8} {} {} {} {} {}",
            name,
            "",
            us(rust),
            api.map_or_else(|| format!("{:>13}", "-"), us),
            us(loop_s),
            ratio(loop_s, Some(rust)),
            ratio(loop_s, api)
        );
    }
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    compare_with_python();
}
