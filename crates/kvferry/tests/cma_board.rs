//! The cma lease board (board.rs): batches between engines of one host take
//! no PIN round trip; unregister waits for batches that announced
//! themselves, and is not blocked by a dead initiator; PIN leases are the
//! fallback. Engines of this process are made to use cma (process_vm_* on
//! our own pid) with a test hook; the dead and stuck initiators are real
//! processes.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kvferry::{Engine, EngineConfig, Error, Op, TestHooks};

mod common;
use common::{block_ops as ops, pattern};

fn target(wait: Duration) -> Engine {
    Engine::new(EngineConfig::new().port(0).transfer_timeout(wait)).unwrap()
}

fn initiator(hooks: TestHooks) -> Engine {
    initiator_within(hooks, Duration::from_secs(20))
}

/// An initiator on cma whose batches have `wait` (the transfer timeout).
fn initiator_within(hooks: TestHooks, wait: Duration) -> Engine {
    let hooks = TestHooks {
        cma_in_process: true,
        ..hooks
    };
    Engine::new(
        EngineConfig::new()
            .port(0)
            .transfer_timeout(wait)
            .test_hooks(hooks),
    )
    .unwrap()
}

/// A target and an initiator on cma, each with `len` registered bytes.
/// Fields drop in order: both engines before the buffers they registered.
struct Pair {
    t: Engine,
    i: Engine,
    remote: Vec<u8>,
    local: Vec<u8>,
}

fn pair(hooks: TestHooks, len: usize) -> Pair {
    let mut p = Pair {
        t: target(Duration::from_secs(10)),
        i: initiator(hooks),
        remote: pattern(3, len),
        local: vec![0u8; len],
    };
    // SAFETY: the buffers are moved into `p` with the engines and dropped
    // after them; moving a Vec does not move its heap memory.
    unsafe {
        p.t.register_memory(p.remote.as_mut_ptr() as u64, len as u64, "cpu:0")
            .unwrap();
        p.i.register_memory(p.local.as_mut_ptr() as u64, len as u64, "cpu:0")
            .unwrap();
    }
    assert_eq!(p.i.transport_to(p.t.name()).unwrap(), "cma");
    p
}

/// Reads and writes of every shape (one slice, many, split over the copy
/// thread) land byte for byte; returns the target's PIN count afterwards.
fn round_trips(hooks: TestHooks) -> u64 {
    const LEN: usize = 4 << 20;
    let Pair {
        t,
        i,
        remote,
        mut local,
    } = pair(hooks, LEN);
    let (l, r) = (local.as_ptr() as u64, remote.as_ptr() as u64);
    // One contiguous batch (one slice, cut in halves), then scattered ones.
    i.read(t.name(), &ops(l, r, LEN as u64, 128 << 10)).unwrap();
    assert!(local == remote, "contiguous read");
    local.fill(0);
    let mut rev = ops(l, r, LEN as u64, 16 << 10);
    rev.reverse();
    i.read(t.name(), &rev).unwrap();
    assert!(local == remote, "scattered read");
    local.fill(0);
    i.read(t.name(), &ops(l, r, 32 << 10, 4 << 10)).unwrap();
    assert!(local[..32 << 10] == remote[..32 << 10], "small read");

    local.copy_from_slice(&pattern(9, LEN));
    i.write(t.name(), &ops(l, r, LEN as u64, 1 << 20)).unwrap();
    assert!(local == remote, "contiguous write");
    local.copy_from_slice(&pattern(10, LEN));
    let mut rev = ops(l, r, LEN as u64, 64 << 10);
    rev.reverse();
    let id = i.submit(t.name(), kvferry::Opcode::Write, &rev).unwrap();
    i.wait(id, Duration::from_secs(20)).unwrap();
    i.free_batch(id).unwrap();
    assert!(local == remote, "async scattered write");
    let pins = t.pin_requests_served();
    drop((i, t));
    pins
}

#[test]
fn reads_and_writes_take_no_pin_round_trip() {
    assert_eq!(round_trips(TestHooks::default()), 0);
}

#[test]
fn pin_leases_when_the_board_cannot_be_opened() {
    let hooks = TestHooks {
        board_open_fails: true,
        ..TestHooks::default()
    };
    assert!(round_trips(hooks) >= 5, "every batch takes a PIN lease");
}

