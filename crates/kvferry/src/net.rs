//! Socket helpers shared by the server and the network transports: raw
//! vectored I/O straight between sockets and registered memory under a
//! deadline per operation ([`Stream`]), the hello handshake's shared-secret
//! proofs.

use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use bytemuck::Zeroable;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::spin;
use crate::wire::{FrameHeader, HEADER_LEN};

/// Most iovecs one readv / writev takes (Linux IOV_MAX).
pub const IOV_MAX: usize = 1024;

/// Fills `buf` from the kernel's random source.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    let mut got = 0;
    while got < N {
        // SAFETY: writes at most N - got bytes into the rest of `buf`.
        let n = unsafe { libc::getrandom(buf[got..].as_mut_ptr().cast(), N - got, 0) };
        if n > 0 {
            got += n as usize;
        } else if std::io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            // No kernel randomness (very old kernels): fall back to mixing
            // the clock; nonces then only need to be unique, which this is.
            let x = crate::segment::random_instance_id().to_le_bytes();
            for (i, b) in buf.iter_mut().enumerate() {
                *b ^= x[i % 8];
            }
            break;
        }
    }
    buf
}

/// HMAC-SHA256 of `parts` under `secret`.
pub fn proof(secret: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return [0; 32]; // HMAC takes keys of any length; unreachable
    };
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Constant-time check of a proof.
pub fn proof_ok(secret: &[u8], parts: &[&[u8]], got: &[u8; 32]) -> bool {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    for p in parts {
        mac.update(p);
    }
    mac.verify_slice(got).is_ok()
}

/// `now + after`, or a year from now when that does not fit an `Instant`
/// (a timeout of `u64::MAX` ms from the configuration).
pub fn deadline_after(after: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(after)
        .unwrap_or(now + Duration::from_secs(86400 * 365))
}

/// Waits up to `timeout` for `stream` to have something to read (data, or
/// the peer's end of stream). One `poll`, instead of changing the socket's
/// timeout around a peek: the server's idle wait costs one syscall per frame.
pub fn wait_readable(stream: &TcpStream, timeout: Duration) -> io::Result<bool> {
    wait_fd(stream.as_raw_fd(), libc::POLLIN, timeout)
}

pub(crate) fn wait_fd(
    fd: libc::c_int,
    events: libc::c_short,
    timeout: Duration,
) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `pfd` is one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(n > 0)
}

/// Polls `stream` for something to read for up to `spin::SPIN_BEFORE_SLEEP`
/// without sleeping. `true` when it became readable; `false` at once when
/// polling does not pay now (`spin::polling_pays`).
pub fn spin_until_readable(stream: &TcpStream) -> io::Result<bool> {
    spin_fd(stream.as_raw_fd(), libc::POLLIN)
}

fn spin_fd(fd: libc::c_int, events: libc::c_short) -> io::Result<bool> {
    let mut failed = None;
    let ready = spin::poll_briefly(|| match wait_fd(fd, events, Duration::ZERO) {
        Ok(ready) => ready,
        Err(e) => {
            failed = Some(e);
            true // stops the polling
        }
    });
    match failed {
        Some(e) => Err(e),
        None => Ok(ready),
    }
}

/// Data receives at least this large first turn on TCP_QUICKACK.
///
/// A connection that answers each request soon after it arrives looks
/// interactive to Linux ("pingpong" mode), which then delays its ACKs,
/// hoping to piggyback them on the next request. For a reply of
/// megabytes that starves the sender: its send buffer fills with unacked
/// data and it waits, batch after batch. TCP_QUICKACK leaves that mode
/// for the data that follows (the kernel re-enters it on its own, hence
/// once per receive). Measured with `kvferry bench --transport tcp
/// --block-size 128K --batch-size 32 --layout contiguous` (one 4 MiB reply
/// per batch) on the 2-vCPU test guest: reads 4.3-4.6 -> 5.7-5.8 GB/s,
/// writes 4.8-4.9 -> 5.6-5.8 (iperf3 on the same loopback: 5.9). Replies
/// of 32 x 16 KiB gained nothing and pay a syscall, hence the floor.
pub const QUICK_ACK_MIN_BYTES: u64 = 1 << 20;

