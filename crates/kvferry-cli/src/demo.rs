//! `kvferry demo`: a prefill engine holds a filled KV cache; a decode
//! engine pulls requests' blocks from it in batches, verifies every byte,
//! and reports throughput and latency.

use std::time::{Duration, Instant};

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};

use kvferry::{Engine, EngineConfig, Op, TransportChoice};

use crate::kv::{KvCache, KvShape};

#[derive(Debug, Clone)]
pub struct DemoArgs {
    pub shape: KvShape,
    pub requests: usize,
    pub blocks_per_request: usize,
}

/// Block ids of one request on each side: a paged allocator hands out mostly
/// contiguous runs with gaps, and the two sides' allocators differ.
pub fn request_blocks(req: usize, n: usize, total: usize, seed: u64) -> Vec<usize> {
    let mut x = seed ^ (req as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut ids = Vec::with_capacity(n);
    let mut cur = (next() as usize) % total;
    while ids.len() < n {
        let run = 1 + (next() as usize) % 8;
        for _ in 0..run.min(n - ids.len()) {
            ids.push(cur % total);
            cur += 1;
        }
        cur += (next() as usize) % 3;
    }
    ids
}

/// The ops that pull one request: every layer's K and V, block by block.
/// The engine coalesces blocks that are contiguous on both sides.
pub fn request_ops(
    local: &KvCache,
    remote_bases: &[u64],
    local_ids: &[usize],
    remote_ids: &[usize],
) -> Vec<Op> {
    let bb = local.shape.block_bytes as u64;
    let mut ops = Vec::with_capacity(remote_bases.len() * local_ids.len());
    for (t, &rbase) in remote_bases.iter().enumerate() {
        for (&l, &r) in local_ids.iter().zip(remote_ids) {
            ops.push(Op {
                local: local.block_addr(t, l),
                remote: rbase + r as u64 * bb,
                len: bb,
            });
        }
    }
    ops
}

#[derive(Debug, Default)]
pub struct Stats {
    pub bytes: u64,
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
}

impl Stats {
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64() / 1e9
    }
    pub fn percentile(&self, p: f64) -> Duration {
        let mut v = self.latencies.clone();
        v.sort();
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or_default()
    }
}

/// Pulls every request from `peer`, then verifies the whole cache.
pub fn decode(
    engine: &Engine,
    peer: &str,
    remote_bases: &[u64],
    cache: &KvCache,
    args: &DemoArgs,
) -> Result<Stats, String> {
    let mut stats = Stats::default();
    let mut pulled = Vec::new();
    let mut local_cursor = 0usize;
    let total = args.shape.blocks;
    let start = Instant::now();
    for req in 0..args.requests {
        let remote_ids = request_blocks(req, args.blocks_per_request, total, 0x1234_5678);
        // Decode allocates contiguous ids for each request, wrapping around.
        let local_ids: Vec<usize> = (0..args.blocks_per_request)
            .map(|i| (local_cursor + i) % total)
            .collect();
        local_cursor = (local_cursor + args.blocks_per_request) % total;
        let ops = request_ops(cache, remote_bases, &local_ids, &remote_ids);
        let t = Instant::now();
        engine
            .read(peer, &ops)
            .map_err(|e| format!("request {req}: {e}"))?;
        stats.latencies.push(t.elapsed());
        stats.bytes += ops.iter().map(|o| o.len).sum::<u64>();
        pulled.retain(|(l, _)| !local_ids.contains(l));
        pulled.extend(local_ids.into_iter().zip(remote_ids));
    }
    stats.elapsed = start.elapsed();
    for &(l, r) in &pulled {
        cache.verify_block(l, r)?;
    }
    Ok(stats)
}

/// Registers every tensor of `cache` with `engine`.
pub fn register(engine: &Engine, cache: &mut KvCache) -> Result<(), String> {
    let regions: Vec<(u64, u64)> = cache.tensors_mut().collect();
    // SAFETY: the cache outlives the engine's use of it: callers drop the
    // engine (which unregisters everything) before the cache.
    unsafe { engine.register_memory_batch(&regions, "cpu:0") }.map_err(|e| e.to_string())
}

pub fn print_stats(label: &str, s: &Stats, args: &DemoArgs) {
    println!(
        "{label:<8} {:>8.2} GB/s  {:>6} requests x {:>4} blocks x {:>3} tensors  latency/request p50 {:>8.3} ms  p99 {:>8.3} ms  verified {:.1} MiB",
        s.gbps(),
        args.requests,
        args.blocks_per_request,
        args.shape.tensors(),
        s.percentile(0.5).as_secs_f64() * 1e3,
        s.percentile(0.99).as_secs_f64() * 1e3,
        s.bytes as f64 / (1 << 20) as f64,
    );
}

/// Which transports the demo's decode side uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemoTransport {
    /// The best path: cma between two processes of one host.
    Auto,
    /// tcp, forced.
    Tcp,
    /// Auto, then tcp.
    Both,
}

impl DemoTransport {
    pub(crate) fn choices(self) -> Vec<TransportChoice> {
        match self {
            DemoTransport::Auto => vec![TransportChoice::Auto],
            DemoTransport::Tcp => vec![TransportChoice::Tcp],
            DemoTransport::Both => vec![TransportChoice::Auto, TransportChoice::Tcp],
        }
    }
}

