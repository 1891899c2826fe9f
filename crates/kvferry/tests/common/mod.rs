//! Helpers shared by the integration tests: a child process that serves a
//! registered buffer, driven over stdin / stdout; the frames of hand-written
//! peers; memory mapped with `mmap` whose protection a test changes.
#![allow(dead_code, reason = "each test file uses a subset")]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use kvferry::wire::{self, FrameHeader, Kind};
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
        };
        let ready = t.expect_line("READY", Duration::from_secs(120));
        let mut it = ready.split_whitespace().skip(1);
        t.name = it.next().expect("name").to_owned();
        t.addr = it.next().and_then(|a| a.parse().ok()).expect("addr");
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

/// A child's `CHILD` spec, "port len seed" (absent numbers are 0); None
/// when not running as a child.
fn child_spec() -> Option<(u64, u64, u64)> {
    let spec = std::env::var(CHILD).ok()?;
    let mut it = spec
        .split_whitespace()
        .map(|x| x.parse::<u64>().expect("child spec"));
    let mut next = || it.next().unwrap_or(0);
    Some((next(), next(), next()))
}

/// Blocks until the parent closes this child's stdin (its way of saying stop).
fn until_stdin_closes() {
    let mut line = String::new();
    while std::io::stdin()
        .read_line(&mut line)
        .map(|n| n > 0)
        .unwrap_or(false)
    {
        line.clear();
    }
}

