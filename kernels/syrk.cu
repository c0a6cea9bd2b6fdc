// Factor accumulation  F = scale * X^T X  for X (rows, d) row-major, float32
// accumulation, only the upper-triangle 64x64 tiles of F computed.
//
// Tile t of the launch (blockIdx.x) is the pair (bi, bj), bi <= bj, of the
// nt x nt tile triangle, found like a packed element. Both operands of a tile
// are row segments of X (F[i][j] = sum_r X[r][i] X[r][j]), so every load is
// contiguous and no transpose is needed.
//
// Rows can be split over gridDim.y blocks (split-K) when the tile triangle
// alone cannot fill the GPU. With one split the tile kernel applies the
// epilogue itself; with more, each split writes its raw partial sums, in the
// packed layout, to workspace[split] and syrk_finish adds them in split order
// (deterministic, no atomics) and applies the epilogue.
//
// Epilogue of element (i, j), i <= j:  v = scale * acc;  a non-finite v sets
// *flag (when given); with `prev` the stored value is decay*prev + omd*v
// (omd = 1 - decay, both rounded to float32 on the host as NumPy does), else v.
// Packed output: F[i][j] at tri_row_start(i, d) + j - i. Dense output: both
// F[i][j] and F[j][i], each blended with its own `prev` element.
#include <mma.h>
#include "common.cuh"

namespace {

constexpr int TILE = 64;

struct Epilogue {
  float scale, decay, omd;
  long long d;
  int dense;
  float* out;
  const float* prev;
  int* flag;

  __device__ void put(long long at, float v) const {
    out[at] = prev ? __fadd_rn(__fmul_rn(decay, prev[at]), __fmul_rn(omd, v)) : v;
  }

  __device__ void store(long long i, long long j, float acc) const {
    const float v = __fmul_rn(scale, acc);
    if (flag && !isfinite(v)) atomicOr(flag, 1);
    if (!dense) {
      put(hk::tri_row_start(i, d) + (j - i), v);
    } else {
      put(i * d + j, v);
      if (i != j) put(j * d + i, v);
    }
  }
};

// Tile coordinates and row range of this block.
struct TileJob {
  long long i0, j0, r0, r1;
  __device__ TileJob(long long d, long long rows, long long rows_per_split) {
    const long long nt = (d + TILE - 1) / TILE;
    const long long t = blockIdx.x;
    const long long bi = hk::tri_row(t, nt);
    i0 = bi * TILE;
    j0 = (bi + t - hk::tri_row_start(bi, nt)) * TILE;
    r0 = static_cast<long long>(blockIdx.y) * rows_per_split;
    r1 = min(rows, r0 + rows_per_split);
  }
};

// Hand one accumulated element to the epilogue (single split) or to the
// split's workspace slice.
__device__ __forceinline__ void emit(const Epilogue& ep, float* workspace, long long i, long long j, float acc) {
  if (i > j || j >= ep.d) return;
  if (workspace == nullptr) {
    ep.store(i, j, acc);
  } else {
    const long long packed = ep.d * (ep.d + 1) / 2;
    workspace[blockIdx.y * packed + hk::tri_row_start(i, ep.d) + (j - i)] = acc;
  }
}

}  // namespace

// CUDA-core path (float32 input, and half inputs on GPUs without the needed
// tensor cores): 256 threads, each a 4x4 block of the 64x64 tile, K chunks of
// 16 rows staged in shared memory as float32.
template <typename T>
__global__ void __launch_bounds__(256)
syrk_fma(const T* __restrict__ x, long long rows, long long d, long long rows_per_split,
         float scale, float decay, float omd, int dense,
         float* __restrict__ out, const float* __restrict__ prev, int* __restrict__ flag,
         float* __restrict__ workspace) {
  constexpr int BK = 16;
  __shared__ __align__(16) float as[BK][TILE];
  __shared__ __align__(16) float bs[BK][TILE];
  const Epilogue ep{scale, decay, omd, d, dense, out, prev, flag};
  const TileJob job(d, rows, rows_per_split);
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  float acc[4][4] = {};

  for (long long r = job.r0; r < job.r1; r += BK) {
    for (int e = tid; e < BK * TILE; e += 256) {
      const int k = e / TILE, c = e % TILE;
      const long long row = r + k;
      const bool live = row < job.r1;
      as[k][c] = live && job.i0 + c < d ? hk::convert<float>(x[row * d + job.i0 + c]) : 0.0f;
      bs[k][c] = live && job.j0 + c < d ? hk::convert<float>(x[row * d + job.j0 + c]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      const float4 a = *reinterpret_cast<const float4*>(&as[k][ty * 4]);
      const float4 b = *reinterpret_cast<const float4*>(&bs[k][tx * 4]);
      const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int p = 0; p < 4; ++p)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[p][q] = fmaf(av[p], bv[q], acc[p][q]);
    }
    __syncthreads();
  }
  for (int p = 0; p < 4; ++p)
    for (int q = 0; q < 4; ++q)
      emit(ep, workspace, job.i0 + ty * 4 + p, job.j0 + tx * 4 + q, acc[p][q]);
}

