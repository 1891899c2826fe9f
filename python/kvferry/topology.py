"""Rank mapping and block planning, bit-compatible with the vllm-ascend KV
connectors (sections 2 and 3 of COMPAT.md, the shared spec at
`../shared/docs/COMPAT.md` beside the kvferry repository, not shipped in it
or in this package; docs/topology.md walks through them), computed by
libkvferry.

- Which prefill ranks each decode rank pulls from (`pull_ranks`,
  `pulls_per_rank`), the prefill side's view of the same choice
  (`prefill_union`), and the layerwise connector's push mapping
  (`push_targets`). The request-seeded replica choice is CPython's
  `random.Random(seed).sample` reproduced bit for bit, so a kvferry peer and
  a Python connector peer agree on every request.
- Block planning: two `Layout`s (per layer, per cache: base, block_len,
  stride, scale) and two block id lists give the coalesced copies
  (`plan_blocks`), or are planned and moved in one call
  (`transfer_blocks`): the connector passes two short id lists instead of
  three long address lists, and no Python loop runs per block.

Refusals raise `kvferry.Error` (status `INVALID_ARGUMENT` for shapes and
plans the rules reject) with the library's message; wrong Python types raise
`TypeError` / `ValueError` before the library is called. Everything here is
thread-safe: layouts are immutable once made.

    >>> from kvferry import topology
    >>> topology.pull_ranks("req-0", prefill_tp=8, decode_tp=4, num_kv_heads=4)
    [[1], [3], [5], [7]]
"""

from __future__ import annotations

import array
import ctypes
import struct
import threading
import weakref
from typing import Any, Sequence

from . import _ffi
from . import _topology_ffi as _t
from ._errors import Error, Status

READ = _ffi.KVF_OP_READ
WRITE = _ffi.KVF_OP_WRITE

ATTENTIONS = {"gqa": _t.KVF_ATTENTION_GQA, "mla": _t.KVF_ATTENTION_MLA, "sparse": _t.KVF_ATTENTION_SPARSE}
SPLITS = {"local": _t.KVF_SPLIT_LOCAL, "remote": _t.KVF_SPLIT_REMOTE}

__all__ = [
    "READ",
    "WRITE",
    "Layout",
    "plan_blocks",
    "prefill_union",
    "pull_ranks",
    "pulls_per_rank",
    "push_targets",
    "request_seed",
    "transfer_blocks",
]

_LIB: ctypes.CDLL | None = None

_V = ctypes.c_void_p
# Integer arguments (size_t) declared as c_void_p too where they
# are passed alike (64-bit pointers, as on every host kvferry supports):
# ctypes converts an int for c_void_p about twice as fast as for c_size_t
# or c_uint64. Values are non-negative and below 2**64 by construction.
_N = _V if ctypes.sizeof(ctypes.c_void_p) == ctypes.sizeof(ctypes.c_size_t) == 8 else ctypes.c_size_t


def _lib() -> ctypes.CDLL:
    """The library with the topology signatures declared (idempotent)."""
    global _LIB
    lib = _LIB
    if lib is None:
        lib = _ffi.load()
        _t.declare(lib)
        _LIB = lib
    return lib


def _error(lib, status: int) -> Error:
    message = (lib.kvf_last_error() or b"").decode(errors="replace")
    return Error(status, message or (lib.kvf_status_str(status) or b"").decode(errors="replace"))


def _check(lib, status: int) -> None:
    if status:
        raise _error(lib, status)


# Integers of any type (numpy's too), as everywhere in the package; never bools.
_uint = _ffi.uint


def _text(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"{what}: expected str, got {type(value).__name__} {value!r}")
    if "\0" in value:
        raise ValueError(f"{what}: {value!r} contains a NUL character")
    return value.encode()


def _shape(prefill_tp, decode_tp, num_kv_heads, attention, prefill_pp) -> _t.PdShape:
    """The `kvf_pd_shape` (read-only for the library, so shared: a few
    shapes serve a whole deployment)."""
    key = (prefill_tp, decode_tp, num_kv_heads, attention, prefill_pp)
    # Only exact ints and str are cached: True == 1 and 8.0 == 8 as keys,
    # but the checks refuse them.
    if not (
        type(prefill_tp) is int
        and type(decode_tp) is int
        and type(num_kv_heads) is int
        and type(prefill_pp) is int
        and type(attention) is str
    ):
        return _new_shape(*key)
    cached = _SHAPES.get(key)
    if cached is None:
        cached = _new_shape(*key)
        if len(_SHAPES) < 1024:
            _SHAPES[key] = cached
    return cached


