"""Status codes, the exception the Pythonic API raises, and the per-thread
last error that the Mooncake-compatible API leaves behind."""

from __future__ import annotations

import enum
import logging
import threading

logger = logging.getLogger("kvferry")


class Status(enum.IntEnum):
    """`kvf_status` of include/kvferry.h (checked against it by the tests).

    0 is success, positive is "not done yet", negative values are errors
    grouped by area in blocks of ten. `TIMEOUT` means a wait ran out while
    what it waited for goes on; a batch that the engine's transfer timeout
    ended failed with `TRANSFER_TIMEOUT`.
    """

    OK = 0
    IN_PROGRESS = 1
    INVALID_ARGUMENT = -1
    NULL_POINTER = -2
    INTERNAL = -3
    UNSUPPORTED = -4
    BUFFER_TOO_SMALL = -5
    ZERO_LENGTH_REGION = -10
    REGION_OVERLAP = -11
    NOT_REGISTERED = -12
    REGION_BUSY = -13
    BAD_LOCATION = -14
    REGION_NOT_MAPPED = -15
    ZERO_LENGTH_OP = -20
    ADDRESS_OVERFLOW = -21
    LOCAL_OUT_OF_RANGE = -22
    REMOTE_OUT_OF_RANGE = -23
    BAD_BATCH_ID = -30
    BATCH_IN_PROGRESS = -31
    TOO_MANY_BATCHES = -32
    TIMEOUT = -33
    BAD_SESSION = -40
    PEER_UNREACHABLE = -41
    TRANSFER_FAILED = -42
    IO = -43
    PEER_RESTARTED = -44
    PROTOCOL = -45
    AUTH_FAILED = -46
    TRANSFER_TIMEOUT = -47
    DEVICE = -50

    @classmethod
    def of(cls, code: int) -> "Status | int":
        """The member for `code`, or `code` itself when this version does not
        know it (a newer library may add codes)."""
        try:
            return cls(code)
        except ValueError:
            return code


class Error(Exception):
    """A kvferry call failed.

    `status` is a `Status` (or a plain int for a code this package does not
    know), `message` says what failed and why, with the address, peer or id
    involved (the library's own words when the failure came from it).
    """

    def __init__(self, status: int, message: str):
        self.status = Status.of(int(status))
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        name = self.status.name if isinstance(self.status, Status) else str(self.status)
        return f"{self.message} [{name}]"

    def __repr__(self) -> str:
        return f"kvferry.Error({self.status!r}, {self.message!r})"


_local = threading.local()


def last_error() -> str:
    """What the last failing kvferry call on this thread said ("" if none).

    The Mooncake-compatible `TransferEngine` returns 0 / -1 like Mooncake;
    this is where its reason goes (and to the `kvferry` logger). Per thread,
    like `errno`: read it on the thread that made the call.
    """
    return getattr(_local, "message", "")


def last_status() -> "Status | int":
    """The status of the last failing kvferry call on this thread, as a
    `Status` (`Status.OK` if none; a plain int for a code this package does
    not know)."""
    return Status.of(getattr(_local, "status", 0))


def record(status: int, message: str) -> None:
    _local.status = int(status)
    _local.message = message


def clear() -> None:
    _local.status = 0
    _local.message = ""
