// C++ CPU kernels for l2t_ext (docs/architecture.md, "Kernels and backends"). See kernels.h for the contracts.
#include "cpu/kernels.h"

#include <algorithm>
#include <cstring>

#include "philox.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace l2t::cpu {

bool openmp_enabled() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// ---------------------------------------------------------------------------------------------- rsvd Omega
// Each element depends only on (seed, row, col): the result does not depend on the thread count.
void omega_fill(uint64_t seed, int64_t n, int64_t k, float* out) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n * k; ++i) out[i] = omega_entry(seed, i / k, i % k);
}

// ---------------------------------------------------------------------------------------------- row project
// Register-blocked micro-kernel: RB rows x W columns of Y accumulate in registers while the K loop streams
// the rows of X once and the matching W-wide slice of V (which stays in L1/L2).
template <typename T, int RB, int W>
static inline void rows_times_panel(const T* const* xr, int64_t sXc, int64_t K, const T* V, int64_t ldv, T* out[RB],
                                    int64_t nb) {
  T acc[RB][W];
  for (int u = 0; u < RB; ++u)
    for (int j = 0; j < W; ++j) acc[u][j] = T(0);
  for (int64_t c = 0; c < K; ++c) {
    const T* __restrict__ v = V + c * ldv;
    for (int u = 0; u < RB; ++u) {
      const T x = xr[u][c * sXc];
#pragma omp simd
      for (int j = 0; j < W; ++j) acc[u][j] += x * v[j];
    }
  }
  for (int64_t u = 0; u < nb; ++u)
    for (int j = 0; j < W; ++j) out[u][j] = acc[u][j];
}

// Columns c0.. of rows i0..i0+nb of Y = X V in panels of w columns while w of them are left; returns the next column.
template <typename T, int RB, int w>
static inline int64_t panels(const T* const* xr, int64_t sXc, int64_t K, const T* V, int64_t r, T* Y, int64_t i0,
                             int64_t nb, int64_t c0) {
  T* out[RB];
  for (; c0 + w <= r; c0 += w) {
    for (int u = 0; u < RB; ++u) out[u] = Y + (i0 + std::min<int64_t>(u, nb - 1)) * r + c0;
    rows_times_panel<T, RB, w>(xr, sXc, K, V + c0, r, out, nb);
  }
  return c0;
}

template <typename T>
void row_project(const T* X, int64_t sXr, int64_t sXc, const int64_t* idx, int64_t nrows, int64_t ncols,
                 const T* V, int64_t r, T* Y) {
  constexpr int RB = 4;
  constexpr int W = 32 / sizeof(T) * 2;  // two SIMD registers wide (AVX2: 16 floats / 8 doubles)
  const int64_t blocks = (nrows + RB - 1) / RB;
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t i0 = blk * RB, nb = std::min<int64_t>(RB, nrows - i0);
    const T* xr[RB];
    for (int64_t u = 0; u < RB; ++u) {
      const int64_t i = i0 + std::min(u, nb - 1);  // pad a short block by repeating its last row
      xr[u] = X + (idx ? idx[i] : i) * sXr;
    }
    // panels of two SIMD registers, then one, half of one, then single columns: any r stays on the panel kernel
    // (r = 8 in float32 used to fall to a scalar loop over strided V columns, 12-21x slower)
    int64_t c0 = 0;
    c0 = panels<T, RB, W>(xr, sXc, ncols, V, r, Y, i0, nb, c0);
    c0 = panels<T, RB, W / 2>(xr, sXc, ncols, V, r, Y, i0, nb, c0);
    c0 = panels<T, RB, W / 4>(xr, sXc, ncols, V, r, Y, i0, nb, c0);
    panels<T, RB, 1>(xr, sXc, ncols, V, r, Y, i0, nb, c0);
  }
}

// ---------------------------------------------------------------------------------------------- chunk outer
template <typename T>
void chunk_outer(const T* A, const T* B, int64_t ra, int64_t rb, const int64_t* chunk_start, int64_t C, T* P) {
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t c = 0; c < C; ++c) {
    T* __restrict__ out = P + c * ra * rb;
    std::fill(out, out + ra * rb, T(0));
    for (int64_t i = chunk_start[c]; i < chunk_start[c + 1]; ++i) {
      const T* a = A + i * ra;
      const T* __restrict__ b = B + i * rb;
      for (int64_t x = 0; x < ra; ++x) {
        const T ax = a[x];
        T* __restrict__ o = out + x * rb;
#pragma omp simd
        for (int64_t y = 0; y < rb; ++y) o[y] += ax * b[y];
      }
    }
  }
}

template <typename T>
void segment_sum(const T* P, int64_t rr, const int64_t* seg_start, int64_t S, T* G) {
#pragma omp parallel for schedule(static)
  for (int64_t s = 0; s < S; ++s) {
    T* __restrict__ g = G + s * rr;
    std::fill(g, g + rr, T(0));
    for (int64_t c = seg_start[s]; c < seg_start[s + 1]; ++c) {
      const T* __restrict__ p = P + c * rr;
#pragma omp simd
      for (int64_t y = 0; y < rr; ++y) g[y] += p[y];
    }
  }
}