_SHAPES: dict = {}


def _new_shape(prefill_tp, decode_tp, num_kv_heads, attention, prefill_pp) -> _t.PdShape:
    if not isinstance(attention, str):
        raise TypeError(f"attention: expected 'gqa', 'mla' or 'sparse', got {type(attention).__name__}")
    kind = ATTENTIONS.get(attention.lower())
    if kind is None:
        raise ValueError(f"attention: expected 'gqa', 'mla' or 'sparse', got {attention!r}")
    return _t.PdShape(
        _uint(prefill_tp, "prefill_tp", 32),
        _uint(decode_tp, "decode_tp", 32),
        _uint(prefill_pp, "prefill_pp", 32),
        _uint(num_kv_heads, "num_kv_heads", 32),
        kind,
    )


# ---- rank mapping -------------------------------------------------------------


def request_seed(request_id: str) -> int:
    """The seed the connectors derive from a request id: the first 8 bytes
    of SHA-256 over its UTF-8 bytes, as a little-endian unsigned integer."""
    lib = _lib()
    out = ctypes.c_uint64()
    _check(lib, lib.kvf_topology_request_seed(_text(request_id, "request_id"), ctypes.byref(out)))
    return out.value


def pulls_per_rank(prefill_tp: int, decode_tp: int, num_kv_heads: int, attention: str = "gqa") -> int:
    """`n`: how many prefill ranks fill one decode block (per stage), each
    writing `block_len / n` bytes of it. 1 under MLA, else
    `max(1, H // D) // max(1, H // P)`."""
    lib = _lib()
    sh = _shape(prefill_tp, decode_tp, num_kv_heads, attention, 1)
    out = ctypes.c_uint32()
    _check(lib, lib.kvf_topology_pulls_per_rank(ctypes.byref(sh), ctypes.byref(out)))
    return out.value


def pull_ranks(
    request_id: str,
    prefill_tp: int,
    decode_tp: int,
    num_kv_heads: int,
    attention: str = "gqa",
    prefill_pp: int = 1,
) -> list[list[int]]:
    """The global prefill ranks (`stage * prefill_tp + tp_rank`) each decode
    rank pulls from for `request_id`, the prefill side's request id: one list
    per decode rank, stage 0's `n` ranks first. The `j`-th entry fills head
    slice `j % n` of the decode block; the decode rank reaches it at
    `remote_port + rank`."""
    fn = _PULL or _pull_function()
    sh = _shape(prefill_tp, decode_tp, num_kv_heads, attention, prefill_pp)
    rid = request_id.encode() if type(request_id) is str and "\0" not in request_id else None
    if rid is None:
        rid = _text(request_id, "request_id")
    scratch = _PULL_SCRATCH

    def call():
        return fn(
            ctypes.addressof(sh),
            rid,
            scratch.ranks_address,
            len(scratch.ranks),
            scratch.counts_address,
            scratch.offsets_address,
            len(scratch.offsets),
            scratch.counts_address + _SIZE_T_BYTES,
        )

    status = call()
    if status == Status.BUFFER_TOO_SMALL:
        # A shape larger than any so far on this thread: grow and retry.
        scratch.grow(scratch.counts[0], scratch.counts[1])
        status = call()
    if status:
        raise _error(_lib(), status)
    n_ranks, n_offsets = scratch.counts
    flat = scratch.ranks[:n_ranks].tolist()
    starts = scratch.offsets[:n_offsets].tolist()
    return [flat[starts[i] : starts[i + 1]] for i in range(n_offsets - 1)]


class _PullScratch(threading.local):
    """Per-thread arrays `pull_ranks` receives the lists in (`uint32_t`
    ranks, `size_t` offsets, and the two counts), grown on demand."""

    def __init__(self) -> None:
        self.counts = array.array(_SIZE_T, (0, 0))
        self.counts_address = self.counts.buffer_info()[0]
        self.grow(256, 65)

    def grow(self, ranks: int, offsets: int) -> None:
        self.ranks = array.array("I", (0,)) * max(ranks, 1)
        self.offsets = array.array(_SIZE_T, (0,)) * max(offsets, 1)
        self.ranks_address = self.ranks.buffer_info()[0]
        self.offsets_address = self.offsets.buffer_info()[0]


