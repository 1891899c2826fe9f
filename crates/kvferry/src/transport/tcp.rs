//! The `tcp` transport: persistent connections ("lanes") to one peer,
//! reused across batches. READ data arrives straight into local memory and
//! WRITE data leaves straight from it (readv / writev, no staging buffer).

use std::collections::VecDeque;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::net::{self, RawRange};
use crate::plan::{Opcode, Slice};
use crate::segment::Segment;
use crate::session::PeerAddr;
use crate::transport::{Job, Report, Transport};
use crate::wire::{self, FrameHeader, Kind};

// DEVICE_CONTROL requests (device runtimes), kept apart from the data path.
#[path = "tcp_device.rs"]
mod device;

/// Data bytes per request (a slice larger than this is a request of its
/// own): large enough that a frame header and a reply are nothing beside
/// the data, small enough that lanes taking requests as they go (`Claims`)
/// end within a request of each other. Measured on the 2-vCPU test guest
/// against requests dealt out in advance, 4 MiB each (`kvferry bench
/// --transport tcp --block-size B --batch-size 32 --layout contiguous`,
/// two interleaved rounds, GB/s): 1 MiB blocks read 4.28-4.40 -> 4.34-4.56,
/// write 4.69-4.78 -> 5.06-5.22; 4 MiB blocks read 5.07-5.09 ->
/// 5.17-5.37, write 5.32-5.34 -> 5.59-5.83. Taking 4 MiB requests as they
/// go did as well within noise, but for writes of 1 MiB blocks (4.84-5.04).
const REQUEST_BYTES: u64 = 1 << 20;
/// Requests in flight per lane before the first reply is read.
const WINDOW: usize = 4;
/// Batches smaller than this run on one lane on the caller's thread.
const PARALLEL_MIN_BYTES: u64 = 4 << 20;

/// What a connection needs to know about this engine.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    pub instance_id: u64,
    pub secret: Option<Vec<u8>>,
    pub connect_timeout: std::time::Duration,
}

/// One open, greeted connection.
#[derive(Debug)]
pub struct Conn {
    stream: net::Stream,
    next_id: u64,
    /// The deadline of the operation under way (set by `arm`): every frame
    /// it sends and every reply it reads is done by then, however slowly the
    /// peer trickles them (`net::Stream`).
    deadline: Instant,
    /// What that operation was given, for timeout errors.
    budget: Duration,
}

