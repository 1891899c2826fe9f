#!/usr/bin/env python3
"""What one Mooncake-API batch call costs in Python, apart from the copy.

`batch_transfer_sync_read` of 32 contiguous 16-byte ops to a peer engine in
the same process (the copy is nothing), beside the parts of it: the bare
`kvf_transfer_sync_pylists` (the library reads the lists: the path the
whole call takes), the whole call with that path off, the bare
`kvf_transfer_sync` with prepared arrays, and what converting the three
lists of ints in Python costs (`kvferry._ffi.u64_columns`, the general
path) and, of that, the scan of one list for bools. Best of 5 rounds of
20000 calls, in microseconds per call.
docs/python.md and tools/bench/discussion.md quote these figures.

    cargo build --release -p kvferry-capi
    KVFERRY_LIBRARY=$PWD/target/release/libkvferry.so PYTHONPATH=python python3 benches/python_call.py
"""

import ctypes
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import kvferry  # noqa: E402
from kvferry import _ffi  # noqa: E402

N, BLOCK, CALLS, ROUNDS = 32, 16, 20000, 5


def per_call_us(fn):
    return min(timeit.repeat(fn, number=CALLS, repeat=ROUNDS)) / CALLS * 1e6


def whole_call_without_fast_path(te, read, *args):
    """The whole call as with `KVFERRY_PYLISTS=0`: the lists converted in
    Python (`u64_columns`), then `kvf_transfer_sync`."""
    engine = te.get_engine()
    saved, engine._pylists = engine._pylists, None
    try:
        return per_call_us(lambda: read(*args))
    finally:
        engine._pylists = saved


def main():
    with kvferry.TransferEngine() as a, kvferry.TransferEngine() as b:
        for te in (a, b):
            assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "ascend", "") == 0
        src_buf = ctypes.create_string_buffer(N * BLOCK)
        dst_buf = ctypes.create_string_buffer(N * BLOCK)
        src, dst = ctypes.addressof(src_buf), ctypes.addressof(dst_buf)
        assert a.register_memory(src, N * BLOCK) == 0 and b.register_memory(dst, N * BLOCK) == 0
        local = [src + i * BLOCK for i in range(N)]
        remote = [dst + i * BLOCK for i in range(N)]
        lens = [BLOCK] * N
        session = b.get_session_id()
        read = a.batch_transfer_sync_read
        assert read(session, local, remote, lens) == 0
        engine = a.get_engine()
        lib, ptr, raw_session = engine._lib, engine._h.ptr, session.encode()
        pylists = _ffi.pylists().kvf_transfer_sync_pylists
        columns = (local, remote, lens)
        names = ("local", "remote", "lengths")
        p, _, keep = _ffi.u64_columns(columns, names)
        rows = [
            (
                "batch_transfer_sync_read (the whole call)",
                per_call_us(lambda: read(session, local, remote, lens)),
            ),
            (
                "the whole call, fast path off (as KVFERRY_PYLISTS=0)",
                whole_call_without_fast_path(a, read, session, local, remote, lens),
            ),
            (
                "kvf_transfer_sync_pylists, the lists as they are",
                per_call_us(lambda: pylists(ptr, raw_session, 0, local, remote, lens)),
            ),
            (
                "kvf_transfer_sync, prepared arrays",
                per_call_us(lambda: lib.kvf_transfer_sync(ptr, raw_session, 0, p[0], p[1], p[2], N)),
            ),
            (
                "the three lists to arrays in Python (u64_columns)",
                per_call_us(lambda: _ffi.u64_columns(columns, names)),
            ),
            (
                "of which one list's scan for bools (_ffi._u64s)",
                per_call_us(lambda: bool in map(type, local)),
            ),
        ]
        del keep
    for what, us in rows:
        print(f"{what:45s} {us:6.2f} us")


if __name__ == "__main__":
    main()