_PULL = None
_PULL_SCRATCH: _PullScratch | None = None
# array typecodes of uint32_t and size_t.
_SIZE_T_BYTES = ctypes.sizeof(ctypes.c_size_t)
_SIZE_T = next(code for code in "QLI" if array.array(code).itemsize == _SIZE_T_BYTES)
if array.array("I").itemsize != 4:  # pragma: no cover - every supported host
    raise ImportError("kvferry needs a 4-byte C unsigned int")


def _pull_function():
    """`kvf_topology_pull_ranks` with pointers as plain addresses, as
    `_plan_function`."""
    global _PULL, _PULL_SCRATCH
    fn = _PULL
    if fn is None:
        lib = _lib()
        v, n = _V, _N
        fn = ctypes.CFUNCTYPE(ctypes.c_int32, v, ctypes.c_char_p, v, n, v, v, n, v)(("kvf_topology_pull_ranks", lib))
        _PULL_SCRATCH = _PullScratch()
        _PULL = fn
    return fn


def prefill_union(
    request_id: str,
    prefill_tp: int,
    decode_tp: int,
    num_kv_heads: int,
    attention: str = "gqa",
    prefill_pp: int = 1,
) -> list[int]:
    """The global prefill ranks some decode rank will pull from for
    `request_id`, ascending: the union of `pull_ranks`, computed on the
    prefill side from the same request id, so a prefill rank knows whether
    to wait for a reader or free its blocks at once."""
    lib = _lib()
    sh = _shape(prefill_tp, decode_tp, num_kv_heads, attention, prefill_pp)
    rid = _text(request_id, "request_id")
    # From the checked shape: the arguments may be numpy integers, whose
    # product could wrap.
    n = ctypes.c_size_t(min(sh.prefill_tp * sh.prefill_pp, 4096))
    while True:
        ranks = (ctypes.c_uint32 * n.value)()
        status = lib.kvf_topology_prefill_union(ctypes.byref(sh), rid, ranks, len(ranks), ctypes.byref(n))
        if status != Status.BUFFER_TOO_SMALL:
            break
    _check(lib, status)
    return ranks[: n.value]


def push_targets(
    prefill_tp: int,
    decode_tp: int,
    num_kv_heads: int,
    attention: str,
    request_index: int,
    prefill_rank: int,
) -> tuple[list[int], int]:
    """The layerwise connector's push mapping: the decode ranks prefill TP
    rank `prefill_rank` writes to for the request at position
    `request_index` of the step's batch (empty when its replica group does
    not send this request), and the head offset index: its bytes go
    `index * block_len` (the prefill block length) into the decode block."""
    lib = _lib()
    sh = _shape(prefill_tp, decode_tp, num_kv_heads, attention, 1)
    q = _uint(request_index, "request_index", 64)
    p = _uint(prefill_rank, "prefill_rank", 32)
    ranks = (ctypes.c_uint32 * max(sh.decode_tp, 1))()
    n = ctypes.c_size_t()
    offset = ctypes.c_uint64()
    _check(
        lib,
        lib.kvf_topology_push_targets(ctypes.byref(sh), q, p, ranks, len(ranks), ctypes.byref(n), ctypes.byref(offset)),
    )
    return ranks[: n.value], offset.value


# ---- layouts and plans ----------------------------------------------------------


