"""NPU memory through the Python package: the Ascend runtime behind
protocol "ascend" (what vllm-ascend passes) and `Engine(ascend=...)`.

Without NPUs, the runtime is the CANN stand-in (crates/kvferry-cann-standin,
docs/ascend.md): a test library that implements the ACL calls kvferry makes
over host memory. scripts/test-python points KVFERRY_TEST_CANN_STANDIN at it
(cargo test has built it by then). What this proves: the package turns the
runtime on for protocol "ascend", registers "npu:N" memory through it and
moves device-to-device between two engines with the Mooncake API. What it
does not: anything about real NPUs (docs/ascend.md says what does)."""

import ctypes
import logging
import os

import pytest
from conftest import pattern

import kvferry

STANDIN = os.environ.get("KVFERRY_TEST_CANN_STANDIN")
NO_RUNTIME = "/nonexistent/libascendcl.so"


def test_ascend_protocol_without_a_runtime_is_host_only(monkeypatch, caplog):
    monkeypatch.setenv("KVFERRY_ACL_LIBRARY", NO_RUNTIME)
    caplog.set_level(logging.INFO, "kvferry")
    with kvferry.TransferEngine() as te:
        assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "ascend", "") == 0
        buf = ctypes.create_string_buffer(4096)
        assert te.register_memory(ctypes.addressof(buf), 4096) == 0
    assert "Ascend runtime not found" in caplog.text
    assert "host memory only" in caplog.text


def test_ascend_required_without_a_runtime_fails(monkeypatch):
    monkeypatch.setenv("KVFERRY_ACL_LIBRARY", NO_RUNTIME)
    with pytest.raises(kvferry.Error) as e:
        kvferry.Engine(ascend=True)
    assert e.value.status == kvferry.Status.UNSUPPORTED
    assert "Ascend runtime not found" in e.value.message


def test_ascend_argument_is_checked():
    with pytest.raises(TypeError, match="ascend"):
        kvferry.Engine(ascend="yes")


class Acl:
    """The few ACL calls the test makes itself, on the stand-in."""

    H2D, D2H = 1, 2

    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        for name, args in [
            ("aclInit", [ctypes.c_char_p]),
            ("aclrtSetDevice", [ctypes.c_int32]),
            ("aclrtMalloc", [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_int]),
            ("aclrtFree", [ctypes.c_void_p]),
            ("aclrtMemcpy", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]),
        ]:
            fn = getattr(self.lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        assert self.lib.aclInit(None) in (0, 100002)  # 100002: initialised already

    def malloc(self, device, n):
        assert self.lib.aclrtSetDevice(device) == 0
        p = ctypes.c_void_p()
        assert self.lib.aclrtMalloc(ctypes.byref(p), n, 0) == 0
        return p.value


@pytest.mark.skipif(not STANDIN, reason="KVFERRY_TEST_CANN_STANDIN is not set (scripts/test-python sets it)")
def test_ascend_protocol_moves_npu_memory(monkeypatch):
    monkeypatch.setenv("KVFERRY_ACL_LIBRARY", STANDIN)
    acl = Acl(STANDIN)
    n, block = 1 << 20, 64 << 10
    data = pattern(n, 7)
    src, dst = acl.malloc(0, n), acl.malloc(1, n)
    host = ctypes.create_string_buffer(data, n)
    assert acl.lib.aclrtMemcpy(src, n, host, n, Acl.H2D) == 0
    with kvferry.TransferEngine() as prefill, kvferry.TransferEngine() as decode:
        for te in (prefill, decode):
            assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "ascend", "") == 0
        assert prefill.register_memory(src, n, "npu:0") == 0
        assert decode.register_memory(dst, n, "*") == 0  # detected as npu:1
        # Host memory registered as device memory: refused, with the reason.
        assert decode.register_memory(ctypes.addressof(host), 4096, "npu:1") == -1
        assert "aclrtPointerGetAttributes" in kvferry.last_error()
        k = n // block
        local = [dst + (k - 1 - i) * block for i in range(k)]  # reversed: nothing coalesces
        remote = [src + (k - 1 - i) * block for i in range(k)]
        assert decode.batch_transfer_sync_read(prefill.get_session_id(), local, remote, [block] * k) == 0
    back = ctypes.create_string_buffer(n)
    assert acl.lib.aclrtMemcpy(back, n, dst, n, Acl.D2H) == 0
    assert back.raw == data
    assert acl.lib.aclrtFree(src) == 0 and acl.lib.aclrtFree(dst) == 0
