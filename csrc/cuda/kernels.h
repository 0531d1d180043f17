// CUDA launchers. Inputs are float32 or bfloat16 ("float32" | "bfloat16" tags); accumulation, outputs and
// workspaces are float32. Every launcher enqueues on the given stream (torch's current stream, passed from
// Python as an integer) and returns the launch status; nothing here allocates or synchronises.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace l2t::cuda {

// Y[z] (nrows, ncols) = alpha * sum_{l in K-range(z)} X(row_i, l) V(l, c) + beta * Yin[z]
//   X(row_i, l) = X[z * sXz + idx[i] * sXr + l * sXc]   (idx == nullptr: idx[i] = i)
//   V(l, c)     = V[l * sVk + c * sVc], or Omega(seed, l, c) when V == nullptr (rsvd sketch)
//   K-range(z)  = [z * kchunk, min(K, (z + 1) * kchunk)) when split, else [0, K)   (z < nz = gridDim.z)
cudaError_t gemm(const std::string& dtX, const void* X, int64_t sXr, int64_t sXc, int64_t sXz, const int64_t* idx,
                 int64_t nrows, const std::string& dtV, const void* V, int64_t sVk, int64_t sVc, uint64_t seed,
                 int64_t ncols, int64_t K, int64_t kchunk, int64_t nz, bool split, float alpha, float beta,
                 const float* Yin, float* Y, cudaStream_t stream);

// gemm's contract for bf16 X and V on tensor cores (sm_80+), without idx, alpha, beta or the sketch: X(row_i, l) =
// X[z * sXz + i * sXr + l] (unit column stride); V(l, c) = V[l * sVr + c], or V[c * sVr + l] when v_t. Needs sXr,
// sXz and sVr multiples of 8, ncols too unless v_t, kchunk too when split, and 16-byte aligned X and V
// (cudaErrorInvalidValue otherwise, nothing run).
cudaError_t rows_tc(const void* X, int64_t sXr, int64_t sXz, int64_t nrows, const void* V, int64_t sVr, bool v_t,
                    int64_t ncols, int64_t K, int64_t kchunk, int64_t nz, bool split, float* Y, cudaStream_t stream);

// P[c] (ra, rb) = sum_{i in [start[c], start[c+1])} A[i] outer B[i]
cudaError_t chunk_outer(const float* A, const float* B, int64_t ra, int64_t rb, const int64_t* start, int64_t C,
                        float* P, cudaStream_t stream);

// P[s, j] (ra, rb) = sum_{t in part j of [first[s], last[s]], seg[t] == s} A[t] outer B[t], tokens in order; the
// span is cut into nsplit parts of ceil((last[s] - first[s] + 1) / nsplit) tokens (an empty span: zeros)
cudaError_t span_outer(const float* A, const float* B, int64_t ra, int64_t rb, const int64_t* seg,
                       const int64_t* first, const int64_t* last, int64_t S, int64_t nsplit, float* P,
                       cudaStream_t stream);

// G[s] = sum_{c in [start[s], start[s+1])} P[c]  (rr floats each; empty -> exact 0)
cudaError_t segment_sum(const float* P, int64_t rr, const int64_t* start, int64_t S, float* G, cudaStream_t stream);

// q[m] = inv_n * sum_j f(sum_z C[z, m, j]) + damping * ||delta[m]||^2 with
//   weighted == false: f(x) = x^2                 (implicit Fisher form)
//   weighted == true:  f(x) = delta[m, j] * x      (explicit form, C = delta F^T, N == p)
cudaError_t quadform_finalize(const float* C, int64_t nz, int64_t M, int64_t N, const std::string& dtD,
                              const void* delta, int64_t sDm, int64_t sDp, int64_t p, bool weighted, float inv_n,
                              float damping, float* q, cudaStream_t stream);

}  // namespace l2t::cuda