// Tensor-core path for float16 (sm_70+) and bfloat16 (sm_80+) input: 4 warps
// in a 2x2 grid, each 32x32 of the tile as 2x2 wmma 16x16x16 fragments with
// float32 accumulators; K chunks of 32 rows. The A operand (X^T) is X's row
// segment read as column-major, the B operand the same segment row-major.
// vec != 0 (d % 8 == 0 and x 16-byte aligned) loads 8 elements per access.
template <typename T>
__global__ void __launch_bounds__(128)
syrk_wmma(const T* __restrict__ x, long long rows, long long d, long long rows_per_split,
          float scale, float decay, float omd, int dense,
          float* __restrict__ out, const float* __restrict__ prev, int* __restrict__ flag,
          float* __restrict__ workspace, int vec) {
  using namespace nvcuda;
  constexpr int BK = 32, LDS = TILE + 8, LDC = TILE + 4;
  __shared__ __align__(32) T as[BK][LDS];
  __shared__ __align__(32) T bs[BK][LDS];
  __shared__ __align__(32) float cs[TILE][LDC];
  const Epilogue ep{scale, decay, omd, d, dense, out, prev, flag};
  const TileJob job(d, rows, rows_per_split);
  const int tid = threadIdx.x, warp = tid / 32, wi = warp / 2, wj = warp % 2;
  // On a diagonal tile the warp below the diagonal holds only lower elements.
  const bool idle = job.i0 == job.j0 && wi > wj;
  const T zero = hk::convert<T>(0.0f);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  for (int p = 0; p < 2; ++p)
    for (int q = 0; q < 2; ++q) wmma::fill_fragment(acc[p][q], 0.0f);

  for (long long r = job.r0; r < job.r1; r += BK) {
    if (vec) {
      for (int e = tid; e < BK * TILE / 8; e += 128) {
        const int k = e / (TILE / 8), c = (e % (TILE / 8)) * 8;
        const long long row = r + k;
        const bool live = row < job.r1;
        const uint4 none = make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4*>(&as[k][c]) =
            live && job.i0 + c < d ? *reinterpret_cast<const uint4*>(x + row * d + job.i0 + c) : none;
        *reinterpret_cast<uint4*>(&bs[k][c]) =
            live && job.j0 + c < d ? *reinterpret_cast<const uint4*>(x + row * d + job.j0 + c) : none;
      }
    } else {
      for (int e = tid; e < BK * TILE; e += 128) {
        const int k = e / TILE, c = e % TILE;
        const long long row = r + k;
        const bool live = row < job.r1;
        as[k][c] = live && job.i0 + c < d ? x[row * d + job.i0 + c] : zero;
        bs[k][c] = live && job.j0 + c < d ? x[row * d + job.j0 + c] : zero;
      }
    }
    __syncthreads();
    if (!idle) {
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
        for (int p = 0; p < 2; ++p) wmma::load_matrix_sync(fa[p], &as[kk][wi * 32 + p * 16], LDS);
        for (int q = 0; q < 2; ++q) wmma::load_matrix_sync(fb[q], &bs[kk][wj * 32 + q * 16], LDS);
        for (int p = 0; p < 2; ++p)
          for (int q = 0; q < 2; ++q) wmma::mma_sync(acc[p][q], fa[p], fb[q], acc[p][q]);
      }
    }
    __syncthreads();
  }
  for (int p = 0; p < 2; ++p)
    for (int q = 0; q < 2; ++q)
      wmma::store_matrix_sync(&cs[wi * 32 + p * 16][wj * 32 + q * 16], acc[p][q], LDC, wmma::mem_row_major);
  __syncthreads();
  // Consecutive threads take consecutive j: contiguous packed writes.
  for (int e = tid; e < TILE * TILE; e += 128) {
    const int a = e / TILE, b = e % TILE;
    emit(ep, workspace, job.i0 + a, job.j0 + b, cs[a][b]);
  }
}

// Sum of the `splits` partial triangles in split order, then the epilogue.
// One thread per packed element (grid-stride).
__global__ void syrk_finish(const float* __restrict__ workspace, int splits, long long d,
                            float scale, float decay, float omd, int dense,
                            float* __restrict__ out, const float* __restrict__ prev, int* __restrict__ flag) {
  const Epilogue ep{scale, decay, omd, d, dense, out, prev, flag};
  const long long packed = d * (d + 1) / 2;
  const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long g = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; g < packed; g += step) {
    float acc = 0.0f;
    for (int s = 0; s < splits; ++s) acc += workspace[s * packed + g];
    const long long i = hk::tri_row(g, d);
    ep.store(i, i + g - hk::tri_row_start(i, d), acc);
  }
}
