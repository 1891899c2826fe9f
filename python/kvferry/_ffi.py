"""Loading libkvferry.so and declaring every C function it exports.

Each `kvf_*` function of include/kvferry.h has one entry in `SIGNATURES`
(restype, argtypes); tests/test_header.py parses the header and fails when an
entry disagrees with its declaration or a declared function has none. Nothing
outside this module touches the CDLL object directly.

ctypes releases the GIL for every call through a `CDLL`, so a transfer that
blocks in the library never blocks other Python threads.
"""

from __future__ import annotations

import array
import ctypes
import ctypes.util
import math
import numbers
import operator
import os
import sys
import threading
from pathlib import Path

c_engine_p = ctypes.c_void_p  # struct kvf_engine *
c_config_p = ctypes.c_void_p  # struct kvf_config *
c_status = ctypes.c_int32  # kvf_status (int32_t in C before C23)


_u64_p = ctypes.POINTER(ctypes.c_uint64)
# `const uint64_t *` columns of a batch (local addresses, remote addresses,
# lengths): passed as the int address of an `array('Q')` (`u64_columns`).
# A ctypes object per column would cost more than the C call itself.
_column = ctypes.c_void_p
_size_p = ctypes.POINTER(ctypes.c_size_t)
_i32_p = ctypes.POINTER(ctypes.c_int32)
_u16_p = ctypes.POINTER(ctypes.c_uint16)

#: name -> (restype, argtypes), in header order.
SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "kvf_version": (ctypes.c_char_p, []),
    "kvf_status_str": (ctypes.c_char_p, [ctypes.c_int32]),
    "kvf_last_error": (ctypes.c_char_p, []),
    "kvf_config_new": (c_status, [ctypes.POINTER(c_config_p)]),
    "kvf_config_free": (None, [c_config_p]),
    "kvf_config_set_hostname": (c_status, [c_config_p, ctypes.c_char_p]),
    "kvf_config_set_port": (c_status, [c_config_p, ctypes.c_uint16]),
    "kvf_config_set_port_range": (c_status, [c_config_p, ctypes.c_uint16, ctypes.c_uint16]),
    "kvf_config_set_connect_timeout_ms": (c_status, [c_config_p, ctypes.c_uint64]),
    "kvf_config_set_transfer_timeout_ms": (c_status, [c_config_p, ctypes.c_uint64]),
    "kvf_config_set_slice_size": (c_status, [c_config_p, ctypes.c_uint64]),
    "kvf_config_set_async_workers": (c_status, [c_config_p, ctypes.c_uint32]),
    "kvf_config_set_transport": (c_status, [c_config_p, ctypes.c_char_p]),
    "kvf_config_set_secret": (c_status, [c_config_p, ctypes.c_char_p]),
    "kvf_config_set_lanes": (c_status, [c_config_p, ctypes.c_uint32]),
    "kvf_config_set_max_connections": (c_status, [c_config_p, ctypes.c_uint32]),
    "kvf_config_use_ascend": (c_status, [c_config_p]),
    "kvf_engine_new": (c_status, [c_config_p, ctypes.POINTER(c_engine_p)]),
    "kvf_engine_close": (c_status, [c_engine_p, ctypes.c_uint64]),
    "kvf_engine_free": (None, [c_engine_p]),
    "kvf_engine_name": (c_status, [c_engine_p, ctypes.c_char_p, ctypes.c_size_t, _size_p]),
    "kvf_engine_rpc_port": (c_status, [c_engine_p, _u16_p]),
    "kvf_register_memory": (
        c_status,
        [c_engine_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_char_p],
    ),
    "kvf_register_memory_batch": (
        c_status,
        [c_engine_p, _u64_p, _u64_p, ctypes.c_size_t, ctypes.c_char_p],
    ),
    "kvf_unregister_memory": (c_status, [c_engine_p, ctypes.c_uint64]),
    "kvf_unregister_memory_batch": (c_status, [c_engine_p, _u64_p, ctypes.c_size_t]),
    "kvf_notify": (c_status, [c_engine_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]),
    "kvf_notify_recv": (
        c_status,
        [
            c_engine_p,
            ctypes.c_char_p,
            ctypes.c_size_t,
            _size_p,
            ctypes.c_char_p,
            ctypes.c_size_t,
            _size_p,
            _i32_p,
        ],
    ),
    "kvf_engine_transport_to": (
        c_status,
        [c_engine_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, _size_p],
    ),
    "kvf_engine_peer_regions": (
        c_status,
        [c_engine_p, ctypes.c_char_p, _u64_p, _u64_p, ctypes.c_size_t, _size_p],
    ),
    "kvf_transfer_sync": (
        c_status,
        [c_engine_p, ctypes.c_char_p, ctypes.c_uint32, _column, _column, _column, ctypes.c_size_t],
    ),
    "kvf_batch_submit": (
        c_status,
        [
            c_engine_p,
            ctypes.c_char_p,
            ctypes.c_uint32,
            _column,
            _column,
            _column,
            ctypes.c_size_t,
            _u64_p,
        ],
    ),
    "kvf_batch_submit_write_notify": (
        c_status,
        [
            c_engine_p,
            ctypes.c_char_p,
            _column,
            _column,
            _column,
            ctypes.c_size_t,
            ctypes.c_char_p,
            ctypes.c_size_t,
            _u64_p,
        ],
    ),
    "kvf_python_api_install": (c_status, [ctypes.c_void_p]),
    "kvf_transfer_sync_pylists": (
        c_status,
        [c_engine_p, ctypes.c_char_p, ctypes.c_uint32, ctypes.py_object, ctypes.py_object, ctypes.py_object],
    ),
    "kvf_batch_submit_pylists": (
        c_status,
        [
            c_engine_p,
            ctypes.c_char_p,
            ctypes.c_uint32,
            ctypes.py_object,
            ctypes.py_object,
            ctypes.py_object,
            _u64_p,
        ],
    ),
    "kvf_batch_poll": (c_status, [c_engine_p, ctypes.c_uint64]),
    "kvf_batch_wait": (c_status, [c_engine_p, ctypes.c_uint64, ctypes.c_uint64]),
    "kvf_batch_op_status": (
        c_status,
        [c_engine_p, ctypes.c_uint64, ctypes.c_size_t, _i32_p],
    ),
    "kvf_batch_free": (c_status, [c_engine_p, ctypes.c_uint64]),
}

