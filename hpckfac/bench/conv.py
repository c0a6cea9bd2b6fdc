"""A convolution's A factor on the CPU: the patch Gram against the lag-product routes.

``python -m hpckfac.bench conv [--shapes N:C:HxW,...] [--kernel K] [--repeat R] [--json PATH]``

For every input shape (3x3 "same" convolutions by default, stride 1, float32 inputs
after a ReLU) the median time of the packed factor from kernel-major patches
(``SpatialKronBlock.a_factor``) and from lag products (``hpckfac.layers.conv_lags``)
through the FFT and one GEMM per lag, the route ``ConvBlock.a_factor`` takes, and the
largest difference between a lag factor and the patch factor relative to the largest
diagonal entry. Run with the process's own thread settings, as training runs.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from hpckfac.bench.report import check_outputs, median, one_process, progress, time_calls, write_json
from hpckfac.tables import format_table
from hpckfac.cli import HelpFormatter, RankParser

# ResNet-20's stride-1 layers at batch 64, narrow and tiny maps, and two ResNet-50 shapes at batch 32.
DEFAULT_SHAPES = ("64:16:32x32,64:32:16x16,64:64:8x8,64:3:32x32,64:128:4x4,64:64:3x3,"
                  "32:256:14x14,32:64:56x56")


def parse_shapes(text: str) -> list[tuple[int, int, tuple[int, ...]]]:
    """``"N:C:HxW,..."`` as ``(N, C, spatial)`` triples (1-3 spatial dimensions)."""
    shapes = []
    for item in text.split(","):
        try:
            n, c, spatial = item.strip().split(":")
            shape = (int(n), int(c), tuple(int(s) for s in spatial.split("x")))
        except ValueError:
            raise ValueError(f"--shapes: expected N:C:HxW, got {item!r}") from None
        if min(shape[0], shape[1], *shape[2]) < 1 or not 1 <= len(shape[2]) <= 3:
            raise ValueError(f"--shapes: sizes must be >= 1 with 1-3 spatial dimensions, got {item!r}")
        shapes.append(shape)
    return shapes


def measure(n: int, channels: int, spatial: tuple[int, ...], kernel: int, repeat: int) -> dict[str, Any]:
    """Every route for one input shape: median ms, the route taken and the largest difference."""
    from hpckfac.layers import ConvBlock
    from hpckfac.layers.conv import SpatialKronBlock
    from hpckfac.layers.conv_lags import lag_method, lagged_a_factor, lags_pay

    ndim = len(spatial)
    geometry = ((kernel,) * ndim, (kernel // 2,) * ndim, (1,) * ndim)
    x = np.maximum(np.random.default_rng(0).standard_normal((n, channels, *spatial)), 0).astype(np.float32)
    block = ConvBlock("conv", channels, channels, geometry[0], (1,) * ndim, geometry[1], geometry[2], False)
    row: dict[str, Any] = {"shape": f"{n}x{channels}x{'x'.join(map(str, spatial))}", "kernel": kernel,
                           "patches_ms": median(time_calls(partial(SpatialKronBlock.a_factor, block, x, packed=True),
                                                           repeat)) * 1e3}
    want = SpatialKronBlock.a_factor(block, x)
    scale = np.diag(want).max()
    difference = 0.0
    for method in ("fft", "gemm"):
        row[f"{method}_ms"] = median(time_calls(partial(lagged_a_factor, x, *geometry, False, 1.0, True, method),
                                                repeat)) * 1e3
        got = lagged_a_factor(x, *geometry, False, 1.0, False, method)
        difference = max(difference, float(np.abs(got - want).max() / scale) if scale else 0.0)
    pays = lags_pay(n, channels, spatial, *geometry)
    row["route"] = lag_method(n, channels, spatial, *geometry) if pays else "patches"
    row["best/patches"] = min(row["fft_ms"], row["gemm_ms"], row["patches_ms"]) / row["patches_ms"]
    row["max_difference"] = difference
    return row


def main(argv: list[str] | None = None, prog: str = "python -m hpckfac.bench conv") -> int:
    """Time both routes for every shape; print a table, optionally write JSON."""
    parser = RankParser(prog=prog, description=__doc__.splitlines()[0],
                    formatter_class=HelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="inputs as N:C:HxW, comma-separated")
    parser.add_argument("--kernel", type=int, default=3, help="kernel size in every dimension, odd ('same' padding)")
    parser.add_argument("--repeat", type=int, default=15, help="timed calls per route (median reported)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_everywhere(argv)
    one_process(parser)
    check_outputs(parser, files=[("--json", args.json)])
    if args.repeat < 1:
        raise ValueError(f"--repeat: must be >= 1, got {args.repeat}")
    if args.kernel < 3 or args.kernel % 2 == 0:
        raise ValueError(f"--kernel: must be odd and >= 3, got {args.kernel}")
    results = [measure(n, c, spatial, args.kernel, args.repeat)
               for n, c, spatial in progress(parse_shapes(args.shapes), "shapes")]
    # The difference is float32 rounding, ~1e-7: three decimals would show 0.000.
    print(format_table([dict(r, max_difference=f"{r['max_difference']:.1e}") for r in results],
                       ["shape", "kernel", "patches_ms", "fft_ms", "gemm_ms", "route", "best/patches", "max_difference"]))
    if args.json:
        write_json(args.json, "conv", {"shapes": args.shapes, "kernel": args.kernel, "repeat": args.repeat},
                   results)
    return 0
