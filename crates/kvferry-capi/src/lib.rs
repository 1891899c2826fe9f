//! The C ABI of kvferry. Every exported function is `kvf_*`; conventions
//! (status codes, out-parameters, NULL, panics, threads, ownership) are in
//! docs/c-api.md and at the top of include/kvferry.h.
//!
//! Layout: `boundary` turns Rust results and panics into status codes and the
//! thread-local last error; `handle` is the only place raw handles become
//! references; the other modules hold the exported functions by area.

#![allow(
    non_camel_case_types,
    reason = "C type names follow the kvf_ prefix convention"
)]
// Library code reports failures; it never panics on them.
#![warn(clippy::unwrap_used, clippy::expect_used)]

mod boundary;
mod config;
mod device;
mod engine;
mod handle;
mod notify;
mod python;
mod topology;
mod transfer;

pub use config::*;
pub use device::*;
pub use engine::*;
pub use notify::*;
pub use python::*;
pub use topology::*;
pub use transfer::*;

use std::ffi::c_char;

/// Major version of the library this header belongs to.
pub const KVF_VERSION_MAJOR: u32 = 0;
/// Minor version.
pub const KVF_VERSION_MINOR: u32 = 1;
/// Patch version.
pub const KVF_VERSION_PATCH: u32 = 0;

/// Status of every fallible call (see `kvf_status_str`).
pub use kvferry_core::Status;

/// The library's version, `"MAJOR.MINOR.PATCH"`. Static; never free it.
#[unsafe(no_mangle)]
pub extern "C" fn kvf_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// A static description of status `code` ("unknown status" for codes this
/// version does not know). Never free it.
#[unsafe(no_mangle)]
pub extern "C" fn kvf_status_str(code: i32) -> *const c_char {
    Status::from_code(code)
        .map_or(c"unknown status", Status::describe_c)
        .as_ptr()
}

/// The message of the last error on this thread: what failed and why, with
/// the address, peer or id involved. Empty when no call on this thread has
/// failed. Valid until the next failing `kvf_` call on this thread; never
/// free it.
#[unsafe(no_mangle)]
pub extern "C" fn kvf_last_error() -> *const c_char {
    boundary::last_error_ptr()
}

#[cfg(test)]
mod tests {
    #[test]
    fn version_macros_match_cargo() {
        assert_eq!(
            super::KVF_VERSION_MAJOR.to_string(),
            env!("CARGO_PKG_VERSION_MAJOR")
        );
        assert_eq!(
            super::KVF_VERSION_MINOR.to_string(),
            env!("CARGO_PKG_VERSION_MINOR")
        );
        assert_eq!(
            super::KVF_VERSION_PATCH.to_string(),
            env!("CARGO_PKG_VERSION_PATCH")
        );
    }
}
