//! The loaded ACL runtime and the process-wide state around it: device
//! contexts, pooled streams, IPC exports and imports.
//!
//! ACL's state is per process (aclInit, IPC imports: "import a key once per
//! process") and its device selection is per thread. So there is one [`Rt`]
//! per loaded library per process, shared by every engine of the process,
//! and every call that needs a device runs under a [`DeviceGuard`], which
//! makes the device current on the calling thread and puts back whatever
//! the thread had before (a torch_npu thread keeps its own device).

use std::collections::HashMap;
use std::ffi::{CString, c_void};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Weak};
use std::time::Instant;

use kvferry::Error;
use kvferry_ascend_sys::{Acl, AclError, DEFAULT_LIBRARY, LIBRARY_ENV, ffi};
use parking_lot::Mutex;

use crate::optional;

/// An ACL handle (a context or a stream). Handles are process-wide: any
/// thread may use one once the handle's device is current on it, which
/// [`DeviceGuard`] ensures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Handle(pub(crate) *mut c_void);

// SAFETY: an ACL context or stream handle is an opaque token valid in the
// whole process; ACL does not tie it to the thread that created it (only the
// *current* context is per thread, and every use sets it first).
unsafe impl Send for Handle {}
// SAFETY: as above; the handle itself is never dereferenced by Rust.
unsafe impl Sync for Handle {}

/// A kvferry error for an ACL failure: `Device` with the function, the
/// code and ACL's text; a function or runtime that is missing is
/// `Unsupported`, with the reason.
pub(crate) fn acl_error(context: impl Into<String>, e: AclError) -> Error {
    let context = context.into();
    match &e {
        AclError::Call { function, code, .. } => Error::Device {
            context,
            function: (*function).to_owned(),
            code: i64::from(*code),
            detail: e.to_string(),
        },
        _ => Error::Unsupported {
            what: format!("{context}: {e}"),
        },
    }
}

/// An exported device region: its key and who may import it.
#[derive(Debug)]
pub(crate) struct Export {
    pub(crate) key: CString,
    pub(crate) device: u32,
    pub(crate) len: u64,
    /// Engines of this process that registered this memory.
    pub(crate) users: usize,
    /// Pids already allowed to import the key.
    pub(crate) allowed: Vec<i32>,
}

/// The exports of this process, and the importers every export allows.
#[derive(Debug, Default)]
pub(crate) struct Exports {
    pub(crate) by_addr: HashMap<u64, Export>,
    /// Importer pids peers announced (`aclrtDeviceGetBareTgid`): each
    /// export made later allows them too.
    pub(crate) granted: Vec<i32>,
}

/// A peer region's memory imported into this process.
#[derive(Debug)]
pub(crate) struct Import {
    /// Where the region starts in this process.
    pub(crate) base: u64,
    /// The device that holds it, as this process numbers devices.
    pub(crate) device: u32,
    /// The device that was current when it was imported (closed there).
    pub(crate) opened_on: u32,
    /// Transports using it; closed when the last one lets go.
    pub(crate) users: usize,
}

/// Counters tests and operators read.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) streams_aborted: AtomicU64,
    pub(crate) imports: AtomicU64,
}

/// The ACL runtime of this process.
#[derive(Debug)]
pub(crate) struct Rt {
    pub(crate) acl: Acl,
    pub(crate) device_count: u32,
    contexts: Mutex<HashMap<u32, Handle>>,
    streams: Mutex<HashMap<u32, Vec<Handle>>>,
    pub(crate) exports: Mutex<Exports>,
    pub(crate) imports: Mutex<HashMap<CString, Import>>,
    pub(crate) counters: Counters,
}

/// Loaded runtimes by library, so engines of one process share one.
static LOADED: LazyLock<Mutex<HashMap<PathBuf, Weak<Rt>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