/// Has the kernel ACK what arrives on `stream` at once (TCP_QUICKACK); a
/// failure only costs speed.
fn quick_ack(stream: &TcpStream) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a descriptor `stream` owns, with a pointer to
    // an int and its size.
    let _ = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// A raw memory range for vectored I/O.
#[derive(Debug, Clone, Copy)]
pub struct RawRange {
    pub addr: u64,
    pub len: u64,
}

/// The iovecs `Stream::write_frame` keeps on the stack: the header and up
/// to 7 payload pieces (kvferry's own frames have at most one).
const FRAME_IOVS: usize = 8;

/// An iovec over `len` bytes at `addr`.
fn iov(addr: *const u8, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: len,
    }
}

/// A connected socket whose operations (a frame, a reply) are bounded by a
/// deadline for the whole operation, not per call.
///
/// The socket's own timeouts (`SO_RCVTIMEO`, `SO_SNDTIMEO`) bound one
/// blocking call each: a peer that sends (or takes) one byte before each
/// runs out would keep an operation going forever. So every call is first
/// made without blocking, and only one that would block looks at the
/// deadline: past it, the operation fails with `TimedOut`; otherwise, when
/// the timeout set last differs from what is left by more than 1/64 of it,
/// the timeout is set to what is left (one `setsockopt`), and a blocking
/// call that ran out before the deadline (a timeout left short by an
/// earlier operation) is made again. Data that arrives promptly costs no
/// syscall for the deadline; an operation ends at most 1/64 of its time
/// after its deadline.
#[derive(Debug)]
pub struct Stream {
    stream: TcpStream,
    /// `SO_RCVTIMEO` as last set here (`None`: not yet: blocking forever).
    recv_timeout: Option<Duration>,
    /// `SO_SNDTIMEO` as last set here.
    send_timeout: Option<Duration>,
}

impl Stream {
    pub fn new(stream: TcpStream) -> Stream {
        Stream {
            stream,
            recv_timeout: None,
            send_timeout: None,
        }
    }

    pub fn get_ref(&self) -> &TcpStream {
        &self.stream
    }

