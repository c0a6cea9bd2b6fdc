"""Compile-once loader of the CUDA sources in ``kernels/``.

Each source file is compiled by CuPy's NVRTC backend (``cupy.RawModule``) with
every kernel instantiation it provides (``name_expressions``), once per
process for each (file, options, device architecture, instantiations); CuPy
keeps the loaded module per device and caches the binary on disk across
processes, keyed by the code it is given: ``module_code`` appends a digest of
the ``.cuh`` headers, which CuPy's key would otherwise miss.

The instantiations a file provides are listed here and nowhere else:
``tests/test_kernels_compile.py`` compiles the same sources with ``nvcc`` for
exactly ``name_expressions(file, arch)`` and ``BASE_OPTIONS``, and
``tests/test_kernels_nvrtc.py`` with NVRTC for ``module_code(file)``, those names and
``options()`` as CuPy passes them (both need no GPU; each skips without its compiler).

Sources: from the installed package ``hpckfac.kernels`` (a wheel or an
editable install), else from the ``kernels/`` folder of the checkout this
module sits in (``python -m pytest`` at the repository root works without
installing).

Headers: NVRTC needs ``cuda_fp16.h``, ``cuda_bf16.h``, ``mma.h`` and the
``crt/mma.h`` it includes. ``include_dirs`` looks for each of them, in order,
under pip's CUDA packages of the NVRTC's major version (CUDA 12:
``nvidia/cuda_runtime``, ``nvidia/cuda_nvcc``, ...; CUDA 13: ``nvidia/cu13``),
then ``$CUDA_PATH``, CuPy's CUDA path and ``/usr/local/cuda``; a header found
nowhere raises ``KernelBuildError`` naming it, the folders searched and the pip package
that holds it (``PIP_HEADER_PACKAGES``: CuPy's ``[ctk]`` extra brings the runtime headers,
not ``crt/mma.h``).

Importing this module does not import CuPy.
"""
from __future__ import annotations

import hashlib
import importlib.util
import itertools
import os
import sys
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

# Headers the kernels include (``mma.h`` pulls in ``crt/mma.h``).
REQUIRED_HEADERS = ("cuda_fp16.h", "cuda_bf16.h", "mma.h", "crt/mma.h")

# The pip package holding each header, per CUDA major version. ``cupy-cuda12x[ctk]`` and
# ``cupy-cuda13x[ctk]`` install the runtime's (``cuda-toolkit[cudart,nvrtc,...]``) but not the
# one holding ``crt/mma.h``: the nvcc package on CUDA 12, the crt package on CUDA 13.
PIP_HEADER_PACKAGES: dict[int, dict[str, str]] = {
    12: {"cuda_fp16.h": "nvidia-cuda-runtime-cu12", "cuda_bf16.h": "nvidia-cuda-runtime-cu12",
         "mma.h": "nvidia-cuda-runtime-cu12", "crt/mma.h": "nvidia-cuda-nvcc-cu12"},
    13: {"cuda_fp16.h": "nvidia-cuda-runtime", "cuda_bf16.h": "nvidia-cuda-runtime",
         "mma.h": "nvidia-cuda-runtime", "crt/mma.h": "nvidia-cuda-crt"},
}


class KernelBuildError(RuntimeError):
    """The CUDA kernels cannot be built on this machine (sources or headers missing)."""


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
_modules: dict[tuple, object] = {}
_functions: dict[tuple, object] = {}


@lru_cache(maxsize=1)
def kernel_dir() -> Path:
    """Folder holding the ``.cu`` sources: the installed ``hpckfac.kernels``, else the checkout's ``kernels/``."""
    spec = importlib.util.find_spec("hpckfac.kernels")
    candidates = list(spec.submodule_search_locations or []) if spec is not None else []
    candidates.append(str(Path(__file__).resolve().parents[2] / "kernels"))
    for folder in candidates:
        if (Path(folder) / "common.cuh").is_file():
            return Path(folder)
    raise KernelBuildError(f"the CUDA sources (kernels/*.cu) were not found in {candidates}; "
                           f"reinstall hpckfac or run from a complete checkout")


