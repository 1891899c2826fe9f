"""Every bad input gives Mooncake's failure value, a message saying what was
wrong (kvferry.last_error() and the `kvferry` logger), and no crash: the
engine keeps working afterwards."""

import ctypes
import logging
import socket
import threading
import time

import pytest
from conftest import Buffer, MiB
from peer import Peer

import kvferry


@pytest.fixture(autouse=True)
def still_works(te, peer, local):
    """After each bad call, a good one still succeeds."""
    yield
    peer.fill(0, b"alive")
    assert te.transfer_sync_read(peer.session, local.addr, peer.addr, 5) == 0, kvferry.last_error()
    assert local.bytes(0, 5) == b"alive"


def fails(result, expected, *words):
    assert result == expected
    msg = kvferry.last_error()
    assert msg, "no message for the failure"
    for w in words:
        assert w.lower() in msg.lower(), f"{w!r} not in {msg!r}"
    return msg


def test_failure_is_logged(te, peer, caplog):
    with caplog.at_level(logging.WARNING, logger="kvferry"):
        assert te.transfer_sync_read(peer.session, 16, peer.addr, 8) == -1
    assert any("transfer_sync_read" in r.getMessage() and "registered" in r.getMessage() for r in caplog.records)
    # A `Status` member, as docs/python.md prints it, not a bare int.
    assert kvferry.last_status() is kvferry.Status.LOCAL_OUT_OF_RANGE


def test_last_error_is_per_thread(te, peer):
    assert te.transfer_sync_read(peer.session, 16, peer.addr, 8) == -1
    seen = []
    t = threading.Thread(target=lambda: seen.append((kvferry.last_error(), kvferry.last_status())))
    t.start()
    t.join()
    assert seen == [("", kvferry.Status.OK)] and seen[0][1] is kvferry.Status.OK and kvferry.last_error()


def test_unregistered_local_address(te, peer):
    stray = ctypes.create_string_buffer(64)
    fails(te.transfer_sync_read(peer.session, ctypes.addressof(stray), peer.addr, 64), -1, "local range", "registered")
    fails(te.transfer_sync_write(peer.session, ctypes.addressof(stray), peer.addr, 64), -1, "local range")
    fails(te.batch_transfer_async_read(peer.session, [ctypes.addressof(stray)], [peer.addr], [64]), 0, "local range")
    fails(te.transfer_submit_write(peer.session, ctypes.addressof(stray), peer.addr, 64), 0, "local range")


def test_remote_address_outside_the_peer(te, peer, local):
    fails(
        te.transfer_sync_read(peer.session, local.addr, peer.addr + peer.size - 8, 64), -1, "remote range", peer.session
    )
    fails(te.transfer_sync_write(peer.session, local.addr, 0x1000, 64), -1, "remote range")
    fails(te.batch_transfer_sync_read(peer.session, [local.addr], [2**64 - 8], [64]), -1)


def test_zero_and_overflowing_lengths(te, peer, local):
    fails(te.transfer_sync_read(peer.session, local.addr, peer.addr, 0), -1, "length is zero")
    fails(te.transfer_sync_read(peer.session, local.addr, peer.addr, local.size + 1), -1, "local range")
    fails(te.transfer_sync_read(peer.session, local.addr, peer.addr, -1), -1, "unsigned 64-bit")
    fails(te.transfer_sync_read(peer.session, local.addr, peer.addr, 2**64), -1, "unsigned 64-bit")


@pytest.mark.parametrize(
    "session, words",
    [
        ("nonsense", ["bad session", "host:port"]),
        ("127.0.0.1:notaport", ["port"]),
        ("127.0.0.1:0", ["port 0"]),
        ("127.0.0.1:70000", ["port"]),
        ("", ["bad session"]),
        ("[::1", ["bad session"]),
        ("host name:1234", ["characters"]),
        ("127.0.0.1:1", ["unreachable"]),  # nobody listens on port 1
        ("bad\0session", ["nul"]),
    ],
)
def test_bad_session_strings(te, local, session, words):
    fails(te.transfer_sync_read(session, local.addr, local.addr, 8), -1, *words)
    fails(te.batch_transfer_async_write(session, [local.addr], [local.addr], [8]), 0)
    fails(te.get_first_buffer_address(session), 0, *words)


