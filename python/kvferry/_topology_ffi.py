"""ctypes declarations of the topology part of include/kvferry.h: the structs
and the signatures of `kvf_topology_*`, `kvf_layout_*`, `kvf_plan_blocks*`,
`kvf_transfer_blocks` and `kvf_batch_submit_blocks`.

Kept apart from `_ffi.SIGNATURES` so that it imports nothing; `_ffi` merges
`SIGNATURES` into its own table (one `update`), and the header test maps the
struct pointer types with `STRUCT_POINTERS`. `declare(lib)` is idempotent.
"""

from __future__ import annotations

import ctypes

c_status = ctypes.c_int32  # kvf_status
c_engine_p = ctypes.c_void_p  # struct kvf_engine *
c_layout_p = ctypes.c_void_p  # struct kvf_layout *

# Constants of the header (checked against it by tests/test_topology.py).
KVF_ATTENTION_GQA = 0
KVF_ATTENTION_MLA = 1
KVF_ATTENTION_SPARSE = 2
KVF_SPLIT_LOCAL = 0
KVF_SPLIT_REMOTE = 1
KVF_PREFIX_NONE = 0
KVF_PREFIX_COMPUTED_TOKENS = 1
KVF_PREFIX_TRIM_REMOTE_HEAD = 2
KVF_TOPOLOGY_MAX_SIZE = 65536


class PdShape(ctypes.Structure):
    """`kvf_pd_shape`."""

    _fields_ = [
        ("prefill_tp", ctypes.c_uint32),
        ("decode_tp", ctypes.c_uint32),
        ("prefill_pp", ctypes.c_uint32),
        ("num_kv_heads", ctypes.c_uint32),
        ("attention", ctypes.c_uint32),
    ]


class CacheLayout(ctypes.Structure):
    """`kvf_cache_layout`."""

    _fields_ = [
        ("base", ctypes.c_uint64),
        ("block_len", ctypes.c_uint64),
        ("stride", ctypes.c_uint64),
        ("scale", ctypes.c_uint64),
    ]


class PlanOptions(ctypes.Structure):
    """`kvf_plan_options`."""

    _fields_ = [
        ("pulls", ctypes.c_uint64),
        ("offset_index", ctypes.c_uint64),
        ("split", ctypes.c_uint32),
        ("prefix", ctypes.c_uint32),
        ("computed_tokens", ctypes.c_uint64),
        ("tokens_per_block", ctypes.c_uint64),
    ]


class PlanCall(ctypes.Structure):
    """`kvf_plan_call`."""

    _fields_ = [
        ("local_layout", c_layout_p),
        ("remote_layout", c_layout_p),
        ("local_ids", ctypes.POINTER(ctypes.c_uint64)),
        ("local_first", ctypes.c_uint64),
        ("n_local", ctypes.c_size_t),
        ("remote_ids", ctypes.POINTER(ctypes.c_uint64)),
        ("remote_first", ctypes.c_uint64),
        ("n_remote", ctypes.c_size_t),
        ("options", ctypes.POINTER(PlanOptions)),
        ("local_addrs", ctypes.POINTER(ctypes.c_uint64)),
        ("remote_addrs", ctypes.POINTER(ctypes.c_uint64)),
        ("lens", ctypes.POINTER(ctypes.c_uint64)),
        ("capacity", ctypes.c_size_t),
        ("num_ops", ctypes.c_size_t),
    ]


_shape_p = ctypes.POINTER(PdShape)
_options_p = ctypes.POINTER(PlanOptions)
_u32_p = ctypes.POINTER(ctypes.c_uint32)
_u64_p = ctypes.POINTER(ctypes.c_uint64)
_size_p = ctypes.POINTER(ctypes.c_size_t)

#: C pointer type (as the header test spells it) -> its ctypes type.
STRUCT_POINTERS = {
    "struct kvf_pd_shape*": _shape_p,
    "struct kvf_cache_layout*": ctypes.POINTER(CacheLayout),
    "struct kvf_plan_options*": _options_p,
    "struct kvf_plan_call*": ctypes.POINTER(PlanCall),
    "struct kvf_layout*": c_layout_p,
    "struct kvf_layout**": ctypes.POINTER(c_layout_p),
}

#: name -> (restype, argtypes), in header order.
SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "kvf_topology_pulls_per_rank": (c_status, [_shape_p, _u32_p]),
    "kvf_topology_request_seed": (c_status, [ctypes.c_char_p, _u64_p]),
    "kvf_topology_pull_ranks": (
        c_status,
        [_shape_p, ctypes.c_char_p, _u32_p, ctypes.c_size_t, _size_p, _size_p, ctypes.c_size_t, _size_p],
    ),
    "kvf_topology_prefill_union": (
        c_status,
        [_shape_p, ctypes.c_char_p, _u32_p, ctypes.c_size_t, _size_p],
    ),
    "kvf_topology_push_targets": (
        c_status,
        [_shape_p, ctypes.c_uint64, ctypes.c_uint32, _u32_p, ctypes.c_size_t, _size_p, _u64_p],
    ),
    "kvf_layout_new": (
        c_status,
        [ctypes.c_uint64, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(CacheLayout), ctypes.POINTER(c_layout_p)],
    ),
    "kvf_layout_free": (None, [c_layout_p]),
    "kvf_plan_blocks": (
        c_status,
        [
            c_layout_p,
            c_layout_p,
            _u64_p,
            ctypes.c_size_t,
            _u64_p,
            ctypes.c_size_t,
            _options_p,
            _u64_p,
            _u64_p,
            _u64_p,
            ctypes.c_size_t,
            _size_p,
        ],
    ),
    "kvf_plan_blocks_spans": (
        c_status,
        [
            c_layout_p,
            c_layout_p,
            _u64_p,
            ctypes.c_uint64,
            ctypes.c_size_t,
            _u64_p,
            ctypes.c_uint64,
            ctypes.c_size_t,
            _options_p,
            _u64_p,
            _u64_p,
            _u64_p,
            ctypes.c_size_t,
            _size_p,
        ],
    ),
    "kvf_plan_blocks_call": (c_status, [ctypes.POINTER(PlanCall)]),
    "kvf_transfer_blocks": (
        c_status,
        [
            c_engine_p,
            ctypes.c_char_p,
            ctypes.c_uint32,
            c_layout_p,
            c_layout_p,
            _u64_p,
            ctypes.c_size_t,
            _u64_p,
            ctypes.c_size_t,
            _options_p,
        ],
    ),
    "kvf_batch_submit_blocks": (
        c_status,
        [
            c_engine_p,
            ctypes.c_char_p,
            ctypes.c_uint32,
            c_layout_p,
            c_layout_p,
            _u64_p,
            ctypes.c_size_t,
            _u64_p,
            ctypes.c_size_t,
            _options_p,
            _u64_p,
        ],
    ),
}


def declare(lib: ctypes.CDLL) -> None:
    """Sets restype and argtypes of every function above on `lib`."""
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)  # AttributeError names a missing export
        fn.restype = restype
        fn.argtypes = argtypes
