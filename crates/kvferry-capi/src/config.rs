//! `kvf_config`: the engine builder. Not thread-safe: build it on one thread.

use std::ffi::c_char;
use std::time::Duration;

use kvferry_core::config::check_hostname;
use kvferry_core::{EngineConfig, Error, Status, TransportChoice};

use crate::boundary::ffi;
use crate::handle;

/// Engine settings under construction. Made by `kvf_config_new`, freed by
/// `kvf_config_free`; not thread-safe. Unset fields come from the
/// environment when the engine is created (docs/configuration.md).
#[derive(Debug)]
pub struct kvf_config {
    _private: [u8; 0],
}

/// Creates an empty config in `*out`.
///
/// # Safety
/// `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_config_new(out: *mut *mut kvf_config) -> Status {
    ffi!({
        handle::need_out(out, "out")?;
        // SAFETY: checked non-NULL above; writable (caller's promise).
        unsafe { handle::out(out, "out", handle::config_into_raw(EngineConfig::new())) }?;
        Ok(Status::Ok)
    })
}

/// Frees a config. NULL is a no-op.
///
/// # Safety
/// `config` is NULL or from `kvf_config_new`, and not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_config_free(config: *mut kvf_config) {
    // A panic cannot happen in a drop of plain data; the boundary is kept for uniformity.
    let _ = ffi!({
        // SAFETY: forwarded to the caller.
        unsafe { handle::config_free(config) };
        Ok(Status::Ok)
    });
}

/// Applies `f` to the config behind `config`.
///
/// # Safety
/// `config` is NULL or from `kvf_config_new`.
unsafe fn update(
    config: *mut kvf_config,
    f: impl FnOnce(EngineConfig) -> Result<EngineConfig, Error>,
) -> Status {
    ffi!({
        // SAFETY: forwarded to the caller.
        let c = unsafe { handle::config_mut(config) }?;
        // On a refusal the config stays as it was.
        *c = f(c.clone())?;
        Ok(Status::Ok)
    })
}

/// The host name or address peers reach this engine at (default
/// `KVFERRY_HOSTNAME`, else 127.0.0.1): an IPv4 address, an IPv6 address
/// (`"::1"` or `"[::1]"`), or a DNS name of letters, digits, `-`, `_` and
/// dots; anything a peer could not parse back from the engine's name
/// `"host:port"` is `KVF_STATUS_INVALID_ARGUMENT`.
///
/// # Safety
/// `config` as for every `kvf_config_*`; `hostname` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_config_set_hostname(
    config: *mut kvf_config,
    hostname: *const c_char,
) -> Status {
    // SAFETY: forwarded to the caller.
    let h = unsafe { handle::str_arg(hostname, "hostname") };
    // SAFETY: forwarded to the caller.
    unsafe {
        update(config, |c| {
            let h = h?;
            let host = check_hostname(h).map_err(|reason| Error::InvalidArgument {
                what: format!("hostname {h:?}: {reason}"),
            })?;
            Ok(c.hostname(host))
        })
    }
}

/// A timeout of `ms` milliseconds, refused when 0: nothing could finish
/// within it.
fn nonzero_ms(ms: u64, what: &str) -> Result<Duration, Error> {
    if ms == 0 {
        return Err(Error::InvalidArgument {
            what: format!("{what} of 0 ms: nothing could finish in time; give at least 1 ms"),
        });
    }
    Ok(Duration::from_millis(ms))
}

/// Listen on exactly `port` (0: any free port).
///
/// # Safety
/// `config` is NULL or from `kvf_config_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_config_set_port(config: *mut kvf_config, port: u16) -> Status {
    // SAFETY: forwarded to the caller.
    unsafe { update(config, |c| Ok(c.port(port))) }
}

/// Pick a free port in `[lo, hi]` (default 15000-17000).
///
/// # Safety
/// `config` is NULL or from `kvf_config_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_config_set_port_range(
    config: *mut kvf_config,
    lo: u16,
    hi: u16,
) -> Status {
    // SAFETY: forwarded to the caller.
    unsafe {
        update(config, |c| {
            if lo > hi {
                return Err(Error::InvalidArgument {
                    what: format!("port range {lo}-{hi} is empty"),
                });
            }
            Ok(c.port_range(lo, hi))
        })
    }
}

