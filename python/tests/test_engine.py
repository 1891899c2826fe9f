"""The Pythonic API: kvferry.Engine raises kvferry.Error, takes numpy arrays
(and torch tensors when torch is installed) where an address goes, and
cleans up as a context manager."""

import ctypes
import gc
import mmap
import weakref

import pytest
from conftest import MiB, pattern

import kvferry

np = pytest.importorskip("numpy")


@pytest.fixture(params=["auto", "tcp"])
def engine(request):
    with kvferry.Engine(transport=request.param) as e:
        yield e


def test_engine_identity():
    with kvferry.Engine("127.0.0.1", 0) as e:
        assert e.name == f"127.0.0.1:{e.port}" and e.port > 0
        assert "open" in repr(e)
    assert e.closed and "closed" in repr(e)
    e.close()  # idempotent


def test_numpy_arrays_as_addresses(engine, peer):
    dst = np.zeros(MiB, dtype=np.uint8)
    with engine.register(dst) as region:
        assert region.addr == dst.ctypes.data and region.length == MiB
        peer.fill(0, pattern(MiB, 11))
        engine.read(peer.session, dst, peer.addr)  # length: the array's size
        assert dst.tobytes() == pattern(MiB, 11)
        src = dst[: 1024 * 4].view(np.float32)  # a view into registered memory
        src[:] = np.arange(1024, dtype=np.float32)
        engine.write(peer.session, src, peer.addr + MiB)
        assert np.frombuffer(peer.get(MiB, 4096), dtype=np.float32).tolist() == list(range(1024))
    # Unregistered on leaving the block: the same read now fails.
    with pytest.raises(kvferry.Error) as err:
        engine.read(peer.session, dst, peer.addr)
    assert err.value.status == kvferry.Status.LOCAL_OUT_OF_RANGE
    assert "registered" in err.value.message


def test_batches_of_arrays(engine, peer):
    blocks = [np.zeros(4096, dtype=np.uint8) for _ in range(8)]
    regions = engine.register_many(blocks)
    try:
        peer.fill(0, pattern(8 * 4096, 12))
        engine.read_batch(peer.session, blocks, [peer.addr + i * 4096 for i in range(8)])
        assert b"".join(b.tobytes() for b in blocks) == pattern(8 * 4096, 12)
        with engine.submit_write(peer.session, blocks, [peer.addr + 2 * MiB + i * 4096 for i in range(8)]) as batch:
            assert batch.id != 0 and batch.num_ops == 8
        assert peer.get(2 * MiB, 8 * 4096) == pattern(8 * 4096, 12)
    finally:
        engine.unregister_many(regions)


def test_batch_object(engine, peer):
    buf = bytearray(64 << 10)
    with engine.register(buf):
        b = engine.submit_read(peer.session, [buf], [peer.addr])
        b.wait(timeout=10)
        assert b.poll() is True
        assert b.op_status(0) == kvferry.Status.OK
        b.free()
        b.free()  # idempotent
        with pytest.raises(kvferry.Error) as err:
            b.poll()
        assert err.value.status == kvferry.Status.BAD_BATCH_ID


def test_other_buffer_kinds(engine, peer):
    peer.fill(0, b"0123456789abcdef")
    m = mmap.mmap(-1, 4096)
    arr = (ctypes.c_char * 4096)()
    ba = bytearray(4096)
    for obj in (m, arr, ba, memoryview(ba)):
        region = engine.register(obj)
        engine.read(peer.session, region.addr, peer.addr, 16)
        assert bytes(memoryview(obj)[:16]) == b"0123456789abcdef"
        engine.unregister(region)
    del region, obj
    m.close()


def test_refused_buffers(engine):
    with pytest.raises(TypeError, match="bytes"):
        engine.register(b"immutable")
    ro = np.zeros(16)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        engine.register(ro)
    with pytest.raises(ValueError, match="contiguous"):
        engine.register(np.zeros((8, 8))[:, 1])
    with pytest.raises(TypeError, match="length"):
        engine.register(4096)
    with pytest.raises(ValueError, match="larger than the buffer"):
        engine.register(bytearray(16), 32)


def test_errors_carry_status_and_message(engine):
    with pytest.raises(kvferry.Error) as err:
        engine.read("nonsense", 0x1000, 0x2000, 8)
    e = err.value
    assert e.status == kvferry.Status.BAD_SESSION
    assert "nonsense" in e.message and "BAD_SESSION" in str(e)
    assert isinstance(e, Exception) and "kvferry.Error" in repr(e)
    with pytest.raises(ValueError, match="opcode"):
        engine.transfer("127.0.0.1:1", 7, [0x1000], [0x2000], [8])


