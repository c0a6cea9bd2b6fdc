"""Every CUDA source in kernels/ compiles with nvcc for sm_80 and sm_90, with the
options and template instantiations the runtime loader (hpckfac.ops.cuda_module)
asks NVRTC for. Needs nvcc only (no GPU); skipped where nvcc is absent."""
import re
import shutil
import subprocess

import pytest

from hpckfac.ops import cuda_module

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")

ARCHS = (80, 90)


def compile_ptx(tmp_path, file: str, arch: int, extra: tuple[str, ...] = ()) -> str:
    """PTX of ``file`` with the loader's instantiations for ``arch``, built by nvcc (with the
    ``extra`` options)."""
    expressions = cuda_module.name_expressions(file, arch)
    # Taking each kernel's address instantiates it, as NVRTC's name expressions do.
    unit = tmp_path / f"instantiate_{arch}_{file}"
    unit.write_text(
        f'#include "{file}"\n'
        "static void* const hpckfac_kernels[] = {\n"
        + "".join(f"    (void*)&{expr},\n" for expr in expressions)
        + "};\n"
        "void* hpckfac_kernel(int i) { return hpckfac_kernels[i]; }\n"
    )
    ptx = tmp_path / f"{file}.{arch}.ptx"
    include = [f"-I{cuda_module.include_dirs()[0]}"]
    cmd = [NVCC, *cuda_module.BASE_OPTIONS, *extra, *include, f"-arch=sm_{arch}", "--ptx",
           "-Werror", "all-warnings", str(unit), "-o", str(ptx)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
    return ptx.read_text()


def test_every_source_is_listed():
    for file in cuda_module.source_names():
        assert cuda_module.name_expressions(file, 90)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("file", cuda_module.source_names())
def test_source_compiles_with_loader_instantiations(tmp_path, file, arch):
    ptx = compile_ptx(tmp_path, file, arch)
    entries = re.findall(r"^\.(?:visible\s+)?\.entry\s+(\S+?)\(", ptx, flags=re.M)
    assert len(entries) == len(cuda_module.name_expressions(file, arch))
    if file == "syrk.cu":
        # The half-precision kernels really use tensor cores.
        assert "wmma.mma.sync" in ptx or "mma.sync" in ptx


@pytest.mark.parametrize("file", cuda_module.source_names())
def test_conversions_keep_subnormals_under_cupys_ftz(tmp_path, file):
    """CuPy compiles every module with -ftz=true, which makes plain float <-> double casts
    cvt.ftz (subnormals become zeros); the kernels convert through hk::widen / hk::narrow
    instead, so that packing and unpacking stay bit-exact with NumPy."""
    ptx = compile_ptx(tmp_path, file, 90, ("-ftz=true",))
    flushing = re.findall(r"cvt(?:\.rn)?\.ftz\.f(?:64\.f32|32\.f64)\b", ptx)
    assert not flushing, flushing


def test_tensor_core_paths_follow_architecture():
    assert cuda_module.syrk_name("float16", 90) == "syrk_wmma<__half>"
    assert cuda_module.syrk_name("bfloat16", 80) == "syrk_wmma<__nv_bfloat16>"
    assert cuda_module.syrk_name("bfloat16", 75) == "syrk_fma<__nv_bfloat16>"
    assert cuda_module.syrk_name("float32", 90) == "syrk_fma<float>"
    with pytest.raises(TypeError, match="int32"):
        cuda_module.ctype("int32")


# Host program exercising kernels/common.cuh (its helpers are __host__ __device__):
# packed-index arithmetic against brute force, then conversions of the values on
# stdin, printed as bit patterns for comparison with NumPy / ml_dtypes.
HOST_CHECK = r"""
#include <cstdio>
#include <cstring>
#include <vector>
#include "common.cuh"

static int check_triangle(long long n) {
  long long k = 0;
  for (long long i = 0; i < n; ++i)
    for (long long j = i; j < n; ++j, ++k) {
      const long long r = hk::tri_row(k, n);
      if (r != i || r + k - hk::tri_row_start(r, n) != j) {
        std::printf("triangle n=%lld k=%lld: row %lld, expected (%lld, %lld)\n", n, k, r, i, j);
        return 1;
      }
    }
  return 0;
}

static int check_row_edges(long long n) {
  for (long long i = 0; i < n; i += 1 + i / 7) {
    const long long first = hk::tri_row_start(i, n), last = hk::tri_row_start(i + 1, n) - 1;
    if (hk::tri_row(first, n) != i || hk::tri_row(last, n) != i) {
      std::printf("row edges n=%lld i=%lld\n", n, i);
      return 1;
    }
  }
  return 0;
}

static int check_segments() {
  const long long offsets[] = {0, 3, 3, 3, 9, 10, 10};  // empty segments included
  const int count = 6;
  for (long long g = 0; g < offsets[count]; ++g) {
    const int m = hk::find_segment(offsets, count, g);
    if (!(offsets[m] <= g && g < offsets[m + 1])) {
      std::printf("segment g=%lld -> %d\n", g, m);
      return 1;
    }
  }
  return 0;
}

template <typename T> static unsigned bits(T v) {
  unsigned out = 0;
  std::memcpy(&out, &v, sizeof(T));
  return out;
}

int main() {
  int bad = check_segments();
  for (long long n : {1, 2, 3, 31, 64, 65, 257, 1152, 4608}) bad |= check_triangle(n);
  for (long long n : {100000LL, 3000000LL}) bad |= check_row_edges(n);
  if (bad) return 1;
  double v;
  while (std::scanf("%la", &v) == 1) {
    const __half h = hk::convert<__half>(v);
    const __nv_bfloat16 b = hk::convert<__nv_bfloat16>(v);
    const float f = hk::convert<float>(v);
    std::printf("%u %u %u %u %u %u %u\n", bits(h), bits(b), bits(f),
                bits(hk::convert<__half>(f)), bits(hk::convert<__nv_bfloat16>(f)),
                bits(hk::convert<__nv_bfloat16>(h)), bits(hk::convert<__half>(b)));
  }
  return 0;
}
"""


def host_program(tmp_path, name: str, source: str):
    """``source`` (which includes kernel sources) built by nvcc as a host program; its path."""
    program = tmp_path / f"{name}.cu"
    program.write_text(source)
    binary = tmp_path / name
    cmd = [NVCC, *cuda_module.BASE_OPTIONS, f"-I{cuda_module.include_dirs()[0]}", str(program), "-o", str(binary)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return binary


def test_common_helpers_on_host(tmp_path):
    import ml_dtypes
    import numpy as np

    from hpckfac.ops.casting import cast

    binary = host_program(tmp_path, "host_check", HOST_CHECK)

    rng = np.random.default_rng(5)
    values = np.concatenate([
        rng.standard_normal(2000) * 10.0 ** rng.integers(-9, 9, 2000),
        # Ties and near-ties of float16/bfloat16 rounding, overflow, subnormals, specials. The
        # bfloat16 near-ties round onto a tie in float32 first: rounded twice they land one ulp off.
        [1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1 + 2.0 ** -8, 1 + 2.0 ** -11 + 2.0 ** -40, 65504.0, 65520.0,
         70000.0, 1 + 2.0 ** -8 + 2.0 ** -40, -(1 + 3 * 2.0 ** -8 - 2.0 ** -40), 2.0 ** -24, 2.0 ** -25,
         3 * 2.0 ** -26, 1e-300, 3.4e38, 3.5e38, 0.0, -0.0, np.inf, -np.inf],
    ])
    done = subprocess.run([str(binary)], input="\n".join(float(v).hex() for v in values),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
    got = np.array([line.split() for line in done.stdout.splitlines()], dtype=np.uint64)
    with np.errstate(over="ignore"):
        # float64 -> bfloat16 rounds once (the kernels' contract, and the CPU reference's ``cast``),
        # not through float32 as ml_dtypes' astype does.
        f16, bf16, f32 = values.astype(np.float16), cast(values, ml_dtypes.bfloat16), values.astype(np.float32)
        expected = [f16, bf16, f32, f32.astype(np.float16), f32.astype(ml_dtypes.bfloat16),
                    f16.astype(np.float32).astype(ml_dtypes.bfloat16), bf16.astype(np.float32).astype(np.float16)]
    for column, want in enumerate(expected):
        want_bits = want.view(np.uint16 if want.itemsize == 2 else np.uint32).astype(np.uint64)
        mismatch = np.flatnonzero(got[:, column] != want_bits)
        assert mismatch.size == 0, (column, values[mismatch[:5]], got[mismatch[:5], column], want_bits[mismatch[:5]])


BN_HOST_CHECK = r"""
#include <cstdio>
#include <vector>
#include "unitwise.cu"

// Reads N C T eps scale, then x and g (N, C, T) row-major as hex floats; prints the
// packed (00, 01, 11) Fisher of every channel from the kernels' own arithmetic.
int main() {
  long long n, c, t;
  double eps, scale;
  if (std::scanf("%lld %lld %lld %la %la", &n, &c, &t, &eps, &scale) != 5) return 1;
  std::vector<double> x(n * c * t), g(n * c * t), sums(4 * n * c);
  for (auto& v : x) if (std::scanf("%la", &v) != 1) return 1;
  for (auto& v : g) if (std::scanf("%la", &v) != 1) return 1;
  for (long long row = 0; row < n * c; ++row) {
    const double shift = x[(row % c) * t];  // x[0, c, 0], as bn_row_sums takes it
    hk::RowSums r;
    for (long long p = 0; p < t; ++p) r.add(x[row * t + p], g[row * t + p], shift);
    sums[4 * row] = r.sx;
    sums[4 * row + 1] = r.sxx;
    sums[4 * row + 2] = r.sg;
    sums[4 * row + 3] = r.sgx;
  }
  for (long long ch = 0; ch < c; ++ch) {
    double f[3];
    hk::channel_fisher(sums.data() + 4 * ch, n, 4 * c, static_cast<double>(n * t), eps, scale, f);
    std::printf("%a %a %a\n", f[0], f[1], f[2]);
  }
  return 0;
}
"""


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e5, -3e6])
def test_batchnorm_arithmetic_on_host(tmp_path, offset):
    """The BatchNorm kernels' arithmetic (shifted moments, per-channel Fisher) against the
    float64 formulas, including inputs whose mean is 10^3-10^6 times their spread."""
    import numpy as np

    from test_ops_batchnorm import oracle

    binary = host_program(tmp_path, "bn_check", BN_HOST_CHECK)

    rng = np.random.default_rng(7)
    shape, eps, scale = (6, 5, 11), 1e-5, 1 / 6
    x = offset + rng.uniform(0.5, 2.0, (1, 5, 1)) * rng.standard_normal(shape)
    g = rng.standard_normal(shape)
    text = f"{shape[0]} {shape[1]} {shape[2]} {eps.hex()} {scale.hex()}\n"
    text += "\n".join(float(v).hex() for v in np.concatenate([x.ravel(), g.ravel()]))
    done = subprocess.run([str(binary)], input=text, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
    got = np.array([float.fromhex(v) for v in done.stdout.split()])
    want = oracle(x, g, eps, scale)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * np.abs(want).max())
