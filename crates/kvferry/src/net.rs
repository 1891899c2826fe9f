//! Socket helpers shared by the server and the network transports: raw
//! vectored I/O straight between sockets and registered memory, deadlines,
//! the hello handshake and its shared-secret proofs.

use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

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

/// Sets both socket timeouts to what is left before `deadline` (at least
/// 1 ms), or fails with `TimedOut` if nothing is left.
pub fn arm(stream: &TcpStream, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
    }
    let t = Some(left.max(Duration::from_millis(1)));
    stream.set_read_timeout(t)?;
    stream.set_write_timeout(t)
}

/// Waits up to `timeout` for `stream` to have something to read (data, or
/// the peer's end of stream). One `poll`, instead of changing the socket's
/// timeout around a peek: the server's idle wait costs one syscall per frame.
pub fn wait_readable(stream: &TcpStream, timeout: Duration) -> io::Result<bool> {
    wait_fd(stream.as_raw_fd(), libc::POLLIN, timeout)
}

fn wait_fd(fd: libc::c_int, events: libc::c_short, timeout: Duration) -> io::Result<bool> {
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

/// How long a thread waiting for a frame polls without sleeping.
///
/// A thread that sleeps in the kernel is woken by an interrupt to its CPU;
/// on a virtual machine whose idle vCPU halted, that wake-up alone costs
/// 40-50 us, and a request/reply round trip pays it twice. Back-to-back
/// batches reply within a few microseconds, so both ends poll this long
/// first: measured on a 2-vCPU KVM guest, a cma batch of 32 x 16 KiB went
/// from 136 us to about 45 us. The cost is at most this much CPU per frame
/// when no reply comes soon.
pub const SPIN_BEFORE_SLEEP: Duration = Duration::from_micros(50);

/// Polls `stream` for something to read for up to `SPIN_BEFORE_SLEEP`
/// without sleeping. `true` when it became readable.
pub fn spin_until_readable(stream: &TcpStream) -> io::Result<bool> {
    spin_fd(stream.as_raw_fd(), libc::POLLIN)
}

fn spin_fd(fd: libc::c_int, events: libc::c_short) -> io::Result<bool> {
    let start = Instant::now();
    loop {
        if wait_fd(fd, events, Duration::ZERO)? {
            return Ok(true);
        }
        if start.elapsed() >= SPIN_BEFORE_SLEEP {
            return Ok(false);
        }
        std::hint::spin_loop();
    }
}

/// A raw memory range for vectored I/O.
#[derive(Debug, Clone, Copy)]
pub struct RawRange {
    pub addr: u64,
    pub len: u64,
}

fn timeout_error(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(io::ErrorKind::TimedOut, "socket timed out")
    } else {
        e
    }
}

/// One sendmsg / recvmsg of `iov`. A call that would block is first
/// retried while polling for up to `SPIN_BEFORE_SLEEP` (the peer drains or
/// fills the socket within microseconds mid-transfer; sleeping instead costs
/// a wake-up), and only then made blocking (bounded by the socket timeouts).
///
/// # Safety
/// The iovecs must point at memory valid for the direction: readable to
/// send, writable (and not read by Rust code meanwhile) to receive.
unsafe fn transfer(fd: libc::c_int, iov: &[libc::iovec], send: bool) -> isize {
    let call = |flags: libc::c_int| {
        // SAFETY: msghdr is a plain C struct for which all-zero is valid
        // (no name, no control data, no iovecs until set below).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len() as _;
        // SAFETY: `msg` points at `iov`, valid per the caller's contract.
        unsafe {
            if send {
                libc::sendmsg(fd, &msg, flags | libc::MSG_NOSIGNAL)
            } else {
                libc::recvmsg(fd, &mut msg, flags)
            }
        }
    };
    let events = if send { libc::POLLOUT } else { libc::POLLIN };
    let n = call(libc::MSG_DONTWAIT);
    if n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock {
        return n;
    }
    if matches!(spin_fd(fd, events), Ok(true)) {
        let n = call(libc::MSG_DONTWAIT);
        if n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock {
            return n;
        }
    }
    call(0)
}

/// Sends `head` then the bytes of `ranges` with writev, no copies.
///
/// # Safety
/// Every range must be readable for its length for the whole call (pinned
/// registered memory).
pub unsafe fn send_ranges(
    stream: &TcpStream,
    head: &[&[u8]],
    ranges: &[RawRange],
) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    let iov: Vec<libc::iovec> = head
        .iter()
        .filter(|h| !h.is_empty())
        .map(|h| libc::iovec {
            iov_base: h.as_ptr() as *mut libc::c_void,
            iov_len: h.len(),
        })
        .chain(ranges.iter().map(|r| libc::iovec {
            iov_base: r.addr as *mut libc::c_void,
            iov_len: r.len as usize,
        }))
        .collect();
    // SAFETY: the iovecs point at `head` (borrowed for the call) and at
    // ranges the caller guarantees readable; sending only reads them.
    unsafe { transfer_all(fd, iov, true) }
}

/// Receives exactly the bytes of `ranges` with readv, straight into them.
///
/// # Safety
/// Every range must be writable for its length for the whole call (pinned
/// registered memory) and not be read by Rust code meanwhile.
pub unsafe fn recv_ranges(stream: &TcpStream, ranges: &[RawRange]) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    let iov: Vec<libc::iovec> = ranges
        .iter()
        .map(|r| libc::iovec {
            iov_base: r.addr as *mut libc::c_void,
            iov_len: r.len as usize,
        })
        .collect();
    // SAFETY: the iovecs point at ranges the caller guarantees writable.
    unsafe { transfer_all(fd, iov, false) }
}

/// Moves every byte of `iov` (send or receive), up to `IOV_MAX` iovecs per
/// call, resuming after partial transfers.
///
/// # Safety
/// As `transfer`, for the whole call.
unsafe fn transfer_all(fd: libc::c_int, mut iov: Vec<libc::iovec>, send: bool) -> io::Result<()> {
    let mut start = 0;
    while start < iov.len() {
        let n_iov = (iov.len() - start).min(IOV_MAX);
        // SAFETY: forwarded to the caller.
        let n = unsafe { transfer(fd, &iov[start..start + n_iov], send) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(timeout_error(e));
        }
        if n == 0 {
            return Err(if send {
                io::Error::new(io::ErrorKind::WriteZero, "peer stopped reading")
            } else {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed the connection mid-transfer",
                )
            });
        }
        advance(&mut iov, &mut start, n as usize);
    }
    Ok(())
}

/// Moves past `n` transferred bytes of `iov[start..]`.
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

/// Reads and discards `n` bytes (a refused WRITE's data), keeping the
/// stream in step.
pub fn discard(stream: &mut TcpStream, mut n: u64) -> io::Result<()> {
    use std::io::Read;
    let mut buf = vec![0u8; 64 << 10];
    while n > 0 {
        let k = (n as usize).min(buf.len());
        stream.read_exact(&mut buf[..k]).map_err(timeout_error)?;
        n -= k as u64;
    }
    Ok(())
}

/// `read_exact` of a small payload into a fresh buffer.
pub fn read_payload(stream: &mut TcpStream, len: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = vec![0u8; len as usize];
    stream.read_exact(&mut buf).map_err(timeout_error)?;
    Ok(buf)
}
