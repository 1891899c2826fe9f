//! The one place where raw pointers from C become Rust references, boxes or
//! slices. Every function checks NULL and names the argument in the error.

use std::ffi::{CStr, c_char};
use std::mem::MaybeUninit;
use std::time::Duration;

use parking_lot::{MappedRwLockReadGuard, RwLock, RwLockReadGuard};

use kvferry_core::{Engine, EngineConfig, Error};
use kvferry_topology::SideLayout;

use crate::config::kvf_config;
use crate::engine::kvf_engine;
use crate::topology::kvf_layout;

type Result<T> = std::result::Result<T, Error>;

/// What a `kvf_engine *` points to: the engine until `kvf_engine_close`
/// takes it, nothing after. Every call holds a read guard while it uses the
/// engine, so close waits for the calls running and refuses later ones; the
/// handle itself stays valid until `kvf_engine_free`. That lets a caller
/// (the Python package) close an engine while other threads may still
/// call it, without a lock of its own around every call.
pub(crate) struct EngineCell(RwLock<Option<Engine>>);

/// The engine of a handle, kept open while this lives.
pub(crate) type EngineRef<'a> = MappedRwLockReadGuard<'a, Engine>;

/// # Safety
/// `p` is NULL or a live handle from `kvf_engine_new`.
unsafe fn engine_cell<'a>(p: *const kvf_engine) -> Result<&'a EngineCell> {
    // SAFETY: non-NULL engine handles are `Box<EngineCell>` pointers made by
    // `kvf_engine_new` and not yet freed (the caller's promise).
    unsafe { p.cast::<EngineCell>().as_ref() }.ok_or(Error::NullPointer { argument: "engine" })
}

/// The engine of handle `p`, or an error if it is NULL or closed.
///
/// # Safety
/// `p` is NULL or a live handle from `kvf_engine_new`.
pub(crate) unsafe fn engine<'a>(p: *const kvf_engine) -> Result<EngineRef<'a>> {
    // SAFETY: forwarded to the caller.
    let cell = unsafe { engine_cell(p) }?;
    RwLockReadGuard::try_map(cell.0.read(), Option::as_ref).map_err(|_| Error::InvalidArgument {
        what: "the engine is closed".into(),
    })
}

pub(crate) fn engine_into_raw(e: Engine) -> *mut kvf_engine {
    Box::into_raw(Box::new(EngineCell(RwLock::new(Some(e))))).cast()
}

/// Shuts the engine of `p` down once the calls using it have returned,
/// waiting at most `timeout`; `Ok(false)` if they did not return in time
/// (nothing changed). Closing a closed engine does nothing.
///
/// # Safety
/// `p` is NULL or a live handle from `kvf_engine_new`.
pub(crate) unsafe fn engine_close(p: *const kvf_engine, timeout: Option<Duration>) -> Result<bool> {
    // SAFETY: forwarded to the caller.
    let cell = unsafe { engine_cell(p) }?;
    let mut slot = match timeout {
        None => cell.0.write(),
        Some(t) => match cell.0.try_write_for(t) {
            Some(slot) => slot,
            None => return Ok(false),
        },
    };
    let engine = slot.take();
    drop(slot); // later calls fail at once instead of waiting for the drop
    drop(engine); // waits for its batches, unregisters, closes the port
    Ok(true)
}

/// # Safety
/// `p` is NULL or a live handle from `kvf_engine_new`, not used afterwards.
pub(crate) unsafe fn engine_free(p: *mut kvf_engine) {
    if !p.is_null() {
        // SAFETY: made by `engine_into_raw`, freed once (caller's promise).
        drop(unsafe { Box::from_raw(p.cast::<EngineCell>()) });
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

/// A `#[repr(C)]` struct argument passed by pointer.
///
/// # Safety
/// `p` is NULL or points to a readable `T` whose fields may hold any bit
/// pattern (plain integers and pointers; enum-like fields are integers
/// validated by the caller).
pub(crate) unsafe fn struct_arg<'a, T>(p: *const T, argument: &'static str) -> Result<&'a T> {
    // SAFETY: forwarded to the caller.
    unsafe { opt_struct_arg(p, argument) }?.ok_or(Error::NullPointer { argument })
}