/// Deadline for connecting to a peer (and its handshake), in
/// milliseconds (> 0; default 3000).
///
/// # Safety
/// `config` is NULL or from `kvf_config_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_config_set_connect_timeout_ms(
    config: *mut kvf_config,
    ms: u64,
) -> Status {
    // SAFETY: forwarded to the caller.
    unsafe {
        update(config, |c| {
            Ok(c.connect_timeout(nonzero_ms(ms, "connect timeout")?))
        })
    }
}

/// Deadline of a whole batch, in milliseconds (> 0; default 10000); also
/// how long unregistering waits for in-flight transfers.
///
/// # Safety
/// `config` is NULL or from `kvf_config_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_config_set_transfer_timeout_ms(
    config: *mut kvf_config,
    ms: u64,
) -> Status {
    // SAFETY: forwarded to the caller.
    unsafe {
        update(config, |c| {
            Ok(c.transfer_timeout(nonzero_ms(ms, "transfer timeout")?))
        })
    }
}

/// Ops larger than `bytes` are cut into slices of this size (> 0).
///
/// # Safety
/// `config` is NULL or from `kvf_config_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_config_set_slice_size(config: *mut kvf_config, bytes: u64) -> Status {
    // SAFETY: forwarded to the caller.
    unsafe {
        update(config, |c| {
            if bytes == 0 {
                return Err(Error::InvalidArgument {
                    what: "slice size is zero".into(),
                });
            }
            Ok(c.slice_size(bytes))
        })
    }
}

/// Threads that run asynchronous batches (> 0; default 2).
///
/// # Safety
/// `config` is NULL or from `kvf_config_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_config_set_async_workers(
    config: *mut kvf_config,
    workers: u32,
) -> Status {
    // SAFETY: forwarded to the caller.
    unsafe {
        update(config, |c| {
            if workers == 0 {
                return Err(Error::InvalidArgument {
                    what: "async_workers is zero".into(),
                });
            }
            Ok(c.async_workers(workers as usize))
        })
    }
}

/// `"auto"` (the best path per peer) or `"tcp"` (tcp for every peer, also
/// engines of this process: useful to test the network path).
///
/// # Safety
/// `config` is NULL or from `kvf_config_new`; `transport` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_config_set_transport(
    config: *mut kvf_config,
    transport: *const c_char,
) -> Status {
    // SAFETY: forwarded to the caller.
    let t = unsafe { handle::str_arg(transport, "transport") };
    // SAFETY: forwarded to the caller.
    unsafe {
        update(config, |c| match t? {
            "auto" => Ok(c.transport(TransportChoice::Auto)),
            "tcp" => Ok(c.transport(TransportChoice::Tcp)),
            other => Err(Error::InvalidArgument {
                what: format!("transport {other:?}: expected \"auto\" or \"tcp\""),
            }),
        })
    }
}

/// A shared secret every peer must prove in the hello, and that this engine
/// proves to them (default `KVFERRY_SECRET`; empty: none).
///
/// # Safety
/// `config` is NULL or from `kvf_config_new`; `secret` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_config_set_secret(
    config: *mut kvf_config,
    secret: *const c_char,
) -> Status {
    // SAFETY: forwarded to the caller.
    let s = unsafe { handle::str_arg(secret, "secret") }.map(str::to_owned);
    // SAFETY: forwarded to the caller.
    unsafe { update(config, |c| Ok(c.secret(s?))) }
}

/// tcp connections per peer (1..=64; default 4).
///
/// # Safety
/// `config` is NULL or from `kvf_config_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_config_set_lanes(config: *mut kvf_config, lanes: u32) -> Status {
    // SAFETY: forwarded to the caller.
    unsafe {
        update(config, |c| {
            if lanes == 0 || lanes > 64 {
                return Err(Error::InvalidArgument {
                    what: format!("lanes {lanes}: expected 1..=64"),
                });
            }
            Ok(c.lanes(lanes as usize))
        })
    }
}

/// Connections this engine serves at once, from all peers (> 0; default
/// `KVFERRY_MAX_CONNECTIONS`, else 1024). A connection over the limit is
/// refused at once; its initiator sees the peer as unreachable.
///
/// # Safety
/// `config` is NULL or from `kvf_config_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_config_set_max_connections(
    config: *mut kvf_config,
    connections: u32,
) -> Status {
    // SAFETY: forwarded to the caller.
    unsafe {
        update(config, |c| {
            if connections == 0 {
                return Err(Error::InvalidArgument {
                    what: "max_connections is zero".into(),
                });
            }
            Ok(c.max_connections(connections as usize))
        })
    }
}
