"""What test_topology.py needs around `kvferry.topology`, in both states of
the tree:

- with the kvferry Python package present (installed, or python/ with its
  `__init__.py`, `_ffi.py`, `_errors.py`, `engine.py`): the real thing;
- without it (the topology branch before the package is merged): python/ is
  put on `sys.path` (kvferry is then a namespace package holding only the
  topology modules) and minimal stand-ins for `kvferry._ffi` and
  `kvferry._errors` are installed, loading libkvferry.so from
  `KVFERRY_LIBRARY` or the checkout's target/release, target/debug. A small
  engine wrapper over the C API stands in for `kvferry.Engine`.

A plain module rather than conftest.py: the package's own tests/conftest.py
lives next to this file once the branches merge.
"""

from __future__ import annotations

import array
import ctypes
import enum
import os
import sys
import types
from pathlib import Path

PYTHON_DIR = Path(__file__).resolve().parents[1]
REPO = PYTHON_DIR.parent


def _has_package() -> bool:
    try:
        import kvferry._errors  # noqa: F401
        import kvferry._ffi  # noqa: F401
        import kvferry.engine  # noqa: F401
    except ImportError:
        return False
    return True


HAVE_PACKAGE = _has_package()


# ---- stand-ins ------------------------------------------------------------------


def _library_candidates() -> list[Path]:
    env = os.environ.get("KVFERRY_LIBRARY")
    if env:
        return [Path(env)]
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return [target / "release" / "libkvferry.so", target / "debug" / "libkvferry.so"]


_c_void_pp = ctypes.POINTER(ctypes.c_void_p)
_BASIC_SIGNATURES = {
    "kvf_status_str": (ctypes.c_char_p, [ctypes.c_int32]),
    "kvf_last_error": (ctypes.c_char_p, []),
    "kvf_config_new": (ctypes.c_int32, [_c_void_pp]),
    "kvf_config_free": (None, [ctypes.c_void_p]),
    "kvf_config_set_hostname": (ctypes.c_int32, [ctypes.c_void_p, ctypes.c_char_p]),
    "kvf_engine_new": (ctypes.c_int32, [ctypes.c_void_p, _c_void_pp]),
    "kvf_engine_free": (None, [ctypes.c_void_p]),
    "kvf_engine_name": (
        ctypes.c_int32,
        [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)],
    ),
    "kvf_register_memory": (ctypes.c_int32, [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_char_p]),
    "kvf_batch_wait": (ctypes.c_int32, [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64]),
    "kvf_batch_free": (ctypes.c_int32, [ctypes.c_void_p, ctypes.c_uint64]),
}


def _make_ffi() -> types.ModuleType:
    ffi = types.ModuleType("kvferry._ffi")
    ffi.KVF_OP_READ = 0
    ffi.KVF_OP_WRITE = 1
    ffi.KVF_WAIT_FOREVER = (1 << 64) - 1
    state: dict = {}
    array_types: dict = {}

    def load():
        if "lib" not in state:
            tried = []
            for path in _library_candidates():
                if path.is_file():
                    lib = ctypes.CDLL(str(path))
                    for name, (restype, argtypes) in _BASIC_SIGNATURES.items():
                        getattr(lib, name).restype = restype
                        getattr(lib, name).argtypes = argtypes
                    state["lib"], state["path"] = lib, str(path)
                    break
                tried.append(str(path))
            else:
                raise ImportError(
                    "libkvferry.so not found (tried " + ", ".join(tried) + "): set KVFERRY_LIBRARY "
                    "or run `cargo build -p kvferry-capi`"
                )
        return state["lib"]

    def library_path():
        load()
        return state["path"]

    def u64(value, what):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{what}: expected an int, got {type(value).__name__} {value!r}")
        if not 0 <= value < 1 << 64:
            raise ValueError(f"{what}: {value} is not an unsigned 64-bit value")
        return value

    def u64_array(values, what):
        if isinstance(values, (str, bytes, bytearray, memoryview)) or not hasattr(values, "__iter__"):
            raise TypeError(f"{what}: expected a list of ints, got {type(values).__name__}")
        try:
            arr = array.array("Q", values)
        except TypeError:
            raise TypeError(f"{what}: expected a list of ints") from None
        except OverflowError:
            raise ValueError(f"{what}: a value is not an unsigned 64-bit value") from None
        # Array types cached by length, as the package does: making one
        # costs more than filling it.
        t = array_types.get(len(arr))
        if t is None:
            t = array_types[len(arr)] = ctypes.c_uint64 * len(arr)
        return t.from_buffer(arr) if len(arr) else t()

    ffi.load, ffi.library_path, ffi.u64, ffi.u64_array = load, library_path, u64, u64_array
    return ffi