impl Conn {
    /// Connects and says hello (and proves the secret when either side has one).
    /// Returns the connection and the peer's instance id.
    pub fn open(peer: &PeerAddr, me: &ClientIdentity) -> Result<(Conn, u64)> {
        let name = peer.to_string();
        let unreachable = |reason: String| Error::PeerUnreachable {
            peer: name.clone(),
            reason,
        };
        let addrs: Vec<_> = (peer.host.as_str(), peer.port)
            .to_socket_addrs()
            .map_err(|e| unreachable(format!("cannot resolve {}: {e}", peer.host)))?
            .collect();
        let mut last = None;
        let mut stream = None;
        for a in &addrs {
            match TcpStream::connect_timeout(a, me.connect_timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let stream = stream.ok_or_else(|| {
            unreachable(match last {
                Some(e) => format!("connect failed: {e}"),
                None => "the name resolves to no address".into(),
            })
        })?;
        let _ = stream.set_nodelay(true);
        let deadline = net::deadline_after(me.connect_timeout);
        let mut conn = Conn {
            stream: net::Stream::new(stream),
            next_id: 1,
            deadline,
            budget: me.connect_timeout,
        };
        let instance = conn.hello(&name, me, deadline)?;
        Ok((conn, instance))
    }

    /// The connection's socket (to look up who holds its other end).
    pub(crate) fn stream(&self) -> &TcpStream {
        self.stream.get_ref()
    }

    fn io(&self, peer: &str, what: &str, e: std::io::Error) -> Error {
        // A socket timeout shows as WouldBlock (EAGAIN) from std's reads.
        if matches!(
            e.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        ) {
            Error::Timeout {
                what: format!("{what} with {peer}"),
                ms: self.budget.as_millis() as u64,
            }
        } else {
            Error::TransferFailed {
                peer: peer.to_owned(),
                reason: format!("{what}: {e}"),
            }
        }
    }

    /// Starts an operation that must be over by `deadline`: its requests
    /// and replies, however slowly the peer sends or takes them. Makes no
    /// syscall: the socket timeouts follow the deadline only when a call
    /// would block (`net::Stream`).
    pub(crate) fn arm(&mut self, deadline: Instant) -> std::io::Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "deadline passed",
            ));
        }
        self.deadline = deadline;
        self.budget = left;
        Ok(())
    }

    fn send(&mut self, h: &FrameHeader, payload: &[&[u8]]) -> std::io::Result<()> {
        self.stream.write_frame(h, payload, self.deadline)
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Reads a reply header, with its payload if it is small (control) or
    /// an error; checks it is `expect` for request `rid`. The whole reply
    /// is bounded by the operation's deadline (the reads poll for
    /// `spin::SPIN_BEFORE_SLEEP`, while `spin::polling_pays`, before they
    /// sleep).
    fn reply(&mut self, peer: &str, expect: Kind, rid: u64) -> Result<(FrameHeader, Vec<u8>)> {
        let h = self
            .stream
            .await_header(self.deadline)
            .map_err(|e| self.io(peer, "reading a reply", e))?
            .ok_or_else(|| Error::TransferFailed {
                peer: peer.to_owned(),
                reason: "the peer closed the connection".into(),
            })?;
        let kind = h.validate().map_err(|d| Error::Protocol {
            peer: peer.to_owned(),
            detail: d,
        })?;
        // Request id 0: about the connection, not a request (a target
        // refusing a connection over its limit).
        if kind == Kind::ErrorReply && (h.request_id == rid || h.request_id == 0) {
            let msg = self
                .stream
                .read_payload(h.payload_len, self.deadline)
                .map_err(|e| self.io(peer, "reading an error", e))?;
            return Err(wire::remote_error(peer, &h, &msg));
        }
        if h.request_id != rid {
            return Err(Error::Protocol {
                peer: peer.to_owned(),
                detail: format!("reply to request {} while waiting for {rid}", h.request_id),
            });
        }
        if kind != expect {
            return Err(Error::Protocol {
                peer: peer.to_owned(),
                detail: format!("{kind:?} while waiting for {expect:?}"),
            });
        }
        if kind == Kind::ReadData {
            return Ok((h, Vec::new())); // the caller reads the data in place
        }
        let p = self
            .stream
            .read_payload(h.payload_len, self.deadline)
            .map_err(|e| self.io(peer, "reading a reply", e))?;
        Ok((h, p))
    }

    fn hello(&mut self, peer: &str, me: &ClientIdentity, deadline: Instant) -> Result<u64> {
        self.arm(deadline).map_err(|e| self.io(peer, "hello", e))?;
        let nonce: [u8; 16] = net::random_bytes();
        let hello = wire::Hello {
            min_version: wire::VERSION,
            max_version: wire::VERSION,
            reserved: 0,
            nonce,
            instance_id: me.instance_id,
        };
        let rid = self.id();
        let h = FrameHeader::new(Kind::Hello, rid, std::mem::size_of::<wire::Hello>() as u64);
        self.send(&h, &[bytemuck::bytes_of(&hello)])
            .map_err(|e| self.io(peer, "hello", e))?;
        let (_, p) = self.reply(peer, Kind::HelloReply, rid)?;
        let reply: wire::HelloReply = wire::pod_from(&p).map_err(|d| Error::Protocol {
            peer: peer.to_owned(),
            detail: d,
        })?;
        let auth = |detail: &str| Error::AuthFailed {
            peer: peer.to_owned(),
            detail: detail.to_owned(),
        };
        match (&me.secret, reply.auth_required) {
            (None, 0) => {}
            (None, _) => {
                return Err(auth(
                    "the peer requires a shared secret (KVFERRY_SECRET) and none is configured",
                ));
            }
            (Some(_), 0) => {
                return Err(auth(
                    "a shared secret is configured but the peer does not prove it",
                ));
            }
            (Some(secret), _) => {
                if !net::proof_ok(
                    secret,
                    &[b"kvferry server", &nonce, &reply.nonce],
                    &reply.proof,
                ) {
                    return Err(auth("the peer's proof of the shared secret is wrong"));
                }
                let a = wire::Auth {
                    proof: net::proof(secret, &[b"kvferry client", &reply.nonce, &nonce]),
                };
                let rid = self.id();
                let h = FrameHeader::new(Kind::Auth, rid, std::mem::size_of::<wire::Auth>() as u64);
                self.send(&h, &[bytemuck::bytes_of(&a)])
                    .map_err(|e| self.io(peer, "auth", e))?;
                self.reply(peer, Kind::AuthOk, rid)?;
            }
        }
        Ok(reply.instance_id)
    }

    pub fn get_segment(&mut self, peer: &str, deadline: Instant) -> Result<Segment> {
        self.arm(deadline)
            .map_err(|e| self.io(peer, "get segment", e))?;
        let rid = self.id();
        self.send(&FrameHeader::new(Kind::GetSegment, rid, 0), &[])
            .map_err(|e| self.io(peer, "get segment", e))?;
        let (_, p) = self.reply(peer, Kind::SegmentReply, rid)?;
        wire::decode_segment(&p).map_err(|d| Error::Protocol {
            peer: peer.to_owned(),
            detail: format!("bad segment: {d}"),
        })
    }

    pub fn notify(
        &mut self,
        peer: &str,
        from: &str,
        message: &[u8],
        deadline: Instant,
    ) -> Result<()> {
        self.arm(deadline).map_err(|e| self.io(peer, "notify", e))?;
        let p = wire::encode_notify(from, message);
        let rid = self.id();
        self.send(&FrameHeader::new(Kind::Notify, rid, p.len() as u64), &[&p])
            .map_err(|e| self.io(peer, "notify", e))?;
        self.reply(peer, Kind::NotifyAck, rid)?;
        Ok(())
    }

    /// Pins ranges of the peer for a cma transfer; returns the lease id.
    pub fn pin(
        &mut self,
        peer: &str,
        instance: u64,
        ranges: &[wire::Range],
        deadline: Instant,
    ) -> Result<u64> {
        self.arm(deadline).map_err(|e| self.io(peer, "pin", e))?;
        let t = wire::encode_table(instance, ranges);
        let rid = self.id();
        self.send(&FrameHeader::new(Kind::Pin, rid, t.len() as u64), &[&t])
            .map_err(|e| self.io(peer, "pin", e))?;
        let (_, p) = self.reply(peer, Kind::PinOk, rid)?;
        let id: [u8; 8] = p.as_slice().try_into().map_err(|_| Error::Protocol {
            peer: peer.to_owned(),
            detail: "PIN_OK payload is not 8 bytes".into(),
        })?;
        Ok(u64::from_le_bytes(id))
    }

    /// Asks for `slots` slots of the peer's cma lease board for this
    /// connection; returns the grant and the slot indexes.
    pub fn lease_board(
        &mut self,
        peer: &str,
        instance: u64,
        slots: u32,
        deadline: Instant,
    ) -> Result<(wire::BoardGrant, Vec<u32>)> {
        self.arm(deadline)
            .map_err(|e| self.io(peer, "lease board", e))?;
        let req = wire::BoardRequest {
            target_instance: instance,
            slots,
            pid: std::process::id(),
        };
        let rid = self.id();
        let h = FrameHeader::new(
            Kind::LeaseBoard,
            rid,
            std::mem::size_of::<wire::BoardRequest>() as u64,
        );
        self.send(&h, &[bytemuck::bytes_of(&req)])
            .map_err(|e| self.io(peer, "lease board", e))?;
        let (_, p) = self.reply(peer, Kind::LeaseBoardGrant, rid)?;
        wire::decode_grant(&p).map_err(|d| Error::Protocol {
            peer: peer.to_owned(),
            detail: d,
        })
    }

    /// The peer's regions and the lease board epoch they are stamped with.
    pub fn lease_regions(
        &mut self,
        peer: &str,
        instance: u64,
        deadline: Instant,
    ) -> Result<(u64, Vec<wire::Range>)> {
        self.arm(deadline)
            .map_err(|e| self.io(peer, "lease regions", e))?;
        let rid = self.id();
        self.send(
            &FrameHeader::new(Kind::LeaseRegions, rid, 8),
            &[&instance.to_le_bytes()],
        )
        .map_err(|e| self.io(peer, "lease regions", e))?;
        let (_, p) = self.reply(peer, Kind::LeaseRegionsReply, rid)?;
        wire::decode_lease_regions(&p).map_err(|d| Error::Protocol {
            peer: peer.to_owned(),
            detail: d,
        })
    }

    /// Releases a lease; no reply (the next request on this lane follows it).
    pub fn unpin(&mut self, peer: &str, lease: u64) -> Result<()> {
        let rid = self.id();
        self.send(
            &FrameHeader::new(Kind::Unpin, rid, 8),
            &[&lease.to_le_bytes()],
        )
        .map_err(|e| self.io(peer, "unpin", e))
    }

    /// Sends request `r` (READ table, or WRITE table + data).
    fn send_request(
        &mut self,
        peer: &str,
        opcode: Opcode,
        instance: u64,
        slices: &[Slice],
        rid: u64,
    ) -> Result<()> {
        let ranges: Vec<wire::Range> = slices
            .iter()
            .map(|s| wire::Range {
                addr: s.remote,
                len: s.len,
            })
            .collect();
        let table = wire::encode_table(instance, &ranges);
        let data: u64 = slices.iter().map(|s| s.len).sum();
        let r = match opcode {
            Opcode::Read => self.send(
                &FrameHeader::new(Kind::Read, rid, table.len() as u64),
                &[&table],
            ),
            Opcode::Write => {
                let h = FrameHeader::new(Kind::Write, rid, table.len() as u64 + data);
                let local: Vec<RawRange> = slices
                    .iter()
                    .map(|s| RawRange {
                        addr: s.local,
                        len: s.len,
                    })
                    .collect();
                // SAFETY: the local side of every slice is inside a region
                // the plan pinned for the whole job.
                unsafe {
                    self.stream.send_ranges(
                        &[bytemuck::bytes_of(&h), &table],
                        &local,
                        self.deadline,
                    )
                }
            }
        };
        r.map_err(|e| self.io(peer, "sending a request", e))
    }

    /// Receives the reply to a request sent by `send_request`.
    fn finish_request(
        &mut self,
        peer: &str,
        opcode: Opcode,
        slices: &[Slice],
        rid: u64,
    ) -> Result<()> {
        match opcode {
            Opcode::Read => {
                let (h, _) = self.reply(peer, Kind::ReadData, rid)?;
                let total: u64 = slices.iter().map(|s| s.len).sum();
                if h.payload_len != total {
                    return Err(Error::Protocol {
                        peer: peer.to_owned(),
                        detail: format!(
                            "READ_DATA of {} bytes for a request of {total}",
                            h.payload_len
                        ),
                    });
                }
                let local: Vec<RawRange> = slices
                    .iter()
                    .map(|s| RawRange {
                        addr: s.local,
                        len: s.len,
                    })
                    .collect();
                // SAFETY: the local side of every slice is inside a region
                // the plan pinned for the whole job; only the kernel writes it.
                unsafe { self.stream.recv_ranges(&local, self.deadline) }
                    .map_err(|e| self.io(peer, "receiving data", e))
            }
            Opcode::Write => self.reply(peer, Kind::WriteAck, rid).map(|_| ()),
        }
    }
}

