"""Giving memory back to the kernel once a burst of big requests is over.

glibc keeps the memory freed by big batches (NumPy temporaries, gRPC message buffers) in its heaps:
after a burst of large requests the process stays at its peak. `release_when_idle` arms one timer; when
no large batch has finished for IDLE_SECONDS, malloc_trim(0) returns the free pages of every arena.
Under steady large-batch load the timer keeps moving, so the heap is not handed back between batches
(which would make each batch fault its pages in again). Without glibc it does nothing.
"""

import asyncio
import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

IDLE_SECONDS = 1.0

try:
    _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    _malloc_trim.argtypes, _malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
except (OSError, AttributeError):  # not glibc
    _malloc_trim = None

_timer: asyncio.TimerHandle | None = None


def trim() -> None:
    if _malloc_trim is not None:
        _malloc_trim(0)


def release_when_idle(loop: asyncio.AbstractEventLoop) -> None:
    """(Re)arm the trim for IDLE_SECONDS from now; call on the loop after a large batch."""
    global _timer
    if _malloc_trim is None:
        return
    if _timer is not None:
        _timer.cancel()
    _timer = loop.call_later(IDLE_SECONDS, trim)
