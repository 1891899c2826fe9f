//! What arrives on an engine's port from a client that does not play by
//! the rules: garbage, truncated, oversized and wrong-version frames, reads
//! outside registered memory, a wrong shared secret, frames trickled a byte
//! at a time, a reply nobody reads, connections that never greet or come
//! in floods, a flood of notifications. Each gets an ERROR frame, a clean
//! refusal or a closed connection within its deadline, and the engine keeps
//! serving everyone else. A target that trickles its replies fails the
//! initiator's batch at its deadline.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{Mapping, PAGE, send_frame};
use kvferry::board::{MAX_SLOTS_PER_CONN, SLOT_COUNT};
use kvferry::wire::{self, FrameHeader, Kind};
use kvferry::{Engine, EngineConfig, Error, Op, Status, TransportChoice};

/// The transfer timeout of the engines made by `engine`.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(2);

fn engine(cfg: EngineConfig) -> Engine {
    Engine::new(cfg.port(0).transfer_timeout(TRANSFER_TIMEOUT)).unwrap()
}

fn connect(e: &Engine) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", e.rpc_port())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Reads one frame; `None` when the connection is closed.
fn read_frame(s: &mut TcpStream) -> Option<(FrameHeader, Vec<u8>)> {
    let h = wire::read_header(s).ok()??;
    let mut p = vec![0u8; h.payload_len.min(1 << 20) as usize];
    s.read_exact(&mut p).ok()?;
    Some((h, p))
}

/// Sends a frame (`send_frame`, which must succeed) and reads the next one,
/// its answer; `None` when the connection closes first.
fn round_trip(
    s: &mut TcpStream,
    kind: Kind,
    rid: u64,
    parts: &[&[u8]],
) -> Option<(FrameHeader, Vec<u8>)> {
    send_frame(s, kind, rid, parts).expect("send a frame");
    read_frame(s)
}

/// Sends a PING of `rid` and asserts the PONG that echoes its id and
/// `payload`: the connection is in step.
fn assert_pong(s: &mut TcpStream, rid: u64, payload: &[u8]) {
    let (h, p) = round_trip(s, Kind::Ping, rid, &[payload]).expect("a PONG");
    assert_eq!(
        (h.kind, h.request_id, p.as_slice()),
        (Kind::Pong as u16, rid, payload)
    );
}

