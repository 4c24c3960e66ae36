"""Large CPU tensors on 2 MiB pages (Linux transparent huge pages).

Why: the KV pool is read in scattered 4-12 KiB blocks. With 4 KiB pages nearly every block touched in a
decode step is a TLB miss and a page walk, and the paged-decode kernel read the cache at ~10 GB/s; on
2 MiB pages the same kernel reads it at ~30 GB/s, about what this machine's memory gives (two threads,
measured in docs/benchmarks.md). Most kernels ship THP in "madvise" mode, so a region must ask for it:
we allocate 2 MiB more than needed, take the 2 MiB-aligned part, and madvise(MADV_HUGEPAGE) it before
any page is touched. Anywhere this cannot work (not Linux, not CPU, THP off) it is a plain allocation.
"""
from __future__ import annotations

import ctypes
import logging
import sys

import torch

log = logging.getLogger("kvserve")

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14


def _madvise_huge(addr: int, length: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """``torch.empty(shape)``, on huge pages where the platform has them (CPU, Linux, >= 2 MiB)."""
    device = torch.device(device)
    numel = 1
    for s in shape:
        numel *= s
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = numel * itemsize
    if device.type != "cpu" or not sys.platform.startswith("linux") or nbytes < HUGE_PAGE:
        return torch.empty(shape, dtype=dtype, device=device)
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)  # untouched: no page is backed yet
    skip = -raw.data_ptr() % HUGE_PAGE
    if not _madvise_huge(raw.data_ptr() + skip, nbytes - nbytes % HUGE_PAGE):
        log.debug("madvise(MADV_HUGEPAGE) refused; KV cache on normal pages")
    return raw[skip : skip + nbytes].view(dtype).view(shape)
