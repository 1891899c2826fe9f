//! Engines with NPU memory in child processes, against the CANN stand-in.
//!
//! Each child is this test binary run again (`--exact <child test>`), with
//! `KVFERRY_ACL_LIBRARY` pointing at the stand-in and the failure injection
//! of its scenario in its environment (the stand-in reads it at call time,
//! so each process gets its own). A child serves one engine with a device
//! buffer and a host buffer, and takes commands on stdin, one per line; it
//! answers on stdout.
//!
//! Commands:
//! - `xfer <read|write> <peer> <npu|host> <remote addr> <len> <block> [async]`:
//!   one batch of `len / block` ops from the local buffer's start;
//! - `mixed <read|write> <peer> <remote npu> <remote host> <len> <block>`: one
//!   batch whose ops interleave four quarters: npu<->npu, host<->host,
//!   npu<->host, host<->npu (local<->remote);
//! - `fill <npu|host> <seed>`, `check <npu|host> <seed> <offset> <len>`;
//! - `transport <peer>`; `stats`; `unregister <npu|host>`;
//! - `register <offset> <len>`: registers part of a spare device buffer.
//!
//! Answers: `RESULT ok` / `RESULT err <status code> <message>`, `CHECK ok` /
//! `CHECK bad at <i>`, `TRANSPORT <host> <device>`, `STATS k=v ...`.
#![allow(dead_code, reason = "each test file uses a subset")]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use kvferry::{Engine, EngineConfig, Error, Op, Opcode};
use kvferry_ascend::{AscendRuntime, DeviceBuffer};

/// The byte at offset `i` of a buffer filled with `seed`.
pub fn pattern_byte(seed: u8, i: usize) -> u8 {
    (i as u8)
        .wrapping_mul(31)
        .wrapping_add(seed)
        .wrapping_add((i >> 13) as u8)
}

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| pattern_byte(seed, i)).collect()
}

/// Env var that turns the test binary into a child: `<device> <len> <seed>`.
pub const CHILD: &str = "KVFERRY_ASCEND_TEST_CHILD";

/// Set to a real ACL runtime (e.g. `libascendcl.so` on an Ascend machine)
/// to run these tests against it instead of the CANN stand-in.
pub const HARDWARE_ENV: &str = "KVFERRY_TEST_ACL_LIBRARY";

/// The ACL runtime the children load: [`HARDWARE_ENV`], else the stand-in.
pub fn acl_library() -> String {
    std::env::var(HARDWARE_ENV)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| kvferry_cann_standin::STANDIN_LIBRARY.to_owned())
}

/// Whether the tests run against the stand-in (failure injection and the
/// stand-in's own texts exist only there).
pub fn on_standin() -> bool {
    acl_library() == kvferry_cann_standin::STANDIN_LIBRARY
}

/// A running child engine.
pub struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
    pub name: String,
    pub npu: u64,
    pub host: u64,
    pub len: u64,
}

