//! `kvferry demo --device npu`: the demo with the KV cache in NPU memory.
//!
//! The prefill process allocates its KV cache on one NPU (every layer's K
//! and V a device allocation, 2 MiB aligned as vllm-ascend's are), fills it
//! with the demo's pattern and registers it as `"npu:N"`; this process, the
//! decode side, allocates its cache on another NPU and pulls requests'
//! blocks device to device: through IPC keys (ascend-ipc) on one host, or
//! over tcp with both sides staging through pinned buffers (`--transport
//! tcp`). Every pulled block is copied back to the host and verified.
//!
//! Without an Ascend machine, point `KVFERRY_ACL_LIBRARY` at the CANN
//! stand-in (docs/ascend.md): the same code runs against it.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Instant;

use kvferry::{Engine, EngineConfig, Op, TransportChoice};
use kvferry_ascend::{AscendRuntime, DeviceBuffer};

use crate::demo::{DemoArgs, DemoTransport, Stats, print_stats, request_blocks};
use crate::kv::{KvCache, KvShape};

/// NPU numbers of the two sides.
#[derive(Debug, Clone, Copy)]
pub struct Devices {
    pub prefill: u32,
    pub decode: u32,
}

/// One side's KV cache in device memory: a buffer per (layer, K/V).
struct NpuCache {
    shape: KvShape,
    device: u32,
    tensors: Vec<DeviceBuffer>,
}

impl NpuCache {
    fn new(rt: &AscendRuntime, shape: KvShape, device: u32) -> Result<NpuCache, String> {
        let tensors = (0..shape.tensors())
            .map(|_| rt.alloc_device(device, shape.tensor_bytes() as u64))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        Ok(NpuCache {
            shape,
            device,
            tensors,
        })
    }

    fn bases(&self) -> Vec<u64> {
        self.tensors.iter().map(DeviceBuffer::addr).collect()
    }

