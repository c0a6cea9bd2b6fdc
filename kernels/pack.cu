// Batched symmetric packing (layout: docs/numerics.md, "Packing layout").
//
// pack_sym<S, D>: the upper triangles of `count` matrices of element type S,
// each anywhere in device memory with its own strides, into one buffer of D.
// unpack_sym<S, D>: the packed buffer back to dense symmetric matrices stored
// one after another. One launch each for any number of matrices.
#include "common.cuh"

// One thread per packed element (grid-stride). Matrix m is found by a binary
// search of `seg` (cumulative packed lengths of this launch's matrices) and
// lands at out[dst[m] + k]; its (i, j) follow from the row starts of the
// triangle. Writes are contiguous and reads run along the rows of the source.
//   ptrs[m]             address of matrix m's element (0, 0)
//   strides[2m], [2m+1] row and column stride in elements
//   sizes[m]            order n of matrix m
//   seg[0..count]       seg[m+1] - seg[m] = n_m (n_m + 1) / 2
//   dst[m]              where matrix m starts in `out`
template <typename S, typename D>
__global__ void pack_sym(const unsigned long long* __restrict__ ptrs,
                         const long long* __restrict__ strides,
                         const long long* __restrict__ sizes,
                         const long long* __restrict__ seg,
                         const long long* __restrict__ dst,
                         int count, D* __restrict__ out) {
  const long long total = seg[count];
  const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long g = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; g < total; g += step) {
    const int m = hk::find_segment(seg, count, g);
    const long long n = sizes[m];
    const long long k = g - seg[m];
    const long long i = hk::tri_row(k, n);
    const long long j = i + k - hk::tri_row_start(i, n);
    const S* src = reinterpret_cast<const S*>(ptrs[m]);
    out[dst[m] + k] = hk::convert<D>(src[i * strides[2 * m] + j * strides[2 * m + 1]]);
  }
}

// One thread per dense output element (grid-stride), so writes are contiguous;
// element (i, j) reads the packed (min(i,j), max(i,j)).
//   sizes[m]           order n of matrix m
//   packed[m]          where matrix m starts in `buffer`
//   dense[0..count]    where matrix m starts in `out` (cumulative n_m^2)
template <typename S, typename D>
__global__ void unpack_sym(const S* __restrict__ buffer,
                           const long long* __restrict__ sizes,
                           const long long* __restrict__ packed,
                           const long long* __restrict__ dense,
                           int count, D* __restrict__ out) {
  const long long total = dense[count];
  const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long g = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; g < total; g += step) {
    const int m = hk::find_segment(dense, count, g);
    const long long n = sizes[m];
    const long long k = g - dense[m];
    const long long r = k / n, c = k - r * n;
    const long long i = r < c ? r : c, j = r < c ? c : r;
    out[g] = hk::convert<D>(buffer[packed[m] + hk::tri_row_start(i, n) + (j - i)]);
  }
}
