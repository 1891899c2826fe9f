//! Each failure the CANN stand-in can inject, on either side of a transfer,
//! surfaces as its documented kvferry error, and leaves nothing half-done:
//! the stream aborted (and reusable), pool buffers returned, the peer's
//! lease released (its region unregisters at once), and the next batch
//! works.

mod common;

use common::Peer;

/// Failure injection exists only in the stand-in: against real ACL
/// (`KVFERRY_TEST_ACL_LIBRARY`) these tests say so and pass.
macro_rules! standin_only {
    () => {
        if !common::on_standin() {
            eprintln!("skipped: failure injection needs the CANN stand-in");
            return;
        }
    };
}

const LEN: u64 = 1 << 20;
const BLOCK: u64 = 64 << 10;
const DEVICE: i32 = -50;
/// A batch that a timeout ended (not -33, TIMEOUT: that is a wait running
/// out while the batch goes on).
const TRANSFER_TIMEOUT: i32 = -47;
const TRANSFER_FAILED: i32 = -42;

/// Not a test of its own: the body of every child process.
#[test]
fn child() {
    common::child_main();
}

fn read(i: &mut Peer, t: &Peer) -> Result<(), (i32, String)> {
    i.run(&format!("xfer read {} npu {} {LEN} {BLOCK}", t.name, t.npu))
}

fn write(i: &mut Peer, t: &Peer) -> Result<(), (i32, String)> {
    i.run(&format!(
        "xfer write {} npu {} {LEN} {BLOCK}",
        t.name, t.npu
    ))
}

fn expect_err(r: Result<(), (i32, String)>, code: i32, needles: &[&str]) -> String {
    let (got, msg) = r.expect_err("the injected failure must fail the batch");
    assert_eq!(got, code, "{msg}");
    for n in needles {
        assert!(msg.contains(n), "{n:?} not in: {msg}");
    }
    msg
}

/// After a failure: the next batch works and moves the right bytes, and the
/// target's region is not held by a forgotten lease.
fn recovers(i: &mut Peer, t: &mut Peer) {
    read(i, t).expect("the batch after the failure");
    i.check("npu", 10, 0, LEN);
    for (who, s) in [
        ("initiator", i.stats_settled()),
        ("target", t.stats_settled()),
    ] {
        assert_eq!(
            s["staging_in_use"], 0,
            "{who}: pool buffers returned: {s:?}"
        );
    }
    assert_eq!(t.ask("unregister npu", "RESULT"), "RESULT ok");
}

#[test]
fn a_failed_ipc_copy_is_a_device_error_and_aborts_the_stream() {
    standin_only!();
    let mut t = Peer::spawn("child", 1, LEN as usize, 10, &[]);
    let mut i = Peer::spawn(
        "child",
        0,
        LEN as usize,
        50,
        &[("KVF_STANDIN_FAIL", "memcpy_batch_async:1")],
    );
    let msg = expect_err(
        read(&mut i, &t),
        DEVICE,
        &[
            "ascend-ipc read",
            "aclrtSynchronizeStreamWithTimeout failed",
            "ACL error 507013",
            "injected",
        ],
    );
    eprintln!("documented error: {msg}");
    let s = i.stats_settled();
    assert_eq!(s["streams_aborted"], 1, "{s:?}");
    assert_eq!(
        s["pooled_streams"], 1,
        "the aborted stream is reused: {s:?}"
    );
    recovers(&mut i, &mut t);
}

#[test]
fn an_ipc_timeout_is_a_timeout_and_aborts_the_stream() {
    standin_only!();
    // The stand-in fails the first synchronize with ACL's timeout code and
    // leaves the copies queued, as a hung device would.
    let mut t = Peer::spawn("child", 1, LEN as usize, 10, &[]);
    let mut i = Peer::spawn(
        "child",
        0,
        LEN as usize,
        50,
        &[("KVF_STANDIN_FAIL", "sync:1=507046")],
    );
    expect_err(
        read(&mut i, &t),
        TRANSFER_TIMEOUT,
        &["ACL_ERROR_RT_STREAM_SYNC_TIMEOUT", "the stream was aborted"],
    );
    assert_eq!(i.stats_settled()["streams_aborted"], 1);
    recovers(&mut i, &mut t);
}

