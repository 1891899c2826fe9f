//! NPU-registered blocks between two engines in two processes, against the
//! CANN stand-in: same host through IPC keys, "cross host" through tcp with
//! staging on both sides, and batches mixing host and NPU memory.

mod common;

use common::Peer;

const LEN: u64 = 4 << 20;
const Q: u64 = LEN / 4;

/// Not a test of its own: the body of every child process.
#[test]
fn child() {
    common::child_main();
}

fn pair(env: &[(&str, &str)]) -> (Peer, Peer) {
    let target = Peer::spawn("child", 1, LEN as usize, 10, env);
    let initiator = Peer::spawn("child", 0, LEN as usize, 50, env);
    (target, initiator)
}

/// Reads the target's device buffer into ours, then writes a new pattern
/// back (asynchronously), checking every byte on the other side.
fn npu_round_trip(t: &mut Peer, i: &mut Peer, block: u64) {
    i.run(&format!("xfer read {} npu {} {LEN} {block}", t.name, t.npu))
        .unwrap();
    i.check("npu", 10, 0, LEN);
    assert_eq!(i.ask("fill npu 77", "RESULT"), "RESULT ok");
    i.run(&format!(
        "xfer write {} npu {} {LEN} {block} async",
        t.name, t.npu
    ))
    .unwrap();
    t.check("npu", 77, 0, LEN);
}

#[test]
fn same_host_npu_blocks_move_through_ipc_keys() {
    let (mut t, mut i) = pair(&[]);
    assert_eq!(i.transport(&t.name), ("cma".into(), "ascend-ipc".into()));
    npu_round_trip(&mut t, &mut i, 64 << 10);
    let s = i.stats_settled();
    assert_eq!(s["imports"], 1, "the region is imported once: {s:?}");
    assert_eq!(s["imports_made"], 1, "{s:?}");
    assert_eq!(
        s["staging_allocated"], 0,
        "no staging on the IPC path: {s:?}"
    );
    assert_eq!(s["streams_aborted"], 0, "{s:?}");
    let s = t.stats_settled();
    assert_eq!(s["exports"], 1, "{s:?}");
    assert_eq!(s["staging_allocated"], 0, "{s:?}");

    // Out of the peer's range: refused before anything moves.
    let bad = i.run(&format!(
        "xfer read {} npu {} 64 64",
        t.name,
        t.npu + LEN - 32
    ));
    assert!(matches!(bad, Err((-23, _))), "{bad:?}");
    // The target's regions are free again: nothing holds a lease.
    assert_eq!(t.ask("unregister npu", "RESULT"), "RESULT ok");
}

#[test]
fn cross_host_npu_blocks_stage_through_pinned_pools_over_tcp() {
    // KVFERRY_TRANSPORT=tcp: every peer is reached as if on another host.
    // A pool of two 1 MiB buffers makes a 4 MiB batch take several rounds.
    let env = [("KVFERRY_TRANSPORT", "tcp"), ("ASCEND_BUFFER_POOL", "2:1")];
    let (mut t, mut i) = pair(&env);
    assert_eq!(i.transport(&t.name), ("tcp".into(), "tcp".into()));
    npu_round_trip(&mut t, &mut i, 256 << 10);
    for (who, s) in [
        ("initiator", i.stats_settled()),
        ("target", t.stats_settled()),
    ] {
        assert!((1..=2).contains(&s["staging_allocated"]), "{who}: {s:?}");
        assert_eq!(s["staging_in_use"], 0, "{who}: buffers returned: {s:?}");
        assert_eq!(s["imports"], 0, "{who}: {s:?}");
    }
    // Blocks larger than a staging buffer are cut to fit.
    i.run(&format!("xfer read {} npu {} {LEN} {LEN}", t.name, t.npu))
        .unwrap();
    i.check("npu", 77, 0, LEN);
}

#[test]
fn same_host_without_ipc_stages_over_tcp() {
    let env = [("KVFERRY_ASCEND_IPC", "0")];
    let (mut t, mut i) = pair(&env);
    assert_eq!(i.transport(&t.name), ("cma".into(), "tcp".into()));
    npu_round_trip(&mut t, &mut i, 1 << 20);
    assert_eq!(t.stats_settled()["exports"], 0);
}

fn mixed(env: &[(&str, &str)], expect: (&str, &str)) {
    let (mut t, mut i) = pair(env);
    let (h, d) = i.transport(&t.name);
    assert_eq!((h.as_str(), d.as_str()), expect);
    // Target: npu = pattern 10, host = pattern 11.
    i.run(&format!(
        "mixed read {} {} {} {LEN} {}",
        t.name,
        t.npu,
        t.host,
        32 << 10
    ))
    .unwrap();
    i.check("npu", 10, 0, Q); // npu <- npu
    i.check("host", 11, Q, Q); // host <- host
    i.check("npu", 11, 2 * Q, Q); // npu <- host
    i.check("host", 10, 3 * Q, Q); // host <- npu

    assert_eq!(i.ask("fill npu 60", "RESULT"), "RESULT ok");
    assert_eq!(i.ask("fill host 61", "RESULT"), "RESULT ok");
    i.run(&format!(
        "mixed write {} {} {} {LEN} {}",
        t.name,
        t.npu,
        t.host,
        32 << 10
    ))
    .unwrap();
    t.check("npu", 60, 0, Q);
    t.check("host", 61, Q, Q);
    t.check("host", 60, 2 * Q, Q);
    t.check("npu", 61, 3 * Q, Q);
    for s in [i.stats_settled(), t.stats_settled()] {
        assert_eq!(s["staging_in_use"], 0, "{s:?}");
    }
}

#[test]
fn mixed_host_and_npu_batches_same_host() {
    mixed(&[], ("cma", "ascend-ipc"));
}

#[test]
fn mixed_host_and_npu_batches_over_tcp() {
    mixed(&[("KVFERRY_TRANSPORT", "tcp")], ("tcp", "tcp"));
}

#[test]
fn a_host_only_engine_reads_and_writes_a_peers_npu_memory_over_tcp() {
    // No device runtime here: the peer's NPU regions must still never reach
    // cma (its addresses are not host memory); tcp carries them and the
    // peer stages.
    let mut t = Peer::spawn("child", 1, LEN as usize, 10, &[]);
    let mut h = Peer::spawn(
        "child",
        0,
        LEN as usize,
        50,
        &[("KVFERRY_TEST_HOST_ONLY", "1")],
    );
    assert_eq!(h.transport(&t.name), ("cma".into(), "tcp".into()));
    h.run(&format!(
        "xfer read {} host {} {LEN} {}",
        t.name,
        t.npu,
        128 << 10
    ))
    .unwrap();
    h.check("host", 10, 0, LEN);
    // The peer's host memory still goes over cma.
    h.run(&format!(
        "xfer read {} host {} {LEN} {}",
        t.name,
        t.host,
        1 << 20
    ))
    .unwrap();
    h.check("host", 11, 0, LEN);
    assert_eq!(h.ask("fill host 33", "RESULT"), "RESULT ok");
    h.run(&format!(
        "xfer write {} host {} {LEN} {}",
        t.name,
        t.npu,
        1 << 20
    ))
    .unwrap();
    t.check("npu", 33, 0, LEN);
    assert_eq!(t.stats_settled()["staging_in_use"], 0);
}
