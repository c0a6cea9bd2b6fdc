"""Compile-once loader of the CUDA sources in ``kernels/`` (package ``hpckfac.kernels``).

Each source file is compiled by CuPy's NVRTC backend (``cupy.RawModule``) with
every kernel instantiation it provides (``name_expressions``), once per
process for each (file, options, device architecture); CuPy keeps the loaded
module per device and caches the binary on disk across processes.

The instantiations a file provides are listed here and nowhere else:
``tests/test_kernels_compile.py`` compiles the same sources with ``nvcc`` for
exactly ``name_expressions(file, arch)`` and ``BASE_OPTIONS``.

NVRTC needs ``cuda_fp16.h``, ``cuda_bf16.h`` and ``mma.h``: they come from the
CUDA toolkit's include directory, which CuPy locates (``CUDA_PATH``) and which
is added to the options here, or from the pip package
``nvidia-cuda-runtime-cu12`` (``pip install cupy-cuda12x[ctk]``).

Importing this module does not import CuPy.
"""
from __future__ import annotations

import itertools
import os
import sys
import threading
from functools import lru_cache
from importlib import resources

import numpy as np

import hpckfac.kernels as kernel_sources

# Options shared by NVRTC (here) and nvcc (the compile test); include paths are
# added per machine by ``options()``.
BASE_OPTIONS: tuple[str, ...] = ("-std=c++17",)

# C++ element type of each supported array dtype (by name, so that ml_dtypes'
# bfloat16 and CuPy's compare alike).
CTYPES: dict[str, str] = {
    "float64": "double",
    "float32": "float",
    "float16": "__half",
    "bfloat16": "__nv_bfloat16",
}

# Minimum compute capability (major*10 + minor) of the tensor-core path per input dtype.
WMMA_MIN_ARCH: dict[str, int] = {"float16": 70, "bfloat16": 80}

_lock = threading.Lock()
_modules: dict[tuple[str, tuple[str, ...], int], object] = {}


def dtype_name(dtype) -> str:
    """Name of a dtype, dtype-like or dtype name (``"bfloat16"`` without importing ml_dtypes)."""
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


def ctype(dtype) -> str:
    """C++ type of ``dtype``; TypeError for a dtype the kernels do not handle."""
    name = dtype_name(dtype)
    if name not in CTYPES:
        raise TypeError(f"dtype {name} is not supported by the CUDA kernels, expected one of {tuple(CTYPES)}")
    return CTYPES[name]


def pack_name(kind: str, src_dtype, dst_dtype) -> str:
    """Name expression of ``pack_sym`` / ``unpack_sym`` from ``src_dtype`` to ``dst_dtype``."""
    return f"{kind}<{ctype(src_dtype)}, {ctype(dst_dtype)}>"


def syrk_name(dtype, arch: int) -> str:
    """Name expression of the factor-accumulation kernel for input ``dtype`` on ``arch``."""
    name = dtype_name(dtype)
    path = "syrk_wmma" if arch >= WMMA_MIN_ARCH.get(name, sys.maxsize) else "syrk_fma"
    return f"{path}<{ctype(dtype)}>"


def chol_name(dtype) -> str:
    """Name expression of the small-matrix Cholesky inversion for working ``dtype``."""
    return f"chol_inverse<{ctype(dtype)}>"


def name_expressions(file: str, arch: int) -> tuple[str, ...]:
    """Every kernel instantiation compiled from ``file`` for compute capability ``arch``."""
    if file == "pack.cu":
        pairs = list(itertools.product(CTYPES, repeat=2))
        return tuple(pack_name(kind, s, d) for kind in ("pack_sym", "unpack_sym") for s, d in pairs)
    if file == "syrk.cu":
        names = {syrk_name(dt, arch) for dt in ("float32", "float16", "bfloat16")}
        names |= {f"syrk_fma<{ctype(dt)}>" for dt in ("float32", "float16", "bfloat16")}
        return tuple(sorted(names)) + ("syrk_finish",)
    if file == "chol.cu":
        return (chol_name("float32"), chol_name("float64"))
    raise ValueError(f"file: unknown kernel source {file!r}, expected one of {kernel_sources.names()}")


def include_dirs() -> list[str]:
    """``-I`` directories: the kernel sources (for ``common.cuh``) and the CUDA headers NVRTC needs."""
    dirs = [str(resources.files(kernel_sources))]
    # pip's headers first: they match the NVRTC that CuPy loads (CUDA 12), while
    # CUDA_PATH may name a newer toolkit.
    candidates: list[str | None] = []
    try:
        import nvidia.cuda_runtime  # nvidia-cuda-runtime-cu12, from cupy-cuda12x[ctk]

        candidates.extend(nvidia.cuda_runtime.__path__)
    except ImportError:
        pass
    candidates.append(os.environ.get("CUDA_PATH"))
    try:
        import cupy

        candidates.append(cupy.cuda.get_cuda_path())
    except ImportError:
        pass
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "include", "cuda_fp16.h")):
            dirs.append(os.path.join(root, "include"))
    return list(dict.fromkeys(dirs))


@lru_cache(maxsize=1)
def options() -> tuple[str, ...]:
    """NVRTC options used for every kernel source on this machine (looked up once)."""
    return BASE_OPTIONS + tuple(f"-I{d}" for d in include_dirs())


def device_arch() -> int:
    """Compute capability of the current CUDA device as major*10 + minor (e.g. 90)."""
    import cupy

    return int(cupy.cuda.Device().compute_capability)


def module(file: str):
    """The compiled ``cupy.RawModule`` of kernel source ``file`` for the current device."""
    import cupy

    opts, arch = options(), device_arch()
    key = (file, opts, arch)
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            mod = cupy.RawModule(code=kernel_sources.source(file), options=opts,
                                 name_expressions=name_expressions(file, arch))
            _modules[key] = mod
    return mod


def function(file: str, name_expression: str):
    """Kernel ``name_expression`` (one of ``name_expressions(file, arch)``) of ``file``."""
    return module(file).get_function(name_expression)
