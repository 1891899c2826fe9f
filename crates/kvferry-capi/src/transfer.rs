//! Transfers: synchronous batches, and asynchronous ones tracked by id.

use std::ffi::c_char;
use std::time::Duration;

use kvferry_core::{BatchId, BatchState, Error, Op, OpState, Opcode, Status};

use crate::boundary::ffi;
use crate::engine::kvf_engine;
use crate::handle::{self, EngineRef};

/// Opcode: copy remote memory into local memory.
pub const KVF_OP_READ: u32 = 0;
/// Opcode: copy local memory into remote memory.
pub const KVF_OP_WRITE: u32 = 1;
/// `kvf_batch_wait` timeout meaning "no limit" (the engine's transfer
/// timeout still ends the batch).
pub const KVF_WAIT_FOREVER: u64 = u64::MAX;

pub(crate) fn opcode(raw: u32) -> Result<Opcode, Error> {
    match raw {
        KVF_OP_READ => Ok(Opcode::Read),
        KVF_OP_WRITE => Ok(Opcode::Write),
        other => Err(Error::InvalidArgument {
            what: format!("opcode {other}: expected KVF_OP_READ (0) or KVF_OP_WRITE (1)"),
        }),
    }
}

/// The engine, session and opcode of a transfer call, read and checked.
///
/// # Safety
/// `engine` from `kvf_engine_new`; `session` NULL or NUL-terminated.
pub(crate) unsafe fn transfer_target<'a>(
    engine: *const kvf_engine,
    session: *const c_char,
    op: u32,
) -> Result<(EngineRef<'a>, &'a str, Opcode), Error> {
    // SAFETY: forwarded to the caller.
    let e = unsafe { handle::engine(engine) }?;
    // SAFETY: as above.
    let session = unsafe { handle::str_arg(session, "session") }?;
    Ok((e, session, opcode(op)?))
}

/// The arguments every transfer call shares, read and checked.
///
/// # Safety
/// As the exported transfer functions.
unsafe fn transfer_args<'a>(
    engine: *const kvf_engine,
    session: *const c_char,
    op: u32,
    local: *const u64,
    remote: *const u64,
    lens: *const u64,
    n: usize,
) -> Result<(EngineRef<'a>, &'a str, Opcode, Vec<Op>), Error> {
    // SAFETY: forwarded to the caller (all four below).
    let (e, session, op) = unsafe { transfer_target(engine, session, op) }?;
    // SAFETY: as above.
    let local = unsafe { handle::slice_arg(local, n, "local_addrs") }?;
    // SAFETY: as above.
    let remote = unsafe { handle::slice_arg(remote, n, "remote_addrs") }?;
    // SAFETY: as above.
    let lens = unsafe { handle::slice_arg(lens, n, "lens") }?;
    if n == 0 {
        return Err(Error::InvalidArgument {
            what: "a batch needs at least one op (n == 0)".into(),
        });
    }
    let ops = (0..n)
        .map(|i| Op {
            local: local[i],
            remote: remote[i],
            len: lens[i],
        })
        .collect();
    Ok((e, session, op, ops))
}

/// Moves `n` ops to or from `session` (`"host:port"`) and returns when all
/// are done (`KVF_STATUS_OK`) or one failed (its status; see
/// `kvf_last_error`). `local_addrs[i]` is this engine's side of op `i`,
/// `remote_addrs[i]` the peer's, `lens[i]` its length. Every op is
/// validated before any byte moves: a refused batch moves nothing. Ops
/// not done within the engine's transfer timeout fail with
/// `KVF_STATUS_TRANSFER_TIMEOUT`.
///
/// # Safety
/// `engine` from `kvf_engine_new`; `session` NULL or NUL-terminated; the
/// three arrays NULL or readable for `n` elements.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_transfer_sync(
    engine: *const kvf_engine,
    session: *const c_char,
    opcode: u32,
    local_addrs: *const u64,
    remote_addrs: *const u64,
    lens: *const u64,
    n: usize,
) -> Status {
    ffi!({
        // SAFETY: forwarded to the caller.
        let (e, session, op, ops) =
            unsafe { transfer_args(engine, session, opcode, local_addrs, remote_addrs, lens, n) }?;
        e.transfer_sync(session, op, &ops)?;
        Ok(Status::Ok)
    })
}

/// Like `kvf_transfer_sync`, but returns once the batch is validated and
/// started, with its id in `*out_batch` (never 0). Follow with
/// `kvf_batch_poll` / `kvf_batch_wait`, then `kvf_batch_free`.
///
/// # Safety
/// As `kvf_transfer_sync`; `out_batch` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_batch_submit(
    engine: *const kvf_engine,
    session: *const c_char,
    opcode: u32,
    local_addrs: *const u64,
    remote_addrs: *const u64,
    lens: *const u64,
    n: usize,
    out_batch: *mut u64,
) -> Status {
    ffi!({
        handle::need_out(out_batch, "out_batch")?;
        // SAFETY: forwarded to the caller.
        let (e, session, op, ops) =
            unsafe { transfer_args(engine, session, opcode, local_addrs, remote_addrs, lens, n) }?;
        let id = e.submit(session, op, &ops)?;
        // SAFETY: checked non-NULL above; writable (caller's promise).
        unsafe { handle::out(out_batch, "out_batch", id.0) }?;
        Ok(Status::Ok)
    })
}

