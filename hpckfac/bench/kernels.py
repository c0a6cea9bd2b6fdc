"""The CUDA kernels against their obvious alternatives.

``python -m hpckfac.bench kernels`` times:

- factor accumulation (packed ``scale * X^T X``) by the syrk kernel and by the
  cuBLAS panel route vs CuPy/cuBLAS ``X.T @ X`` in the same input precision
  (aim: at most 0.6x its time), and the two routes over a sweep of widths: the
  smallest width from which cuBLAS wins is the measured value for
  ``GEMM_MIN_D`` (the ``auto`` route's switch);
- batched damped Cholesky inversion vs ``torch.linalg.cholesky`` +
  ``torch.cholesky_inverse`` batched (aim: 2x faster for n <= 64), plus the
  cuSOLVER route of ``hpckfac.ops.cuda`` at the same n: the largest n up to which the
  kernel wins at every size is the measured value for ``CHOLESKY_KERNEL_MAX_N``;
- pack / unpack of all ResNet-50 factors in one buffer vs a device-to-device
  copy of the same bytes (aim: 80% of its bandwidth).

Times are device-event medians over back-to-back calls (``_ms`` columns: the
device's time per call whenever the host keeps up, so the host's preparation of
a launch is not counted against a kernel); ``ours_call_ms`` is one call followed
by a device synchronisation, host work included, as a single caller waits for
it. Needs a CUDA GPU and CuPy; without them it says so and exits with status 1.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np

from hpckfac.bench import shapes
from hpckfac.bench.report import check_outputs, median, one_process, time_calls, write_json
from hpckfac.tables import format_table
from hpckfac.cli import HelpFormatter, RankParser

FACTOR_SHAPES = ((32768, 64), (32768, 576), (16384, 1152), (8192, 2304), (4096, 4608))
FACTOR_DTYPES = ("float32", "float16", "bfloat16")
# Route crossover sweep: ResNet-50's rows at batch 32 for 28x28 outputs, widths around the crossover.
CROSSOVER_ROWS = 25088
CROSSOVER_D = (128, 256, 384, 512, 768, 1024, 1536, 2048, 3072)
CROSSOVER_DTYPES = {"float32": "float32", "half": "float16"}
CHOLESKY_SIZES = (2, 4, 8, 16, 24, 32, 48, 64)
INNER = 5  # back-to-back calls per timed batch


def _gpu_problem() -> str | None:
    """Why the benchmark cannot run here, or None when a CUDA device is usable."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no CUDA device"
    except ImportError:
        return "CuPy is not installed (pip install 'hpckfac[cuda12]' or 'hpckfac[cuda13]')"
    except Exception as exc:  # driver missing or too old
        return f"no usable CUDA device ({type(exc).__name__}: {exc})"
    return None


def _call_timed(fn: Callable[[], Any], repeat: int) -> float:
    """Median seconds of ``fn`` followed by a device synchronisation."""
    import cupy

    def call() -> None:
        fn()
        cupy.cuda.Device().synchronize()

    return median(time_calls(call, repeat, warmup=2))


def _timed(fn: Callable[[], Any], repeat: int, inner: int = INNER) -> float:
    """Median seconds per call of ``fn`` over ``repeat`` batches of ``inner`` back-to-back
    calls between two device events: the device's time when the host launches faster than
    the device runs, the host's when it does not."""
    import cupy

    for _ in range(2):
        fn()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(repeat):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3 / inner)
    return median(times)


def _dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


@contextlib.contextmanager
def _factor_route(route: str):
    """Within the block, ``accumulate_factor`` takes factor route ``route``."""
    from hpckfac.ops import cuda as ops_cuda

    saved = os.environ.get(ops_cuda.FACTOR_ROUTE_ENV)
    os.environ[ops_cuda.FACTOR_ROUTE_ENV] = route
    try:
        yield
    finally:
        if saved is None:
            del os.environ[ops_cuda.FACTOR_ROUTE_ENV]
        else:
            os.environ[ops_cuda.FACTOR_ROUTE_ENV] = saved


def bench_factors(repeat: int, shape_list: Sequence[tuple[int, int]] = FACTOR_SHAPES) -> list[dict[str, Any]]:
    """Packed factor accumulation, both routes (the syrk kernel and cuBLAS panels + pack),
    vs ``X.T @ X`` (cuBLAS, a full product) at the same precision."""
    import cupy

    from hpckfac import ops

    rows_out = []
    for rows, d in shape_list:
        for name in FACTOR_DTYPES:
            x = cupy.asarray(np.random.default_rng(0).standard_normal((rows, d)).astype(_dtype(name)))
            with _factor_route("kernel"):
                ours = _timed(lambda: ops.accumulate_factor(x, 1.0 / rows, packed=True), repeat)
                ours_call = _call_timed(lambda: ops.accumulate_factor(x, 1.0 / rows, packed=True), repeat)
            with _factor_route("gemm"):
                gemm = _timed(lambda: ops.accumulate_factor(x, 1.0 / rows, packed=True), repeat)
            try:
                cublas = _timed(lambda: x.T @ x, repeat)
            except Exception as exc:  # e.g. no bfloat16 GEMM in this CuPy
                cublas, note = float("nan"), f"X.T@X unavailable: {type(exc).__name__}"
            else:
                note = ""
            rows_out.append({"kernel": "factor", "rows": rows, "d": d, "dtype": name,
                             "ours_ms": ours * 1e3, "ours_call_ms": ours_call * 1e3, "gemm_route_ms": gemm * 1e3,
                             "baseline_ms": cublas * 1e3,
                             "ratio": ours / cublas, "gemm_ratio": gemm / cublas, "aim": "<= 0.6", "note": note})
    return rows_out


