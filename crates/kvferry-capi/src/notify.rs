//! Notifications between engines, and what the engine says about its peers.

use std::ffi::c_char;

use kvferry_core::{Error, Status};

use crate::boundary::{self, ffi};
use crate::engine::kvf_engine;
use crate::handle;

/// Sends `len` bytes of `message` to `session`; returns once the peer has
/// queued it (Mooncake's notify). The peer reads it with `kvf_notify_recv`.
/// Fails while the peer's queue is full (65536 undrained notifications, or
/// 64 MiB of them): the last error says so.
///
/// # Safety
/// `engine` from `kvf_engine_new`; `session` NULL or NUL-terminated;
/// `message` NULL or readable for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_notify(
    engine: *const kvf_engine,
    session: *const c_char,
    message: *const u8,
    len: usize,
) -> Status {
    ffi!({
        // SAFETY: forwarded to the caller (the three below).
        let e = unsafe { handle::engine(engine) }?;
        // SAFETY: as above.
        let session = unsafe { handle::str_arg(session, "session") }?;
        // SAFETY: as above.
        let message = unsafe { handle::slice_arg(message, len, "message") }?;
        e.notify(session, message)?;
        Ok(Status::Ok)
    })
}

/// Takes the oldest received notification: the sender's session id into
/// `from_buf` and the message into `message_buf`, each NUL-terminated.
/// `*out_received` is 1 when one was taken, 0 when none is queued. When a
/// buffer is too small: `KVF_STATUS_BUFFER_TOO_SMALL`, `*out_from_len` and
/// `*out_message_len` say the lengths (without the NUL), and the
/// notification stays queued.
///
/// # Safety
/// `engine` from `kvf_engine_new`; each buffer NULL or writable for its
/// capacity; each out-pointer NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_notify_recv(
    engine: *const kvf_engine,
    from_buf: *mut c_char,
    from_capacity: usize,
    out_from_len: *mut usize,
    message_buf: *mut u8,
    message_capacity: usize,
    out_message_len: *mut usize,
    out_received: *mut i32,
) -> Status {
    ffi!({
        handle::need_out(out_received, "out_received")?;
        // SAFETY: forwarded to the caller.
        let e = unsafe { handle::engine(engine) }?;
        let lens = |from: usize, msg: usize| {
            // SAFETY: each out-pointer is NULL or writable (caller's promise).
            unsafe {
                if !out_from_len.is_null() {
                    out_from_len.write(from);
                }
                if !out_message_len.is_null() {
                    out_message_len.write(msg);
                }
            }
        };
        let fits = (
            from_capacity.saturating_sub(1),
            message_capacity.saturating_sub(1),
        );
        match e.next_notification_within(fits.0, fits.1) {
            Ok(None) => {
                lens(0, 0);
                // SAFETY: checked non-NULL above.
                unsafe { handle::out(out_received, "out_received", 0) }?;
            }
            Ok(Some(n)) => {
                // SAFETY: buffers as promised by the caller; sizes fit (checked by the engine).
                unsafe {
                    handle::copy_out(
                        n.from.as_bytes(),
                        from_buf.cast(),
                        from_capacity,
                        "from_buf",
                    )?;
                    handle::copy_out(&n.message, message_buf, message_capacity, "message_buf")?;
                }
                lens(n.from.len(), n.message.len());
                // SAFETY: checked non-NULL above.
                unsafe { handle::out(out_received, "out_received", 1) }?;
            }
            Err((from, msg)) => {
                lens(from, msg);
                return Err(Error::BufferTooSmall {
                    needed: if from + 1 > from_capacity {
                        from + 1
                    } else {
                        msg + 1
                    },
                    capacity: if from + 1 > from_capacity {
                        from_capacity
                    } else {
                        message_capacity
                    },
                });
            }
        }
        Ok(Status::Ok)
    })
}

/// The transport that carries ops to `session` ("local", "cma" or "tcp"),
/// NUL-terminated into `buf`; handshakes on first contact. `*out_len` as in
/// `kvf_engine_name`.
///
/// # Safety
/// `engine` from `kvf_engine_new`; `session` NULL or NUL-terminated; `buf`
/// NULL or writable for `capacity` bytes; `out_len` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_engine_transport_to(
    engine: *const kvf_engine,
    session: *const c_char,
    buf: *mut c_char,
    capacity: usize,
    out_len: *mut usize,
) -> Status {
    ffi!({
        // SAFETY: forwarded to the caller.
        let e = unsafe { handle::engine(engine) }?;
        // SAFETY: forwarded to the caller.
        let session = unsafe { handle::str_arg(session, "session") }?;
        let name = e.transport_to(session)?;
        if !out_len.is_null() {
            // SAFETY: non-NULL and writable (caller's promise).
            unsafe { out_len.write(name.len()) };
        }
        // SAFETY: forwarded to the caller.
        unsafe { handle::copy_out(name.as_bytes(), buf.cast(), capacity, "buf") }?;
        Ok(Status::Ok)
    })
}

/// The memory regions `session` has registered now (host and device), sorted
/// by address: their start addresses into `addrs` and lengths into `lens`,
/// `capacity` entries each, and their number into `*out_count`. Fetched from
/// the peer on every call (one round trip; handshakes on first contact), so
/// it reflects the peer's latest registrations. Mooncake's
/// `get_first_buffer_address` is `addrs[0]`.
///
/// Ask for the number first with `capacity` 0 (the arrays may then be NULL):
/// when the peer has more regions than `capacity`, nothing is written to the
/// arrays, `*out_count` says how many there are, and the call returns
/// `KVF_STATUS_BUFFER_TOO_SMALL`.
///
/// # Safety
/// `engine` from `kvf_engine_new`; `session` NULL or NUL-terminated; `addrs`
/// and `lens` NULL or writable for `capacity` elements; `out_count` NULL or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_engine_peer_regions(
    engine: *const kvf_engine,
    session: *const c_char,
    addrs: *mut u64,
    lens: *mut u64,
    capacity: usize,
    out_count: *mut usize,
) -> Status {
    ffi!({
        handle::need_out(out_count, "out_count")?;
        // SAFETY: forwarded to the caller.
        let e = unsafe { handle::engine(engine) }?;
        // SAFETY: forwarded to the caller.
        let session = unsafe { handle::str_arg(session, "session") }?;
        let regions = e.peer_regions(session)?;
        // SAFETY: checked non-NULL above; writable (caller's promise).
        unsafe { out_count.write(regions.len()) };
        if regions.len() > capacity {
            return Ok(boundary::buffer_too_small(
                "addrs and lens",
                regions.len(),
                capacity,
            ));
        }
        // Both arrays are checked (and for overlap) before either is written.
        // SAFETY: forwarded to the caller (the two arrays).
        let [a, l] = unsafe {
            handle::out_arrays([(addrs, "addrs"), (lens, "lens")], capacity, regions.len())
        }?;
        for ((a, l), r) in a.iter_mut().zip(l.iter_mut()).zip(&regions) {
            a.write(r.addr);
            l.write(r.len);
        }
        Ok(Status::Ok)
    })
}
