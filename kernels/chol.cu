// Batched inversion of small damped SPD matrices by Cholesky, one block per
// matrix held in shared memory (n <= 64; 2x2 BatchNorm blocks included).
//
// For matrix b:  S = (M + M^T)/2 + damping[b] I (+ shift[b] I, the jitter of a
// retry), formed exactly as hpckfac.ops.inverse does, then
//   1. S = L L^T (right-looking, in place in the lower triangle). A pivot is
//      accepted when L_kk > 0 and L_kk^2 >= tol * S_kk with tol = PIVOT_RTOL *
//      eps (the CPU reference's test); otherwise failed[b] = 1 and nothing is
//      written to out[b].
//   2. X = L^{-1} by forward substitution, one thread per column; column j of
//      X (below the diagonal) is stored transposed in row j of the strict
//      upper triangle, its diagonal 1/L_jj in `dinv`.
//   3. out[b] = X^T X, element (i, j) and (j, i) from one sum, so the result
//      is exactly symmetric. A non-finite entry sets failed[b] = 1.
// failed[b] = 0 when out[b] holds the inverse. Shared memory (dynamic):
// (n (n + 1) + 2 n) elements of T.
#include "common.cuh"

template <typename T>
__global__ void chol_inverse(const T* __restrict__ mats, int n,
                             const T* __restrict__ damping, const T* __restrict__ shift,
                             T tol, T* __restrict__ out, signed char* __restrict__ failed) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* a = reinterpret_cast<T*>(smem);  // n x (n + 1), padded against bank conflicts
  T* dinv = a + n * (n + 1);
  T* diag = dinv + n;
  __shared__ int bad;
  const int ld = n + 1, tid = threadIdx.x, nt = blockDim.x;
  const long long b = blockIdx.x;
  const T* m = mats + b * n * n;
  const T half = T(0.5), damp = damping[b];

  if (tid == 0) bad = 0;
  for (int e = tid; e < n * n; e += nt) {
    const int i = e / n, j = e % n;
    T v = half * m[i * n + j] + half * m[j * n + i];
    if (i == j) {
      v = v + damp;
      if (shift) v = v + shift[b];
      diag[i] = v;
    }
    a[i * ld + j] = v;
  }

  for (int k = 0; k < n; ++k) {
    __syncthreads();
    if (tid == 0) {
      const T p = a[k * ld + k];
      const T l = sqrt(p);
      // !(x) rather than the negation so that NaN fails too.
      if (!(p > T(0)) || !(l * l >= tol * diag[k]) || !isfinite(l)) bad = 1;
      a[k * ld + k] = l;
      dinv[k] = T(1) / l;
    }
    __syncthreads();
    if (bad) break;
    const T l = a[k * ld + k];
    for (int i = k + 1 + tid; i < n; i += nt) a[i * ld + k] /= l;
    __syncthreads();
    const int rest = n - k - 1;
    for (int e = tid; e < rest * rest; e += nt) {
      const int i = k + 1 + e / rest, j = k + 1 + e % rest;
      if (j <= i) a[i * ld + j] -= a[i * ld + k] * a[j * ld + k];
    }
  }
  __syncthreads();
  if (bad) {
    if (tid == 0) failed[b] = 1;
    return;
  }

  // X[i][j] (i > j) at a[j][i]: row j of the strict upper triangle, written by
  // the thread of column j only, while L stays in the lower triangle.
  for (int j = tid; j < n; j += nt) {
    for (int i = j + 1; i < n; ++i) {
      T s = a[i * ld + j] * dinv[j];
      for (int k = j + 1; k < i; ++k) s += a[i * ld + k] * a[j * ld + k];
      a[j * ld + i] = -s / a[i * ld + i];
    }
  }
  __syncthreads();

  T* o = out + b * n * n;
  for (int e = tid; e < n * n; e += nt) {
    const int i = e / n, j = e % n;
    if (i > j) continue;
    // (X^T X)[i][j] = sum_{k >= j} X[k][i] X[k][j], X[k][k] = dinv[k].
    T s = (i == j ? dinv[j] : a[i * ld + j]) * dinv[j];
    for (int k = j + 1; k < n; ++k) s += a[i * ld + k] * a[j * ld + k];
    if (!isfinite(s)) bad = 1;
    o[i * n + j] = s;
    o[j * n + i] = s;
  }
  __syncthreads();
  if (tid == 0) failed[b] = bad ? 1 : 0;
}
