//! The engine's listener: one port serves the hello, segments, tcp data,
//! notifications and cma leases of every peer.
//!
//! One thread accepts; each connection gets a handler thread (connections
//! are persistent lanes, a few per peer). Every request is bounds-checked
//! against this engine's own registry before a byte moves. A frame that
//! breaks the protocol gets an ERROR frame and the connection is closed;
//! other connections are unaffected.
//!
//! What a peer can hold: at most `max_connections` connections (more are
//! refused at once); a connection that has not said HELLO (and proved the
//! secret) within the connect timeout is closed; a frame must arrive
//! whole, and its reply leave, within the transfer timeout from its first
//! byte. A greeted connection may stay idle for as long as its peer likes:
//! initiators keep their lanes open between batches.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::engine::Shared;
use crate::error::Status;
use crate::memory::{HostMappings, Location, Pin};
use crate::net::{self, RawRange};
use crate::wire::{self, FrameHeader, HEADER_LEN, Kind};

/// How often idle handlers and the acceptor look at the shutdown flag.
const TICK: Duration = Duration::from_millis(200);

#[derive(Debug)]
pub(crate) struct Server {
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    port: u16,
    conns: Arc<Conns>,
}

/// Open connections (a clone of each socket, to shut them down when the
/// engine stops) and the handler threads.
#[derive(Debug, Default)]
struct Conns {
    open: Mutex<HashMap<u64, TcpStream>>,
    handlers: Mutex<Vec<JoinHandle<()>>>,
}

impl Server {
    pub(crate) fn start(listener: TcpListener, shared: Arc<Shared>) -> io::Result<Server> {
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Conns> = Arc::default();
        let acceptor = {
            let (stop, conns) = (Arc::clone(&stop), Arc::clone(&conns));
            std::thread::Builder::new()
                .name(format!("kvferry-accept-{port}"))
                .spawn(move || accept_loop(listener, shared, stop, conns))?
        };
        Ok(Server {
            stop,
            acceptor: Some(acceptor),
            port,
            conns,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor out of accept().
        let _ = TcpStream::connect_timeout(
            &([127, 0, 0, 1], self.port).into(),
            Duration::from_millis(200),
        );
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for s in self.conns.open.lock().values() {
            let _ = s.shutdown(Shutdown::Both);
        }
        let handlers = std::mem::take(&mut *self.conns.handlers.lock());
        for h in handlers {
            let _ = h.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    conns: Arc<Conns>,
) {
    let mut next_id = 0u64;
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors (EMFILE), say: the pending connection
                // stays queued and accept fails again at once. Pause rather
                // than spin on it.
                log::debug!("kvferry: {} cannot accept a connection: {e}", shared.name);
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        {
            let open = conns.open.lock();
            if open.len() >= shared.settings.max_connections {
                let n = open.len();
                drop(open);
                refuse(stream, &shared.name, n);
                continue;
            }
        }
        let Ok(clone) = stream.try_clone() else {
            continue;
        };
        next_id += 1;
        let id = next_id;
        conns.open.lock().insert(id, clone);
        let (shared, stop2, conns2) = (Arc::clone(&shared), Arc::clone(&stop), Arc::clone(&conns));
        let handle = std::thread::Builder::new()
            .name("kvferry-conn".into())
            .spawn(move || {
                let peer = stream
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                let board = shared.board.clone();
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    Handler::new(stream, shared, stop2.clone(), id).serve()
                }));
                // Lease board slots of this connection. A peer that closed
                // it cleanly is done copying: its slots are cleared and
                // freed. A connection this side dropped (an error, a
                // timeout, a bad frame) may belong to a peer that is still
                // copying on another thread: its slots stay, and are freed
                // once that process is gone (board.rs). Not when this
                // engine stops: the unregister of all memory that follows
                // must wait for the slots.
                if let Some(b) = board
                    && !stop2.load(Ordering::SeqCst)
                {
                    match &r {
                        Ok(Ok(())) => b.release(id),
                        _ => b.orphan(id),
                    }
                }
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => log::debug!("kvferry: connection from {peer} closed: {e}"),
                    Err(_) => {
                        log::error!("kvferry: handler for {peer} panicked; connection closed")
                    }
                }
                // Close for real: the clone kept for shutdown would
                // otherwise hold the connection open.
                if let Some(s) = conns2.open.lock().remove(&id) {
                    let _ = s.shutdown(Shutdown::Both);
                }
            });
        let mut handlers = conns.handlers.lock();
        // Forget finished handlers so the list does not grow forever.
        handlers.retain(|h| !h.is_finished());
        match handle {
            Ok(h) => handlers.push(h),
            Err(e) => {
                log::error!("kvferry: cannot start a connection handler: {e}");
                if let Some(s) = conns.open.lock().remove(&id) {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
        }
    }
}

/// Turns away a connection over the limit: an ERROR frame about the
/// connection (request id 0), sent without waiting, then close.
fn refuse(stream: TcpStream, name: &str, open: usize) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    log::debug!(
        "kvferry: {name} refuses a connection from {peer}: {open} connections are open, the limit (KVFERRY_MAX_CONNECTIONS)"
    );
    let message = format!(
        "{name} serves {open} connections, its limit (KVFERRY_MAX_CONNECTIONS); try again later"
    );
    let (h, msg) = wire::error_frame(0, Status::PeerUnreachable, &message);
    // A fresh socket's send buffer takes the frame; never block the acceptor.
    if stream.set_nonblocking(true).is_ok() {
        let _ = wire::write_frame(&mut &stream, &h, &[&msg]);
        let _ = stream.shutdown(Shutdown::Write);
        // Closing with unread bytes (the peer's HELLO, if it came already)
        // would reset the connection, and the peer might lose the frame.
        let _ = io::Read::read(&mut &stream, &mut [0u8; 256]);
    }
}

