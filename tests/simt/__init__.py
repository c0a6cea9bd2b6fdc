"""A SIMT emulator that runs the unchanged CUDA sources of ``kernels/`` on the CPU (tests only).

Each source is compiled by the host C++ compiler with ``include/`` first on the include path:
``simt.h`` turns the CUDA keywords and built-ins into host C++ (``__global__`` and friends
vanish, ``threadIdx`` is the running fiber's index, ``__shared__`` is ``thread_local``), and
``cuda_fp16.h`` / ``cuda_bf16.h`` / ``mma.h`` stand in for CUDA's headers (half types with
round-to-nearest-even conversions, ``nvcuda::wmma`` 16x16x16 fragments). A generated unit
instantiates every name expression ``hpckfac.ops.cuda_module`` lists for the file and exports
one launcher per instantiation, called like ``cuLaunchKernel`` with an array of argument
addresses. ``kernel(grid, block, args, shared_mem=0)`` takes CuPy's calling convention with
NumPy arrays (passed as pointers) and NumPy scalars, each checked against the kernel's
parameter type (a float64 array for a ``float*``, or an ``np.int64`` for an ``int``, is an
error here where CuPy would pass the bytes).

Execution model. Every thread of a block is a cooperative fiber; blocks run one after
another on the calling thread. A fiber runs until it reaches ``__syncthreads``, a warp
collective (shuffles, ``__syncwarp``, each ``wmma`` call) or its end; a barrier is released
once all threads it concerns wait at the same call site. A barrier that some thread skips,
exits before, or reaches at another call site fails the launch (``EmulationError``), as do
shuffles with a partial mask or warp, misaligned ``wmma`` loads and stores, a block larger
than the kernel's ``__launch_bounds__`` and more than 48 KiB of dynamic shared memory (the
default limit, which the launch code never raises). Dynamic shared memory starts as 0xff
bytes (NaN in every float format) in each block. ``set_reverse_order(True)`` runs a block's
threads last to first between barriers, so a result that depends on the order of threads
between two barriers (a race) shows as a difference between the two orders.

What it cannot see:

- Races and the memory model: threads between two barriers run one after another, never
  interleaved, and every write is at once visible to all; a missing ``__threadfence``, a
  data race the two orders happen to agree on, or reliance on ordering within a warp without
  ``__syncwarp`` goes unnoticed. Atomics are trivially atomic.
- Warp-synchronous code: lanes of a warp are not in lockstep; only explicit collectives
  synchronise them. Code relying on implicit lockstep is not emulated faithfully: it may
  give a wrong result, differ between the two orders, or pass unnoticed.
- Out-of-bounds accesses: nothing checks a pointer. The launch code's outputs can be
  surrounded by guard bytes by the caller (``tests/simt/host_cupy.py`` does), so writes
  just past an output show; reads out of bounds do not.
- Static ``__shared__`` arrays are not poisoned and keep their values from block to block.
- Arithmetic is the host's: no ``-ftz`` (CuPy compiles with flush-to-zero, so float32
  subnormals that the GPU flushes are kept here), the ``__CUDA_ARCH__`` branches of
  ``common.cuh`` (PTX ``cvt`` instructions) are replaced by their host branches, ``sqrt``
  and division are IEEE on both. ``wmma::mma_sync`` adds in float in k order; tensor cores
  may use another order, so its results agree with the GPU's to rounding only.
- Resources: registers, static shared memory size, occupancy and timing are not modelled.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import re
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hpckfac.ops import cuda_module

INCLUDE = Path(__file__).resolve().parent / "include"
# Architectures whose name expressions are instantiated: their union covers both syrk paths.
ARCHS = (70, 75, 80, 90)
# Dynamic shared memory a launch may ask for: 48 KiB unless the kernel's
# cudaFuncAttributeMaxDynamicSharedMemorySize is raised, which the launch code does not do.
DYNAMIC_SHARED_BYTES = 48 * 1024
# -fno-extern-tls-init: an `extern __shared__` array is an extern thread_local, which GCC would
# otherwise reach through a call to its (absent) dynamic initialiser.
CXXFLAGS = ("-std=c++17", "-O1", "-shared", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off",
            "-fno-strict-aliasing", "-fno-extern-tls-init", "-w")

# Kind and size of an array's elements as simt.h codes a kernel parameter's type.
_CODES = {"float64": "f8", "float32": "f4", "float16": "h2", "bfloat16": "b2", "int64": "i8", "uint64": "u8",
          "int32": "i4", "uint32": "u4", "int16": "i2", "uint16": "u2", "int8": "i1", "uint8": "u1"}
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?[\w\s]*?(\w+)\s*\[\s*\]")
_LAUNCH_BOUNDS = re.compile(r"__launch_bounds__\(\s*(\d+)[^)]*\)\s*(\w+)\s*\(")


class EmulationError(RuntimeError):
    """A launch the emulator rejects: bad arguments, a divergent barrier, or the like."""


def compiler() -> str | None:
    """The host C++ compiler (``$CXX``, else ``g++``, ``c++`` or ``clang++``), None if none is found."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def name_expressions(file: str) -> tuple[str, ...]:
    """Every instantiation the loader compiles from ``file`` on any of ``ARCHS``, in order."""
    return tuple(dict.fromkeys(e for arch in ARCHS for e in cuda_module.name_expressions(file, arch)))