/// The child side: serve until stdin closes. Call at the top of the
/// child test function; returns false when not running as a child.
pub fn child_main() -> bool {
    let Some((port, len, seed)) = child_spec() else {
        return false;
    };
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
        until_stdin_closes();
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

/// Env var that turns the test binary into an impostor child: the hex of
/// the encoded segment it serves as its own (`impostor_main`).
pub const IMPOSTOR: &str = "KVFERRY_TEST_IMPOSTOR";
/// With `IMPOSTOR`: the port the impostor listens on, at `[::1]` (the port
/// of an engine that listens on IPv4 only), instead of any port of
/// 127.0.0.1.
pub const IMPOSTOR_V6_PORT: &str = "KVFERRY_TEST_IMPOSTOR_V6_PORT";

/// Writes a frame of `kind` for (or answering) request `rid`, its payload
/// `parts` one after another.
pub fn send_frame(
    s: &mut impl Write,
    kind: Kind,
    rid: u64,
    parts: &[&[u8]],
) -> std::io::Result<()> {
    let len = parts.iter().map(|p| p.len() as u64).sum();
    wire::write_frame(s, &FrameHeader::new(kind, rid, len), parts)
}

/// The HELLO_REPLY of a hand-written target of instance `instance_id` that
/// asks for no shared secret (so nobody checks its nonce, left zero).
pub fn hello_reply(instance_id: u64) -> wire::HelloReply {
    wire::HelloReply {
        version: wire::VERSION,
        auth_required: 0,
        reserved: 0,
        nonce: [0; 16],
        instance_id,
        proof: [0; 32],
    }
}

/// Answers on `listener` as a kvferry target that moves no data: HELLO
/// claims the instance of `seg` (an encoded segment), GET_SEGMENT returns
/// `seg`, PINs are granted, LEASE_BOARD is refused, and anything else (READ,
/// WRITE) ends the connection. Returns when the listener fails.
pub fn serve_as_impostor(listener: std::net::TcpListener, seg: Vec<u8>) {
    let instance = wire::decode_segment(&seg)
        .expect("an encoded segment")
        .instance_id;
    for conn in listener.incoming() {
        let Ok(mut s) = conn else { return };
        let seg = seg.clone();
        std::thread::spawn(move || impostor_conn(&mut s, instance, &seg));
    }
}

fn impostor_conn(s: &mut std::net::TcpStream, instance: u64, seg: &[u8]) {
    let mut lease = 1u64;
    while let Ok(Some(h)) = wire::read_header(s) {
        let payload = std::io::Read::take(&mut *s, h.payload_len);
        if std::io::copy(&mut { payload }, &mut std::io::sink()).is_err() {
            return;
        }
        let rid = h.request_id;
        let sent = match Kind::from_u16(h.kind) {
            Some(Kind::Hello) => {
                let r = hello_reply(instance);
                send_frame(s, Kind::HelloReply, rid, &[bytemuck::bytes_of(&r)])
            }
            Some(Kind::GetSegment) => send_frame(s, Kind::SegmentReply, rid, &[seg]),
            Some(Kind::Pin) => {
                lease += 1;
                send_frame(s, Kind::PinOk, rid, &[&lease.to_le_bytes()])
            }
            Some(Kind::Unpin) => Ok(()),
            // No lease board, and no data: READ / WRITE end the connection.
            Some(Kind::LeaseBoard) => {
                let (f, m) = wire::error_frame(rid, kvferry::Status::Unsupported, "none");
                wire::write_frame(s, &f, &[&m])
            }
            _ => return,
        };
        if sent.is_err() {
            return;
        }
    }
}

/// The impostor child: serves the segment in `IMPOSTOR` (`serve_as_impostor`)
/// on a port of 127.0.0.1 (or `[::1]:IMPOSTOR_V6_PORT`), printed as
/// `READY <name> 0 0`, until stdin closes. Returns false when not running
/// as one.
pub fn impostor_main() -> bool {
    let Ok(hex) = std::env::var(IMPOSTOR) else {
        return false;
    };
    let seg: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect();
    let at = match std::env::var(IMPOSTOR_V6_PORT) {
        Ok(port) => format!("[::1]:{port}"),
        Err(_) => "127.0.0.1:0".to_owned(),
    };
    let listener = std::net::TcpListener::bind(&at).expect("bind");
    let name = listener.local_addr().expect("address").to_string();
    std::thread::spawn(move || serve_as_impostor(listener, seg));
    println!("READY {name} 0 0");
    std::io::stdout().flush().ok();
    until_stdin_closes();
    true
}

/// A child target that breaks the promise of registration: it registers
/// `2 * len` bytes of its own mapping (the first half filled with `seed`'s
/// pattern), then takes the second half away (PROT_NONE) without
/// unregistering it.
/// Prints `READY <name> <addr> <len>` (`addr`: the first half) and serves
/// until stdin closes. Returns false when not running as a child.
pub fn unmapping_child_main() -> bool {
    let Some((port, len, seed)) = child_spec() else {
        return false;
    };
    let len = len as usize;
    let engine = Engine::new(EngineConfig::new().port(port as u16)).expect("child engine");
    let mut mem = Mapping::new(2 * len, libc::PROT_READ | libc::PROT_WRITE);
    // SAFETY: the first half of the mapping, used by nothing else yet.
    unsafe { mem.bytes_mut(0, len) }.copy_from_slice(&pattern(seed as u8, len));
    let addr = mem.addr();
    // SAFETY: `mem` outlives `engine` (dropped after it below), but for the
    // half taken away next: the broken promise this child is for (the
    // kernel fails the engine's socket I/O on it with EFAULT).
    unsafe { engine.register_memory(addr, 2 * len as u64, "cpu:0") }.expect("register");
    mem.take_away(len, len);
    println!("READY {} {addr} {len}", engine.name());
    std::io::stdout().flush().ok();
    until_stdin_closes();
    drop(engine);
    drop(mem);
    true
}

/// `bytes` as lower-case hex (for `IMPOSTOR`).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The page size the tests lay their mappings out in.
pub const PAGE: usize = 4096;

/// Private anonymous memory of this process's own, unmapped on drop: memory
/// whose protection a test changes page by page, or takes away, as a
/// buffer's owner might behind the back of an engine it registered with.
pub struct Mapping {
    addr: u64,
    len: usize,
}

impl Mapping {
    /// `len` bytes (whole pages) with protection `prot`.
    pub fn new(len: usize, prot: libc::c_int) -> Mapping {
        // SAFETY: a fresh private anonymous mapping; no existing memory changes.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        Mapping {
            addr: p as u64,
            len,
        }
    }

    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The address of `[offset, +len)`, which must lie inside the mapping.
    fn at(&self, offset: usize, len: usize) -> *mut libc::c_void {
        assert!(
            offset + len <= self.len,
            "[{offset}, +{len}) of {}",
            self.len
        );
        (self.addr as usize + offset) as *mut libc::c_void
    }

    /// Sets the protection of the pages `[offset, +len)`, their contents
    /// kept (a mapping of their own from then on).
    pub fn protect(&mut self, offset: usize, len: usize, prot: libc::c_int) {
        let at = self.at(offset, len);
        // SAFETY: pages of this mapping; `&mut self`: no slice of it lives.
        let rc = unsafe { libc::mprotect(at, len, prot) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    }

    /// Takes the pages `[offset, +len)` away, their contents gone: replaced
    /// in one step by an inaccessible reservation (a bare munmap would let
    /// the next mapping of this process, a thread's stack guard for one,
    /// land there and change what a target reports about the range).
    pub fn take_away(&mut self, offset: usize, len: usize) {
        let at = self.at(offset, len);
        // SAFETY: pages of this mapping; `&mut self`: no slice of it lives.
        let q = unsafe {
            libc::mmap(
                at,
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_eq!(q, at, "{}", std::io::Error::last_os_error());
    }

    /// The bytes `[offset, +len)`.
    ///
    /// # Safety
    /// They are readable, and nothing (an engine they are registered with
    /// included) writes them while the slice lives.
    pub unsafe fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        let at = self.at(offset, len);
        // SAFETY: inside this mapping; the rest is the caller's promise.
        unsafe { std::slice::from_raw_parts(at.cast::<u8>(), len) }
    }

    /// The bytes `[offset, +len)`, to write.
    ///
    /// # Safety
    /// They are readable and writable, and nothing else (an engine they are
    /// registered with included) uses them while the slice lives.
    pub unsafe fn bytes_mut(&mut self, offset: usize, len: usize) -> &mut [u8] {
        let at = self.at(offset, len);
        // SAFETY: inside this mapping; the rest is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(at.cast::<u8>(), len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, which no slice borrows any more; the tests
        // drop the engines that registered it first.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}