struct Handler {
    stream: net::Stream,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    /// cma leases of this connection: pins held until UNPIN or disconnect.
    leases: HashMap<u64, Vec<Pin>>,
    next_lease: u64,
    /// This connection's id (owner of its lease board slots).
    id: u64,
    /// When the connection must have said HELLO (and AUTH) by.
    hello_by: Instant,
    /// The deadline of the frame being served: the rest of the frame and
    /// the reply to it must be through by then (`net::Stream`).
    deadline: Instant,
}

/// Why a connection ends.
type Close = String;

/// What `wait_for_frame` saw.
enum Next {
    /// The next frame's first byte (or the peer's end of stream).
    Frame,
    /// The engine stops.
    Stop,
    /// The deadline it was given passed first.
    Expired,
}

impl Handler {
    fn new(stream: TcpStream, shared: Arc<Shared>, stop: Arc<AtomicBool>, id: u64) -> Self {
        let _ = stream.set_nodelay(true);
        let hello_by = net::deadline_after(shared.settings.connect_timeout);
        Handler {
            stream: net::Stream::new(stream),
            shared,
            stop,
            leases: HashMap::new(),
            next_lease: 1,
            id,
            hello_by,
            deadline: hello_by,
        }
    }

    /// Waits for the next frame's first byte, looking at the stop flag
    /// every tick, until `until` if given. A peer that closed is seen by
    /// the header read that follows (a clean end of stream).
    fn wait_for_frame(&self, until: Option<Instant>) -> io::Result<Next> {
        let s = self.stream.get_ref();
        if net::spin_until_readable(s)? {
            return Ok(Next::Frame);
        }
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(Next::Stop);
            }
            let tick = match until {
                None => TICK,
                Some(t) => match t.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left.min(TICK),
                    _ => return Ok(Next::Expired),
                },
            };
            if net::wait_readable(s, tick)? {
                return Ok(Next::Frame);
            }
        }
    }

    fn send(&mut self, h: &FrameHeader, payload: &[&[u8]]) -> io::Result<()> {
        self.stream.write_frame(h, payload, self.deadline)
    }

    fn send_error(&mut self, request_id: u64, status: Status, message: &str) -> io::Result<()> {
        let (h, msg) = wire::error_frame(request_id, status, message);
        self.send(&h, &[&msg])
    }

    /// Sends an ERROR frame and ends the connection.
    fn reject(&mut self, request_id: u64, message: String) -> Result<(), Close> {
        let _ = self.send_error(request_id, Status::Protocol, &message);
        Err(message)
    }

    fn read_payload(&mut self, len: u64) -> Result<Vec<u8>, Close> {
        self.stream
            .read_payload(len, self.deadline)
            .map_err(|e| e.to_string())
    }

    fn serve(mut self) -> Result<(), Close> {
        let io = |e: io::Error| e.to_string();
        let mut hello_done = false;
        let mut awaiting_auth: Option<([u8; 16], [u8; 16])> = None;
        loop {
            // Before the handshake is through, the connect timeout bounds
            // the wait and the frames: a connection that never greets
            // (a port scan, a stray client) does not hold a thread forever.
            let greeting = !hello_done;
            match self
                .wait_for_frame(greeting.then_some(self.hello_by))
                .map_err(io)?
            {
                Next::Frame => {}
                Next::Stop => return Ok(()),
                Next::Expired => {
                    return Err(format!(
                        "no {} within the connect timeout ({} ms)",
                        if awaiting_auth.is_some() {
                            "AUTH"
                        } else {
                            "HELLO"
                        },
                        self.shared.settings.connect_timeout.as_millis()
                    ));
                }
            }
            // Everything of this frame, and the reply to it, by then.
            self.deadline = net::deadline_after(self.shared.settings.transfer_timeout);
            if greeting {
                self.deadline = self.deadline.min(self.hello_by);
            }
            let h = match self.stream.read_header(self.deadline).map_err(io)? {
                Some(h) => h,
                None => return Ok(()),
            };
            let kind = match h.validate() {
                Ok(k) => k,
                Err(m) => return self.reject(h.request_id, m),
            };
            let rid = h.request_id;
            let len = h.payload_len;
            if let Some((client_nonce, server_nonce)) = awaiting_auth {
                if kind != Kind::Auth {
                    return self.reject(
                        rid,
                        "this engine requires the shared secret: AUTH expected".into(),
                    );
                }
                let p = self.read_payload(len)?;
                let auth: wire::Auth = match wire::pod_from(&p) {
                    Ok(a) => a,
                    Err(m) => return self.reject(rid, m),
                };
                let secret = self.shared.settings.secret.clone().unwrap_or_default();
                if !net::proof_ok(
                    &secret,
                    &[b"kvferry client", &server_nonce, &client_nonce],
                    &auth.proof,
                ) {
                    let _ = self.send_error(rid, Status::AuthFailed, "wrong shared secret");
                    return Err("wrong shared secret".into());
                }
                awaiting_auth = None;
                hello_done = true;
                self.send(&FrameHeader::new(Kind::AuthOk, rid, 0), &[])
                    .map_err(io)?;
                continue;
            }
            if !hello_done && kind != Kind::Hello {
                return self.reject(rid, format!("{kind:?} before HELLO"));
            }
            match kind {
                Kind::Hello => {
                    if hello_done {
                        return self.reject(rid, "second HELLO".into());
                    }
                    let p = self.read_payload(len)?;
                    let hello: wire::Hello = match wire::pod_from(&p) {
                        Ok(x) => x,
                        Err(m) => return self.reject(rid, m),
                    };
                    if hello.min_version > wire::VERSION || hello.max_version < wire::VERSION {
                        return self.reject(
                            rid,
                            format!(
                                "client speaks versions {}..={}, this engine {}",
                                hello.min_version,
                                hello.max_version,
                                wire::VERSION
                            ),
                        );
                    }
                    let nonce: [u8; 16] = net::random_bytes();
                    let (auth_required, proof) = match &self.shared.settings.secret {
                        Some(s) => (1, net::proof(s, &[b"kvferry server", &hello.nonce, &nonce])),
                        None => (0, [0; 32]),
                    };
                    let reply = wire::HelloReply {
                        version: wire::VERSION,
                        auth_required,
                        reserved: 0,
                        nonce,
                        instance_id: self.shared.instance_id,
                        proof,
                    };
                    let h = FrameHeader::new(
                        Kind::HelloReply,
                        rid,
                        std::mem::size_of::<wire::HelloReply>() as u64,
                    );
                    self.send(&h, &[bytemuck::bytes_of(&reply)]).map_err(io)?;
                    if auth_required == 1 {
                        awaiting_auth = Some((hello.nonce, nonce));
                    } else {
                        hello_done = true;
                    }
                }
                Kind::GetSegment => {
                    let seg = wire::encode_segment(&self.shared.segment());
                    let h = FrameHeader::new(Kind::SegmentReply, rid, seg.len() as u64);
                    self.send(&h, &[&seg]).map_err(io)?;
                }
                Kind::Read | Kind::Write | Kind::Pin => self.serve_table(kind, h)?,
                Kind::Unpin => {
                    let p = self.read_payload(len)?;
                    let Ok(id) = <[u8; 8]>::try_from(p.as_slice()) else {
                        return self.reject(rid, "UNPIN payload is not 8 bytes".into());
                    };
                    self.leases.remove(&u64::from_le_bytes(id));
                }
                Kind::LeaseBoard => {
                    let p = self.read_payload(len)?;
                    let req: wire::BoardRequest = match wire::pod_from(&p) {
                        Ok(x) => x,
                        Err(m) => return self.reject(rid, m),
                    };
                    self.serve_board(rid, req).map_err(io)?;
                }
                Kind::LeaseRegions => {
                    let p = self.read_payload(len)?;
                    let Ok(inst) = <[u8; 8]>::try_from(p.as_slice()) else {
                        return self.reject(rid, "LEASE_REGIONS payload is not 8 bytes".into());
                    };
                    self.serve_lease_regions(rid, u64::from_le_bytes(inst))
                        .map_err(io)?;
                }
                Kind::Notify => {
                    let p = self.read_payload(len)?;
                    let (name, message) = match wire::decode_notify(&p) {
                        Ok(x) => x,
                        Err(m) => return self.reject(rid, m),
                    };
                    match self.shared.push_notification(name, message) {
                        Ok(()) => self
                            .send(&FrameHeader::new(Kind::NotifyAck, rid, 0), &[])
                            .map_err(io)?,
                        Err(e) => self
                            .send_error(rid, e.status(), &e.to_string())
                            .map_err(io)?,
                    }
                }
                Kind::Ping => {
                    let p = self.read_payload(len)?;
                    self.send(&FrameHeader::new(Kind::Pong, rid, p.len() as u64), &[&p])
                        .map_err(io)?;
                }
                Kind::DeviceControl => {
                    let p = self.read_payload(len)?;
                    let reply = match &self.shared.device.runtime {
                        Some(rt) => rt.serve_control(&p),
                        None => Err(crate::error::Error::Unsupported {
                            what: format!("{} has no device runtime", self.shared.name),
                        }),
                    };
                    match reply {
                        Ok(r) => {
                            let h = FrameHeader::new(Kind::DeviceControlReply, rid, r.len() as u64);
                            self.send(&h, &[&r]).map_err(io)?
                        }
                        Err(e) => self
                            .send_error(rid, e.status(), &e.to_string())
                            .map_err(io)?,
                    }
                }
                Kind::Auth
                | Kind::HelloReply
                | Kind::AuthOk
                | Kind::SegmentReply
                | Kind::ReadData
                | Kind::WriteAck
                | Kind::NotifyAck
                | Kind::PinOk
                | Kind::LeaseBoardGrant
                | Kind::LeaseRegionsReply
                | Kind::Pong
                | Kind::DeviceControlReply
                | Kind::ErrorReply => {
                    return self.reject(
                        rid,
                        format!("{kind:?} is a reply; a server does not take it"),
                    );
                }
            }
        }
    }

    /// The refusal for a request naming another instance than this one.
    fn wrong_instance(&self, target_instance: u64) -> Option<String> {
        (target_instance != self.shared.instance_id).then(|| {
            format!(
                "request for instance {target_instance:#x}, this engine is instance {:#x}",
                self.shared.instance_id
            )
        })
    }

    /// The lease board, for a request naming `target_instance`; `None`
    /// once the refusal (wrong instance, no board) has been sent.
    fn board_for(
        &mut self,
        rid: u64,
        target_instance: u64,
    ) -> io::Result<Option<Arc<crate::board::LeaseBoard>>> {
        if let Some(m) = self.wrong_instance(target_instance) {
            self.send_error(rid, Status::PeerRestarted, &m)?;
            return Ok(None);
        }
        match self.shared.board.clone() {
            Some(b) => Ok(Some(b)),
            None => {
                let m = format!("{} has no cma lease board", self.shared.name);
                self.send_error(rid, Status::Unsupported, &m)?;
                Ok(None)
            }
        }
    }

    /// LEASE_BOARD: slots of the lease board for this connection.
    fn serve_board(&mut self, rid: u64, req: wire::BoardRequest) -> io::Result<()> {
        let Some(board) = self.board_for(rid, req.target_instance)? else {
            return Ok(());
        };
        // At most `board::MAX_SLOTS_PER_CONN`, however many are asked for.
        let slots = board.grant(self.id, req.slots, req.pid);
        let grant = wire::BoardGrant {
            pid: std::process::id(),
            fd: board.fd(),
            board_len: board.byte_len() as u64,
            count: slots.len() as u32,
            reserved: 0,
        };
        let p = wire::encode_grant(&grant, &slots);
        self.send(
            &FrameHeader::new(Kind::LeaseBoardGrant, rid, p.len() as u64),
            &[&p],
        )
    }

    /// LEASE_REGIONS: the regions, stamped with the lease board's epoch read
    /// *before* listing them (board.rs: a list is never stamped newer than
    /// what it shows).
    fn serve_lease_regions(&mut self, rid: u64, target_instance: u64) -> io::Result<()> {
        let Some(board) = self.board_for(rid, target_instance)? else {
            return Ok(());
        };
        let epoch = board.epoch();
        // Host memory only: cma never touches device memory, even when a
        // stale segment routes a device range to it.
        let regions: Vec<wire::Range> = self
            .shared
            .registry
            .descs()
            .iter()
            .filter(|d| d.location == Location::Host)
            .map(|d| wire::Range {
                addr: d.addr,
                len: d.len,
            })
            .collect();
        if regions.len() > wire::MAX_ENTRIES {
            return self.send_error(
                rid,
                Status::Unsupported,
                "more regions than one LEASE_REGIONS_REPLY carries",
            );
        }
        let p = wire::encode_lease_regions(epoch, &regions);
        self.send(
            &FrameHeader::new(Kind::LeaseRegionsReply, rid, p.len() as u64),
            &[&p],
        )
    }

    /// READ, WRITE and PIN: a table of this engine's ranges, checked and
    /// pinned before anything moves.
    fn serve_table(&mut self, kind: Kind, h: FrameHeader) -> Result<(), Close> {
        let io = |e: io::Error| e.to_string();
        let rid = h.request_id;
        if h.payload_len < wire::TABLE_HEAD_LEN as u64 {
            return self.reject(rid, format!("{kind:?} payload shorter than its table head"));
        }
        let head_bytes = self.read_payload(wire::TABLE_HEAD_LEN as u64)?;
        let head = match wire::decode_table_head(&head_bytes, h.payload_len) {
            Ok(x) => x,
            Err(m) => return self.reject(rid, m),
        };
        let table_len = 16 * u64::from(head.count);
        let table = self.read_payload(table_len)?;
        let (ranges, total) = match wire::decode_ranges(&table) {
            Ok(x) => x,
            Err(m) => return self.reject(rid, m),
        };
        let rest = h.payload_len - wire::TABLE_HEAD_LEN as u64 - table_len;
        match kind {
            Kind::Write if rest != total => {
                return self.reject(
                    rid,
                    format!("WRITE carries {rest} data bytes for ranges of {total}"),
                );
            }
            Kind::Read | Kind::Pin if rest != 0 => {
                return self.reject(rid, format!("{kind:?} carries {rest} unexpected bytes"));
            }
            Kind::Read if total > wire::MAX_DATA => {
                return self.reject(
                    rid,
                    format!("READ of {total} bytes exceeds {}", wire::MAX_DATA),
                );
            }
            _ => {}
        }
        // Check and pin. A refusal keeps the connection: the request was
        // well formed, only its addresses are wrong.
        let pins = match self.check(head.target_instance, &ranges) {
            Ok(p) => p,
            Err((status, msg)) => {
                if kind == Kind::Write {
                    self.stream.discard(rest, self.deadline).map_err(io)?;
                }
                return self.send_error(rid, status, &msg).map_err(io);
            }
        };
        // Ranges in device memory are staged through pinned host buffers.
        if let Some(served) = crate::staging::serve(
            &self.shared,
            &mut self.stream,
            self.deadline,
            kind,
            rid,
            &ranges,
            &pins,
        ) {
            return served.map_err(io);
        }
        let raw: Vec<RawRange> = ranges
            .iter()
            .map(|r| RawRange {
                addr: r.addr,
                len: r.len,
            })
            .collect();
        match kind {
            Kind::Read => {
                let hdr = FrameHeader::new(Kind::ReadData, rid, total);
                // SAFETY: every range lies inside a region pinned in `pins`
                // for the whole call; registered memory is valid until
                // unregistered, which waits for pins.
                let sent = unsafe {
                    self.stream
                        .send_ranges(&[bytemuck::bytes_of(&hdr)], &raw, self.deadline)
                };
                if let Err(e) = sent {
                    let Some(f) = net::RangeFault::of(&e) else {
                        return Err(io(e));
                    };
                    let data_moved = f.moved.saturating_sub(HEADER_LEN as u64);
                    let msg = self.fault_message(kind, &ranges, &pins, data_moved);
                    if f.moved > 0 {
                        // Part of the READ_DATA is out, promising `total`
                        // bytes: no ERROR frame can follow in step.
                        log::warn!(
                            "kvferry: {msg}; connection dropped: part of its READ_DATA had gone out"
                        );
                        return Err(io(e));
                    }
                    // Nothing of the reply went out: a send that queued
                    // bytes returns their count, not an error, and none
                    // did. (The kernel usually copies the header together
                    // with the data after it, so a fault in the first
                    // range sends nothing.) An ERROR in its place keeps
                    // the connection in step.
                    log::warn!("kvferry: {msg}");
                    self.send_error(rid, Status::RegionNotMapped, &msg)
                        .map_err(io)?;
                }
            }
            Kind::Write => {
                // SAFETY: as above; the data lands straight in the
                // registered ranges, and is acknowledged only once all of
                // it is in place.
                match unsafe { self.stream.recv_ranges(&raw, self.deadline) } {
                    Ok(()) => self
                        .send(&FrameHeader::new(Kind::WriteAck, rid, 0), &[])
                        .map_err(io)?,
                    Err(e) => {
                        let Some(f) = net::RangeFault::of(&e) else {
                            return Err(io(e));
                        };
                        // The rest of the data is still in the socket
                        // (`RangeFault`): dropped, and an ERROR in its
                        // place keeps the connection in step.
                        let msg = self.fault_message(kind, &ranges, &pins, f.moved);
                        log::warn!("kvferry: {msg}");
                        self.stream
                            .discard(total - f.moved, self.deadline)
                            .map_err(io)?;
                        self.send_error(rid, Status::RegionNotMapped, &msg)
                            .map_err(io)?;
                    }
                }
            }
            _ => {
                self.shared.pins_served.fetch_add(1, Ordering::Relaxed);
                let id = self.next_lease;
                self.next_lease += 1;
                self.leases.insert(id, pins.clone());
                self.send(&FrameHeader::new(Kind::PinOk, rid, 8), &[&id.to_le_bytes()])
                    .map_err(io)?;
            }
        }
        drop(pins);
        Ok(())
    }

    /// Says where serving a READ or WRITE of `ranges` faulted, `moved`
    /// bytes into its data (`net::RangeFault`: the fault lies at or after
    /// that byte), and what it means. The mappings are read again to name
    /// the range and what became of it: a rare path, whose message is for
    /// the owner of the memory.
    fn fault_message(
        &self,
        kind: Kind,
        ranges: &[wire::Range],
        pins: &[Pin],
        moved: u64,
    ) -> String {
        let maps = HostMappings::of_this_process().ok();
        let mut skip = moved;
        for (i, r) in ranges.iter().enumerate() {
            if skip >= r.len {
                skip -= r.len;
                continue;
            }
            let from = r.addr + std::mem::take(&mut skip);
            let Some(detail) = maps.as_ref().and_then(|m| m.find_gap(from, r.addr + r.len)) else {
                continue;
            };
            let region = pins
                .iter()
                .map(|p| p.desc())
                .find(|d| d.contains(r.addr, r.len))
                .map(|d| format!("region [{:#x}, +{})", d.addr, d.len))
                .unwrap_or_else(|| "a region".into());
            return format!(
                "{} cannot serve a {kind:?}: range {i} [{:#x}, +{}) of the request lies in {region}, registered but no longer readable and writable memory ({detail}): its owner unmapped it, or took away access, without unregistering it first",
                self.shared.name, r.addr, r.len
            );
        }
        // The mappings were restored in between, or could not be read.
        format!(
            "{} cannot serve a {kind:?}: its registered memory faulted (EFAULT) at or after byte {moved} of the request's data: its owner unmapped it, or took away access, without unregistering it first",
            self.shared.name
        )
    }

    fn check(
        &self,
        target_instance: u64,
        ranges: &[wire::Range],
    ) -> Result<Vec<Pin>, (Status, String)> {
        if let Some(m) = self.wrong_instance(target_instance) {
            return Err((Status::PeerRestarted, m));
        }
        let mut pins: Vec<Pin> = Vec::new();
        for (i, r) in ranges.iter().enumerate() {
            if pins
                .last()
                .is_some_and(|p| p.desc().contains(r.addr, r.len))
            {
                continue;
            }
            match self.shared.registry.pin(r.addr, r.len) {
                Some(p) => pins.push(p),
                None => {
                    return Err((
                        Status::RemoteOutOfRange,
                        format!(
                            "range {i} [{:#x}, +{}) is not inside one region registered with {}",
                            r.addr, r.len, self.shared.name
                        ),
                    ));
                }
            }
        }
        Ok(pins)
    }
}