    /// Uploads the prefill pattern (the host demo's, word for word).
    fn fill_pattern(&self, rt: &AscendRuntime) -> Result<(), String> {
        let bw = self.shape.block_bytes / 8;
        for (t, tensor) in self.tensors.iter().enumerate() {
            let bytes: Vec<u8> = (0..self.shape.tensor_bytes() / 8)
                .flat_map(|i| KvCache::expected_word(t, i / bw, i % bw).to_le_bytes())
                .collect();
            rt.upload(self.device, tensor.addr(), &bytes)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn register(&self, engine: &Engine) -> Result<(), String> {
        let regions: Vec<(u64, u64)> = self.tensors.iter().map(|t| (t.addr(), t.len())).collect();
        // SAFETY: the device buffers outlive the engine's use of them: the
        // engine is dropped before the cache everywhere in this module.
        unsafe { engine.register_memory_batch(&regions, &format!("npu:{}", self.device)) }
            .map_err(|e| e.to_string())
    }

    /// Checks that local block `local` of every tensor holds prefill block
    /// `remote`, reading the tensors back from the device once.
    fn verify(&self, rt: &AscendRuntime, pulled: &[(usize, usize)]) -> Result<(), String> {
        let bw = self.shape.block_bytes / 8;
        let mut host = vec![0u8; self.shape.tensor_bytes()];
        for (t, tensor) in self.tensors.iter().enumerate() {
            rt.download(self.device, tensor.addr(), &mut host)
                .map_err(|e| e.to_string())?;
            for &(local, remote) in pulled {
                for w in 0..bw {
                    let at = (local * bw + w) * 8;
                    let mut word = [0u8; 8];
                    word.copy_from_slice(&host[at..at + 8]);
                    let got = u64::from_le_bytes(word);
                    let want = KvCache::expected_word(t, remote, w);
                    if got != want {
                        return Err(format!(
                            "tensor {t} local block {local} (prefill block {remote}) word {w}: got {got:#x}, expected {want:#x}"
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

fn runtime() -> Result<Arc<AscendRuntime>, String> {
    AscendRuntime::load().map_err(|e| {
        format!(
            "{e}\n(on an Ascend machine: source /usr/local/Ascend/ascend-toolkit/set_env.sh; without one: \
             KVFERRY_ACL_LIBRARY=<the CANN stand-in>, see docs/ascend.md)"
        )
    })
}

fn engine(rt: &Arc<AscendRuntime>, choice: TransportChoice) -> Result<Engine, String> {
    Engine::new(
        EngineConfig::new()
            .transport(choice)
            .device_runtime(rt.clone()),
    )
    .map_err(|e| e.to_string())
}

/// The prefill process: fill and register the cache on NPU `device`,
/// announce it, serve until stdin closes.
pub fn run_prefill(shape: KvShape, device: u32) -> Result<(), String> {
    let rt = runtime()?;
    let cache = NpuCache::new(&rt, shape, device)?;
    cache.fill_pattern(&rt)?;
    let engine = engine(&rt, TransportChoice::Auto)?;
    cache.register(&engine)?;
    let bases: Vec<String> = cache.bases().iter().map(u64::to_string).collect();
    println!("PREFILL {} {}", engine.name(), bases.join(" "));
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(engine);
    drop(cache);
    Ok(())
}

/// Pulls every request from `peer` into `cache`, then verifies it.
fn decode(
    rt: &AscendRuntime,
    engine: &Engine,
    peer: &str,
    remote_bases: &[u64],
    cache: &NpuCache,
    args: &DemoArgs,
) -> Result<Stats, String> {
    let mut stats = Stats::default();
    let mut pulled: Vec<(usize, usize)> = Vec::new();
    let total = args.shape.blocks;
    let bb = args.shape.block_bytes as u64;
    let local_bases = cache.bases();
    let mut cursor = 0usize;
    let start = Instant::now();
    for req in 0..args.requests {
        let remote_ids = request_blocks(req, args.blocks_per_request, total, 0x1234_5678);
        let local_ids: Vec<usize> = (0..args.blocks_per_request)
            .map(|i| (cursor + i) % total)
            .collect();
        cursor = (cursor + args.blocks_per_request) % total;
        let ops: Vec<Op> = local_bases
            .iter()
            .zip(remote_bases)
            .flat_map(|(&lbase, &rbase)| {
                local_ids.iter().zip(&remote_ids).map(move |(&l, &r)| Op {
                    local: lbase + l as u64 * bb,
                    remote: rbase + r as u64 * bb,
                    len: bb,
                })
            })
            .collect();
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
    cache.verify(rt, &pulled)?;
    Ok(stats)
}

/// The demo: this process decodes on `devices.decode`, a child process
/// prefills on `devices.prefill`.
pub fn run(args: &DemoArgs, transport: DemoTransport, devices: Devices) -> Result<(), String> {
    let rt = runtime()?;
    let s = args.shape;
    let extra = [
        "--device".to_string(),
        "npu".into(),
        "--npu".into(),
        devices.prefill.to_string(),
    ];
    let (child, peer, bases) = crate::demo::spawn_prefill(&extra, s)?;
    println!(
        "prefill (pid {}) at {peer}: KV cache on npu:{} of {} layers x K/V x {} blocks x {} KiB = {:.1} MiB (ACL: {})",
        child.0.id(),
        devices.prefill,
        s.layers,
        s.blocks,
        s.block_bytes >> 10,
        s.total_bytes() as f64 / (1 << 20) as f64,
        rt.library().display()
    );
    for choice in transport.choices() {
        let cache = NpuCache::new(&rt, s, devices.decode)?;
        let engine = engine(&rt, choice)?;
        cache.register(&engine)?;
        let used = engine
            .device_transport_to(&peer)
            .map_err(|e| e.to_string())?;
        let stats = decode(&rt, &engine, &peer, &bases, &cache, args)?;
        print_stats(used, &stats, args);
        drop(engine);
        drop(cache);
    }
    drop(child);
    Ok(())
}
