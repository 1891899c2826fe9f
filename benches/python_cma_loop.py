#!/usr/bin/env python3
"""Where a same-host Python batch spends its time beyond the copy.

A target engine in a spawned process registers 32 x 16 KiB; this process
reads them back to back for 2 s through three doors, interleaved, 3 rounds:
the whole Mooncake-API call (`batch_transfer_sync_read`), the bare
`kvf_transfer_sync_pylists` (the library reads the lists), and the bare
`kvf_transfer_sync` with arrays prepared once (no list handling at all).
Compare with the same batch in Rust:
`kvferry bench --transport cma --block-size 16K --batch-size 32 --buffer-size 512K --layout contiguous`.
tools/bench/discussion.md (cma-small) quotes these figures.

    cargo build --release -p kvferry-capi
    KVFERRY_LIBRARY=$PWD/target/release/libkvferry.so PYTHONPATH=python python3 benches/python_cma_loop.py
"""

import ctypes
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import kvferry  # noqa: E402
from kvferry import _ffi  # noqa: E402

BLOCK, BATCH, SECONDS, ROUNDS = 16384, 32, 2.0, 3
SIZE = BLOCK * BATCH


def target(q, stop):
    te = kvferry.TransferEngine()
    assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "ascend", "") == 0
    buf = ctypes.create_string_buffer(SIZE)
    assert te.register_memory(ctypes.addressof(buf), SIZE) == 0
    q.put((te.get_session_id(), ctypes.addressof(buf)))
    stop.wait()


def per_batch_us(call):
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < SECONDS:
        call()
        n += 1
    return (time.perf_counter() - t0) / n * 1e6


def main():
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=target, args=(q, stop))
    p.start()
    try:
        session, raddr = q.get(timeout=60)
        te = kvferry.TransferEngine()
        assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "ascend", "") == 0
        buf = ctypes.create_string_buffer(SIZE)
        laddr = ctypes.addressof(buf)
        assert te.register_memory(laddr, SIZE) == 0
        local = [laddr + i * BLOCK for i in range(BATCH)]
        remote = [raddr + i * BLOCK for i in range(BATCH)]
        lens = [BLOCK] * BATCH
        assert te.batch_transfer_sync_read(session, local, remote, lens) == 0
        assert te.get_engine().transport_to(session) == "cma"
        ptr, raw = te.get_engine()._h.ptr, session.encode()
        pylists = _ffi.pylists().kvf_transfer_sync_pylists
        cols, _, keep = _ffi.u64_columns((local, remote, lens), ("local", "remote", "lengths"))
        arrays = _ffi.load().kvf_transfer_sync
        doors = [
            ("batch_transfer_sync_read (whole call)", lambda: te.batch_transfer_sync_read(session, local, remote, lens)),
            ("kvf_transfer_sync_pylists (bare)", lambda: pylists(ptr, raw, 0, local, remote, lens)),
            ("kvf_transfer_sync, prepared arrays", lambda: arrays(ptr, raw, 0, cols[0], cols[1], cols[2], BATCH)),
        ]
        best = {name: float("inf") for name, _ in doors}
        for _ in range(ROUNDS):
            for name, call in doors:
                best[name] = min(best[name], per_batch_us(call))
        del keep
        for name, us in best.items():
            print(f"{name:40s} {us:6.2f} us/batch  {SIZE / us / 1e3:6.2f} GB/s")
    finally:
        stop.set()
        p.join(10)


if __name__ == "__main__":
    main()
