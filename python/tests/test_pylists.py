"""The list fast path (`_ffi.pylists`): batches given as three lists of ints,
the Mooncake API's form, are read by the library itself. These tests pin
that the path is taken, that its refusals move nothing and name the item as
the general path does, that other forms still work, and that it can be
switched off."""

import array
import ctypes
import os
import subprocess
import sys

import pytest
from conftest import MiB, pattern

import kvferry
from kvferry import _ffi


class _NoArrayCalls:
    """Stands in for the engine's CDLL handle: any use of the array-taking
    transfer calls fails the test, everything else goes to the library."""

    def __init__(self, lib):
        self._lib = lib

    def __getattr__(self, name):
        if name in ("kvf_transfer_sync", "kvf_batch_submit"):
            raise AssertionError(f"{name} called: the list fast path was not taken")
        return getattr(self._lib, name)


@pytest.fixture(params=["auto", "tcp"])
def engine(request):
    with kvferry.Engine(transport=request.param) as e:
        yield e


@pytest.fixture
def dst(engine):
    buf = ctypes.create_string_buffer(MiB)
    with engine.register(ctypes.addressof(buf), MiB):
        yield buf


def test_lists_take_the_fast_path(engine, dst, peer, monkeypatch):
    assert _ffi.pylists() is not None
    base = ctypes.addressof(dst)
    engine.read_batch(peer.session, [base], [peer.addr], [8])  # the session's first call checks it
    monkeypatch.setattr(engine, "_lib", _NoArrayCalls(engine._lib))
    peer.fill(0, pattern(32 * 4096, 31))
    # Remote blocks in reverse order: every op is its own copy.
    locals_ = [base + i * 4096 for i in range(32)]
    remotes = [peer.addr + (31 - i) * 4096 for i in range(32)]
    engine.read_batch(peer.session, locals_, remotes, [4096] * 32)
    want = pattern(32 * 4096, 31)
    assert all(dst.raw[i * 4096 : (i + 1) * 4096] == want[(31 - i) * 4096 : (32 - i) * 4096] for i in range(32))
    with engine.submit_write(peer.session, locals_, [peer.addr + MiB + i * 4096 for i in range(32)], [4096] * 32) as b:
        assert b.id != 0 and b.num_ops == 32
    assert peer.get(MiB, 32 * 4096) == dst.raw[: 32 * 4096]


@pytest.mark.parametrize(
    "bad, error, words",
    [
        ("0x1000", TypeError, "str"),
        (4096.0, TypeError, "float"),
        # bool subclasses int: True would be read as 1 (a length of one byte).
        (True, TypeError, "bool"),
        (False, TypeError, "bool"),
        (-1, ValueError, "-1"),
        (1 << 64, ValueError, str(1 << 64)),
    ],
)
@pytest.mark.parametrize("column", [0, 1, 2])
def test_a_bad_item_moves_nothing_and_is_named(engine, dst, peer, bad, error, words, column):
    base = ctypes.addressof(dst)
    ctypes.memset(base, 0, 4 * 4096)
    peer.fill(0, pattern(4 * 4096, 32))
    cols = [[base + i * 4096 for i in range(4)], [peer.addr + i * 4096 for i in range(4)], [4096] * 4]
    cols[column][2] = bad  # the first two ops are fine: still nothing moves
    with pytest.raises(error, match=words):
        engine.read_batch(peer.session, *cols)
    with pytest.raises(error, match=words):
        engine.submit_read(peer.session, *cols)
    assert dst.raw[: 4 * 4096] == bytes(4 * 4096)


