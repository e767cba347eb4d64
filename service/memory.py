"""glibc's allocator, set for batches of NumPy temporaries, and memory given back to the kernel once a
burst of big requests is over.

By default glibc hands large freed blocks straight back to the kernel (mmap'd above a threshold it
moves with use, heap tops trimmed past 128 KiB), so a process can fall into a state where every batch
faults its MB-sized temporaries back in: a 256-row Score of the default digits model on the NumPy path
ran at a median 38.5k rows/s in 4 fresh servers (500-760k page faults per 3 s), and at 66.7k (17.6k
faults) with the thresholds set here (`configure_allocator`, called once per server process before it
starts a thread). With the score graph, where ONNX Runtime allocates, 84.9k against 89.6k: within the noise.

Instead the memory freed by big batches (NumPy temporaries, gRPC message buffers) stays in glibc's
heaps while requests keep coming, and is given back once the server is idle: a batch that ran in the
executor marks the heap as holding such memory (`large_batch_done`). Once no RPC is in flight
(`rpc_started` / `rpc_finished` count them), a timer is armed, and IDLE_SECONDS later, if the server is
still idle, malloc_trim(0) returns the free pages of every arena. Without glibc it does nothing.
Everything here runs on the event loop.

All threads allocate from one glibc arena (M_ARENA_MAX 1, set before the server starts a thread): with
an arena per thread, the executor threads' arenas kept their freed pages through malloc_trim, and the
default digits version sat at 1.44-2.52x its idle RSS 3 s after `vaeserve bench memory`'s burst (seven runs;
1.83x still after 10 s). With one arena: 1.03x in three runs, peaks alike (418-510 MiB). Throughput, fresh
servers, 3 interleaved rounds of 3 s: 256-row Score at 8 callers 70.8k against 76.3k rows/s (spreads
69.7-73.1k and 62.0-76.4k), single-row Score at 64 callers 1,921 against 1,683 req/s: within the box's noise.
"""

import asyncio
import ctypes
import ctypes.util

IDLE_SECONDS = 1.0

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # a batch's temporaries (a few MiB each) come from the heap, and are reused
TRIM_THRESHOLD = 2**30  # free() does not trim heap tops; the idle malloc_trim does
ARENA_MAX = 1  # glibc arenas for every thread of the process (above)

try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _malloc_trim, _mallopt = _libc.malloc_trim, _libc.mallopt
    _malloc_trim.argtypes, _malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    _mallopt.argtypes, _mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
except (OSError, AttributeError):  # not glibc
    _malloc_trim = _mallopt = None

_in_flight = 0  # RPCs inside a handler
_held = False  # a large batch ran since the last trim
_timer: asyncio.TimerHandle | None = None


def configure_allocator() -> None:
    """Keep glibc from returning each batch's freed temporaries to the kernel between batches: a fixed
    mmap threshold (so MB-sized NumPy arrays come from the heap and are reused) and a high trim
    threshold; the idle trim below still hands the memory back once a burst is over, from the one arena
    every thread shares. Call it before the process starts threads: arenas made before it stay."""
    if _mallopt is not None:
        _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        _mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        _mallopt(M_ARENA_MAX, ARENA_MAX)


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
