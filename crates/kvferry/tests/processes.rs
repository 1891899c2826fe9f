//! Engines in different processes: the same-host (cma) and tcp paths, data
//! checked byte for byte; notifications; a peer killed mid-batch; a peer
//! restarted on the same port with different memory.

mod common;

use std::time::{Duration, Instant};

use common::{Target, pattern};
use kvferry::{Engine, EngineConfig, Error, Op, Opcode, TransportChoice};

/// Registers all of `buf` with `e`, as host memory.
///
/// # Safety
/// `buf` outlives `e`'s use of it.
unsafe fn register_all(e: &Engine, buf: &mut [u8]) {
    // SAFETY: forwarded to the caller.
    unsafe { e.register_memory(buf.as_mut_ptr() as u64, buf.len() as u64, "cpu:0") }.unwrap();
}

/// The op that moves all of `buf` to or from `remote`.
fn whole(buf: &[u8], remote: u64) -> Op {
    Op {
        local: buf.as_ptr() as u64,
        remote,
        len: buf.len() as u64,
    }
}

/// Not a test of its own: the body of every child process.
#[test]
fn child_target() {
    common::child_main();
}

fn engine(transport: TransportChoice, timeout: Duration) -> Engine {
    Engine::new(
        EngineConfig::new()
            .port(0)
            .transport(transport)
            .transfer_timeout(timeout),
    )
    .unwrap()
}

fn read_write_roundtrip(transport: TransportChoice, expect: &str) {
    const LEN: usize = 8 << 20;
    let mut t = Target::spawn("child_target", 0, LEN, 11, &[]);
    let e = engine(transport, Duration::from_secs(20));
    let mut buf = vec![0u8; LEN];
    // SAFETY: `buf` outlives `e` (dropped at the end of this function first).
    unsafe { register_all(&e, &mut buf) };
    assert_eq!(e.transport_to(&t.name).unwrap(), expect);

    // Sync read in 64 KiB blocks, reversed so nothing coalesces.
    let mut ops = common::block_ops(buf.as_ptr() as u64, t.addr, LEN as u64, 64 << 10);
    ops.reverse();
    e.read(&t.name, &ops).unwrap();
    assert!(buf == pattern(11, LEN), "{expect}: data read differs");
    // Still the same path once a batch ran (cma first checks the peer's pid).
    assert_eq!(e.transport_to(&t.name).unwrap(), expect);

    // Async write of a new pattern, with a notification that must arrive
    // only after the data: the child checks its buffer when it sees it.
    buf.copy_from_slice(&pattern(42, LEN));
    let ops = common::block_ops(buf.as_ptr() as u64, t.addr, LEN as u64, 1 << 20);
    let id = e
        .submit_write_with_notify(&t.name, &ops, b"check:42")
        .unwrap();
    e.wait(id, Duration::from_secs(20)).unwrap();
    e.free_batch(id).unwrap();
    assert_eq!(
        t.expect_line("CHECK", Duration::from_secs(10)),
        "CHECK ok",
        "{expect}"
    );

    // Plain notification.
    e.notify(&t.name, b"hello there").unwrap();
    let note = t.expect_line("NOTE", Duration::from_secs(10));
    assert_eq!(note, format!("NOTE {} hello there", e.name()));

    // Out of range for the peer: refused before anything moves.
    let bad = Op {
        local: buf.as_ptr() as u64,
        remote: t.addr + LEN as u64 - 10,
        len: 20,
    };
    let err = e.read(&t.name, &[bad]).unwrap_err();
    assert!(matches!(err, Error::RemoteOutOfRange { .. }), "{err}");
    drop(e);
}

#[test]
fn same_host_peer_uses_cma() {
    read_write_roundtrip(TransportChoice::Auto, "cma");
}

#[test]
fn forced_tcp_between_processes() {
    read_write_roundtrip(TransportChoice::Tcp, "tcp");
}

fn killed_mid_batch(transport: TransportChoice) {
    const LEN: usize = 64 << 20;
    let mut victim = Target::spawn("child_target", 0, LEN, 3, &[]);
    let bystander = Target::spawn("child_target", 0, 1 << 20, 4, &[]);
    let timeout = Duration::from_secs(5);
    let e = engine(transport, timeout);
    let mut buf = vec![0u8; LEN];
    // SAFETY: `buf` outlives `e`.
    unsafe { register_all(&e, &mut buf) };
    let ops = common::block_ops(buf.as_ptr() as u64, victim.addr, LEN as u64, 1 << 20);
    // Keep batches in flight, then kill the peer under them.
    let ids: Vec<_> = (0..6)
        .map(|_| e.submit(&victim.name, Opcode::Read, &ops).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(30));
    let killed_at = Instant::now();
    victim.kill();
    let mut failed = 0;
    for id in ids {
        match e.wait(id, timeout + Duration::from_secs(5)) {
            Ok(()) => {}
            Err(err) => {
                failed += 1;
                assert!(
                    !matches!(
                        err,
                        Error::Timeout { .. }
                            | Error::TransferTimeout { .. }
                            | Error::Internal { .. }
                    ),
                    "unclear error: {err}"
                );
            }
        }
    }
    assert!(failed > 0, "no batch saw the peer die");
    assert!(
        killed_at.elapsed() < timeout + Duration::from_secs(5),
        "failing took {:?}",
        killed_at.elapsed()
    );
    // The engine still serves others.
    let op = Op {
        local: buf.as_ptr() as u64,
        remote: bystander.addr,
        len: 1 << 20,
    };
    e.read(&bystander.name, &[op]).unwrap();
    assert!(buf[..1 << 20] == pattern(4, 1 << 20)[..]);
    // And the dead peer is a clear error, fast.
    let t = Instant::now();
    let err = e.read(&victim.name, &[op]).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert!(
        matches!(
            err,
            Error::PeerUnreachable { .. } | Error::TransferFailed { .. }
        ),
        "{err}"
    );
    drop(e);
}

