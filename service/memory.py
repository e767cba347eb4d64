"""Giving memory back to the kernel once a burst of big requests is over.

glibc keeps the memory freed by big batches (NumPy temporaries, gRPC message buffers) in its heaps:
after a burst of large requests the process would stay near its peak. A batch that ran in the executor
marks the heap as holding such memory (`large_batch_done`). Once no RPC is in flight (`rpc_started` /
`rpc_finished` count them), a timer is armed, and IDLE_SECONDS later, if the server is still idle,
malloc_trim(0) returns the free pages of every arena. While requests keep coming the heap is not handed
back between batches (which would make each batch fault its pages in again). Without glibc it does
nothing. Everything here runs on the event loop.
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

_in_flight = 0  # RPCs inside a handler
_held = False  # a large batch ran since the last trim
_timer: asyncio.TimerHandle | None = None


def trim() -> None:
    if _malloc_trim is not None:
        _malloc_trim(0)


def in_flight() -> int:
    """RPCs inside a handler now."""
    return _in_flight


def rpc_started() -> None:
    global _in_flight
    _in_flight += 1


def rpc_finished(loop: asyncio.AbstractEventLoop) -> None:
    global _in_flight
    _in_flight -= 1
    if _in_flight == 0:
        _arm(loop)


def large_batch_done(loop: asyncio.AbstractEventLoop) -> None:
    """A batch ran in the executor; its callers may all have gone already (deadline, cancellation)."""
    global _held
    _held = _malloc_trim is not None
    if _in_flight == 0:
        _arm(loop)


def _arm(loop: asyncio.AbstractEventLoop) -> None:
    global _timer
    if not _held:
        return
    if _timer is not None:
        _timer.cancel()
    _timer = loop.call_later(IDLE_SECONDS, _trim_if_idle)


def _trim_if_idle() -> None:
    global _held
    if _in_flight:  # busy again: rpc_finished arms the next try
        return
    _held = False
    trim()