/// The prefill process: fill and register a KV cache, announce it on
/// stdout, serve until stdin closes.
pub fn run_prefill(shape: KvShape) -> Result<(), String> {
    let mut cache = KvCache::empty(shape);
    cache.fill_pattern();
    let engine = Engine::new(EngineConfig::new()).map_err(|e| e.to_string())?;
    register(&engine, &mut cache)?;
    let bases: Vec<String> = cache.bases().iter().map(u64::to_string).collect();
    println!("PREFILL {} {}", engine.name(), bases.join(" "));
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        let _ = tx.send(());
    });
    loop {
        for n in engine.drain_notifications() {
            eprintln!(
                "prefill: {} says {}",
                n.from,
                String::from_utf8_lossy(&n.message)
            );
        }
        if rx.recv_timeout(Duration::from_millis(20)).is_ok() {
            break;
        }
    }
    drop(engine);
    drop(cache);
    Ok(())
}

/// The prefill child process, killed if the demo ends early.
pub(crate) struct PrefillChild(pub(crate) Child);

impl Drop for PrefillChild {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        if !matches!(self.0.wait_timeout(Duration::from_secs(5)), Ok(true)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

trait WaitTimeout {
    fn wait_timeout(&mut self, d: Duration) -> std::io::Result<bool>;
}

impl WaitTimeout for Child {
    fn wait_timeout(&mut self, d: Duration) -> std::io::Result<bool> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            if self.try_wait()?.is_some() {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(false)
    }
}

/// Starts `kvferry demo-prefill` (with `extra` arguments before the shape)
/// and reads its announcement: the child, its session id and the base
/// address of every tensor.
pub(crate) fn spawn_prefill(
    extra: &[String],
    s: KvShape,
) -> Result<(PrefillChild, String, Vec<u64>), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .arg("demo-prefill")
        .args(extra)
        .args([
            "--layers",
            &s.layers.to_string(),
            "--blocks",
            &s.blocks.to_string(),
            "--block-bytes",
            &s.block_bytes.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the prefill process: {e}"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or("no stdout from the prefill process")?;
    let child = PrefillChild(child);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| format!("reading from the prefill process: {e}"))?;
    let mut words = line.split_whitespace();
    if words.next() != Some("PREFILL") {
        return Err(format!("the prefill process said {line:?}"));
    }
    let peer = words
        .next()
        .ok_or("the prefill process gave no name")?
        .to_owned();
    let bases: Vec<u64> = words
        .map(|w| w.parse().map_err(|_| format!("bad base {w}")))
        .collect::<Result<_, _>>()?;
    Ok((child, peer, bases))
}

/// The demo: this process decodes, a child process prefills.
pub fn run(args: &DemoArgs, transport: DemoTransport) -> Result<(), String> {
    let s = args.shape;
    let (child, peer, bases) = spawn_prefill(&[], s)?;
    println!(
        "prefill (pid {}) at {peer}: KV cache of {} layers x K/V x {} blocks x {} KiB = {:.1} MiB",
        child.0.id(),
        s.layers,
        s.blocks,
        s.block_bytes >> 10,
        s.total_bytes() as f64 / (1 << 20) as f64
    );
    for choice in transport.choices() {
        let mut cache = KvCache::empty(s);
        let engine =
            Engine::new(EngineConfig::new().transport(choice)).map_err(|e| e.to_string())?;
        register(&engine, &mut cache)?;
        let used = engine.transport_to(&peer).map_err(|e| e.to_string())?;
        let stats = decode(&engine, &peer, &bases, &cache, args)?;
        print_stats(used, &stats, args);
        engine
            .notify(
                &peer,
                format!("pulled {} bytes over {used}, all verified", stats.bytes).as_bytes(),
            )
            .map_err(|e| e.to_string())?;
        drop(engine);
    }
    drop(child);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_blocks_are_in_range_and_distinct_enough() {
        let ids = request_blocks(3, 40, 64, 1);
        assert_eq!(ids.len(), 40);
        assert!(ids.iter().all(|&i| i < 64));
    }

    #[test]
    fn decode_verifies_what_it_pulls_and_catches_corruption() {
        let args = DemoArgs {
            shape: KvShape {
                layers: 2,
                blocks: 16,
                block_bytes: 4096,
            },
            requests: 5,
            blocks_per_request: 6,
        };
        let mut prefill_cache = KvCache::empty(args.shape);
        prefill_cache.fill_pattern();
        let mut decode_cache = KvCache::empty(args.shape);
        let prefill = Engine::new(EngineConfig::new().port(0)).unwrap();
        let decoder = Engine::new(EngineConfig::new().port(0)).unwrap();
        register(&prefill, &mut prefill_cache).unwrap();
        register(&decoder, &mut decode_cache).unwrap();
        let stats = decode(
            &decoder,
            prefill.name(),
            &prefill_cache.bases(),
            &decode_cache,
            &args,
        )
        .unwrap();
        assert_eq!(stats.bytes, 5 * 6 * 4 * 4096);
        // Pulling from the wrong tensors must fail verification.
        let mut shifted = prefill_cache.bases();
        shifted.rotate_left(1);
        assert!(decode(&decoder, prefill.name(), &shifted, &decode_cache, &args).is_err());
        drop((prefill, decoder));
    }
}
