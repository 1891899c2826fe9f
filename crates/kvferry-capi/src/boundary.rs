//! The panic boundary and the thread-local last error.

use std::cell::RefCell;
use std::ffi::{CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};

use kvferry_core::{Error, Status};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

pub(crate) fn set_last_error(message: &str) {
    // Interior NULs would cut the message short in C: replace them.
    let c = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

pub(crate) fn last_error_ptr() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    let what = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("internal error (panic): {what}")
}

/// Runs the body of an exported function: success gives its status, an
/// error or a panic becomes a status code with the message kept as the last
/// error. Nothing unwinds into C.
pub(crate) fn run(body: impl FnOnce() -> Result<Status, Error>) -> Status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => {
            set_last_error(&e.to_string());
            e.status()
        }
        Err(p) => {
            set_last_error(&panic_message(p.as_ref()));
            Status::Internal
        }
    }
}

/// The body of an exported fallible function: `ffi!({ ...; Ok(Status::Ok) })`.
macro_rules! ffi {
    ($body:block) => {
        $crate::boundary::run(
            move || -> Result<kvferry_core::Status, kvferry_core::Error> { $body },
        )
    };
}
pub(crate) use ffi;

/// A refusal whose message the core `Error` cannot phrase (the topology
/// calls count array entries, where `Error::BufferTooSmall` speaks of
/// bytes): keeps `message` as the last error and gives `status`, exactly as
/// an `Err` would. Return it as the body's `Ok` value.
pub(crate) fn refuse(status: Status, message: &str) -> Status {
    set_last_error(message);
    status
}

/// `KVF_STATUS_BUFFER_TOO_SMALL` for an array `argument` of `capacity`
/// entries where `needed` are (a `refuse`: the core's error counts bytes).
pub(crate) fn buffer_too_small(argument: &str, needed: usize, capacity: usize) -> Status {
    refuse(
        Status::BufferTooSmall,
        &format!("{argument}: capacity {capacity}, but {needed} entries are needed"),
    )
}
