"""One engine shared by many threads, as the connectors do (a pool of up to
32 receive threads calls one engine)."""

import ctypes
import threading
import time

from conftest import MiB, Buffer, pattern

import kvferry

THREADS = 32
CHUNK = 64 << 10


def run_threads(target, n=THREADS):
    errors = []

    def wrapped(i):
        try:
            target(i)
        except BaseException as e:  # reported below, with the thread's index
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors


def test_many_threads_sync_and_async(te, peer):
    source = pattern(4 * MiB, 21)
    peer.fill(0, source)
    buf = Buffer(te, THREADS * 2 * CHUNK)
    try:

        def work(i):
            mine = buf.addr + i * 2 * CHUNK
            for k in range(6):
                off = ((i * 7 + k * 13) % 60) * CHUNK
                if k % 2 == 0:
                    rc = te.transfer_sync_read(peer.session, mine, peer.addr + off, CHUNK)
                    assert rc == 0, kvferry.last_error()
                else:
                    bid = te.batch_transfer_async_read(
                        peer.session,
                        [mine, mine + CHUNK // 2],
                        [peer.addr + off, peer.addr + off + CHUNK // 2],
                        [CHUNK // 2] * 2,
                    )
                    assert bid != 0, kvferry.last_error()
                    assert te.get_batch_transfer_status([bid]) == 0, kvferry.last_error()
                got = buf.bytes(i * 2 * CHUNK, CHUNK)
                assert got == source[off : off + CHUNK], f"thread {i} round {k}: wrong bytes"
            # Each thread writes its own stamp to its own remote slot.
            stamp = pattern(CHUNK, 100 + i)
            buf.fill(i * 2 * CHUNK + CHUNK, stamp)
            rc = te.transfer_sync_write(peer.session, mine + CHUNK, peer.addr + 4 * MiB + i * CHUNK, CHUNK)
            assert rc == 0, kvferry.last_error()

        run_threads(work)
        for i in range(THREADS):
            assert peer.get(4 * MiB + i * CHUNK, CHUNK) == pattern(CHUNK, 100 + i), i
    finally:
        buf.close()


def test_threads_register_allocate_and_notify_concurrently(te, peer):
    own = te.get_session_id()

    def work(i):
        b = Buffer(te, 8192)
        addr = te.allocate_managed_buffer(1000 + i)
        assert addr != 0, kvferry.last_error()
        assert te.write_bytes_to_buffer(addr, bytes([i]) * 10, 10) == 0
        assert te.transfer_sync_write(peer.session, addr, peer.addr + 6 * MiB + i * 16, 10) == 0
        assert te.free_managed_buffer(addr, 1000 + i) == 0
        assert (
            te.transfer_sync(peer.session, b.addr, peer.addr + 7 * MiB, 8, kvferry.TransferOpcode.Write, (own, f"t{i}"))
            == 0
        )
        b.close()

    run_threads(work)
    for i in range(THREADS):
        assert peer.get(6 * MiB + i * 16, 10) == bytes([i]) * 10
    got = peer.notifies(THREADS)
    assert sorted(m for _, m in got) == sorted(f"t{i}" for i in range(THREADS))


def test_close_while_threads_transfer(peer):
    """close() waits for calls in flight; calls after it fail cleanly."""
    engine = kvferry.Engine()
    buf = bytearray(CHUNK)
    engine.register(buf)
    stop = threading.Event()
    outcomes = []

    def loop(i):
        n = 0
        while not stop.is_set():
            try:
                engine.read(peer.session, buf, peer.addr)
                n += 1
            except kvferry.Error as e:
                outcomes.append((n, e.message))
                return
        outcomes.append((n, "stopped"))

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    engine.close()
    stop.set()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert len(outcomes) == 8
    assert all(msg == "stopped" or msg.endswith("the engine is closed") for _, msg in outcomes), outcomes
    assert sum(n for n, _ in outcomes) > 0


def test_a_managed_buffer_is_not_freed_under_a_copy(te):
    """read_bytes_from_buffer / write_bytes_to_buffer racing a free of the
    same managed buffer: the free waits for the copy instead of unmapping
    the memory under it (a large buffer has a mapping of its own, unmapped
    when freed: a copy after that would kill the process)."""
    size = 48 << 20  # beyond half an arena: its own mapping
    addr = te.allocate_managed_buffer(size)
    assert te.write_bytes_to_buffer(addr, b"still mapped", 12) == 0
    engine = te.get_engine()
    copying, release, freed = threading.Event(), threading.Event(), []

    def slow_copy():
        copying.set()
        release.wait(10)
        return ctypes.string_at(addr, 12)

    reader = threading.Thread(target=lambda: freed.append(("read", engine.access_registered(addr, 12, slow_copy))))
    reader.start()
    assert copying.wait(10)
    freer = threading.Thread(target=lambda: freed.append(("free", te.free_managed_buffer(addr, size))))
    freer.start()
    time.sleep(0.3)
    assert freed == [], "the free went ahead during the copy"
    release.set()
    reader.join(10)
    freer.join(10)
    assert freed == [("read", b"still mapped"), ("free", 0)]
    # Gone now: refused, not read.
    assert te.read_bytes_from_buffer(addr, 12) == b""