class Layout:
    """One side's KV cache layout: for every layer, for every cache (K and V;
    nope and rope under MLA), `(base, block_len, stride, scale)`:

    - `base`: address of kernel block 0;
    - `block_len`: bytes of one kernel block;
    - `stride`: bytes from one kernel block to the next (default
      `block_len`; larger for padded or interleaved blocks);
    - `scale`: kernel blocks per logical block id (default 1).

    Every cache holds `num_blocks` logical blocks; planning keeps each copy
    inside `base .. base + stride * scale * num_blocks`. Immutable and
    thread-safe; the library's copy is freed by `close()` (or when the
    object is collected). The memory itself is the caller's: register it
    with the engine (see `regions()`).

        Layout([[(k0, 4096), (v0, 4096)], [(k1, 4096), (v1, 4096)]], num_blocks=1024)
    """

    __slots__ = ("num_blocks", "caches", "_ptr", "_free", "__weakref__")

    def __init__(self, caches: Sequence[Sequence[Sequence[int]]], num_blocks: int):
        lib = _lib()
        self.num_blocks = _uint(num_blocks, "num_blocks", 64)
        if isinstance(caches, (str, bytes)) or not isinstance(caches, Sequence) or not caches:
            raise ValueError("caches: expected a non-empty list (per layer) of lists (per cache)")
        per_layer = len(caches[0])
        rows: list[tuple[int, int, int, int]] = []
        for layer, layer_caches in enumerate(caches):
            if isinstance(layer_caches, (str, bytes)) or not isinstance(layer_caches, Sequence):
                raise TypeError(f"caches[{layer}]: expected a list of caches, got {type(layer_caches).__name__}")
            if len(layer_caches) != per_layer or not per_layer:
                raise ValueError(
                    f"caches[{layer}] has {len(layer_caches)} caches, layer 0 has {per_layer}: "
                    "every layer needs the same, nonzero number"
                )
            for c, entry in enumerate(layer_caches):
                rows.append(_cache_entry(entry, f"caches[{layer}][{c}]"))
        self.caches = tuple(tuple(rows[i : i + per_layer]) for i in range(0, len(rows), per_layer))
        arr = (_t.CacheLayout * len(rows))(*rows)
        ptr = ctypes.c_void_p()
        _check(lib, lib.kvf_layout_new(self.num_blocks, len(caches), per_layer, arr, ctypes.byref(ptr)))
        self._ptr = ptr.value
        self._free = weakref.finalize(self, lib.kvf_layout_free, ptr.value)

    @classmethod
    def from_connector(
        cls,
        kv_caches_base_addr: Sequence[int],
        block_len: Sequence[int],
        num_blocks: int,
        caches_per_layer: int = 2,
    ) -> "Layout":
        """A dense layout from what a vllm-ascend connector holds:
        `kv_caches_base_addr` flattened layer by layer (`[l0_k, l0_v, l1_k,
        ...]`), and `block_len` with one entry for all caches or one per
        cache of a layer (`[nope_len, rope_len]` under MLA)."""
        bases = list(kv_caches_base_addr)
        lens = list(block_len)
        if caches_per_layer < 1 or not bases or len(bases) % caches_per_layer:
            raise ValueError(f"{len(bases)} base addresses do not make whole layers of {caches_per_layer} caches")
        if len(lens) not in (1, caches_per_layer):
            raise ValueError(f"block_len: expected 1 or {caches_per_layer} entries, got {len(lens)}")
        layers = [
            [(bases[i + c], lens[c % len(lens)]) for c in range(caches_per_layer)]
            for i in range(0, len(bases), caches_per_layer)
        ]
        return cls(layers, num_blocks)

    @property
    def num_layers(self) -> int:
        return len(self.caches)

    @property
    def caches_per_layer(self) -> int:
        return len(self.caches[0])

    def regions(self) -> list[tuple[int, int]]:
        """`(address, length)` of every cache's region, layer by layer: what
        the engine must have registered for transfers over this layout."""
        return [(base, stride * scale * self.num_blocks) for layer in self.caches for base, _, stride, scale in layer]

    def handle(self) -> int:
        """The `kvf_layout *` (for callers of the C API); valid until `close()`."""
        ptr = self._ptr
        if ptr is None:
            raise Error(Status.INVALID_ARGUMENT, "the layout is closed")
        return ptr

    def close(self) -> None:
        """Frees the library's copy (idempotent). No call may be using it."""
        self._ptr = None
        self._free()

    def __enter__(self) -> "Layout":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<kvferry.topology.Layout {self.num_layers} layers x {self.caches_per_layer} caches"
            f" x {self.num_blocks} blocks{' closed' if self._ptr is None else ''}>"
        )


def _cache_entry(entry: Any, what: str) -> tuple[int, int, int, int]:
    if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or not 2 <= len(entry) <= 4:
        raise TypeError(f"{what}: expected (base, block_len[, stride[, scale]]), got {entry!r}")
    base = _uint(entry[0], f"{what} base", 64)
    block_len = _uint(entry[1], f"{what} block_len", 64)
    stride = _uint(entry[2], f"{what} stride", 64) if len(entry) > 2 else block_len
    scale = _uint(entry[3], f"{what} scale", 64) if len(entry) > 3 else 1
    return base, block_len, stride, scale


