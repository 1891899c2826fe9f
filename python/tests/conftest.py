import ctypes
import os
import sys
from pathlib import Path

import pytest

# Failures against dead or silent peers must end fast; spawned peers inherit these.
os.environ.setdefault("ASCEND_CONNECT_TIMEOUT", "1000")
os.environ.setdefault("KVFERRY_TRANSFER_TIMEOUT_MS", "10000")
# The tests choose the transport per engine; an outer setting would skew them.
for var in ("KVFERRY_TRANSPORT", "MC_FORCE_TCP", "MOONCAKE_CONFIG_PATH", "KVFERRY_AS_MOONCAKE"):
    os.environ.pop(var, None)

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kvferry  # noqa: E402
from peer import Peer  # noqa: E402

MiB = 1 << 20


def pytest_report_header(config):
    return [
        f"kvferry package: {Path(kvferry.__file__).parent}",
        f"libkvferry: {kvferry.library_path()} (version {kvferry.library_version()})",
    ]


@pytest.fixture(scope="session")
def peer():
    """A peer process with an 8 MiB registered buffer."""
    p = Peer("tcp", 8 * MiB)
    yield p
    p.stop()


@pytest.fixture(scope="session")
def engines():
    """Two initiator engines in this process: one forced to tcp (protocol
    "tcp"), one choosing the path (protocol "ascend": same host -> cma)."""
    out = {}
    for proto in ("tcp", "ascend"):
        te = kvferry.TransferEngine()
        assert te.initialize("127.0.0.1", "P2PHANDSHAKE", proto, "") == 0, kvferry.last_error()
        out[proto] = te
    yield out
    for te in out.values():
        te.close()


@pytest.fixture(params=["tcp", "ascend"])
def te(request, engines):
    return engines[request.param]


class Buffer:
    """A ctypes buffer registered with an engine for the duration of a test."""

    def __init__(self, te, size):
        self.te = te
        self.raw = ctypes.create_string_buffer(size)
        self.addr = ctypes.addressof(self.raw)
        self.size = size
        assert te.register_memory(self.addr, size) == 0, kvferry.last_error()

    def bytes(self, offset=0, n=None):
        return ctypes.string_at(self.addr + offset, self.size - offset if n is None else n)

    def fill(self, offset, data):
        ctypes.memmove(self.addr + offset, data, len(data))

    def close(self):
        assert self.te.unregister_memory(self.addr) == 0, kvferry.last_error()


@pytest.fixture
def local(te):
    b = Buffer(te, 4 * MiB)
    yield b
    b.close()


def pattern(n, seed):
    """n bytes that differ per seed and along the buffer (period 251, a prime,
    so no power-of-two offset repeats the same bytes)."""
    period = bytes((i * 7 + seed * 13 + 1) & 0xFF for i in range(251))
    return (period * (n // 251 + 1))[:n]
