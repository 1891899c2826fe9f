//! The three host transports on the same batches: 32 ops of 16 KiB and of
//! 1 MiB, remote blocks in reverse order so nothing coalesces.
//!
//! - `local`: both engines in this process (memcpy).
//! - `tcp`: both engines in this process, the reader forced to tcp.
//! - `cma`: the target is this bench binary started again as a child
//!   process (cross-memory attach needs another process).
//!
//! Each group also times the bare mechanism on the same ranges in the same
//! run (`memcpy`), so the transports read as ratios (docs/benchmarks.md).

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use kvferry::{Engine, EngineConfig, Op, TransportChoice};

const BATCH: u64 = 32;
const SIZES: [u64; 2] = [16 << 10, 1 << 20];
/// Remote buffer: the largest batch.
const SPAN: u64 = BATCH * (1 << 20);
/// Turns this binary into a cma target: serve a buffer until stdin closes.
const CHILD: &str = "KVFERRY_BENCH_TARGET";

fn ops(local: u64, remote: u64, size: u64) -> Vec<Op> {
    (0..BATCH)
        .map(|i| Op {
            local: local + i * size,
            remote: remote + (BATCH - 1 - i) * size,
            len: size,
        })
        .collect()
}

fn engine(choice: TransportChoice) -> Engine {
    Engine::new(EngineConfig::new().port(0).transport(choice)).expect("engine")
}

/// Registers `buf` with `e`.
fn register(e: &Engine, buf: &mut [u8]) {
    // SAFETY: every engine of this file is dropped before the buffer it
    // registered (see each caller).
    unsafe { e.register_memory(buf.as_mut_ptr() as u64, buf.len() as u64, "cpu:0") }
        .expect("register");
}

fn child_target() {
    let mut buf = vec![0x5au8; SPAN as usize];
    let e = engine(TransportChoice::Auto);
    register(&e, &mut buf);
    println!("READY {} {}", e.name(), buf.as_ptr() as u64);
    std::io::stdout().flush().expect("stdout");
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(e);
}

struct Target {
    child: Child,
    name: String,
    addr: u64,
}

impl Target {
    fn spawn() -> Target {
        let mut child = Command::new(std::env::current_exe().expect("exe"))
            .env(CHILD, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the cma target");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("READY line");
        let mut w = line.split_whitespace().skip(1);
        let name = w.next().expect("name").to_owned();
        let addr = w.next().and_then(|a| a.parse().ok()).expect("addr");
        Target { child, name, addr }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        std::thread::sleep(Duration::from_millis(50));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bench(c: &mut Criterion) {
    let mut dst = vec![0u8; SPAN as usize];
    let mut src = vec![0xa5u8; SPAN as usize];
    let cma_target = Target::spawn();
    for size in SIZES {
        let mut g = c.benchmark_group(format!("read_32x{}KiB", size >> 10));
        g.throughput(Throughput::Bytes(BATCH * size));
        let local_ops = ops(dst.as_ptr() as u64, src.as_ptr() as u64, size);
        g.bench_function(BenchmarkId::new("memcpy", size), |b| {
            b.iter(|| {
                for op in &local_ops {
                    // SAFETY: both ranges lie inside `src` / `dst`, which
                    // outlive the loop and do not overlap.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            op.remote as *const u8,
                            op.local as *mut u8,
                            op.len as usize,
                        )
                    }
                }
            })
        });
        {
            let owner = engine(TransportChoice::Auto);
            register(&owner, &mut src);
            for (name, choice) in [
                ("local", TransportChoice::Auto),
                ("tcp", TransportChoice::Tcp),
            ] {
                let reader = engine(choice);
                register(&reader, &mut dst);
                assert_eq!(reader.transport_to(owner.name()).expect("session"), name);
                g.bench_function(BenchmarkId::new(name, size), |b| {
                    b.iter(|| reader.read(owner.name(), &local_ops).expect("read"))
                });
                drop(reader);
            }
            drop(owner);
        }
        let reader = engine(TransportChoice::Auto);
        register(&reader, &mut dst);
        let cma_ops = ops(dst.as_ptr() as u64, cma_target.addr, size);
        let used = reader.transport_to(&cma_target.name).expect("session");
        if used == "cma" {
            g.bench_function(BenchmarkId::new("cma", size), |b| {
                b.iter(|| reader.read(&cma_target.name, &cma_ops).expect("read"))
            });
        } else {
            eprintln!("cma unavailable here (the engine picked {used}); skipped");
        }
        drop(reader);
        g.finish();
    }
    drop(cma_target);
}

fn main() {
    if std::env::var_os(CHILD).is_some() {
        return child_target();
    }
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    bench(&mut c);
    c.final_summary();
}
