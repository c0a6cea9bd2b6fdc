"""``python -m hpckfac.bench conv``: both routes of a convolution's A factor, per input shape."""
import json

import pytest
from hpckfac.bench import conv
from hpckfac.layers.conv_lags import _work, lags_pay


def test_conv_benchmark_times_both_routes_and_compares_them(tmp_path, capsys):
    out = tmp_path / "conv.json"
    assert conv.main(["--shapes", "16:16:16x16,2:3:9,2:8:2x2", "--repeat", "2", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "fft_ms" in table and "16x16x16x16" in table
    results = json.loads(out.read_text())["results"]
    assert [r["shape"] for r in results] == ["16x16x16x16", "2x3x9", "2x8x2x2"]
    for r, (n, channels, size) in zip(results, [(16, 16, (16, 16)), (2, 3, (9,)), (2, 8, (2, 2))]):
        ndim = len(size)
        geometry = (size, (3,) * ndim, (1,) * ndim, (1,) * ndim)
        fft, gemm, _ = _work(n, channels, *geometry)
        want = ("fft" if fft < gemm else "gemm") if lags_pay(n, channels, *geometry) else "patches"
        assert r["route"] == want
        assert min(r["patches_ms"], r["fft_ms"], r["gemm_ms"]) > 0
        assert r["best/patches"] == pytest.approx(min(r["fft_ms"], r["gemm_ms"], r["patches_ms"]) / r["patches_ms"])
        assert 0 <= r["max_difference"] < 1e-5  # float32 rounding, not a different factor
    assert results[0]["route"] in ("fft", "gemm") and results[2]["route"] == "patches"
    # The table shows the difference itself, not 0.000.
    shown = [line.split()[-1] for line in table.splitlines()[2:]]
    assert shown == [f"{r['max_difference']:.1e}" for r in results]


def test_a_wider_kernel_is_padded_to_keep_the_size():
    """--kernel 5 is "same" padded by 2: the route is the one chosen for that geometry, which at
    padding 1 would differ (fewer positions per lag make the lags pay off)."""
    n, channels, size = 64, 8, (8, 8)
    geometry = ((5, 5), (2, 2), (1, 1))
    assert lags_pay(n, channels, size, *geometry) != lags_pay(n, channels, size, (5, 5), (1, 1), (1, 1))
    fft, gemm, _ = _work(n, channels, size, *geometry)
    want = ("fft" if fft < gemm else "gemm") if lags_pay(n, channels, size, *geometry) else "patches"
    assert conv.measure(n, channels, size, 5, 1)["route"] == want


@pytest.mark.parametrize("method", ["fft", "gemm"])
def test_the_difference_is_the_larger_of_both_routes(monkeypatch, method):
    """One route's factor off by 0.5 in one entry: the reported difference is 0.5 over the patch
    factor's largest diagonal entry, whichever route it is."""
    import numpy as np

    from hpckfac.layers import ConvBlock, conv_lags
    from hpckfac.layers.conv import SpatialKronBlock

    exact = conv_lags.lagged_a_factor

    def off(x, kernel, padding, dilation, bias, scale, packed, route):
        factor = exact(x, kernel, padding, dilation, bias, scale, packed, route)
        if route == method and not packed:
            factor = factor.copy()
            factor[1, 0] += 0.5
        return factor

    monkeypatch.setattr(conv_lags, "lagged_a_factor", off)
    row = conv.measure(2, 3, (6, 6), 3, 1)
    x = np.maximum(np.random.default_rng(0).standard_normal((2, 3, 6, 6)), 0).astype(np.float32)
    block = ConvBlock("conv", 3, 3, (3, 3), (1, 1), (1, 1), (1, 1), False)
    assert row["max_difference"] == pytest.approx(0.5 / np.diag(SpatialKronBlock.a_factor(block, x)).max(), rel=1e-3)


@pytest.mark.parametrize("argv,message", [(["--kernel", "4"], "--kernel: must be odd and >= 3, got 4"),
                                          (["--kernel", "1"], "--kernel: must be odd and >= 3, got 1"),
                                          (["--repeat", "0"], "--repeat: must be >= 1, got 0")])
def test_bad_kernels_and_repeats_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        conv.main(["--shapes", "1:1:4", *argv])


def test_shapes_parse_and_reject():
    assert conv.parse_shapes("64:16:32x32, 2:3:5x6x7") == [(64, 16, (32, 32)), (2, 3, (5, 6, 7))]
    for bad in ("64:16", "a:1:2", "1:1:2x2x2x2", "0:1:4", "1:1:4x0"):
        with pytest.raises(ValueError, match="--shapes"):
            conv.parse_shapes(bad)
