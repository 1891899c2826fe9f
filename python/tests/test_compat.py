"""kvferry.TransferEngine against a peer in another process (spawned), with
Mooncake's calls and return conventions. Each test runs with an initiator
forced to tcp and one choosing the path itself (same host: cma)."""

import inspect
import os
import signal
import time

import pytest
from conftest import Buffer, MiB, pattern
from peer import Peer

import kvferry


# Mooncake's methods and their parameters, in order (as its Python API
# reference names them; what callers may pass by keyword).
MOONCAKE_METHODS = {
    "initialize": "local_hostname metadata_server protocol device_name",
    "initialize_ext": "local_hostname metadata_server protocol device_name metadata_type",
    "get_rpc_port": "",
    "get_engine": "",
    "register_memory": "buffer_addr capacity location",
    "unregister_memory": "buffer_addr",
    "batch_register_memory": "buffer_addresses capacities location",
    "batch_unregister_memory": "buffer_addresses",
    "transfer_sync_read": "target_hostname buffer peer_buffer_address length transport_hint",
    "transfer_sync_write": "target_hostname buffer peer_buffer_address length transport_hint",
    "transfer_sync": "target_hostname buffer peer_buffer_address length opcode notify transport_hint",
    "batch_transfer_sync_read": "target_hostname buffers peer_buffer_addresses lengths transport_hint",
    "batch_transfer_sync_write": "target_hostname buffers peer_buffer_addresses lengths transport_hint",
    "batch_transfer_sync": "target_hostname buffers peer_buffer_addresses lengths opcode notify transport_hint",
    "batch_transfer_async_read": "target_hostname buffers peer_buffer_addresses lengths transport_hint",
    "batch_transfer_async_write": "target_hostname buffers peer_buffer_addresses lengths transport_hint",
    "batch_transfer_async": "target_hostname buffers peer_buffer_addresses lengths opcode transport_hint",
    "get_batch_transfer_status": "batch_ids",
    "transfer_submit_write": "target_hostname buffer peer_buffer_address length transport_hint",
    "transfer_check_status": "batch_id",
    "get_notifies": "",
    "get_first_buffer_address": "segment_name",
    "allocate_managed_buffer": "length",
    "free_managed_buffer": "buffer_addr length",
    "write_bytes_to_buffer": "dest_address src_ptr length",
    "read_bytes_from_buffer": "source_address length",
}


@pytest.mark.parametrize("name", sorted(MOONCAKE_METHODS))
def test_mooncake_signatures_and_help(name):
    method = getattr(kvferry.TransferEngine, name)
    assert list(inspect.signature(method).parameters)[1:] == MOONCAKE_METHODS[name].split()
    assert method.__doc__ and len(method.__doc__) > 30, f"help(TransferEngine.{name}) says nothing"


def test_initialize_and_port(te):
    port = te.get_rpc_port()
    assert 15000 <= port <= 17000  # a bare host picks Mooncake's range
    assert te.get_session_id() == f"127.0.0.1:{port}"
    assert isinstance(te.get_engine(), kvferry.Engine)


def test_a_loopback_engine_without_a_hostname_says_so(caplog, monkeypatch):
    monkeypatch.delenv("KVFERRY_HOSTNAME", raising=False)
    monkeypatch.delenv("MOONCAKE_CONFIG_PATH", raising=False)
    with caplog.at_level("WARNING", logger="kvferry"), kvferry.TransferEngine() as te:
        assert te.initialize("", "P2PHANDSHAKE", "tcp", "") == 0
        name = te.get_session_id()
    assert name.startswith("127.0.0.1:")
    assert any("reachable from this host only" in r.getMessage() and name in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="kvferry"), kvferry.TransferEngine() as te:
        assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0  # asked for: no warning
    assert not [r for r in caplog.records if "reachable from this host only" in r.getMessage()]


def test_transport_follows_protocol(engines, peer):
    assert engines["tcp"].get_engine().transport_to(peer.session) == "tcp"
    assert engines["ascend"].get_engine().transport_to(peer.session) == "cma"


def test_sync_read(te, peer, local):
    data = pattern(MiB, 1)
    peer.fill(0, data)
    assert te.transfer_sync_read(peer.session, local.addr, peer.addr, MiB) == 0
    assert local.bytes(0, MiB) == data


def test_sync_write(te, peer, local):
    data = pattern(MiB, 2)
    local.fill(0, data)
    assert te.transfer_sync_write(peer.session, local.addr, peer.addr + MiB, MiB) == 0
    assert peer.get(MiB, MiB) == data