class _Status(enum.IntEnum):
    OK = 0
    IN_PROGRESS = 1
    INVALID_ARGUMENT = -1
    NULL_POINTER = -2
    INTERNAL = -3
    UNSUPPORTED = -4
    BUFFER_TOO_SMALL = -5
    ZERO_LENGTH_REGION = -10
    REGION_OVERLAP = -11
    NOT_REGISTERED = -12
    REGION_BUSY = -13
    BAD_LOCATION = -14
    ZERO_LENGTH_OP = -20
    ADDRESS_OVERFLOW = -21
    LOCAL_OUT_OF_RANGE = -22
    REMOTE_OUT_OF_RANGE = -23
    BAD_BATCH_ID = -30
    BATCH_IN_PROGRESS = -31
    TOO_MANY_BATCHES = -32
    TIMEOUT = -33
    BAD_SESSION = -40
    PEER_UNREACHABLE = -41
    TRANSFER_FAILED = -42
    IO = -43
    PEER_RESTARTED = -44
    PROTOCOL = -45
    AUTH_FAILED = -46
    DEVICE = -50


class _Error(Exception):
    def __init__(self, status, message):
        try:
            self.status = _Status(int(status))
        except ValueError:
            self.status = int(status)
        self.message = message
        super().__init__(message)


def _install_stand_ins() -> None:
    if str(PYTHON_DIR) not in sys.path:
        sys.path.insert(0, str(PYTHON_DIR))
    import kvferry  # the namespace package python/kvferry

    errors = types.ModuleType("kvferry._errors")
    errors.Status, errors.Error = _Status, _Error
    ffi = _make_ffi()
    sys.modules["kvferry._errors"], sys.modules["kvferry._ffi"] = errors, ffi
    kvferry._errors, kvferry._ffi = errors, ffi
    kvferry.Error, kvferry.Status = _Error, _Status


if not HAVE_PACKAGE:
    _install_stand_ins()

import kvferry  # noqa: E402
from kvferry import _ffi, topology  # noqa: E402
from kvferry._errors import Error, Status  # noqa: E402


# ---- engines --------------------------------------------------------------------


class _MiniBatch:
    def __init__(self, engine, batch_id):
        self.engine, self.id = engine, batch_id

    def wait(self):
        self.engine._check(self.engine._lib.kvf_batch_wait(self.engine._ptr, self.id, _ffi.KVF_WAIT_FOREVER))

    def free(self):
        self.engine._check(self.engine._lib.kvf_batch_free(self.engine._ptr, self.id))


class _MiniEngine:
    """The part of `kvferry.Engine` the topology tests use, straight over
    the C API."""

    def __init__(self):
        lib = self._lib = _ffi.load()
        cfg = ctypes.c_void_p()
        self._check(lib.kvf_config_new(ctypes.byref(cfg)))
        try:
            self._check(lib.kvf_config_set_hostname(cfg, b"127.0.0.1"))
            ptr = ctypes.c_void_p()
            self._check(lib.kvf_engine_new(cfg, ctypes.byref(ptr)))
        finally:
            lib.kvf_config_free(cfg)
        self._ptr = ptr.value
        name = ctypes.create_string_buffer(300)
        self._check(lib.kvf_engine_name(self._ptr, name, len(name), None))
        self.name = name.value.decode()

    def _check(self, status):
        if status:
            raise _Error(status, (self._lib.kvf_last_error() or b"").decode())

    def _call(self, fn, *args):
        return fn(self._ptr, *args)

    def register(self, addr, length):
        self._check(self._lib.kvf_register_memory(self._ptr, addr, length, b"cpu:0"))

    def batch(self, batch_id):
        return _MiniBatch(self, batch_id)

    def close(self):
        if self._ptr is not None:
            self._lib.kvf_engine_free(self._ptr)
            self._ptr = None


def make_engine():
    """A `kvferry.Engine` on 127.0.0.1 (or the stand-in)."""
    if HAVE_PACKAGE:
        return kvferry.Engine(hostname="127.0.0.1")
    return _MiniEngine()


__all__ = ["HAVE_PACKAGE", "REPO", "Error", "Status", "kvferry", "make_engine", "topology"]