impl Peer {
    /// Spawns a child with a device buffer of `len` bytes on npu:`device`
    /// and a host buffer of `len` bytes, filled with `seed` and `seed + 1`.
    pub fn spawn(test_fn: &str, device: u32, len: usize, seed: u8, env: &[(&str, &str)]) -> Peer {
        let exe = std::env::current_exe().expect("test exe");
        let mut cmd = Command::new(exe);
        cmd.args(["--exact", test_fn, "--nocapture", "--test-threads=1"])
            .env(CHILD, format!("{device} {len} {seed}"))
            .env(
                kvferry_ascend_sys::LIBRARY_ENV,
                kvferry_cann_standin::STANDIN_LIBRARY,
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, _) in std::env::vars() {
            if k.starts_with("KVF_STANDIN_")
                || k.starts_with("KVFERRY_")
                || k.starts_with("ASCEND_")
            {
                cmd.env_remove(k);
            }
        }
        cmd.env(
            kvferry_ascend_sys::LIBRARY_ENV,
            kvferry_cann_standin::STANDIN_LIBRARY,
        );
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn child");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut p = Peer {
            child,
            stdin,
            lines: rx,
            name: String::new(),
            npu: 0,
            host: 0,
            len: 0,
        };
        let ready = p.expect("READY");
        let f: Vec<&str> = ready.split_whitespace().collect();
        p.name = f[1].to_owned();
        p.npu = f[2].parse().expect("npu addr");
        p.host = f[3].parse().expect("host addr");
        p.len = f[4].parse().expect("len");
        p
    }

    /// The next line holding `prefix`, from it on (others are skipped).
    pub fn expect(&mut self, prefix: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(prefix) => return l[l.find(prefix).unwrap_or(0)..].to_owned(),
                Ok(_) => {}
                Err(e) => panic!("child did not print {prefix:?}: {e}"),
            }
        }
    }

    /// Sends a command and returns the answer line starting with `answer`.
    pub fn ask(&mut self, command: &str, answer: &str) -> String {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{command}").expect("send command");
        stdin.flush().expect("flush");
        self.expect(answer)
    }

    /// `xfer` / `mixed`: `Ok` or the (status, message) of the error.
    pub fn run(&mut self, command: &str) -> Result<(), (i32, String)> {
        let r = self.ask(command, "RESULT");
        if r == "RESULT ok" {
            return Ok(());
        }
        let rest = r.strip_prefix("RESULT err ").expect("RESULT line");
        let (code, msg) = rest.split_once(' ').expect("code and message");
        Err((code.parse().expect("status code"), msg.to_owned()))
    }

    pub fn check(&mut self, kind: &str, seed: u8, offset: u64, len: u64) {
        let r = self.ask(&format!("check {kind} {seed} {offset} {len}"), "CHECK");
        assert_eq!(r, "CHECK ok", "{kind} [{offset}, +{len}) of {}", self.name);
    }

    /// The child's counters.
    pub fn stats(&mut self) -> std::collections::HashMap<String, u64> {
        let line = self.ask("stats", "STATS");
        line.split_whitespace()
            .skip(1)
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect()
    }

    /// The child's counters once its staging buffers are all back in the
    /// pool (a server thread may still be finishing the reply the caller
    /// just read); fails after 5 s.
    pub fn stats_settled(&mut self) -> std::collections::HashMap<String, u64> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let s = self.stats();
            if s.get("staging_in_use") == Some(&0) || std::time::Instant::now() > deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `(host transport, device transport)` to `peer`.
    pub fn transport(&mut self, peer: &str) -> (String, String) {
        let line = self.ask(&format!("transport {peer}"), "TRANSPORT");
        let f: Vec<&str> = line.split_whitespace().collect();
        (f[1].to_owned(), f[2].to_owned())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- the child side -------------------------------------------------------

struct State {
    rt: Arc<AscendRuntime>,
    engine: Engine,
    npu: Option<DeviceBuffer>,
    device: u32,
    host: Vec<u8>,
    host_addr: u64,
    spare: Option<DeviceBuffer>,
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn result(r: Result<(), Error>) {
    match r {
        Ok(()) => say("RESULT ok"),
        Err(e) => say(&format!(
            "RESULT err {} {}",
            e.status() as i32,
            e.to_string().replace('\n', " ")
        )),
    }
}

impl State {
    fn local(&self, kind: &str) -> u64 {
        match kind {
            "npu" => self.npu.as_ref().map_or(0, DeviceBuffer::addr),
            _ => self.host_addr,
        }
    }

    fn len(&self) -> u64 {
        self.host.len() as u64
    }

    fn transfer(
        &self,
        opcode: Opcode,
        peer: &str,
        ops: &[Op],
        asynchronous: bool,
    ) -> Result<(), Error> {
        if !asynchronous {
            return self.engine.transfer_sync(peer, opcode, ops);
        }
        let id = self.engine.submit(peer, opcode, ops)?;
        let r = self.engine.wait(id, Duration::from_secs(60));
        self.engine.free_batch(id)?;
        r
    }

    fn command(&mut self, line: &str) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> u64 { f.get(i).and_then(|x| x.parse().ok()).unwrap_or(0) };
        let opcode = |s: &str| {
            if s == "read" {
                Opcode::Read
            } else {
                Opcode::Write
            }
        };
        match f.first().copied() {
            Some("xfer") => {
                let (local, remote, len, block) = (self.local(f[3]), num(4), num(5), num(6).max(1));
                let ops: Vec<Op> = (0..len / block)
                    .map(|i| Op {
                        local: local + i * block,
                        remote: remote + i * block,
                        len: block,
                    })
                    .collect();
                result(self.transfer(opcode(f[1]), f[2], &ops, f.get(7) == Some(&"async")));
            }
            Some("mixed") => {
                let (rnpu, rhost, len, block) = (num(3), num(4), num(5), num(6).max(1));
                let (lnpu, lhost) = (self.local("npu"), self.local("host"));
                let q = len / 4;
                let quarters = [(lnpu, rnpu), (lhost, rhost), (lnpu, rhost), (lhost, rnpu)];
                let mut ops = Vec::new();
                for i in 0..q / block {
                    for (k, (l, r)) in quarters.iter().enumerate() {
                        let at = k as u64 * q + i * block;
                        ops.push(Op {
                            local: l + at,
                            remote: r + at,
                            len: block,
                        });
                    }
                }
                result(self.transfer(opcode(f[1]), f[2], &ops, false));
            }
            Some("fill") => {
                let data = pattern(num(2) as u8, self.host.len());
                let r = if f[1] == "npu" {
                    self.rt.upload(self.device, self.local("npu"), &data)
                } else {
                    self.host.copy_from_slice(&data);
                    Ok(())
                };
                result(r);
            }
            Some("check") => {
                let (seed, offset, len) = (num(2) as u8, num(3) as usize, num(4) as usize);
                let mut got = vec![0u8; self.host.len()];
                if f[1] == "npu" {
                    if let Err(e) = self.rt.download(self.device, self.local("npu"), &mut got) {
                        return say(&format!("CHECK bad: {e}"));
                    }
                } else {
                    got.copy_from_slice(&self.host);
                }
                match (offset..offset + len).find(|&i| got[i] != pattern_byte(seed, i)) {
                    None => say("CHECK ok"),
                    Some(i) => say(&format!(
                        "CHECK bad at {i}: {} != {}",
                        got[i],
                        pattern_byte(seed, i)
                    )),
                }
            }
            Some("transport") => {
                let host = self.engine.transport_to(f[1]);
                let device = self.engine.device_transport_to(f[1]);
                match (host, device) {
                    (Ok(h), Ok(d)) => say(&format!("TRANSPORT {h} {d}")),
                    (Err(e), _) | (_, Err(e)) => say(&format!("TRANSPORT error {e}")),
                }
            }
            Some("stats") => {
                let s = self.engine.staging_stats();
                let a = self.rt.stats();
                say(&format!(
                    "STATS staging_allocated={} staging_in_use={} streams_aborted={} pooled_streams={} exports={} imports={} imports_made={}",
                    s.allocated,
                    s.in_use,
                    a.streams_aborted,
                    a.pooled_streams,
                    a.exports,
                    a.imports,
                    a.imports_made
                ));
            }
            Some("unregister") => {
                let addr = self.local(f[1]);
                result(self.engine.unregister_memory(addr));
            }
            Some("register") => {
                let r = match &self.spare {
                    Some(spare) => {
                        // SAFETY: the spare buffer lives as long as the engine.
                        unsafe {
                            self.engine.register_memory(
                                spare.addr() + num(1),
                                num(2),
                                &format!("npu:{}", self.device),
                            )
                        }
                    }
                    None => Ok(()),
                };
                result(r);
            }
            _ => say(&format!("UNKNOWN {line}")),
        }
    }
}

/// The child side: serve and take commands until stdin closes. Returns
/// false when not running as a child.
pub fn child_main() -> bool {
    let Ok(spec) = std::env::var(CHILD) else {
        return false;
    };
    let mut it = spec
        .split_whitespace()
        .map(|x| x.parse::<u64>().expect("child spec"));
    let (device, len, seed) = (
        it.next().unwrap_or(0) as u32,
        it.next().unwrap_or(0),
        it.next().unwrap_or(0) as u8,
    );
    let rt = AscendRuntime::load().expect("load the stand-in");
    // KVFERRY_TEST_HOST_ONLY=1: an engine without a device runtime (and no
    // device buffer), as a host-only peer of NPU engines.
    let host_only = std::env::var_os("KVFERRY_TEST_HOST_ONLY").is_some();
    let mut config = EngineConfig::new().port(0);
    if !host_only {
        config = config.device_runtime(rt.clone());
    }
    if std::env::var_os("KVFERRY_TRANSFER_TIMEOUT_MS").is_none() {
        config = config.transfer_timeout(Duration::from_secs(20));
    }
    let engine = Engine::new(config).expect("child engine");
    let npu = (!host_only).then(|| {
        let npu = rt.alloc_device(device, len).expect("device buffer");
        rt.upload(device, npu.addr(), &pattern(seed, len as usize))
            .expect("fill the device buffer");
        npu
    });
    let mut host = pattern(seed.wrapping_add(1), len as usize);
    let host_addr = host.as_mut_ptr() as u64;
    // SAFETY: both buffers outlive the engine (dropped first, below).
    unsafe {
        if let Some(npu) = &npu {
            engine
                .register_memory(npu.addr(), len, &format!("npu:{device}"))
                .expect("register npu");
        }
        engine
            .register_memory(host_addr, len, "cpu:0")
            .expect("register host");
    }
    let spare = rt.alloc_device(device, 8 << 20).ok();
    let mut state = State {
        rt,
        engine,
        npu,
        device,
        host,
        host_addr,
        spare,
    };
    say(&format!(
        "READY {} {} {host_addr} {len}",
        state.engine.name(),
        state.local("npu")
    ));
    let stdin = std::io::stdin();
    for line in stdin.lock().lines().map_while(Result::ok) {
        state.command(line.trim());
    }
    let State {
        engine,
        npu,
        spare,
        host,
        ..
    } = state;
    drop(engine);
    drop((npu, spare, host));
    true
}
