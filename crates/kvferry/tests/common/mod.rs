//! Helpers for the multi-process tests: a child process that serves a
//! registered buffer, driven over stdin / stdout.
#![allow(dead_code, reason = "each test file uses a subset")]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use kvferry::{Engine, EngineConfig};

/// The byte at offset `i` of a buffer filled with `seed`.
pub fn pattern_byte(seed: u8, i: usize) -> u8 {
    (i as u8)
        .wrapping_mul(29)
        .wrapping_add(seed)
        .wrapping_add((i >> 12) as u8)
}

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| pattern_byte(seed, i)).collect()
}

/// `total / block` ops of `block` bytes, the same offsets on both sides.
pub fn block_ops(local: u64, remote: u64, total: u64, block: u64) -> Vec<kvferry::Op> {
    (0..total / block)
        .map(|i| kvferry::Op {
            local: local + i * block,
            remote: remote + i * block,
            len: block,
        })
        .collect()
}

/// Env var that turns the test binary into a child target.
pub const CHILD: &str = "KVFERRY_TEST_CHILD";

/// A running child target.
pub struct Target {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub lines: std::sync::mpsc::Receiver<String>,
    pub name: String,
    pub addr: u64,
    pub len: u64,
}

impl Target {
    /// Spawns `test_fn` of this test binary as a child serving a buffer of
    /// `len` bytes filled with `seed`, on `port` (0: any).
    pub fn spawn(
        test_fn: &str,
        port: u16,
        len: usize,
        seed: u8,
        extra_env: &[(&str, &str)],
    ) -> Target {
        let exe = std::env::current_exe().expect("test exe");
        let mut cmd = Command::new(exe);
        cmd.args(["--exact", test_fn, "--nocapture", "--test-threads=1"])
            .env(CHILD, format!("{port} {len} {seed}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn child");
        let stdin = child.stdin.take();
        let stdout: ChildStdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut t = Target {
            child,
            stdin,
            lines: rx,
            name: String::new(),
            addr: 0,
            len: 0,
        };
        let ready = t.expect_line("READY", Duration::from_secs(120));
        let mut it = ready.split_whitespace().skip(1);
        t.name = it.next().expect("name").to_owned();
        t.addr = it.next().and_then(|a| a.parse().ok()).expect("addr");
        t.len = it.next().and_then(|a| a.parse().ok()).expect("len");
        t
    }

    /// The next line holding `prefix`, from it on (others are skipped).
    pub fn expect_line(&mut self, prefix: &str, within: Duration) -> String {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                // libtest prints "test name ... " before the child's first line.
                Ok(l) if l.contains(prefix) => return l[l.find(prefix).unwrap_or(0)..].to_owned(),
                Ok(_) => {}
                Err(e) => panic!("child did not print {prefix:?}: {e}"),
            }
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        drop(self.stdin.take());
        std::thread::sleep(Duration::from_millis(10));
        self.kill();
    }
}

/// The child side: serve until stdin closes. Call at the top of the
/// child test function; returns false when not running as a child.
pub fn child_main() -> bool {
    let Ok(spec) = std::env::var(CHILD) else {
        return false;
    };
    let mut it = spec
        .split_whitespace()
        .map(|x| x.parse::<u64>().expect("child spec"));
    let (port, len, seed) = (
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
    );
    let engine = Engine::new(EngineConfig::new().port(port as u16)).expect("child engine");
    // A little slack before the buffer so two children never share addresses.
    let slack = 4096 * (seed as usize % 7 + 1);
    let mut buf = vec![0u8; len as usize + slack];
    buf[slack..].copy_from_slice(&pattern(seed as u8, len as usize));
    let addr = buf.as_mut_ptr() as u64 + slack as u64;
    // SAFETY: `buf` lives until the process exits; the engine dies first.
    unsafe { engine.register_memory(addr, len, "cpu:0") }.expect("register");
    println!("READY {} {addr} {len}", engine.name());
    std::io::stdout().flush().ok();
    // Serve; report notifications; exit when stdin closes.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut s = String::new();
        while std::io::stdin()
            .read_line(&mut s)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            s.clear();
        }
        let _ = tx.send(());
    });
    loop {
        for n in engine.drain_notifications() {
            let msg = String::from_utf8_lossy(&n.message).into_owned();
            if let Some(seed) = msg.strip_prefix("check:") {
                let seed: u8 = seed.parse().unwrap_or(0);
                // SAFETY: `addr..addr+len` lies inside `buf`, alive here.
                let got = unsafe { std::slice::from_raw_parts(addr as *const u8, len as usize) };
                let ok = got
                    .iter()
                    .enumerate()
                    .all(|(i, &b)| b == pattern_byte(seed, i));
                println!("CHECK {}", if ok { "ok" } else { "bad" });
            } else {
                println!("NOTE {} {msg}", n.from);
            }
            std::io::stdout().flush().ok();
        }
        if rx.recv_timeout(Duration::from_millis(2)).is_ok() {
            break;
        }
    }
    drop(engine);
    drop(buf);
    true
}

/// Env var that turns the test binary into a child initiator:
/// `"<peer> <remote addr> <len> <seed>"`.
pub const INITIATOR: &str = "KVFERRY_TEST_INITIATOR";

/// The child initiator: reads the peer's buffer, checks the pattern, and
/// prints `INITIATOR <ok|bad|error: ...> <transport before> <transport after>`.
pub fn initiator_main() -> bool {
    let Ok(spec) = std::env::var(INITIATOR) else {
        return false;
    };
    let w: Vec<&str> = spec.split_whitespace().collect();
    let (peer, addr, len, seed) = (
        w[0],
        w[1].parse::<u64>().expect("addr"),
        w[2].parse::<usize>().expect("len"),
        w[3].parse::<u8>().expect("seed"),
    );
    let engine = Engine::new(EngineConfig::new().port(0)).expect("initiator engine");
    let mut buf = vec![0u8; len];
    // SAFETY: `buf` outlives `engine` (dropped first below).
    unsafe { engine.register_memory(buf.as_mut_ptr() as u64, len as u64, "cpu:0") }
        .expect("register");
    let before = engine.transport_to(peer).unwrap_or("?");
    let op = kvferry::Op {
        local: buf.as_ptr() as u64,
        remote: addr,
        len: len as u64,
    };
    let result = match engine.read(peer, &[op]) {
        Ok(()) if buf == pattern(seed, len) => "ok".to_string(),
        Ok(()) => "bad".to_string(),
        Err(e) => format!("error:{e}").replace(' ', "_"),
    };
    let after = engine.transport_to(peer).unwrap_or("?");
    println!("INITIATOR {result} {before} {after}");
    std::io::stdout().flush().ok();
    drop(engine);
    true
}