/// Whether a read with a read timeout failed only because nothing came in
/// time.
fn nothing_came(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

fn hello(s: &mut TcpStream) -> wire::HelloReply {
    try_hello(s).expect("hello reply")
}

/// Says HELLO; `None` when something else than a HELLO_REPLY comes back.
fn try_hello(s: &mut TcpStream) -> Option<wire::HelloReply> {
    let hello = wire::Hello {
        min_version: 1,
        max_version: 1,
        reserved: 0,
        nonce: [7; 16],
        instance_id: 0,
    };
    send_frame(s, Kind::Hello, 1, &[bytemuck::bytes_of(&hello)]).ok()?;
    let (h, p) = read_frame(s)?;
    (h.kind == Kind::HelloReply as u16).then(|| wire::pod_from(&p).unwrap())
}

/// Sends `bytes`, expects an ERROR frame with `status`, then a closed connection.
fn expect_error_then_close(e: &Engine, greet: bool, bytes: &[u8], status: Status) {
    let mut s = connect(e);
    if greet {
        hello(&mut s);
    }
    s.write_all(bytes).unwrap();
    let (h, msg) = read_frame(&mut s).expect("an ERROR frame");
    assert_eq!(
        h.kind,
        Kind::ErrorReply as u16,
        "{}",
        String::from_utf8_lossy(&msg)
    );
    assert_eq!(h.status, status as i32, "{}", String::from_utf8_lossy(&msg));
    assert!(!msg.is_empty());
    assert!(
        read_frame(&mut s).is_none(),
        "connection still open after a protocol error"
    );
}

fn still_serves(e: &Engine) {
    let peer = engine(EngineConfig::new().transport(TransportChoice::Tcp));
    let mut src = vec![9u8; 4096];
    let mut dst = vec![0u8; 4096];
    // SAFETY: both buffers outlive the engines (dropped at the end).
    unsafe {
        e.register_memory(src.as_mut_ptr() as u64, 4096, "cpu:0")
            .unwrap();
        peer.register_memory(dst.as_mut_ptr() as u64, 4096, "cpu:0")
            .unwrap();
    }
    peer.read(
        e.name(),
        &[Op {
            local: dst.as_ptr() as u64,
            remote: src.as_ptr() as u64,
            len: 4096,
        }],
    )
    .unwrap();
    assert_eq!(dst, src);
    e.unregister_memory(src.as_ptr() as u64).unwrap();
    drop(peer);
}

#[test]
fn bad_frames_close_only_their_connection() {
    let e = engine(EngineConfig::new());
    // An idle, well-behaved connection stays open throughout.
    let mut bystander = connect(&e);
    hello(&mut bystander);

    let garbage: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(77)).collect();
    expect_error_then_close(&e, false, &garbage, Status::Protocol);
    expect_error_then_close(&e, true, &garbage, Status::Protocol);

    let mut wrong_version = FrameHeader::new(Kind::Ping, 5, 0);
    wrong_version.version = 9;
    expect_error_then_close(
        &e,
        true,
        bytemuck::bytes_of(&wrong_version),
        Status::Protocol,
    );

    let oversized = FrameHeader::new(Kind::Notify, 5, wire::MAX_CONTROL + 1);
    expect_error_then_close(&e, true, bytemuck::bytes_of(&oversized), Status::Protocol);

    let unknown_kind = FrameHeader {
        kind: 999,
        ..FrameHeader::new(Kind::Ping, 5, 0)
    };
    expect_error_then_close(
        &e,
        true,
        bytemuck::bytes_of(&unknown_kind),
        Status::Protocol,
    );

    // Anything but HELLO first.
    expect_error_then_close(
        &e,
        false,
        bytemuck::bytes_of(&FrameHeader::new(Kind::GetSegment, 1, 0)),
        Status::Protocol,
    );

    // A reply kind sent to a server.
    expect_error_then_close(
        &e,
        true,
        bytemuck::bytes_of(&FrameHeader::new(Kind::WriteAck, 1, 0)),
        Status::Protocol,
    );

    // A WRITE whose data does not match its table.
    let table = wire::encode_table(
        0,
        &[wire::Range {
            addr: 0x1000,
            len: 100,
        }],
    );
    let h = FrameHeader::new(Kind::Write, 2, table.len() as u64 + 10);
    let mut bytes = bytemuck::bytes_of(&h).to_vec();
    bytes.extend_from_slice(&table);
    expect_error_then_close(&e, true, &bytes, Status::Protocol);

    // A truncated header, then the client goes away: the server just closes.
    {
        let mut s = connect(&e);
        s.write_all(&bytemuck::bytes_of(&FrameHeader::new(Kind::Hello, 1, 32))[..10])
            .unwrap();
    }

    // The bystander's connection still works.
    assert_pong(&mut bystander, 77, b"abcd");

    still_serves(&e);
}

#[test]
fn target_refuses_ranges_outside_its_registry() {
    let e = engine(EngineConfig::new());
    let mut mem = vec![3u8; 8192];
    // SAFETY: `mem` outlives `e`.
    unsafe { e.register_memory(mem.as_mut_ptr() as u64, 8192, "cpu:0") }.unwrap();
    let base = mem.as_ptr() as u64;
    let mut s = connect(&e);
    let reply = hello(&mut s);
    let inst = reply.instance_id;

    let read = |s: &mut TcpStream, inst: u64, addr: u64, len: u64| {
        let t = wire::encode_table(inst, &[wire::Range { addr, len }]);
        round_trip(s, Kind::Read, 3, &[&t]).unwrap()
    };
    // Past the end, before the start, and a wild address: ERROR, connection kept.
    for (addr, len) in [(base + 8000, 200), (base - 1, 2), (0x10, 16)] {
        let (h, msg) = read(&mut s, inst, addr, len);
        assert_eq!(h.kind, Kind::ErrorReply as u16);
        assert_eq!(
            h.status,
            Status::RemoteOutOfRange as i32,
            "{}",
            String::from_utf8_lossy(&msg)
        );
    }
    // A stale instance id: refused as a restart.
    let (h, _) = read(&mut s, inst ^ 1, base, 16);
    assert_eq!(h.status, Status::PeerRestarted as i32);

    // A WRITE outside: refused, its data drained, memory untouched, stream in step.
    let t = wire::encode_table(
        inst,
        &[wire::Range {
            addr: base + 8190,
            len: 4,
        }],
    );
    let (h, _) = round_trip(&mut s, Kind::Write, 4, &[&t, b"XXXX"]).unwrap();
    assert_eq!(h.status, Status::RemoteOutOfRange as i32);
    assert!(mem.iter().all(|&b| b == 3));

    // A good read on the same connection still works.
    let (h, p) = read(&mut s, inst, base + 100, 16);
    assert_eq!(h.kind, Kind::ReadData as u16);
    assert_eq!(p, vec![3u8; 16]);
    drop(e);
}

