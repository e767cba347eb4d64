"""Giving memory back to the kernel once a burst of big requests is over.

glibc keeps the memory freed by big batches (NumPy temporaries, gRPC message buffers) in its heaps:
after a burst of large requests the process would stay near its peak. A batch that ran in the executor
marks the heap as holding such memory (`large_batch_done`); when the last RPC in flight has finished
(`rpcs_idle`), a timer is armed, and IDLE_SECONDS later malloc_trim(0) returns the free pages of every
arena. While large requests keep coming the server is never idle, so the heap is not handed back
between batches (which would make each batch fault its pages in again). Without glibc it does nothing.
"""

import asyncio
import ctypes
import ctypes.util

IDLE_SECONDS = 1.0

try:
    _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    _malloc_trim.argtypes, _malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
except (OSError, AttributeError):  # not glibc
    _malloc_trim = None

_held = False  # a large batch ran since the last trim was armed
_timer: asyncio.TimerHandle | None = None


def trim() -> None:
    if _malloc_trim is not None:
        _malloc_trim(0)


def large_batch_done() -> None:
    global _held
    _held = _malloc_trim is not None


def rpcs_idle(loop: asyncio.AbstractEventLoop) -> None:
    """No RPC is in flight: trim IDLE_SECONDS from now if a large batch ran since the last time."""
    global _held, _timer
    if not _held:
        return
    _held = False
    if _timer is not None:
        _timer.cancel()
    _timer = loop.call_later(IDLE_SECONDS, trim)
