// CUDA kernels for l2t_ext (docs/architecture.md, "Kernels and backends"): one shared-memory tiled fp32-accumulating GEMM that also
// generates the rsvd sketch matrix on the fly, its tensor-core twin for bf16 x bf16 operands on sm_80+ (WMMA,
// fp32 accumulation), plus deterministic segment reductions and the Fisher quadratic-form epilogue. Determinism: no float atomics; every output element is reduced by one thread
// (or one block's fixed-shape tree) in a fixed order. All launches go on the caller's stream.
#include <cuda_bf16.h>
#include <mma.h>

#include <type_traits>

#include "cuda/kernels.h"
#include "philox.h"

namespace l2t::cuda {
namespace {

constexpr int BM = 64, BN = 32, BK = 32, THREADS = 256;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename TV>
struct LoadV {
  const TV* V;
  int64_t sVk, sVc;
  __device__ float operator()(int64_t l, int64_t c) const { return to_f(V[l * sVk + c * sVc]); }
};

struct OmegaV {
  uint64_t seed;
  __device__ float operator()(int64_t l, int64_t c) const { return omega_entry(seed, l, c); }
};

// Tile: BM rows x BN columns per block, BK-deep slices of K staged in shared memory. Thread (ty, tx) owns
// column tx and rows ty + 8u (u < 8). Loads are remapped so the unit-stride dimension is the fast one.
template <typename TX, typename VSrc>
__global__ void __launch_bounds__(THREADS) gemm_kernel(const TX* __restrict__ X, int64_t sXr, int64_t sXc,
                                                        int64_t sXz, const int64_t* __restrict__ idx,
                                                        int64_t nrows, VSrc vsrc, bool v_k_fast, int64_t ncols,
                                                        int64_t K, int64_t kchunk, bool split, float alpha,
                                                        float beta, const float* __restrict__ Yin,
                                                        float* __restrict__ Y) {
  __shared__ float Xs[BM][BK + 1];
  __shared__ float Vs[BK][BN + 1];
  const int tid = threadIdx.x, tx = tid % 32, ty = tid / 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM, col0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int64_t z = blockIdx.z;
  const TX* Xz = X + (split ? 0 : z * sXz);
  const int64_t k_begin = split ? z * kchunk : 0;
  const int64_t k_end = split ? min(K, k_begin + kchunk) : K;
  const bool x_row_fast = (sXc != 1);  // unit stride along rows (e.g. X = G^T): make the row index fast
  float acc[8];
#pragma unroll
  for (int u = 0; u < 8; ++u) acc[u] = 0.f;

  for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
#pragma unroll
    for (int q = 0; q < (BM * BK) / THREADS; ++q) {
      const int e = tid + q * THREADS;
      const int r = x_row_fast ? e % BM : e / BK, l = x_row_fast ? e / BM : e % BK;
      const int64_t gr = row0 + r, gl = k0 + l;
      float v = 0.f;
      if (gr < nrows && gl < k_end) v = to_f(Xz[(idx ? idx[gr] : gr) * sXr + gl * sXc]);
      Xs[r][l] = v;
    }
#pragma unroll
    for (int q = 0; q < (BK * BN) / THREADS; ++q) {
      const int e = tid + q * THREADS;
      const int l = v_k_fast ? e % BK : e / BN, c = v_k_fast ? e / BK : e % BN;
      const int64_t gl = k0 + l, gc = col0 + c;
      Vs[l][c] = (gl < k_end && gc < ncols) ? vsrc(gl, gc) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int l = 0; l < BK; ++l) {
      const float v = Vs[l][tx];
#pragma unroll
      for (int u = 0; u < 8; ++u) acc[u] = fmaf(Xs[ty + 8 * u][l], v, acc[u]);
    }
    __syncthreads();
  }
  const int64_t gc = col0 + tx;
  if (gc >= ncols) return;
#pragma unroll
  for (int u = 0; u < 8; ++u) {
    const int64_t gr = row0 + ty + 8 * u;
    if (gr < nrows) {
      const int64_t o = z * nrows * ncols + gr * ncols + gc;
      Y[o] = alpha * acc[u] + (Yin ? beta * Yin[o] : 0.f);
    }
  }
}

// Tensor-core tile for bf16 x bf16: 64 x 64 outputs per block of 4 warps, each warp a 32 x 32 quarter as
// 2 x 2 WMMA 16x16x16 fragments accumulating in fp32; BK-deep slices staged in shared memory as bf16 (exact: the
// operands are bf16 already). Same contract as gemm_kernel; the fragments' products are exact and their sums
// fp32, in a fixed order (deterministic). Row pads keep WMMA's 32-byte fragment alignment.
constexpr int TBM = 64, TBN = 64, TBK = 32, TC_THREADS = 128;
constexpr int XS_LD = TBK + 8, VS_LD = TBN + 8, CS_LD = TBN + 4;

template <typename VSrc>
__global__ void __launch_bounds__(TC_THREADS) gemm_tc_kernel(const __nv_bfloat16* __restrict__ X, int64_t sXr,
                                                              int64_t sXc, int64_t sXz,
                                                              const int64_t* __restrict__ idx, int64_t nrows,
                                                              VSrc vsrc, bool v_k_fast, int64_t ncols, int64_t K,
                                                              int64_t kchunk, bool split, float alpha, float beta,
                                                              const float* __restrict__ Yin, float* __restrict__ Y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  namespace wm = nvcuda::wmma;
  __shared__ __align__(32) __nv_bfloat16 Xs[TBM][XS_LD];
  __shared__ __align__(32) __nv_bfloat16 Vs[TBK][VS_LD];
  __shared__ __align__(32) float Cs[TBM][CS_LD];
  const int tid = threadIdx.x, warp_m = (tid / 32) / 2, warp_n = (tid / 32) % 2;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * TBM, col0 = static_cast<int64_t>(blockIdx.y) * TBN;
  const int64_t z = blockIdx.z;
  const __nv_bfloat16* Xz = X + (split ? 0 : z * sXz);
  const int64_t k_begin = split ? z * kchunk : 0;
  const int64_t k_end = split ? min(K, k_begin + kchunk) : K;
  const bool x_row_fast = (sXc != 1);
  const __nv_bfloat16 zero = __float2bfloat16(0.f);
  wm::fragment<wm::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wm::fill_fragment(acc[i][j], 0.f);

  for (int64_t k0 = k_begin; k0 < k_end; k0 += TBK) {
#pragma unroll 4
    for (int q = 0; q < (TBM * TBK) / TC_THREADS; ++q) {
      const int e = tid + q * TC_THREADS;
      const int r = x_row_fast ? e % TBM : e / TBK, l = x_row_fast ? e / TBM : e % TBK;
      const int64_t gr = row0 + r, gl = k0 + l;
      Xs[r][l] = (gr < nrows && gl < k_end) ? Xz[(idx ? idx[gr] : gr) * sXr + gl * sXc] : zero;
    }
#pragma unroll 4
    for (int q = 0; q < (TBK * TBN) / TC_THREADS; ++q) {
      const int e = tid + q * TC_THREADS;
      const int l = v_k_fast ? e % TBK : e / TBN, c = v_k_fast ? e / TBK : e % TBN;
      const int64_t gl = k0 + l, gc = col0 + c;
      Vs[l][c] = (gl < k_end && gc < ncols) ? __float2bfloat16(vsrc(gl, gc)) : zero;  // bf16 -> float -> bf16: exact
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < TBK; kk += 16) {
      wm::fragment<wm::matrix_a, 16, 16, 16, __nv_bfloat16, wm::row_major> a[2];
      wm::fragment<wm::matrix_b, 16, 16, 16, __nv_bfloat16, wm::row_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wm::load_matrix_sync(a[i], &Xs[warp_m * 32 + i * 16][kk], XS_LD);
#pragma unroll
      for (int j = 0; j < 2; ++j) wm::load_matrix_sync(b[j], &Vs[kk][warp_n * 32 + j * 16], VS_LD);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wm::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wm::store_matrix_sync(&Cs[warp_m * 32 + i * 16][warp_n * 32 + j * 16], acc[i][j], CS_LD, wm::mem_row_major);
  __syncthreads();
  for (int e = tid; e < TBM * TBN; e += TC_THREADS) {
    const int r = e / TBN, c = e % TBN;
    const int64_t gr = row0 + r, gc = col0 + c;
    if (gr < nrows && gc < ncols) {
      const int64_t o = z * nrows * ncols + gr * ncols + gc;
      Y[o] = alpha * Cs[r][c] + (Yin ? beta * Yin[o] : 0.f);
    }
  }
#endif
}

// Tensor-core GEMM for bf16 operands whose reduction dimension is unit-stride in X (the projections of
// segment_grad_outer and project, the Fisher quadform's split-K GEMM): same contract as gemm_kernel without idx,
// alpha, beta and the sketch. X rows have unit column stride and start 16 bytes apart (sXr, sXz multiples of 8
// elements); V is stored row-major either as (K, ncols) (VT false: V(l, c) = V[l * sVr + c], ncols a multiple
// of 8) or as its transpose (ncols, K) (VT true: V(l, c) = V[c * sVr + l]); both buffers 16-byte aligned and
// split chunks multiples of 8 (the launcher checks). 64 x 32 outputs per block of 4 warps (one 16-row strip each:
// two 16x16x16 WMMA fragments, fp32 accumulation in a fixed order); 64-deep K slices move as 16-byte vectors
// through registers, the next slice's loads in flight during this slice's MMAs (gemm_tc_kernel loads one bf16 at a
// time, through any strides and a row index).
constexpr int PBM = 64, PBN = 32, PBK = 64, P_THREADS = 128;
constexpr int PX_LD = PBK + 8, PV_LD = PBN + 8, PC_LD = PBN + 4;  // 16-byte rows, 32-byte fragment alignment
constexpr int PXV = PBM * PBK / 8 / P_THREADS, PVV = PBK * PBN / 8 / P_THREADS;  // vectors per thread per slice

// 8 bf16 from p, the first at column k of a row that ends at column k_end; columns >= k_end read as zero
__device__ __forceinline__ uint4 load8(const __nv_bfloat16* p, int64_t k, int64_t k_end) {
  if (k + 8 <= k_end) return *reinterpret_cast<const uint4*>(p);
  uint4 out = make_uint4(0u, 0u, 0u, 0u);
  __nv_bfloat16* o = reinterpret_cast<__nv_bfloat16*>(&out);
  for (int i = 0; i < 8; ++i)
    if (k + i < k_end) o[i] = p[i];
  return out;
}

template <bool VT>
__global__ void __launch_bounds__(P_THREADS) rows_tc_kernel(const __nv_bfloat16* __restrict__ X, int64_t sXr,
                                                             int64_t sXz, int64_t nrows,
                                                             const __nv_bfloat16* __restrict__ V, int64_t sVr,
                                                             int64_t ncols, int64_t K, int64_t kchunk, bool split,
                                                             float* __restrict__ Y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  namespace wm = nvcuda::wmma;
  constexpr int V_ROWS = VT ? PBN : PBK, V_LD = VT ? PX_LD : PV_LD;  // VT: [column][k], else [k][column]
  __shared__ __align__(32) __nv_bfloat16 Xs[PBM][PX_LD];
  __shared__ __align__(32) __nv_bfloat16 Vs[V_ROWS][V_LD];
  __shared__ __align__(32) float Cs[PBM][PC_LD];
  const int tid = threadIdx.x, warp = tid / 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * PBM, col0 = static_cast<int64_t>(blockIdx.y) * PBN;
  const int64_t z = blockIdx.z;
  const __nv_bfloat16* Xz = X + (split ? 0 : z * sXz);
  const int64_t k_begin = split ? z * kchunk : 0;
  const int64_t k_end = split ? min(K, k_begin + kchunk) : K;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  uint4 xr[PXV], vr[PVV];
  // vector v of the X slice: row v / 8, columns 8 (v % 8)..; of V: VT column v / 8, k 8 (v % 8)..; else k v / 4,
  // columns 8 (v % 4)..
  auto fetch = [&](int64_t k0) {
#pragma unroll
    for (int q = 0; q < PXV; ++q) {
      const int v = tid + q * P_THREADS;
      const int64_t gr = row0 + v / (PBK / 8), k = k0 + 8 * (v % (PBK / 8));
      xr[q] = (gr < nrows && k < k_end) ? load8(Xz + gr * sXr + k, k, k_end) : zero;
    }
#pragma unroll
    for (int q = 0; q < PVV; ++q) {
      const int v = tid + q * P_THREADS;
      if constexpr (VT) {
        const int64_t gc = col0 + v / (PBK / 8), k = k0 + 8 * (v % (PBK / 8));
        vr[q] = (gc < ncols && k < k_end) ? load8(V + gc * sVr + k, k, k_end) : zero;
      } else {
        const int64_t gl = k0 + v / (PBN / 8), gc = col0 + 8 * (v % (PBN / 8));
        vr[q] = (gl < k_end && gc < ncols) ? *reinterpret_cast<const uint4*>(V + gl * sVr + gc) : zero;
      }
    }
  };
  wm::fragment<wm::accumulator, 16, 16, 16, float> acc[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) wm::fill_fragment(acc[j], 0.f);
  if (k_begin < k_end) fetch(k_begin);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += PBK) {
#pragma unroll
    for (int q = 0; q < PXV; ++q) {
      const int v = tid + q * P_THREADS;
      *reinterpret_cast<uint4*>(&Xs[v / (PBK / 8)][8 * (v % (PBK / 8))]) = xr[q];
    }
#pragma unroll
    for (int q = 0; q < PVV; ++q) {
      const int v = tid + q * P_THREADS;
      constexpr int PER_ROW = VT ? PBK / 8 : PBN / 8;
      *reinterpret_cast<uint4*>(&Vs[v / PER_ROW][8 * (v % PER_ROW)]) = vr[q];
    }
    __syncthreads();
    if (k0 + PBK < k_end) fetch(k0 + PBK);  // in flight during this slice's MMAs
#pragma unroll
    for (int kk = 0; kk < PBK; kk += 16) {
      wm::fragment<wm::matrix_a, 16, 16, 16, __nv_bfloat16, wm::row_major> a;
      wm::load_matrix_sync(a, &Xs[warp * 16][kk], PX_LD);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if constexpr (VT) {
          wm::fragment<wm::matrix_b, 16, 16, 16, __nv_bfloat16, wm::col_major> b;
          wm::load_matrix_sync(b, &Vs[j * 16][kk], V_LD);
          wm::mma_sync(acc[j], a, b, acc[j]);
        } else {
          wm::fragment<wm::matrix_b, 16, 16, 16, __nv_bfloat16, wm::row_major> b;
          wm::load_matrix_sync(b, &Vs[kk][j * 16], V_LD);
          wm::mma_sync(acc[j], a, b, acc[j]);
        }
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < 2; ++j) wm::store_matrix_sync(&Cs[warp * 16][j * 16], acc[j], PC_LD, wm::mem_row_major);
  __syncthreads();
  float* Yz = Y + z * nrows * ncols;
  for (int e = tid; e < PBM * PBN; e += P_THREADS) {
    const int64_t gr = row0 + e / PBN, gc = col0 + e % PBN;
    if (gr < nrows && gc < ncols) Yz[gr * ncols + gc] = Cs[e / PBN][e % PBN];
  }
#endif
}

// Compute capability major of the current device, cached per device (the tensor-core path needs sm_80+).
int device_major() {
  static int major[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 0;
  if (major[dev] == 0 && cudaDeviceGetAttribute(&major[dev], cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
    major[dev] = -1;
  return major[dev];
}

// One block per chunk (x) and per 1024 outputs (y); each thread owns up to 4 outputs of the (ra, rb) tile.
__global__ void __launch_bounds__(THREADS) chunk_outer_kernel(const float* __restrict__ A,
                                                               const float* __restrict__ B, int64_t ra, int64_t rb,
                                                               const int64_t* __restrict__ start,
                                                               float* __restrict__ P) {
  const int64_t c = blockIdx.x, rr = ra * rb;
  const int64_t i0 = start[c], i1 = start[c + 1];
  int64_t e[4];
  float acc[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    e[q] = static_cast<int64_t>(blockIdx.y) * 4 * THREADS + q * THREADS + threadIdx.x;
    acc[q] = 0.f;
  }
  for (int64_t i = i0; i < i1; ++i) {
#pragma unroll
    for (int q = 0; q < 4; ++q)
      if (e[q] < rr) acc[q] = fmaf(A[i * ra + e[q] / rb], B[i * rb + e[q] % rb], acc[q]);
  }
#pragma unroll
  for (int q = 0; q < 4; ++q)
    if (e[q] < rr) P[c * rr + e[q]] = acc[q];
}

// One block per (segment s, part j of its span, 1024 outputs); each thread owns up to 4 outputs of the (ra, rb)
// tile and adds the part's tokens in order (deterministic). Tokens of other segments inside the span (interleaved
// ids, masked tokens) are skipped: their A and B rows are never read.
__global__ void __launch_bounds__(THREADS) span_outer_kernel(const float* __restrict__ A, const float* __restrict__ B,
                                                              int64_t ra, int64_t rb, const int64_t* __restrict__ seg,
                                                              const int64_t* __restrict__ first,
                                                              const int64_t* __restrict__ last, int64_t nsplit,
                                                              float* __restrict__ P) {
  const int64_t s = blockIdx.x, j = blockIdx.y, rr = ra * rb;
  const int64_t lo = first[s], span = max(last[s] - lo + 1, int64_t{0});  // an empty segment: first > last
  const int64_t piece = (span + nsplit - 1) / nsplit;
  const int64_t t0 = lo + j * piece, t1 = min(lo + span, t0 + piece);
  int ia[4], ib[4];  // this thread's outputs (row, column) of the tile; rr < 2^31 (the op caps the output)
  float acc[4];
  bool own[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int64_t e = static_cast<int64_t>(blockIdx.z) * 4 * THREADS + q * THREADS + threadIdx.x;
    own[q] = e < rr;
    ia[q] = own[q] ? static_cast<int>(e / rb) : 0;
    ib[q] = own[q] ? static_cast<int>(e % rb) : 0;
    acc[q] = 0.f;
  }
  for (int64_t t = t0; t < t1; ++t) {
    if (seg[t] != s) continue;
    const float* a = A + t * ra;
    const float* b = B + t * rb;
#pragma unroll
    for (int q = 0; q < 4; ++q)
      if (own[q]) acc[q] = fmaf(a[ia[q]], b[ib[q]], acc[q]);
  }
  float* out = P + (s * nsplit + j) * rr;
#pragma unroll
  for (int q = 0; q < 4; ++q)
    if (own[q]) out[static_cast<int64_t>(ia[q]) * rb + ib[q]] = acc[q];
}

__global__ void segment_sum_kernel(const float* __restrict__ P, int64_t rr, const int64_t* __restrict__ start,
                                   float* __restrict__ G) {
  const int64_t s = blockIdx.x, e = static_cast<int64_t>(blockIdx.y) * THREADS + threadIdx.x;
  if (e >= rr) return;
  float acc = 0.f;
  for (int64_t c = start[s]; c < start[s + 1]; ++c) acc += P[c * rr + e];
  G[s * rr + e] = acc;
}

__device__ float block_sum(float v, float* smem) {
  smem[threadIdx.x] = v;
  __syncthreads();
  for (int w = THREADS / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) smem[threadIdx.x] += smem[threadIdx.x + w];
    __syncthreads();
  }
  const float out = smem[0];
  __syncthreads();
  return out;
}

template <typename TD>
__global__ void __launch_bounds__(THREADS) quadform_finalize_kernel(const float* __restrict__ C, int64_t nz,
                                                                     int64_t M, int64_t N,
                                                                     const TD* __restrict__ delta, int64_t sDm,
                                                                     int64_t sDp, int64_t p, bool weighted,
                                                                     float inv_n, float damping,
                                                                     float* __restrict__ q) {
  __shared__ float smem[THREADS];
  const int64_t m = blockIdx.x;
  const TD* d = delta + m * sDm;
  float s1 = 0.f, s2 = 0.f;
  for (int64_t j = threadIdx.x; j < N; j += THREADS) {
    float x = 0.f;
    for (int64_t zz = 0; zz < nz; ++zz) x += C[(zz * M + m) * N + j];
    s1 += weighted ? to_f(d[j * sDp]) * x : x * x;
  }
  for (int64_t l = threadIdx.x; l < p; l += THREADS) {
    const float v = to_f(d[l * sDp]);
    s2 = fmaf(v, v, s2);
  }
  s1 = block_sum(s1, smem);
  s2 = block_sum(s2, smem);
  if (threadIdx.x == 0) q[m] = inv_n * s1 + damping * s2;
}

template <typename F>
cudaError_t with_dtype(const std::string& dt, F&& f) {
  if (dt == "float32") return f(float{});
  if (dt == "bfloat16") return f(__nv_bfloat16{});
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t gemm(const std::string& dtX, const void* X, int64_t sXr, int64_t sXc, int64_t sXz, const int64_t* idx,
                 int64_t nrows, const std::string& dtV, const void* V, int64_t sVk, int64_t sVc, uint64_t seed,
                 int64_t ncols, int64_t K, int64_t kchunk, int64_t nz, bool split, float alpha, float beta,
                 const float* Yin, float* Y, cudaStream_t stream) {
  if (nrows == 0 || ncols == 0 || nz == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((nrows + BM - 1) / BM), static_cast<unsigned>((ncols + BN - 1) / BN),
                  static_cast<unsigned>(nz));
  return with_dtype(dtX, [&](auto tx) {
    using TX = decltype(tx);
    const TX* Xp = static_cast<const TX*>(X);
    if (V == nullptr) {
      gemm_kernel<TX, OmegaV><<<grid, THREADS, 0, stream>>>(Xp, sXr, sXc, sXz, idx, nrows, OmegaV{seed}, false,
                                                           ncols, K, kchunk, split, alpha, beta, Yin, Y);
      return cudaGetLastError();
    }
    if constexpr (std::is_same_v<TX, __nv_bfloat16>) {
      if (dtV == "bfloat16" && device_major() >= 8) {  // tensor cores
        const dim3 tc_grid(static_cast<unsigned>((nrows + TBM - 1) / TBM),
                           static_cast<unsigned>((ncols + TBN - 1) / TBN), static_cast<unsigned>(nz));
        LoadV<__nv_bfloat16> src{static_cast<const __nv_bfloat16*>(V), sVk, sVc};
        gemm_tc_kernel<<<tc_grid, TC_THREADS, 0, stream>>>(Xp, sXr, sXc, sXz, idx, nrows, src, sVk == 1, ncols, K,
                                                           kchunk, split, alpha, beta, Yin, Y);
        return cudaGetLastError();
      }
    }
    return with_dtype(dtV, [&](auto tv) {
      using TV = decltype(tv);
      LoadV<TV> src{static_cast<const TV*>(V), sVk, sVc};
      gemm_kernel<TX, LoadV<TV>><<<grid, THREADS, 0, stream>>>(Xp, sXr, sXc, sXz, idx, nrows, src, sVk == 1,
                                                              ncols, K, kchunk, split, alpha, beta, Yin, Y);
      return cudaGetLastError();
    });
  });
}

cudaError_t rows_tc(const void* X, int64_t sXr, int64_t sXz, int64_t nrows, const void* V, int64_t sVr, bool v_t,
                    int64_t ncols, int64_t K, int64_t kchunk, int64_t nz, bool split, float* Y, cudaStream_t stream) {
  const bool vectors = sXr % 8 == 0 && sXz % 8 == 0 && sVr % 8 == 0 && (!split || kchunk % 8 == 0) &&
                       (v_t || ncols % 8 == 0) &&
                       (reinterpret_cast<uintptr_t>(X) | reinterpret_cast<uintptr_t>(V)) % 16 == 0;
  if (device_major() < 8 || !vectors) return cudaErrorInvalidValue;  // tensor cores (sm_80+), 16-byte vectors
  if (nrows == 0 || ncols == 0 || nz == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((nrows + PBM - 1) / PBM), static_cast<unsigned>((ncols + PBN - 1) / PBN),
                  static_cast<unsigned>(nz));
  const auto* Xb = static_cast<const __nv_bfloat16*>(X);
  const auto* Vb = static_cast<const __nv_bfloat16*>(V);
  if (v_t)
    rows_tc_kernel<true><<<grid, P_THREADS, 0, stream>>>(Xb, sXr, sXz, nrows, Vb, sVr, ncols, K, kchunk, split, Y);
  else
    rows_tc_kernel<false><<<grid, P_THREADS, 0, stream>>>(Xb, sXr, sXz, nrows, Vb, sVr, ncols, K, kchunk, split, Y);
  return cudaGetLastError();
}

cudaError_t chunk_outer(const float* A, const float* B, int64_t ra, int64_t rb, const int64_t* start, int64_t C,
                        float* P, cudaStream_t stream) {
  if (C == 0 || ra * rb == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(C), static_cast<unsigned>((ra * rb + 4 * THREADS - 1) / (4 * THREADS)));
  chunk_outer_kernel<<<grid, THREADS, 0, stream>>>(A, B, ra, rb, start, P);
  return cudaGetLastError();
}

cudaError_t span_outer(const float* A, const float* B, int64_t ra, int64_t rb, const int64_t* seg,
                       const int64_t* first, const int64_t* last, int64_t S, int64_t nsplit, float* P,
                       cudaStream_t stream) {
  if (S == 0 || nsplit == 0 || ra * rb == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(S), static_cast<unsigned>(nsplit),
                  static_cast<unsigned>((ra * rb + 4 * THREADS - 1) / (4 * THREADS)));
  span_outer_kernel<<<grid, THREADS, 0, stream>>>(A, B, ra, rb, seg, first, last, nsplit, P);
  return cudaGetLastError();
}

cudaError_t segment_sum(const float* P, int64_t rr, const int64_t* start, int64_t S, float* G, cudaStream_t stream) {
  if (S == 0 || rr == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(S), static_cast<unsigned>((rr + THREADS - 1) / THREADS));
  segment_sum_kernel<<<grid, THREADS, 0, stream>>>(P, rr, start, G);
  return cudaGetLastError();
}

cudaError_t quadform_finalize(const float* C, int64_t nz, int64_t M, int64_t N, const std::string& dtD,
                              const void* delta, int64_t sDm, int64_t sDp, int64_t p, bool weighted, float inv_n,
                              float damping, float* q, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  return with_dtype(dtD, [&](auto td) {
    using TD = decltype(td);
    quadform_finalize_kernel<TD><<<static_cast<unsigned>(M), THREADS, 0, stream>>>(
        C, nz, M, N, static_cast<const TD*>(delta), sDm, sDp, p, weighted, inv_n, damping, q);
    return cudaGetLastError();
  });
}

}  // namespace l2t::cuda
