//! Batch calls that take Python lists as they are: the Python package's
//! fast path for the Mooncake API's `batch_transfer_*` calls.
//!
//! Why: a Mooncake-style call passes three lists of ints. Converting them to
//! C arrays in Python (`array('Q', list)`, the fastest way CPython has) costs
//! ~1 µs per list of 32, three times the C call itself: for 32 × 16 KiB on
//! the same host, whose copy takes ~20 µs, that was the difference between
//! 0.78 and 0.9 of the machine's limit (docs/python.md). Here the library
//! walks the lists itself, with the GIL held, then releases the GIL for the
//! transfer.
//!
//! The library neither links against nor looks up Python: the package hands
//! it the addresses of eight functions of the CPython stable ABI and of the
//! two bool objects (`kvf_python_api_install`, from `ctypes.pythonapi`), so
//! one build serves every Python version and the library loads fine where
//! Python is absent.
//! The `_pylists` functions are called through a `ctypes.PyDLL` handle
//! (the GIL held on entry, Python's error indicator checked on return).

use std::ffi::{c_char, c_int, c_ulong, c_void};
use std::sync::OnceLock;

use kvferry_core::{Engine, Error, Op, Opcode, Status};

use crate::boundary::{ffi, refuse};
use crate::engine::kvf_engine;
use crate::handle;
use crate::transfer::transfer_target;

/// What the `_pylists` calls use of the CPython C API (stable ABI): the
/// address of each named function of the running interpreter, then the
/// two bool objects.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct kvf_python_api {
    /// `PyList_Size`.
    pub list_size: Option<unsafe extern "C" fn(list: *mut c_void) -> isize>,
    /// `PyList_GetItem` (a borrowed reference).
    pub list_get_item: Option<unsafe extern "C" fn(list: *mut c_void, index: isize) -> *mut c_void>,
    /// `PyLong_AsUnsignedLong` (64 bits on the LP64 hosts kvferry supports;
    /// no Python code runs: a non-int raises). Not `PyLong_AsUnsignedLongLong`,
    /// which converts ints of more than 30 bits (every address) through a
    /// byte array, 3x slower.
    pub long_as_unsigned_long: Option<unsafe extern "C" fn(value: *mut c_void) -> c_ulong>,
    /// `PyErr_Occurred`.
    pub err_occurred: Option<unsafe extern "C" fn() -> *mut c_void>,
    /// `PyErr_Clear`.
    pub err_clear: Option<unsafe extern "C" fn()>,
    /// `PyEval_SaveThread` (releases the GIL).
    pub eval_save_thread: Option<unsafe extern "C" fn() -> *mut c_void>,
    /// `PyEval_RestoreThread` (takes the GIL back).
    pub eval_restore_thread: Option<unsafe extern "C" fn(state: *mut c_void)>,
    /// `PyErr_BadArgument` (raises TypeError).
    pub err_bad_argument: Option<unsafe extern "C" fn() -> c_int>,
    /// `Py_True`. `bool` subclasses `int`, so `PyLong_AsUnsignedLong`
    /// takes `True` as 1; these two (the only bool objects there are) let
    /// an item be refused with one pointer comparison each.
    pub true_object: *const c_void,
    /// `Py_False`.
    pub false_object: *const c_void,
}

/// The installed functions, every one present.
#[derive(Clone, Copy, Debug)]
struct PythonApi {
    list_size: unsafe extern "C" fn(*mut c_void) -> isize,
    list_get_item: unsafe extern "C" fn(*mut c_void, isize) -> *mut c_void,
    long_as_u64: unsafe extern "C" fn(*mut c_void) -> c_ulong,
    err_occurred: unsafe extern "C" fn() -> *mut c_void,
    err_clear: unsafe extern "C" fn(),
    save_thread: unsafe extern "C" fn() -> *mut c_void,
    restore_thread: unsafe extern "C" fn(*mut c_void),
    bad_argument: unsafe extern "C" fn() -> c_int,
    /// `Py_True` and `Py_False`, compared by address only.
    true_object: usize,
    false_object: usize,
}

static PYTHON_API: OnceLock<PythonApi> = OnceLock::new();

impl PythonApi {
    fn from_c(api: &kvf_python_api) -> Result<Self, Error> {
        fn need<T>(f: Option<T>, field: &str) -> Result<T, Error> {
            f.ok_or_else(|| Error::InvalidArgument {
                what: format!("kvf_python_api.{field} is NULL"),
            })
        }
        let object =
            |p: *const c_void, field: &str| need((!p.is_null()).then_some(p as usize), field);
        Ok(Self {
            list_size: need(api.list_size, "list_size")?,
            list_get_item: need(api.list_get_item, "list_get_item")?,
            long_as_u64: need(api.long_as_unsigned_long, "long_as_unsigned_long")?,
            err_occurred: need(api.err_occurred, "err_occurred")?,
            err_clear: need(api.err_clear, "err_clear")?,
            save_thread: need(api.eval_save_thread, "eval_save_thread")?,
            restore_thread: need(api.eval_restore_thread, "eval_restore_thread")?,
            bad_argument: need(api.err_bad_argument, "err_bad_argument")?,
            true_object: object(api.true_object, "true_object")?,
            false_object: object(api.false_object, "false_object")?,
        })
    }

