"""Managed buffers: memory that kvferry maps and registers itself, handed out
by `allocate_managed_buffer` (Mooncake's API) / `Engine.allocate`.

Memory comes from anonymous mmap arenas (64 MiB each by default,
`KVFERRY_MANAGED_ARENA_BYTES` to change), each registered with the engine
once when it is mapped. Blocks are carved first-fit, 64-byte aligned (4 KiB
aligned from 4 KiB up), and coalesced on free. A request larger than half
an arena gets an arena of its own, unregistered and unmapped when freed.
The other arenas live until the engine closes: the engine is freed first
(so no peer can still be reading them), then they are unmapped.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import threading
from dataclasses import dataclass, field

from ._errors import Error, Status
from ._ffi import integer as _int

DEFAULT_ARENA_BYTES = 64 << 20
SMALL_ALIGN = 64
PAGE = mmap.PAGESIZE


def _align_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


@dataclass
class _Arena:
    mapping: mmap.mmap
    view: ctypes.Array
    addr: int
    size: int
    dedicated: bool
    # Free blocks as parallel sorted lists of start addresses and sizes.
    starts: list = field(default_factory=list)
    sizes: list = field(default_factory=list)

    def take(self, length: int, align: int) -> int | None:
        for i, (s, n) in enumerate(zip(self.starts, self.sizes)):
            a = _align_up(s, align)
            if a + length > s + n:
                continue
            del self.starts[i], self.sizes[i]
            tail = s + n - (a + length)
            if tail:
                self.starts.insert(i, a + length)
                self.sizes.insert(i, tail)
            if a > s:
                self.starts.insert(i, s)
                self.sizes.insert(i, a - s)
            return a
        return None

    def give_back(self, start: int, length: int) -> None:
        i = bisect.bisect_left(self.starts, start)
        # Merge with the following block, then with the preceding one.
        if i < len(self.starts) and start + length == self.starts[i]:
            length += self.sizes[i]
            del self.starts[i], self.sizes[i]
        if i > 0 and self.starts[i - 1] + self.sizes[i - 1] == start:
            self.sizes[i - 1] += length
        else:
            self.starts.insert(i, start)
            self.sizes.insert(i, length)

    def empty(self) -> bool:
        return self.sizes == [self.size]

    def unmap(self) -> None:
        del self.view
        self.mapping.close()


#: What `ManagedAllocator.access` gives for a range outside every block.
OUTSIDE = object()


class ManagedAllocator:
    """Thread-safe. `register(addr, len)` / `unregister(addr)` are the
    engine's (raising `Error`)."""

    def __init__(self, register, unregister, arena_bytes: int | None = None):
        self._register = register
        self._unregister = unregister
        if arena_bytes is None:
            env = os.environ.get("KVFERRY_MANAGED_ARENA_BYTES", "").strip()
            try:
                arena_bytes = int(env) if env else DEFAULT_ARENA_BYTES
            except ValueError:
                raise Error(
                    Status.INVALID_ARGUMENT,
                    f"KVFERRY_MANAGED_ARENA_BYTES={env!r} is not a number of bytes",
                ) from None
        self._arena_bytes = max(PAGE, _align_up(arena_bytes, PAGE))
        self._arenas: list[_Arena] = []
        self._blocks: dict[int, tuple[_Arena, int, int]] = {}  # addr -> (arena, size, asked)
        self._lock = threading.Lock()

    def _map(self, size: int, dedicated: bool) -> _Arena:
        try:
            m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (OSError, ValueError, OverflowError) as e:
            raise Error(Status.INTERNAL, f"cannot map {size} bytes for managed buffers: {e}") from None
        view = (ctypes.c_char * size).from_buffer(m)
        addr = ctypes.addressof(view)
        arena = _Arena(m, view, addr, size, dedicated, [addr], [size])
        try:
            self._register(addr, size)
        except BaseException:
            arena.unmap()
            raise
        self._arenas.append(arena)
        return arena

    def allocate(self, length: int) -> int:
        length = _int(length, "length")
        if length <= 0:
            raise Error(Status.INVALID_ARGUMENT, f"cannot allocate a managed buffer of {length} bytes")
        align = PAGE if length >= PAGE else SMALL_ALIGN
        size = _align_up(length, SMALL_ALIGN)
        with self._lock:
            if size > self._arena_bytes // 2:
                arena = self._map(_align_up(size, PAGE), dedicated=True)
                addr = arena.take(size, align)
            else:
                addr = None
                for arena in self._arenas:
                    if not arena.dedicated:
                        addr = arena.take(size, align)
                        if addr is not None:
                            break
                if addr is None:
                    arena = self._map(self._arena_bytes, dedicated=False)
                    addr = arena.take(size, align)
            assert addr is not None
            self._blocks[addr] = (arena, size, length)
            return addr

    def free(self, addr: int, length: int) -> None:
        addr = _int(addr, "buffer address")
        length = _int(length, "length")
        with self._lock:
            block = self._blocks.get(addr)
            if block is None:
                raise Error(
                    Status.NOT_REGISTERED,
                    f"{addr:#x} is not a managed buffer of this engine (never allocated, or freed already)",
                )
            arena, size, asked = block
            if length != asked:
                raise Error(
                    Status.INVALID_ARGUMENT,
                    f"managed buffer {addr:#x} was allocated with {asked} bytes, freed with {length}",
                )
            del self._blocks[addr]
            if not arena.dedicated:
                arena.give_back(addr, size)
                return
            self._arenas.remove(arena)
        # Unregistering waits for in-flight transfers (up to the transfer
        # timeout): not under the lock, so other threads keep allocating. If
        # they do not end, it fails and the buffer stays allocated.
        try:
            self._unregister(arena.addr)
        except BaseException:
            with self._lock:
                self._arenas.append(arena)
                self._blocks[addr] = block
            raise
        arena.unmap()

    def access(self, addr: int, length: int, io):
        """`io()`'s result if `[addr, addr+length)` lies inside one allocated
        block, else `OUTSIDE`. The block cannot be freed while `io` runs
        (`free` takes the same lock before it unmaps anything): without
        that, a copy racing a free of a dedicated arena reads or writes
        unmapped memory and the process dies."""
        with self._lock:
            found = self._find_block(addr)
            if found is None or addr + length > found[0] + found[1][1]:
                return OUTSIDE
            return io()

    def _find_block(self, addr: int):
        # Few blocks in practice; a linear scan keeps no second index in sync.
        for start, block in self._blocks.items():
            if start <= addr < start + block[1]:
                return start, block
        return None

    def allocated(self) -> int:
        with self._lock:
            return len(self._blocks)

    def release_all(self) -> None:
        """Unmaps every arena. Only after the engine that registered them is
        freed (it waited for transfers using them)."""
        with self._lock:
            for arena in self._arenas:
                arena.unmap()
            self._arenas.clear()
            self._blocks.clear()
