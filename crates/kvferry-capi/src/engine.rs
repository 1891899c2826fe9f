//! `kvf_engine`: creation, identity and memory registration.

use std::ffi::c_char;
use std::time::Duration;

use kvferry_core::{Engine, EngineConfig, Error, Status};

use crate::boundary::ffi;
use crate::config::kvf_config;
use crate::handle;
use crate::transfer::KVF_WAIT_FOREVER;

/// A transfer engine. Made by `kvf_engine_new`, freed by `kvf_engine_free`.
/// Thread-safe: every function may be called on one engine from many
/// threads at once (except `kvf_engine_free`, which must be the last call).
#[derive(Debug)]
pub struct kvf_engine {
    _private: [u8; 0],
}

/// Creates an engine in `*out`: binds its port and starts its threads.
/// `config` may be NULL (everything from the environment and defaults); it
/// is not consumed: free it with `kvf_config_free`.
///
/// # Safety
/// `config` is NULL or from `kvf_config_new`; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_engine_new(
    config: *const kvf_config,
    out: *mut *mut kvf_engine,
) -> Status {
    ffi!({
        handle::need_out(out, "out")?;
        // SAFETY: forwarded to the caller.
        let config = unsafe { handle::config_opt(config) }
            .cloned()
            .unwrap_or_else(EngineConfig::new);
        let engine = Engine::new(config)?;
        // SAFETY: checked non-NULL above; writable (caller's promise).
        unsafe { handle::out(out, "out", handle::engine_into_raw(engine)) }?;
        Ok(Status::Ok)
    })
}

/// Shuts an engine down while its handle stays valid: waits up to
/// `timeout_ms` (or `KVF_WAIT_FOREVER`) for the calls on it that other
/// threads are running, then waits for its in-flight batches, unregisters
/// its memory and closes its port. Calls made afterwards fail ("the engine
/// is closed"); calls that start while it waits wait too. If the running
/// calls did not return in time: `KVF_STATUS_TIMEOUT`, and nothing changed.
/// Closing a closed engine is a no-op. Free the handle with
/// `kvf_engine_free` once no thread can use it any more.
///
/// # Safety
/// `engine` from `kvf_engine_new`, not freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_engine_close(engine: *const kvf_engine, timeout_ms: u64) -> Status {
    ffi!({
        let timeout = (timeout_ms != KVF_WAIT_FOREVER).then(|| Duration::from_millis(timeout_ms));
        // SAFETY: forwarded to the caller.
        if unsafe { handle::engine_close(engine, timeout) }? {
            Ok(Status::Ok)
        } else {
            Err(Error::Timeout {
                what: "closing the engine: calls on it still running".into(),
                ms: timeout_ms,
            })
        }
    })
}

/// Frees an engine (closing it first if `kvf_engine_close` did not): waits
/// for its in-flight batches, unregisters its memory and closes its port.
/// NULL is a no-op.
///
/// # Safety
/// `engine` is NULL or from `kvf_engine_new`, and no other call on it runs
/// or follows.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_engine_free(engine: *mut kvf_engine) {
    let _ = ffi!({
        // SAFETY: forwarded to the caller.
        unsafe { handle::engine_free(engine) };
        Ok(Status::Ok)
    });
}

/// Copies the engine's session id (`"host:port"`, NUL-terminated) into
/// `buf` of `capacity` bytes. `*out_len` (if not NULL) receives the length
/// without the NUL, also when the buffer is too small
/// (`KVF_STATUS_BUFFER_TOO_SMALL`, nothing written).
///
/// # Safety
/// `engine` from `kvf_engine_new`; `buf` NULL or writable for `capacity`
/// bytes; `out_len` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_engine_name(
    engine: *const kvf_engine,
    buf: *mut c_char,
    capacity: usize,
    out_len: *mut usize,
) -> Status {
    ffi!({
        // SAFETY: forwarded to the caller.
        let e = unsafe { handle::engine(engine) }?;
        let name = e.name().as_bytes();
        if !out_len.is_null() {
            // SAFETY: non-NULL and writable (caller's promise).
            unsafe { out_len.write(name.len()) };
        }
        // `buf` NULL with capacity 0 is the size query: BUFFER_TOO_SMALL
        // with the length in `*out_len`.
        // SAFETY: forwarded to the caller.
        unsafe { handle::copy_out(name, buf.cast(), capacity, "buf") }?;
        Ok(Status::Ok)
    })
}

