// Unit-wise Fisher of BatchNorm's (gamma_c, beta_c) in two launches, straight from
// the layer input x and the output gradient g, both (N, C, T) with any strides.
//
// Example n's gradient of channel c is u = (sum_t g (x - mean_c) / s_c, sum_t g),
// s_c = sqrt(var_c + eps), mean and (biased) variance over n and t. Writing
// Sx, Sxx, Sg, Sgx for the sums over t of one row (n, c):
//   sum_t g (x - mean) = Sgx - mean * Sg,   var = sum_n Sxx / (N T) - mean^2,
// so one pass over x and g gives everything (bn_row_sums), and one thread per
// channel then forms u for every n and adds scale * sum_n u u^T, packed as
// (00, 01, 11), to the channel's three entries of `out` (bn_unit_fisher).
// Sums are in float64 whatever the input (the variance as a difference of
// moments needs it); the order of every sum is fixed (warp shuffles, a loop
// over n), so a run repeats its bits.
#include "common.cuh"

namespace {
constexpr int WARP = 32;
}

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
    double sx = 0.0, sxx = 0.0, sg = 0.0, sgx = 0.0;
    for (long long t = lane; t < positions; t += WARP) {
      const double xv = hk::convert<double>(xr[t * xs_t]);
      const double gv = hk::convert<double>(gr[t * gs_t]);
      sx += xv;
      sxx += xv * xv;
      sg += gv;
      sgx += gv * xv;
    }
    for (int offset = WARP / 2; offset > 0; offset /= 2) {
      sx += __shfl_down_sync(0xffffffffu, sx, offset);
      sxx += __shfl_down_sync(0xffffffffu, sxx, offset);
      sg += __shfl_down_sync(0xffffffffu, sg, offset);
      sgx += __shfl_down_sync(0xffffffffu, sgx, offset);
    }
    if (lane == 0) {
      double* s = sums + 4 * row;
      s[0] = sx;
      s[1] = sxx;
      s[2] = sg;
      s[3] = sgx;
    }
  }
}

// One thread per channel: out[3c + (0, 1, 2)] += scale * sum_n (u0 u0, u0 u1, u1 u1).
template <typename S>
__global__ void bn_unit_fisher(const double* __restrict__ sums, long long examples, long long channels,
                               long long positions, double eps, double scale, S* __restrict__ out) {
  const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
  const double count = static_cast<double>(examples) * static_cast<double>(positions);
  for (long long c = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; c < channels; c += step) {
    double sx = 0.0, sxx = 0.0;
    for (long long n = 0; n < examples; ++n) {
      sx += sums[4 * (n * channels + c)];
      sxx += sums[4 * (n * channels + c) + 1];
    }
    const double mean = sx / count;
    const double var = fmax(sxx / count - mean * mean, 0.0);
    const double inv_s = 1.0 / sqrt(var + eps);
    double f00 = 0.0, f01 = 0.0, f11 = 0.0;
    for (long long n = 0; n < examples; ++n) {
      const double* s = sums + 4 * (n * channels + c);
      const double u0 = (s[3] - mean * s[2]) * inv_s, u1 = s[2];
      f00 += u0 * u0;
      f01 += u0 * u1;
      f11 += u1 * u1;
    }
    S* o = out + 3 * c;
    o[0] = hk::convert<S>(static_cast<double>(o[0]) + scale * f00);
    o[1] = hk::convert<S>(static_cast<double>(o[1]) + scale * f01);
    o[2] = hk::convert<S>(static_cast<double>(o[2]) + scale * f11);
  }
}