    fn installed() -> Result<Self, Error> {
        PYTHON_API
            .get()
            .copied()
            .ok_or_else(|| Error::InvalidArgument {
                what: "kvf_python_api_install has not been called".into(),
            })
    }

    /// The length of `list`, or an error if it is not a Python list.
    ///
    /// # Safety
    /// The GIL is held; `list` is NULL or a live Python object.
    unsafe fn list_len(&self, list: *mut c_void, argument: &'static str) -> Result<usize, Error> {
        if list.is_null() {
            return Err(Error::NullPointer { argument });
        }
        // SAFETY: the GIL is held and `list` is live (caller's promise).
        let n = unsafe { (self.list_size)(list) };
        usize::try_from(n).map_err(|_| {
            // SAFETY: as above; PyList_Size raised (not a list).
            unsafe { (self.err_clear)() };
            Error::InvalidArgument {
                what: format!("{argument} is not a Python list"),
            }
        })
    }

    /// Stores item `i` of `list` (a Python list of at least `out.len()`
    /// items) into `field(out[i])` for every `i`; false with Python's error
    /// indicator set (an item that is not an int in 0..2^64, or is a bool:
    /// TypeError or OverflowError) for the caller to raise.
    ///
    /// # Safety
    /// The GIL is held; `list` is a live Python list that long.
    unsafe fn read_column(
        &self,
        list: *mut c_void,
        out: &mut [Op],
        field: fn(&mut Op) -> &mut u64,
    ) -> bool {
        for (i, op) in (0isize..).zip(out.iter_mut()) {
            // SAFETY: the GIL is held and `list` is live with more than `i`
            // items (caller's promise), so the item is a borrowed reference to
            // a live object. Nothing here runs Python code
            // (`PyLong_AsUnsignedLong` raises for a non-int instead of calling
            // `__index__`), so the list cannot change while it is read.
            let item = unsafe { (self.list_get_item)(list, i) };
            if item as usize == self.true_object || item as usize == self.false_object {
                // SAFETY: the GIL is held; sets TypeError, runs no Python code.
                unsafe { (self.bad_argument)() };
                return false;
            }
            // SAFETY: as above; `item` is a live int (or another object, for
            // which this raises).
            let value = unsafe { (self.long_as_u64)(item) };
            // SAFETY: as above.
            if value == c_ulong::MAX && !unsafe { (self.err_occurred)() }.is_null() {
                return false;
            }
            *field(op) = value;
        }
        true
    }
}

/// Gives the library the CPython functions of `*api` (every field set).
/// Needed once per process before a `_pylists` call; later calls check
/// their argument and change nothing.
///
/// # Safety
/// `api` NULL or readable; its fields are the named functions of the
/// running interpreter.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_python_api_install(api: *const kvf_python_api) -> Status {
    ffi!({
        // SAFETY: forwarded to the caller.
        let api = PythonApi::from_c(unsafe { handle::struct_arg(api, "api") }?)?;
        // A process has one CPython (sub-interpreters share its functions):
        // the first install serves every later call.
        PYTHON_API.get_or_init(|| api);
        Ok(Status::Ok)
    })
}

/// A Python list and the field of `Op` its items go to.
type Column = (*mut c_void, fn(&mut Op) -> &mut u64);

/// The ops of three Python lists, read with the GIL held. `Ok(None)`: an
/// item is not an unsigned 64-bit int, Python's error indicator says which
/// and nothing else happened.
///
/// # Safety
/// The GIL is held; the three are NULL or live Python objects.
unsafe fn ops_of_lists(api: &PythonApi, lists: [*mut c_void; 3]) -> Result<Option<Vec<Op>>, Error> {
    let [local, remote, lens] = lists;
    // SAFETY: forwarded to the caller (the three below).
    let n = unsafe { api.list_len(local, "local_addrs") }?;
    // SAFETY: as above.
    let n_remote = unsafe { api.list_len(remote, "remote_addrs") }?;
    // SAFETY: as above.
    let n_lens = unsafe { api.list_len(lens, "lens") }?;
    if n != n_remote || n != n_lens {
        return Err(Error::InvalidArgument {
            what: format!(
                "{n} local addresses, {n_remote} remote addresses and {n_lens} lengths: they must match"
            ),
        });
    }
    if n == 0 {
        return Err(Error::InvalidArgument {
            what: "a batch needs at least one op (empty lists)".into(),
        });
    }
    let mut ops = vec![
        Op {
            local: 0,
            remote: 0,
            len: 0
        };
        n
    ];
    let columns: [Column; 3] = [
        (local, |op| &mut op.local),
        (remote, |op| &mut op.remote),
        (lens, |op| &mut op.len),
    ];
    for (list, field) in columns {
        // SAFETY: the GIL is held; each list is live with `n` items, checked.
        if !unsafe { api.read_column(list, &mut ops, field) } {
            return Ok(None);
        }
    }
    Ok(Some(ops))
}

