// __half and __nv_bfloat16 for the emulator: storage types with the CUDA
// conversion intrinsics the kernels call, rounding to nearest even in one step
// from float or double (subnormals, overflow to infinity), as NumPy and
// ml_dtypes do.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace simt {

// `v` rounded to a binary16-layout format with `mant` fraction bits and exponent
// `bias` (float16: 10, 15; bfloat16: 7, 127). Every scaling below is by a power
// of two and exact, so nearbyint (round half to even) is the only rounding.
inline std::uint16_t round_to_16(double v, int mant, int bias) {
  const std::uint16_t sign = std::signbit(v) ? 0x8000 : 0;
  const int top = 2 * bias + 1;  // all-ones exponent field
  if (std::isnan(v)) return sign | (top << mant) | (1 << (mant - 1));
  const double a = std::fabs(v);
  if (std::isinf(a)) return sign | (top << mant);
  const int emin = 1 - bias;
  if (a < std::ldexp(1.0, emin)) {  // subnormal (or rounds up to the smallest normal)
    return sign | static_cast<std::uint16_t>(std::nearbyint(std::ldexp(a, mant - emin)));
  }
  int e;
  std::frexp(a, &e);
  int exponent = e - 1;  // a in [2^exponent, 2^(exponent+1))
  double r = std::nearbyint(std::ldexp(a, mant - exponent));
  if (r == std::ldexp(1.0, mant + 1)) {
    ++exponent;
    r = std::ldexp(1.0, mant);
  }
  if (exponent + bias >= top) return sign | (top << mant);
  return sign | ((exponent + bias) << mant) | (static_cast<std::uint16_t>(r) - (1 << mant));
}

inline double widen_16(std::uint16_t bits, int mant, int bias) {
  const int top = 2 * bias + 1;
  const int field = (bits >> mant) & top;
  const int fraction = bits & ((1 << mant) - 1);
  double a;
  if (field == top) a = fraction ? NAN : INFINITY;
  else if (field == 0) a = std::ldexp(fraction, 1 - bias - mant);
  else a = std::ldexp(fraction + (1 << mant), field - bias - mant);
  return (bits & 0x8000) ? -a : a;
}

}  // namespace simt

struct __half {
  static constexpr const char* simt_code = "h";
  std::uint16_t bits;
};
struct __nv_bfloat16 {
  static constexpr const char* simt_code = "b";
  std::uint16_t bits;
};

inline __half __double2half(double v) { return {simt::round_to_16(v, 10, 15)}; }
inline __half __float2half_rn(float v) { return {simt::round_to_16(v, 10, 15)}; }
inline __half __float2half(float v) { return __float2half_rn(v); }
inline float __half2float(__half v) { return static_cast<float>(simt::widen_16(v.bits, 10, 15)); }
inline __nv_bfloat16 __double2bfloat16(double v) { return {simt::round_to_16(v, 7, 127)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return {simt::round_to_16(v, 7, 127)}; }
inline __nv_bfloat16 __float2bfloat16(float v) { return __float2bfloat16_rn(v); }
inline float __bfloat162float(__nv_bfloat16 v) { return static_cast<float>(simt::widen_16(v.bits, 7, 127)); }