@pytest.mark.parametrize("session", [None, 12345, b"127.0.0.1:15000", ["127.0.0.1:1"]])
def test_session_of_wrong_type(te, local, session):
    fails(te.transfer_sync_read(session, local.addr, local.addr, 8), -1, "session", "str")
    fails(te.batch_transfer_async_read(session, [local.addr], [local.addr], [8]), 0, "session")
    fails(te.get_first_buffer_address(session), 0, "session")


@pytest.mark.parametrize("addr", ["0x1000", 1.5, None, -4096, 2**64, object()])
def test_addresses_of_wrong_type_or_range(te, peer, local, addr):
    fails(te.transfer_sync_read(peer.session, addr, peer.addr, 8), -1)
    fails(te.transfer_sync_read(peer.session, local.addr, addr, 8), -1)
    fails(te.batch_transfer_sync_write(peer.session, [local.addr, addr], [peer.addr, peer.addr], [8, 8]), -1)
    fails(te.register_memory(addr, 4096), -1)


def test_bools_are_not_addresses_or_lengths(te, peer, local):
    """bool subclasses int: `transfer_sync_read(s, a, b, True)` moved one
    byte and returned 0. Refused wherever an address or a length goes, as
    are floats for an opcode."""
    local.fill(0, b"\x00")
    peer.fill(0, b"X")
    fails(te.transfer_sync_read(peer.session, local.addr, peer.addr, True), -1, "lengths[0]", "bool")
    fails(te.transfer_sync_write(peer.session, local.addr, peer.addr, True), -1, "bool")
    fails(te.batch_transfer_sync_read(peer.session, [local.addr], [peer.addr], [True]), -1, "bool")
    fails(te.batch_transfer_async_read(peer.session, [local.addr], [peer.addr], [True]), 0, "bool")
    fails(te.transfer_submit_write(peer.session, local.addr, peer.addr, True), 0, "bool")
    fails(te.transfer_sync_read(peer.session, True, peer.addr, 8), -1, "bool")
    fails(te.batch_transfer_sync_read(peer.session, [local.addr], [False], [8]), -1, "remote addresses[0]", "bool")
    fails(te.transfer_sync(peer.session, local.addr, peer.addr, 1, 0.0), -1, "opcode", "float")
    fails(te.batch_transfer_sync(peer.session, [local.addr], [peer.addr], [1], 0.0), -1, "opcode")
    fails(te.batch_transfer_async(peer.session, [local.addr], [peer.addr], [1], 1.0), 0, "opcode")
    fails(te.transfer_sync(peer.session, local.addr, peer.addr, 1, True), -1, "opcode")
    assert local.bytes(0, 1) == b"\x00" and peer.get(0, 1) == b"X"


def test_list_arguments_of_wrong_shape(te, peer, local):
    s, lo, r = peer.session, local.addr, peer.addr
    fails(te.batch_transfer_sync_read(s, [lo, lo], [r], [8, 8]), -1, "must match")
    fails(te.batch_transfer_sync_read(s, [lo], [r], [8, 8]), -1, "must match")
    fails(te.batch_transfer_sync_read(s, lo, [r], [8]), -1, "list")
    fails(te.batch_transfer_sync_read(s, [lo], r, [8]), -1, "list")
    fails(te.batch_transfer_sync_read(s, [lo], [r], 8), -1, "list")
    fails(te.batch_transfer_sync_read(s, [lo], [r], ["8"]), -1, "lengths")
    fails(te.batch_transfer_async_read(s, [], [], []), 0, "at least one op")
    assert te.batch_transfer_sync_read(s, [], [], []) == 0  # nothing to move: done


def test_bogus_batch_ids(te):
    for bid in (0, 1, 12345, 2**63, 2**64 - 1):
        fails(te.transfer_check_status(bid), -1, "unknown or already freed")
        fails(te.get_batch_transfer_status([bid]), -1, "unknown or already freed")
    for bid in (-1, 2**64, "1", None, 1.0):
        fails(te.transfer_check_status(bid), -1)
        fails(te.get_batch_transfer_status([bid]), -1)
    fails(te.get_batch_transfer_status(7), -1, "list")
    assert te.get_batch_transfer_status([]) == 0


def test_one_bad_id_among_good_ones_still_frees_the_good(te, peer, local):
    good = te.batch_transfer_async_read(peer.session, [local.addr], [peer.addr], [64])
    assert good
    fails(te.get_batch_transfer_status([good, 999]), -1, "unknown")
    assert te.transfer_check_status(good) == -1  # it was waited for and freed