def _options(pulls, offset_index, split, computed_tokens, tokens_per_block, trim_remote_head):
    """The `kvf_plan_options` to pass, or None for the defaults (no struct
    built on the common path)."""
    if (
        pulls == 1
        and offset_index == 0
        and split == "local"
        and computed_tokens is None
        and tokens_per_block is None
        and not trim_remote_head
    ):
        return None
    kind = SPLITS.get(split) if isinstance(split, str) else None
    if kind is None:
        raise ValueError(f"split: expected 'local' or 'remote', got {split!r}")
    o = _t.PlanOptions(_uint(pulls, "pulls", 64), _uint(offset_index, "offset_index", 64), kind)
    if computed_tokens is not None or tokens_per_block is not None:
        if trim_remote_head:
            raise ValueError("computed_tokens and trim_remote_head exclude each other")
        if computed_tokens is None or tokens_per_block is None:
            raise ValueError("computed_tokens and tokens_per_block go together")
        o.prefix = _t.KVF_PREFIX_COMPUTED_TOKENS
        o.computed_tokens = _uint(computed_tokens, "computed_tokens", 64)
        o.tokens_per_block = _uint(tokens_per_block, "tokens_per_block", 64)
    elif trim_remote_head:
        o.prefix = _t.KVF_PREFIX_TRIM_REMOTE_HEAD
    return ctypes.byref(o)


def _layout_ptr(layout: Any, what: str) -> int:
    if type(layout) is not Layout and not isinstance(layout, Layout):
        raise TypeError(f"{what}: expected a kvferry.topology.Layout, got {type(layout).__name__}")
    ptr = layout._ptr
    if ptr is None:
        raise Error(Status.INVALID_ARGUMENT, "the layout is closed")
    return ptr


def _ids(values: Any, what: str) -> tuple[int, int, int, Any]:
    """Block ids as `kvf_plan_call` takes them: `(address, first, count,
    keepalive)`, the address of `count` uint64 ids (0, NULL, for the span
    `first .. first + count`), and the object owning that memory.

    - a list (the connectors' form): one `array('Q')` conversion, checked
      in C (about 1.6 us for 256 ids);
    - a `range` with step 1: a span, nothing converted or allocated;
    - an `array('Q')` (or any 8-byte unsigned array) or a 1-D numpy
      `uint64` array: used in place;
    - any other iterable of ints (other ranges, signed or narrower arrays,
      numpy arrays of other integer types, tuples): converted and checked.

    Negative, too large and non-integer ids raise ValueError / TypeError
    before the library is called.
    """
    t = type(values)
    if t is list:
        try:
            arr = array.array("Q", values)
        except (TypeError, OverflowError):
            return _ffi_ids(values, what)
        return arr.buffer_info()[0], 0, len(arr), arr
    if t is range:
        count = len(values)
        if values.step == 1 or count < 2:
            if count == 0:
                return 0, 0, 0, None
            start = values.start
            if start < 0:
                raise ValueError(f"{what}: {start} is not an unsigned 64-bit value")
            if start + count > 1 << 64:
                raise ValueError(f"{what}: {start + count - 1} is not an unsigned 64-bit value")
            return 0, start, count, None
        return _ffi_ids(values, what)
    if t is array.array:
        if values.typecode in "QL" and values.itemsize == 8:
            # The export keeps the array from being resized during the call.
            view = memoryview(values)
            address, count = values.buffer_info()
            return address, 0, count, view
        if values.typecode in "fdu" or values.typecode == "w":
            raise TypeError(f"{what}: expected integer ids, got an array of typecode {values.typecode!r}")
        return _ffi_ids(values, what)
    if t is _NDARRAY or (_NDARRAY is None and t.__name__ == "ndarray" and t.__module__ == "numpy"):
        return _ndarray_ids(values, what)
    interface = getattr(values, "__array_interface__", None)
    if interface is not None:
        return _numpy_ids(values, interface, what)
    return _ffi_ids(values, what)


_NDARRAY: type | None = None  # numpy.ndarray, once one was passed
_U8: Any = None  # numpy.dtype("<u8"), likewise