def source(file: str) -> str:
    """Text of the CUDA source ``file`` (e.g. ``"pack.cu"``)."""
    return (kernel_dir() / file).read_text(encoding="utf-8")


def module_code(file: str) -> str:
    """The text NVRTC compiles for ``file``: its source, then a comment holding a digest of
    the headers in ``kernels/`` (``*.cuh``). CuPy's on-disk cache keys a binary by the source
    text and the options alone, not by what the source includes, so without the digest an
    edit of ``common.cuh`` alone would load the binary built from the old header."""
    digest = hashlib.sha256()
    for header in sorted(kernel_dir().glob("*.cuh")):
        digest.update(header.name.encode() + b"\0" + header.read_bytes() + b"\0")
    return f"{source(file)}\n// headers: sha256 {digest.hexdigest()}\n"


def source_names() -> list[str]:
    """Names of the ``.cu`` sources."""
    return sorted(p.name for p in kernel_dir().glob("*.cu"))


def dtype_name(dtype: DTypeLike) -> str:
    """Name of a dtype, dtype-like or dtype name (``"bfloat16"`` without importing ml_dtypes)."""
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


def ctype(dtype: DTypeLike) -> str:
    """C++ type of ``dtype``; TypeError for a dtype the kernels do not handle."""
    name = dtype_name(dtype)
    if name not in CTYPES:
        raise TypeError(f"dtype {name} is not supported by the CUDA kernels, expected one of {tuple(CTYPES)}")
    return CTYPES[name]


def pack_name(kind: str, src_dtype: DTypeLike, dst_dtype: DTypeLike) -> str:
    """Name expression of ``pack_sym`` / ``unpack_sym`` from ``src_dtype`` to ``dst_dtype``."""
    return f"{kind}<{ctype(src_dtype)}, {ctype(dst_dtype)}>"


def syrk_name(dtype: DTypeLike, arch: int) -> str:
    """Name expression of the factor-accumulation kernel for input ``dtype`` on ``arch``."""
    name = dtype_name(dtype)
    path = "syrk_wmma" if arch >= WMMA_MIN_ARCH.get(name, sys.maxsize) else "syrk_fma"
    return f"{path}<{ctype(dtype)}>"


def chol_name(dtype: DTypeLike) -> str:
    """Name expression of the small-matrix Cholesky inversion for working ``dtype``."""
    return f"chol_inverse<{ctype(dtype)}>"


def bn_sums_name(x_dtype: DTypeLike, g_dtype: DTypeLike) -> str:
    """Name expression of BatchNorm's row sums for input ``x_dtype`` and gradient ``g_dtype``."""
    return f"bn_row_sums<{ctype(x_dtype)}, {ctype(g_dtype)}>"


def bn_fisher_name(out_dtype: DTypeLike) -> str:
    """Name expression of BatchNorm's per-channel Fisher for statistics of ``out_dtype``."""
    return f"bn_unit_fisher<{ctype(out_dtype)}>"


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
    if file == "unitwise.cu":
        pairs = itertools.product(CTYPES, repeat=2)
        return tuple(bn_sums_name(x, g) for x, g in pairs) + (bn_fisher_name("float32"), bn_fisher_name("float64"))
    raise ValueError(f"file: unknown kernel source {file!r}, expected one of {source_names()}")


def _nvidia_roots() -> list[Path]:
    """Folders of pip's ``nvidia`` namespace package (CUDA wheels), if installed."""
    spec = importlib.util.find_spec("nvidia")
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec is not None else []


def _nvrtc_version() -> tuple[int, int] | None:
    try:
        import cupy

        major, minor = cupy.cuda.nvrtc.getVersion()
        return int(major), int(minor)
    except Exception:  # no CuPy, or no NVRTC library
        return None