def _full_text(code: str) -> str:
    """``code`` followed by the files of ``kernels/`` it includes (where its kernels are declared)."""
    included = [cuda_module.kernel_dir() / f for f in re.findall(r'#include\s+"([^"]+)"', code)]
    return code + "".join(p.read_text(encoding="utf-8") for p in included if p.is_file())


def launcher_source(code: str, names: Sequence[str]) -> str:
    """A C++ unit that compiles the CUDA source ``code`` for the emulator and exports a launcher
    and a parameter signature for each name expression in ``names``."""
    shared = list(dict.fromkeys(_EXTERN_SHARED.findall(_full_text(code))))
    lines = ['#include "simt.h"', code, ""]
    lines += [f"thread_local __attribute__((aligned(16))) unsigned char {name}[{DYNAMIC_SHARED_BYTES}];"
              for name in shared]
    regions = ", ".join(f"{{{name}, sizeof {name}}}" for name in shared)
    lines += ["", "static void set_regions() { simt::dynamic_shared = {" + regions + "}; }", "",
              "#define SIMT_EXPORT extern \"C\" __attribute__((visibility(\"default\")))",
              "SIMT_EXPORT void simt_set_reverse(int on) { simt::reverse_order = on != 0; }"]
    for index, expression in enumerate(names):
        lines += [
            f"SIMT_EXPORT const char* simt_signature_{index}() {{",
            f"  static const std::string s = simt::signature(&{expression});",
            "  return s.c_str();",
            "}",
            f"SIMT_EXPORT int simt_launch_{index}(const unsigned* grid, const unsigned* block, size_t shared,",
            "                                  void** args, char* message, size_t size) {",
            "  set_regions();",
            f"  return simt::launch(&{expression}, grid, block, shared, args, message, size);",
            "}",
        ]
    return "\n".join(lines) + "\n"


class Kernel:
    """One emulated kernel instantiation, called as CuPy calls a ``RawModule`` function."""

    def __init__(self, library: ctypes.CDLL, index: int, name: str, max_threads: int = 1024) -> None:
        self.name = name
        self.max_threads = max_threads  # its __launch_bounds__, which a larger block fails on the GPU
        signature = getattr(library, f"simt_signature_{index}")
        signature.restype = ctypes.c_char_p
        self.parameters: tuple[str, ...] = tuple(signature().decode().split(","))
        self._launch = getattr(library, f"simt_launch_{index}")
        self._launch.restype = ctypes.c_int
        self._launch.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint), ctypes.c_size_t,
                                 ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_size_t]

    def _holder(self, position: int, code: str, arg: Any) -> np.ndarray:
        """A 0-d array holding the bytes passed for parameter ``position`` (type ``code``)."""
        where = f"{self.name}: argument {position}"
        if isinstance(arg, np.ndarray) and arg.ndim > 0 or isinstance(arg, np.ndarray) and code[0] == "p":
            if code[0] != "p":
                raise EmulationError(f"{where}: an array for the scalar parameter {code}")
            got = _CODES.get(np.dtype(arg.dtype).name, "?")
            pointee = code[1:]
            compatible = pointee in (got, "v0") or (got[0] in "iu" and pointee[0] in "iu" and got[1:] == pointee[1:])
            if not compatible:
                raise EmulationError(f"{where}: a {arg.dtype} array for the pointer parameter {code}")
            return np.array(arg.ctypes.data, dtype=np.uint64)
        if not isinstance(arg, np.generic):
            raise EmulationError(f"{where}: {type(arg).__name__} given; pass NumPy scalars, as the launch code does")
        got = _CODES.get(arg.dtype.name, "?")
        if code[0] == "p":
            if got in ("u8", "i8") and int(arg) == 0:
                return np.array(0, dtype=np.uint64)  # a null pointer
            raise EmulationError(f"{where}: scalar {arg!r} for the pointer parameter {code}")
        if got != code[1:]:
            raise EmulationError(f"{where}: {arg.dtype} scalar for the parameter {code}")
        return np.array(arg)

    def __call__(self, grid: Sequence[int], block: Sequence[int], args: Sequence[Any], shared_mem: int = 0) -> None:
        if len(args) != len(self.parameters):
            raise EmulationError(f"{self.name}: {len(args)} arguments for {len(self.parameters)} parameters")
        threads = int(np.prod([int(v) for v in block]))
        if threads > self.max_threads:
            raise EmulationError(f"{self.name}: {threads} threads per block, __launch_bounds__({self.max_threads})")
        if shared_mem > DYNAMIC_SHARED_BYTES:
            raise EmulationError(f"{self.name}: {shared_mem} bytes of dynamic shared memory, more than the "
                                 f"{DYNAMIC_SHARED_BYTES} a launch gets without raising the kernel's limit")
        holders = [self._holder(i, code, a) for i, (code, a) in enumerate(zip(self.parameters, args))]
        argv = (ctypes.c_void_p * len(holders))(*[h.ctypes.data for h in holders])
        dims = [(ctypes.c_uint * 3)(*(tuple(int(v) for v in dim) + (1, 1))[:3]) for dim in (grid, block)]
        message = ctypes.create_string_buffer(1024)
        if self._launch(dims[0], dims[1], int(shared_mem), argv, message, len(message)):
            raise EmulationError(f"{self.name}: {message.value.decode()}")


