"""Large blocks straight from the kernel and back: the listener's resident memory follows its live bytes.

glibc's malloc serves a block of 128 KiB or more with its own ``mmap`` and gives it back to the kernel
when freed, but each such free raises that threshold to the freed block's size (up to 32 MiB): once a
batch's frames of large rows (16 MiB and more) were freed, every block under that size comes from the
heap, where a freed block in the middle cannot go back to the kernel, and the resident set keeps the
high-water mark of the holes. Measured on a backfill of 576 KB rows with the default config (peak RSS,
several runs each): 163-320 MB with the moving threshold; 153-215 MB with it fixed at 4 MiB; 125-172 MB
with it fixed at 128 KiB, which however made small-row backfills use ~10% more CPU (every batch's frames
and socket buffers of ~1 MiB mmap'd and unmapped), so 4 MiB: what small rows allocate stays in the heap,
what large rows' batches allocate goes back. ``mallopt(M_MMAP_THRESHOLD, ...)`` also stops the moving
trim threshold. ``MALLOC_MMAP_THRESHOLD_`` in the environment does the same from outside and is left to
glibc when set. Elsewhere than glibc (musl, macOS) nothing is done.

Fixing the mmap threshold also fixes the trim threshold (the free bytes at the top of the heap above which
``free`` gives them back) at glibc's initial 128 KiB, where glibc's moving rule would have raised it to twice
the mmap threshold: every batch freed shrank the heap and the next one grew it again, page by page (on the
wide bench workload, 4 KB rows, ~20k page faults of the listener's ~0.6 CPU s once streaming, ~10% of its
samples in the kernel's fault path). So the trim threshold was set to twice the mmap threshold, as glibc's rule
would: at most 8 MiB of freed heap stayed resident for the next batches.

That was not enough once the NATS publisher stopped holding every batch's frames until its acks (it writes them
again from the batch if the connection breaks): a batch's frames (up to ~4 MiB) are freed as soon as they are
written, at the top of the heap, which then crosses 8 MiB and is trimmed, to be faulted in again for the next
batch. With 3.5 KB events (Debezium with schemas) that was 0.24-0.36 page faults per event, and faults are
costly in a VM: the listener's system time per event went from 1.1 to 2.3-2.5 µs. So the trim threshold is
64 MiB (maxInFlightBytes' default) and each growth of the heap asks for 16 MiB more than it needs (M_TOP_PAD,
which is also what a trim leaves): 0.05 page faults per event, system time 0.95 µs. At most 64 + 16 MiB of freed
heap stays resident after a burst. ``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_TOP_PAD_`` in the environment are
left to glibc.
"""

from __future__ import annotations

import ctypes
import os

#: glibc's mallopt parameter number of M_MMAP_THRESHOLD (malloc.h)
M_MMAP_THRESHOLD = -3
#: blocks of this many bytes or more are mmap'd and unmapped on free, whatever was freed before
MMAP_THRESHOLD = 4 * 1024 * 1024
#: glibc's mallopt parameter number of M_TRIM_THRESHOLD (malloc.h)
M_TRIM_THRESHOLD = -1
#: free bytes at the top of the heap that stay there for reuse (see the module's docstring)
TRIM_THRESHOLD = 64 * 1024 * 1024
#: glibc's mallopt parameter number of M_TOP_PAD (malloc.h)
M_TOP_PAD = -2
#: what the heap grows by beyond a request, and keeps when trimmed
TOP_PAD = 16 * 1024 * 1024


def fix_mmap_threshold() -> bool:
    """Keep large blocks out of the heap (see the module's docstring); True when glibc took the setting.
    An explicit ``MALLOC_MMAP_THRESHOLD_`` in the environment is left to glibc."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols, libc's among them (find_library runs ldconfig)
        mallopt = libc.mallopt
        version = libc.gnu_get_libc_version  # glibc only: musl's mallopt does nothing
    except (OSError, AttributeError):
        return False
    del version
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    fixed = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    if fixed and "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    if fixed and "MALLOC_TOP_PAD_" not in os.environ:
        mallopt(M_TOP_PAD, TOP_PAD)
    return fixed