# kvf_topology_*, kvf_layout_*, kvf_plan_blocks, kvf_*_blocks (and their structs).
from ._topology_ffi import SIGNATURES as _TOPOLOGY_SIGNATURES  # noqa: E402

SIGNATURES.update(_TOPOLOGY_SIGNATURES)

# Constants of the header (checked against it by tests/test_header.py).
KVF_OP_READ = 0
KVF_OP_WRITE = 1
KVF_WAIT_FOREVER = (1 << 64) - 1

LIBRARY_NAME = "libkvferry.so"

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_path: str | None = None


def candidate_paths() -> list[Path]:
    """Where the library is looked for, first match wins.

    1. `KVFERRY_LIBRARY` (a file path), when set.
    2. Inside the package (what `pip install` and wheels put there).
    3. target/release then target/debug of the source checkout this package
       sits in (running from a git clone without installing).
    """
    env = os.environ.get("KVFERRY_LIBRARY")
    if env:
        return [Path(env)]
    here = Path(__file__).resolve().parent
    paths = [here / LIBRARY_NAME]
    repo = here.parent.parent
    if (repo / "Cargo.toml").is_file():
        target = Path(os.environ.get("CARGO_TARGET_DIR", repo / "target"))
        paths += [target / "release" / LIBRARY_NAME, target / "debug" / LIBRARY_NAME]
    return paths


#: Functions called through a `ctypes.PyDLL` handle (`pylists()`): they
#: read Python lists with the GIL held and release it themselves.
PYLISTS_FUNCTIONS = ("kvf_transfer_sync_pylists", "kvf_batch_submit_pylists")

#: The function fields of `struct kvf_python_api`, in order: the CPython
#: function each one is set to (tests/test_header.py checks the names).
PYTHON_API_FIELDS = (
    ("list_size", "PyList_Size"),
    ("list_get_item", "PyList_GetItem"),
    ("long_as_unsigned_long", "PyLong_AsUnsignedLong"),
    ("err_occurred", "PyErr_Occurred"),
    ("err_clear", "PyErr_Clear"),
    ("eval_save_thread", "PyEval_SaveThread"),
    ("eval_restore_thread", "PyEval_RestoreThread"),
    ("err_bad_argument", "PyErr_BadArgument"),
)

#: The object fields that follow them: `Py_True` and `Py_False`, by address
#: (CPython's `id()`), so that the library refuses bools as ints.
PYTHON_API_OBJECTS = (
    ("true_object", True),
    ("false_object", False),
)


class PythonApi(ctypes.Structure):
    """`struct kvf_python_api`: function pointers, then object pointers,
    each as its address."""

    _fields_ = [(field, ctypes.c_void_p) for field, _ in PYTHON_API_FIELDS + PYTHON_API_OBJECTS]


