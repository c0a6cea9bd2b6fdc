// Batched symmetric packing (layout: docs/numerics.md, "Packing layout").
//
// pack_sym<S, D>: the upper triangles of `count` matrices of element type S,
// each anywhere in device memory with its own strides, into one buffer of D.
// unpack_sym<S, D>: the packed buffer back to dense symmetric matrices stored
// one after another. One launch each for any number of matrices.
//
// Both are memory-bound copies, so the work is cut so that every warp reads
// and writes runs of consecutive addresses and the index arithmetic is paid
// once per row or tile, not once per element.
#include "common.cuh"

namespace {
constexpr int WARP = 32;
constexpr int UNPACK_TILE = 32;
constexpr int UNPACK_ROWS = 8;  // threads per block: UNPACK_TILE x UNPACK_ROWS
constexpr int UNROLL = 4;       // pack: elements per lane loaded before any is stored
}  // namespace

// One warp per row of one matrix (grid-stride over the rows of all matrices):
// row i of matrix m is found by a binary search of `rowseg` (cumulative
// orders), and its upper part j = i..n-1 is one contiguous run in `out`,
// written by the lanes in order; with a row-major source the reads are
// contiguous too.
//   ptrs[m]             address of matrix m's element (0, 0)
//   strides[2m], [2m+1] row and column stride in elements
//   sizes[m]            order n of matrix m
//   rowseg[0..count]    cumulative orders: row i of matrix m is warp rowseg[m] + i
//   dst[m]              where matrix m starts in `out`
template <typename S, typename D>
__global__ void pack_sym(const unsigned long long* __restrict__ ptrs,
                         const long long* __restrict__ strides,
                         const long long* __restrict__ sizes,
                         const long long* __restrict__ rowseg,
                         const long long* __restrict__ dst,
                         int count, D* __restrict__ out) {
  const long long total = rowseg[count];
  const int lane = threadIdx.x % WARP;
  const long long warps = static_cast<long long>(gridDim.x) * (blockDim.x / WARP);
  for (long long w = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / WARP; w < total;
       w += warps) {
    const int m = hk::find_segment(rowseg, count, w);
    const long long n = sizes[m];
    const long long i = w - rowseg[m];
    const long long cs = strides[2 * m + 1];
    const S* row = reinterpret_cast<const S*>(ptrs[m]) + i * strides[2 * m];
    D* target = out + dst[m] + hk::tri_row_start(i, n) - i;  // target[j] holds (i, j)
    // UNROLL loads in flight per lane before their stores: a copy is bound by memory latency
    // unless each thread keeps several requests outstanding.
    for (long long j0 = i + lane; j0 < n; j0 += UNROLL * WARP) {
      S v[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const long long j = j0 + u * WARP;
        if (j < n) v[u] = row[j * cs];
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const long long j = j0 + u * WARP;
        if (j < n) target[j] = hk::convert<D>(v[u]);
      }
    }
  }
}

// One block per 32x32 tile (bi, bj), bi <= bj, of one matrix's upper tile
// triangle (grid-stride over the tiles of all matrices). The block reads the
// tile's packed rows (contiguous runs), writes it to (bi, bj) row by row, and,
// off the diagonal, writes its transpose to (bj, bi) row by row through shared
// memory, so neither the reads nor the writes are strided.
//   sizes[m]           order n of matrix m
//   packed[m]          where matrix m starts in `buffer`
//   dense[m]           where matrix m starts in `out` (cumulative n_m^2)
//   tiles[0..count]    cumulative tile-triangle sizes nt_m (nt_m + 1) / 2, nt_m = ceil(n_m / 32)
template <typename S, typename D>
__global__ void unpack_sym(const S* __restrict__ buffer,
                           const long long* __restrict__ sizes,
                           const long long* __restrict__ packed,
                           const long long* __restrict__ dense,
                           const long long* __restrict__ tiles,
                           int count, D* __restrict__ out) {
  __shared__ D tile[UNPACK_TILE][UNPACK_TILE + 1];
  const long long total = tiles[count];
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (long long b = blockIdx.x; b < total; b += gridDim.x) {
    const int m = hk::find_segment(tiles, count, b);
    const long long n = sizes[m];
    const long long nt = (n + UNPACK_TILE - 1) / UNPACK_TILE;
    const long long t = b - tiles[m];
    const long long bi = hk::tri_row(t, nt);
    const long long bj = bi + t - hk::tri_row_start(bi, nt);
    const S* src = buffer + packed[m];
    D* dst = out + dense[m];
    const long long j = bj * UNPACK_TILE + tx;
    __syncthreads();  // the previous tile's transpose has been read
    // All of a thread's loads first, then its stores (several requests in flight, as in pack).
    D v[UNPACK_TILE / UNPACK_ROWS];
#pragma unroll
    for (int u = 0; u < UNPACK_TILE / UNPACK_ROWS; ++u) {
      const long long i = bi * UNPACK_TILE + ty + u * UNPACK_ROWS;
      if (i < n && j < n) {
        // Below the diagonal (diagonal tiles only) the element is the mirror's.
        const long long at = i <= j ? hk::tri_row_start(i, n) + (j - i) : hk::tri_row_start(j, n) + (i - j);
        v[u] = hk::convert<D>(src[at]);
      }
    }
#pragma unroll
    for (int u = 0; u < UNPACK_TILE / UNPACK_ROWS; ++u) {
      const int r = ty + u * UNPACK_ROWS;
      const long long i = bi * UNPACK_TILE + r;
      if (i < n && j < n) {
        dst[i * n + j] = v[u];
        tile[r][tx] = v[u];
      }
    }
    if (bi == bj) continue;  // block-uniform: no thread skips a barrier the others reach
    __syncthreads();
    const long long col = bi * UNPACK_TILE + tx;
    for (int r = ty; r < UNPACK_TILE; r += UNPACK_ROWS) {
      const long long row = bj * UNPACK_TILE + r;
      if (row < n && col < n) dst[row * n + col] = tile[tx][r];
    }
  }
}
