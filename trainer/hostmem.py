"""The host allocator setting sftgo-train applies to itself (Linux with glibc).

Input: nothing but the process environment (a `MALLOC_MMAP_THRESHOLD_` the user set wins: glibc has
already applied it at start-up, and it is left alone).
Output: `apply()` fixes glibc malloc's mmap threshold at `THRESHOLD` bytes with mallopt and returns
what it did, as a small dict for summary.json: {"mmap_threshold_bytes": N or None, "set_by": ...}.
Why: glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MB).
After the first training step, blocks of 1-32 MB (activations, FSDP's all-gathered layers, the
loss chunks) come from the heap instead, and the heap keeps what is freed: the resident set grows
above what the live tensors hold, step after step.  A fixed threshold turns the dynamic raise
off: blocks above it are mmapped and go back to the kernel when freed.  It lowers the peak resident
set most where freed blocks sit below live ones: FSDP2's gathered layers, and gradient checkpointing,
whose saved layer outputs outlive the temporaries between them (the heap cannot shrink past a live
block).  Without checkpointing every activation is live anyway, and the fixed threshold changes
neither the peak nor the speed (figures: bench/analysis.md, "Figures moved out of code comments").
So it is applied wherever training runs on a CPU; on a GPU the host allocator holds little.
Cost: one mmap/munmap and fresh zeroed pages per block above the threshold.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

THRESHOLD = 1 << 20  # 1 MiB
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
ENV = "MALLOC_MMAP_THRESHOLD_"


def apply(wanted: bool) -> dict:
    """Fix glibc's mmap threshold at THRESHOLD for this process when `wanted` (training on a CPU),
    idempotent; say what was done."""
    if not wanted:
        return {"mmap_threshold_bytes": None, "set_by": "nobody: applied only when training on a CPU"}
    if ENV in os.environ:
        value = os.environ[ENV].strip()
        return {
            "mmap_threshold_bytes": int(value) if value.isdigit() else value,
            "set_by": f"the {ENV} environment variable",
        }
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 -- present in glibc only (not musl, not macOS)
    except (OSError, AttributeError):
        return {
            "mmap_threshold_bytes": None,
            "set_by": "nobody: the C library is not glibc, its allocator is left as is",
        }
    if libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD) != 1:
        return {"mmap_threshold_bytes": None, "set_by": "nobody: glibc refused mallopt(M_MMAP_THRESHOLD)"}
    return {"mmap_threshold_bytes": THRESHOLD, "set_by": "sftgo-train (mallopt)"}