impl Rt {
    /// The runtime from `library`, else `KVFERRY_ACL_LIBRARY`, else
    /// `libascendcl.so`; loaded and initialised once per process.
    pub(crate) fn get(library: Option<PathBuf>) -> Result<Arc<Rt>, Error> {
        let path = library.unwrap_or_else(|| {
            std::env::var_os(LIBRARY_ENV)
                .filter(|v| !v.is_empty())
                .map_or_else(|| PathBuf::from(DEFAULT_LIBRARY), PathBuf::from)
        });
        let mut loaded = LOADED.lock();
        if let Some(rt) = loaded.get(&path).and_then(Weak::upgrade) {
            return Ok(rt);
        }
        let acl = Acl::load_from(&path).map_err(|e| Error::Unsupported {
            what: e.to_string(),
        })?;
        // SAFETY: aclInit takes a config path or NULL.
        match unsafe { acl.aclInit(std::ptr::null()) } {
            Ok(()) => {}
            // torch_npu (or another engine) initialised ACL first.
            Err(e) if e.code() == Some(ffi::ACL_ERROR_REPEAT_INITIALIZE) => {}
            Err(e) => return Err(acl_error("initialising the Ascend runtime", e)),
        }
        let mut count = 0u32;
        // SAFETY: `count` is a valid place for the count.
        unsafe { acl.aclrtGetDeviceCount(&mut count) }
            .map_err(|e| acl_error("counting NPUs", e))?;
        let rt = Arc::new(Rt {
            acl,
            device_count: count,
            contexts: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
            exports: Mutex::new(Exports::default()),
            imports: Mutex::new(HashMap::new()),
            counters: Counters::default(),
        });
        loaded.insert(path, Arc::downgrade(&rt));
        Ok(rt)
    }

    pub(crate) fn check_device(&self, device: u32) -> Result<(), Error> {
        if device < self.device_count {
            return Ok(());
        }
        Err(Error::InvalidArgument {
            what: format!(
                "npu:{device} does not exist: the Ascend runtime sees {} NPU(s) (ASCEND_RT_VISIBLE_DEVICES renumbers them from 0)",
                self.device_count
            ),
        })
    }