/// Registered memory whose owner took it away without unregistering it
/// (made inaccessible here, PROT_NONE: an unmapped range faults the same
/// way, but could be handed to other threads of this test process while
/// the engine writes into it). A WRITE into it, or a READ that faults
/// before any of its reply went out, gets an ERROR frame naming the range
/// (a WRITE's remaining data is read and dropped) and the connection stays
/// in step; a READ that faults after part of its READ_DATA went out closes
/// its connection. The engine serves on either way.
#[test]
fn memory_taken_away_after_registration_fails_the_request_not_the_engine() {
    const GOOD: usize = 1 << 20;
    let e = engine(EngineConfig::new());
    let mut mem = Mapping::new(GOOD + PAGE, libc::PROT_READ | libc::PROT_WRITE);
    let base = mem.addr();
    let gone = base + GOOD as u64;
    // SAFETY: the mapping outlives the registration (unregistered below).
    unsafe { e.register_memory(base, (GOOD + PAGE) as u64, "cpu:0") }.unwrap();
    // The last page made inaccessible, still registered.
    mem.protect(GOOD, PAGE, libc::PROT_NONE);
    let mut s = connect(&e);
    let inst = hello(&mut s).instance_id;
    let range = |addr: u64, len: usize| wire::Range {
        addr,
        len: len as u64,
    };
    let expect_fault = |s: &mut TcpStream, rid: u64, index: usize, r: wire::Range| {
        let (h, msg) = read_frame(s).expect("an ERROR frame");
        let msg = String::from_utf8_lossy(&msg);
        assert_eq!(h.kind, Kind::ErrorReply as u16, "{msg}");
        assert_eq!(h.request_id, rid);
        assert_eq!(h.status, Status::RegionNotMapped as i32, "{msg}");
        for word in [
            format!("range {index} [{:#x}, +{})", r.addr, r.len),
            format!("region [{base:#x}, +{})", GOOD + PAGE),
            "---p".to_string(),
            "without unregistering".to_string(),
        ] {
            assert!(msg.contains(&word), "{word:?} not in {msg:?}");
        }
        // Still in step: the next frame on this connection is served.
        assert_pong(s, rid + 100, b"abcd");
    };

    // A WRITE of a good range then one in the page taken away: the first
    // lands, the second faults.
    let bad = range(gone + 16, 100);
    let t = wire::encode_table(inst, &[range(base, PAGE), bad]);
    let data = vec![0x5au8; PAGE + 100];
    send_frame(&mut s, Kind::Write, 4, &[&t, &data]).unwrap();
    expect_fault(&mut s, 4, 1, bad);

    // A READ of it: nothing of the reply goes out; an ERROR instead.
    let bad = range(gone, 64);
    let t = wire::encode_table(inst, &[bad]);
    send_frame(&mut s, Kind::Read, 6, &[&t]).unwrap();
    expect_fault(&mut s, 6, 0, bad);

    // A READ that faults after a megabyte went out: the READ_DATA header
    // and part of its data, then the connection closes (an end of stream,
    // not the read timeout of a connection kept open), with nothing after
    // the data: an ERROR frame there would be read as the rest of the data.
    let t = wire::encode_table(inst, &[range(base, GOOD), range(gone, 64)]);
    send_frame(&mut s, Kind::Read, 7, &[&t]).unwrap();
    let h = wire::read_header(&mut s).unwrap().expect("READ_DATA");
    assert_eq!((h.kind, h.request_id), (Kind::ReadData as u16, 7));
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .expect("the target closes the connection");
    assert!(
        rest.len() <= GOOD,
        "{} bytes of a READ that faulted after {GOOD}",
        rest.len()
    );
    // SAFETY: the first `rest.len()` <= GOOD bytes of our mapping, still
    // readable; the engine only reads them too.
    let sent = unsafe { mem.bytes(0, rest.len()) };
    assert!(rest == sent, "bytes other than the range's data followed");

    // Access back before the engine lets go of it.
    mem.protect(GOOD, PAGE, libc::PROT_READ | libc::PROT_WRITE);
    e.unregister_memory(base).unwrap();
    // SAFETY: unregistered: nothing else uses the mapping any more.
    let first = unsafe { mem.bytes(0, PAGE) };
    assert!(first.iter().all(|&b| b == 0x5a), "the good range landed");
    drop(mem);
    still_serves(&e);
}