def _nvrtc_major() -> int | None:
    version = _nvrtc_version()
    return None if version is None else version[0]


def install_hint(header: str, major: int | None) -> str:
    """How to install ``header`` from pip for an NVRTC of CUDA ``major`` (at NVRTC's minor
    version where CuPy reports it), or a toolkit through ``CUDA_PATH``."""
    if major not in PIP_HEADER_PACKAGES:
        packages = " or ".join(f"{PIP_HEADER_PACKAGES[m][header]} (CUDA {m})" for m in sorted(PIP_HEADER_PACKAGES))
        return f"install {packages}, matching your CuPy's CUDA version, or set CUDA_PATH to a CUDA toolkit"
    version = _nvrtc_version()
    pin = f"=={version[0]}.{version[1]}.*" if version is not None and version[0] == major else ""
    package = PIP_HEADER_PACKAGES[major][header]
    note = "" if package.startswith("nvidia-cuda-runtime") else " (CuPy's [ctk] extra does not bring it)"
    return f"pip install '{package}{pin}'{note} or set CUDA_PATH to a CUDA {major} toolkit"


def header_candidates(major: int | None = None) -> list[Path]:
    """Include folders searched for the CUDA headers, in order (see the module docstring)."""
    pip = []
    for root in _nvidia_roots():
        # CUDA 13 wheels share one tree per major version; CUDA 12 wheels have one per component.
        pip += [root / f"cu{major}" / "include"] if major is not None else sorted(root.glob("cu[0-9]*/include"))
        pip += [root / part / "include" for part in ("cuda_runtime", "cuda_nvcc", "cuda_crt", "cuda_nvrtc")]
    system = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME")]
    try:
        import cupy

        system.append(cupy.cuda.get_cuda_path())
    except ImportError:
        pass
    system.append("/usr/local/cuda")
    found = pip + [Path(root) / "include" for root in system if root]
    return list(dict.fromkeys(p for p in found if p.is_dir()))


def include_dirs(major: int | None = None) -> list[str]:
    """``-I`` folders: the kernel sources (for ``common.cuh``), then for each required
    header the first candidate folder holding it. ``KernelBuildError`` names a missing header."""
    major = _nvrtc_major() if major is None else major
    candidates = header_candidates(major)
    dirs = [str(kernel_dir())]
    for header in REQUIRED_HEADERS:
        folder = next((c for c in candidates if (c / header).is_file()), None)
        if folder is None:
            searched = ", ".join(map(str, candidates)) or "none found"
            raise KernelBuildError(
                f"CUDA header {header} not found (searched: {searched}); {install_hint(header, major)}")
        dirs.append(str(folder))
    return list(dict.fromkeys(dirs))


@lru_cache(maxsize=1)
def options() -> tuple[str, ...]:
    """NVRTC options used for every kernel source on this machine (looked up once)."""
    return BASE_OPTIONS + tuple(f"-I{d}" for d in include_dirs())


def device_arch() -> int:
    """Compute capability of the current CUDA device as major*10 + minor (e.g. 90)."""
    import cupy

    return int(cupy.cuda.Device().compute_capability)


def module(file: str) -> Any:
    """The compiled ``cupy.RawModule`` of kernel source ``file`` for the current device."""
    import cupy

    opts, arch = options(), device_arch()
    names = name_expressions(file, arch)
    key = (file, opts, arch, names)
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            mod = cupy.RawModule(code=module_code(file), options=opts, name_expressions=names)
            _modules[key] = mod
    return mod


def function(file: str, name_expression: str) -> Any:
    """Kernel ``name_expression`` (one of ``name_expressions(file, arch)``) of ``file``,
    looked up once per device (the hooks launch kernels hundreds of times a step)."""
    import cupy

    key = (file, name_expression, cupy.cuda.runtime.getDevice())
    kernel = _functions.get(key)
    if kernel is None:
        kernel = _functions[key] = module(file).get_function(name_expression)
    return kernel
