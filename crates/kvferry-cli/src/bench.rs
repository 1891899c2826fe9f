//! `kvferry bench`: throughput and latency of batched reads or writes, in
//! the shape of Mooncake's `transfer_engine_bench`.
//!
//! A target registers a buffer filled with a known pattern; an initiator
//! runs `--threads` threads, each submitting synchronous batches of
//! `--batch-size` ops of `--block-size` bytes for `--duration` seconds.
//!
//! Access pattern (the one `tools/cma_limit.c` measures, so the two compare
//! cell by cell): each thread owns an equal slice of the target's buffer and
//! streams through it batch after batch; its local side is one batch worth
//! of memory, reused. With the default `--layout scattered` the ops of a
//! batch are not contiguous on both sides (remote blocks in reverse order),
//! so the engine moves exactly `batch-size` separate blocks; `contiguous`
//! lets it coalesce them, as Mooncake users' contiguous batches do.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use kvferry::session::PeerAddr;
use kvferry::transport::tcp::{ClientIdentity, TcpTransport};
use kvferry::{BatchId, Engine, EngineConfig, Location, Op, Opcode, TransportChoice};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Start a target child process (in-process for `--transport local`)
    /// and run the initiator here.
    Both,
    /// Register a buffer and serve it until stopped.
    Target,
    /// Read from / write to the target at `--segment`.
    Initiator,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Operation {
    Read,
    Write,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchTransport {
    /// What the engine picks: local, then cma on the same host, then tcp.
    Auto,
    /// tcp, forced.
    Tcp,
    /// Cross-memory attach (same host, another process); fails if the
    /// engine would use anything else.
    Cma,
    /// Both engines in this process (memcpy).
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Layout {
    /// Remote blocks of a batch in reverse order: nothing coalesces.
    Scattered,
    /// Blocks contiguous on both sides: the engine may merge them.
    Contiguous,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value = "both")]
    pub mode: Mode,
    #[arg(long, value_enum, default_value = "read")]
    pub operation: Operation,
    #[arg(long, value_enum, default_value = "auto")]
    pub transport: BenchTransport,
    /// Bytes per op (suffixes K, M, G = KiB, MiB, GiB).
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    pub block_size: u64,
    /// Ops per batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: u64,
    /// Initiator threads, each submitting its own batches.
    #[arg(long, default_value_t = 1)]
    pub threads: u64,
    /// Batches each thread keeps in flight: 1 waits for each batch
    /// (`transfer_sync`); more submits asynchronously and waits for the
    /// oldest before submitting the next (latency: submit to completion).
    /// In-flight batches of a thread move the same blocks.
    #[arg(long, default_value_t = 1)]
    pub inflight: u64,
    /// Seconds to measure.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Seconds of untimed warm-up before measuring.
    #[arg(long, default_value_t = 0.3)]
    pub warmup: f64,
    /// The target's `host:port` (initiator mode).
    #[arg(long)]
    pub segment: Option<String>,
    /// Bytes the target registers (and streams through).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub buffer_size: u64,
    #[arg(long, value_enum, default_value = "scattered")]
    pub layout: Layout,
    /// Check every byte moved (outside the timed part of each batch; the
    /// wall-clock throughput drops accordingly).
    #[arg(long)]
    pub verify: bool,
    /// One JSON object on stdout instead of the human summary.
    #[arg(long)]
    pub json: bool,
    /// With `--transport local`: also time plain memcpy of the same ops in
    /// the same run, and report kvferry as a ratio to it.
    #[arg(long)]
    pub reference: bool,
    /// Host name peers reach the target at (target mode).
    #[arg(long, default_value = "127.0.0.1")]
    pub hostname: String,
    /// Port the target listens on (target mode; 0 = any free port).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Target mode: stop when stdin closes (how `--mode both` stops its child).
    #[arg(long, hide = true)]
    pub until_stdin_closes: bool,
}

/// Parses `4096`, `16K`, `16KiB`, `1M`, `4MiB`, `1G`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4096, 16K, 1MiB)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (K, M or G)")),
    };
    n.checked_mul(1 << shift)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("{s:?} is zero or too large"))
}

/// Byte `i` of the target's buffer: a pattern that names its offset, so a
/// misplaced block is caught as surely as a missing one.
fn pattern_byte(seed: u8, i: u64) -> u8 {
    ((i.wrapping_mul(0x9e37_79b9) >> 7) as u8) ^ (i >> 20) as u8 ^ seed
}