/// Like `struct_arg`, where NULL means "the defaults" (`None`).
///
/// # Safety
/// As `struct_arg`.
pub(crate) unsafe fn opt_struct_arg<'a, T>(
    p: *const T,
    argument: &'static str,
) -> Result<Option<&'a T>> {
    if !p.is_aligned() {
        return Err(Error::InvalidArgument {
            what: format!("{argument} is not aligned"),
        });
    }
    // SAFETY: NULL or a readable, aligned `T` (caller's promise, alignment
    // checked); any bit pattern is a valid `T` (caller's promise).
    Ok(unsafe { p.as_ref() })
}

/// Checks, before anything is written, that an output array of `capacity`
/// elements at `p` can take `len` of them: NULL is only allowed when nothing
/// is to be written. A short buffer is the caller's to report (with its
/// own wording), so here it is an invalid argument.
pub(crate) fn check_out_array<T>(
    p: *mut T,
    capacity: usize,
    len: usize,
    argument: &'static str,
) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    if capacity < len {
        return Err(Error::InvalidArgument {
            what: format!("{argument} holds {capacity} entries; {len} are needed"),
        });
    }
    if p.is_null() {
        return Err(Error::NullPointer { argument });
    }
    if !p.is_aligned() {
        return Err(Error::InvalidArgument {
            what: format!("{argument} is not aligned"),
        });
    }
    Ok(())
}

/// Copies `values` into the output array `p` of `capacity` elements.
///
/// # Safety
/// `p` is NULL or writable for `capacity` elements of `T`.
pub(crate) unsafe fn write_array<T: Copy>(
    p: *mut T,
    capacity: usize,
    values: &[T],
    argument: &'static str,
) -> Result<()> {
    check_out_array(p, capacity, values.len(), argument)?;
    if !values.is_empty() {
        // SAFETY: `p` is non-NULL, aligned and writable for `capacity` >=
        // `values.len()` elements (checked above; writability is the caller's
        // promise); the source is Rust memory, so the two cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), p, values.len()) };
    }
    Ok(())
}

/// # Safety
/// `p` is NULL or a live handle from `kvf_layout_new`.
pub(crate) unsafe fn layout<'a>(
    p: *const kvf_layout,
    argument: &'static str,
) -> Result<&'a SideLayout> {
    // SAFETY: non-NULL layout handles are `Box<SideLayout>` pointers made by
    // `kvf_layout_new` and not yet freed (the caller's promise); layouts are
    // immutable, so shared references from many threads are fine.
    unsafe { p.cast::<SideLayout>().as_ref() }.ok_or(Error::NullPointer { argument })
}

pub(crate) fn layout_into_raw(l: SideLayout) -> *mut kvf_layout {
    Box::into_raw(Box::new(l)).cast()
}

/// # Safety
/// `p` is NULL or a live handle from `kvf_layout_new`, not used afterwards.
pub(crate) unsafe fn layout_free(p: *mut kvf_layout) {
    if !p.is_null() {
        // SAFETY: made by `layout_into_raw`, freed once (caller's promise).
        drop(unsafe { Box::from_raw(p.cast::<SideLayout>()) });
    }
}

/// Output arrays of `len` elements each (capacity `capacity` each), as
/// mutable slices to fill in place. Checked like `check_out_array`, and
/// pairwise disjoint, since two mutable slices may not alias.
///
/// # Safety
/// Each pointer is NULL or writable for `capacity` elements of `T`, and
/// nothing else accesses that memory while the slices live.
pub(crate) unsafe fn out_arrays<'a, T, const N: usize>(
    arrays: [(*mut T, &'static str); N],
    capacity: usize,
    len: usize,
) -> Result<[&'a mut [MaybeUninit<T>]; N]> {
    for &(p, argument) in &arrays {
        check_out_array(p, capacity, len, argument)?;
    }
    let bytes = len.saturating_mul(size_of::<T>());
    for (i, &(a, a_name)) in arrays.iter().enumerate() {
        for &(b, b_name) in &arrays[i + 1..] {
            let (a, b) = (a as usize, b as usize);
            if len > 0 && a < b.saturating_add(bytes) && b < a.saturating_add(bytes) {
                return Err(Error::InvalidArgument {
                    what: format!("{a_name} and {b_name} overlap"),
                });
            }
        }
    }
    Ok(arrays.map(|(p, _)| {
        if len == 0 {
            return <&mut [MaybeUninit<T>]>::default();
        }
        // SAFETY: non-NULL and aligned (checked above), writable for
        // `capacity` >= `len` elements and not accessed elsewhere (the
        // caller's promise), disjoint from the other slices (checked above);
        // `MaybeUninit` makes no claim about the current contents.
        unsafe { std::slice::from_raw_parts_mut(p.cast::<MaybeUninit<T>>(), len) }
    }))
}