def test_batch_index_and_timeout_are_checked(engine, peer):
    """What ctypes would wrap silently: an index of 2**64 reading op 0, -1
    reading op 2**64-1, a timeout of 1e30 s becoming some other wait."""
    buf = bytearray(4096)
    with engine.register(buf):
        with engine.submit_read(peer.session, [buf], [peer.addr]) as b:
            for index in (2**64, -1, -(2**64)):
                with pytest.raises(ValueError, match=f"index: {index}"):
                    b.op_status(index)
            for index in (True, 0.0, "0", None):
                with pytest.raises(TypeError, match="index"):
                    b.op_status(index)
            b.wait(10)
            assert b.op_status(0) == kvferry.Status.OK
            with pytest.raises(kvferry.Error) as err:
                b.op_status(1)  # a real index past the batch: the library says so
            assert err.value.status == kvferry.Status.INVALID_ARGUMENT
            for timeout in (1e30, 2**64 / 1000, -1, -0.001, float("inf"), float("-inf"), float("nan")):
                with pytest.raises(ValueError, match="timeout"):
                    b.wait(timeout)
            for timeout in ("1", True, b"", [1]):
                with pytest.raises(TypeError, match="timeout"):
                    b.wait(timeout)
            b.wait(0)
            b.wait(0.5)
            b.wait(np.float32(1.5))
            b.wait(None)  # no limit


def test_bad_numpy_items_are_named(engine, peer):
    """A numpy column's bad item is named by index and value (the lookup
    for it once knew Python ints only and blamed None)."""
    buf = bytearray(4096)
    with engine.register(buf) as region:
        a = region.addr
        with pytest.raises(ValueError, match=r"lengths\[1\]: .*-1.* is not an unsigned 64-bit value"):
            engine.transfer(peer.session, 0, [a, a], [peer.addr, peer.addr], np.array([8, -1], dtype=np.int64))
        with pytest.raises(ValueError, match=r"remote addresses\[0\]: .*-5"):
            engine.transfer(peer.session, 0, [a], np.array([-5], dtype=np.int64), [8])
        with pytest.raises(TypeError, match=r"lengths\[0\]: expected an int, got float64"):
            engine.transfer(peer.session, 0, [a], [peer.addr], np.array([8.0]))
        with pytest.raises(TypeError, match=r"lengths\[0\]: expected an int, got bool"):
            engine.transfer(peer.session, 0, [a] * 3, [peer.addr] * 3, np.array([True, False, True]))
        with pytest.raises(ValueError, match=r"lengths\[1\]: -3 is not"):
            engine.transfer(peer.session, 0, [a, a], [peer.addr] * 2, (x for x in [8, -3]))


@pytest.mark.parametrize("opcode", [0.0, 1.0, 0.5, "0", "1", None, True, False, b"\x00"])
def test_opcode_is_an_int(engine, opcode):
    with pytest.raises(TypeError, match="opcode"):
        engine.transfer("127.0.0.1:1", opcode, [0x1000], [0x2000], [8])
    with pytest.raises(TypeError, match="opcode"):
        engine.submit("127.0.0.1:1", opcode, [0x1000], [0x2000], [8])


def test_opcode_takes_int_likes(engine, peer):
    buf = bytearray(8)
    with engine.register(buf):
        for opcode in (kvferry.READ, kvferry.TransferOpcode.Read, np.int64(0), np.uint8(0)):
            engine.transfer(peer.session, opcode, [buf], [peer.addr], [8])


def test_notifications(peer):
    with kvferry.Engine() as e:
        e.notify(peer.session, b"\x00\xffbinary")
        e.notify(peer.session, "text")
        got = peer.notifies(2)
        assert [m for _, m in got] == ["\x00\udcffbinary", "text"]  # str, bytes kept (surrogateescape)
        rc, err = peer.ask("notify", e.name, "hi")
        assert rc == 0, err
        n = e.recv_notification()
        assert n == kvferry.Notification(peer.session, b"hi")
        assert e.recv_notification() is None
        # A message larger than the first receive buffer still arrives whole.
        big = "x" * 100_000
        assert peer.ask("notify", e.name, big)[0] == 0
        assert e.notifications() == [(peer.session, big.encode())]


def test_write_notify_batch(peer):
    with kvferry.Engine() as e:
        buf = np.frombuffer(bytearray(pattern(8192, 13)), dtype=np.uint8)
        with e.register(buf):
            with e.submit_write(peer.session, [buf], [peer.addr + 3 * MiB], notify="landed") as b:
                pass
            with pytest.raises(kvferry.Error):
                b.poll()  # waited and freed on leaving the block
            got = peer.notifies(1)
            assert got == [(e.name, "landed")]
            assert peer.get(3 * MiB, 8192) == pattern(8192, 13)


def test_two_engines_in_one_process_use_memcpy():
    with kvferry.Engine() as a, kvferry.Engine() as b:
        src = np.arange(1000, dtype=np.int64)
        dst = np.zeros(1000, dtype=np.int64)
        with a.register(dst), b.register(src):
            assert a.transport_to(b.name) == "local"
            a.read(b.name, dst, src.ctypes.data)
            assert (dst == src).all()