/// A pid that names another process here (another pid namespace): cma is
/// given up for tcp, without a PIN lease, whose process_vm_* would go to
/// that other process; the batch still moves the right bytes.
#[test]
fn a_board_of_another_process_turns_cma_off() {
    const LEN: usize = 1 << 20;
    let hooks = TestHooks {
        board_in_another_process: true,
        ..TestHooks::default()
    };
    let p = pair(hooks, LEN);
    let (l, r) = (p.local.as_ptr() as u64, p.remote.as_ptr() as u64);
    p.i.read(p.t.name(), &ops(l, r, LEN as u64, 64 << 10))
        .unwrap();
    assert!(p.local == p.remote);
    assert_eq!(p.i.transport_to(p.t.name()).unwrap(), "tcp");
    assert_eq!(
        p.t.pin_requests_served(),
        0,
        "no PIN lease, no process_vm_*"
    );
}

/// A copy that runs past its deadline says how long the batch had (it
/// said 0 ms).
#[test]
fn a_cma_copy_past_its_deadline_names_the_time_it_had() {
    const LEN: usize = 64 << 10;
    const WAIT: Duration = Duration::from_secs(1);
    let slept = Arc::new(AtomicBool::new(false));
    let hooks = TestHooks {
        before_cma_copy: Some(Arc::new({
            let slept = Arc::clone(&slept);
            move || {
                if !slept.swap(true, Ordering::SeqCst) {
                    std::thread::sleep(WAIT + Duration::from_millis(100));
                }
            }
        })),
        ..TestHooks::default()
    };
    let mut remote = pattern(5, LEN);
    let mut local = vec![0u8; LEN];
    let t = target(Duration::from_secs(10));
    let i = initiator_within(hooks, WAIT);
    // SAFETY: both engines are dropped before the buffers.
    unsafe {
        t.register_memory(remote.as_mut_ptr() as u64, LEN as u64, "cpu:0")
            .unwrap();
        i.register_memory(local.as_mut_ptr() as u64, LEN as u64, "cpu:0")
            .unwrap();
    }
    assert_eq!(i.transport_to(t.name()).unwrap(), "cma");
    let (l, r) = (local.as_ptr() as u64, remote.as_ptr() as u64);
    let e = i
        .read(t.name(), &ops(l, r, LEN as u64, 16 << 10))
        .unwrap_err();
    match &e {
        Error::TransferTimeout { what, ms } => {
            assert!(what.starts_with("cma transfer"), "{e}");
            // The budget left when the batch reached cma: most of WAIT.
            let wait = WAIT.as_millis() as u64;
            assert!(*ms >= wait / 2 && *ms <= wait, "{e}");
        }
        other => panic!("not a transfer timeout: {other}"),
    }
    assert!(slept.load(Ordering::SeqCst), "the copy took the fast path");
    drop((i, t));
}

/// A range the target no longer has (the initiator's cached segment still
/// shows it) fails the same way on both paths, before anything moves.
fn stale_range_error(hooks: TestHooks) -> Error {
    const LEN: usize = 1 << 20;
    let t = target(Duration::from_secs(10));
    let i = initiator(hooks);
    let mut a = pattern(1, LEN);
    let mut b = pattern(2, LEN);
    let mut local = vec![0u8; LEN];
    // SAFETY: the buffers outlive the engines.
    unsafe {
        t.register_memory(a.as_mut_ptr() as u64, LEN as u64, "cpu:0")
            .unwrap();
        t.register_memory(b.as_mut_ptr() as u64, LEN as u64, "cpu:0")
            .unwrap();
        i.register_memory(local.as_mut_ptr() as u64, LEN as u64, "cpu:0")
            .unwrap();
    }
    let l = local.as_ptr() as u64;
    i.read(t.name(), &ops(l, a.as_ptr() as u64, LEN as u64, LEN as u64))
        .unwrap();
    assert!(local == a);
    t.unregister_memory(b.as_ptr() as u64).unwrap();
    local.fill(0);
    let err = i
        .read(t.name(), &ops(l, b.as_ptr() as u64, LEN as u64, 64 << 10))
        .unwrap_err();
    assert!(local.iter().all(|&x| x == 0), "bytes moved");
    // The other region still works.
    i.read(t.name(), &ops(l, a.as_ptr() as u64, LEN as u64, LEN as u64))
        .unwrap();
    drop((i, t));
    err
}