def test_register_errors(te, local):
    buf = ctypes.create_string_buffer(4096)
    addr = ctypes.addressof(buf)
    fails(te.register_memory(addr, 0), -1, "zero-length")
    fails(te.register_memory(local.addr + 16, 64), -1, "overlaps")
    fails(te.register_memory(addr, 4096, "gpu:7"), -1, "location")
    fails(te.register_memory(addr, 4096, "npu:0"), -1, "npu:0")
    fails(te.register_memory(addr, "4096"), -1, "capacity", "int")
    fails(te.batch_register_memory([addr, addr + 1024], [1024]), -1, "buffers but")
    fails(te.batch_register_memory([addr, addr + 1024], [1024, 1024.0]), -1, "capacities[1]", "int")
    fails(te.unregister_memory(addr), -1, "no region is registered")
    fails(te.batch_unregister_memory([addr]), -1, "no region")
    fails(te.unregister_memory("x"), -1)


def test_register_unmapped_memory(te, engines, local):
    """register_memory(0x1000, 4096) returned 0, and another engine of this
    process reading it then crashed the interpreter (SIGSEGV in the
    in-process copy). Host memory must be mapped readable and writable."""
    fails(te.register_memory(0x1000, 4096), -1, "[0x1000, +4096)", "nothing is mapped at 0x1000")
    assert kvferry.last_status() is kvferry.Status.REGION_NOT_MAPPED
    fails(te.register_memory(0x1000, 4096, "cpu:0"), -1, "readable and writable")
    # All or none: the good region of the batch was not registered either.
    buf = ctypes.create_string_buffer(4096)
    addr = ctypes.addressof(buf)
    fails(te.batch_register_memory([addr, 0x1000], [4096, 4096]), -1, "0x1000")
    fails(te.unregister_memory(addr), -1, "no region is registered")
    fails(te.unregister_memory(0x1000), -1, "no region is registered")
    # Another engine of this process (in-process copy or tcp) is refused.
    other = next(e for e in engines.values() if e is not te)
    dst = Buffer(other, 4096)
    try:
        fails(
            other.batch_transfer_sync_read(te.get_session_id(), [dst.addr], [0x1000], [4096]),
            -1,
            "remote range",
        )
    finally:
        dst.close()


def test_managed_buffer_errors(te, local):
    fails(te.allocate_managed_buffer(0), 0, "0 bytes")
    fails(te.allocate_managed_buffer(-5), 0)
    fails(te.allocate_managed_buffer("big"), 0, "int")
    fails(te.free_managed_buffer(12345, 10), -1, "not a managed buffer")
    addr = te.allocate_managed_buffer(100)
    fails(te.free_managed_buffer(addr, 200), -1, "allocated with 100")
    assert te.free_managed_buffer(addr, 100) == 0
    fails(te.write_bytes_to_buffer(0x10, b"abc", 3), -1, "not inside memory registered")
    fails(te.write_bytes_to_buffer(local.addr, b"abc", 4), -1, "larger than the data")
    fails(te.write_bytes_to_buffer(local.addr, "abc", 3), -1, "bytes")
    fails(te.write_bytes_to_buffer(local.addr + local.size - 1, b"ab", 2), -1, "not inside")
    fails(te.read_bytes_from_buffer(0x10, 3), b"", "not inside")
    fails(te.read_bytes_from_buffer(local.addr, -1), b"")
    assert te.write_bytes_to_buffer(local.addr + 8, b"abc", 3) == 0
    assert te.read_bytes_from_buffer(local.addr + 8, 3) == b"abc"


def test_uninitialized_engine_fails_cleanly():
    te = kvferry.TransferEngine()
    fails(te.get_rpc_port(), -1, "initialize")
    fails(te.register_memory(4096, 4096), -1, "initialize")
    fails(te.transfer_sync_read("127.0.0.1:15000", 1, 2, 3), -1, "initialize")
    fails(te.batch_transfer_async_read("127.0.0.1:15000", [1], [2], [3]), 0, "initialize")
    fails(te.transfer_check_status(5), -1, "initialize")
    fails(te.allocate_managed_buffer(10), 0, "initialize")
    fails(te.get_notifies(), [], "initialize() first")
    assert te.get_engine() is None


