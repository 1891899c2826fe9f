//! The one place where raw pointers from C become Rust references, boxes or
//! slices. Every function checks NULL and names the argument in the error.

use std::ffi::{CStr, c_char};

use kvferry_core::{Engine, EngineConfig, Error};

use crate::config::kvf_config;
use crate::engine::kvf_engine;

type Result<T> = std::result::Result<T, Error>;

/// # Safety
/// `p` is NULL or a live handle from `kvf_engine_new`.
pub(crate) unsafe fn engine<'a>(p: *const kvf_engine) -> Result<&'a Engine> {
    // SAFETY: non-NULL engine handles are `Box<Engine>` pointers made by
    // `kvf_engine_new` and not yet freed (the caller's promise).
    unsafe { p.cast::<Engine>().as_ref() }.ok_or(Error::NullPointer { argument: "engine" })
}

pub(crate) fn engine_into_raw(e: Engine) -> *mut kvf_engine {
    Box::into_raw(Box::new(e)).cast()
}

/// # Safety
/// `p` is NULL or a live handle from `kvf_engine_new`, not used afterwards.
pub(crate) unsafe fn engine_free(p: *mut kvf_engine) {
    if !p.is_null() {
        // SAFETY: made by `engine_into_raw`, freed once (caller's promise).
        drop(unsafe { Box::from_raw(p.cast::<Engine>()) });
    }
}

/// # Safety
/// `p` is NULL or a live handle from `kvf_config_new`.
pub(crate) unsafe fn config_mut<'a>(p: *mut kvf_config) -> Result<&'a mut EngineConfig> {
    // SAFETY: non-NULL config handles are `Box<EngineConfig>` pointers made
    // by `kvf_config_new` and not yet freed; configs are not shared between
    // threads (documented).
    unsafe { p.cast::<EngineConfig>().as_mut() }.ok_or(Error::NullPointer { argument: "config" })
}

/// # Safety
/// `p` is NULL or a live handle from `kvf_config_new`.
pub(crate) unsafe fn config_opt<'a>(p: *const kvf_config) -> Option<&'a EngineConfig> {
    // SAFETY: as `config_mut`.
    unsafe { p.cast::<EngineConfig>().as_ref() }
}

pub(crate) fn config_into_raw(c: EngineConfig) -> *mut kvf_config {
    Box::into_raw(Box::new(c)).cast()
}

/// # Safety
/// `p` is NULL or a live handle from `kvf_config_new`, not used afterwards.
pub(crate) unsafe fn config_free(p: *mut kvf_config) {
    if !p.is_null() {
        // SAFETY: made by `config_into_raw`, freed once (caller's promise).
        drop(unsafe { Box::from_raw(p.cast::<EngineConfig>()) });
    }
}

/// A NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string.
pub(crate) unsafe fn str_arg<'a>(p: *const c_char, argument: &'static str) -> Result<&'a str> {
    if p.is_null() {
        return Err(Error::NullPointer { argument });
    }
    // SAFETY: non-NULL and NUL-terminated (caller's promise).
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| Error::InvalidArgument {
            what: format!("{argument} is not valid UTF-8"),
        })
}

/// An array argument of `n` elements; `n == 0` gives an empty slice whatever `p` is.
///
/// # Safety
/// If `n > 0`, `p` is NULL or points to `n` readable elements.
pub(crate) unsafe fn slice_arg<'a, T>(
    p: *const T,
    n: usize,
    argument: &'static str,
) -> Result<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Error::NullPointer { argument });
    }
    if !p.is_aligned() {
        return Err(Error::InvalidArgument {
            what: format!("{argument} is not aligned"),
        });
    }
    // SAFETY: non-NULL, aligned, `n` readable elements (caller's promise).
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// Writes an out-parameter.
///
/// # Safety
/// `p` is NULL or valid for a write of `T`.
pub(crate) unsafe fn out<T>(p: *mut T, argument: &'static str, value: T) -> Result<()> {
    if p.is_null() {
        return Err(Error::NullPointer { argument });
    }
    // SAFETY: non-NULL and writable (caller's promise); `write` because the
    // target may be uninitialised.
    unsafe { p.write(value) };
    Ok(())
}

/// Checks an out-parameter before any work is done, so a NULL one fails
/// the call before it has effects.
pub(crate) fn need_out<T>(p: *mut T, argument: &'static str) -> Result<()> {
    if p.is_null() {
        Err(Error::NullPointer { argument })
    } else {
        Ok(())
    }
}

/// Copies `bytes` into `buf` (`capacity` bytes) with a NUL after them.
///
/// # Safety
/// `buf` is NULL or writable for `capacity` bytes.
pub(crate) unsafe fn copy_out(
    bytes: &[u8],
    buf: *mut u8,
    capacity: usize,
    argument: &'static str,
) -> Result<()> {
    if capacity < bytes.len() + 1 {
        return Err(Error::BufferTooSmall {
            needed: bytes.len() + 1,
            capacity,
        });
    }
    if buf.is_null() {
        return Err(Error::NullPointer { argument });
    }
    // SAFETY: `buf` is writable for `capacity` >= len + 1 bytes (caller's
    // promise, checked size); the source is Rust memory, no overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf, bytes.len());
        buf.add(bytes.len()).write(0);
    }
    Ok(())
}