/// Whether an error leaves the connection in step (a refused request) or
/// not (I/O, protocol, timeout).
fn conn_survives(e: &Error) -> bool {
    matches!(
        e,
        Error::RequestRefused { .. } | Error::PeerRestarted { .. }
    )
}

/// Connections to one peer.
#[derive(Debug)]
pub struct TcpTransport {
    peer: PeerAddr,
    name: String,
    me: ClientIdentity,
    /// The peer instance our plans were made against.
    instance: AtomicU64,
    lanes: Vec<Mutex<Option<Conn>>>,
    /// The lane a job waits for when every lane is busy (round robin).
    next_lane: std::sync::atomic::AtomicUsize,
}

impl TcpTransport {
    pub fn new(peer: PeerAddr, me: ClientIdentity, lanes: usize) -> TcpTransport {
        TcpTransport {
            name: peer.to_string(),
            peer,
            me,
            instance: AtomicU64::new(0),
            lanes: (0..lanes.max(1)).map(|_| Mutex::new(None)).collect(),
            next_lane: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    pub fn peer_name(&self) -> &str {
        &self.name
    }

    /// The peer instance the current plans are made against.
    pub fn instance(&self) -> u64 {
        self.instance.load(Ordering::Acquire)
    }

    /// A connection of its own (not a lane) to the instance the plans are
    /// made against.
    pub fn open_conn(&self) -> Result<Conn> {
        let (conn, instance) = Conn::open(&self.peer, &self.me)?;
        let expected = self.instance();
        if instance != expected {
            return Err(Error::PeerRestarted {
                peer: self.name.clone(),
                detail: format!("instance {expected:#x} is gone; {instance:#x} answers now"),
            });
        }
        Ok(conn)
    }

    /// Runs `f` on lane `i`'s connection, opening it if needed. A new
    /// connection to a different instance than the plans were made for
    /// fails with `PeerRestarted` (the caller refreshes the segment).
    /// Errors that leave the stream out of step drop the connection.
    pub fn with_lane<T>(&self, i: usize, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        let guard = self.lanes[i % self.lanes.len()].lock();
        self.use_lane(guard, f)
    }

    /// Like `with_lane`, on the lowest lane no other job holds when there is
    /// one (else waits for one in turn), so concurrent small batches from
    /// many threads do not queue behind each other. `f` gets the lane's index.
    ///
    /// Lowest, not round robin: back-to-back batches of one thread then
    /// stay on one connection, whose handler at the target is still polling
    /// for the next request. Spread round robin, each handler saw a gap of
    /// several batches, fell asleep and paid a vCPU wake-up per batch
    /// (32 x 16 KiB over tcp: p50 100 us instead of 56 us on the test VM).
    pub fn with_free_lane<T>(&self, f: impl FnOnce(usize, &mut Conn) -> Result<T>) -> Result<T> {
        for (i, lane) in self.lanes.iter().enumerate() {
            if let Some(guard) = lane.try_lock() {
                return self.use_lane(guard, |c| f(i, c));
            }
        }
        let i = self.next_lane.fetch_add(1, Ordering::Relaxed) % self.lanes.len();
        let guard = self.lanes[i].lock();
        self.use_lane(guard, |c| f(i, c))
    }

    /// Has the peer check and pin `ranges` (PIN, up to `MAX_ENTRIES` ranges
    /// a request), for a copy that bypasses this connection: cma and the
    /// device transports. A lease lives on the connection that took it, so
    /// each comes back as (lane, lease id), for `release_leases`. On an
    /// error, the leases already taken are released.
    pub fn lease(&self, ranges: &[wire::Range], deadline: Instant) -> Result<Vec<(usize, u64)>> {
        let mut leases = Vec::new();
        for chunk in ranges.chunks(wire::MAX_ENTRIES) {
            let instance = self.instance();
            let r = self.with_free_lane(|lane, c| {
                c.pin(&self.name, instance, chunk, deadline)
                    .map(|id| (lane, id))
            });
            match r {
                Ok(l) => leases.push(l),
                Err(e) => {
                    self.release_leases(&leases);
                    return Err(e);
                }
            }
        }
        Ok(leases)
    }

    /// Releases leases from `lease`. A failure only logs: the peer drops a
    /// connection's leases when it closes.
    pub fn release_leases(&self, leases: &[(usize, u64)]) {
        for &(lane, l) in leases {
            if let Err(e) = self.with_lane(lane, |c| c.unpin(&self.name, l)) {
                log::debug!("kvferry: releasing lease {l} at {}: {e}", self.name);
            }
        }
    }

    fn use_lane<T>(
        &self,
        mut guard: parking_lot::MutexGuard<'_, Option<Conn>>,
        f: impl FnOnce(&mut Conn) -> Result<T>,
    ) -> Result<T> {
        if guard.is_none() {
            let (conn, instance) = Conn::open(&self.peer, &self.me)?;
            let expected = self.instance();
            if expected != 0 && instance != expected {
                return Err(Error::PeerRestarted {
                    peer: self.name.clone(),
                    detail: format!("instance {expected:#x} is gone; {instance:#x} answers now"),
                });
            }
            *guard = Some(conn);
        }
        let Some(conn) = guard.as_mut() else {
            return Err(Error::Internal {
                what: "lane vanished".into(),
            });
        };
        let r = f(conn);
        if let Err(e) = &r
            && !conn_survives(e)
        {
            *guard = None;
        }
        r
    }

    /// Fetches the segment on a fresh view: forgets the expected instance,
    /// so connections to a restarted peer are accepted again.
    pub fn fetch(&self, deadline: Instant) -> Result<Segment> {
        let seg = self.with_lane(0, |c| c.get_segment(&self.name, deadline));
        let seg = match seg {
            Err(Error::PeerRestarted { .. }) => {
                // Reconnect to whoever answers now; its segment is the truth.
                self.instance.store(0, Ordering::Release);
                for lane in &self.lanes {
                    *lane.lock() = None;
                }
                self.with_lane(0, |c| c.get_segment(&self.name, deadline))?
            }
            other => other?,
        };
        let old = self.instance.swap(seg.instance_id, Ordering::AcqRel);
        if old != 0 && old != seg.instance_id {
            // Lanes still open to the old instance are dead anyway; drop them.
            for lane in self.lanes.iter().skip(1) {
                *lane.lock() = None;
            }
        }
        Ok(seg)
    }

    /// Runs requests on one lane, pipelined `WINDOW` deep, taking each from
    /// `claims` when the window has room. Every request it takes is
    /// reported once; an error that breaks the connection also stops every
    /// lane from taking more.
    fn run_lane(
        &self,
        lane: Option<usize>,
        job: &Job<'_>,
        claims: &Claims<'_>,
        report: Report<'_>,
    ) {
        let instance = self.instance();
        // Requests sent and not yet answered, oldest first, with their ids.
        let mut in_flight: VecDeque<((usize, usize), u64)> = VecDeque::with_capacity(WINDOW);
        let mut body = |conn: &mut Conn| {
            conn.arm(job.deadline)
                .map_err(|e| conn.io(&self.name, "transfer", e))?;
            loop {
                while in_flight.len() < WINDOW {
                    let Some((a, b)) = claims.take() else { break };
                    let rid = conn.id();
                    // Counted before it is sent: a failed send reports it.
                    in_flight.push_back(((a, b), rid));
                    conn.send_request(&self.name, job.opcode, instance, &job.slices[a..b], rid)?;
                }
                let Some(&((a, b), rid)) = in_flight.front() else {
                    return Ok(());
                };
                match conn.finish_request(&self.name, job.opcode, &job.slices[a..b], rid) {
                    Ok(()) => (a..b).for_each(|i| report(i, Ok(()))),
                    // A refused request: the stream is still in step.
                    Err(e) if conn_survives(&e) => (a..b).for_each(|i| report(i, Err(e.clone()))),
                    Err(e) => return Err(e),
                }
                in_flight.pop_front();
            }
        };
        // One lane given: that one; none: whichever is free.
        let r = match lane {
            Some(i) => self.with_lane(i, body),
            None => self.with_free_lane(|_, c| body(c)),
        };
        if let Err(e) = r {
            for ((a, b), _) in in_flight {
                (a..b).for_each(|i| report(i, Err(e.clone())));
            }
            claims.stop(e);
        }
    }
}

/// The requests of one job, taken in order by whichever lane has room in
/// its window. A lane that gets more CPU takes more of them, so the lanes
/// end together; dealt out in advance, one lane often finished its share
/// alone while the other's CPU idled.
#[derive(Debug)]
struct Claims<'a> {
    requests: &'a [(usize, usize)],
    next: AtomicUsize,
    /// The first error that broke a lane: no lane takes a request after
    /// it, and the requests nobody took fail with it.
    stopped: Mutex<Option<Error>>,
}

impl<'a> Claims<'a> {
    fn new(requests: &'a [(usize, usize)]) -> Claims<'a> {
        Claims {
            requests,
            next: AtomicUsize::new(0),
            stopped: Mutex::new(None),
        }
    }

    /// The next request nobody took, unless a lane broke.
    fn take(&self) -> Option<(usize, usize)> {
        if self.stopped.lock().is_some() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.requests.get(i).copied()
    }

    /// Stops the taking after `e` broke a lane (the first error is kept).
    fn stop(&self, e: Error) {
        self.stopped.lock().get_or_insert(e);
    }

    /// Reports the requests nobody took: none when no lane broke.
    fn report_untaken(&self, report: Report<'_>) {
        let Some(e) = self.stopped.lock().take() else {
            return;
        };
        let from = self.next.load(Ordering::Relaxed).min(self.requests.len());
        for &(a, b) in &self.requests[from..] {
            (a..b).for_each(|i| report(i, Err(e.clone())));
        }
    }
}

impl Transport for TcpTransport {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn fetch_segment(&self) -> Result<Segment> {
        self.fetch(net::deadline_after(
            self.me.connect_timeout.saturating_mul(2),
        ))
    }