#[test]
fn range_outside_every_region_fails_like_a_refused_pin() {
    let fast = stale_range_error(TestHooks::default());
    let pinned = stale_range_error(TestHooks {
        board_open_fails: true,
        ..TestHooks::default()
    });
    for e in [&fast, &pinned] {
        assert!(matches!(e, Error::RequestRefused { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("the target refused the request: range 0"),
            "{e}"
        );
    }
    assert_eq!(fast.status(), pinned.status());
}

/// Blocks the fast path of one batch in the hook until released.
#[derive(Default)]
struct Gate {
    state: Mutex<(bool, bool, bool)>, // (armed, inside, released)
    cv: Condvar,
}

impl Gate {
    fn hook(self: &Arc<Self>) -> Arc<dyn Fn() + Send + Sync> {
        let g = Arc::clone(self);
        Arc::new(move || {
            let mut s = g.state.lock().unwrap();
            if !s.0 {
                return;
            }
            s.0 = false;
            s.1 = true;
            g.cv.notify_all();
            while !s.2 {
                s = g.cv.wait(s).unwrap();
            }
        })
    }
    fn arm(&self) {
        *self.state.lock().unwrap() = (true, false, false);
    }
    fn wait_inside(&self) {
        let mut s = self.state.lock().unwrap();
        while !s.1 {
            s = self.cv.wait(s).unwrap();
        }
    }
    fn release(&self) {
        self.state.lock().unwrap().2 = true;
        self.cv.notify_all();
    }
}

#[test]
fn unregister_under_a_held_slot_is_busy_and_the_region_stays_usable() {
    const LEN: usize = 1 << 20;
    let t = target(Duration::from_millis(300));
    let gate = Arc::new(Gate::default());
    let i = initiator(TestHooks {
        before_cma_copy: Some(gate.hook()),
        ..TestHooks::default()
    });
    let mut remote = vec![0u8; LEN];
    let mut local = pattern(7, LEN);
    // SAFETY: the buffers outlive the engines.
    unsafe {
        t.register_memory(remote.as_mut_ptr() as u64, LEN as u64, "cpu:0")
            .unwrap();
        i.register_memory(local.as_mut_ptr() as u64, LEN as u64, "cpu:0")
            .unwrap();
    }
    let (l, r) = (local.as_ptr() as u64, remote.as_ptr() as u64);
    gate.arm();
    let busy = std::thread::scope(|s| {
        let writer = s.spawn(|| i.write(t.name(), &ops(l, r, LEN as u64, 64 << 10)));
        gate.wait_inside();
        let busy = t.unregister_memory(r);
        // Released before any assertion, so a failure cannot hang the scope.
        gate.release();
        writer.join().unwrap().unwrap();
        busy
    });
    let e = busy.unwrap_err();
    assert!(matches!(e, Error::RegionBusy { .. }), "{e}");
    assert!(
        local == remote,
        "the held write landed in the still registered region"
    );
    // Still registered and usable, over the fast path.
    local.copy_from_slice(&pattern(8, LEN));
    i.write(t.name(), &ops(l, r, LEN as u64, LEN as u64))
        .unwrap();
    assert!(local == remote);
    assert_eq!(t.pin_requests_served(), 0);
    t.unregister_memory(r).unwrap();
    drop((i, t));
}

#[test]
fn no_write_lands_after_unregister_returns() {
    const LEN: usize = 2 << 20;
    let t = target(Duration::from_secs(10));
    let i = initiator(TestHooks::default());
    let mut remote = vec![0u8; LEN];
    let mut local = vec![0xabu8; LEN];
    // SAFETY: the buffers outlive the engines.
    unsafe {
        i.register_memory(local.as_mut_ptr() as u64, LEN as u64, "cpu:0")
            .unwrap();
    }
    let (l, r) = (local.as_ptr() as u64, remote.as_mut_ptr() as u64);
    for round in 0..6 {
        // SAFETY: `remote` outlives the engines.
        unsafe { t.register_memory(r, LEN as u64, "cpu:0") }.unwrap();
        let stop = AtomicBool::new(false);
        let (ok, failed) = (AtomicUsize::new(0), AtomicUsize::new(0));
        std::thread::scope(|s| {
            let hammer = || {
                let shapes = [
                    ops(l, r, LEN as u64, LEN as u64),
                    ops(l, r, 512 << 10, 16 << 10),
                    ops(l, r + (1 << 20), 1 << 20, 128 << 10),
                ];
                let mut k = 0;
                while !stop.load(Ordering::Relaxed) {
                    match i.write(t.name(), &shapes[k % shapes.len()]) {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    k += 1;
                }
            };
            s.spawn(hammer);
            s.spawn(hammer);
            while ok.load(Ordering::Relaxed) < 20 {
                std::thread::sleep(Duration::from_millis(1));
            }
            t.unregister_memory(r).unwrap();
            // The owner may reuse the memory now: no write may land in it.
            // SAFETY: `remote` is ours; nothing else may write it any more.
            unsafe { std::ptr::write_bytes(r as *mut u8, 0x5a, LEN) };
            let seen = failed.load(Ordering::Relaxed);
            while failed.load(Ordering::Relaxed) < seen + 20 {
                std::thread::sleep(Duration::from_millis(1));
            }
            stop.store(true, Ordering::Relaxed);
        });
        // SAFETY: the hammer threads are done; plain reads of our buffer.
        let after = unsafe { std::slice::from_raw_parts(r as *const u8, LEN) };
        assert!(
            after.iter().all(|&b| b == 0x5a),
            "round {round}: a write landed after unregister returned"
        );
    }
    assert_eq!(t.pin_requests_served(), 0);
    drop((i, t));
    drop(remote);
}

/// Env var that turns this test binary into a stuck initiator:
/// `"<peer> <remote addr> <len>"`.
const STUCK: &str = "KVFERRY_TEST_STUCK_INITIATOR";

/// Not a test of its own: a child initiator that writes to the peer and
/// stops forever inside the fast path, its lease board slot held.
#[test]
fn child_stuck_initiator() {
    let Ok(spec) = std::env::var(STUCK) else {
        return;
    };
    let w: Vec<&str> = spec.split_whitespace().collect();
    let (peer, addr, len) = (
        w[0],
        w[1].parse::<u64>().unwrap(),
        w[2].parse::<u64>().unwrap(),
    );
    let hook: Arc<dyn Fn() + Send + Sync> = Arc::new(|| {
        println!("HOLDING");
        std::io::stdout().flush().ok();
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    });
    let e = Engine::new(EngineConfig::new().port(0).test_hooks(TestHooks {
        before_cma_copy: Some(hook),
        ..TestHooks::default()
    }))
    .unwrap();
    let mut buf = vec![1u8; len as usize];
    // SAFETY: `buf` lives until the process is killed.
    unsafe { e.register_memory(buf.as_mut_ptr() as u64, len, "cpu:0") }.unwrap();
    let op = Op {
        local: buf.as_ptr() as u64,
        remote: addr,
        len,
    };
    let r = e.write(peer, &[op]);
    println!("NOT HELD {r:?}");
}

#[test]
fn a_stuck_initiator_makes_unregister_busy_and_a_killed_one_does_not_block_it() {
    const LEN: usize = 1 << 20;
    let t = target(Duration::from_millis(300));
    let mut remote = vec![0u8; LEN];
    let r = remote.as_mut_ptr() as u64;
    // SAFETY: `remote` outlives the engine.
    unsafe { t.register_memory(r, LEN as u64, "cpu:0") }.unwrap();
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_stuck_initiator",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(STUCK, format!("{} {r} {LEN}", t.name()))
        .stdout(Stdio::piped())
        .spawn()
        .map(Killed)
        .unwrap();
    let out = child.0.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    let line = lines
        .find_map(|l| {
            l.ok()
                .filter(|l| l.contains("HOLDING") || l.contains("NOT HELD"))
        })
        .unwrap_or_default();
    assert!(line.contains("HOLDING"), "{line}");
    // The stuck initiator holds its slot: unregister times out, and the
    // region stays registered and usable.
    let e = t.unregister_memory(r).unwrap_err();
    assert!(matches!(e, Error::RegionBusy { .. }), "{e}");
    let i = initiator(TestHooks::default());
    let mut local = pattern(4, LEN);
    // SAFETY: `local` outlives `i`.
    unsafe { i.register_memory(local.as_mut_ptr() as u64, LEN as u64, "cpu:0") }.unwrap();
    i.write(
        t.name(),
        &ops(local.as_ptr() as u64, r, LEN as u64, LEN as u64),
    )
    .unwrap();
    assert!(local == remote);
    drop(i);
    // Killed: its connection closes, its slot is freed.
    drop(child);
    let mut left = 100;
    loop {
        match t.unregister_memory(r) {
            Ok(()) => break,
            Err(Error::RegionBusy { .. }) if left > 0 => left -= 1,
            Err(e) => panic!("unregister after the initiator died: {e}"),
        }
    }
    assert_eq!(t.pin_requests_served(), 0);
    drop(t);
}