const TARGET_SEED: u8 = 0x5a;

/// Page-aligned, zero-filled, touched memory.
struct Buffer {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

// SAFETY: `Buffer` owns its allocation like a `Box<[u8]>`; nothing in it is
// tied to a thread.
unsafe impl Send for Buffer {}
// SAFETY: shared access only hands out the address; the bytes are written
// by the engine (the kernel or a peer) under the registration contract.
unsafe impl Sync for Buffer {}

impl Buffer {
    fn new(len: u64) -> Result<Buffer, String> {
        let layout = std::alloc::Layout::from_size_align(len as usize, 4096)
            .map_err(|e| format!("cannot lay out {len} bytes: {e}"))?;
        // SAFETY: the layout has a non-zero size (sizes are checked > 0).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(format!("cannot allocate {len} bytes"));
        }
        let mut b = Buffer { ptr, layout };
        // Touch every page so page faults stay out of the measurement.
        b.as_mut_slice()
            .iter_mut()
            .step_by(4096)
            .for_each(|x| *x = 1);
        Ok(b)
    }

    fn addr(&self) -> u64 {
        self.ptr as u64
    }

    fn len(&self) -> u64 {
        self.layout.size() as u64
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live allocation of `layout.size()` bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }

    fn fill_pattern(&mut self, seed: u8) {
        for (i, b) in self.as_mut_slice().iter_mut().enumerate() {
            *b = pattern_byte(seed, i as u64);
        }
    }