def _declare(lib: ctypes.CDLL, names=None) -> None:
    """Declares `names` (default: every function a CDLL handle serves)."""
    for name in names or (n for n in SIGNATURES if n not in PYLISTS_FUNCTIONS):
        restype, argtypes = SIGNATURES[name]
        fn = getattr(lib, name)  # AttributeError names a missing export
        fn.restype = restype
        fn.argtypes = argtypes


_pylists: ctypes.PyDLL | None = None
_pylists_checked = False


def pylists() -> ctypes.PyDLL | None:
    """The library as a `ctypes.PyDLL` with `PYLISTS_FUNCTIONS` declared, or
    None where they cannot serve (not CPython, a free-threaded build, or
    `KVFERRY_PYLISTS=0`): callers then convert lists to arrays themselves.

    Why: the Mooncake API passes three lists of ints per batch; the library
    reads them in ~0.3 µs where `array('Q', list)` takes ~1 µs per list
    (crates/kvferry-capi/src/python.rs, benches/python_call.py)."""
    global _pylists, _pylists_checked
    if _pylists_checked:
        return _pylists
    lib = load()  # before taking _lock, which load() takes too
    with _lock:
        if not _pylists_checked:
            _pylists = _load_pylists(lib)
            _pylists_checked = True
    return _pylists


def _load_pylists(lib: ctypes.CDLL) -> ctypes.PyDLL | None:
    import sysconfig

    if (
        sys.implementation.name != "cpython"
        or sysconfig.get_config_var("Py_GIL_DISABLED")
        or os.environ.get("KVFERRY_PYLISTS") == "0"
        or ctypes.sizeof(ctypes.c_ulong) != 8  # PyLong_AsUnsignedLong reads a uint64_t
    ):
        return None
    api = PythonApi(
        *(ctypes.cast(getattr(ctypes.pythonapi, fn), ctypes.c_void_p).value for _, fn in PYTHON_API_FIELDS),
        *(id(obj) for _, obj in PYTHON_API_OBJECTS),
    )
    if lib.kvf_python_api_install(ctypes.addressof(api)) != 0:
        return None
    py = ctypes.PyDLL(library_path())
    _declare(py, PYLISTS_FUNCTIONS)
    return py


def load() -> ctypes.CDLL:
    """The library, loaded once per process with every signature declared."""
    global _lib, _lib_path
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        tried = []
        for path in candidate_paths():
            if not path.is_file():
                tried.append(f"{path} (missing)")
                continue
            try:
                lib = ctypes.CDLL(str(path))
                _declare(lib)
            except (OSError, AttributeError) as e:
                tried.append(f"{path} ({e})")
                continue
            _lib, _lib_path = lib, str(path)
            return lib
        found = ctypes.util.find_library("kvferry") if not os.environ.get("KVFERRY_LIBRARY") else None
        if found:
            try:
                lib = ctypes.CDLL(found)
                _declare(lib)
                _lib, _lib_path = lib, found
                return lib
            except (OSError, AttributeError) as e:
                tried.append(f"{found} ({e})")
        raise ImportError(
            "kvferry: cannot load libkvferry.so; tried: "
            + "; ".join(tried)
            + ". Install the package with `pip install ./python` (builds the library), "
            "or set KVFERRY_LIBRARY to the path of a libkvferry.so "
            "(`cargo build --release -p kvferry-capi` gives target/release/libkvferry.so)."
        )


def library_path() -> str:
    """The file the library was loaded from."""
    load()
    assert _lib_path is not None
    return _lib_path


def integer(value, what: str, expected: str = "an int") -> int:
    """`value` as an int: an int, or an integer of another type (numpy's, an
    IntEnum) as the int it is, as pybind11 takes them in Mooncake; a bool,
    float or str is refused (TypeError naming `what`) rather than read as a
    number."""
    if type(value) is int:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what}: expected {expected}, got {type(value).__name__} {value!r}")
    return operator.index(value)


def uint(value, what: str, bits: int = 64) -> int:
    """`value` as an unsigned `bits`-bit int ([`integer`]), refusing what
    ctypes would wrap silently (negative numbers, huge numbers), as lists of
    them are (`_u64s`)."""
    value = integer(value, what)
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{what}: {value} is not an unsigned {bits}-bit value")
    return value


# Addresses, lengths and ids: the common width (an alias: no extra call).
u64 = uint