    /// Before a call that blocks: fails with `TimedOut` past `deadline`,
    /// else makes the socket timeout of that direction what is left, unless
    /// it is within 1/64 of that already.
    fn bound(&mut self, send: bool, deadline: Instant) -> io::Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "deadline reached before the operation completed",
            ));
        }
        let set = if send {
            &mut self.send_timeout
        } else {
            &mut self.recv_timeout
        };
        if set.is_some_and(|t| t.abs_diff(left) <= left / 64) {
            return Ok(());
        }
        // 0 would mean "no timeout" to the kernel.
        let t = left.max(Duration::from_millis(1));
        if send {
            self.stream.set_write_timeout(Some(t))?;
        } else {
            self.stream.set_read_timeout(Some(t))?;
        }
        *set = Some(t);
        Ok(())
    }

    /// One sendmsg / recvmsg of `iov`: the number of bytes moved (0 on
    /// receive: the peer closed). A call that would block is first retried
    /// while polling for up to `spin::SPIN_BEFORE_SLEEP`, when polling pays
    /// (the peer drains or fills the socket within microseconds
    /// mid-transfer; sleeping instead costs a wake-up), and only then made
    /// blocking, bounded by `deadline`. `spun`: the caller polled already
    /// in vain, or chose not to: block at once.
    ///
    /// # Safety
    /// The iovecs must point at memory valid for the direction: readable to
    /// send, writable (and not read by Rust code meanwhile) to receive.
    unsafe fn transfer(
        &mut self,
        iov: &[libc::iovec],
        send: bool,
        deadline: Instant,
        spun: bool,
    ) -> io::Result<usize> {
        let fd = self.stream.as_raw_fd();
        let call = |flags: libc::c_int| {
            // SAFETY: msghdr is a plain C struct for which all-zero is valid
            // (no name, no control data, no iovecs until set below).
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = iov.len() as _;
            // SAFETY: `msg` points at `iov`, valid per the caller's contract.
            let n = unsafe {
                if send {
                    libc::sendmsg(fd, &msg, flags | libc::MSG_NOSIGNAL)
                } else {
                    libc::recvmsg(fd, &mut msg, flags)
                }
            };
            if n >= 0 {
                Ok(n as usize)
            } else {
                Err(io::Error::last_os_error())
            }
        };
        let would_block =
            |r: &io::Result<usize>| matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        if !spun {
            let r = call(libc::MSG_DONTWAIT);
            if !would_block(&r) {
                return r;
            }
            let events = if send { libc::POLLOUT } else { libc::POLLIN };
            if matches!(spin_fd(fd, events), Ok(true)) {
                let r = call(libc::MSG_DONTWAIT);
                if !would_block(&r) {
                    return r;
                }
            }
        }
        loop {
            self.bound(send, deadline)?;
            let r = call(0);
            // The socket timeout ran out: the deadline has passed (the next
            // `bound` says so), or it was left shorter by an earlier one.
            if !would_block(&r) {
                return r;
            }
        }
    }

    /// Moves every byte of `iov` (send or receive) by `deadline`, up to
    /// `IOV_MAX` iovecs per call, resuming after partial transfers. Returns
    /// the bytes moved: fewer than asked only when receiving and the peer
    /// closed the connection. `spun`: as for `transfer`, for the first call.
    ///
    /// # Safety
    /// As `transfer`, for the whole call.
    unsafe fn transfer_all(
        &mut self,
        iov: &mut [libc::iovec],
        send: bool,
        deadline: Instant,
        spun: bool,
    ) -> io::Result<u64> {
        let mut moved = 0;
        // SAFETY: forwarded to the caller.
        unsafe { self.transfer_counted(iov, send, deadline, spun, &mut moved) }?;
        Ok(moved)
    }

    /// `transfer_all`, counting the bytes moved in `moved` as they go, so
    /// that a caller still knows how far it got when it fails.
    ///
    /// # Safety
    /// As `transfer`, for the whole call.
    unsafe fn transfer_counted(
        &mut self,
        iov: &mut [libc::iovec],
        send: bool,
        deadline: Instant,
        mut spun: bool,
        moved: &mut u64,
    ) -> io::Result<()> {
        let mut start = 0;
        advance(iov, &mut start, 0);
        while start < iov.len() {
            let n_iov = (iov.len() - start).min(IOV_MAX);
            let iov_now = &iov[start..start + n_iov];
            // SAFETY: forwarded to the caller.
            let r = unsafe { self.transfer(iov_now, send, deadline, std::mem::take(&mut spun)) };
            let n = match r {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                if send {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "peer stopped reading",
                    ));
                }
                break;
            }
            *moved += n as u64;
            advance(iov, &mut start, n);
        }
        Ok(())
    }

    /// Receives into all of `buf` by `deadline`; returns the bytes received
    /// (fewer only when the peer closed the connection).
    fn recv_into(&mut self, buf: &mut [u8], deadline: Instant, spun: bool) -> io::Result<u64> {
        let mut one = [iov(buf.as_mut_ptr(), buf.len())];
        // SAFETY: the iovec is `buf`, borrowed mutably for the call.
        unsafe { self.transfer_all(&mut one, false, deadline, spun) }
    }

    /// Reads one frame header by `deadline`, its first byte there or about
    /// to be. `Ok(None)` on a clean end of stream before its first byte.
    pub fn read_header(&mut self, deadline: Instant) -> io::Result<Option<FrameHeader>> {
        self.header(deadline, false)
    }

    /// Reads the header of a reply to a request just sent, by `deadline`:
    /// polls for up to `spin::SPIN_BEFORE_SLEEP` (when polling pays), then
    /// sleeps in the read (a reply is never there at once: trying first
    /// would cost a syscall).
    pub fn await_header(&mut self, deadline: Instant) -> io::Result<Option<FrameHeader>> {
        let ready = spin_until_readable(&self.stream)?;
        self.header(deadline, !ready)
    }

    fn header(&mut self, deadline: Instant, spun: bool) -> io::Result<Option<FrameHeader>> {
        let mut h = FrameHeader::zeroed();
        match self.recv_into(bytemuck::bytes_of_mut(&mut h), deadline, spun)? {
            0 => Ok(None),
            n if n as usize == HEADER_LEN => Ok(Some(h)),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "truncated frame header",
            )),
        }
    }

    /// Reads a small payload of `len` bytes into a fresh buffer by `deadline`.
    pub fn read_payload(&mut self, len: u64, deadline: Instant) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        if self.recv_into(&mut buf, deadline, false)? < len {
            return Err(truncated());
        }
        Ok(buf)
    }

    /// Reads and discards `n` bytes (a refused WRITE's data) by `deadline`,
    /// keeping the stream in step.
    pub fn discard(&mut self, mut n: u64, deadline: Instant) -> io::Result<()> {
        let mut buf = vec![0u8; (n as usize).min(64 << 10)];
        while n > 0 {
            let k = (n as usize).min(buf.len());
            if self.recv_into(&mut buf[..k], deadline, false)? < k as u64 {
                return Err(truncated());
            }
            n -= k as u64;
        }
        Ok(())
    }

    /// Sends a frame: `header` then the `payload` pieces, by `deadline`.
    /// Its iovecs are on the stack (every frame is sent this way, most of
    /// them small control replies); only a frame of more than
    /// `FRAME_IOVS - 1` pieces allocates them.
    pub fn write_frame(
        &mut self,
        header: &FrameHeader,
        payload: &[&[u8]],
        deadline: Instant,
    ) -> io::Result<()> {
        let head: &[u8] = bytemuck::bytes_of(header);
        let pieces = std::iter::once(head)
            .chain(payload.iter().copied())
            .map(|p| iov(p.as_ptr(), p.len()));
        let mut on_stack = [iov(std::ptr::null(), 0); FRAME_IOVS];
        let mut on_heap: Vec<libc::iovec>;
        let iovs: &mut [libc::iovec] = if payload.len() < FRAME_IOVS {
            for (slot, v) in on_stack.iter_mut().zip(pieces) {
                *slot = v;
            }
            &mut on_stack[..=payload.len()]
        } else {
            on_heap = pieces.collect();
            &mut on_heap
        };
        // SAFETY: the iovecs point at `header` and `payload`, borrowed for
        // the call; sending only reads them.
        unsafe { self.transfer_all(iovs, true, deadline, false) }.map(|_| ())
    }

    /// Sends `head` then the bytes of `ranges` with writev, no copies, by
    /// `deadline`. A range the kernel cannot read fails with [`RangeFault`],
    /// whose `moved` bytes (`head` included) went out.
    ///
    /// # Safety
    /// Every range must be readable for its length for the whole call
    /// (pinned registered memory).
    pub unsafe fn send_ranges(
        &mut self,
        head: &[&[u8]],
        ranges: &[RawRange],
        deadline: Instant,
    ) -> io::Result<()> {
        let mut iovs: Vec<libc::iovec> = head
            .iter()
            .map(|h| iov(h.as_ptr(), h.len()))
            .chain(
                ranges
                    .iter()
                    .map(|r| iov(r.addr as *const u8, r.len as usize)),
            )
            .collect();
        let mut moved = 0;
        let _moving = spin::Moving::enter();
        // SAFETY: the iovecs point at `head` (borrowed for the call) and at
        // ranges the caller guarantees readable; sending only reads them.
        unsafe { self.transfer_counted(&mut iovs, true, deadline, false, &mut moved) }
            .map_err(|e| RangeFault::wrap(e, moved))
    }

    /// Receives exactly the bytes of `ranges` with readv, straight into
    /// them, by `deadline`. A range the kernel cannot write fails with
    /// [`RangeFault`]; the data from there on is still in the socket.
    ///
    /// # Safety
    /// Every range must be writable for its length for the whole call
    /// (pinned registered memory) and not be read by Rust code meanwhile.
    pub unsafe fn recv_ranges(&mut self, ranges: &[RawRange], deadline: Instant) -> io::Result<()> {
        let mut total = 0u64;
        let mut iovs: Vec<libc::iovec> = ranges
            .iter()
            .map(|r| {
                total += r.len;
                iov(r.addr as *const u8, r.len as usize)
            })
            .collect();
        if total >= QUICK_ACK_MIN_BYTES {
            quick_ack(&self.stream);
        }
        let mut moved = 0;
        let _moving = spin::Moving::enter();
        // SAFETY: the iovecs point at ranges the caller guarantees writable.
        unsafe { self.transfer_counted(&mut iovs, false, deadline, false, &mut moved) }
            .map_err(|e| RangeFault::wrap(e, moved))?;
        if moved < total {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed the connection mid-transfer",
            ));
        }
        Ok(())
    }
}