def test_closed_engine_fails_cleanly(peer):
    """After close(), every call gives its failure value and says the engine
    was closed (not "not initialized"); initialize() starts a new one."""
    te = kvferry.TransferEngine()
    assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    name = te.get_session_id()
    addr = te.allocate_managed_buffer(64)
    assert addr
    te.close()
    te.close()  # idempotent
    fails(te.get_rpc_port(), -1, name, "closed")
    fails(te.transfer_sync_read(peer.session, addr, peer.addr, 8), -1, "closed")
    fails(te.batch_transfer_sync_read(peer.session, [addr], [peer.addr], [8]), -1, "closed")
    fails(te.batch_transfer_async_read(peer.session, [addr], [peer.addr], [8]), 0, "closed")
    fails(te.transfer_check_status(5), -1, "closed")
    fails(te.allocate_managed_buffer(10), 0, "closed")
    fails(te.read_bytes_from_buffer(addr, 8), b"", "closed")
    fails(te.get_notifies(), [], "closed")
    assert te.get_engine() is None and te.get_session_id() == ""
    assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0, kvferry.last_error()
    try:
        assert te.get_rpc_port() > 0
    finally:
        te.close()


@pytest.mark.parametrize(
    "args, words",
    [
        (("127.0.0.1", "etcd://10.0.0.1:2379", "tcp", ""), ["metadata server", "P2PHANDSHAKE"]),
        (("127.0.0.1:99999", "P2PHANDSHAKE", "tcp", ""), ["port"]),
        (("127.0.0.1:abc", "P2PHANDSHAKE", "tcp", ""), ["port"]),
        (("[::1", "P2PHANDSHAKE", "tcp", ""), ["ipv6"]),
        ((None, "P2PHANDSHAKE", 5, ""), ["protocol", "str"]),
    ],
)
def test_initialize_errors(args, words):
    te = kvferry.TransferEngine()
    fails(te.initialize(*args), -1, *words)
    assert te.get_engine() is None


def test_initialize_twice_and_busy_port(te):
    fails(te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", ""), -1, "already initialized")
    other = kvferry.TransferEngine()
    fails(other.initialize(f"127.0.0.1:{te.get_rpc_port()}", "P2PHANDSHAKE", "tcp", ""), -1, "cannot listen")


def test_dead_peer(te, local):
    """A peer that dies after a first transfer: the next calls fail with a
    message, quickly, and do not crash."""
    p = Peer("tcp", MiB)
    try:
        p.fill(0, b"before")
        assert te.transfer_sync_read(p.session, local.addr, p.addr, 6) == 0
        assert local.bytes(0, 6) == b"before"
        p.kill()
        t0 = time.monotonic()
        msg = fails(te.transfer_sync_read(p.session, local.addr, p.addr, 6), -1)
        assert p.session in msg or "peer" in msg.lower() or "process" in msg.lower(), msg
        bid = te.batch_transfer_async_read(p.session, [local.addr], [p.addr], [6])
        if bid:
            fails(te.get_batch_transfer_status([bid]), -1)
        else:
            assert kvferry.last_error()
        assert time.monotonic() - t0 < 8
    finally:
        p.kill()


def test_silent_peer_times_out_without_holding_the_gil(te, local):
    """A "peer" that accepts connections and never answers: the call fails
    after the connect timeout (1 s in these tests), and other Python threads
    run meanwhile (the GIL is released while the library waits)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    session = f"127.0.0.1:{silent.getsockname()[1]}"
    result = {}

    def call():
        t0 = time.monotonic()
        result["rc"] = te.transfer_sync_read(session, local.addr, 0x1000, 8)
        result["error"] = kvferry.last_error()
        result["took"] = time.monotonic() - t0

    try:
        t = threading.Thread(target=call)
        # Python keeps running while the call waits. Were the GIL held, this
        # thread would stall for the whole wait (~1 s), in start() or in the
        # loop; allow for a loaded host.
        gaps, last, end = [], time.perf_counter(), time.perf_counter() + 10
        t.start()
        while t.is_alive() and (now := time.perf_counter()) < end:
            gaps.append(now - last)
            last = now
        t.join(15)
        assert not t.is_alive()
        assert result["rc"] == -1 and result["error"], result
        assert 0.8 < result["took"] < 8, result
        assert max(gaps) < 0.5, f"Python stalled {max(gaps):.3f} s while the call waited"
    finally:
        silent.close()