#[test]
fn shared_secret_is_required_and_checked() {
    let secured = engine(EngineConfig::new().secret("s3cret"));
    let mut mem = vec![1u8; 4096];
    // SAFETY: `mem` outlives the engines.
    unsafe { secured.register_memory(mem.as_mut_ptr() as u64, 4096, "cpu:0") }.unwrap();
    let op = |dst: &mut Vec<u8>| Op {
        local: dst.as_ptr() as u64,
        remote: mem.as_ptr() as u64,
        len: 4096,
    };

    for (client_cfg, ok) in [
        (EngineConfig::new(), false),
        (EngineConfig::new().secret("wrong"), false),
        (EngineConfig::new().secret("s3cret"), true),
    ] {
        let c = engine(client_cfg.transport(TransportChoice::Tcp));
        let mut dst = vec![0u8; 4096];
        // SAFETY: `dst` outlives `c`.
        unsafe { c.register_memory(dst.as_mut_ptr() as u64, 4096, "cpu:0") }.unwrap();
        let r = c.read(secured.name(), &[op(&mut dst)]);
        if ok {
            r.unwrap();
            assert_eq!(dst, mem);
        } else {
            let err = r.unwrap_err();
            assert!(matches!(err, Error::AuthFailed { .. }), "{err}");
            assert!(dst.iter().all(|&b| b == 0));
        }
        drop(c);
    }
    // A client with a secret refuses a server without one.
    let open = engine(EngineConfig::new());
    let c = engine(EngineConfig::new().secret("s3cret"));
    let err = c.notify(open.name(), b"x").unwrap_err();
    assert!(matches!(err, Error::AuthFailed { .. }), "{err}");
    drop((c, open, secured));
}

#[test]
fn ipv6_and_host_name_sessions() {
    let e = engine(EngineConfig::new());
    let c = engine(EngineConfig::new().transport(TransportChoice::Tcp));
    c.notify(&format!("localhost:{}", e.rpc_port()), b"by name")
        .unwrap();
    if TcpStream::connect(("::1", e.rpc_port())).is_ok() {
        let v6 = engine(EngineConfig::new().hostname("::1"));
        assert!(v6.name().starts_with("[::1]:"), "{}", v6.name());
        c.notify(v6.name(), b"over v6").unwrap();
        assert_eq!(v6.drain_notifications()[0].message, b"over v6");
    }
    let got = e.drain_notifications();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].from, c.name());
}

#[test]
fn nobody_listening_is_a_fast_clear_error() {
    let c = engine(EngineConfig::new().connect_timeout(Duration::from_millis(500)));
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let t = std::time::Instant::now();
    let err = c.notify(&format!("127.0.0.1:{port}"), b"x").unwrap_err();
    assert!(matches!(err, Error::PeerUnreachable { .. }), "{err}");
    assert!(t.elapsed() < Duration::from_secs(2));
}

/// The bytes of a frame of `kind` for request 9 (any id will do).
fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    send_frame(&mut out, kind, 9, &[payload]).unwrap();
    out
}

/// LEASE_BOARD and LEASE_REGIONS: malformed payloads close the connection
/// with an ERROR; a wrong instance is refused; a good request gets slots
/// (freed again when its connection closes) and the region list.
#[test]
fn lease_board_requests_are_checked() {
    let e = engine(EngineConfig::new());
    for bad in [
        frame(Kind::LeaseBoard, &[1, 2, 3]),
        frame(Kind::LeaseRegions, &[0; 7]),
        frame(Kind::LeaseBoardGrant, &[]),
        frame(Kind::LeaseRegionsReply, &[0; 16]),
    ] {
        expect_error_then_close(&e, true, &bad, Status::Protocol);
    }
    // Over the bound: refused from the header alone.
    let mut h = FrameHeader::new(Kind::LeaseBoard, 1, 17);
    expect_error_then_close(&e, true, bytemuck::bytes_of(&h), Status::Protocol);
    h = FrameHeader::new(Kind::LeaseRegions, 1, 1 << 20);
    expect_error_then_close(&e, true, bytemuck::bytes_of(&h), Status::Protocol);

    let mut s = connect(&e);
    let instance = hello(&mut s).instance_id;
    let ask = |s: &mut TcpStream, target_instance: u64, slots: u32| {
        ask_slots(s, target_instance, slots, 0)
    };
    let (h, _) = ask(&mut s, instance ^ 1, 4);
    assert_eq!(
        (h.kind, h.status),
        (Kind::ErrorReply as u16, Status::PeerRestarted as i32)
    );
    let (h, p) = ask(&mut s, instance, 1000);
    assert_eq!(h.kind, Kind::LeaseBoardGrant as u16);
    let (g, slots) = wire::decode_grant(&p).unwrap();
    assert_eq!(g.pid, std::process::id());
    assert_eq!(slots.len(), MAX_SLOTS_PER_CONN as usize);
    // The per-connection cap holds across requests.
    let (_, p) = ask(&mut s, instance, 1);
    assert!(wire::decode_grant(&p).unwrap().1.is_empty());

    let mut buf = vec![0u8; 8192];
    // SAFETY: `buf` outlives the engine.
    unsafe { e.register_memory(buf.as_mut_ptr() as u64, 8192, "cpu:0") }.unwrap();
    let (h, p) =
        round_trip(&mut s, Kind::LeaseRegions, 9, &[&instance.to_le_bytes()]).expect("regions");
    assert_eq!(h.kind, Kind::LeaseRegionsReply as u16);
    let (_, regions) = wire::decode_lease_regions(&p).unwrap();
    assert_eq!(
        regions,
        vec![wire::Range {
            addr: buf.as_ptr() as u64,
            len: 8192
        }]
    );
    let stale = (instance ^ 1).to_le_bytes();
    let (h, _) = round_trip(&mut s, Kind::LeaseRegions, 9, &[&stale]).expect("refusal");
    assert_eq!(h.status, Status::PeerRestarted as i32);
    drop(s);
    // The closed connection's slots are free again: new connections get
    // all slots of the board, and then one more gets none.
    let held = fill_board(&e, instance);
    let mut s = connect(&e);
    hello(&mut s);
    assert!(
        wire::decode_grant(&ask(&mut s, instance, 1).1)
            .unwrap()
            .1
            .is_empty()
    );
    drop(held);
    e.unregister_memory(buf.as_ptr() as u64).unwrap();
    still_serves(&e);
}

