//! The one error type of the core crate, and its stable status codes.

use std::sync::Arc;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in kvferry. Every variant carries the context
/// a user needs to find the cause (address, peer, batch, errno).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid argument: {what}")]
    InvalidArgument { what: String },

    #[error("{argument} is NULL")]
    NullPointer { argument: &'static str },

    #[error("buffer of {capacity} bytes is too small: {needed} needed")]
    BufferTooSmall { needed: usize, capacity: usize },

    #[error("region {addr:#x} + length {len} overflows 64 bits")]
    RegionOverflow { addr: u64, len: u64 },

    #[error("cannot register a zero-length region at {addr:#x}")]
    ZeroLengthRegion { addr: u64 },

    #[error(
        "region [{addr:#x}, +{len}) overlaps the registered region [{other_addr:#x}, +{other_len})"
    )]
    RegionOverlap {
        addr: u64,
        len: u64,
        other_addr: u64,
        other_len: u64,
    },

    #[error("no region is registered at {addr:#x}")]
    NotRegistered { addr: u64 },

    #[error(
        "region at {addr:#x} is still used by {in_flight} in-flight transfer(s) after {waited_ms} ms; it stays registered"
    )]
    RegionBusy {
        addr: u64,
        in_flight: usize,
        waited_ms: u64,
    },

    #[error("bad location {location:?}: expected \"cpu\", \"cpu:N\", \"npu:N\" or \"*\"")]
    BadLocation { location: String },

    /// Host memory offered for registration that this process has not
    /// mapped readable and writable: a peer's transfer would fault on it.
    #[error(
        "cannot register [{addr:#x}, +{len}): it is not readable and writable memory of this process ({detail})"
    )]
    RegionNotMapped { addr: u64, len: u64, detail: String },

    #[error("op {index}: length is zero")]
    ZeroLengthOp { index: usize },

    #[error("op {index}: address {addr:#x} + length {len} overflows 64 bits")]
    AddressOverflow { index: usize, addr: u64, len: u64 },

    #[error("op {index}: local range [{addr:#x}, +{len}) is not inside one registered region")]
    LocalOutOfRange { index: usize, addr: u64, len: u64 },

    #[error(
        "op {index}: remote range [{addr:#x}, +{len}) is not inside one region of peer {peer}'s segment"
    )]
    RemoteOutOfRange {
        index: usize,
        peer: String,
        addr: u64,
        len: u64,
    },

    #[error("bad session id {session:?}: {reason}")]
    BadSession { session: String, reason: String },

    #[error("peer {peer} is unreachable: {reason}")]
    PeerUnreachable { peer: String, reason: String },

    #[error("batch id {id:#x} is unknown or already freed")]
    BadBatchId { id: u64 },

    #[error("batch {id:#x} is still in progress; wait for it before freeing it")]
    BatchInProgress { id: u64 },

    #[error("{limit} batches are already live; free finished ones first")]
    TooManyBatches { limit: usize },

    /// A wait ran out while what it waited for goes on (a batch still
    /// running, calls still inside a closing engine), or a handshake ran
    /// out before anything started.
    #[error("{what} timed out after {ms} ms")]
    Timeout { what: String, ms: u64 },

    /// A batch (or synchronous transfer) ended because a transfer did not
    /// finish in time (the engine's transfer timeout): its unfinished ops
    /// failed. Unlike `Timeout`, nothing is left running.
    #[error("transfer timed out: {what} timed out after {ms} ms")]
    TransferTimeout { what: String, ms: u64 },

    #[error("transfer with peer {peer} failed: {reason}")]
    TransferFailed { peer: String, reason: String },

    /// The target refused one request (a range outside its registrations,
    /// or memory its owner took away since) and keeps the connection in
    /// step: the request's ops failed, the connection goes on. cma gives
    /// the same error when the target's region list (its lease board)
    /// already shows the range outside every region.
    #[error("transfer with peer {peer} failed: the target refused the request: {message}")]
    RequestRefused { peer: String, message: String },

    #[error("peer {peer} restarted: {detail}")]
    PeerRestarted { peer: String, detail: String },

    #[error("protocol error with {peer}: {detail}")]
    Protocol { peer: String, detail: String },

    #[error("authentication with {peer} failed: {detail}")]
    AuthFailed { peer: String, detail: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: Arc<std::io::Error>,
    },

    #[error("not supported: {what}")]
    Unsupported { what: String },

    #[error("internal error: {what}")]
    Internal { what: String },

    /// A device runtime call failed (for Ascend: an ACL function returned
    /// an error). `detail` is the runtime's own text, e.g. `aclrtMemcpy
    /// failed: ACL error 507013 (ACL_ERROR_RT_SYS_DMA): <aclGetRecentErrMsg>`.
    #[error("{context}: {detail}")]
    Device {
        /// What kvferry was doing, with the region or peer involved.
        context: String,
        /// The runtime function that failed (`aclrtMemcpy`).
        function: String,
        /// The code it returned.
        code: i64,
        detail: String,
    },
}