def _ndarray_ids(values: Any, what: str) -> tuple[int, int, int, Any]:
    """A numpy array, its address taken without `__array_interface__` (a
    dict built per access, about 1 us) when it can be used in place: 1-D,
    uint64, contiguous, aligned and writable (a read-only or odd array takes
    the general path)."""
    global _NDARRAY, _U8
    if _U8 is None:
        import numpy

        _U8 = numpy.dtype("<u8")
        _NDARRAY = numpy.ndarray
    if values.dtype is _U8 and values.ndim == 1:
        try:
            # Holds the array's buffer (and the array) until it is dropped;
            # refuses non-contiguous, read-only and empty arrays.
            view = ctypes.c_char.from_buffer(values)
        except (TypeError, ValueError, BufferError):
            view = None
        if view is not None:
            address = ctypes.addressof(view)
            if address % 8 == 0:
                return address, 0, len(values), view
    return _numpy_ids(values, values.__array_interface__, what)


def _ffi_ids(values: Any, what: str) -> tuple[int, int, int, Any]:
    """Any iterable of ints, converted (with `_ffi.u64_array`'s checks and
    messages)."""
    arr = _ffi.u64_array(values, what)
    return (ctypes.addressof(arr) if len(arr) else 0), 0, len(arr), arr


def _numpy_ids(values: Any, interface: dict, what: str) -> tuple[int, int, int, Any]:
    """A numpy array (anything with `__array_interface__`): a 1-D, contiguous,
    aligned, little-endian uint64 array is used in place; other integer
    arrays are checked and converted (a copy)."""
    shape = interface.get("shape")
    if shape is None or len(shape) != 1:
        raise ValueError(f"{what}: expected a 1-D array of block ids, got shape {shape}")
    typestr = interface.get("typestr", "")
    if len(typestr) < 3 or typestr[1] not in "iu":
        raise TypeError(f"{what}: expected integer ids, got an array of dtype {typestr!r}")
    count = shape[0]
    if count == 0:
        return 0, 0, 0, None
    address = interface["data"][0]
    if typestr == "<u8" and interface.get("strides") is None and address % 8 == 0:
        return address, 0, count, values
    if typestr[1] == "i" and int(values.min()) < 0:
        raise ValueError(f"{what}: {int(values.min())} is not an unsigned 64-bit value")
    # Negative ids are refused above, so the conversion is exact.
    converted = values.astype("<u8", order="C")
    return converted.__array_interface__["data"][0], 0, count, converted


class _Scratch(threading.local):
    """Per-thread state of `plan_blocks`: its `kvf_plan_call` and output
    arrays. A plan of up to `_SCRATCH_OPS` ops is written there and copied
    out (slices of exactly its size), so no call zero-fills arrays it then
    shrinks; larger plans are sized by the library's answer and written
    straight into their result arrays."""

    def __init__(self) -> None:
        self.arrays = tuple(array.array("Q", _ZERO) * _SCRATCH_OPS for _ in range(3))
        self.addresses = tuple(a.buffer_info()[0] for a in self.arrays)
        self.call = _t.PlanCall()
        self.call_address = ctypes.addressof(self.call)
        # What every call reads, in one attribute.
        self.fast = (self.call, self.call_address, *self.addresses, *self.arrays)


_SCRATCH_OPS = 8192
_ZERO = (0,)
_ARRAY = array.array
_U64_END = 1 << 64
_SCRATCH: _Scratch | None = None
_PLAN = None
# `kvf_plan_call` as `struct` packs it: native sizes and alignment, as C
# lays it out (checked against the ctypes declaration below). Packing the
# fourteen fields in one call and passing one pointer costs less than
# ctypes converting fourteen arguments.
_CALL = struct.Struct("@PPPQNPQNPPPPNN")
if _CALL.size != ctypes.sizeof(_t.PlanCall):  # pragma: no cover - C and struct agree everywhere
    raise ImportError("struct and ctypes disagree on the layout of kvf_plan_call")


def _plan_function():
    """`kvf_plan_blocks_call`, its argument declared as a plain address."""
    global _PLAN, _SCRATCH
    fn = _PLAN
    if fn is None:
        lib = _lib()
        fn = ctypes.CFUNCTYPE(ctypes.c_int32, _V)(("kvf_plan_blocks_call", lib))
        _SCRATCH = _Scratch()
        _PLAN = fn
    return fn