/// Asks for `slots` lease board slots for the connection, naming `pid`.
fn ask_slots(
    s: &mut TcpStream,
    target_instance: u64,
    slots: u32,
    pid: u32,
) -> (FrameHeader, Vec<u8>) {
    let req = wire::BoardRequest {
        target_instance,
        slots,
        pid,
    };
    round_trip(s, Kind::LeaseBoard, 9, &[bytemuck::bytes_of(&req)]).expect("a reply")
}

/// Takes every slot of `e`'s lease board on new connections (slots of
/// connections that just closed are freed when their handler ends: retried
/// for a while); returns the connections, which hold them.
fn fill_board(e: &Engine, instance: u64) -> Vec<TcpStream> {
    let mut held = Vec::new();
    let mut granted = 0;
    for _ in 0..400 {
        let mut s = connect(e);
        hello(&mut s);
        let (_, p) = ask_slots(&mut s, instance, SLOT_COUNT, 0);
        granted += wire::decode_grant(&p).unwrap().1.len();
        held.push(s);
        if granted == SLOT_COUNT as usize {
            return held;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("{granted} slots of {SLOT_COUNT} could be granted");
}

/// A LEASE_BOARD that names a process which is no initiator of this engine
/// (pid 1, the target itself) and asks for a billion slots gets what
/// initiators ask for, and when the target drops the connection (a bad
/// frame) those slots are freed at once, not kept until that process exits.
#[test]
fn a_dropped_connection_naming_no_initiator_keeps_no_slots() {
    let e = engine(EngineConfig::new());
    let mut instance = 0;
    for pid in [1, std::process::id()] {
        let mut s = connect(&e);
        instance = hello(&mut s).instance_id;
        let (h, p) = ask_slots(&mut s, instance, 1_000_000_000, pid);
        assert_eq!(h.kind, Kind::LeaseBoardGrant as u16);
        let granted = wire::decode_grant(&p).unwrap().1.len();
        assert_eq!(granted, MAX_SLOTS_PER_CONN as usize, "pid {pid}");
        s.write_all(&[0xee; 32]).unwrap();
        let (h, _) = read_frame(&mut s).expect("an ERROR frame");
        assert_eq!(h.kind, Kind::ErrorReply as u16);
        assert!(read_frame(&mut s).is_none(), "still open");
    }
    // Every slot of the board can be granted again.
    drop(fill_board(&e, instance));
    still_serves(&e);
}

/// Sends `bytes` one every `every` until the peer closes the connection (or
/// `give_up` passes: `None`); returns how long after the first byte it
/// closed. Anything the peer sends meanwhile is skipped.
fn trickle(
    s: &mut TcpStream,
    bytes: &[u8],
    every: Duration,
    give_up: Duration,
) -> Option<Duration> {
    s.set_read_timeout(Some(every)).unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 256];
    for b in bytes {
        if start.elapsed() > give_up {
            return None;
        }
        if s.write_all(&[*b]).is_err() {
            return Some(start.elapsed());
        }
        let next = Instant::now() + every;
        while Instant::now() < next {
            match s.read(&mut buf) {
                Ok(0) => return Some(start.elapsed()),
                Ok(_) => {}
                Err(e) if nothing_came(&e) => {}
                Err(_) => return Some(start.elapsed()),
            }
        }
    }
    None
}

/// A byte every 1.5 s: each read of the target (transfer timeout 2 s)
/// would see one in time, but the frame is not complete in time.
const TRICKLE: Duration = Duration::from_millis(1500);

/// The target closed the connection `TRANSFER_TIMEOUT` after a frame's
/// first byte (within the trickle's resolution).
fn assert_cut(closed: Option<Duration>, what: &str) {
    let closed = closed.unwrap_or_else(|| panic!("{what}: still open"));
    assert!(
        closed >= TRANSFER_TIMEOUT - Duration::from_millis(100)
            && closed < TRANSFER_TIMEOUT + Duration::from_secs(1),
        "{what}: closed {closed:?} after the first byte"
    );
}

/// A frame, or a refused WRITE's data the target discards, trickled a
/// byte at a time: the target closes the connection at the transfer
/// timeout from the frame's first byte.
#[test]
fn a_request_trickled_byte_by_byte_is_cut_at_the_transfer_timeout() {
    let give_up = TRANSFER_TIMEOUT * 3;
    let e = engine(EngineConfig::new());
    let mut s = connect(&e);
    let instance = hello(&mut s).instance_id;
    let t = wire::encode_table(
        instance,
        &[wire::Range {
            addr: 0x10,
            len: 16,
        }],
    );
    assert_cut(
        trickle(&mut s, &frame(Kind::Read, &t), TRICKLE, give_up),
        "a READ header",
    );
    let mut s = connect(&e);
    hello(&mut s);
    let h = FrameHeader::new(Kind::Write, 3, t.len() as u64 + 16);
    wire::write_frame(&mut s, &h, &[&t]).unwrap();
    assert_cut(
        trickle(&mut s, &[0x5a; 16], TRICKLE, give_up),
        "a refused WRITE's data",
    );
    still_serves(&e);
}

/// A WRITE whose data is trickled holds pins on its ranges until the
/// target cuts it at the transfer timeout: unregister, which waits for
/// pins that long, succeeds instead of finding the region busy forever.
#[test]
fn a_trickled_write_does_not_keep_its_ranges_pinned() {
    let e = engine(EngineConfig::new());
    let mut mem = vec![0u8; 4096];
    let addr = mem.as_mut_ptr() as u64;
    // SAFETY: `mem` outlives the engine's use of it (unregistered below).
    unsafe { e.register_memory(addr, 4096, "cpu:0") }.unwrap();
    let mut s = connect(&e);
    let instance = hello(&mut s).instance_id;
    let t = wire::encode_table(instance, &[wire::Range { addr, len: 16 }]);
    let h = FrameHeader::new(Kind::Write, 3, t.len() as u64 + 16);
    wire::write_frame(&mut s, &h, &[&t]).unwrap();
    let (closed, unregistered) = std::thread::scope(|scope| {
        let dripper = scope.spawn(|| trickle(&mut s, &[0x5a; 16], TRICKLE, TRANSFER_TIMEOUT * 3));
        std::thread::sleep(TRANSFER_TIMEOUT / 2);
        let unregistered = e.unregister_memory(addr);
        (dripper.join().unwrap(), unregistered)
    });
    unregistered.unwrap();
    assert_cut(closed, "a WRITE's data");
    drop(mem);
    still_serves(&e);
}

/// A READ whose reply the client never reads: the target's send stalls
/// once the socket buffers are full. It gives up at the transfer timeout
/// from the request, closes the connection and drops its pins, so the
/// owner's unregister (which waits that long for pins) succeeds instead of
/// finding the region busy; and the engine keeps serving.
#[test]
fn a_reply_nobody_reads_does_not_keep_its_ranges_pinned() {
    // More than loopback's socket buffers hold (a few MiB each side).
    const LEN: usize = 64 << 20;
    let e = engine(EngineConfig::new());
    let mut mem = vec![0u8; LEN];
    let addr = mem.as_mut_ptr() as u64;
    // SAFETY: `mem` outlives the engine's use of it (unregistered below).
    unsafe { e.register_memory(addr, LEN as u64, "cpu:0") }.unwrap();
    let mut s = connect(&e);
    let instance = hello(&mut s).instance_id;
    let t = wire::encode_table(
        instance,
        &[wire::Range {
            addr,
            len: LEN as u64,
        }],
    );
    let asked = Instant::now();
    s.write_all(&frame(Kind::Read, &t)).unwrap();
    // The reply has started: the target holds the pin.
    let h = wire::read_header(&mut s).unwrap().unwrap();
    assert_eq!(
        (Kind::from_u16(h.kind), h.request_id),
        (Some(Kind::ReadData), 9)
    );
    std::thread::sleep(TRANSFER_TIMEOUT / 2);
    // Waits for the pin up to the transfer timeout: the target must have
    // let go of it by then.
    e.unregister_memory(addr).unwrap();
    let unregistered = asked.elapsed();
    assert!(
        unregistered < TRANSFER_TIMEOUT + Duration::from_secs(1),
        "unregister returned {unregistered:?} after the READ"
    );
    // What the target queued before it gave up, then the end of the stream.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the target kept the stalled connection open: {e}"),
        }
    }
    assert!(
        got < LEN,
        "the whole reply arrived ({got} bytes): nothing stalled"
    );
    drop(mem);
    still_serves(&e);
}