// ---------------------------------------------------------------------------------------------- quadform
template <typename T>
static inline T dot(const T* __restrict__ a, const T* __restrict__ b, int64_t p) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < p; ++i) s += a[i] * b[i];
  return s;
}

template <typename T>
void quadform_implicit(const T* delta, const T* G, int64_t M, int64_t N, int64_t p, double inv_n, double damping,
                       T* C, T* q) {
  // C = delta G^T in 4x4 register tiles over a p-chunk that stays in L1/L2.
  constexpr int64_t TM = 4, TN = 4, PC = 1024;
  const int64_t bm = (M + TM - 1) / TM, bn = (N + TN - 1) / TN;
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t tile = 0; tile < bm * bn; ++tile) {
    const int64_t m0 = (tile / bn) * TM, n0 = (tile % bn) * TN;
    const int64_t mc = std::min(TM, M - m0), nc = std::min(TN, N - n0);
    T acc[TM][TN] = {};
    const T* d[TM];
    const T* g[TN];
    for (int64_t u = 0; u < TM; ++u) d[u] = delta + (m0 + std::min(u, mc - 1)) * p;
    for (int64_t v = 0; v < TN; ++v) g[v] = G + (n0 + std::min(v, nc - 1)) * p;
    for (int64_t p0 = 0; p0 < p; p0 += PC) {
      const int64_t pc = std::min(PC, p - p0);
      for (int64_t u = 0; u < TM; ++u)
        for (int64_t v = 0; v < TN; ++v) acc[u][v] += dot(d[u] + p0, g[v] + p0, pc);
    }
    for (int64_t u = 0; u < mc; ++u)
      for (int64_t v = 0; v < nc; ++v) C[(m0 + u) * N + n0 + v] = acc[u][v];
  }
#pragma omp parallel for schedule(static)
  for (int64_t mi = 0; mi < M; ++mi) {
    const T* c = C + mi * N;
    const T sq = dot(c, c, N);                        // sum_j (g_j . delta_m)^2
    const T nd = dot(delta + mi * p, delta + mi * p, p);  // ||delta_m||^2
    q[mi] = static_cast<T>(inv_n) * sq + static_cast<T>(damping) * nd;
  }
}

template <typename T>
void quadform_explicit(const T* delta, const T* F, int64_t M, int64_t p, double damping, T* Y, T* q) {
  // Y[m, i] = F[i, :] . delta[m, :]  (F rows read once per block of rows, delta rows stay in cache)
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < p; ++i)
    for (int64_t mi = 0; mi < M; ++mi) Y[mi * p + i] = dot(F + i * p, delta + mi * p, p);
#pragma omp parallel for schedule(static)
  for (int64_t mi = 0; mi < M; ++mi) {
    const T* d = delta + mi * p;
    q[mi] = dot(d, Y + mi * p, p) + static_cast<T>(damping) * dot(d, d, p);
  }
}

// ---------------------------------------------------------------------------------------------- gram / EMA
template <typename T>
void gram_ema(const T* G, int64_t N, int64_t p, const T* F_in, double decay, double scale, T* F_out) {
  constexpr int64_t IB = 8, JB = 256;
  const int64_t bi = (p + IB - 1) / IB, bj = (p + JB - 1) / JB;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t tile = 0; tile < bi * bj; ++tile) {
    const int64_t i0 = (tile / bj) * IB, j0 = (tile % bj) * JB;
    const int64_t ic = std::min(IB, p - i0), jc = std::min(JB, p - j0);
    alignas(64) T acc[IB][JB];
    std::memset(acc, 0, sizeof(acc));
    for (int64_t nn = 0; nn < N; ++nn) {
      const T* __restrict__ row = G + nn * p;
      for (int64_t u = 0; u < ic; ++u) {
        const T gi = row[i0 + u];
#pragma omp simd
        for (int64_t j = 0; j < jc; ++j) acc[u][j] += gi * row[j0 + j];
      }
    }
    for (int64_t u = 0; u < ic; ++u) {
      T* out = F_out + (i0 + u) * p + j0;
      const T* in = F_in ? F_in + (i0 + u) * p + j0 : nullptr;
      for (int64_t j = 0; j < jc; ++j)
        out[j] = static_cast<T>(scale) * acc[u][j] + (in ? static_cast<T>(decay) * in[j] : T(0));
    }
  }
}

#define L2T_INSTANTIATE(T)                                                                                         \
  template void row_project<T>(const T*, int64_t, int64_t, const int64_t*, int64_t, int64_t, const T*, int64_t,   \
                               T*);                                                                               \
  template void chunk_outer<T>(const T*, const T*, int64_t, int64_t, const int64_t*, int64_t, T*);                \
  template void segment_sum<T>(const T*, int64_t, const int64_t*, int64_t, T*);                                   \
  template void quadform_implicit<T>(const T*, const T*, int64_t, int64_t, int64_t, double, double, T*, T*);      \
  template void quadform_explicit<T>(const T*, const T*, int64_t, int64_t, double, T*, T*);                       \
  template void gram_ema<T>(const T*, int64_t, int64_t, const T*, double, double, T*);

L2T_INSTANTIATE(float)
L2T_INSTANTIATE(double)

}  // namespace l2t::cpu