def _id_span(ids, what: str):
    """(address, first, count, keep) of block ids for the library: the
    common forms inline (a list, an `array('Q')`, a non-empty step-1 range,
    which needs no array at all); `_ids` takes every other form and every
    refusal. `keep` owns the memory at `address` until the call returns."""
    t = type(ids)
    if t is list:
        try:
            keep = _ARRAY("Q", ids)
        except (TypeError, OverflowError):
            return _ids(ids, what)  # raises the clear error
        addr, n = keep.buffer_info()
        return addr, 0, n, keep
    if t is _ARRAY and ids.typecode == "Q":
        # The export keeps another thread from resizing (moving) the
        # caller's array while the library reads it.
        addr, n = ids.buffer_info()
        return addr, 0, n, memoryview(ids)
    if t is range and ids.step == 1 and 0 <= ids.start < ids.stop <= _U64_END:
        return 0, ids.start, len(ids), None
    return _ids(ids, what)


def plan_blocks(
    local_layout: Layout,
    remote_layout: Layout,
    local_ids: Sequence[int] | range | array.array,
    remote_ids: Sequence[int] | range | array.array,
    *,
    pulls: int = 1,
    offset_index: int = 0,
    split: str = "local",
    computed_tokens: int | None = None,
    tokens_per_block: int | None = None,
    trim_remote_head: bool = False,
) -> tuple[array.array, array.array, array.array]:
    """The copies that move `remote_ids` into `local_ids` (or back), as
    `(local_addrs, remote_addrs, lengths)`: three `array.array('Q')`
    sequences, ready for `batch_transfer_sync_read` / `_write`.

    Ids: lists of ints (as the connectors hold them), or, converted at no
    cost, a `range` with step 1 (a span: two integers reach the library),
    an `array.array('Q')` or a 1-D numpy `uint64` array (used in place);
    other iterables of ints are converted. A span must lie inside its
    layout even where a prefix hit skips part of it.

    Rules (section 2 of COMPAT.md, the shared spec beside the repository:
    see the module docstring), for each layer, cache and run of ids that
    step by +1 on both sides: one op when both sides' blocks are back to
    back, else one op per block. With `pulls` (`n`) > 1 the `split` side's
    block ("local": a decode rank pulling; "remote": a prefill rank pushing)
    holds `n` slices of the other side's block; `offset_index` picks the
    slice, and every block is its own op.

    Prefix hits: `computed_tokens` / `tokens_per_block` skip the first
    `computed_tokens // tokens_per_block` remote ids (whole blocks only);
    `trim_remote_head=True` pairs the local ids with the tail of the remote
    ids (the connectors' `remote_ids[-len(local_ids):]`). Without either,
    the lists pair one to one.
    """
    fn = _PLAN or _plan_function()
    # The common cases inline (open layouts; ids as lists, array('Q') or
    # non-empty step-1 ranges; the default options): `_layout_ptr`, `_ids`
    # and `_options_address` handle every other form and every refusal.
    lp = local_layout._ptr if type(local_layout) is Layout else None
    if lp is None:
        lp = _layout_ptr(local_layout, "local_layout")
    rp = remote_layout._ptr if type(remote_layout) is Layout else None
    if rp is None:
        rp = _layout_ptr(remote_layout, "remote_layout")
    # `_lkeep` and `_rkeep` own the id memory: alive until the return.
    la, lf, ln, _lkeep = _id_span(local_ids, "local_ids")
    ra, rf, rn, _rkeep = _id_span(remote_ids, "remote_ids")
    # `_options`' test for the defaults, inlined: no call on the common path.
    if (
        pulls == 1
        and offset_index == 0
        and split == "local"
        and computed_tokens is None
        and tokens_per_block is None
        and not trim_remote_head
    ):
        opts = 0
    else:
        opts, _okeep = _options_address(pulls, offset_index, split, computed_tokens, tokens_per_block, trim_remote_head)
    call, address, a, b, c, x, y, z = _SCRATCH.fast
    _CALL.pack_into(call, 0, lp, rp, la, lf, ln, ra, rf, rn, opts, a, b, c, _SCRATCH_OPS, 0)
    status = fn(address)
    n = call.num_ops
    if status == 0:
        return x[:n], y[:n], z[:n]
    if status != Status.BUFFER_TOO_SMALL:
        raise _error(_lib(), status)
    # Larger than the scratch arrays: exactly sized ones, planned again.
    out = (array.array("Q", _ZERO) * n, array.array("Q", _ZERO) * n, array.array("Q", _ZERO) * n)
    a, b, c = (o.buffer_info()[0] for o in out)
    _CALL.pack_into(call, 0, lp, rp, la, lf, ln, ra, rf, rn, opts, a, b, c, n, 0)
    status = fn(address)
    if status:
        raise _error(_lib(), status)
    return out


