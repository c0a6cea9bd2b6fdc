// Emulator stand-in for CUDA's nvcuda::wmma (tests/simt), 16x16x16 shapes only.
//
// Every lane holds the whole tile as float (half and bfloat16 values are exact in
// float) and does the whole operation itself; each call is a warp collective
// (every lane of the warp must make it, as on the GPU) and checks the alignment
// rules of load/store_matrix_sync (32-byte pointer, ldm a multiple of 16 bytes).
// mma_sync accumulates in float in k order: tensor cores may add in another order
// (or with more internal precision), so results agree to rounding, not bit for bit.
#pragma once
#include <cstdint>
#include <string>
#include <type_traits>

#include "simt.h"
#include "simt_half.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only 16x16x16 fragments are emulated");
  static constexpr int num_elements = 256;
  float tile[16][16];  // (row, column) of the operand or accumulator
};

namespace detail {

inline float value(float v) { return v; }
inline float value(__half v) { return __half2float(v); }
inline float value(__nv_bfloat16 v) { return __bfloat162float(v); }

inline void collective(const char* what) {
  simt::check_full_warp(0xffffffffu, what);
  simt::wait(simt::State::warp_wait, what, 0);  // `what` tells collectives apart
}

inline void memory_collective(const void* p, unsigned ldm, size_t element, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0)
    simt::fail(std::string(what) + ": pointer not 32-byte aligned");
  if ((ldm * element) % 16 != 0) simt::fail(std::string(what) + ": ldm not a multiple of 16 bytes");
  collective(what);
}

}  // namespace detail

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_void_v<Layout>, "operand fragments need a layout");
  detail::memory_collective(p, ldm, sizeof(T), "wmma::load_matrix_sync");
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.tile[r][c] = detail::value(std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r]);
}

template <typename T>
void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& f, const T* p, unsigned ldm, layout_t layout) {
  detail::memory_collective(p, ldm, sizeof(T), "wmma::load_matrix_sync");
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.tile[r][c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}

template <typename T>
void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ldm, layout_t layout) {
  detail::memory_collective(p, ldm, sizeof(T), "wmma::store_matrix_sync");
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.tile[r][c];
}

template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, T v) {
  for (auto& row : f.tile)
    for (float& e : row) e = detail::value(v);
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  detail::collective("wmma::mma_sync");
  float out[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float acc = c.tile[i][j];
      for (int k = 0; k < 16; ++k) acc += a.tile[i][k] * b.tile[k][j];
      out[i][j] = acc;
    }
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) d.tile[i][j] = out[i][j];
}

}  // namespace wmma
}  // namespace nvcuda