def opcode(value) -> int:
    """`KVF_OP_READ` or `KVF_OP_WRITE` from an int (or an IntEnum such as
    `TransferOpcode`, or a numpy integer); a float, bool or str is refused
    rather than truncated or parsed."""
    op = integer(value, "opcode", "kvferry.READ or kvferry.WRITE")
    if op not in (KVF_OP_READ, KVF_OP_WRITE):
        raise ValueError(f"opcode: expected kvferry.READ (0) or kvferry.WRITE (1), got {value!r}")
    return op


def timeout_ms(seconds, what: str) -> int:
    """A timeout in seconds as the `uint64_t timeout_ms` of a wait: None is
    `KVF_WAIT_FOREVER`; a real number must be finite, not negative, and
    below it (ctypes would wrap `1e30` or `-1` into some other wait)."""
    if seconds is None:
        return KVF_WAIT_FOREVER
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real):
        raise TypeError(f"{what}: expected seconds as a number or None, got {type(seconds).__name__} {seconds!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{what}: {seconds!r} is not a finite, non-negative number of seconds (None: no limit)")
    ms = int(seconds * 1000)
    if ms >= KVF_WAIT_FOREVER:
        raise ValueError(f"{what}: {seconds!r} s is longer than the library can wait (None: no limit)")
    return ms


def _u64s(values, what: str) -> array.array:
    """`values` as an `array('Q')`, converted and checked (type and range of
    every element) in C, or a TypeError / ValueError naming the bad item
    (`what[i]` and its value)."""
    if isinstance(values, (str, bytes, bytearray, memoryview)) or not hasattr(values, "__iter__"):
        # array() would read bytes as raw machine words: refuse them here.
        raise TypeError(f"{what}: expected a list of ints, got {type(values).__name__}")
    if not hasattr(values, "__len__"):
        values = list(values)  # an iterator can be read once: keep its items to name a bad one
    kind = type(values)
    try:
        arr = array.array("Q", values)
    except (TypeError, OverflowError):
        raise _bad_item(values, what) from None
    # array('Q') takes a bool as the int it subclasses (True: a length of one
    # byte). Refused as by `u64` and the library's list fast path; items of
    # arrays (array('Q'), numpy, torch) are never Python bools.
    holds_objects = kind is list or kind is tuple or not (kind is array.array or hasattr(values, "dtype"))
    if holds_objects and bool in map(type, values):
        raise _bad_item(values, what)
    return arr


def _bad_item(values, what: str) -> Exception:
    """The error naming the first item of `values` that is not an unsigned
    64-bit int (a bool, a float, a str, a negative or too large number,
    also as a numpy scalar)."""
    for i, v in enumerate(values):
        if isinstance(v, bool):
            return TypeError(f"{what}[{i}]: expected an int, got bool {v!r}")
        try:
            n = operator.index(v)
        except TypeError:
            return TypeError(f"{what}[{i}]: expected an int, got {type(v).__name__} {v!r}")
        if not 0 <= n < 1 << 64:
            return ValueError(f"{what}[{i}]: {v!r} is not an unsigned 64-bit value")
    return TypeError(f"{what}: expected a list of unsigned 64-bit ints")


def u64_array(values, what: str):
    """A ctypes uint64 array from a sequence of unsigned 64-bit ints.

    `array('Q', ...)` checks every element in C (type and range), which keeps
    a 32-op batch at a few microseconds; the ctypes view keeps it alive.
    """
    arr = _u64s(values, what)
    n = len(arr)
    t = _U64_ARRAYS.get(n)
    if t is None:
        t = _U64_ARRAYS[n] = ctypes.c_uint64 * n
    return t.from_buffer(arr) if n else t()


def u64_columns(columns, names) -> tuple[list, list[int], object]:
    """Lists of unsigned 64-bit ints as C arrays: the address of each (for a
    `_column` argument; None when empty), each list's length, and the
    object that keeps the memory alive. No ctypes object per column: for a
    32-op batch that would cost more than the C call (benches/python_call.py)."""
    arrays, pointers, counts = [], [], []
    for values, what in zip(columns, names):
        arr = _u64s(values, what)
        arrays.append(arr)
        counts.append(len(arr))
        pointers.append(arr.buffer_info()[0] if len(arr) else None)
    return pointers, counts, arrays


# ctypes array types by length: building `c_uint64 * n` on every call costs
# as much as filling it.
_U64_ARRAYS: dict[int, type] = {}


if sys.byteorder != "little":  # pragma: no cover - every supported host is
    raise ImportError("kvferry supports little-endian hosts only")
