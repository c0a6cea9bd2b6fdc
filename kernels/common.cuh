// Helpers shared by hpckfac's kernels: element conversions and packed-triangle
// index arithmetic. Included by every kernel source.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// Host and device, so that the index arithmetic is unit-tested on the host
// (tests/test_kernels_compile.py) where no GPU exists.
#define HK_HD __host__ __device__

namespace hk {

// float <-> double without the flush to zero of -ftz=true, which CuPy passes to NVRTC
// for every module: it turns the casts into cvt.ftz, so that float subnormals would
// widen to zero and double values in float's subnormal range narrow to zero, where
// NumPy keeps them.
HK_HD __forceinline__ double widen(float v) {
#ifdef __CUDA_ARCH__
  double d;
  asm("cvt.f64.f32 %0, %1;" : "=d"(d) : "f"(v));
  return d;
#else
  return static_cast<double>(v);
#endif
}

HK_HD __forceinline__ float narrow(double v) {
#ifdef __CUDA_ARCH__
  float f;
  asm("cvt.rn.f32.f64 %0, %1;" : "=f"(f) : "d"(v));
  return f;
#else
  return static_cast<float>(v);
#endif
}

// Value conversions between float64/float32/float16/bfloat16 with one rounding
// (round to nearest even), as NumPy's astype does, subnormals included.
template <typename D> struct Convert;
template <> struct Convert<double> {
  HK_HD static double from(double v) { return v; }
  HK_HD static double from(float v) { return widen(v); }
  HK_HD static double from(__half v) { return widen(__half2float(v)); }
  HK_HD static double from(__nv_bfloat16 v) { return widen(__bfloat162float(v)); }
};
template <> struct Convert<float> {
  HK_HD static float from(double v) { return narrow(v); }
  HK_HD static float from(float v) { return v; }
  HK_HD static float from(__half v) { return __half2float(v); }
  HK_HD static float from(__nv_bfloat16 v) { return __bfloat162float(v); }
};
template <> struct Convert<__half> {
  HK_HD static __half from(double v) { return __double2half(v); }
  HK_HD static __half from(float v) { return __float2half_rn(v); }
  HK_HD static __half from(__half v) { return v; }
  // bfloat16 -> float is exact, so this rounds once.
  HK_HD static __half from(__nv_bfloat16 v) { return __float2half_rn(__bfloat162float(v)); }
};
template <> struct Convert<__nv_bfloat16> {
  HK_HD static __nv_bfloat16 from(double v) { return __double2bfloat16(v); }
  HK_HD static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
  HK_HD static __nv_bfloat16 from(__half v) { return __float2bfloat16_rn(__half2float(v)); }
  HK_HD static __nv_bfloat16 from(__nv_bfloat16 v) { return v; }
};

template <typename D, typename S>
HK_HD __forceinline__ D convert(S v) { return Convert<D>::from(v); }

// Start of row i of an n x n upper triangle packed row by row.
HK_HD __forceinline__ long long tri_row_start(long long i, long long n) {
  return i * n - i * (i - 1) / 2;
}

// Row of packed element k (0 <= k < n(n+1)/2): the largest i with
// tri_row_start(i, n) <= k. The closed form in double precision is exact to
// within one row for any n that fits in memory; the two loops correct it.
HK_HD __forceinline__ long long tri_row(long long k, long long n) {
  const double b = 2.0 * n + 1.0;
  long long i = static_cast<long long>((b - sqrt(b * b - 8.0 * static_cast<double>(k))) * 0.5);
  if (i < 0) i = 0;
  if (i > n - 1) i = n - 1;
  while (i > 0 && tri_row_start(i, n) > k) --i;
  while (i + 1 < n && tri_row_start(i + 1, n) <= k) ++i;
  return i;
}

// Index m with offsets[m] <= g < offsets[m + 1] for a non-decreasing table of
// count + 1 entries (empty segments are skipped).
HK_HD __forceinline__ int find_segment(const long long* __restrict__ offsets, int count, long long g) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (offsets[mid] <= g) lo = mid; else hi = mid - 1;
  }
  return lo;
}

}  // namespace hk