impl Error {
    /// Wraps an I/O error with what was being done when it happened.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source: Arc::new(source),
        }
    }

    pub(crate) fn invalid(what: impl Into<String>) -> Self {
        Error::InvalidArgument { what: what.into() }
    }

    /// The stable status code of this error (see [`Status`]).
    pub fn status(&self) -> Status {
        match self {
            Error::InvalidArgument { .. } => Status::InvalidArgument,
            Error::NullPointer { .. } => Status::NullPointer,
            Error::BufferTooSmall { .. } => Status::BufferTooSmall,
            Error::ZeroLengthRegion { .. } => Status::ZeroLengthRegion,
            Error::RegionOverflow { .. } => Status::AddressOverflow,
            Error::RegionOverlap { .. } => Status::RegionOverlap,
            Error::NotRegistered { .. } => Status::NotRegistered,
            Error::RegionBusy { .. } => Status::RegionBusy,
            Error::BadLocation { .. } => Status::BadLocation,
            Error::RegionNotMapped { .. } => Status::RegionNotMapped,
            Error::ZeroLengthOp { .. } => Status::ZeroLengthOp,
            Error::AddressOverflow { .. } => Status::AddressOverflow,
            Error::LocalOutOfRange { .. } => Status::LocalOutOfRange,
            Error::RemoteOutOfRange { .. } => Status::RemoteOutOfRange,
            Error::BadSession { .. } => Status::BadSession,
            Error::PeerUnreachable { .. } => Status::PeerUnreachable,
            Error::BadBatchId { .. } => Status::BadBatchId,
            Error::BatchInProgress { .. } => Status::BatchInProgress,
            Error::TooManyBatches { .. } => Status::TooManyBatches,
            Error::Timeout { .. } => Status::Timeout,
            Error::TransferTimeout { .. } => Status::TransferTimeout,
            Error::TransferFailed { .. } | Error::RequestRefused { .. } => Status::TransferFailed,
            Error::PeerRestarted { .. } => Status::PeerRestarted,
            Error::Protocol { .. } => Status::Protocol,
            Error::AuthFailed { .. } => Status::AuthFailed,
            Error::Io { .. } => Status::Io,
            Error::Unsupported { .. } => Status::Unsupported,
            Error::Internal { .. } => Status::Internal,
            Error::Device { .. } => Status::Device,
        }
    }
}

