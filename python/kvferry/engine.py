"""The Pythonic API: `kvferry.Engine`, which raises `kvferry.Error` instead of
returning codes, accepts tensors and arrays wherever an address goes, and
closes as a context manager.

Thread-safety: one Engine may be used from any number of threads. No Python
lock is held while the library works (ctypes releases the GIL for the call);
a short lock only counts calls in flight so that `close()` waits for them
instead of freeing the engine under them.
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from typing import Any, NamedTuple, Sequence

from . import _errors, _ffi, _managed
from ._buffers import span, spans
from ._errors import Error, Status
from ._managed import ManagedAllocator

READ = _ffi.KVF_OP_READ
WRITE = _ffi.KVF_OP_WRITE


def _c_str(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"{what}: expected str, got {type(value).__name__} {value!r}")
    if "\0" in value:
        raise ValueError(f"{what}: {value!r} contains a NUL character")
    return value.encode()


_SESSIONS: dict[str, bytes] = {}


def _session(session: Any) -> bytes:
    """A session id as C wants it; the few ids a process uses are cached."""
    cached = _SESSIONS.get(session) if type(session) is str else None
    if cached is None:
        cached = _c_str(session, "session")
        if len(_SESSIONS) < 4096:
            _SESSIONS[session] = cached
    return cached


def _message_bytes(message: Any) -> bytes:
    if isinstance(message, str):
        return message.encode()
    if isinstance(message, (bytes, bytearray, memoryview)):
        return bytes(message)
    raise TypeError(f"message: expected str or bytes, got {type(message).__name__}")


def _lists(locals_, remotes, lengths) -> bool:
    """Three non-empty lists of one length: what the library reads itself
    (`_ffi.pylists`)."""
    return (
        type(locals_) is list
        and type(remotes) is list
        and type(lengths) is list
        and 0 < len(locals_) == len(remotes) == len(lengths)
    )


def _lib_error(lib, status: int) -> Error:
    message = (lib.kvf_last_error() or b"").decode(errors="replace")
    if not message:
        message = (lib.kvf_status_str(status) or b"").decode(errors="replace")
    return Error(status, message)


class Notification(NamedTuple):
    """A message another engine sent: its session id (`"host:port"`) and
    the bytes it sent."""

    sender: str
    message: bytes


class Region(NamedTuple):
    """Memory registered with an engine. `engine.unregister(region)` or
    `with engine.register(...) as region:` ends it."""

    addr: int
    length: int
    location: str
    owner: Any  # the registered object, kept alive while registered
    engine: "Engine"

    def __enter__(self) -> "Region":
        return self

    def __exit__(self, *exc) -> None:
        # A closed engine unregistered everything already: raising "the
        # engine is closed" here would hide the exception that left the block.
        if not self.engine.closed:
            self.engine.unregister(self.addr)


class _Handle:
    """The engine pointer and what must be released with it; shared by the
    Engine and its finalizer (which must not hold the Engine).

    Calls need no lock here: the library keeps a handle valid until
    `kvf_engine_free` and makes `kvf_engine_close` wait for the calls
    running (later ones fail with "the engine is closed"). Only the
    finalizer frees, once no thread can hold the Engine."""

    def __init__(self, lib, ptr: int):
        self.lib = lib
        self.ptr: int = ptr
        self.pid = os.getpid()
        self.closed = False
        self.lock = threading.Lock()  # one close at a time
        self.allocator: ManagedAllocator | None = None

    def run(self, fn, *args) -> None:
        """`fn(engine, *args)`, raising its error."""
        status = fn(self.ptr, *args)
        if status:
            raise _lib_error(self.lib, status)

    def close(self, wait_s: float | None = None) -> bool:
        """Closes the engine once the calls running on it return (waiting at
        most `wait_s`); False if they did not (the engine stays open)."""
        with self.lock:
            if self.closed:
                return True
            timeout = _ffi.timeout_ms(wait_s, "wait_s")
            if self.lib.kvf_engine_close(self.ptr, timeout) != Status.OK:
                # Only at interpreter exit with daemon threads still inside a
                # call: closing would pull the engine from under them.
                _errors.logger.warning("kvferry: calls still running at exit; the engine is left to the OS")
                return False
            self.closed = True
        if self.allocator is not None:
            self.allocator.release_all()
        return True


def _finalize(handle: _Handle) -> None:
    # A forked child has a copy of the engine but none of its threads:
    # closing it there would wait for threads that do not exist.
    if os.getpid() == handle.pid and handle.close(wait_s=5.0):
        handle.lib.kvf_engine_free(handle.ptr)


class Engine:
    """A kvferry engine: one listening port, registered memory, transfers.

    Unset arguments come from the environment (`KVFERRY_*`, then the
    variables Mooncake users set: `ASCEND_CONNECT_TIMEOUT`,
    `ASCEND_TRANSFER_TIMEOUT`, `MC_TRANSFER_TIMEOUT`, `MC_FORCE_TCP`, ...)
    and then the defaults: hostname 127.0.0.1, a free port in 15000-17000.

    `transport`: "auto" (the best path per peer: in-process copy, then
    process_vm_readv on the same host, then tcp) or "tcp".

    `ascend`: whether the engine handles Ascend NPU memory (the ACL runtime:
    `KVFERRY_ACL_LIBRARY`, else `libascendcl.so` from the loader's path).
    False (default): host memory only. True: the runtime is required
    (`Error` with `Status.UNSUPPORTED` where there is none). None: use it
    where it is installed, host memory only elsewhere (what
    `TransferEngine.initialize` does for protocol "ascend").
    """

    def __init__(
        self,
        hostname: str | None = None,
        port: int | None = None,
        *,
        port_range: tuple[int, int] | None = None,
        transport: str | None = None,
        connect_timeout_ms: int | None = None,
        transfer_timeout_ms: int | None = None,
        slice_size: int | None = None,
        async_workers: int | None = None,
        lanes: int | None = None,
        max_connections: int | None = None,
        secret: str | None = None,
        ascend: bool | None = False,
    ):
        lib = _ffi.load()
        cfg = ctypes.c_void_p()
        self._lib = lib
        self._check(lib.kvf_config_new(ctypes.byref(cfg)))
        try:

            def setting(fn, *args):
                self._check(fn(cfg, *args))

            if hostname is not None:
                setting(lib.kvf_config_set_hostname, _c_str(hostname, "hostname"))
            if port is not None:
                setting(lib.kvf_config_set_port, _ffi.uint(port, "port", 16))
            if port_range is not None:
                lo, hi = port_range
                setting(lib.kvf_config_set_port_range, _ffi.uint(lo, "port_range", 16), _ffi.uint(hi, "port_range", 16))
            if transport is not None:
                setting(lib.kvf_config_set_transport, _c_str(transport, "transport"))
            if connect_timeout_ms is not None:
                setting(lib.kvf_config_set_connect_timeout_ms, _ffi.u64(connect_timeout_ms, "connect_timeout_ms"))
            if transfer_timeout_ms is not None:
                setting(lib.kvf_config_set_transfer_timeout_ms, _ffi.u64(transfer_timeout_ms, "transfer_timeout_ms"))
            if slice_size is not None:
                setting(lib.kvf_config_set_slice_size, _ffi.u64(slice_size, "slice_size"))
            if async_workers is not None:
                setting(lib.kvf_config_set_async_workers, _ffi.uint(async_workers, "async_workers", 32))
            if lanes is not None:
                setting(lib.kvf_config_set_lanes, _ffi.uint(lanes, "lanes", 32))
            if max_connections is not None:
                setting(lib.kvf_config_set_max_connections, _ffi.uint(max_connections, "max_connections", 32))
            if secret is not None:
                setting(lib.kvf_config_set_secret, _c_str(secret, "secret"))
            if ascend not in (True, False, None):
                raise TypeError(f"ascend: expected True, False or None, got {ascend!r}")
            if ascend is not False:
                status = lib.kvf_config_use_ascend(cfg)
                if status == Status.UNSUPPORTED and ascend is None:
                    _errors.logger.info(
                        "kvferry: %s; this engine handles host memory only", _lib_error(lib, status).message
                    )
                else:
                    self._check(status)
            ptr = ctypes.c_void_p()
            self._check(lib.kvf_engine_new(cfg, ctypes.byref(ptr)))
        finally:
            lib.kvf_config_free(cfg)
        self._h = _Handle(lib, ptr.value)
        # The list fast path (`_ffi.pylists`), or None where it cannot serve.
        self._pylists = _ffi.pylists()
        self._finalizer = weakref.finalize(self, _finalize, self._h)
        self._regions: dict[int, Region] = {}
        self._regions_lock = threading.Lock()
        self._alloc_lock = threading.Lock()
        name = ctypes.create_string_buffer(300)
        n = ctypes.c_size_t()
        self._check(lib.kvf_engine_name(ptr, name, len(name), ctypes.byref(n)))
        self._name = name.value.decode()
        p = ctypes.c_uint16()
        self._check(lib.kvf_engine_rpc_port(ptr, ctypes.byref(p)))
        self._port = p.value

    # -- plumbing -----------------------------------------------------------

    def _check(self, status: int) -> None:
        if status != Status.OK:
            raise _lib_error(self._lib, status)

    def _call(self, fn, *args) -> int:
        """`fn(engine, *args)`: its status."""
        return fn(self._h.ptr, *args)

    def _run(self, fn, *args) -> None:
        self._h.run(fn, *args)

    # -- identity and lifetime ------------------------------------------------

    @property
    def name(self) -> str:
        """This engine's session id, `"host:port"`: what peers pass as `session`."""
        return self._name

    @property
    def port(self) -> int:
        """The one port this engine listens on (control and tcp data)."""
        return self._port

    @property
    def closed(self) -> bool:
        """True once `close()` ran: every later call raises `Error`."""
        return self._h.closed

    def close(self) -> None:
        """Waits for calls in flight and the engine's batches, unregisters
        all memory, closes the port and unmaps managed buffers. Idempotent.
        Later calls fail with "the engine is closed"."""
        self._h.close()
        with self._regions_lock:
            self._regions.clear()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<kvferry.Engine {self._name} {state}>"

    # -- memory -----------------------------------------------------------------

    def register(self, buffer: Any, length: int | None = None, location: str | None = None) -> Region:
        """Registers memory so that peers can read and write it.

        `buffer` is an int address (then `length` is required), a tensor, a
        numpy array or a writable buffer (then `length` defaults to its size
        and the object is kept alive until unregistered). `location`:
        "cpu:0", "npu:N" or "*" (default: from the tensor's device, else "*").
        """
        s = span(buffer, "buffer")
        if length is None:
            if s.nbytes is None:
                raise TypeError("length: required when buffer is an int address")
            length = s.nbytes
        else:
            length = _ffi.u64(length, "length")
            if s.nbytes is not None and length > s.nbytes:
                raise ValueError(f"length {length} is larger than the buffer ({s.nbytes} bytes)")
        loc = location if location is not None else s.location
        self._run(self._lib.kvf_register_memory, s.addr, length, _c_str(loc, "location"))
        region = Region(s.addr, length, loc, s.keep, self)
        with self._regions_lock:
            self._regions[s.addr] = region
        return region

    def register_many(
        self, buffers: Sequence[Any], lengths: Sequence[int] | None = None, location: str = "*"
    ) -> list[Region]:
        """Registers several regions, all or none."""
        ss = spans(buffers, "buffers")
        if lengths is None:
            if any(s.nbytes is None for s in ss):
                raise TypeError("lengths: required when buffers are int addresses")
            lengths = [s.nbytes for s in ss]
        if len(lengths) != len(ss):
            raise ValueError(f"{len(ss)} buffers but {len(lengths)} lengths")
        if not ss:
            return []
        addrs = _ffi.u64_array([s.addr for s in ss], "buffers")
        lens = _ffi.u64_array(lengths, "lengths")
        self._run(self._lib.kvf_register_memory_batch, addrs, lens, len(ss), _c_str(location, "location"))
        regions = [Region(s.addr, n, location, s.keep, self) for s, n in zip(ss, lengths)]
        with self._regions_lock:
            for r in regions:
                self._regions[r.addr] = r
        return regions

    def unregister(self, region: Any) -> None:
        """Unregisters the region starting at `region` (a `Region`, an int
        address, or the registered object). Waits for transfers using it."""
        addr = region.addr if isinstance(region, Region) else span(region, "region").addr
        self._run(self._lib.kvf_unregister_memory, addr)
        with self._regions_lock:
            self._regions.pop(addr, None)

    def unregister_many(self, regions: Sequence[Any]) -> None:
        """Unregisters several regions, all or none."""
        addrs = [r.addr if isinstance(r, Region) else span(r, "regions").addr for r in regions]
        if not addrs:
            return
        self._run(self._lib.kvf_unregister_memory_batch, _ffi.u64_array(addrs, "regions"), len(addrs))
        with self._regions_lock:
            for a in addrs:
                self._regions.pop(a, None)

    def access_registered(self, addr: int, length: int, io):
        """`io()`'s result if `[addr, addr+length)` lies in memory registered
        through this object or in a managed buffer (which then cannot be
        freed while `io` runs), else `_managed.OUTSIDE`. Registered memory is
        the caller's: freeing it meanwhile is the caller's race."""
        with self._regions_lock:
            inside = any(r.addr <= addr and addr + length <= r.addr + r.length for r in self._regions.values())
        if inside:
            return io()
        alloc = self._h.allocator
        return _managed.OUTSIDE if alloc is None else alloc.access(addr, length, io)

    def _allocator(self) -> ManagedAllocator:
        if self._h.allocator is None:
            with self._alloc_lock:
                if self._h.allocator is None:
                    # The callbacks hold the handle, not the Engine: the
                    # finalizer keeps the handle, and must not keep the Engine.
                    h, lib = self._h, self._lib
                    self._h.allocator = ManagedAllocator(
                        lambda a, n: h.run(lib.kvf_register_memory, a, n, b"cpu:0"),
                        lambda a: h.run(lib.kvf_unregister_memory, a),
                    )
        return self._h.allocator

    def allocate(self, length: int) -> int:
        """Address of `length` bytes of host memory that this engine
        registered itself (a managed buffer). Free with `free(addr, length)`."""
        if self.closed:
            raise Error(Status.INVALID_ARGUMENT, "the engine is closed")
        return self._allocator().allocate(length)

    def free(self, addr: int, length: int) -> None:
        """Returns a managed buffer from `allocate` (same length)."""
        if self.closed:
            raise Error(Status.INVALID_ARGUMENT, "the engine is closed")
        self._allocator().free(addr, length)

    # -- transfers --------------------------------------------------------------

    def _ops(self, locals_, remotes, lengths, what: str):
        """Pointers to the local addresses, remote addresses and lengths (one
        buffer), the op count, and what must stay alive while they are used.
        Lists of ints (the Mooncake API) take the fast path: one C-level
        conversion. Otherwise tensors and buffers among the locals are
        resolved to addresses (and default lengths) first."""
        names = ("local addresses", "remote addresses", "lengths")
        keep = None
        try:
            if lengths is None:
                raise TypeError("lengths: required for int addresses")
            ptrs, counts, buf = _ffi.u64_columns((locals_, remotes, lengths), names)
        except TypeError:
            ss = spans(locals_, "local addresses")
            keep = ss
            if lengths is None:
                if any(s.nbytes is None for s in ss):
                    raise TypeError("lengths: required for int addresses") from None
                lengths = [s.nbytes for s in ss]
            ptrs, counts, buf = _ffi.u64_columns(([s.addr for s in ss], remotes, lengths), names)
        n, nr, nl = counts
        if not (nr == n == nl):
            raise ValueError(f"{what}: {n} local addresses, {nr} remote addresses and {nl} lengths; they must match")
        return ptrs[0], ptrs[1], ptrs[2], n, (buf, keep)

    def _transfer_lists(self, session, op: int, local_addrs, remote_addrs, lengths) -> int | None:
        """`transfer`'s fast path, for the Mooncake API's three lists of ints
        (read by the library, `_ffi.pylists`): the library's status, or None
        where it does not serve and nothing moved (other argument types, a
        session not seen yet, an item it cannot read). The hot path of a
        connector: kept to a few lookups."""
        lib = self._pylists
        sess = _SESSIONS.get(session) if type(session) is str else None
        # A session not seen yet goes the general way, which checks and caches it.
        if lib is None or sess is None or not _lists(local_addrs, remote_addrs, lengths):
            return None
        try:
            return lib.kvf_transfer_sync_pylists(self._h.ptr, sess, op, local_addrs, remote_addrs, lengths)
        except (TypeError, OverflowError):
            return None  # the general path names the item, or resolves a buffer

    @staticmethod
    def _one(local, remote, length):
        s = span(local, "local")
        if length is None:
            if s.nbytes is None:
                raise TypeError("length: required when local is an int address")
            length = s.nbytes
        return [s.addr], [remote], [length]

    def transfer(self, session: str, opcode: int, local_addrs, remote_addrs, lengths=None) -> None:
        """Moves a batch of ops and returns when all are done; raises the
        first error (nothing moved if the batch was refused up front).
        `opcode` is `kvferry.READ` (remote -> local) or `kvferry.WRITE`."""
        if (opcode == 0 or opcode == 1) and type(opcode) is int:
            status = self._transfer_lists(session, opcode, local_addrs, remote_addrs, lengths)
            if status == 0:
                return
            if status is not None:
                raise _lib_error(self._lib, status)
        sess = _session(session)
        op = self._opcode(opcode)
        la, ra, na, n, keep = self._ops(local_addrs, remote_addrs, lengths, "transfer")
        if n == 0:
            return
        status = self._lib.kvf_transfer_sync(self._h.ptr, sess, op, la, ra, na, n)
        if status:
            raise _lib_error(self._lib, status)
        del keep

    def read(self, session: str, local, remote: int, length: int | None = None) -> None:
        """Copies `length` bytes at `remote` in `session`'s memory to `local`."""
        self.transfer(session, READ, *self._one(local, remote, length))

    def write(self, session: str, local, remote: int, length: int | None = None) -> None:
        """Copies `length` bytes at `local` to `remote` in `session`'s memory."""
        self.transfer(session, WRITE, *self._one(local, remote, length))

    def read_batch(self, session: str, local_addrs, remote_addrs, lengths=None) -> None:
        """Copies `lengths[i]` bytes at `remote_addrs[i]` in `session`'s
        memory to `local_addrs[i]`, for every i; returns when all are done.
        `lengths` defaults to the sizes of the local buffers."""
        self.transfer(session, READ, local_addrs, remote_addrs, lengths)

    def write_batch(self, session: str, local_addrs, remote_addrs, lengths=None) -> None:
        """Copies `lengths[i]` bytes at `local_addrs[i]` to `remote_addrs[i]`
        in `session`'s memory, for every i; returns when all are done."""
        self.transfer(session, WRITE, local_addrs, remote_addrs, lengths)

    _opcode = staticmethod(_ffi.opcode)

    def submit(self, session: str, opcode: int, local_addrs, remote_addrs, lengths=None, *, notify=None) -> "Batch":
        """Starts a batch in the background and returns it (validated first:
        an error here means nothing moved). With `notify` (WRITE only), the
        peer receives that message once all the batch's data has landed."""
        sess = _session(session)
        op = self._opcode(opcode)
        if notify is None and self._pylists is not None and _lists(local_addrs, remote_addrs, lengths):
            out = ctypes.c_uint64()
            try:
                status = self._pylists.kvf_batch_submit_pylists(
                    self._h.ptr, sess, op, local_addrs, remote_addrs, lengths, ctypes.byref(out)
                )
            except (TypeError, OverflowError):
                status = None  # as in `transfer`
            if status is not None:
                if status:
                    raise _lib_error(self._lib, status)
                return Batch(self, out.value, len(local_addrs), None)
        la, ra, na, n, keep = self._ops(local_addrs, remote_addrs, lengths, "submit")
        if n == 0:
            raise Error(Status.INVALID_ARGUMENT, "a batch needs at least one op")
        out = ctypes.c_uint64()
        if notify is None:
            self._run(self._lib.kvf_batch_submit, sess, op, la, ra, na, n, ctypes.byref(out))
        else:
            if op != WRITE:
                raise ValueError("notify: only WRITE batches carry a notification")
            msg = _message_bytes(notify)
            self._run(self._lib.kvf_batch_submit_write_notify, sess, la, ra, na, n, msg, len(msg), ctypes.byref(out))
        return Batch(self, out.value, n, keep)

    def submit_read(self, session: str, local_addrs, remote_addrs, lengths=None) -> "Batch":
        """`read_batch` in the background: the `Batch` to wait for."""
        return self.submit(session, READ, local_addrs, remote_addrs, lengths)

    def submit_write(self, session: str, local_addrs, remote_addrs, lengths=None, *, notify=None) -> "Batch":
        """`write_batch` in the background: the `Batch` to wait for. With
        `notify` (str or bytes), the peer receives it once all the data landed."""
        return self.submit(session, WRITE, local_addrs, remote_addrs, lengths, notify=notify)

    def batch(self, batch_id: int) -> "Batch":
        """A `Batch` for an id obtained elsewhere (e.g. the Mooncake API)."""
        return Batch(self, _ffi.u64(batch_id, "batch_id"), None, None)

    def transfer_blocks(self, session: str, local_layout, remote_layout, local_ids, remote_ids, **options) -> None:
        """Plans a request's blocks over two `kvferry.topology.Layout`s and
        moves them in one call; see `kvferry.topology.transfer_blocks`."""
        from . import topology

        topology.transfer_blocks(self, session, local_layout, remote_layout, local_ids, remote_ids, **options)

    def submit_blocks(self, session: str, local_layout, remote_layout, local_ids, remote_ids, **options) -> "Batch":
        """`transfer_blocks` in the background: the `Batch` to wait for."""
        from . import topology

        options["wait"] = False
        return self.batch(
            topology.transfer_blocks(self, session, local_layout, remote_layout, local_ids, remote_ids, **options)
        )

    # -- notifications and peers -----------------------------------------------

    def notify(self, session: str, message) -> None:
        """Sends `message` (str or bytes) to `session`; returns once the peer
        has queued it."""
        msg = _message_bytes(message)
        self._run(self._lib.kvf_notify, _c_str(session, "session"), msg, len(msg))

    def recv_notification(self) -> Notification | None:
        """The oldest notification received, or None."""
        cap_from, cap_msg = 256, 4096
        while True:
            from_buf = ctypes.create_string_buffer(cap_from)
            msg_buf = ctypes.create_string_buffer(cap_msg)
            from_len, msg_len, got = ctypes.c_size_t(), ctypes.c_size_t(), ctypes.c_int32()
            status = self._call(
                self._lib.kvf_notify_recv,
                from_buf,
                cap_from,
                ctypes.byref(from_len),
                msg_buf,
                cap_msg,
                ctypes.byref(msg_len),
                ctypes.byref(got),
            )
            if status == Status.BUFFER_TOO_SMALL:
                cap_from = max(cap_from, from_len.value + 1)
                cap_msg = max(cap_msg, msg_len.value + 1)
                continue
            self._check(status)
            if not got.value:
                return None
            return Notification(
                from_buf.raw[: from_len.value].decode(errors="replace"),
                msg_buf.raw[: msg_len.value],
            )

    def notifications(self) -> list[Notification]:
        """Every notification received so far, oldest first."""
        out = []
        while (n := self.recv_notification()) is not None:
            out.append(n)
        return out

    def transport_to(self, session: str) -> str:
        """The transport that carries ops to `session`: "local", "cma" or
        "tcp" (handshakes on first contact)."""
        buf = ctypes.create_string_buffer(32)
        n = ctypes.c_size_t()
        self._run(self._lib.kvf_engine_transport_to, _c_str(session, "session"), buf, len(buf), ctypes.byref(n))
        return buf.value.decode()

    def peer_regions(self, session: str) -> list[tuple[int, int]]:
        """The `(address, length)` of every region `session` has registered
        now, host and device, sorted by address (asked of the peer on every
        call: one round trip; handshakes on first contact)."""
        name = _c_str(session, "session")
        capacity = 16
        while True:
            addrs, lens = (ctypes.c_uint64 * capacity)(), (ctypes.c_uint64 * capacity)()
            count = ctypes.c_size_t()
            status = self._call(self._lib.kvf_engine_peer_regions, name, addrs, lens, capacity, ctypes.byref(count))
            if status == Status.BUFFER_TOO_SMALL and count.value > capacity:
                capacity = count.value  # the peer registered more meanwhile: ask again
                continue
            self._check(status)
            return list(zip(addrs[: count.value], lens[: count.value]))


class Batch:
    """An asynchronous batch. `wait()` / `poll()` raise the batch's error;
    `free()` releases its id (done by `wait` when used as a context manager:
    `with engine.submit_read(...) as b: ...` waits and frees on exit)."""

    __slots__ = ("engine", "id", "num_ops", "_keep", "_freed")

    def __init__(self, engine: Engine, batch_id: int, num_ops: int | None, keep):
        self.engine = engine
        self.id = batch_id
        self.num_ops = num_ops
        self._keep = keep
        self._freed = False

    def poll(self) -> bool:
        """True when done, False while running; raises the batch's error."""
        status = self.engine._call(self.engine._lib.kvf_batch_poll, self.id)
        if status == Status.IN_PROGRESS:
            return False
        self.engine._check(status)
        return True

    def wait(self, timeout: float | None = None) -> None:
        """Waits until the batch ends (at most `timeout` seconds, a finite
        number >= 0; None: until the engine's transfer timeout ends it).
        Raises its error (`Status.TRANSFER_TIMEOUT` when that timeout ended
        it), or `Error(TIMEOUT)` if it is still running after `timeout`:
        only then, so waiting again on TIMEOUT ends."""
        ms = _ffi.timeout_ms(timeout, "timeout")
        self.engine._run(self.engine._lib.kvf_batch_wait, self.id, ms)

    def op_status(self, index: int) -> Status | int:
        """OK, IN_PROGRESS, or the batch's error for a failed op (`index`:
        an int from 0; past the batch's ops, `Error(INVALID_ARGUMENT)`)."""
        index = _ffi.u64(index, "index")
        out = ctypes.c_int32()
        self.engine._run(self.engine._lib.kvf_batch_op_status, self.id, index, ctypes.byref(out))
        return Status.of(out.value)

    def free(self) -> None:
        """Releases the id of a finished batch (idempotent)."""
        if self._freed:
            return
        self.engine._run(self.engine._lib.kvf_batch_free, self.id)
        self._freed = True
        self._keep = None

    def __enter__(self) -> "Batch":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.wait()
        except Error:
            if exc_type is None:
                self._free_quietly()
                raise
        self._free_quietly()

    def _free_quietly(self) -> None:
        try:
            self.free()
        except Error:
            pass

    def __repr__(self) -> str:
        return f"<kvferry.Batch {self.id:#x}>"
