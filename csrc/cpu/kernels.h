// C++ CPU kernels (OpenMP). Every pointer is owned by the caller (Python allocates outputs and workspaces);
// sizes and strides are in elements. All kernels are deterministic: each output element is reduced by one
// thread in a fixed order, whatever the thread count.
#pragma once
#include <cstdint>

namespace l2t::cpu {

// Omega (n,k) row-major float32, Omega[row, col] = omega_entry(seed, row, col) (philox.h). The CPU sketch
// W @ Omega is then one BLAS GEMM: on CPU a materialised (n, k) Omega is small, and MKL's GEMM beats a
// hand-written fused one.
void omega_fill(uint64_t seed, int64_t n, int64_t k, float* out);

// Y[i, :] (r,) = X[idx[i], :] @ V (ncols, r) for i < nrows; idx == nullptr means idx[i] = i. Y contiguous.
template <typename T>
void row_project(const T* X, int64_t sXr, int64_t sXc, const int64_t* idx, int64_t nrows, int64_t ncols,
                 const T* V, int64_t r, T* Y);

// P[c] (ra, rb) = sum_{i in [start[c], start[c+1])} A[i] (ra) outer B[i] (rb); A, B, P contiguous.
template <typename T>
void chunk_outer(const T* A, const T* B, int64_t ra, int64_t rb, const int64_t* chunk_start, int64_t C, T* P);

// G[s] (rr,) = sum_{c in [seg_start[s], seg_start[s+1])} P[c]; empty ranges give exact zeros.
template <typename T>
void segment_sum(const T* P, int64_t rr, const int64_t* seg_start, int64_t S, T* G);

// Implicit damped Fisher quadratic form (fisher_quadform):
// q[m] = inv_n * sum_j (G[j] . delta[m])^2 + damping * ||delta[m]||^2. delta (M,p), G (N,p) row-contiguous.
// C (M,N) is a caller-owned workspace for the dot products.
template <typename T>
void quadform_implicit(const T* delta, const T* G, int64_t M, int64_t N, int64_t p, double inv_n, double damping,
                       T* C, T* q);

// Explicit form: q[m] = delta[m]^T (F + damping I) delta[m]; F (p,p) contiguous; Y (M,p) workspace = delta F^T.
template <typename T>
void quadform_explicit(const T* delta, const T* F, int64_t M, int64_t p, double damping, T* Y, T* q);

// F_out = decay * F_in + scale * G^T G; G (N,p) contiguous; F_in may be nullptr (then decay is ignored).
template <typename T>
void gram_ema(const T* G, int64_t N, int64_t p, const T* F_in, double decay, double scale, T* F_out);

bool openmp_enabled();
int max_threads();

}  // namespace l2t::cpu