/// A fake target that greets, serves a segment with one host region, and
/// answers a READ with a READ_DATA header whose bytes it then trickles, one
/// every 300 ms. The initiator's read fails with a timeout at its transfer
/// timeout (2 s), not when the last byte would have come (20 minutes on).
#[test]
fn a_reply_trickled_to_the_initiator_fails_at_its_deadline() {
    const REMOTE: u64 = 0x7f00_0000_0000;
    let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let peer = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
    let segment = kvferry::Segment {
        name: peer.clone(),
        instance_id: 42,
        epoch: 1,
        host_id: "another host".into(),
        pid: 1,
        regions: vec![kvferry::RegionDesc {
            addr: REMOTE,
            len: 4096,
            location: kvferry::Location::Host,
        }],
        exports: Default::default(),
    };
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        while let Some((h, p)) = read_frame(&mut s) {
            let rid = h.request_id;
            let sent = match Kind::from_u16(h.kind) {
                Some(Kind::Hello) => {
                    // A well-formed HELLO; nothing in it is needed.
                    let _: wire::Hello = wire::pod_from(&p).unwrap();
                    let r = common::hello_reply(42);
                    send_frame(&mut s, Kind::HelloReply, rid, &[bytemuck::bytes_of(&r)])
                }
                Some(Kind::GetSegment) => {
                    let seg = wire::encode_segment(&segment);
                    send_frame(&mut s, Kind::SegmentReply, rid, &[&seg])
                }
                Some(Kind::Read) => {
                    let (ranges, total) = wire::decode_ranges(&p[16..]).unwrap();
                    assert_eq!(ranges.len(), 1);
                    let h = FrameHeader::new(Kind::ReadData, rid, total);
                    s.write_all(bytemuck::bytes_of(&h)).unwrap();
                    trickle(
                        &mut s,
                        &vec![1; total as usize],
                        Duration::from_millis(300),
                        Duration::from_secs(60),
                    );
                    return;
                }
                _ => return,
            };
            sent.unwrap();
        }
    });
    // On a thread of its own, which a failing test leaves behind.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let i = engine(EngineConfig::new().transport(TransportChoice::Tcp));
        let mut local = vec![0u8; 4096];
        // SAFETY: `local` outlives `i` (dropped first, below).
        unsafe { i.register_memory(local.as_mut_ptr() as u64, 4096, "cpu:0") }.unwrap();
        let op = Op {
            local: local.as_ptr() as u64,
            remote: REMOTE,
            len: 4096,
        };
        let start = Instant::now();
        let r = i.read(&peer, &[op]);
        let _ = tx.send((r, start.elapsed()));
        drop(i);
        drop(local);
    });
    let (r, took) = rx
        .recv_timeout(TRANSFER_TIMEOUT * 5)
        .expect("the read is still waiting for the trickle");
    let e = r.unwrap_err();
    assert!(matches!(e, Error::TransferTimeout { .. }), "{e}");
    assert!(took < TRANSFER_TIMEOUT + Duration::from_secs(1), "{took:?}");
}