/// Why `send_ranges` or `recv_ranges` stopped: the kernel could not read
/// (send) or write (receive) the memory of a range, EFAULT. Registered
/// memory does that only when its owner unmapped it (or took away the
/// access) without unregistering it first; the caller can say so, and
/// where, rather than only "Bad address".
///
/// `moved`: the bytes sent or received before the fault (on send, `head`
/// included). The fault lies at or after that offset of the data: the
/// kernel counts no byte of the piece it was copying when it faulted.
/// Linux TCP leaves that piece and everything after it in the socket on a
/// receive, so the rest of a frame can be read and dropped to keep the
/// stream in step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeFault {
    pub moved: u64,
}

impl RangeFault {
    /// `e` as a fault after `moved` bytes, if it is EFAULT; else `e`.
    fn wrap(e: io::Error, moved: u64) -> io::Error {
        if e.raw_os_error() == Some(libc::EFAULT) {
            io::Error::other(RangeFault { moved })
        } else {
            e
        }
    }

    /// The fault `e` reports, if it is one.
    pub fn of(e: &io::Error) -> Option<RangeFault> {
        e.get_ref()?.downcast_ref::<RangeFault>().copied()
    }
}

impl std::fmt::Display for RangeFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "registered memory faulted (EFAULT) after {} bytes: it is no longer mapped, or no longer readable and writable",
            self.moved
        )
    }
}

