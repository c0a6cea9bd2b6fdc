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


def test_shapes_parse_and_reject():
    assert conv.parse_shapes("64:16:32x32, 2:3:5x6x7") == [(64, 16, (32, 32)), (2, 3, (5, 6, 7))]
    for bad in ("64:16", "a:1:2", "1:1:2x2x2x2", "0:1:4"):
        with pytest.raises(ValueError, match="--shapes"):
            conv.parse_shapes(bad)
