"""Keep the client's receive buffers in its heap instead of faulting them in.

Twisted reads a socket with ``recv(bufferSize)``: a new bytes object per
read (1 MiB on the client, see L{p2p.transports.read_in_large_chunks}),
freed a moment later by the hashing and writing threads.  glibc's
defaults hand such memory back to the system (``munmap``, or trimming the
top of the heap past 2 MiB) and take it again for the next read, so the
kernel zero-fills fresh pages under ``recv``: ``perf`` counted 100,000 to
150,000 page faults per GiB received, and the client ran at 0.87 of the
sendfile/sha256 baseline.  Asking glibc to keep freed memory makes the
next read reuse it: about 10,000 faults per GiB and 1.0 of the baseline
(measured in an earlier round, against a SHA-256 baseline since replaced;
docs/performance.rst has the current 8.2 tables).  Peak memory does not
change: the
pages kept are the ones the transfer touched anyway.

glibc only (``mallopt``); anywhere else this does nothing.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Allocations below this come from the heap, so they are reused (receive
# buffers are 1 MiB; whatever is bigger is rare enough to map).
MMAP_THRESHOLD_BYTES = 16 * 1024 * 1024
# Free memory the heap keeps at its top: more than the client holds in
# flight (the sink's 8 MiB high water plus a few reads).
TRIM_THRESHOLD_BYTES = 64 * 1024 * 1024


def keep_freed_memory() -> bool:
    """
    Ask glibc to keep freed memory for reuse (see the module docstring).

    Process-wide: the ``p2p`` command calls it once at start-up.

    :return: whether the allocator took the settings.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # not glibc (or no C library to ask)
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error (musl's stub always 0).
    return bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
