"""kvferry: KV-cache transfer engine for disaggregated LLM serving.

Two APIs over the same library (libkvferry.so, loaded with ctypes):

- `kvferry.TransferEngine`: a drop-in for `mooncake.engine.TransferEngine`,
  with Mooncake's argument order and return codes (0 / -1, batch id 0 on
  failure). Why a call failed: `kvferry.last_error()` and the `kvferry` logger.
- `kvferry.Engine`: the Pythonic API. Raises `kvferry.Error`, accepts numpy
  arrays and torch tensors where an address goes, works as a context manager.

See docs/python.md.
"""

from ._errors import Error, Status, last_error, last_status
from ._version import __version__
from .compat import TransferEngine, TransferNotify, TransferOpcode
from .engine import READ, WRITE, Batch, Engine, Notification, Region
from .mooncake_config import MooncakeConfig, parse_size

__all__ = [
    "READ",
    "WRITE",
    "Batch",
    "Engine",
    "Error",
    "MooncakeConfig",
    "Notification",
    "Region",
    "Status",
    "TransferEngine",
    "TransferNotify",
    "TransferOpcode",
    "__version__",
    "install_mooncake_alias",
    "last_error",
    "last_status",
    "library_path",
    "library_version",
    "parse_size",
]


def library_version() -> str:
    """The version of the loaded libkvferry.so."""
    from . import _ffi

    return _ffi.load().kvf_version().decode()


def library_path() -> str:
    """The file libkvferry.so was loaded from."""
    from . import _ffi

    return _ffi.library_path()


def install_mooncake_alias() -> None:
    """Makes `import mooncake.engine` give kvferry's engine in this process
    (what `KVFERRY_AS_MOONCAKE=1` does at start-up). Call it before the code
    that imports mooncake."""
    from . import mooncake_alias

    mooncake_alias.install()