def test_batch_sync_read_and_write_keep_op_order(te, peer, local):
    # 32 blocks of 16 KiB, remote order reversed: each op lands where asked.
    block, n = 16 << 10, 32
    data = pattern(block * n, 3)
    peer.fill(2 * MiB, data)
    locals_ = [local.addr + i * block for i in range(n)]
    remotes = [peer.addr + 2 * MiB + (n - 1 - i) * block for i in range(n)]
    assert te.batch_transfer_sync_read(peer.session, locals_, remotes, [block] * n) == 0
    got = local.bytes(0, block * n)
    for i in range(n):
        j = n - 1 - i
        assert got[i * block : (i + 1) * block] == data[j * block : (j + 1) * block], i
    # Write them back in order into a fresh remote area.
    assert (
        te.batch_transfer_sync_write(
            peer.session, locals_, [peer.addr + 4 * MiB + i * block for i in range(n)], [block] * n
        )
        == 0
    )
    assert peer.get(4 * MiB, block * n) == got


def test_async_read_and_write(te, peer, local):
    data = pattern(256 << 10, 4)
    peer.fill(0, data)
    rid = te.batch_transfer_async_read(peer.session, [local.addr], [peer.addr], [len(data)])
    assert rid != 0, kvferry.last_error()
    local.fill(MiB, pattern(4096, 5))
    wid = te.batch_transfer_async_write(peer.session, [local.addr + MiB], [peer.addr + 6 * MiB], [4096])
    assert wid != 0 and wid != rid
    assert te.get_batch_transfer_status([rid, wid]) == 0
    assert local.bytes(0, len(data)) == data
    assert peer.get(6 * MiB, 4096) == pattern(4096, 5)
    # get_batch_transfer_status freed them: the ids are no longer valid.
    assert te.transfer_check_status(rid) == -1
    assert "unknown or already freed" in kvferry.last_error()


def test_submit_write_and_check_status(te, peer, local):
    local.fill(0, pattern(64 << 10, 6))
    bid = te.transfer_submit_write(peer.session, local.addr, peer.addr + 7 * MiB, 64 << 10)
    assert bid != 0
    deadline = time.monotonic() + 10
    while (status := te.transfer_check_status(bid)) == 0:
        assert time.monotonic() < deadline, "the batch never finished"
        time.sleep(0.001)
    assert status == 1
    assert peer.get(7 * MiB, 64 << 10) == pattern(64 << 10, 6)
    assert te.transfer_check_status(bid) == -1  # freed once it reported 1


def test_batch_a_frozen_peer_timed_out_is_minus_two(monkeypatch):
    """COMPAT section 1: `transfer_check_status` is -2 for a batch that timed
    out, -1 for other failures. The library reports such a batch as
    TRANSFER_TIMEOUT (it said TIMEOUT, which also meant "a wait ran out,
    still running", so a C caller could not tell them apart); -2 follows
    it, and `Batch.wait` says TIMEOUT only while the batch runs. A peer that
    handshook, then froze (SIGSTOP); tcp, so it must answer."""
    p = Peer("tcp", MiB)
    monkeypatch.setenv("KVFERRY_TRANSFER_TIMEOUT_MS", "400")
    monkeypatch.setenv("KVFERRY_CONNECT_TIMEOUT_MS", "400")
    te = kvferry.TransferEngine()
    try:
        assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0, kvferry.last_error()
        local = Buffer(te, 64 << 10)
        p.fill(0, b"answers")
        assert te.transfer_sync_read(p.session, local.addr, p.addr, 7) == 0, kvferry.last_error()
        os.kill(p.pid, signal.SIGSTOP)
        _, st = os.waitpid(p.pid, os.WUNTRACED)  # stopped, not just signalled: until then it may answer
        assert os.WIFSTOPPED(st)

        bid = te.batch_transfer_async_read(p.session, [local.addr], [p.addr], [4096])
        assert bid != 0, kvferry.last_error()
        assert te.transfer_check_status(bid) == 0  # pending
        deadline = time.monotonic() + 10
        while (status := te.transfer_check_status(bid)) == 0:
            assert time.monotonic() < deadline, "the batch never ended"
            time.sleep(0.01)
        assert status == -2, kvferry.last_error()
        assert kvferry.last_status() == kvferry.Status.TRANSFER_TIMEOUT
        assert "timed out" in kvferry.last_error()
        assert te.transfer_check_status(bid) == -1  # freed once it reported -2

        # get_batch_transfer_status: -1 for a timeout as for any failure.
        bid = te.batch_transfer_async_read(p.session, [local.addr], [p.addr], [4096])
        assert te.get_batch_transfer_status([bid]) == -1
        assert kvferry.last_status() == kvferry.Status.TRANSFER_TIMEOUT

        # The Pythonic API: TIMEOUT while it runs, TRANSFER_TIMEOUT once ended.
        b = te.get_engine().submit_read(p.session, [local.addr], [p.addr], [4096])
        with pytest.raises(kvferry.Error) as err:
            b.wait(0.05)
        assert err.value.status == kvferry.Status.TIMEOUT
        for timeout in (None, 0, 0.01):
            with pytest.raises(kvferry.Error) as err:
                b.wait(timeout)
            assert err.value.status == kvferry.Status.TRANSFER_TIMEOUT, err.value
        with pytest.raises(kvferry.Error) as err:
            b.poll()
        assert err.value.status == kvferry.Status.TRANSFER_TIMEOUT
        assert b.op_status(0) == kvferry.Status.TRANSFER_TIMEOUT
        b.free()
    finally:
        p.kill()  # SIGKILL ends a stopped process too
        te.close()