/// Like `kvf_batch_submit` with `KVF_OP_WRITE`, and once every op has
/// landed, sends `message` (`message_len` bytes) to the peer: it sees the
/// notification only after all of the batch's data is in place, and not at
/// all if an op failed.
///
/// # Safety
/// As `kvf_batch_submit`; `message` NULL or readable for `message_len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_batch_submit_write_notify(
    engine: *const kvf_engine,
    session: *const c_char,
    local_addrs: *const u64,
    remote_addrs: *const u64,
    lens: *const u64,
    n: usize,
    message: *const u8,
    message_len: usize,
    out_batch: *mut u64,
) -> Status {
    ffi!({
        handle::need_out(out_batch, "out_batch")?;
        // SAFETY: forwarded to the caller.
        let (e, session, _, ops) = unsafe {
            transfer_args(
                engine,
                session,
                KVF_OP_WRITE,
                local_addrs,
                remote_addrs,
                lens,
                n,
            )
        }?;
        // SAFETY: forwarded to the caller.
        let message = unsafe { handle::slice_arg(message, message_len, "message") }?;
        let id = e.submit_write_with_notify(session, &ops, message)?;
        // SAFETY: checked non-NULL above; writable (caller's promise).
        unsafe { handle::out(out_batch, "out_batch", id.0) }?;
        Ok(Status::Ok)
    })
}

/// Where batch `batch` stands: `KVF_STATUS_OK` (all done),
/// `KVF_STATUS_IN_PROGRESS`, or the status of its first error
/// (`KVF_STATUS_TRANSFER_TIMEOUT` when the engine's transfer timeout ended
/// it; never `KVF_STATUS_TIMEOUT`). An unknown or freed id gives
/// `KVF_STATUS_BAD_BATCH_ID`.
///
/// # Safety
/// `engine` from `kvf_engine_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_batch_poll(engine: *const kvf_engine, batch: u64) -> Status {
    ffi!({
        // SAFETY: forwarded to the caller.
        let e = unsafe { handle::engine(engine) }?;
        match e.poll(BatchId(batch))? {
            BatchState::Done => Ok(Status::Ok),
            BatchState::InProgress => Ok(Status::InProgress),
            BatchState::Failed(err) => Err(err),
        }
    })
}

/// Waits up to `timeout_ms` (or `KVF_WAIT_FOREVER`) for batch `batch`:
/// `KVF_STATUS_OK`, its first error, or `KVF_STATUS_TIMEOUT` if it is still
/// running (it keeps running; wait again or poll). `KVF_STATUS_TIMEOUT`
/// means only that: a batch that ended because a transfer ran past the
/// engine's transfer timeout gives `KVF_STATUS_TRANSFER_TIMEOUT`, every
/// time it is waited for or polled, so a loop that waits again on
/// `KVF_STATUS_TIMEOUT` always ends.
///
/// # Safety
/// `engine` from `kvf_engine_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_batch_wait(
    engine: *const kvf_engine,
    batch: u64,
    timeout_ms: u64,
) -> Status {
    ffi!({
        // SAFETY: forwarded to the caller.
        let e = unsafe { handle::engine(engine) }?;
        let timeout = if timeout_ms == KVF_WAIT_FOREVER {
            Duration::MAX
        } else {
            Duration::from_millis(timeout_ms)
        };
        e.wait(BatchId(batch), timeout)?;
        Ok(Status::Ok)
    })
}

/// The state of op `index` of batch `batch` in `*out_status`:
/// `KVF_STATUS_OK`, `KVF_STATUS_IN_PROGRESS`, or the batch's first error
/// status for an op that failed (as `kvf_batch_poll`: never
/// `KVF_STATUS_TIMEOUT`). An index past the batch's ops gives
/// `KVF_STATUS_INVALID_ARGUMENT`.
///
/// # Safety
/// `engine` from `kvf_engine_new`; `out_status` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_batch_op_status(
    engine: *const kvf_engine,
    batch: u64,
    index: usize,
    out_status: *mut Status,
) -> Status {
    ffi!({
        handle::need_out(out_status, "out_status")?;
        // SAFETY: forwarded to the caller.
        let e = unsafe { handle::engine(engine) }?;
        let id = BatchId(batch);
        let s = match e.op_state(id, index)? {
            OpState::Done => Status::Ok,
            OpState::Pending => Status::InProgress,
            OpState::Failed => match e.poll(id)? {
                BatchState::Failed(err) => err.status(),
                _ => Status::TransferFailed,
            },
        };
        // SAFETY: checked non-NULL above; writable (caller's promise).
        unsafe { handle::out(out_status, "out_status", s) }?;
        Ok(Status::Ok)
    })
}

/// Frees a finished batch; its id is invalid afterwards. A batch still in
/// progress gives `KVF_STATUS_BATCH_IN_PROGRESS` and stays.
///
/// # Safety
/// `engine` from `kvf_engine_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_batch_free(engine: *const kvf_engine, batch: u64) -> Status {
    ffi!({
        // SAFETY: forwarded to the caller.
        let e = unsafe { handle::engine(engine) }?;
        e.free_batch(BatchId(batch))?;
        Ok(Status::Ok)
    })
}