#[test]
fn peer_killed_mid_batch_tcp() {
    killed_mid_batch(TransportChoice::Tcp);
}

#[test]
fn peer_killed_mid_batch_cma() {
    killed_mid_batch(TransportChoice::Auto);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind(("0.0.0.0", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn restarted(transport: TransportChoice) {
    const LEN: usize = 1 << 20;
    let port = free_port();
    let mut first = Target::spawn("child_target", port, LEN, 1, &[]);
    let e = engine(transport, Duration::from_secs(10));
    let mut buf = vec![0u8; LEN];
    // SAFETY: `buf` outlives `e`.
    unsafe { register_all(&e, &mut buf) };
    let old = whole(&buf, first.addr);
    e.read(&first.name, &[old]).unwrap();
    first.kill();
    let second = Target::spawn("child_target", port, LEN, 5, &[]);
    assert_eq!(second.name, first.name);
    assert_ne!(
        second.addr, first.addr,
        "the test needs different addresses"
    );
    // Old addresses are never used against the new instance.
    buf.fill(0);
    match e.read(&second.name, &[old]) {
        Ok(()) => panic!("a read at the old instance's address succeeded"),
        Err(err) => assert!(
            matches!(
                err,
                Error::RemoteOutOfRange { .. }
                    | Error::RequestRefused { .. }
                    | Error::TransferFailed { .. }
            ),
            "{err}"
        ),
    }
    assert!(
        buf.iter().all(|&b| b == 0),
        "bytes moved from a stale address"
    );
    // The new segment works.
    let new = whole(&buf, second.addr);
    e.read(&second.name, &[new]).unwrap();
    assert!(buf == pattern(5, LEN));
    drop(e);
}

#[test]
fn peer_restarted_on_same_port_tcp() {
    restarted(TransportChoice::Tcp);
}

#[test]
fn peer_restarted_on_same_port_cma() {
    restarted(TransportChoice::Auto);
}

/// Not a test of its own: the body of child initiators.
#[test]
fn child_initiator() {
    common::initiator_main();
}

/// When the kernel refuses cross-memory attach (here: an unprivileged
/// initiator and a target owned by another user), cma falls back to tcp for
/// that peer and the data still arrives.
#[test]
fn cma_refused_by_the_kernel_falls_back_to_tcp() {
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run the initiator as another user");
        return;
    }
    const LEN: usize = 1 << 20;
    let target = Target::spawn("child_target", 0, LEN, 9, &[]);
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_initiator",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            common::INITIATOR,
            format!("{} {} {LEN} 9", target.name, target.addr),
        )
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.find("INITIATOR").map(|i| &l[i..]))
        .unwrap_or_else(|| {
            panic!(
                "no result from the initiator: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert_eq!(line, "INITIATOR ok cma tcp", "{stdout}");
}

/// A process answering on a peer's port (here: a thread of this test) whose
/// segment names another process of this host (the victim, a child engine)
/// and a region in it. That pid holds no end of our connection, so no byte
/// of the victim is read or written: the batch goes to the impostor over
/// tcp, which cannot serve it.
#[test]
fn an_impostor_naming_another_pid_gets_no_cma() {
    use kvferry::wire;
    use std::net::TcpListener;

    const LEN: usize = 64 << 10;
    let victim = Target::spawn("child_target", 0, LEN, 21, &[]);
    let e = engine(TransportChoice::Auto, Duration::from_secs(5));
    let mut buf = vec![0u8; LEN];
    // SAFETY: `buf` outlives `e`.
    unsafe { register_all(&e, &mut buf) };

    // The impostor's segment: this host, the victim's pid and buffer.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let name = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
    let mut seg = e.segment();
    seg.name = name.clone();
    seg.instance_id = 0x1234_5678_9abc_def0;
    seg.pid = victim.child.id();
    seg.regions[0].addr = victim.addr;
    seg.regions[0].len = LEN as u64;
    let seg = wire::encode_segment(&seg);
    std::thread::spawn(move || common::serve_as_impostor(listener, seg));

    let op = whole(&buf, victim.addr);
    assert!(e.read(&name, &[op]).is_err(), "the impostor serves no data");
    assert_eq!(e.transport_to(&name).unwrap(), "tcp");
    assert!(buf.iter().all(|&b| b == 0), "bytes of the victim were read");
    buf.fill(0xEE);
    assert!(e.write(&name, &[op]).is_err());
    // The victim's buffer is as it was, read through the victim itself.
    let mut check = vec![0u8; LEN];
    let honest = engine(TransportChoice::Tcp, Duration::from_secs(5));
    // SAFETY: `check` outlives `honest`.
    unsafe { register_all(&honest, &mut check) };
    let all = whole(&check, victim.addr);
    honest.read(&victim.name, &[all]).unwrap();
    assert!(check == pattern(21, LEN), "the victim's memory was written");
    // The engines go before the buffers they registered (declared after them).
    drop((honest, e));
}

/// Not a test of its own: the body of the impostor child.
#[test]
fn child_impostor() {
    common::impostor_main();
}

/// Another process (the impostor child) answers with the very segment of
/// an engine of this process (the victim): its instance id, pid and
/// region, as anyone who once had a HELLO or a segment from it can replay.
/// The in-process copy is only for a connection this process serves, so
/// the victim's memory is neither read nor written: the batch goes to the
/// impostor over tcp (cma's own pid check fails too), which cannot serve it.
#[test]
fn an_impostor_replaying_a_segment_of_this_process_gets_no_local_copy() {
    const LEN: usize = 64 << 10;
    let mut secret = pattern(31, LEN);
    let mut buf = vec![0u8; LEN];
    let victim = engine(TransportChoice::Auto, Duration::from_secs(5));
    // SAFETY: `secret` outlives `victim`.
    unsafe { register_all(&victim, &mut secret) };
    let seg = common::hex(&kvferry::wire::encode_segment(&victim.segment()));
    // On the victim's own port (at [::1]; the victim listens on IPv4), so
    // that only the proof that this process serves the connection can tell
    // the impostor from the victim.
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback here");
        return;
    }
    let port = victim.rpc_port().to_string();
    let impostor = Target::spawn(
        "child_impostor",
        0,
        0,
        0,
        &[(common::IMPOSTOR, &seg), (common::IMPOSTOR_V6_PORT, &port)],
    );
    assert!(
        impostor.name.ends_with(&format!(":{port}")),
        "{}",
        impostor.name
    );
    let e = engine(TransportChoice::Auto, Duration::from_secs(5));
    // SAFETY: `buf` outlives `e`.
    unsafe { register_all(&e, &mut buf) };

    let op = whole(&buf, secret.as_ptr() as u64);
    assert!(
        e.read(&impostor.name, &[op]).is_err(),
        "the impostor serves no data"
    );
    assert_eq!(e.transport_to(&impostor.name).unwrap(), "tcp");
    assert!(buf.iter().all(|&b| b == 0), "bytes of the victim were read");
    buf.fill(0xEE);
    assert!(e.write(&impostor.name, &[op]).is_err());
    // The honest path to the victim is still the in-process copy.
    assert_eq!(e.transport_to(victim.name()).unwrap(), "local");
    drop((e, victim));
    assert!(
        secret == pattern(31, LEN),
        "the victim's memory was written"
    );
}

/// Not a test of its own: the body of the child that takes registered memory away.
#[test]
fn child_unmapping_target() {
    common::unmapping_child_main();
}

/// A target whose owner took registered memory away (here: mapped it
/// PROT_NONE) without unregistering it: reading that memory fails with the
/// target's own reason (an ERROR frame naming the range), not with a
/// dropped connection ("the peer closed the connection"), and the target,
/// alive, serves the rest.
#[test]
fn reading_memory_the_target_unmapped_fails_with_its_reason() {
    const LEN: usize = 64 << 10;
    let mut t = Target::spawn("child_unmapping_target", 0, LEN, 13, &[]);
    let e = engine(TransportChoice::Tcp, Duration::from_secs(5));
    let mut buf = vec![0u8; LEN];
    // SAFETY: `buf` outlives `e` (dropped first at the end).
    unsafe { register_all(&e, &mut buf) };
    let unmapped = t.addr + LEN as u64;
    let err = e.read(&t.name, &[whole(&buf, unmapped)]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::RequestRefused { .. }), "{msg}");
    for word in [
        format!("[{unmapped:#x}, +{LEN})"),
        format!("{unmapped:#x} lies in the mapping [{unmapped:#x}, "),
        "with permissions ---p".to_string(),
        "without unregistering".to_string(),
    ] {
        assert!(msg.contains(&word), "{word:?} not in {msg:?}");
    }
    assert!(!msg.contains("closed"), "{msg}");
    e.read(&t.name, &[whole(&buf, t.addr)]).unwrap();
    assert!(buf == pattern(13, LEN), "the mapped half reads back");
    assert!(t.child.try_wait().unwrap().is_none(), "the target died");
    drop(e);
}