def test_generic_transfer_calls_take_opcodes(te, peer, local):
    peer.fill(0, b"generic!")
    assert te.transfer_sync(peer.session, local.addr, peer.addr, 8, kvferry.TransferOpcode.Read) == 0
    assert local.bytes(0, 8) == b"generic!"
    bid = te.batch_transfer_async(peer.session, [local.addr], [peer.addr + 100], [8], kvferry.TransferOpcode.WRITE)
    assert bid and te.get_batch_transfer_status([bid]) == 0
    assert peer.get(100, 8) == b"generic!"
    assert te.batch_transfer_sync(peer.session, [local.addr], [peer.addr + 200], [8], 1) == 0
    assert peer.get(200, 8) == b"generic!"


def test_write_with_notify_arrives_after_the_data(te, peer, local):
    local.fill(0, pattern(MiB, 7))
    notify = kvferry.TransferNotify("req-42", "kv ready")
    assert te.transfer_sync(peer.session, local.addr, peer.addr, MiB, kvferry.TransferOpcode.Write, notify) == 0
    got = peer.notifies(1)
    assert got == [("req-42", "kv ready")]
    assert peer.get(0, MiB) == pattern(MiB, 7)


def test_notify_name_defaults_to_sender_session(te, peer, local):
    own = te.get_session_id()
    assert (
        te.batch_transfer_sync(
            peer.session, [local.addr], [peer.addr], [16], kvferry.TransferOpcode.Write, (own, "plain")
        )
        == 0
    )
    assert peer.notifies(1) == [(own, "plain")]


def test_get_notifies_from_a_peer(te, peer):
    assert te.get_notifies() == []
    rc, err = peer.ask("notify", te.get_session_id(), kvferry.TransferNotify("n1", "héllo"))
    assert rc == 0, err
    rc, err = peer.ask("notify", te.get_session_id(), "second")
    assert rc == 0, err
    got = te.get_notifies()
    assert [tuple(n) for n in got] == [("n1", "héllo"), (peer.session, "second")]
    assert got[0].name == "n1" and got[0].msg == "héllo"
    assert all(isinstance(n.msg, str) and isinstance(n.name, str) for n in got)
    assert te.get_notifies() == []


def test_peer_reads_from_us(te, peer, local):
    local.fill(0, pattern(4096, 8))
    assert peer.ask("read_from", te.get_session_id(), 3 * MiB, local.addr, 4096) == 0
    assert peer.get(3 * MiB, 4096) == pattern(4096, 8)


def test_first_buffer_address_follows_the_peers_registrations(te, peer):
    assert te.get_first_buffer_address(peer.session) == peer.addr
    # A peer's own engine lists what it registered since: asked afresh, not cached.
    with kvferry.TransferEngine() as other:
        assert other.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
        assert te.get_first_buffer_address(other.get_session_id()) == 0
        assert "registered no memory" in kvferry.last_error()
        low, high = Buffer(other, 4096), Buffer(other, 8192)
        try:
            regions = te.get_engine().peer_regions(other.get_session_id())
            assert regions == sorted([(low.addr, 4096), (high.addr, 8192)])
            assert te.get_first_buffer_address(other.get_session_id()) == min(low.addr, high.addr)
        finally:
            low.close()
            high.close()
        assert te.get_engine().peer_regions(other.get_session_id()) == []