    /// The bytes at `[addr, addr + len)` inside this buffer.
    ///
    /// # Safety
    /// No transfer may write the range while the slice lives.
    unsafe fn bytes(&self, addr: u64, len: u64) -> &[u8] {
        let off = (addr - self.addr()) as usize;
        // SAFETY: the caller keeps writers away; the range is in bounds
        // (callers derive it from this buffer's own ops).
        unsafe { std::slice::from_raw_parts(self.ptr.add(off), len as usize) }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

fn register(engine: &Engine, buf: &mut Buffer) -> Result<(), String> {
    // SAFETY: every caller drops the engine (which unregisters everything)
    // before the buffer.
    unsafe { engine.register_memory(buf.addr(), buf.len(), "cpu:0") }
        .map_err(|e| format!("registering {} bytes: {e}", buf.len()))
}

pub fn run(args: &BenchArgs) -> Result<(), String> {
    check(args)?;
    match args.mode {
        Mode::Target => run_target(args),
        Mode::Initiator => {
            let seg = args
                .segment
                .as_deref()
                .ok_or("--mode initiator needs --segment host:port (the target's name)")?;
            if args.transport == BenchTransport::Local {
                return Err(
                    "--transport local needs both engines in one process: use --mode both".into(),
                );
            }
            let (addr, len) = remote_buffer(seg)?;
            initiate(args, seg, addr, len, None)
        }
        Mode::Both if args.transport == BenchTransport::Local => {
            let mut buf = Buffer::new(args.buffer_size)?;
            buf.fill_pattern(TARGET_SEED);
            let target = Engine::new(EngineConfig::new().port(0)).map_err(|e| e.to_string())?;
            register(&target, &mut buf)?;
            let name = target.name().to_owned();
            let r = initiate(args, &name, buf.addr(), buf.len(), Some(&buf));
            drop(target);
            drop(buf);
            r
        }
        Mode::Both => {
            let child = TargetChild::spawn(args)?;
            let r = initiate(args, &child.name, child.addr, child.len, None);
            drop(child);
            r
        }
    }
}

fn check(args: &BenchArgs) -> Result<(), String> {
    if args.batch_size == 0 || args.threads == 0 {
        return Err("--batch-size and --threads must be at least 1".into());
    }
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if !positive(args.duration) || !(positive(args.warmup) || args.warmup == 0.0) {
        return Err("--duration must be > 0 and --warmup >= 0".into());
    }
    if args.inflight == 0 || args.inflight > 1024 {
        return Err("--inflight must be 1..=1024".into());
    }
    if args.inflight > 1 && (args.verify || args.reference) {
        return Err("--inflight above 1 goes without --verify and --reference \
             (in-flight batches of a thread move the same blocks)"
            .into());
    }
    if args.reference && args.transport != BenchTransport::Local {
        return Err("--reference (memcpy of the same ops) goes with --transport local".into());
    }
    if args.mode != Mode::Target {
        let per_batch = args
            .block_size
            .checked_mul(args.batch_size)
            .ok_or("block size x batch size overflows")?;
        if per_batch.saturating_mul(args.threads) > args.buffer_size {
            return Err(format!(
                "{} threads x {} ops x {} bytes do not fit the {}-byte buffer: raise --buffer-size",
                args.threads, args.batch_size, args.block_size, args.buffer_size
            ));
        }
    }
    Ok(())
}

// ---- target -----------------------------------------------------------------

fn run_target(args: &BenchArgs) -> Result<(), String> {
    let mut buf = Buffer::new(args.buffer_size)?;
    buf.fill_pattern(TARGET_SEED);
    let engine = Engine::new(
        EngineConfig::new()
            .hostname(args.hostname.clone())
            .port(args.port),
    )
    .map_err(|e| e.to_string())?;
    register(&engine, &mut buf)?;
    println!("TARGET {} {} {}", engine.name(), buf.addr(), buf.len());
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    if args.until_stdin_closes {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    } else {
        eprintln!(
            "kvferry bench: target {} serves {} MiB; run `kvferry bench --mode initiator --segment {}`; Ctrl-C stops it",
            engine.name(),
            buf.len() >> 20,
            engine.name()
        );
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    drop(engine);
    drop(buf);
    Ok(())
}

/// A target child process; stopped (stdin closed, then killed) on drop.
struct TargetChild {
    child: Child,
    name: String,
    addr: u64,
    len: u64,
}

impl TargetChild {
    fn spawn(args: &BenchArgs) -> Result<TargetChild, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .args([
                "bench",
                "--mode",
                "target",
                "--until-stdin-closes",
                "--buffer-size",
                &args.buffer_size.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the target process: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout from the target")?;
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        let parsed = read
            .map_err(|e| e.to_string())
            .and_then(|_| parse_target_line(&line));
        match parsed {
            Ok((name, addr, len)) => Ok(TargetChild {
                child,
                name,
                addr,
                len,
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!("the target process did not start: {e}"))
            }
        }
    }
}

fn parse_target_line(line: &str) -> Result<(String, u64, u64), String> {
    let mut w = line.split_whitespace();
    match (w.next(), w.next(), w.next(), w.next()) {
        (Some("TARGET"), Some(name), Some(addr), Some(len)) => Ok((
            name.to_owned(),
            addr.parse()
                .map_err(|_| format!("bad address in {line:?}"))?,
            len.parse().map_err(|_| format!("bad length in {line:?}"))?,
        )),
        _ => Err(format!("unexpected line {line:?}")),
    }
}

impl Drop for TargetChild {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The largest host region of the target's segment (its bench buffer).
fn remote_buffer(segment: &str) -> Result<(u64, u64), String> {
    let peer = PeerAddr::parse(segment).map_err(|e| e.to_string())?;
    let probe = TcpTransport::new(
        peer,
        ClientIdentity {
            instance_id: 0,
            secret: std::env::var("KVFERRY_SECRET")
                .ok()
                .filter(|s| !s.is_empty())
                .map(String::into_bytes),
            connect_timeout: Duration::from_secs(3),
        },
        1,
    );
    let seg = probe
        .fetch(Instant::now() + Duration::from_secs(6))
        .map_err(|e| format!("fetching the segment of {segment}: {e}"))?;
    seg.regions
        .iter()
        .filter(|r| r.location == Location::Host)
        .max_by_key(|r| r.len)
        .map(|r| (r.addr, r.len))
        .ok_or_else(|| format!("{segment} has registered no host memory"))
}

// ---- initiator --------------------------------------------------------------

/// Where thread `t`'s batch `k` goes: local and remote address of op `j`.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    block: u64,
    batch: u64,
    local_base: u64,
    remote_base: u64,
    /// Blocks in each thread's slice of the remote buffer.
    blocks_per_thread: u64,
    layout: Layout,
}

impl Geometry {
    fn ops(&self, t: u64, k: u64, local_base: u64) -> Vec<Op> {
        // Each batch takes the next `batch` blocks of the thread's slice
        // (wrapping), so the remote side streams through the buffer.
        let slice_base = self.remote_base + t * self.blocks_per_thread * self.block;
        let batches_per_slice = (self.blocks_per_thread / self.batch).max(1);
        let first = (k % batches_per_slice) * self.batch;
        (0..self.batch)
            .map(|j| {
                let rj = match self.layout {
                    Layout::Contiguous => j,
                    Layout::Scattered => self.batch - 1 - j,
                };
                Op {
                    local: local_base + j * self.block,
                    remote: slice_base + (first + rj) * self.block,
                    len: self.block,
                }
            })
            .collect()
    }

    fn local_of(&self, t: u64) -> u64 {
        self.local_base + t * self.batch * self.block
    }
}

/// What one thread measured.
#[derive(Debug, Default)]
struct ThreadResult {
    batches: u64,
    latencies_ns: Vec<u64>,
}

/// Shared progress counters for the progress bar.
#[derive(Debug, Default)]
struct Progress {
    bytes: AtomicU64,
    stop: AtomicBool,
}

#[derive(Debug, Clone, Copy, Default)]
struct Summary {
    bytes: u64,
    batches: u64,
    elapsed: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    mean: f64,
}

impl Summary {
    fn new(results: &[ThreadResult], bytes_per_batch: u64, elapsed: Duration) -> Summary {
        let mut lat: Vec<u64> = results
            .iter()
            .flat_map(|r| r.latencies_ns.iter().copied())
            .collect();
        lat.sort_unstable();
        let pct = |p: f64| {
            if lat.is_empty() {
                return 0.0;
            }
            let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
            lat[i.min(lat.len() - 1)] as f64 / 1e3
        };
        let batches: u64 = results.iter().map(|r| r.batches).sum();
        Summary {
            bytes: batches * bytes_per_batch,
            batches,
            elapsed: elapsed.as_secs_f64(),
            p50: pct(0.5),
            p99: pct(0.99),
            p999: pct(0.999),
            mean: if lat.is_empty() {
                0.0
            } else {
                lat.iter().sum::<u64>() as f64 / lat.len() as f64 / 1e3
            },
        }
    }

    fn gbps(&self) -> f64 {
        self.bytes as f64 / self.elapsed / 1e9
    }
}

fn initiate(
    args: &BenchArgs,
    peer: &str,
    remote_addr: u64,
    remote_len: u64,
    in_process_target: Option<&Buffer>,
) -> Result<(), String> {
    let per_thread_bytes = args.batch_size * args.block_size;
    let blocks_per_thread = remote_len / args.threads / args.block_size;
    if blocks_per_thread < args.batch_size {
        return Err(format!(
            "the target's {remote_len}-byte buffer holds fewer than {} threads x {} blocks",
            args.threads, args.batch_size
        ));
    }
    let choice = match args.transport {
        BenchTransport::Tcp => TransportChoice::Tcp,
        _ => TransportChoice::Auto,
    };
    let engine =
        Engine::new(EngineConfig::new().port(0).transport(choice)).map_err(|e| e.to_string())?;
    // Per thread: one batch of local memory, plus as much again to read
    // written blocks back into when verifying writes.
    let local_len = per_thread_bytes * args.threads * if args.verify { 2 } else { 1 };
    let mut local = Buffer::new(local_len)?;
    local.fill_pattern(0xa7);
    register(&engine, &mut local)?;
    let used = engine
        .transport_to(peer)
        .map_err(|e| format!("reaching {peer}: {e}"))?;
    let wanted = match args.transport {
        BenchTransport::Auto => None,
        BenchTransport::Tcp => Some("tcp"),
        BenchTransport::Cma => Some("cma"),
        BenchTransport::Local => Some("local"),
    };
    if let Some(w) = wanted
        && w != used
    {
        return Err(format!(
            "--transport {w} was asked for, but the engine reaches {peer} over {used}"
        ));
    }
    let geo = Geometry {
        block: args.block_size,
        batch: args.batch_size,
        local_base: local.addr(),
        remote_base: remote_addr,
        blocks_per_thread,
        layout: args.layout,
    };
    let opcode = match args.operation {
        Operation::Read => Opcode::Read,
        Operation::Write => Opcode::Write,
    };
    let ctx = RunCtx {
        engine: &engine,
        peer,
        geo,
        opcode,
        verify: args.verify,
        inflight: args.inflight,
        remote_addr,
        verify_base: local.addr() + per_thread_bytes * args.threads,
        local: &local,
    };

    // Warm-up: handshakes, lanes, caches; then the measured run.
    if args.warmup > 0.0 {
        ctx.run_threads(
            args.threads,
            Duration::from_secs_f64(args.warmup),
            &Progress::default(),
            Kind::Engine,
        )?;
    }
    let progress = Arc::new(Progress::default());
    let bar = ProgressBar::start(
        Arc::clone(&progress),
        Duration::from_secs_f64(args.duration),
        args.json,
    );
    let started = Instant::now();
    let results = ctx.run_threads(
        args.threads,
        Duration::from_secs_f64(args.duration),
        &progress,
        Kind::Engine,
    );
    let elapsed = started.elapsed();
    bar.finish();
    let summary = Summary::new(&results?, per_thread_bytes, elapsed);
    if summary.batches == 0 {
        return Err("no batch finished within the duration".into());
    }

    let reference = if args.reference {
        if in_process_target.is_none() {
            return Err("--reference needs the in-process target".into());
        }
        let started = Instant::now();
        let r = ctx.run_threads(
            args.threads,
            Duration::from_secs_f64(args.duration),
            &Progress::default(),
            Kind::Memcpy,
        )?;
        Some(Summary::new(&r, per_thread_bytes, started.elapsed()))
    } else {
        None
    };

    let report = Report {
        args,
        transport: used,
        local_name: engine.name().to_owned(),
        peer,
        summary,
        reference,
    };
    drop(engine);
    drop(local);
    if args.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.human());
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Kind {
    Engine,
    /// Plain memcpy of the same ops (both buffers in this process).
    Memcpy,
}

struct RunCtx<'a> {
    engine: &'a Engine,
    peer: &'a str,
    geo: Geometry,
    opcode: Opcode,
    verify: bool,
    /// Batches in flight per thread (`--inflight`).
    inflight: u64,
    remote_addr: u64,
    verify_base: u64,
    local: &'a Buffer,
}

impl RunCtx<'_> {
    fn run_threads(
        &self,
        threads: u64,
        duration: Duration,
        progress: &Progress,
        kind: Kind,
    ) -> Result<Vec<ThreadResult>, String> {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| s.spawn(move || self.run_thread(t, duration, progress, kind)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("a bench thread panicked".into()))
                })
                .collect()
        })
    }

    fn run_thread(
        &self,
        t: u64,
        duration: Duration,
        progress: &Progress,
        kind: Kind,
    ) -> Result<ThreadResult, String> {
        let local_base = self.geo.local_of(t);
        let bytes = self.geo.batch * self.geo.block;
        let mut r = ThreadResult {
            batches: 0,
            latencies_ns: Vec::with_capacity(1 << 16),
        };
        // Op lists are built before the clock starts, once per position.
        let batches_per_slice = (self.geo.blocks_per_thread / self.geo.batch).max(1);
        let positions = batches_per_slice.min(4096);
        let all_ops: Vec<Vec<Op>> = (0..positions)
            .map(|k| self.geo.ops(t, k, local_base))
            .collect();
        let start = Instant::now();
        let mut k = 0u64;
        if self.inflight > 1 && matches!(kind, Kind::Engine) {
            return self.run_thread_async(t, duration, progress, &all_ops, r);
        }
        while start.elapsed() < duration {
            let ops = &all_ops[(k % positions) as usize];
            let t0 = Instant::now();
            match kind {
                Kind::Engine => self
                    .engine
                    .transfer_sync(self.peer, self.opcode, ops)
                    .map_err(|e| format!("batch {k} of thread {t}: {e}"))?,
                Kind::Memcpy => {
                    for op in ops {
                        let (src, dst) = match self.opcode {
                            Opcode::Read => (op.remote, op.local),
                            Opcode::Write => (op.local, op.remote),
                        };
                        // SAFETY: both ranges lie in the two buffers of this
                        // process (the in-process target's and ours), which
                        // outlive the run; they do not overlap each other.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                src as *const u8,
                                dst as *mut u8,
                                op.len as usize,
                            )
                        };
                    }
                }
            }
            r.latencies_ns.push(t0.elapsed().as_nanos() as u64);
            r.batches += 1;
            progress.bytes.fetch_add(bytes, Ordering::Relaxed);
            if self.verify && matches!(kind, Kind::Engine) {
                self.verify_batch(t, k, ops)?;
            }
            k += 1;
        }
        Ok(r)
    }

    /// `run_thread` with `--inflight` batches submitted ahead: the oldest is
    /// waited for (and its latency recorded) before the next is submitted.
    fn run_thread_async(
        &self,
        t: u64,
        duration: Duration,
        progress: &Progress,
        all_ops: &[Vec<Op>],
        mut r: ThreadResult,
    ) -> Result<ThreadResult, String> {
        let bytes = self.geo.batch * self.geo.block;
        let timeout = self.engine.settings().transfer_timeout;
        let mut queue: std::collections::VecDeque<(BatchId, Instant)> =
            std::collections::VecDeque::with_capacity(self.inflight as usize);
        let start = Instant::now();
        let mut k = 0usize;
        let mut outcome = Ok(());
        while outcome.is_ok() {
            let running = start.elapsed() < duration;
            if running && queue.len() < self.inflight as usize {
                let ops = &all_ops[k % all_ops.len()];
                match self.engine.submit(self.peer, self.opcode, ops) {
                    Ok(id) => queue.push_back((id, Instant::now())),
                    Err(e) => outcome = Err(format!("batch {k} of thread {t}: {e}")),
                }
                k += 1;
                continue;
            }
            // Full, or the time is up: wait for the oldest.
            let Some((id, t0)) = queue.pop_front() else {
                break;
            };
            let waited = self.engine.wait(id, timeout);
            let _ = self.engine.free_batch(id);
            match waited {
                Ok(()) => {
                    // Batches that complete after the clock stopped still
                    // count: they were submitted within it.
                    r.latencies_ns.push(t0.elapsed().as_nanos() as u64);
                    r.batches += 1;
                    progress.bytes.fetch_add(bytes, Ordering::Relaxed);
                }
                Err(e) => outcome = Err(format!("a batch of thread {t}: {e}")),
            }
        }
        // On an error, the rest still finish before their memory is reused.
        for (id, _) in queue {
            let _ = self.engine.wait(id, timeout);
            let _ = self.engine.free_batch(id);
        }
        outcome.map(|()| r)
    }

    /// Reads check the bytes that arrived; writes read the blocks back
    /// into a scratch area and check those.
    fn verify_batch(&self, t: u64, k: u64, ops: &[Op]) -> Result<(), String> {
        let check = |got: &[u8], remote: u64, expect: &dyn Fn(u64) -> u8| {
            let off = remote - self.remote_addr;
            match got
                .iter()
                .enumerate()
                .find(|(i, b)| **b != expect(off + *i as u64))
            {
                None => Ok(()),
                Some((i, b)) => Err(format!(
                    "verify: thread {t} batch {k}: byte at remote offset {} is {b:#04x}, expected {:#04x}",
                    off + i as u64,
                    expect(off + i as u64)
                )),
            }
        };
        match self.opcode {
            Opcode::Read => {
                for op in ops {
                    // SAFETY: the batch is finished; nothing writes here now.
                    let got = unsafe { self.local.bytes(op.local, op.len) };
                    check(got, op.remote, &|i| pattern_byte(TARGET_SEED, i))?;
                }
            }
            Opcode::Write => {
                let scratch = self.verify_base + t * self.geo.batch * self.geo.block;
                let back: Vec<Op> = ops
                    .iter()
                    .enumerate()
                    .map(|(j, op)| Op {
                        local: scratch + j as u64 * op.len,
                        remote: op.remote,
                        len: op.len,
                    })
                    .collect();
                self.engine
                    .read(self.peer, &back)
                    .map_err(|e| format!("verify: reading back batch {k}: {e}"))?;
                for (op, b) in ops.iter().zip(&back) {
                    // SAFETY: both reads are finished; nothing writes these
                    // ranges of our own buffer now.
                    let (sent, got) = unsafe {
                        (
                            self.local.bytes(op.local, op.len),
                            self.local.bytes(b.local, b.len),
                        )
                    };
                    if sent != got {
                        let i = sent.iter().zip(got).position(|(a, b)| a != b).unwrap_or(0);
                        return Err(format!(
                            "verify: thread {t} batch {k}: written byte at remote offset {} reads back as {:#04x}, expected {:#04x}",
                            op.remote - self.remote_addr + i as u64,
                            got[i],
                            sent[i]
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

// ---- output -----------------------------------------------------------------

/// A one-line progress bar on stderr, only when stderr is a terminal.
struct ProgressBar {
    handle: Option<std::thread::JoinHandle<()>>,
    progress: Arc<Progress>,
}

impl ProgressBar {
    fn start(progress: Arc<Progress>, duration: Duration, quiet: bool) -> ProgressBar {
        let handle = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let p = Arc::clone(&progress);
            std::thread::spawn(move || {
                let start = Instant::now();
                while !p.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    let e = start.elapsed().as_secs_f64();
                    let frac = (e / duration.as_secs_f64()).min(1.0);
                    let filled = (frac * 30.0) as usize;
                    let gbps = p.bytes.load(Ordering::Relaxed) as f64 / e / 1e9;
                    eprint!(
                        "\r[{}{}] {e:5.1}s {gbps:8.2} GB/s",
                        "#".repeat(filled),
                        " ".repeat(30 - filled)
                    );
                }
                eprint!("\r{}\r", " ".repeat(60));
            })
        });
        ProgressBar { handle, progress }
    }

    fn finish(self) {
        self.progress.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle {
            let _ = h.join();
        }
    }
}

struct Report<'a> {
    args: &'a BenchArgs,
    transport: &'a str,
    local_name: String,
    peer: &'a str,
    summary: Summary,
    reference: Option<Summary>,
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{} GiB", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

impl Report<'_> {
    fn op_name(&self) -> &'static str {
        match self.args.operation {
            Operation::Read => "read",
            Operation::Write => "write",
        }
    }

    fn human(&self) -> String {
        let a = self.args;
        let s = &self.summary;
        let ops = s.batches * a.batch_size;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "kvferry bench: {} over {} ({} -> {}), {} x {} per batch ({:?}), {} thread{}{}, {:.1} s{}",
            self.op_name(),
            self.transport,
            self.local_name,
            self.peer,
            a.batch_size,
            human_bytes(a.block_size),
            a.layout,
            a.threads,
            if a.threads == 1 { "" } else { "s" },
            if a.inflight > 1 {
                format!(", {} batches in flight each", a.inflight)
            } else {
                String::new()
            },
            s.elapsed,
            if a.verify {
                ", every byte verified"
            } else {
                ""
            }
        );
        let _ = writeln!(
            o,
            "  throughput  {:9.3} GB/s   {:>10.0} ops/s   {:>9.0} batches/s",
            s.gbps(),
            ops as f64 / s.elapsed,
            s.batches as f64 / s.elapsed
        );
        let _ = writeln!(
            o,
            "  latency per batch  p50 {:9.1} us   p99 {:9.1} us   p999 {:9.1} us   mean {:9.1} us",
            s.p50, s.p99, s.p999, s.mean
        );
        if let Some(r) = &self.reference {
            let _ = writeln!(
                o,
                "  memcpy of the same ops  {:9.3} GB/s   p50 {:9.1} us   kvferry/memcpy = {:.2}",
                r.gbps(),
                r.p50,
                s.gbps() / r.gbps()
            );
        }
        o
    }

    fn json(&self) -> String {
        let a = self.args;
        let s = &self.summary;
        let mut o = String::from("{");
        let _ = write!(
            o,
            "\"engine\":\"kvferry\",\"operation\":\"{}\",\"transport\":{},\"layout\":\"{}\",\
             \"block_size\":{},\"batch_size\":{},\"threads\":{},\"inflight\":{},\"verified\":{},\
             \"duration_s\":{:.4},\"bytes\":{},\"batches\":{},\"gbps\":{:.4},\"ops_per_s\":{:.1},\
             \"batches_per_s\":{:.1},\"lat_p50_us\":{:.2},\"lat_p99_us\":{:.2},\"lat_p999_us\":{:.2},\
             \"lat_mean_us\":{:.2},\"initiator\":{},\"target\":{}",
            self.op_name(),
            json_str(self.transport),
            match a.layout {
                Layout::Scattered => "scattered",
                Layout::Contiguous => "contiguous",
            },
            a.block_size,
            a.batch_size,
            a.threads,
            a.inflight,
            a.verify,
            s.elapsed,
            s.bytes,
            s.batches,
            s.gbps(),
            (s.batches * a.batch_size) as f64 / s.elapsed,
            s.batches as f64 / s.elapsed,
            s.p50,
            s.p99,
            s.p999,
            s.mean,
            json_str(&self.local_name),
            json_str(self.peer),
        );
        if let Some(r) = &self.reference {
            let _ = write!(
                o,
                ",\"reference\":{{\"what\":\"memcpy of the same ops\",\"gbps\":{:.4},\"lat_p50_us\":{:.2},\"lat_p99_us\":{:.2}}}",
                r.gbps(),
                r.p50,
                r.p99
            );
        }
        o.push('}');
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("16K"), Ok(16 << 10));
        assert_eq!(parse_size("128KiB"), Ok(128 << 10));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn scattered_ops_never_coalesce_and_stream_through_the_slice() {
        let g = Geometry {
            block: 4096,
            batch: 4,
            local_base: 0x10_0000,
            remote_base: 0x100_0000,
            blocks_per_thread: 8,
            layout: Layout::Scattered,
        };
        let ops = g.ops(1, 1, g.local_of(1));
        for w in ops.windows(2) {
            let contiguous =
                w[0].local + w[0].len == w[1].local && w[0].remote + w[0].len == w[1].remote;
            assert!(!contiguous, "{w:?}");
        }
        // Thread 1's slice starts 8 blocks in; batch 1 covers its blocks 4..8.
        let mut remotes: Vec<u64> = ops.iter().map(|o| (o.remote - 0x100_0000) / 4096).collect();
        remotes.sort();
        assert_eq!(remotes, vec![12, 13, 14, 15]);
        // Batch 2 wraps to the slice's start.
        assert_eq!(g.ops(1, 2, 0)[3].remote, 0x100_0000 + 8 * 4096);
    }

    fn args(extra: &[&str]) -> BenchArgs {
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            a: BenchArgs,
        }
        let mut v = vec!["t"];
        v.extend_from_slice(extra);
        <T as clap::Parser>::parse_from(v).a
    }

    /// A short in-process run of 2 threads x 4 x 8 KiB, plus `extra`.
    fn short_local_run(op: &str, extra: &[&str]) -> Result<(), String> {
        let mut v = vec![
            "--transport",
            "local",
            "--operation",
            op,
            "--block-size",
            "8K",
            "--batch-size",
            "4",
            "--threads",
            "2",
            "--buffer-size",
            "1M",
            "--duration",
            "0.05",
            "--warmup",
            "0",
            "--json",
        ];
        v.extend_from_slice(extra);
        run(&args(&v))
    }

    #[test]
    fn in_process_read_and_write_verify_every_byte() {
        for op in ["read", "write"] {
            short_local_run(op, &["--verify"]).unwrap();
        }
    }

    #[test]
    fn refuses_what_cannot_work() {
        let e = run(&args(&["--block-size", "1M", "--batch-size", "512"])).unwrap_err();
        assert!(e.contains("buffer"), "{e}");
        let e = run(&args(&["--mode", "initiator"])).unwrap_err();
        assert!(e.contains("--segment"), "{e}");
        let e = run(&args(&["--transport", "tcp", "--reference"])).unwrap_err();
        assert!(e.contains("local"), "{e}");
        let e = run(&args(&["--inflight", "0"])).unwrap_err();
        assert!(e.contains("--inflight"), "{e}");
        let e = run(&args(&["--inflight", "2", "--verify"])).unwrap_err();
        assert!(e.contains("--verify"), "{e}");
    }

    #[test]
    fn batches_in_flight_run_to_the_end() {
        for op in ["read", "write"] {
            short_local_run(op, &["--inflight", "3"]).unwrap();
        }
    }

    #[test]
    fn report_json_is_one_object() {
        let a = args(&[]);
        let r = Report {
            args: &a,
            transport: "cma",
            local_name: "127.0.0.1:1".into(),
            peer: "127.0.0.1:2",
            summary: Summary {
                bytes: 1 << 30,
                batches: 10,
                elapsed: 1.0,
                ..Summary::default()
            },
            reference: None,
        };
        let j = r.json();
        assert!(j.starts_with('{') && j.ends_with('}'));
        assert!(j.contains("\"gbps\":1.0737"), "{j}");
        assert!(j.contains("\"transport\":\"cma\""));
    }
}