    /// Makes `device` current on the calling thread until the guard drops.
    pub(crate) fn enter(&self, device: u32) -> Result<DeviceGuard<'_>, Error> {
        self.check_device(device)?;
        let mut current: ffi::aclrtContext = std::ptr::null_mut();
        // SAFETY: `current` is a valid place for a context handle. A thread
        // without a context gets an error here, which only means "none".
        let previous = unsafe { self.acl.aclrtGetCurrentContext(&mut current) }
            .ok()
            .map(|()| Handle(current))
            .filter(|h| !h.0.is_null());
        let context = self.context(device)?;
        if previous != Some(context) {
            // SAFETY: `context` came from aclrtGetCurrentContext for this
            // device and contexts live as long as the process.
            unsafe { self.acl.aclrtSetCurrentContext(context.0) }
                .map_err(|e| acl_error(format!("making npu:{device} current on this thread"), e))?;
        }
        Ok(DeviceGuard {
            rt: self,
            restore: previous.filter(|p| *p != context),
        })
    }

    /// The default context of `device`; the first use in the process
    /// creates it with aclrtSetDevice (on the calling thread, whose own
    /// context [`Rt::enter`] puts back afterwards).
    fn context(&self, device: u32) -> Result<Handle, Error> {
        if let Some(c) = self.contexts.lock().get(&device) {
            return Ok(*c);
        }
        // SAFETY: `device` was checked against the device count.
        unsafe { self.acl.aclrtSetDevice(device as i32) }
            .map_err(|e| acl_error(format!("opening npu:{device}"), e))?;
        let mut context: ffi::aclrtContext = std::ptr::null_mut();
        // SAFETY: `context` is a valid place for the handle.
        unsafe { self.acl.aclrtGetCurrentContext(&mut context) }
            .map_err(|e| acl_error(format!("reading the context of npu:{device}"), e))?;
        Ok(*self
            .contexts
            .lock()
            .entry(device)
            .or_insert(Handle(context)))
    }

    /// Queues work on a stream of `device` with `submit`, then waits for it
    /// until `deadline` (`aclrtSynchronizeStreamWithTimeout`). On any
    /// failure, a timeout included, the stream is aborted
    /// (`aclrtStreamAbort`): nothing stays queued. `what` names the work in
    /// errors.
    pub(crate) fn on_stream(
        &self,
        device: u32,
        deadline: Instant,
        what: &dyn Fn() -> String,
        submit: impl FnOnce(ffi::aclrtStream) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let _guard = self.enter(device)?;
        let pooled = self.streams.lock().get_mut(&device).and_then(Vec::pop);
        let stream = match pooled {
            Some(s) => s,
            None => Handle(
                optional::create_stream(&self.acl)
                    .map_err(|e| acl_error(format!("{}: creating a stream", what()), e))?,
            ),
        };
        let result = if Instant::now() >= deadline {
            Err(Error::Timeout {
                what: format!("{} (the deadline passed before it started)", what()),
                ms: 0,
            })
        } else {
            submit(stream.0).and_then(|()| self.sync(stream, deadline, what))
        };
        match &result {
            Ok(()) => self.streams.lock().entry(device).or_default().push(stream),
            Err(_) => self.abort(device, stream),
        }
        result
    }

    fn sync(
        &self,
        stream: Handle,
        deadline: Instant,
        what: &dyn Fn() -> String,
    ) -> Result<(), Error> {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
        // SAFETY: `stream` is a live stream of the device current on this
        // thread (on_stream's guard).
        match unsafe { optional::sync_stream(&self.acl, stream.0, ms) } {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some(ffi::ACL_ERROR_RT_STREAM_SYNC_TIMEOUT) => {
                Err(Error::Timeout {
                    what: format!("{}: {e}; the stream was aborted", what()),
                    ms: ms as u64,
                })
            }
            Err(e) => Err(acl_error(
                format!("{}: the copies failed on the device", what()),
                e,
            )),
        }
    }

    /// Discards a failed stream's queued work; the stream is reused only if
    /// that worked.
    fn abort(&self, device: u32, stream: Handle) {
        self.counters
            .streams_aborted
            .fetch_add(1, Ordering::Relaxed);
        // SAFETY: `stream` is a live stream of the current device.
        match unsafe { optional::abort_stream(&self.acl, stream.0) } {
            Ok(()) => self.streams.lock().entry(device).or_default().push(stream),
            Err(e) => {
                log::error!(
                    "kvferry: cannot abort a failed stream of npu:{device}: {e}; it is not used again"
                );
                // SAFETY: as above; destroying may fail when work is still
                // queued, and the stream is leaked then (never reused).
                if let Err(e) = unsafe { self.acl.aclrtDestroyStream(stream.0) } {
                    log::error!("kvferry: cannot destroy that stream either: {e}");
                }
            }
        }
    }

    /// The streams this runtime holds, for the stats.
    pub(crate) fn pooled_streams(&self) -> usize {
        self.streams.lock().values().map(Vec::len).sum()
    }
}

impl Drop for Rt {
    fn drop(&mut self) {
        let streams = std::mem::take(&mut *self.streams.lock());
        for (device, list) in streams {
            let Ok(_guard) = self.enter(device) else {
                continue;
            };
            for s in list {
                // SAFETY: a pooled stream is idle and of this device.
                if let Err(e) = unsafe { self.acl.aclrtDestroyStream(s.0) } {
                    log::warn!("kvferry: destroying a stream of npu:{device}: {e}");
                }
            }
        }
    }
}

/// The calling thread's device while it lives; the thread's previous
/// context comes back when it drops.
#[derive(Debug)]
pub(crate) struct DeviceGuard<'a> {
    rt: &'a Rt,
    restore: Option<Handle>,
}

impl Drop for DeviceGuard<'_> {
    fn drop(&mut self) {
        if let Some(previous) = self.restore {
            // SAFETY: `previous` was this thread's current context when the
            // guard was made; contexts outlive the guard.
            if let Err(e) = unsafe { self.rt.acl.aclrtSetCurrentContext(previous.0) } {
                log::warn!("kvferry: cannot restore this thread's ACL context: {e}");
            }
        }
    }
}