def test_managed_allocation(peer):
    with kvferry.Engine() as e:
        addr = e.allocate(10_000)
        ctypes.memmove(addr, b"managed", 7)
        e.write(peer.session, addr, peer.addr + 4 * MiB, 7)
        assert peer.get(4 * MiB, 7) == b"managed"
        e.free(addr, 10_000)
        with pytest.raises(kvferry.Error, match="not a managed buffer"):
            e.free(addr, 10_000)
    with pytest.raises(kvferry.Error, match="closed"):
        e.allocate(10)


def test_closed_engine_raises():
    e = kvferry.Engine()
    e.close()
    with pytest.raises(kvferry.Error, match="closed"):
        e.read("127.0.0.1:15000", 0x1000, 0x1000, 8)
    with pytest.raises(kvferry.Error, match="closed"):
        e.register(bytearray(64))


def test_region_block_outliving_its_engine():
    """A `with engine.register(...)` block whose engine closed inside it:
    leaving it neither fails (close() unregistered the memory) nor hides
    the exception that ended the block."""
    buf = bytearray(4096)
    with kvferry.Engine() as e:
        with e.register(buf):
            e.close()
    with kvferry.Engine() as e:
        with pytest.raises(KeyError, match="the block's own"):
            with e.register(buf):
                e.close()
                raise KeyError("the block's own")
    # The closed engines let go of the buffer: a registered bytearray
    # cannot be resized (BufferError), a released one can.
    buf.extend(b"x")


def test_engine_is_freed_when_dropped():
    e = kvferry.Engine()
    port = e.port
    e.allocate(100)  # the allocator must not keep the engine alive
    ref = weakref.ref(e)
    del e
    gc.collect()
    assert ref() is None
    # Its port is free again.
    with kvferry.Engine(port=port) as again:
        assert again.port == port


def test_config_arguments_are_validated():
    with pytest.raises(kvferry.Error, match="transport"):
        kvferry.Engine(transport="pigeon")
    with pytest.raises(kvferry.Error, match="lanes"):
        kvferry.Engine(lanes=0)
    with pytest.raises(kvferry.Error, match="max_connections"):
        kvferry.Engine(max_connections=0)
    with pytest.raises(ValueError, match="port"):
        kvferry.Engine(port=70000)
    with pytest.raises(TypeError, match="hostname"):
        kvferry.Engine(hostname=5)


def test_torch_tensors(peer):
    torch = pytest.importorskip("torch")
    with kvferry.Engine() as e:
        t = torch.zeros(1024, dtype=torch.float32)
        with e.register(t) as region:
            assert region.location == "cpu:0" and region.length == 4096
            peer.fill(0, np.arange(1024, dtype=np.float32).tobytes())
            e.read(peer.session, t, peer.addr)
            assert t.tolist() == list(range(1024))
        with pytest.raises(ValueError, match="contiguous"):
            e.register(torch.zeros(8, 8).t())


class FakeTensor:
    """What kvferry reads from a torch tensor, without torch: data_ptr(),
    element_size(), numel(), is_contiguous(), device."""

    def __init__(self, array, device_type="cpu", index=None, contiguous=True):
        self.array = array
        self.device = type("device", (), {"type": device_type, "index": index})()
        self.contiguous = contiguous

    def data_ptr(self):
        return self.array.ctypes.data

    def element_size(self):
        return self.array.itemsize

    def numel(self):
        return self.array.size

    def is_contiguous(self):
        return self.contiguous


def test_tensor_protocol(peer):
    with kvferry.Engine() as e:
        backing = np.zeros(256, dtype=np.float64)
        t = FakeTensor(backing)
        with e.register(t) as region:
            assert (region.addr, region.length, region.location) == (backing.ctypes.data, 2048, "cpu:0")
            peer.fill(0, pattern(2048, 14))
            e.read(peer.session, t, peer.addr)
            assert backing.tobytes() == pattern(2048, 14)
        with pytest.raises(kvferry.Error, match="npu:3"):
            e.register(FakeTensor(backing, "npu", 3))  # no device runtime in this build
        with pytest.raises(ValueError, match="contiguous"):
            e.register(FakeTensor(backing, contiguous=False))


def test_forked_child_does_not_free_the_parents_engine():
    """The engine's exit-time finalizer, run in a forked child (which has a
    copy of the engine but none of its threads), leaves it alone."""
    import os
    import signal

    e = kvferry.Engine()
    pid = os.fork()
    if pid == 0:
        signal.alarm(10)  # a hang would end the child with SIGALRM
        try:
            e._finalizer()  # what atexit runs for it
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert e.transport_to(e.name) == "local"  # the parent's engine still works
    e.close()


def test_numpy_integers_as_addresses(engine, peer):
    dst = np.zeros(64, dtype=np.uint8)
    with engine.register(dst):
        peer.fill(0, b"numpy ints")
        engine.read_batch(peer.session, [np.uint64(dst.ctypes.data)], [np.int64(peer.addr)], [np.uint32(10)])
        assert dst[:10].tobytes() == b"numpy ints"