impl std::error::Error for RangeFault {}

fn truncated() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "truncated frame")
}

/// Moves past `n` transferred bytes of `iov[start..]`, and past empty
/// iovecs after them.
fn advance(iov: &mut [libc::iovec], start: &mut usize, mut n: usize) {
    while n > 0 && *start < iov.len() {
        let v = &mut iov[*start];
        if n >= v.iov_len {
            n -= v.iov_len;
            *start += 1;
        } else {
            // SAFETY: stays inside the same iovec (n < iov_len).
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
            n = 0;
        }
    }
    // Skip empty iovecs so the loop ends.
    while *start < iov.len() && iov[*start].iov_len == 0 {
        *start += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Kind;
    use std::io::Read;
    use std::net::TcpListener;

    /// Frames of few pieces (iovecs on the stack) and of many (on the
    /// heap) arrive byte for byte.
    #[test]
    fn frames_of_few_and_many_pieces_arrive_whole() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let mut out = Stream::new(client);
        let deadline = deadline_after(Duration::from_secs(10));
        for n in [0, 1, FRAME_IOVS - 1, FRAME_IOVS, 3 * FRAME_IOVS] {
            let pieces: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8 + 1; i + 1]).collect();
            let payload: Vec<&[u8]> = pieces.iter().map(|p| p.as_slice()).collect();
            let len = pieces.iter().map(|p| p.len()).sum::<usize>();
            let h = FrameHeader::new(Kind::Notify, n as u64, len as u64);
            out.write_frame(&h, &payload, deadline).unwrap();
            let mut got = vec![0u8; HEADER_LEN + len];
            server.read_exact(&mut got).unwrap();
            assert_eq!(&got[..HEADER_LEN], bytemuck::bytes_of(&h), "{n} pieces");
            assert_eq!(got[HEADER_LEN..], pieces.concat(), "{n} pieces");
        }
    }
}