/// How long until the peer closes `s` (EOF or reset); panics if it is
/// still open after 5 s.
fn closed_after(s: &mut TcpStream) -> Duration {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return start.elapsed(),
            Ok(_) => {}
            Err(e) if nothing_came(&e) => panic!("still open after {:?}", start.elapsed()),
            Err(_) => return start.elapsed(),
        }
    }
}

/// A connection must say HELLO (and AUTH, when the engine has a secret)
/// within the connect timeout, else it is closed; a greeted connection
/// may stay idle as long as it likes.
#[test]
fn a_connection_that_does_not_greet_is_closed_after_the_connect_timeout() {
    let connect_timeout = Duration::from_millis(300);
    let e = engine(EngineConfig::new().connect_timeout(connect_timeout));
    let secured = engine(
        EngineConfig::new()
            .connect_timeout(connect_timeout)
            .secret("s3cret"),
    );
    let mut idle = connect(&e);
    hello(&mut idle);
    let limit = Duration::from_millis(1500); // below the transfer timeout
    // Says nothing.
    let mut s = connect(&e);
    let t = closed_after(&mut s);
    assert!(t < limit, "silent: {t:?}");
    // Says half a HELLO.
    let mut s = connect(&e);
    s.write_all(&bytemuck::bytes_of(&FrameHeader::new(Kind::Hello, 1, 32))[..10])
        .unwrap();
    let t = closed_after(&mut s);
    assert!(t < limit, "half a HELLO: {t:?}");
    // Says HELLO, then never proves the secret.
    let mut s = connect(&secured);
    assert_eq!(hello(&mut s).auth_required, 1);
    let t = closed_after(&mut s);
    assert!(t < limit, "no AUTH: {t:?}");
    // The greeted connection idled through all of this and still works.
    std::thread::sleep(connect_timeout * 2);
    let (h, p) = round_trip(&mut idle, Kind::Ping, 8, &[b"hi"]).expect("a PONG");
    assert_eq!((h.kind, p.as_slice()), (Kind::Pong as u16, &b"hi"[..]));
    still_serves(&e);
}

