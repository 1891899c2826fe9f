"""`kvferry.TransferEngine`: the API of `mooncake.engine.TransferEngine`, with
Mooncake's argument order and return conventions, over a `kvferry.Engine`.

Failures return Mooncake's failure value (-1, a batch id of 0, an address
of 0, b""), never raise; the reason goes to `kvferry.last_error()` (per
thread) and to the `kvferry` logger at WARNING, prefixed by the method name.
Wrong argument types are failures like any other.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import struct
import threading
from typing import Any, NamedTuple

from . import _errors, _ffi, _managed
from ._errors import Error, Status, logger
from .engine import READ, WRITE, Engine, _lib_error
from .mooncake_config import MooncakeConfig


class TransferOpcode(enum.IntEnum):
    """Mooncake's opcodes (`TransferOpcode.Read` / `.Write`; the upper-case
    spellings are aliases)."""

    Read = READ
    Write = WRITE
    READ = READ
    WRITE = WRITE


class TransferNotify(NamedTuple):
    """A notification: `name` and `msg`, as Mooncake's `TransferNotify`. It is
    also a `(name, msg)` tuple, so `for name, msg in te.get_notifies()` works.

    Received notifications carry the sender's session id (`"host:port"`) as
    `name`, unless the sender named them otherwise (see docs/python.md)."""

    name: str = ""
    msg: str = ""


# A notification whose name is not the sender's session id travels as
# MAGIC + u16 little-endian name length + name + message.
_NAMED_MAGIC = b"\x00kvfn"

P2P_HANDSHAKE = "P2PHANDSHAKE"
# Protocols Mooncake users pass; every one but "tcp" lets kvferry pick the
# best path per peer (in-process, same host, tcp).
KNOWN_PROTOCOLS = {"", "auto", "tcp", "rdma", "ascend", "ascend_direct", "hccs", "cma", "shm", "local"}
# The ones vllm-ascend passes on NPU hosts: the engine also handles NPU
# memory when the Ascend runtime is installed (host memory only elsewhere).
ASCEND_PROTOCOLS = {"ascend", "ascend_direct", "hccs"}


def _encode_notify(own_name: str, notify: Any) -> bytes:
    if isinstance(notify, TransferNotify) or (isinstance(notify, tuple) and len(notify) == 2):
        name, msg = notify
    elif hasattr(notify, "name") and hasattr(notify, "msg"):
        name, msg = notify.name, notify.msg
    else:
        raise TypeError(f"notify: expected a TransferNotify(name, msg), got {type(notify).__name__}")
    if not isinstance(name, str) or not isinstance(msg, (str, bytes)):
        raise TypeError("notify: name must be str and msg str or bytes")
    body = msg.encode(errors="surrogateescape") if isinstance(msg, str) else msg
    if not name or name == own_name:
        return body
    raw = name.encode(errors="surrogateescape")
    if len(raw) > 0xFFFF:
        raise ValueError("notify: name is longer than 65535 bytes")
    return _NAMED_MAGIC + struct.pack("<H", len(raw)) + raw + body


def _decode_notify(sender: str, message: bytes) -> TransferNotify:
    name, body = sender, message
    if message.startswith(_NAMED_MAGIC) and len(message) >= len(_NAMED_MAGIC) + 2:
        (n,) = struct.unpack_from("<H", message, len(_NAMED_MAGIC))
        start = len(_NAMED_MAGIC) + 2
        if start + n <= len(message):
            name = message[start : start + n].decode(errors="surrogateescape")
            body = message[start + n :]
    return TransferNotify(name, body.decode(errors="surrogateescape"))


# Names an engine advertises that only this host can reach.
LOOPBACK_PREFIXES = ("127.", "localhost:", "[::1]:")


def _parse_local_hostname(value: str) -> tuple[str | None, int | None]:
    """`"host"`, `"host:port"`, `"[v6]"`, `"[v6]:port"` or a bare IPv6 address."""
    if not value:
        return None, None
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not host:
            raise ValueError(f'local_hostname {value!r}: expected "[ipv6]" or "[ipv6]:port"')
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ValueError(f'local_hostname {value!r}: expected "[ipv6]:port"')
        port = rest[1:]
    elif value.count(":") == 1:
        host, port = value.split(":")
        if not host:
            raise ValueError(f"local_hostname {value!r}: the host is empty")
    else:
        return value, None  # a name, an IPv4 address or a bare IPv6 address
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"local_hostname {value!r}: the port is not a number in 0..65535")
    return host, int(port)


def _mooncake(failure):
    """Turns every failure of the wrapped method into `failure`, with the
    reason kept in `last_error()` and logged."""

    def wrap(method):
        name = method.__name__

        @functools.wraps(method)
        def call(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except _FAILURES as e:
                return self._failed(name, e, failure)

        return call

    return wrap


def _batch_sync_method(name: str, op: int):
    """`batch_transfer_sync_read` / `_write`: the hot path of a connector,
    so no decorator and few lookups. Lists go to the library as they are
    (`Engine._transfer_lists`); anything else, and a session's first call,
    take the general path (`_batch_sync`)."""

    def method(self, target_hostname, buffers, peer_buffer_addresses, lengths, transport_hint="") -> int:
        engine = self._engine
        if engine is not None:
            status = engine._transfer_lists(target_hostname, op, buffers, peer_buffer_addresses, lengths)
            if status is not None:
                return status and self._lib_failed(name, engine, status)
        return self._batch_sync(name, op, target_hostname, buffers, peer_buffer_addresses, lengths)

    method.__name__ = method.__qualname__ = name
    if op == READ:
        direction = "at the peer's `peer_buffer_addresses[i]` to the local `buffers[i]`"
    else:
        direction = "at the local `buffers[i]` to the peer's `peer_buffer_addresses[i]`"
    method.__doc__ = (
        f"Copies `lengths[i]` bytes {direction}, for every i, and returns when all are done: 0, or -1 "
        '(`kvferry.last_error()` says why). `target_hostname` is the peer\'s "host:port"; empty lists '
        "move nothing (0)."
    )
    return method


#: What a Mooncake-API method turns into its failure value.
_FAILURES = (Error, TypeError, ValueError, OverflowError)


class TransferEngine:
    """Drop-in for `mooncake.engine.TransferEngine`: Mooncake's methods,
    argument order and return codes (docs/python.md). One per process,
    shared by all its threads.

    Calls never raise: a failure returns Mooncake's failure value (-1, a
    batch id or address of 0, b"", []) and leaves the reason in
    `kvferry.last_error()` / `kvferry.last_status()` (per thread) and in the
    `kvferry` logger (WARNING). Addresses are absolute virtual addresses;
    in transfers the first address (list) is the local side, the second the
    peer's, whose session id `target_hostname` is "host:port"."""

    def __init__(self) -> None:
        self._engine: Engine | None = None
        self._init_lock = threading.Lock()
        self._closed_name = ""  # the session id of the engine `close()` ended

    # -- failure bookkeeping ------------------------------------------------------

    @staticmethod
    def _fail(method: str, status, message: str, failure):
        text = f"{method}: {message}"
        _errors.record(int(status), text)
        logger.warning("kvferry: %s", text)
        return failure() if callable(failure) else failure

    def _failed(self, method: str, e: Exception, failure):
        if isinstance(e, Error):
            return self._fail(method, e.status, e.message, failure)
        return self._fail(method, Status.INVALID_ARGUMENT, str(e), failure)

    def _e(self) -> Engine:
        engine = self._engine
        if engine is None:
            raise self._no_engine()
        return engine

    def _no_engine(self) -> Error:
        if self._closed_name:
            return Error(
                Status.INVALID_ARGUMENT,
                f"the engine {self._closed_name} is closed: close() was called (initialize() starts a new one)",
            )
        return Error(Status.INVALID_ARGUMENT, "the engine is not initialized: call initialize() first")

    # -- setup ------------------------------------------------------------------

    @_mooncake(-1)
    def initialize(self, local_hostname, metadata_server, protocol, device_name) -> int:
        """Creates the engine. `metadata_server` must be "P2PHANDSHAKE" (no
        metadata server: peers address this engine as `"host:port"`).
        `local_hostname` "host:port" listens on that port; a bare host picks a
        free port in 15000-17000 (`MC_MIN_RPC_PORT` / `MC_MAX_RPC_PORT`).
        `protocol` "tcp" forces tcp; any other lets kvferry pick the path.
        Empty arguments are taken from mooncake.json (`MOONCAKE_CONFIG_PATH`)."""
        return self._initialize(local_hostname, metadata_server, protocol, device_name)

    @_mooncake(-1)
    def initialize_ext(self, local_hostname, metadata_server, protocol, device_name, metadata_type="") -> int:
        """`initialize` with Mooncake's extra `metadata_type` (only "" or "p2p")."""
        if not isinstance(metadata_type, str):
            raise TypeError(f"metadata_type: expected str, got {type(metadata_type).__name__}")
        if metadata_type not in ("", "p2p", "P2PHANDSHAKE"):
            raise Error(
                Status.UNSUPPORTED,
                f"metadata_type {metadata_type!r}: kvferry has no metadata server; "
                'engines find each other by "host:port" (P2PHANDSHAKE)',
            )
        return self._initialize(local_hostname, metadata_server, protocol, device_name)

    def _initialize(self, local_hostname, metadata_server, protocol, device_name) -> int:
        for what, v in (
            ("local_hostname", local_hostname),
            ("metadata_server", metadata_server),
            ("protocol", protocol),
            ("device_name", device_name),
        ):
            if v is not None and not isinstance(v, str):
                raise TypeError(f"{what}: expected str, got {type(v).__name__} {v!r}")
        config = MooncakeConfig.from_env()
        if config is not None:
            local_hostname = local_hostname or config.local_hostname
            metadata_server = metadata_server or config.metadata_server
            protocol = protocol or config.protocol
            device_name = device_name or config.device_name
        meta = (metadata_server or P2P_HANDSHAKE).strip()
        if meta.upper() != P2P_HANDSHAKE:
            raise Error(
                Status.UNSUPPORTED,
                f"metadata server {meta!r}: kvferry has no metadata server; pass "
                '"P2PHANDSHAKE" (engines find each other by "host:port")',
            )
        proto = (protocol or "").strip().lower()
        if proto not in KNOWN_PROTOCOLS:
            logger.warning(
                "kvferry: protocol %r is not one kvferry knows; it picks the best path per peer "
                '(pass "tcp" to force tcp)',
                protocol,
            )
        if device_name:
            logger.debug("kvferry: device_name %r is not used (devices are found per registration)", device_name)
        host, port = _parse_local_hostname((local_hostname or "").strip())
        with self._init_lock:
            if self._engine is not None:
                raise Error(Status.INVALID_ARGUMENT, f"already initialized as {self._engine.name}")
            self._closed_name = ""
            engine = self._engine = Engine(
                hostname=host,
                port=port,
                transport="tcp" if proto == "tcp" else None,
                ascend=None if proto in ASCEND_PROTOCOLS else False,
            )
        # `engine`, not `self._engine`: a close() on another thread may have
        # taken it already, and this method must not raise.
        logger.info("kvferry: engine %s is listening (protocol %r)", engine.name, proto or "auto")
        if host is None and engine.name.startswith(LOOPBACK_PREFIXES):
            # Peers address this engine by the name it advertises; a loopback
            # one silently works on this host and fails from every other.
            logger.warning(
                "kvferry: no local_hostname given: engine %s is reachable from this host only; "
                "pass this host's address (or set KVFERRY_HOSTNAME) for peers on other hosts",
                engine.name,
            )
        return 0

    @_mooncake(-1)
    def get_rpc_port(self) -> int:
        """The engine's one listening port (peers use `"ip:port"`)."""
        return self._e().port

    @_mooncake(0)
    def get_first_buffer_address(self, segment_name) -> int:
        """The start of the lowest-addressed region `segment_name` ("host:port")
        has registered now (Mooncake's: of its first registered buffer; the
        same for a peer that registers one). 0 on failure, or when the peer
        has registered nothing. `get_engine().peer_regions()` lists them all."""
        regions = self._e().peer_regions(segment_name)
        if not regions:
            raise Error(Status.NOT_REGISTERED, f"{segment_name} has registered no memory")
        return regions[0][0]

    def get_engine(self) -> Engine | None:
        """The underlying `kvferry.Engine`, or None before `initialize`. (Not
        an object Mooncake's store accepts: kvferry has no store client.)"""
        return self._engine

    def get_session_id(self) -> str:
        """This engine's `"host:port"` ("" before `initialize`)."""
        return self._engine.name if self._engine is not None else ""

    def close(self) -> None:
        """Frees the engine (also done at exit). Not in Mooncake's API."""
        engine, self._engine = self._engine, None
        if engine is not None:
            self._closed_name = engine.name
            engine.close()

    def __enter__(self) -> "TransferEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- memory -----------------------------------------------------------------

    @_mooncake(-1)
    def register_memory(self, buffer_addr, capacity, location="*") -> int:
        """Lets peers read and write `capacity` bytes at `buffer_addr`; 0 or
        -1. `location`: "cpu:0", "npu:N", or "*" (detected)."""
        self._e().register(_ffi.u64(buffer_addr, "buffer_addr"), _ffi.u64(capacity, "capacity"), location)
        return 0

    @_mooncake(-1)
    def unregister_memory(self, buffer_addr) -> int:
        """Ends the registration that starts at `buffer_addr`, once the
        transfers using it are done; 0 or -1."""
        self._e().unregister(_ffi.u64(buffer_addr, "buffer_addr"))
        return 0

    @_mooncake(-1)
    def batch_register_memory(self, buffer_addresses, capacities, location="*") -> int:
        """`register_memory` for several regions, all or none; 0 or -1."""
        engine = self._e()
        addrs = list(buffer_addresses)
        for i, a in enumerate(addrs):
            _ffi.u64(a, f"buffer_addresses[{i}]")
        caps = list(capacities)
        for i, c in enumerate(caps):
            _ffi.u64(c, f"capacities[{i}]")
        engine.register_many(addrs, caps, location)
        return 0

    @_mooncake(-1)
    def batch_unregister_memory(self, buffer_addresses) -> int:
        """`unregister_memory` for several regions, all or none; 0 or -1."""
        engine = self._e()
        addrs = list(buffer_addresses)
        for i, a in enumerate(addrs):
            _ffi.u64(a, f"buffer_addresses[{i}]")
        engine.unregister_many(addrs)
        return 0

    @_mooncake(0)
    def allocate_managed_buffer(self, length) -> int:
        """Address of `length` bytes of memory this engine registered itself."""
        return self._e().allocate(length)

    @_mooncake(-1)
    def free_managed_buffer(self, buffer_addr, length) -> int:
        """Returns a buffer of `allocate_managed_buffer`, with the length it
        was allocated with; 0 or -1."""
        self._e().free(buffer_addr, length)
        return 0

    def _buffer_io(self, addr, length, what: str, io):
        """`io(addr, length)` on memory this engine registered (a managed
        buffer cannot be freed meanwhile), or NOT_REGISTERED."""
        engine = self._e()
        addr = _ffi.u64(addr, what)
        length = _ffi.u64(length, "length")
        result = engine.access_registered(addr, length, lambda: io(addr, length))
        if result is _managed.OUTSIDE:
            raise Error(
                Status.NOT_REGISTERED,
                f"[{addr:#x}, +{length}) is not inside memory registered by this engine or one of its managed buffers",
            )
        return result

    @_mooncake(-1)
    def write_bytes_to_buffer(self, dest_address, src_ptr, length) -> int:
        """Copies the first `length` bytes of `src_ptr` (bytes) to
        `dest_address`, which must lie in memory this engine registered."""
        if not isinstance(src_ptr, (bytes, bytearray, memoryview)):
            raise TypeError(f"src_ptr: expected bytes, got {type(src_ptr).__name__}")
        data = bytes(src_ptr)
        length = _ffi.u64(length, "length")
        if length > len(data):
            raise ValueError(f"length {length} is larger than the data ({len(data)} bytes)")
        self._buffer_io(dest_address, length, "dest_address", lambda a, n: ctypes.memmove(a, data, n))
        return 0

    @_mooncake(b"")
    def read_bytes_from_buffer(self, source_address, length) -> bytes:
        """`length` bytes at `source_address` (memory this engine registered);
        b"" on failure."""
        return self._buffer_io(source_address, length, "source_address", ctypes.string_at)

    # -- transfers --------------------------------------------------------------

    @_mooncake(-1)
    def transfer_sync_read(self, target_hostname, buffer, peer_buffer_address, length, transport_hint="") -> int:
        """Copies `length` bytes at the peer's `peer_buffer_address` to the
        local `buffer`; 0 or -1. `target_hostname` is the peer's "host:port"."""
        self._e().transfer(target_hostname, READ, [buffer], [peer_buffer_address], [length])
        return 0

    @_mooncake(-1)
    def transfer_sync_write(self, target_hostname, buffer, peer_buffer_address, length, transport_hint="") -> int:
        """Copies `length` bytes at the local `buffer` to the peer's
        `peer_buffer_address`; 0 or -1."""
        self._e().transfer(target_hostname, WRITE, [buffer], [peer_buffer_address], [length])
        return 0

    batch_transfer_sync_read = _batch_sync_method("batch_transfer_sync_read", READ)
    batch_transfer_sync_write = _batch_sync_method("batch_transfer_sync_write", WRITE)

    def _lib_failed(self, method: str, engine: Engine, status: int) -> int:
        """-1 for a failed library call of the batch calls' fast path
        (`Engine._transfer_lists`), recorded as `_mooncake` does."""
        return self._fail(method, status, _lib_error(engine._lib, status).message, -1)

    def _batch_sync(self, method: str, op: int, session, buffers, peer_buffer_addresses, lengths) -> int:
        """The batch calls' general path: 0, or -1 as `_mooncake` gives."""
        try:
            self._e().transfer(session, op, buffers, peer_buffer_addresses, lengths)
            return 0
        except _FAILURES as e:
            return self._failed(method, e, -1)

    @_mooncake(-1)
    def transfer_sync(
        self, target_hostname, buffer, peer_buffer_address, length, opcode, notify=None, transport_hint=""
    ) -> int:
        """One op, `opcode` `TransferOpcode.Read` or `.Write`; 0 or -1. With
        `notify` (a `TransferNotify`), the peer receives it after the data
        of a WRITE has landed (after a READ: once the read is done)."""
        self._sync(target_hostname, [buffer], [peer_buffer_address], [length], opcode, notify)
        return 0

    @_mooncake(-1)
    def batch_transfer_sync(
        self, target_hostname, buffers, peer_buffer_addresses, lengths, opcode, notify=None, transport_hint=""
    ) -> int:
        """`transfer_sync` for lists of ops; 0 or -1."""
        self._sync(target_hostname, buffers, peer_buffer_addresses, lengths, opcode, notify)
        return 0

    def _sync(self, session, locals_, remotes, lengths, opcode, notify) -> None:
        engine = self._e()
        op = Engine._opcode(opcode)
        if notify is None:
            engine.transfer(session, op, locals_, remotes, lengths)
            return
        message = _encode_notify(engine.name, notify)
        if op == WRITE:
            # The peer sees the notification only once all the data landed.
            batch = engine.submit(session, WRITE, locals_, remotes, lengths, notify=message)
            try:
                batch.wait()
            finally:
                batch._free_quietly()
        else:
            engine.transfer(session, READ, locals_, remotes, lengths)
            engine.notify(session, message)

    @_mooncake(0)
    def batch_transfer_async_read(
        self, target_hostname, buffers, peer_buffer_addresses, lengths, transport_hint=""
    ) -> int:
        """Starts the reads of `batch_transfer_sync_read` in the background:
        a batch id (0 on failure) for `get_batch_transfer_status` or
        `transfer_check_status`, which free it."""
        return self._e().submit(target_hostname, READ, buffers, peer_buffer_addresses, lengths).id

    @_mooncake(0)
    def batch_transfer_async_write(
        self, target_hostname, buffers, peer_buffer_addresses, lengths, transport_hint=""
    ) -> int:
        """Starts the writes of `batch_transfer_sync_write` in the background:
        a batch id (0 on failure), as `batch_transfer_async_read`."""
        return self._e().submit(target_hostname, WRITE, buffers, peer_buffer_addresses, lengths).id

    @_mooncake(0)
    def batch_transfer_async(
        self, target_hostname, buffers, peer_buffer_addresses, lengths, opcode, transport_hint=""
    ) -> int:
        """`batch_transfer_async_read` / `_write` by `opcode`: a batch id, 0
        on failure."""
        return self._e().submit(target_hostname, opcode, buffers, peer_buffer_addresses, lengths).id

    @_mooncake(0)
    def transfer_submit_write(self, target_hostname, buffer, peer_buffer_address, length, transport_hint="") -> int:
        """Starts one write; returns its batch id (0 on failure). Follow with
        `transfer_check_status`."""
        return self._e().submit(target_hostname, WRITE, [buffer], [peer_buffer_address], [length]).id

    @_mooncake(-1)
    def transfer_blocks(
        self, target_hostname, local_layout, remote_layout, local_ids, remote_ids, opcode=TransferOpcode.Read, **options
    ) -> int:
        """kvferry extension: plans a request's blocks over two
        `kvferry.topology.Layout`s and moves them in one call; 0 or -1.
        Options as `kvferry.topology.transfer_blocks` (pulls, offset_index,
        split, computed_tokens, tokens_per_block, trim_remote_head)."""
        from . import topology

        topology.transfer_blocks(
            self._e(), target_hostname, local_layout, remote_layout, local_ids, remote_ids, opcode=opcode, **options
        )
        return 0

    @_mooncake(0)
    def transfer_blocks_async(
        self, target_hostname, local_layout, remote_layout, local_ids, remote_ids, opcode=TransferOpcode.Read, **options
    ) -> int:
        """`transfer_blocks` in the background: its batch id (0 on failure),
        for `transfer_check_status`."""
        from . import topology

        options["wait"] = False
        return topology.transfer_blocks(
            self._e(), target_hostname, local_layout, remote_layout, local_ids, remote_ids, opcode=opcode, **options
        )

    @_mooncake(-1)
    def transfer_check_status(self, batch_id) -> int:
        """1 done, 0 in progress, -1 failed, -2 timed out. A batch that ended
        (1, -1 or -2) is freed: its id is not valid afterwards."""
        engine = self._e()
        lib = engine._lib
        bid = _ffi.u64(batch_id, "batch_id")
        status = engine._call(lib.kvf_batch_poll, bid)
        if status == Status.IN_PROGRESS:
            return 0
        if status == Status.OK:
            engine._call(lib.kvf_batch_free, bid)
            return 1
        error = _errors_from(lib, status)
        if status != Status.BAD_BATCH_ID:
            engine._call(lib.kvf_batch_free, bid)
        self._fail("transfer_check_status", status, f"batch {bid:#x}: {error}", None)
        # A poll never says TIMEOUT (that is a wait running out); a batch the
        # transfer timeout ended says TRANSFER_TIMEOUT.
        return -2 if status == Status.TRANSFER_TIMEOUT else -1

    @_mooncake(-1)
    def get_batch_transfer_status(self, batch_ids) -> int:
        """Waits for every batch, frees them all; 0 when all succeeded, -1 if
        any failed or timed out (each one's reason is logged)."""
        engine = self._e()
        lib = engine._lib
        if isinstance(batch_ids, (str, bytes)) or not hasattr(batch_ids, "__iter__"):
            raise TypeError(f"batch_ids: expected a list of batch ids, got {type(batch_ids).__name__}")
        failed = None
        for raw in list(batch_ids):
            try:
                bid = _ffi.u64(raw, "batch id")
            except (TypeError, ValueError) as e:
                failed = self._fail("get_batch_transfer_status", Status.INVALID_ARGUMENT, str(e), -1)
                continue
            status = engine._call(lib.kvf_batch_wait, bid, _ffi.KVF_WAIT_FOREVER)
            if status != Status.OK:
                error = _errors_from(lib, status)
                failed = self._fail("get_batch_transfer_status", status, f"batch {bid:#x}: {error}", -1)
            if status != Status.BAD_BATCH_ID:
                engine._call(lib.kvf_batch_free, bid)
        return 0 if failed is None else -1

    # -- notifications ------------------------------------------------------------

    @_mooncake(list)
    def get_notifies(self) -> list[TransferNotify]:
        """Every notification received since the last call, oldest first, as
        `TransferNotify(name, msg)` (also a `(name, msg)` tuple); `[]` on
        failure."""
        return [_decode_notify(n.sender, n.message) for n in self._e().notifications()]

    @_mooncake(-1)
    def send_notify(self, target_hostname, notify) -> int:
        """Sends a `TransferNotify` (or a str) to a peer. Not in Mooncake's
        Python API; its `transfer_sync(..., notify=)` sends one after data."""
        engine = self._e()
        message = notify.encode() if isinstance(notify, str) else _encode_notify(engine.name, notify)
        engine.notify(target_hostname, message)
        return 0


def _errors_from(lib, status: int) -> str:
    message = (lib.kvf_last_error() or b"").decode(errors="replace")
    return message or (lib.kvf_status_str(status) or b"").decode(errors="replace")
