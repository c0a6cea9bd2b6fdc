"""Peak memory of a benchmark's process: the host's resident set, and on a GPU torch's and
CuPy's device allocations.

The peak resident set (``getrusage``'s ``ru_maxrss``) is the process's whole life: the
largest it has been, whatever ran. A benchmark that runs several configurations in one
process reports their joint peak; run them one per process (``bench step --configs sgd``,
then ``--configs kfac_1_10``) to tell what one of them adds.
"""
from __future__ import annotations

import resource
import sys

import torch


def peak_host_bytes() -> int:
    """The largest resident set this process has had, in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_device_bytes(device: torch.device) -> int | None:
    """On a CUDA ``device``: the most bytes torch's allocator has held for tensors there
    (``torch.cuda.max_memory_allocated``) plus what CuPy's default pool holds now (the K-FAC
    buffers and work arrays on a GPU; CuPy keeps freed blocks in its pool, so this is close to
    its peak); None on the CPU."""
    if device.type != "cuda":
        return None
    total = torch.cuda.max_memory_allocated(device)
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        with cupy.cuda.Device(device.index if device.index is not None else torch.cuda.current_device()):
            total += cupy.get_default_memory_pool().total_bytes()
    return int(total)
