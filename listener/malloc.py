"""Large blocks straight from the kernel and back: the listener's resident memory follows its live bytes.

glibc's malloc serves a block of 128 KiB or more with its own ``mmap`` and gives it back to the kernel
when freed, but the first such free raises that threshold to the freed block's size (up to 32 MiB): from
then on the large values of large rows (a 576 KB document, a batch's frames) come from the heap, where a
freed block in the middle cannot go back to the kernel. Measured on a backfill of 576 KB rows with the
default config: peak RSS 163-275 MB with the moving threshold, 122-131 MB with it fixed (docs/operator.md).
Fixing it (``mallopt(M_MMAP_THRESHOLD, 128 KiB)``, which also turns off the moving trim threshold) is what
``MALLOC_MMAP_THRESHOLD_=131072`` in the environment does; this does it from the process itself, so a
listener on a laptop behaves as in the image. Elsewhere than glibc (musl, macOS) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

#: glibc's mallopt parameter number of M_MMAP_THRESHOLD (malloc.h)
M_MMAP_THRESHOLD = -3
#: blocks of this many bytes or more are mmap'd and unmapped on free (glibc's own default, kept fixed)
MMAP_THRESHOLD = 128 * 1024


def fix_mmap_threshold() -> bool:
    """Keep large blocks out of the heap (see the module's docstring); True when glibc took the setting.
    An explicit ``MALLOC_MMAP_THRESHOLD_`` in the environment is left to glibc."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        version = libc.gnu_get_libc_version  # glibc only: musl's mallopt does nothing
    except (OSError, AttributeError):
        return False
    del version
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
