// Counter-based random numbers for the rsvd sketch (rsvd).
//
// Omega[row, col] (mean 0, variance 1) is a pure function of (seed, row, col): Philox4x32-10 (Salmon et al.,
// SC'11) and integer arithmetic only, so every backend (C++, CUDA, Triton, torch) produces the same float
// Omega bit for bit; it is generated inside the kernels and never stored.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define L2T_HD __host__ __device__ __forceinline__
#else
#define L2T_HD inline
#endif

namespace l2t {

L2T_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Philox4x32 with 10 rounds; constants from Random123.
L2T_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(0xD2511F53u, c0, hi0, lo0);
    philox_mulhilo(0xCD9E8D57u, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// Omega[row, col]: Philox4x32-10 at counter (row_lo, col_lo, row_hi, col_hi), key (seed_lo, seed_hi); the four
// output words give four 22-bit uniforms u_i = (w_i >> 10 + 0.5) / 2^22 and
//   Omega = (u_0 + u_1 + u_2 + u_3 - 2) * sqrt(3)      (standardised Irwin-Hall(4): mean 0, variance 1).
// The integer sum (S + 2 - 2^23) is exact in float, the scale by 2^-22 is exact, and the single multiply by
// float(sqrt 3) is correctly rounded everywhere: every backend produces bit-identical Omega, with no
// transcendental functions (a sub-Gaussian test matrix, as randomized SVD theory requires).
L2T_HD float omega_entry(uint64_t seed, int64_t row, int64_t col) {
  uint32_t c0 = static_cast<uint32_t>(row), c1 = static_cast<uint32_t>(col);
  uint32_t c2 = static_cast<uint32_t>(static_cast<uint64_t>(row) >> 32);
  uint32_t c3 = static_cast<uint32_t>(static_cast<uint64_t>(col) >> 32);
  philox4x32_10(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const int32_t S = static_cast<int32_t>((c0 >> 10) + (c1 >> 10) + (c2 >> 10) + (c3 >> 10));
  const float centered = static_cast<float>(S + 2 - (1 << 23)) * (1.0f / 4194304.0f);  // exact
  return centered * 1.7320508075688772f;
}

}  // namespace l2t
