"""CUDA backend of ``hpckfac.ops`` for CuPy arrays.

Implements the functions ``hpckfac.ops`` dispatches to, with the signatures and
results of the CPU reference modules (``packing``, ``factors``, ``batchnorm``,
``average``, ``inverse``); arguments arrive validated. Kernels live in ``kernels/*.cu``
(see docs/gpu.md) and are compiled on first use (``cuda_module``).

- ``pack_sym`` / ``unpack_sym``: one launch per source dtype (a warp per packed
  row, a block per 32x32 tile), offset tables uploaded as one small int64 array.
- ``accumulate_factor``: float32/float16/bfloat16 ``x`` through the
  triangle-tiled kernel (tensor cores for half inputs where the GPU has them),
  float64 through cuBLAS.
- ``batchnorm_fisher``: BatchNorm's unit-wise Fisher in two launches (row sums
  in float64, then one thread per channel).
- ``damped_inverse``: matrices of order <= ``CHOLESKY_KERNEL_MAX_N`` through the
  one-block-per-matrix kernel, larger ones through cuSOLVER; failures take the
  CPU reference's jitter and clipped-eigenvalue fallbacks, batched on the GPU.
"""
from __future__ import annotations

import collections
import ctypes
import math
import os
import threading
from functools import lru_cache
from typing import Any, Sequence

import cupy
import cupyx
import numpy as np
from numpy.typing import DTypeLike

from hpckfac.ops import cuda_module
from hpckfac.ops.checks import accumulation_dtype
from hpckfac.ops.inverse import CHOLESKY, EIGEN, EIGEN_RFLOOR, JITTER, JITTERS, PIVOT_RTOL
from hpckfac.ops.packing import packed_offsets

# Largest order the shared-memory Cholesky kernel handles (its design limit).
KERNEL_LIMIT_N = 64
# Orders up to this go to the Cholesky kernel, larger ones to cuSOLVER. The
# crossover is measured by ``python -m hpckfac.bench kernels`` (docs/gpu.md).
CHOLESKY_KERNEL_MAX_N = 64

# Factor accumulation: row tile of both kernels, rows per split at least
# MIN_SPLIT_ROWS, and enough (tile, split) blocks for BLOCKS_PER_SM per SM.
_SYRK_TILE = 64
_SYRK_ROW_STEP = 32
MIN_SPLIT_ROWS = 256
BLOCKS_PER_SM = 4

_THREADS = 256
# Packing: one warp per packed row; unpacking: 32x32 tiles, (32, 8) threads per block.
_WARP = 32
_UNPACK_TILE = 32
_UNPACK_ROWS = 8
_NULL = np.uint64(0)

# Factor accumulation of float32/float16/bfloat16 input: "gemm" (cuBLAS over the upper
# triangle's column panels, then the pack kernel), "kernel" (kernels/syrk.cu), or "auto":
# cuBLAS from GEMM_MIN_D columns on (per input precision), the kernel below. Chosen by
# measurement (``python -m hpckfac.bench kernels``, docs/gpu.md), overridable with
# $HPCKFAC_FACTOR_ROUTE.
FACTOR_ROUTES = ("auto", "gemm", "kernel")
FACTOR_ROUTE_ENV = "HPCKFAC_FACTOR_ROUTE"
DEFAULT_FACTOR_ROUTE = "auto"
GEMM_MIN_D = {"float32": 384, "half": 1024}
# cudaDataType / cublasComputeType_t / cublasGemmAlgo_t values (CUDA's stable ABI).
_CUDA_DATA_TYPES = {"float32": 0, "float16": 2, "bfloat16": 14}
_CUDA_R_32F = 0
_CUBLAS_COMPUTE_32F = 68
_CUBLAS_GEMM_DEFAULT = -1


@lru_cache(maxsize=None)
def _sm_count_of(device: int) -> int:
    return cupy.cuda.runtime.deviceGetAttribute(cupy.cuda.runtime.cudaDevAttrMultiProcessorCount, device)


def _sm_count() -> int:
    """Streaming multiprocessors of the current device."""
    return _sm_count_of(cupy.cuda.Device().id)