class Library:
    """Emulated kernels compiled from one source, by name expression."""

    def __init__(self, path: Path, names: Sequence[str], bounds: dict[str, int]) -> None:
        self._dll = ctypes.CDLL(str(path))
        self._dll.simt_set_reverse.argtypes = [ctypes.c_int]
        self.kernels = {name: Kernel(self._dll, i, name, bounds.get(name.split("<")[0].strip(), 1024))
                        for i, name in enumerate(names)}

    def set_reverse_order(self, on: bool) -> None:
        """Run the threads of a block last to first between barriers (True) or first to last."""
        self._dll.simt_set_reverse(int(on))


_lock = threading.Lock()
_folder_lock = threading.Lock()
_libraries: dict[str, Library] = {}
_folder: list[Path] = []


def _build_folder() -> Path:
    """This process's build folder, removed at exit."""
    with _folder_lock:
        if not _folder:
            _folder.append(Path(tempfile.mkdtemp(prefix="hpckfac-simt-")))
            atexit.register(shutil.rmtree, _folder[0], True)
    return _folder[0]


def build(name: str, code: str, names: Sequence[str]) -> Library:
    """CUDA source ``code`` (which may include ``kernels/*.cuh``) compiled for the emulator as
    library ``name``, with a launcher for each name expression in ``names``."""
    cxx = compiler()
    if cxx is None:
        raise EmulationError("no C++ compiler found")
    folder = _build_folder()
    unit = folder / f"emulate_{name}.cpp"
    unit.write_text(launcher_source(code, names))
    target = folder / f"emulate_{name}.so"
    cmd = [cxx, *CXXFLAGS, f"-I{INCLUDE}", f"-I{cuda_module.kernel_dir()}", str(unit), "-o", str(target)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)  # a hung compiler fails the build
    if done.returncode != 0:
        raise EmulationError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    bounds = {kernel: int(threads) for threads, kernel in _LAUNCH_BOUNDS.findall(_full_text(code))}
    return Library(target, names, bounds)


def libraries() -> dict[str, Library]:
    """Every source of ``kernels/`` compiled for the emulator (once per process, in parallel), by file name."""
    with _lock:
        if not _libraries:
            files = cuda_module.source_names()
            with ThreadPoolExecutor(max_workers=len(files)) as pool:
                built = list(pool.map(lambda f: build(f, f'#include "{f}"', name_expressions(f)), files))
            _libraries.update(zip(files, built))
    return _libraries


def kernel(file: str, name_expression: str) -> Kernel:
    """Emulated kernel ``name_expression`` of source ``file``."""
    return libraries()[file].kernels[name_expression]


def set_reverse_order(on: bool) -> None:
    """Thread order between barriers for every source of ``kernels/`` (see the module docstring)."""
    for library in libraries().values():
        library.set_reverse_order(on)