def test_batch_register_and_unregister(te, peer):
    import ctypes

    bufs = [ctypes.create_string_buffer(8192) for _ in range(4)]
    addrs = [ctypes.addressof(b) for b in bufs]
    assert te.batch_register_memory(addrs, [8192] * 4) == 0
    peer.fill(0, pattern(8192, 9))
    assert te.batch_transfer_sync_read(peer.session, addrs, [peer.addr] * 4, [8192] * 4) == 0
    assert all(b.raw == pattern(8192, 9) for b in bufs)
    assert te.batch_unregister_memory(addrs) == 0
    assert te.transfer_sync_read(peer.session, addrs[0], peer.addr, 16) == -1


def test_managed_buffers_are_registered(te, peer):
    addr = te.allocate_managed_buffer(64 << 10)
    assert addr != 0, kvferry.last_error()
    assert te.write_bytes_to_buffer(addr, b"from a managed buffer", 21) == 0
    assert te.transfer_sync_write(peer.session, addr, peer.addr + 5 * MiB, 21) == 0
    assert peer.get(5 * MiB, 21) == b"from a managed buffer"
    peer.fill(5 * MiB, b"back")
    assert te.transfer_sync_read(peer.session, addr + 100, peer.addr + 5 * MiB, 4) == 0
    assert te.read_bytes_from_buffer(addr + 100, 4) == b"back"
    assert te.free_managed_buffer(addr, 64 << 10) == 0
    # Freed memory is no longer ours to write through the engine.
    assert te.write_bytes_to_buffer(addr, b"x", 1) == -1


def test_numpy_integers_wherever_an_int_goes(te, peer):
    """Mooncake (pybind11) takes any integer type; so does every call here,
    not only the transfers (register_memory(np.int64(...)) was -1)."""
    np = pytest.importorskip("numpy")
    buf = np.zeros(4096, dtype=np.uint8)
    base = np.int64(buf.ctypes.data)
    assert te.register_memory(base, np.int64(buf.nbytes)) == 0, kvferry.last_error()
    assert te.write_bytes_to_buffer(np.uint64(base), b"numpy", np.int32(5)) == 0, kvferry.last_error()
    assert te.read_bytes_from_buffer(base, np.uint16(5)) == b"numpy"
    assert te.write_bytes_to_buffer(base, b"abc", np.int64(4)) == -1  # still longer than the data
    assert "larger than the data" in kvferry.last_error()
    bid = te.transfer_submit_write(peer.session, base, np.uint64(peer.addr), np.int64(5))
    assert bid != 0, kvferry.last_error()
    assert te.get_batch_transfer_status([np.uint64(bid)]) == 0, kvferry.last_error()
    assert peer.get(0, 5) == b"numpy"
    assert te.unregister_memory(np.uint64(base)) == 0, kvferry.last_error()
    assert te.batch_register_memory([base], [np.uint32(4096)]) == 0, kvferry.last_error()
    assert te.batch_unregister_memory([np.uint64(base)]) == 0, kvferry.last_error()
    addr = te.allocate_managed_buffer(np.int64(100))
    assert addr != 0, kvferry.last_error()
    assert te.free_managed_buffer(np.uint64(addr), np.int32(100)) == 0, kvferry.last_error()
    assert te.register_memory(np.bool_(True), 5) == -1  # a bool is no address, numpy's neither
    assert "bool" in kvferry.last_error()


def test_managed_buffers_reuse_and_large(te):
    a = te.allocate_managed_buffer(1000)
    b = te.allocate_managed_buffer(1000)
    assert a and b and a != b and a % 64 == 0 and b % 64 == 0 and abs(a - b) >= 1000
    assert te.free_managed_buffer(a, 1000) == 0
    c = te.allocate_managed_buffer(1000)
    assert c == a  # first fit reuses the freed block
    big = te.allocate_managed_buffer(48 << 20)  # beyond half an arena: its own mapping
    assert big and big % 4096 == 0
    assert te.write_bytes_to_buffer(big + (48 << 20) - 3, b"end", 3) == 0
    for addr, n in ((b, 1000), (c, 1000), (big, 48 << 20)):
        assert te.free_managed_buffer(addr, n) == 0
    assert te.free_managed_buffer(big, 48 << 20) == -1