def _launch_blocks(total: int) -> int:
    """Blocks of a grid-stride launch of ``total`` threads (one per element, or a warp per row)."""
    return max(1, min(-(-total // _THREADS), 32 * _sm_count()))


class _Uploads:
    """Small host arrays to the device without waiting for the stream.

    A copy from pageable memory synchronises the stream first (CUDA's rule), so
    a table uploaded with ``cupy.asarray`` would stall the host behind every
    kernel already queued. Each upload here goes through its own page-locked
    buffer, held until an event recorded after the copy has completed.
    """

    def __init__(self) -> None:
        self._in_flight: list = []  # (pinned memory, event) of copies not known to be done

    def __call__(self, host: np.ndarray) -> tuple[cupy.ndarray, cupy.cuda.Event | None]:
        """The device copy of ``host`` and the event that marks the copy done (None: nothing to copy)."""
        self._in_flight = [(mem, event) for mem, event in self._in_flight if not event.done]
        host = np.ascontiguousarray(host)
        device = cupy.empty(host.shape, dtype=host.dtype)
        if not host.nbytes:
            return device, None
        mem = cupy.cuda.alloc_pinned_memory(host.nbytes)
        np.ndarray(host.shape, dtype=host.dtype, buffer=mem)[...] = host
        stream = cupy.cuda.get_current_stream()
        device.data.copy_from_host_async(ctypes.c_void_p(mem.ptr), host.nbytes, stream)
        event = stream.record()
        self._in_flight.append((mem, event))
        return device, event


_upload = _Uploads()


# Device copies of recent tables by content and device: a step packs and unpacks the same
# matrices (the memory pool hands the same addresses back), so most tables repeat.
_TABLES_KEPT = 512
_tables: collections.OrderedDict[tuple, tuple[cupy.ndarray, cupy.cuda.Event | None]] = collections.OrderedDict()
_tables_lock = threading.Lock()  # the autograd engine runs hooks on its own threads


def _table(*columns) -> cupy.ndarray:
    """The int64 columns concatenated into one device array (one upload, no stream wait, none
    at all for a table uploaded recently: kernels only read tables)."""
    host = np.concatenate([np.asarray(c, dtype=np.int64).ravel() for c in columns])
    key = (cupy.cuda.runtime.getDevice(), host.tobytes())
    with _tables_lock:
        entry = _tables.get(key)
        if entry is None:
            entry = _tables[key] = _upload(host)
            if len(_tables) > _TABLES_KEPT:
                _tables.popitem(last=False)
        else:
            _tables.move_to_end(key)
    table, uploaded = entry
    if uploaded is not None and not uploaded.done:
        # Still being copied, perhaps on another stream (or thread): this stream waits for it.
        cupy.cuda.get_current_stream().wait_event(uploaded)
    return table


def _name(dtype) -> str:
    return cuda_module.dtype_name(dtype)


# ---------------------------------------------------------------- packing

def pack_sym(mats: Sequence[Any], sizes: list[int], dtype: np.dtype, out: Any) -> Any:
    """Upper triangles of ``mats`` (orders ``sizes``) in one buffer of ``dtype``, ``out`` if given."""
    offsets = packed_offsets(sizes)
    target = out if out is not None and out.flags.c_contiguous else cupy.empty(int(offsets[-1]), dtype=dtype)
    mats = [cupy.asarray(m) for m in mats]
    groups: dict[str, list[int]] = {}
    for index, (mat, n) in enumerate(zip(mats, sizes)):
        if n:
            groups.setdefault(_name(mat.dtype), []).append(index)
    for src, members in groups.items():
        kernel = cuda_module.function("pack.cu", cuda_module.pack_name("pack_sym", src, dtype))
        chosen = [mats[i] for i in members]
        ptrs = np.array([m.data.ptr for m in chosen], dtype=np.uint64).view(np.int64)
        strides = [[s // m.itemsize for s in m.strides] for m in chosen]
        n = np.array([sizes[i] for i in members], dtype=np.int64)
        rows = np.concatenate([[0], np.cumsum(n)])
        count = len(members)
        table = _table(ptrs, strides, n, rows, offsets[members])
        # One warp per row (kernels/pack.cu).
        kernel((_launch_blocks(int(rows[-1]) * _WARP),), (_THREADS,),
               (table, table[count:], table[3 * count:], table[4 * count:], table[5 * count + 1:],
                np.int32(count), target))
    if out is None:
        return target
    if target is not out:
        out[...] = target
    return out


def unpack_sym(buffer: Any, sizes: list[int], dtype: np.dtype) -> list:
    """Symmetric ``(n, n)`` matrices of ``dtype`` rebuilt from the packed ``buffer``
    (views of one freshly allocated array, one launch)."""
    order = np.asarray(sizes, dtype=np.int64)
    dense = np.concatenate([[0], np.cumsum(order * order)])
    flat = cupy.empty(int(dense[-1]), dtype=dtype)
    if sizes and dense[-1]:
        count = len(sizes)
        side = -(-order // _UNPACK_TILE)
        tiles = np.concatenate([[0], np.cumsum(side * (side + 1) // 2)])
        table = _table(order, packed_offsets(sizes)[:-1], dense, tiles)
        kernel = cuda_module.function("pack.cu", cuda_module.pack_name("unpack_sym", buffer.dtype, dtype))
        # One (32, 8) block per 32x32 tile of the upper tile triangles (kernels/pack.cu).
        kernel((max(1, min(int(tiles[-1]), 32 * _sm_count())),), (_UNPACK_TILE, _UNPACK_ROWS),
               (cupy.ascontiguousarray(buffer), table, table[count:], table[2 * count:], table[3 * count + 1:],
                np.int32(count), flat))
    return [flat[start:stop].reshape(n, n) for n, start, stop in zip(sizes, dense[:-1], dense[1:])]


# ---------------------------------------------------------------- factors

def _syrk_splits(rows: int, d: int) -> tuple[int, int]:
    """(splits, rows per split) for a ``d``-column factor over ``rows`` rows."""
    tiles_per_side = -(-d // _SYRK_TILE)
    tiles = tiles_per_side * (tiles_per_side + 1) // 2
    wanted = -(-BLOCKS_PER_SM * _sm_count() // tiles)
    splits = max(1, min(wanted, rows // MIN_SPLIT_ROWS))
    per_split = -(-max(rows, 1) // splits)
    per_split = -(-per_split // _SYRK_ROW_STEP) * _SYRK_ROW_STEP
    return max(1, -(-rows // per_split)), per_split


def _syrk(x, scale: float, target, prev, decay: float, flag, dense: bool) -> None:
    """``target <- epilogue(scale * x.T @ x)`` by the tiled kernel (see kernels/syrk.cu)."""
    rows, d = x.shape
    arch = cuda_module.device_arch()
    name = cuda_module.syrk_name(x.dtype, arch)
    kernel = cuda_module.function("syrk.cu", name)
    splits, per_split = _syrk_splits(rows, d)
    packed = d * (d + 1) // 2
    workspace = cupy.empty(splits * packed, dtype=np.float32) if splits > 1 else None
    tail = (np.float32(decay), np.float32(1.0 - decay), np.int32(dense))
    final = (target, _NULL if prev is None else prev, _NULL if flag is None else flag)
    direct = final if workspace is None else (_NULL, _NULL, _NULL)
    args = (x, np.int64(rows), np.int64(d), np.int64(per_split), np.float32(scale), *tail, *direct,
            _NULL if workspace is None else workspace)
    tiles_per_side = -(-d // _SYRK_TILE)
    grid = (tiles_per_side * (tiles_per_side + 1) // 2, splits)
    if name.startswith("syrk_wmma"):
        vec = int(d % 8 == 0 and x.data.ptr % 16 == 0)
        kernel(grid, (128,), args + (np.int32(vec),))
    else:
        kernel(grid, (256,), args)
    if workspace is not None:
        finish = cuda_module.function("syrk.cu", "syrk_finish")
        finish((_launch_blocks(packed),), (_THREADS,),
               (workspace, np.int32(splits), np.int64(d), np.float32(scale), *tail, *final))


def factor_route(dtype: DTypeLike, d: int) -> str:
    """How a float32/float16/bfloat16 factor of ``d`` columns is accumulated, ``"gemm"`` or
    ``"kernel"``: ``$HPCKFAC_FACTOR_ROUTE`` if set, else ``DEFAULT_FACTOR_ROUTE``; ``"auto"``
    takes cuBLAS from ``GEMM_MIN_D`` columns on (see docs/gpu.md)."""
    route = os.environ.get(FACTOR_ROUTE_ENV, DEFAULT_FACTOR_ROUTE)
    if route not in FACTOR_ROUTES:
        raise ValueError(f"{FACTOR_ROUTE_ENV}: expected one of {FACTOR_ROUTES}, got {route!r}")
    if route == "auto":
        precision = "float32" if np.dtype(dtype) == np.float32 else "half"
        route = "gemm" if d >= GEMM_MIN_D[precision] else "kernel"
    return route


def _panel_width(d: int) -> int:
    """Columns per cuBLAS call: one call up to 512, else at most 8 panels, multiples of 64."""
    if d <= 512:
        return max(d, 1)
    return -(-d // min(8, -(-d // 256)) // 64) * 64


def _gemm_upper(x, scale: float):
    """``scale * x.T @ x`` in float32 by cuBLAS ``GemmEx`` (float32 accumulation, tensor cores
    for half inputs), only the column panels of the upper triangle: with ``k`` panels
    ``(k+1)/(2k)`` of a full product's flops. Column-major result: entry ``(i, j)``,
    ``i <= j``, sits at ``[j, i]``; the rest is not written (callers read the triangle only)."""
    from cupy_backends.cuda.libs import cublas

    rows, d = x.shape
    if rows == 0 or d == 0:
        return cupy.zeros((d, d), dtype=np.float32)
    out = cupy.empty((d, d), dtype=np.float32)
    x = cupy.ascontiguousarray(x)
    kind = _CUDA_DATA_TYPES[np.dtype(x.dtype).name]
    alpha, beta = np.array(scale, dtype=np.float32), np.array(0.0, dtype=np.float32)
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    width = _panel_width(d)
    for start in range(0, d, width):
        n = min(width, d - start)
        # Column-major view: X^T is (d, rows) with leading dimension d; C[0:start+n, start:start+n].
        cublas.gemmEx(handle, cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_T, start + n, n, rows,
                      alpha.ctypes.data, x.data.ptr, kind, d, x.data.ptr + start * x.itemsize, kind, d,
                      beta.ctypes.data, out.data.ptr + start * d * out.itemsize, _CUDA_R_32F, d,
                      _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT)
    return out


def accumulate_factor(x: Any, scale: float, packed: bool, out: Any, decay: float | None) -> Any:
    """``scale * x.T @ x`` in float32 (float64 for float64 ``x``), dense or packed;
    with ``decay`` blended into ``out``, which a non-finite product leaves untouched
    (ValueError), as the CPU reference does."""
    d = int(x.shape[1])
    shape = (d * (d + 1) // 2,) if packed else (d, d)
    dtype = accumulation_dtype(x.dtype)
    if dtype == np.float64 or factor_route(x.dtype, d) == "gemm":
        if dtype == np.float64:
            factor = x.T @ x
            factor *= scale
        else:
            # The upper triangle (of the transposed, column-major result) in cuBLAS panels.
            factor = _gemm_upper(x, scale).T
        if packed:
            factor = pack_sym([factor], [d], factor.dtype, None)
        elif dtype != np.float64:
            factor = unpack_sym(pack_sym([factor], [d], factor.dtype, None), [d], factor.dtype)[0]
        if out is None:
            return factor
        if decay is None:
            out[...] = factor
        elif not ema_update(out, factor, decay, False):
            raise ValueError("x: the factor scale * x.T @ x is not finite; the running average was left untouched")
        return out

    # With decay the kernel writes the blend to a scratch buffer: only once the
    # product is known to be finite may `out` change.
    direct = out is not None and decay is None and out.flags.c_contiguous
    target = out if direct else cupy.empty(shape, dtype=np.float32)
    prev = cupy.ascontiguousarray(out) if decay is not None else None
    flag = cupy.zeros(1, dtype=np.int32) if decay is not None else None
    if d:
        _syrk(cupy.ascontiguousarray(x), scale, target, prev, 0.0 if decay is None else decay, flag, not packed)
    if out is None or direct:
        return target
    if flag is not None and int(flag.get()[0]):
        raise ValueError("x: the factor scale * x.T @ x is not finite; the running average was left untouched")
    out[...] = target
    return out


# ---------------------------------------------------------------- BatchNorm statistics

def batchnorm_fisher(x: cupy.ndarray, g: cupy.ndarray, eps: float, scale: float, out: cupy.ndarray) -> cupy.ndarray:
    """BatchNorm's packed per-channel Fisher added to ``out`` (see ``hpckfac.ops``; ``x`` not
    empty) in two launches: row sums of ``x`` and ``g`` in float64 (a warp per (example,
    channel) row, any strides), then one thread per channel (kernels/unitwise.cu)."""
    examples, channels, positions = (int(n) for n in x.shape)
    rows = examples * channels
    sums = cupy.empty(4 * rows, dtype=np.float64)
    strides = [st // a.itemsize for a in (x, g) for st in a.strides]
    row_sums = cuda_module.function("unitwise.cu", cuda_module.bn_sums_name(x.dtype, g.dtype))
    row_sums((_launch_blocks(rows * _WARP),), (_THREADS,),  # a warp per row
             (x, g, np.int64(channels), np.int64(positions), *(np.int64(st) for st in strides),
              np.int64(rows), sums))
    target = out if out.flags.c_contiguous else cupy.ascontiguousarray(out)
    fisher = cuda_module.function("unitwise.cu", cuda_module.bn_fisher_name(out.dtype))
    fisher((_launch_blocks(channels),), (_THREADS,),
           (sums, np.int64(examples), np.int64(channels), np.int64(positions), np.float64(eps),
            np.float64(scale), target))
    if target is not out:
        out[...] = target
    return out


# ---------------------------------------------------------------- running average

def ema_update(running: Any, new: Any, decay: float, first: bool, check: bool = True) -> bool:
    """``running <- decay*running + (1-decay)*new`` in place (``first``: ``running <- new``);
    False, leaving ``running`` untouched, when ``new`` holds NaN or Inf (``check=False``:
    the caller knows it does not, and the device is not asked). Checked after the cast, as on
    the CPU: float64 statistics beyond float32's range become inf in a float32 average."""
    new = cupy.asarray(new).astype(running.dtype, copy=False)
    if check and not bool(cupy.isfinite(new).all()):
        return False
    if first:
        running[...] = new
    else:
        running *= decay
        running += (1.0 - decay) * new
    return True


# ---------------------------------------------------------------- inversion

def _damped(mats, damping, shift=None):
    """``(M + M^T)/2 + damping I (+ shift I)`` per matrix, as the CPU reference forms it."""
    eye = cupy.eye(mats.shape[-1], dtype=mats.dtype)
    damped = 0.5 * mats + 0.5 * mats.swapaxes(1, 2) + damping[:, None, None] * eye
    if shift is not None:
        damped += shift[:, None, None] * eye
    return damped


def _kernel_inverse(mats, damping, shift):
    """(inverse, ok) of the small-matrix kernel (kernels/chol.cu)."""
    batch, n = mats.shape[:2]
    dtype = mats.dtype
    inverse = cupy.empty_like(mats)
    failed = cupy.empty(batch, dtype=np.int8)
    threads = 32 if n <= 8 else 64 if n <= 16 else 128 if n <= 32 else 256
    shared = (n * (n + 1) + 2 * n) * dtype.itemsize
    tol = dtype.type(PIVOT_RTOL * np.finfo(dtype).eps)
    kernel = cuda_module.function("chol.cu", cuda_module.chol_name(dtype))
    kernel((batch,), (threads,), (mats, np.int32(n), damping, _NULL if shift is None else shift, tol,
                                  inverse, failed), shared_mem=shared)
    return inverse, failed == 0


def _solver_inverse(mats, damping, shift):
    """(inverse, ok) through cuSOLVER and cuBLAS: batched Cholesky, one batched
    triangular solve for ``L^-1``, one batched product ``L^-T L^-1``."""
    # Imported here: loading it needs cuBLAS, which a GPU-less machine lacks.
    from cupyx.scipy.linalg import solve_triangular

    damped = _damped(mats, damping, shift)
    with cupyx.errstate(linalg="ignore"):
        factors = cupy.linalg.cholesky(damped)
    pivots = cupy.diagonal(factors, axis1=1, axis2=2)
    diag = cupy.diagonal(damped, axis1=1, axis2=2)
    tol = PIVOT_RTOL * np.finfo(mats.dtype).eps
    # L_ii > 0 also rejects a factorisation cuSOLVER stopped at a non-positive pivot.
    ok = cupy.isfinite(factors).all(axis=(1, 2)) & ((pivots > 0) & (pivots * pivots >= tol * diag)).all(axis=1)
    # Failed factorisations give garbage here; ``ok`` masks them and the fallbacks replace them.
    eye = cupy.broadcast_to(cupy.eye(mats.shape[-1], dtype=mats.dtype), mats.shape)
    lower_inv = solve_triangular(factors, eye, lower=True)
    inverse = lower_inv.swapaxes(1, 2) @ lower_inv
    inverse = 0.5 * inverse + 0.5 * inverse.swapaxes(1, 2)
    ok &= cupy.isfinite(inverse).all(axis=(1, 2))
    return inverse, ok


def _cholesky_inverse(mats, damping, shift=None):
    """Inverses of the damped (and shifted) matrices and which of them succeeded."""
    if mats.shape[-1] <= min(CHOLESKY_KERNEL_MAX_N, KERNEL_LIMIT_N):
        return _kernel_inverse(mats, damping, shift)
    return _solver_inverse(mats, damping, shift)


def _clipped_eigen_inverse(mats, damping):
    """``V diag(1/max(w, floor)) V^T`` per matrix of ``(M + M^T)/2 + damping*I`` (the CPU
    reference's floor, batched), ``damping`` float64. As on the CPU, in float64 with the damping
    added to the eigenvalues: the damped matrix may overflow a float32 where its inverse does not."""
    sym = 0.5 * mats.astype(np.float64)
    eigvals, eigvecs = cupy.linalg.eigh(sym + sym.swapaxes(1, 2))
    eigvals += damping[:, None]
    top = cupy.abs(eigvals).max(axis=1)
    top = cupy.where(top == 0, 1.0, top)
    floor = cupy.maximum(cupy.maximum(damping, EIGEN_RFLOOR * top), math.sqrt(np.finfo(mats.dtype).tiny))
    inverse = (eigvecs / cupy.maximum(eigvals, floor[:, None])[:, None, :]) @ eigvecs.swapaxes(1, 2)
    inverse = 0.5 * inverse + 0.5 * inverse.swapaxes(1, 2)
    if mats.dtype == np.float64:
        return inverse
    # Narrowed by the pack kernels' conversion (hk::narrow), not astype: CuPy compiles its own
    # kernels with -ftz=true too, so astype, and any float32 arithmetic after it, would flush
    # float32 subnormals to zero, and the inverse of a damping beyond float32's range is one.
    count, n = inverse.shape[:2]
    return cupy.stack(unpack_sym(pack_sym(list(inverse), [n] * count, mats.dtype, None), [n] * count, mats.dtype))


def damped_inverse(mats: Any, damping: float | Any, overwrite_mats: bool = False) -> tuple[Any, Any]:
    """Inverses of ``mats + damping*I`` (batch, n, n) and their int8 status (batch,),
    on the GPU, with the CPU reference's acceptance test and fallbacks. ``mats`` is left as it
    is whatever ``overwrite_mats`` says: the retries and the eigen fallback read it again."""
    dtype = accumulation_dtype(mats.dtype)
    mats = cupy.ascontiguousarray(mats.astype(dtype, copy=False))
    bad = cupy.flatnonzero(~cupy.isfinite(mats).all(axis=(1, 2))).get()
    if bad.size:
        raise ValueError(f"mats: non-finite values in batch indices {bad.tolist()}")
    batch = mats.shape[0]
    # Kept in float64 for the eigen fallback: a finite damping may overflow the working dtype.
    damping64 = cupy.ascontiguousarray(cupy.broadcast_to(cupy.asarray(damping, dtype=np.float64), (batch,)))
    damping = damping64.astype(dtype)
    status = cupy.full(batch, CHOLESKY, dtype=np.int8)
    if batch == 0 or mats.shape[-1] == 0:
        return cupy.empty_like(mats), status
    inverse, ok = _cholesky_inverse(mats, damping)
    pending = cupy.flatnonzero(~ok)
    if pending.size:
        damped = _damped(mats[pending], damping[pending])
        scale = cupy.abs(cupy.diagonal(damped, axis1=1, axis2=2)).astype(np.float64).mean(axis=1)
        scale = cupy.where(scale == 0, 1.0, scale)
        left = cupy.arange(pending.size)
        for jitter in JITTERS:
            shift = (jitter * scale[left]).astype(dtype)
            retried, fixed = _cholesky_inverse(mats[pending[left]], damping[pending[left]], shift)
            done = pending[left[fixed]]
            inverse[done] = retried[fixed]
            status[done] = JITTER
            left = left[~fixed]
            if not left.size:
                break
        if left.size:
            rest = pending[left]
            inverse[rest] = _clipped_eigen_inverse(mats[rest], damping64[rest])
            status[rest] = EIGEN
    return inverse, status
