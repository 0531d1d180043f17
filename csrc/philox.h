// Counter-based random numbers for the rsvd sketch (DESIGN.md section 3.1).
//
// Omega[row, col] ~ N(0, 1) is a pure function of (seed, row, col): Philox4x32-10 (Salmon et al., SC'11) on
// counter (row_lo, col_lo, row_hi, col_hi) with key (seed_lo, seed_hi), then Box-Muller on the first two words.
// The transcendental part runs in double and is rounded once to float, so every backend (C++, CUDA, Triton,
// torch) produces the same float Omega; it is generated inside the kernels and never stored.
#pragma once
#include <cmath>
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

// One standard-normal float for sketch entry (row, col).
L2T_HD float omega_normal(uint64_t seed, int64_t row, int64_t col) {
  uint32_t c0 = static_cast<uint32_t>(row), c1 = static_cast<uint32_t>(col);
  uint32_t c2 = static_cast<uint32_t>(static_cast<uint64_t>(row) >> 32);
  uint32_t c3 = static_cast<uint32_t>(static_cast<uint64_t>(col) >> 32);
  philox4x32_10(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  // u in (0, 1): 24-bit mantissa plus half an ulp, exact in float and double.
  const double u1 = (static_cast<double>(c0 >> 8) + 0.5) * (1.0 / 16777216.0);
  const double u2 = (static_cast<double>(c1 >> 8) + 0.5) * (1.0 / 16777216.0);
  return static_cast<float>(sqrt(-2.0 * log(u1)) * cos(6.283185307179586476925286766559 * u2));
}

}  // namespace l2t