/// At most `max_connections` at once: one more is refused at once with an
/// ERROR about the connection (request id 0), which an initiator reports
/// as an unreachable peer with the reason; a connection that ends is
/// counted out.
#[test]
fn connections_over_the_limit_are_refused() {
    let e = engine(EngineConfig::new().max_connections(4));
    let mut held: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = connect(&e);
            hello(&mut s);
            s
        })
        .collect();
    let mut s = connect(&e);
    let (h, msg) = read_frame(&mut s).expect("an ERROR frame");
    let msg = String::from_utf8_lossy(&msg).into_owned();
    assert_eq!(
        (h.kind, h.request_id, h.status),
        (Kind::ErrorReply as u16, 0, Status::PeerUnreachable as i32),
        "{msg}"
    );
    assert!(msg.contains("KVFERRY_MAX_CONNECTIONS"), "{msg}");
    assert!(read_frame(&mut s).is_none(), "still open");

    let c = engine(EngineConfig::new().transport(TransportChoice::Tcp));
    let err = c.notify(e.name(), b"x").unwrap_err();
    assert!(
        matches!(err, Error::PeerUnreachable { .. })
            && err.to_string().contains("KVFERRY_MAX_CONNECTIONS"),
        "{err}"
    );

    // One closes: room for one more (once its handler has ended).
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    while try_hello(&mut connect(&e)).is_none() {
        assert!(
            Instant::now() < deadline,
            "no room after a connection closed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(held);
}

/// Undrained notifications are capped in bytes (64 MiB), not only in
/// count: a sender of 1 MiB messages sees its notify refused, with a
/// message that says why, once 64 MiB are queued; taking notifications
/// makes room.
#[test]
fn queued_notifications_are_capped_in_bytes() {
    let e = engine(EngineConfig::new());
    let c = engine(EngineConfig::new().transport(TransportChoice::Tcp));
    let big = vec![7u8; (1 << 20) - 64];
    let size = big.len() + c.name().len();
    let mut sent = 0;
    let err = loop {
        match c.notify(e.name(), &big) {
            Ok(()) => sent += 1,
            Err(err) => break err,
        }
        assert!(sent <= 80, "{sent} notifications of 1 MiB queued");
    };
    assert_eq!(sent, kvferry::engine::MAX_NOTIFICATION_BYTES / size);
    assert!(
        matches!(&err, Error::TransferFailed { reason, .. } if reason.contains("undrained notifications") && reason.contains("drain them")),
        "{err}"
    );
    // Taking one (as kvf_notify_recv does) makes room for one.
    let first = e.next_notification_within(usize::MAX, usize::MAX);
    assert_eq!(first.unwrap().unwrap().message, big);
    c.notify(e.name(), &big).unwrap();
    assert!(c.notify(e.name(), &big).is_err(), "full again");
    assert_eq!(e.drain_notifications().len(), sent);
    c.notify(e.name(), &big).unwrap();
    assert_eq!(e.drain_notifications().len(), 1);
}

/// Timeouts as large as the Rust builder takes (`Duration::MAX`) give
/// deadlines far away, not an overflow: a session to a closed port fails
/// cleanly.
#[test]
fn the_largest_timeouts_do_not_overflow() {
    let e = Engine::new(
        EngineConfig::new()
            .port(0)
            .connect_timeout(Duration::MAX)
            .transfer_timeout(Duration::MAX),
    )
    .unwrap();
    // Nobody listens on port 1 (a freed port could be taken meanwhile).
    let peer = "127.0.0.1:1".to_owned();
    let mut buf = vec![0u8; 64];
    // SAFETY: `buf` outlives `e`.
    unsafe { e.register_memory(buf.as_mut_ptr() as u64, 64, "cpu:0") }.unwrap();
    let op = Op {
        local: buf.as_ptr() as u64,
        remote: 0x1000,
        len: 64,
    };
    let err = e.read(&peer, &[op]).unwrap_err();
    assert!(matches!(err, Error::PeerUnreachable { .. }), "{err}");
    drop(e);
}