def bench_factor_crossover(repeat: int, widths: Sequence[int] = CROSSOVER_D,
                           rows: int = CROSSOVER_ROWS) -> tuple[list[dict[str, Any]], dict[str, int | None]]:
    """The syrk kernel vs the cuBLAS route over ``widths`` at ``rows`` rows, per input
    precision; returns the rows and, per precision, the smallest width from which the
    cuBLAS route wins at every larger width (None: never), the measured value for
    ``hpckfac.ops.cuda.GEMM_MIN_D``. Timed per synchronised call, host work included: the
    route with fewer launches also costs the host less, and a training step waits for both."""
    import cupy

    from hpckfac import ops

    rows_out, crossover = [], {}
    for precision, name in CROSSOVER_DTYPES.items():
        wins = []
        for d in widths:
            x = cupy.asarray(np.random.default_rng(d).standard_normal((rows, d)).astype(_dtype(name)))
            times = {}
            for route in ("kernel", "gemm"):
                with _factor_route(route):
                    times[route] = _call_timed(lambda: ops.accumulate_factor(x, 1.0 / rows, packed=True),
                                               repeat)
            wins.append(times["gemm"] < times["kernel"])
            rows_out.append({"precision": precision, "rows": rows, "d": d, "kernel_ms": times["kernel"] * 1e3,
                             "gemm_route_ms": times["gemm"] * 1e3, "gemm/kernel": times["gemm"] / times["kernel"]})
        crossover[precision] = next((d for i, d in enumerate(widths) if all(wins[i:])), None)
    return rows_out, crossover


def last_winning_size(sizes: Sequence[int], wins: Sequence[bool]) -> int:
    """The largest of ascending ``sizes`` up to which every entry of ``wins`` holds (0: the first
    loses): a route taken up to a size must win at every smaller size too, so one lucky timing
    past a loss does not move the switch."""
    end = 0
    for n, won in zip(sizes, wins):
        if not won:
            break
        end = n
    return end


def bench_cholesky(repeat: int, sizes: Sequence[int] = CHOLESKY_SIZES) -> tuple[list[dict[str, Any]], int]:
    """Batched damped inversion: kernel vs torch (cholesky + cholesky_inverse) vs
    the cuSOLVER route; returns the rows and the measured kernel/cuSOLVER crossover
    (``last_winning_size``: 0 when the kernel loses at the smallest size)."""
    import cupy

    from hpckfac.ops import cuda as ops_cuda

    try:
        import torch

        has_torch = torch.cuda.is_available()
    except ImportError:
        has_torch = False
    rows_out, wins = [], []
    for n in sizes:
        batch = 4096 if n <= 8 else 1024 if n <= 32 else 256
        rng = np.random.default_rng(n)
        x = rng.standard_normal((batch, 2 * n, n))
        mats = cupy.asarray((x.transpose(0, 2, 1) @ x / (2 * n)).astype(np.float32))
        damping = cupy.full(batch, 1e-3, dtype=np.float32)
        kernel = _timed(lambda: ops_cuda._kernel_inverse(mats, damping, None), repeat)
        kernel_call = _call_timed(lambda: ops_cuda._kernel_inverse(mats, damping, None), repeat)
        solver = _timed(lambda: ops_cuda._solver_inverse(mats, damping, None), repeat)
        wins.append(kernel < solver)
        if has_torch:
            t = torch.from_dlpack(mats)
            eye = torch.eye(n, device=t.device, dtype=t.dtype)
            damped = t + 1e-3 * eye

            def with_torch():
                return torch.cholesky_inverse(torch.linalg.cholesky(damped))

            baseline = _timed(with_torch, repeat)
        else:
            baseline = float("nan")
        rows_out.append({"kernel": "cholesky", "n": n, "batch": batch, "ours_ms": kernel * 1e3,
                         "ours_call_ms": kernel_call * 1e3, "cusolver_route_ms": solver * 1e3,
                         "baseline_ms": baseline * 1e3,
                         "ratio": kernel / baseline if has_torch else float("nan"), "aim": "<= 0.5",
                         "note": "" if has_torch else "torch without CUDA: no baseline"})
    return rows_out, last_winning_size(sizes, wins)