/// The port the engine listens on, in `*out_port`.
///
/// # Safety
/// `engine` from `kvf_engine_new`; `out_port` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_engine_rpc_port(
    engine: *const kvf_engine,
    out_port: *mut u16,
) -> Status {
    ffi!({
        // SAFETY: forwarded to the caller.
        let e = unsafe { handle::engine(engine) }?;
        // SAFETY: forwarded to the caller.
        unsafe { handle::out(out_port, "out_port", e.rpc_port()) }?;
        Ok(Status::Ok)
    })
}

/// Registers `[addr, addr + len)` so peers can read and write it.
/// `location`: `"cpu:0"`, `"npu:N"`, or `"*"` / NULL to detect.
/// Zero length, overlap with a registered region, bad locations, and host
/// memory that is not all mapped readable and writable in this process
/// (`KVF_STATUS_REGION_NOT_MAPPED`: a peer's transfer would fault on it)
/// are refused; nothing changes then.
///
/// # Safety
/// `engine` from `kvf_engine_new`; `location` NULL or NUL-terminated; the
/// memory stays valid, readable and writable until unregistered or the
/// engine is freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_register_memory(
    engine: *const kvf_engine,
    addr: u64,
    len: u64,
    location: *const c_char,
) -> Status {
    // SAFETY: forwarded to the caller.
    unsafe { kvf_register_memory_batch(engine, &addr, &len, 1, location) }
}

/// Registers `n` regions, all or none.
///
/// # Safety
/// As `kvf_register_memory`; `addrs` and `lens` NULL or readable for `n` elements.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_register_memory_batch(
    engine: *const kvf_engine,
    addrs: *const u64,
    lens: *const u64,
    n: usize,
    location: *const c_char,
) -> Status {
    ffi!({
        // SAFETY: forwarded to the caller.
        let e = unsafe { handle::engine(engine) }?;
        // SAFETY: forwarded to the caller.
        let addrs = unsafe { handle::slice_arg(addrs, n, "addrs") }?;
        // SAFETY: forwarded to the caller.
        let lens = unsafe { handle::slice_arg(lens, n, "lens") }?;
        let location = if location.is_null() {
            "*"
        } else {
            // SAFETY: forwarded to the caller.
            unsafe { handle::str_arg(location, "location") }?
        };
        if n == 0 {
            return Err(Error::InvalidArgument {
                what: "no regions given (n == 0)".into(),
            });
        }
        let regions: Vec<(u64, u64)> = addrs.iter().copied().zip(lens.iter().copied()).collect();
        // SAFETY: validity of the memory is the caller's promise.
        unsafe { e.register_memory_batch(&regions, location) }?;
        Ok(Status::Ok)
    })
}

/// Unregisters the region starting at `addr`. Waits (up to the transfer
/// timeout) for in-flight transfers that use it; if they do not end, fails
/// with `KVF_STATUS_REGION_BUSY` and leaves it registered. After `KVF_STATUS_OK`
/// the memory may be freed.
///
/// # Safety
/// `engine` from `kvf_engine_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_unregister_memory(engine: *const kvf_engine, addr: u64) -> Status {
    // SAFETY: forwarded to the caller.
    unsafe { kvf_unregister_memory_batch(engine, &addr, 1) }
}

/// Unregisters `n` regions, all or none.
///
/// # Safety
/// `engine` from `kvf_engine_new`; `addrs` NULL or readable for `n` elements.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_unregister_memory_batch(
    engine: *const kvf_engine,
    addrs: *const u64,
    n: usize,
) -> Status {
    ffi!({
        // SAFETY: forwarded to the caller.
        let e = unsafe { handle::engine(engine) }?;
        // SAFETY: forwarded to the caller.
        let addrs = unsafe { handle::slice_arg(addrs, n, "addrs") }?;
        if n == 0 {
            return Err(Error::InvalidArgument {
                what: "no regions given (n == 0)".into(),
            });
        }
        e.unregister_memory_batch(addrs)?;
        Ok(Status::Ok)
    })
}
