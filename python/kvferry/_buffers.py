"""Turning what Python users hold (ints, numpy arrays, torch tensors,
bytearrays, ctypes objects, mmaps) into an address and a size."""

from __future__ import annotations

import ctypes
import numbers
from typing import Any, NamedTuple


class Span(NamedTuple):
    """Memory a caller named: its first byte, its size when the object says
    (None for a bare address), the location it lives in ("*" unless the
    object says), and the object to keep alive while the address is used."""

    addr: int
    nbytes: int | None
    location: str
    keep: Any


def _torch_location(tensor) -> str:
    device = getattr(tensor, "device", None)
    kind = getattr(device, "type", "cpu")
    index = getattr(device, "index", None)
    if kind == "cpu":
        return "cpu:0"
    # "npu:3" for torch_npu tensors; other kinds are refused by the engine
    # with a message naming the location.
    return f"{kind}:{index if index is not None else 0}"


def span(obj: Any, what: str) -> Span:
    """Address and size of `obj`.

    Accepted: an int (an absolute virtual address), a torch tensor
    (`data_ptr()`, `nbytes`; must be contiguous), anything with
    `__array_interface__` (numpy; C-contiguous), a ctypes object, or an
    object exporting a contiguous writable buffer (bytearray, memoryview,
    mmap, array.array). Read-only memory (`bytes`, read-only arrays) is
    refused: registered memory may be written by peers.
    """
    if isinstance(obj, bool):
        raise TypeError(f"{what}: expected an address or a buffer, got bool")
    if isinstance(obj, numbers.Integral):  # int, numpy integer scalars
        obj = int(obj)
        if not 0 <= obj < 1 << 64:
            raise ValueError(f"{what}: address {obj} is not an unsigned 64-bit value")
        return Span(obj, None, "*", None)
    data_ptr = getattr(obj, "data_ptr", None)
    if callable(data_ptr) and hasattr(obj, "element_size"):  # torch.Tensor
        if not obj.is_contiguous():
            raise ValueError(f"{what}: the tensor is not contiguous; pass tensor.contiguous()")
        nbytes = obj.element_size() * obj.numel()
        return Span(int(data_ptr()), nbytes, _torch_location(obj), obj)
    iface = getattr(obj, "__array_interface__", None)
    if isinstance(iface, dict):  # numpy and friends
        addr, readonly = iface["data"]
        if readonly:
            raise ValueError(f"{what}: the array is read-only")
        flags = getattr(obj, "flags", None)
        if flags is not None and not flags["C_CONTIGUOUS"]:
            raise ValueError(f"{what}: the array is not C-contiguous; pass numpy.ascontiguousarray(a)")
        nbytes = int(obj.nbytes)
        return Span(int(addr), nbytes, "cpu:0", obj)
    if isinstance(obj, (ctypes._SimpleCData, ctypes.Array, ctypes.Structure, ctypes.Union)):
        return Span(ctypes.addressof(obj), ctypes.sizeof(obj), "cpu:0", obj)
    if isinstance(obj, (bytes, str)):
        kind = "str" if isinstance(obj, str) else "bytes"
        raise TypeError(
            f"{what}: {kind} is not an address or writable memory "
            "(pass an int address, a bytearray, a numpy array or a tensor)"
        )
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(
            f"{what}: expected an int address, a tensor, a numpy array or a writable buffer, got {type(obj).__name__}"
        ) from None
    with view:
        if not view.contiguous:
            raise ValueError(f"{what}: the buffer is not contiguous")
        if view.readonly:
            raise ValueError(f"{what}: the buffer is read-only")
        nbytes = view.nbytes
    if nbytes == 0:
        return Span(0, 0, "cpu:0", obj)
    holder = (ctypes.c_char * nbytes).from_buffer(obj)
    return Span(ctypes.addressof(holder), nbytes, "cpu:0", holder)


def spans(objs, what: str) -> list[Span]:
    if isinstance(objs, (str, bytes)) or not hasattr(objs, "__len__"):
        raise TypeError(f"{what}: expected a list, got {type(objs).__name__}")
    return [span(o, f"{what}[{i}]") for i, o in enumerate(objs)]