def _copy_row(kernel: str, elements: int, fn: Callable[[], Any], moved: int,
              repeat: int) -> dict[str, Any]:
    """One table row: ``fn`` (which moves ``moved`` bytes) against a device copy of as many."""
    import cupy

    ours = _timed(fn, repeat)
    ours_call = _call_timed(fn, repeat)
    src = cupy.empty(moved // 2, dtype=np.uint8)
    dst = cupy.empty_like(src)
    copy = _timed(lambda: dst.__setitem__(Ellipsis, src), repeat)
    return {"kernel": kernel, "elements": elements, "ours_ms": ours * 1e3,
            "ours_call_ms": ours_call * 1e3, "baseline_ms": copy * 1e3,
            "ours_GBps": moved / ours / 1e9, "baseline_GBps": moved / copy / 1e9,
            "ratio": copy / ours, "aim": ">= 0.8"}


def bench_packing(repeat: int) -> list[dict[str, Any]]:
    """Pack / unpack of all ResNet-50 factors vs a device-to-device copy of the same bytes."""
    import cupy

    from hpckfac import ops

    sizes = [d for layer in shapes.resnet50().kron for d in (layer.d_A, layer.d_G)]
    rng = np.random.default_rng(1)
    mats = [cupy.asarray(rng.standard_normal((n, n)).astype(np.float32)) for n in sizes]
    total = int(ops.packed_offsets(sizes)[-1])
    dense = sum(n * n for n in sizes)
    rows_out = []
    for dtype in ("float32", "float16"):
        out = cupy.empty(total, dtype=dtype)
        # pack reads fp32 upper triangles and writes the buffer; unpack reads it, writes dense fp32
        rows_out.append(_copy_row(f"pack fp32->{dtype}", total,
                                  lambda: ops.pack_sym(mats, out=out),
                                  total * (4 + out.itemsize), repeat))
        rows_out.append(_copy_row(f"unpack {dtype}->fp32", dense,
                                  lambda: ops.unpack_sym(out, sizes, dtype=np.float32),
                                  total * out.itemsize + dense * 4, repeat))
    return rows_out


def device_info() -> dict[str, Any]:
    """GPU name, compute capability, CUDA runtime/driver versions, CuPy version."""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    return {"gpu": props["name"].decode(), "compute_capability": cupy.cuda.Device().compute_capability,
            "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
            "cuda_driver": cupy.cuda.runtime.driverGetVersion(), "cupy": cupy.__version__}


def main(argv: list[str] | None = None, prog: str = "python -m hpckfac.bench kernels") -> int:
    """Run the kernel benchmarks; print tables, optionally write JSON."""
    parser = RankParser(prog=prog, description=__doc__.splitlines()[0],
                    formatter_class=HelpFormatter)
    parser.add_argument("--repeat", type=int, default=20, help="timed batches per case (median reported)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--only", choices=("factor", "cholesky", "pack"), help="run one group (default: all three)")
    args = parser.parse_everywhere(argv)
    one_process(parser)
    check_outputs(parser, files=[("--json", args.json)])
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    problem = _gpu_problem()
    if problem:
        print(f"hpckfac.bench kernels needs a CUDA GPU: {problem}", file=sys.stderr)
        return 1

    info = device_info()
    print(f"# {info['gpu']} (sm_{info['compute_capability']}), CUDA runtime {info['cuda_runtime']}, "
          f"driver {info['cuda_driver']}, CuPy {info['cupy']}")
    results: dict[str, Any] = {"device": info}
    if args.only in (None, "factor"):
        results["factor"] = bench_factors(args.repeat)
        print(format_table(results["factor"], ["rows", "d", "dtype", "ours_ms", "ours_call_ms", "gemm_route_ms",
                                               "baseline_ms", "ratio", "gemm_ratio", "aim", "note"]))
        results["factor_crossover"], results["gemm_min_d"] = bench_factor_crossover(args.repeat)
        print(format_table(results["factor_crossover"], ["precision", "rows", "d", "kernel_ms", "gemm_route_ms",
                                                         "gemm/kernel"]))
        print("cuBLAS route faster from d = " + ", ".join(f"{d} ({p})" for p, d in results["gemm_min_d"].items())
              + " (hpckfac.ops.cuda.GEMM_MIN_D)")
    if args.only in (None, "cholesky"):
        results["cholesky"], crossover = bench_cholesky(args.repeat)
        results["cholesky_kernel_max_n"] = crossover
        print(format_table(results["cholesky"], ["n", "batch", "ours_ms", "ours_call_ms", "cusolver_route_ms",
                                                 "baseline_ms", "ratio", "aim", "note"]))
        print(f"kernel faster than the cuSOLVER route up to n = {crossover} "
              f"(hpckfac.ops.cuda.CHOLESKY_KERNEL_MAX_N)")
    if args.only in (None, "pack"):
        results["pack"] = bench_packing(args.repeat)
        print(format_table(results["pack"], ["kernel", "elements", "ours_ms", "ours_call_ms", "baseline_ms",
                                             "ours_GBps",
                                             "baseline_GBps", "ratio", "aim"]))
    if args.json:
        write_json(args.json, "kernels", {"repeat": args.repeat, "only": args.only}, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