#[test]
fn a_device_that_never_finishes_times_out_within_the_transfer_deadline() {
    standin_only!();
    let mut t = Peer::spawn("child", 1, LEN as usize, 10, &[]);
    let mut i = Peer::spawn(
        "child",
        0,
        LEN as usize,
        50,
        &[
            ("KVF_STANDIN_TIMEOUT", "1"),
            ("KVFERRY_TRANSFER_TIMEOUT_MS", "400"),
        ],
    );
    let start = std::time::Instant::now();
    expect_err(
        read(&mut i, &t),
        TRANSFER_TIMEOUT,
        &["did not finish", "aborted"],
    );
    assert!(
        start.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    let s = i.stats_settled();
    assert_eq!(s["streams_aborted"], 1, "{s:?}");
    // The lease was released: the target's region unregisters at once.
    assert_eq!(t.ask("unregister npu", "RESULT"), "RESULT ok");
}

#[test]
fn an_unknown_ipc_key_is_a_device_error_naming_the_import() {
    standin_only!();
    let mut t = Peer::spawn("child", 1, LEN as usize, 10, &[]);
    let mut i = Peer::spawn(
        "child",
        0,
        LEN as usize,
        50,
        &[("KVF_STANDIN_FAIL", "import:1")],
    );
    expect_err(
        read(&mut i, &t),
        DEVICE,
        &[
            "mapping",
            "aclrtIpcMemImportByKey failed",
            "ACL_ERROR_RT_IPC_ERROR",
        ],
    );
    let s = i.stats_settled();
    assert_eq!(
        (s["imports"], s["streams_aborted"]),
        (0, 0),
        "nothing queued: {s:?}"
    );
    recovers(&mut i, &mut t);
    assert_eq!(i.stats_settled()["imports_made"], 1);
}

#[test]
fn a_peer_that_cannot_allow_our_process_refuses_clearly() {
    standin_only!();
    let mut t = Peer::spawn(
        "child",
        1,
        LEN as usize,
        10,
        &[("KVF_STANDIN_FAIL", "set_import_pid:1")],
    );
    let mut i = Peer::spawn("child", 0, LEN as usize, 50, &[]);
    expect_err(
        read(&mut i, &t),
        TRANSFER_FAILED,
        &[
            "(-50)",
            "allowing process",
            "aclrtIpcMemSetImportPid failed",
        ],
    );
    recovers(&mut i, &mut t);
}

fn over_tcp(target_env: &[(&str, &str)], initiator_env: &[(&str, &str)]) -> (Peer, Peer) {
    let tcp = ("KVFERRY_TRANSPORT", "tcp");
    let t: Vec<_> = target_env.iter().copied().chain([tcp]).collect();
    let i: Vec<_> = initiator_env.iter().copied().chain([tcp]).collect();
    (
        Peer::spawn("child", 1, LEN as usize, 10, &t),
        Peer::spawn("child", 0, LEN as usize, 50, &i),
    )
}

#[test]
fn a_failed_staging_copy_at_the_target_is_refused_with_its_device_error() {
    standin_only!();
    // The target's first staging copy (D2H for the READ) fails.
    let (mut t, mut i) = over_tcp(&[("KVF_STANDIN_FAIL", "memcpy_async:1")], &[]);
    expect_err(
        read(&mut i, &t),
        TRANSFER_FAILED,
        &["(-50)", "staging", "from npu:1", "ACL error 507013"],
    );
    let s = t.stats_settled();
    assert_eq!((s["staging_in_use"], s["streams_aborted"]), (0, 1), "{s:?}");
    recovers(&mut i, &mut t);
}

#[test]
fn a_failed_staging_copy_at_the_target_of_a_write_keeps_the_connection() {
    standin_only!();
    let (mut t, mut i) = over_tcp(&[("KVF_STANDIN_FAIL", "memcpy_async:1")], &[]);
    expect_err(write(&mut i, &t), TRANSFER_FAILED, &["(-50)", "to npu:1"]);
    assert_eq!(t.stats_settled()["staging_in_use"], 0);
    // The rest of the WRITE was drained: the next one works.
    assert_eq!(i.ask("fill npu 88", "RESULT"), "RESULT ok");
    write(&mut i, &t).expect("the write after the failure");
    t.check("npu", 88, 0, LEN);
}

#[test]
fn a_failed_staging_copy_at_the_initiator_is_a_device_error() {
    standin_only!();
    let (mut t, mut i) = over_tcp(&[], &[("KVF_STANDIN_FAIL", "memcpy_async:1")]);
    expect_err(
        write(&mut i, &t),
        DEVICE,
        &["staging", "from npu:0", "ACL error 507013"],
    );
    let s = i.stats_settled();
    assert_eq!((s["staging_in_use"], s["streams_aborted"]), (0, 1), "{s:?}");
    recovers(&mut i, &mut t);
}

#[test]
fn a_pinned_buffer_that_cannot_be_allocated_is_a_device_error() {
    standin_only!();
    let (mut t, mut i) = over_tcp(&[], &[("KVF_STANDIN_FAIL", "malloc_host:1")]);
    expect_err(
        read(&mut i, &t),
        DEVICE,
        &["aclrtMallocHost failed", "ASCEND_BUFFER_POOL"],
    );
    let s = i.stats_settled();
    assert_eq!(
        (s["staging_allocated"], s["staging_in_use"]),
        (0, 0),
        "{s:?}"
    );
    recovers(&mut i, &mut t);
}

#[test]
fn an_export_that_fails_leaves_nothing_registered_and_names_the_alignment() {
    standin_only!();
    // The child's own NPU region is export #1; the spare buffer's is #2.
    let mut c = Peer::spawn(
        "child",
        0,
        LEN as usize,
        10,
        &[("KVF_STANDIN_FAIL", "export:2")],
    );
    let r = c.ask("register 4096 65536", "RESULT");
    assert!(
        r.starts_with(&format!("RESULT err {DEVICE} "))
            && r.contains("aclrtIpcMemGetExportKey failed"),
        "{r}"
    );
    assert!(
        r.contains("2 MiB alignment") && r.contains("KVFERRY_ASCEND_IPC=0"),
        "{r}"
    );
    assert_eq!(c.stats()["exports"], 1);
    // Nothing of it was registered: the same range registers now.
    assert_eq!(c.ask("register 4096 65536", "RESULT"), "RESULT ok");
    assert_eq!(c.stats()["exports"], 2);
}
