"""Process-wide settings the command line applies before torch loads, and only the command line:
importing the package never changes a user's own program (its environment, threads or signals).

How OpenMP threads wait for each other decides much of a CPU step's speed.  Waiting passively
(``OMP_WAIT_POLICY=PASSIVE``, our default until December 2026) puts a thread to sleep at every one
of the thousands of parallel regions in a step and costs 20-30 % on an idle machine; spinning
without end (``ACTIVE``) is as fast when idle but makes a waiting thread burn the core that a
thread it waits for needs as soon as another process holds a core.  A bounded spin is both: a
waiting thread spins for ``GOMP_SPINCOUNT`` iterations (GNU OpenMP, which the Linux wheels of torch
use; 300,000 spins last about 8 ms here) and then sleeps.  Measured on 2 cores, preset ``32`` batch 2
in bf16, interleaved: 1.32-1.54 steps/s with the bounded spin, 1.25-1.46 spinning without end,
0.99-1.18 passive (``docs/performance.md``).  When a neighbour holds a core, the training loop
also drops to fewer threads (``train/threads.py``).

Both must be set before torch loads its OpenMP runtime; a setting of the user's wins.

Memory: glibc's malloc serves a block from its heap unless it is larger than a threshold that grows
up to 32 MiB as large blocks are freed; freed heap blocks of a few tens of MiB cannot all be reused
for the next step's differently sized tensors, and the heap grows.  A 128³ bf16 training step
(preset ``128``, batch 1, every level checkpointed) peaked at 6.0 GiB of RSS for 4.0 GiB of
tensors; with blocks of 16 MiB and more always mapped afresh (``mallopt(M_MMAP_THRESHOLD)``) it
peaked at 4.2-4.3 GiB at the same speed.  A 4 MiB threshold also fits but maps so many blocks that
the step is 20-35 % slower.  Below 128³ few tensors reach 16 MiB, so nothing changes there.

Setting that threshold also fixes glibc's trim threshold at its initial 128 KiB: whenever more than
that is free at the top of the heap, free() hands it back to the system, and the next step takes it
again page by page, each page zeroed by the kernel.  A step frees most of its activations at its
end, so ``verydeepvae train --preset 32`` (batch 2) faulted 57,000-88,000 pages per step, 0.1-0.15 s
of system time.  Keeping up to 1 GiB free at the top (``mallopt(M_TRIM_THRESHOLD)``) brings that to
a few hundred and the step 3-10 % faster at the same peak RSS (``docs/performance.md``).  The cost:
up to 1 GiB of freed memory stays with the process until it ends, not with the system.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 16 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024
SPIN_COUNT = "300000"  # GNU OpenMP's own default when nothing is set, pinned here so it is explicit


def apply_cli_defaults() -> None:
    """A bounded OpenMP spin unless the user chose a waiting policy or spin count (the CLI's and the
    benchmarks' default)."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        set_mmap_threshold(MMAP_THRESHOLD_BYTES)
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        set_trim_threshold(TRIM_THRESHOLD_BYTES)


def set_mmap_threshold(size: int) -> bool:
    """Blocks of ``size`` bytes and more come from fresh mappings, returned to the system when freed
    (glibc only; elsewhere nothing happens and False is returned)."""
    return _mallopt(M_MMAP_THRESHOLD, size)


def set_trim_threshold(size: int) -> bool:
    """Up to ``size`` bytes free at the top of the heap stay with the process instead of being
    returned to the system and faulted in again (glibc only; elsewhere False)."""
    return _mallopt(M_TRIM_THRESHOLD, size)


def _mallopt(parameter: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols, libc's among them (find_library would run ldconfig)
        return bool(libc.gnu_get_libc_version and libc.mallopt(parameter, value))
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows)
        return False