/// The last error when a list item is refused (Python's exception, raised
/// by ctypes, names the item).
const NOT_U64: &str = "a list item is not an int in 0..2^64 (or is a bool)";

/// Runs `f` with the GIL released, taking it back however `f` ends.
///
/// # Safety
/// The GIL is held by this thread.
unsafe fn without_gil<T>(api: &PythonApi, f: impl FnOnce() -> T) -> T {
    struct Reacquire<'a>(&'a PythonApi, *mut c_void);
    impl Drop for Reacquire<'_> {
        fn drop(&mut self) {
            // SAFETY: the state `PyEval_SaveThread` gave on this thread.
            unsafe { (self.0.restore_thread)(self.1) };
        }
    }
    // SAFETY: the GIL is held (caller's promise).
    let _gil = Reacquire(api, unsafe { (api.save_thread)() });
    f()
}

/// The body of a `_pylists` call: reads the lists with the GIL held, then
/// releases it and runs `f` on the engine, the session, the opcode and the
/// ops. The engine is taken only without the GIL: taking it may wait for
/// `kvf_engine_close`, which waits for calls that need the GIL to return.
///
/// # Safety
/// As `kvf_transfer_sync_pylists`.
unsafe fn with_lists(
    engine: *const kvf_engine,
    session: *const c_char,
    opcode: u32,
    lists: [*mut c_void; 3],
    f: impl FnOnce(&Engine, &str, Opcode, &[Op]) -> Result<(), Error>,
) -> Result<Status, Error> {
    let api = PythonApi::installed()?;
    // SAFETY: the GIL is held (caller's promise).
    let Some(ops) = (unsafe { ops_of_lists(&api, lists) })? else {
        return Ok(refuse(Status::InvalidArgument, NOT_U64));
    };
    // SAFETY: as above; `engine` and `session` are the caller's promise.
    unsafe {
        without_gil(&api, || {
            let (e, session, op) = transfer_target(engine, session, opcode)?;
            f(&e, session, op, &ops)
        })
    }?;
    Ok(Status::Ok)
}

/// `kvf_transfer_sync` with the three columns as Python lists of ints,
/// read before the GIL is released for the transfer. An item that is not an
/// int in 0..2^64, or is a bool, leaves Python's TypeError or OverflowError
/// set (ctypes raises it) and moves nothing.
///
/// # Safety
/// Called through `ctypes.PyDLL` (the GIL held) after
/// `kvf_python_api_install`; `engine` from `kvf_engine_new`; `session` NULL
/// or NUL-terminated; the lists NULL or live Python objects.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_transfer_sync_pylists(
    engine: *const kvf_engine,
    session: *const c_char,
    opcode: u32,
    local_addrs: *mut c_void,
    remote_addrs: *mut c_void,
    lens: *mut c_void,
) -> Status {
    let lists = [local_addrs, remote_addrs, lens];
    ffi!({
        // SAFETY: forwarded to the caller.
        unsafe {
            with_lists(engine, session, opcode, lists, |e, session, op, ops| {
                e.transfer_sync(session, op, ops)
            })
        }
    })
}

/// `kvf_batch_submit` with the three columns as Python lists, as
/// `kvf_transfer_sync_pylists`.
///
/// # Safety
/// As `kvf_transfer_sync_pylists`; `out_batch` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_batch_submit_pylists(
    engine: *const kvf_engine,
    session: *const c_char,
    opcode: u32,
    local_addrs: *mut c_void,
    remote_addrs: *mut c_void,
    lens: *mut c_void,
    out_batch: *mut u64,
) -> Status {
    let lists = [local_addrs, remote_addrs, lens];
    ffi!({
        handle::need_out(out_batch, "out_batch")?;
        let submit = |e: &Engine, session: &str, op, ops: &[Op]| {
            let id = e.submit(session, op, ops)?;
            // SAFETY: checked non-NULL above; writable (caller's promise).
            unsafe { handle::out(out_batch, "out_batch", id.0) }
        };
        // SAFETY: forwarded to the caller.
        unsafe { with_lists(engine, session, opcode, lists, submit) }
    })
}