def _options_address(pulls, offset_index, split, computed_tokens, tokens_per_block, trim_remote_head):
    """`_options` as `(address, owner)`: the address of a `kvf_plan_options`
    (the library only reads it; 0 for the defaults) and the object that
    keeps it alive (cached for exact ints, str, None and bool)."""
    key = (pulls, offset_index, split, computed_tokens, tokens_per_block, trim_remote_head)
    # Only exact types are cached: True == 1 as keys.
    cacheable = (
        type(pulls) is int
        and type(offset_index) is int
        and type(split) is str
        and type(computed_tokens) in (int, type(None))
        and type(tokens_per_block) in (int, type(None))
        and type(trim_remote_head) is bool
    )
    if cacheable:
        hit = _OPTIONS.get(key)
        if hit is not None:
            return hit
    ref = _options(*key)
    if ref is None:
        return 0, None
    entry = (ctypes.addressof(ref._obj), ref._obj)
    if cacheable and len(_OPTIONS) < 1024:
        _OPTIONS[key] = entry
    return entry


_OPTIONS: dict = {}


def _engine_of(engine: Any):
    """The `kvferry.Engine` behind `engine` (an Engine, or a Mooncake-style
    `TransferEngine`)."""
    if hasattr(engine, "_call"):
        return engine
    get = getattr(engine, "get_engine", None)
    if get is not None:
        inner = get()
        if inner is None:
            raise Error(Status.INVALID_ARGUMENT, "the engine is not initialized: call initialize() first")
        return inner
    raise TypeError(f"engine: expected a kvferry.Engine or TransferEngine, got {type(engine).__name__}")


_opcode = _ffi.opcode


def transfer_blocks(
    engine: Any,
    session: str,
    local_layout: Layout,
    remote_layout: Layout,
    local_ids: Sequence[int],
    remote_ids: Sequence[int],
    *,
    opcode: int = READ,
    pulls: int = 1,
    offset_index: int = 0,
    split: str | None = None,
    computed_tokens: int | None = None,
    tokens_per_block: int | None = None,
    trim_remote_head: bool = False,
    wait: bool = True,
) -> int | None:
    """Plans a request's blocks (as `plan_blocks`) and moves them with
    `engine` to or from `session` (`"host:port"`) in one library call: READ
    copies the remote blocks into the local ones, WRITE the other way.
    `split` defaults to "local" for READ (a decode rank pulling its slice)
    and "remote" for WRITE (a prefill rank pushing its slice).

    The local layout's memory must be registered with `engine`, the remote
    one's with the peer. Nothing moves unless the whole plan is valid.

    `wait=True` returns once every byte has moved (no ids: nothing to do);
    `wait=False` returns the batch id at once, for `engine.batch(id)` or
    `TransferEngine.transfer_check_status(id)`. `engine` is a
    `kvferry.Engine` or a `kvferry.TransferEngine`; raises `kvferry.Error`.
    """
    lib = _lib()
    inner = _engine_of(engine)
    sess = _text(session, "session")
    op = _opcode(opcode)
    lp = _layout_ptr(local_layout, "local_layout")
    rp = _layout_ptr(remote_layout, "remote_layout")
    la = _ffi.u64_array(local_ids, "local_ids")
    ra = _ffi.u64_array(remote_ids, "remote_ids")
    if split is None:
        split = "local" if op == READ else "remote"
    opts = _options(pulls, offset_index, split, computed_tokens, tokens_per_block, trim_remote_head)
    if wait:
        status = inner._call(lib.kvf_transfer_blocks, sess, op, lp, rp, la, len(la), ra, len(ra), opts)
        _check(lib, status)
        return None
    out = ctypes.c_uint64()
    status = inner._call(
        lib.kvf_batch_submit_blocks, sess, op, lp, rp, la, len(la), ra, len(ra), opts, ctypes.byref(out)
    )
    _check(lib, status)
    return out.value
