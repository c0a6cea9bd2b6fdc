// Unit-wise Fisher of BatchNorm's (gamma_c, beta_c) in two launches, straight from
// the layer input x and the output gradient g, both (N, C, T) with any strides.
//
// Example n's gradient of channel c is u = (sum_t g (x - mean_c) / s_c, sum_t g),
// s_c = sqrt(var_c + eps), mean and (biased) variance over n and t. With every
// input taken about a shift K_c (the channel's first value, so that the moments
// stay small when the mean is large against the spread), and Sx, Sxx, Sg, Sgx the
// sums over t of one row (n, c) of x - K_c, (x - K_c)^2, g and g (x - K_c):
//   mean - K = sum_n Sx / (N T),   var = sum_n Sxx / (N T) - (mean - K)^2,
//   sum_t g (x - mean) = Sgx - (mean - K) Sg,
// so one pass over x and g gives everything (bn_row_sums), and one thread per
// channel then forms u for every n and adds scale * sum_n u u^T, packed as
// (00, 01, 11), to the channel's three entries of `out` (bn_unit_fisher).
// Sums are in float64 whatever the input; the order of every sum is fixed (warp
// shuffles, a loop over n), so a run repeats its bits. The arithmetic is in
// host-and-device helpers, checked on the host by tests/test_kernels_compile.py.
#include "common.cuh"

namespace {
constexpr int WARP = 32;
}

namespace hk {

// Sums of one row about the shift: (x - K), (x - K)^2, g, g (x - K).
struct RowSums {
  double sx = 0.0, sxx = 0.0, sg = 0.0, sgx = 0.0;

  HK_HD void add(double x, double g, double shift) {
    const double d = x - shift;
    sx += d;
    sxx += d * d;
    sg += g;
    sgx += g * d;
  }
};

// scale * sum_n u u^T of one channel as (00, 01, 11), from its rows' sums:
// row n's (Sx, Sxx, Sg, Sgx) at sums[n * stride + 0..3]; count = N T.
HK_HD inline void channel_fisher(const double* sums, long long examples, long long stride, double count,
                                 double eps, double scale, double f[3]) {
  double sx = 0.0, sxx = 0.0;
  for (long long n = 0; n < examples; ++n) {
    sx += sums[n * stride];
    sxx += sums[n * stride + 1];
  }
  const double mean = sx / count;  // about the shift
  const double var = fmax(sxx / count - mean * mean, 0.0);
  const double inv_s = 1.0 / sqrt(var + eps);
  f[0] = f[1] = f[2] = 0.0;
  for (long long n = 0; n < examples; ++n) {
    const double* s = sums + n * stride;
    const double u0 = (s[3] - mean * s[2]) * inv_s, u1 = s[2];
    f[0] += u0 * u0;
    f[1] += u0 * u1;
    f[2] += u1 * u1;
  }
  for (int k = 0; k < 3; ++k) f[k] *= scale;
}

}  // namespace hk

// One warp per row (n, c), `rows` = N*C rows in (n, c) order; sums[4*row + k] =
// (Sx, Sxx, Sg, Sgx). Strides are in elements.
template <typename X, typename G>
__global__ void bn_row_sums(const X* __restrict__ x, const G* __restrict__ g, long long channels,
                            long long positions, long long xs_n, long long xs_c, long long xs_t,
                            long long gs_n, long long gs_c, long long gs_t, long long rows,
                            double* __restrict__ sums) {
  const int lane = threadIdx.x % WARP;
  const long long warps = static_cast<long long>(gridDim.x) * (blockDim.x / WARP);
  for (long long row = static_cast<long long>(blockIdx.x) * (blockDim.x / WARP) + threadIdx.x / WARP;
       row < rows; row += warps) {
    const long long n = row / channels, c = row % channels;
    const X* xr = x + n * xs_n + c * xs_c;
    const G* gr = g + n * gs_n + c * gs_c;
    const double shift = hk::convert<double>(x[c * xs_c]);  // x[0, c, 0]
    hk::RowSums r;
    for (long long t = lane; t < positions; t += WARP) {
      r.add(hk::convert<double>(xr[t * xs_t]), hk::convert<double>(gr[t * gs_t]), shift);
    }
    for (int offset = WARP / 2; offset > 0; offset /= 2) {
      r.sx += __shfl_down_sync(0xffffffffu, r.sx, offset);
      r.sxx += __shfl_down_sync(0xffffffffu, r.sxx, offset);
      r.sg += __shfl_down_sync(0xffffffffu, r.sg, offset);
      r.sgx += __shfl_down_sync(0xffffffffu, r.sgx, offset);
    }
    if (lane == 0) {
      double* s = sums + 4 * row;
      s[0] = r.sx;
      s[1] = r.sxx;
      s[2] = r.sg;
      s[3] = r.sgx;
    }
  }
}

// One thread per channel: out[3c + (0, 1, 2)] += scale * sum_n (u0 u0, u0 u1, u1 u1).
// Needs N T > 0 (the caller adds nothing otherwise).
template <typename S>
__global__ void bn_unit_fisher(const double* __restrict__ sums, long long examples, long long channels,
                               long long positions, double eps, double scale, S* __restrict__ out) {
  const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
  const double count = static_cast<double>(examples) * static_cast<double>(positions);
  for (long long c = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; c < channels; c += step) {
    double f[3];
    hk::channel_fisher(sums + 4 * c, examples, 4 * channels, count, eps, scale, f);
    S* o = out + 3 * c;
    for (int k = 0; k < 3; ++k) o[k] = hk::convert<S>(hk::convert<double>(o[k]) + f[k]);
  }
}