/// Stable numeric status codes, shared by the C ABI and the Python package.
///
/// 0 is success, positive values are "not done yet", negative values are
/// errors grouped by area in blocks of ten. Codes are never renumbered; a
/// retired code stays here as a comment.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Ok = 0,
    InProgress = 1,
    // -1 .. -9: arguments and the library itself
    InvalidArgument = -1,
    NullPointer = -2,
    Internal = -3,
    Unsupported = -4,
    BufferTooSmall = -5,
    // -10 .. -19: memory registration
    ZeroLengthRegion = -10,
    RegionOverlap = -11,
    NotRegistered = -12,
    RegionBusy = -13,
    BadLocation = -14,
    /// Host memory to register is not all mapped readable and writable
    /// in this process (unmapped, read-only, or a range running past the
    /// end of its mapping). Nothing was registered. Also the status of a
    /// target's ERROR frame for a READ or WRITE of registered memory that
    /// its owner unmapped without unregistering it (the initiator's batch
    /// fails with `KVF_STATUS_TRANSFER_FAILED`).
    RegionNotMapped = -15,
    // -20 .. -29: op validation (nothing was moved)
    ZeroLengthOp = -20,
    AddressOverflow = -21,
    LocalOutOfRange = -22,
    RemoteOutOfRange = -23,
    // -30 .. -39: batches
    BadBatchId = -30,
    BatchInProgress = -31,
    TooManyBatches = -32,
    /// A wait ran out and what it waited for is still going on
    /// (`kvf_batch_wait`: the batch keeps running; `kvf_engine_close`:
    /// nothing changed), or a handshake with a peer ran out before
    /// anything started. Never the outcome of a batch.
    Timeout = -33,
    // -40 .. -49: peers and the network
    BadSession = -40,
    PeerUnreachable = -41,
    TransferFailed = -42,
    Io = -43,
    PeerRestarted = -44,
    Protocol = -45,
    AuthFailed = -46,
    /// The batch ended because a transfer ran past the engine's transfer
    /// timeout (its unfinished ops failed); nothing of it keeps running.
    TransferTimeout = -47,
    // -50 .. -59: device memory (NPU)
    Device = -50,
}

impl Status {
    /// Every status, for tables and tests.
    pub fn all() -> [Status; 30] {
        [
            Status::Ok,
            Status::InProgress,
            Status::InvalidArgument,
            Status::NullPointer,
            Status::Internal,
            Status::Unsupported,
            Status::BufferTooSmall,
            Status::ZeroLengthRegion,
            Status::RegionOverlap,
            Status::NotRegistered,
            Status::RegionBusy,
            Status::BadLocation,
            Status::RegionNotMapped,
            Status::ZeroLengthOp,
            Status::AddressOverflow,
            Status::LocalOutOfRange,
            Status::RemoteOutOfRange,
            Status::BadBatchId,
            Status::BatchInProgress,
            Status::TooManyBatches,
            Status::Timeout,
            Status::BadSession,
            Status::PeerUnreachable,
            Status::TransferFailed,
            Status::Io,
            Status::PeerRestarted,
            Status::Protocol,
            Status::AuthFailed,
            Status::TransferTimeout,
            Status::Device,
        ]
    }

    /// A short, static description of the code, NUL-terminated for C.
    pub fn describe_c(self) -> &'static std::ffi::CStr {
        match self {
            Status::Ok => c"ok",
            Status::InProgress => c"in progress",
            Status::InvalidArgument => c"invalid argument",
            Status::NullPointer => c"null pointer",
            Status::Internal => c"internal error",
            Status::Unsupported => c"not supported",
            Status::BufferTooSmall => c"buffer too small",
            Status::ZeroLengthRegion => c"zero-length region",
            Status::RegionOverlap => c"region overlaps a registered region",
            Status::NotRegistered => c"address not registered",
            Status::RegionBusy => c"region in use by an in-flight transfer",
            Status::BadLocation => c"bad location string",
            Status::RegionNotMapped => c"memory not mapped readable and writable",
            Status::ZeroLengthOp => c"zero-length op",
            Status::AddressOverflow => c"address + length overflows",
            Status::LocalOutOfRange => c"local range outside registered memory",
            Status::RemoteOutOfRange => c"remote range outside the peer's registered memory",
            Status::BadBatchId => c"unknown or freed batch id",
            Status::BatchInProgress => c"batch still in progress",
            Status::TooManyBatches => c"too many live batches",
            Status::Timeout => c"timed out",
            Status::BadSession => c"bad session id",
            Status::PeerUnreachable => c"peer unreachable",
            Status::TransferFailed => c"transfer failed",
            Status::Io => c"I/O error",
            Status::PeerRestarted => c"peer restarted",
            Status::Protocol => c"protocol error",
            Status::AuthFailed => c"authentication failed",
            Status::TransferTimeout => c"transfer timed out",
            Status::Device => c"device runtime call failed",
        }
    }

    /// A short, static description of the code.
    pub fn describe(self) -> &'static str {
        self.describe_c().to_str().unwrap_or("")
    }

    /// The status with this numeric code, if there is one.
    pub fn from_code(code: i32) -> Option<Status> {
        Status::all().into_iter().find(|s| *s as i32 == code)
    }
}