    fn notify(&self, from: &str, message: &[u8], deadline: Instant) -> Result<()> {
        self.with_free_lane(|_, c| c.notify(&self.name, from, message, deadline))
    }

    fn run(&self, job: &Job<'_>, report: Report<'_>) {
        // Cut the slices into requests of up to REQUEST_BYTES.
        let mut requests: Vec<(usize, usize)> = Vec::new();
        let (mut start, mut bytes) = (0usize, 0u64);
        for (i, s) in job.slices.iter().enumerate() {
            if i > start && (bytes + s.len > REQUEST_BYTES || i - start >= wire::MAX_ENTRIES) {
                requests.push((start, i));
                start = i;
                bytes = 0;
            }
            bytes += s.len;
        }
        if start < job.slices.len() {
            requests.push((start, job.slices.len()));
        }
        let total: u64 = job.slices.iter().map(|s| s.len).sum();
        // No more lanes than CPUs: each lane is a thread copying at both
        // ends; more of them only take turns. Measured on the 2-vCPU test
        // guest before this cap (`KVFERRY_LANES=2` and `=4 kvferry bench
        // --transport tcp --block-size 1M --batch-size 32 --layout
        // contiguous`, and 4M): 2 lanes 4.3 / 4.5-4.7 GB/s, 4 lanes
        // 4.1-4.3 / 4.2.
        let lanes = if total < PARALLEL_MIN_BYTES {
            1
        } else {
            self.lanes
                .len()
                .min(requests.len())
                .min(crate::spin::cpus())
        };
        let claims = Claims::new(&requests);
        if lanes <= 1 {
            self.run_lane(None, job, &claims, report);
        } else {
            // The caller's thread runs lane 0.
            std::thread::scope(|scope| {
                for l in 1..lanes {
                    let claims = &claims;
                    scope.spawn(move || self.run_lane(Some(l), job, claims, report));
                }
                self.run_lane(Some(0), job, &claims, report);
            });
        }
        claims.report_untaken(report);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_refused_request_or_a_restart_keeps_the_connection() {
        let peer = "p:1".to_owned();
        assert!(conn_survives(&Error::RequestRefused {
            peer: peer.clone(),
            message: "range 0".into(),
        }));
        assert!(conn_survives(&Error::PeerRestarted {
            peer: peer.clone(),
            detail: "new instance".into(),
        }));
        // A failure whose text happens to read like a refusal is not one.
        assert!(!conn_survives(&Error::TransferFailed {
            peer: peer.clone(),
            reason: "the target refused the request: but this is I/O".into(),
        }));
        assert!(!conn_survives(&Error::Protocol {
            peer,
            detail: "bad frame".into(),
        }));
    }

    fn lane_broke(n: u32) -> Error {
        Error::TransferFailed {
            peer: "p:1".into(),
            reason: format!("lane {n} broke"),
        }
    }

    #[test]
    fn lanes_take_requests_in_order_until_one_breaks() {
        let requests = [(0, 2), (2, 3), (3, 5), (5, 6)];
        let claims = Claims::new(&requests);
        assert_eq!(claims.take(), Some((0, 2)));
        assert_eq!(claims.take(), Some((2, 3)));
        claims.stop(lane_broke(1));
        // A second break does not replace the first error.
        claims.stop(lane_broke(2));
        assert_eq!(claims.take(), None, "no lane takes a request after a break");
        let reported = Mutex::new(Vec::new());
        claims.report_untaken(&|i, r: Result<()>| reported.lock().push((i, r)));
        let reported = reported.into_inner();
        let slices: Vec<usize> = reported.iter().map(|(i, _)| *i).collect();
        assert_eq!(
            slices,
            [3, 4, 5],
            "every slice of the untaken requests, once"
        );
        for (_, r) in &reported {
            assert_eq!(
                r.as_ref().unwrap_err().to_string(),
                lane_broke(1).to_string()
            );
        }
    }

    #[test]
    fn a_job_no_lane_broke_reports_nothing_untaken() {
        let requests = [(0, 1), (1, 2)];
        let claims = Claims::new(&requests);
        while claims.take().is_some() {}
        // Taking past the end stays past the end.
        assert_eq!(claims.take(), None);
        let reported = Mutex::new(0);
        claims.report_untaken(&|_, _| *reported.lock() += 1);
        assert_eq!(*reported.lock(), 0);
    }
}