def test_the_library_refuses_bools_itself(engine, dst, peer):
    """`PyLong_AsUnsignedLong` takes True as 1 (bool subclasses int): the
    fast path checks for the two bool objects itself, raises TypeError and
    moves nothing, in every column and in both calls."""
    base = ctypes.addressof(dst)
    lib, session = _ffi.pylists(), peer.session.encode()
    peer.fill(0, b"moved!!!")
    ctypes.memset(base, 0, 8)
    for column in range(3):
        for flag in (True, False):
            cols = [[base], [peer.addr], [8]]
            cols[column] = [flag]
            with pytest.raises(TypeError):
                lib.kvf_transfer_sync_pylists(engine._h.ptr, session, _ffi.KVF_OP_READ, *cols)
            out = ctypes.c_uint64()
            with pytest.raises(TypeError):
                lib.kvf_batch_submit_pylists(engine._h.ptr, session, _ffi.KVF_OP_READ, *cols, ctypes.byref(out))
    assert dst.raw[:8] == bytes(8)
    lib.kvf_transfer_sync_pylists(engine._h.ptr, session, _ffi.KVF_OP_READ, [base], [peer.addr], [8])
    assert dst.raw[:8] == b"moved!!!"


@pytest.mark.parametrize("column, name", [(0, "local addresses"), (1, "remote addresses"), (2, "lengths")])
def test_the_general_path_refuses_bools(engine, dst, peer, column, name):
    """Tuples go the general way, whose array('Q') takes True as 1: it
    refuses bools too, naming the item."""
    base = ctypes.addressof(dst)
    ctypes.memset(base, 0, 8)
    cols = [[base], [peer.addr], [8]]
    cols[column] = [True]
    with pytest.raises(TypeError, match=rf"{name}\[0\].*bool"):
        engine.read_batch(peer.session, *map(tuple, cols))
    assert dst.raw[:8] == bytes(8)


def test_mismatched_and_empty_lists(engine, dst, peer):
    base = ctypes.addressof(dst)
    with pytest.raises(ValueError, match="must match"):
        engine.read_batch(peer.session, [base, base + 8], [peer.addr], [8, 8])
    engine.read_batch(peer.session, [], [], [])  # nothing to do


def test_other_sequences_still_work(engine, dst, peer):
    base = ctypes.addressof(dst)
    peer.fill(0, pattern(4 * 4096, 33))
    forms = [
        (tuple, tuple, tuple),
        (lambda v: array.array("Q", v), list, list),
        (list, lambda v: (x for x in v), list),
    ]
    for f_local, f_remote, f_len in forms:
        ctypes.memset(base, 0, 4 * 4096)
        engine.read_batch(
            peer.session,
            f_local([base + i * 4096 for i in range(4)]),
            f_remote([peer.addr + i * 4096 for i in range(4)]),
            f_len([4096] * 4),
        )
        assert dst.raw[: 4 * 4096] == pattern(4 * 4096, 33)


def test_buffers_among_the_locals_fall_back(engine, peer):
    """A list holding a buffer object: the library refuses the item, the
    general path resolves it."""
    buf = bytearray(4096)
    with engine.register(buf):
        peer.fill(0, pattern(4096, 34))
        engine.read_batch(peer.session, [buf], [peer.addr], [4096])
        assert bytes(buf) == pattern(4096, 34)


def test_switched_off_by_environment(peer):
    code = (
        "import ctypes, kvferry\n"
        "from kvferry import _ffi\n"
        "assert _ffi.pylists() is None\n"
        "with kvferry.Engine() as e:\n"
        "    buf = ctypes.create_string_buffer(16)\n"
        "    with e.register(ctypes.addressof(buf), 16):\n"
        f"        e.read_batch({peer.session!r}, [ctypes.addressof(buf)], [{peer.addr}], [16])\n"
        "print('ok')\n"
    )
    env = dict(os.environ, KVFERRY_PYLISTS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_install_refuses_a_null_function():
    lib = _ffi.load()
    api = _ffi.PythonApi()  # every field NULL
    assert lib.kvf_python_api_install(ctypes.addressof(api)) == kvferry.Status.INVALID_ARGUMENT
    assert "list_size is NULL" in lib.kvf_last_error().decode()
    assert lib.kvf_python_api_install(None) == kvferry.Status.NULL_POINTER


def test_fast_path_loads_before_anything_else():
    """`_ffi.pylists()` as the first call of a process (it loads the library
    itself; it once deadlocked on the loader's lock there)."""
    code = "from kvferry import _ffi\nassert _ffi.pylists() is not None\nprint('ok')\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
