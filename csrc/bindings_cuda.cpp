// pybind11 module _C_cuda: CUDA launchers. Raw device addresses, sizes, strides (elements) and the CUDA stream
// come from Python as integers; a failed launch raises RuntimeError with CUDA's message. No torch headers.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/kernels.h"

namespace py = pybind11;

static void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("l2t_ext._C_cuda.") + what + ": " +
                                                   cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

template <typename T>
static T* P(uintptr_t a) {
  return reinterpret_cast<T*>(a);
}

static cudaStream_t S(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "l2t_ext CUDA kernels (torch-ABI independent, static cudart)";
  m.def("cuda_runtime_version", [] {
    int v = 0;
    check(cudaRuntimeGetVersion(&v), "cudaRuntimeGetVersion");
    return v;
  });
  m.def("device_count", [] {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
  });
  m.def(
      "gemm",
      [](const std::string& dtX, uintptr_t X, int64_t sXr, int64_t sXc, int64_t sXz, uintptr_t idx, int64_t nrows,
         const std::string& dtV, uintptr_t V, int64_t sVk, int64_t sVc, uint64_t seed, int64_t ncols, int64_t K,
         int64_t kchunk, int64_t nz, bool split, float alpha, float beta, uintptr_t Yin, uintptr_t Y,
         uintptr_t stream) {
        check(l2t::cuda::gemm(dtX, P<const void>(X), sXr, sXc, sXz, P<const int64_t>(idx), nrows, dtV,
                              P<const void>(V), sVk, sVc, seed, ncols, K, kchunk, nz, split, alpha, beta,
                              P<const float>(Yin), P<float>(Y), S(stream)),
              "gemm");
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "rows_tc",
      [](uintptr_t X, int64_t sXr, int64_t sXz, int64_t nrows, uintptr_t V, int64_t sVr, bool v_t, int64_t ncols,
         int64_t K, int64_t kchunk, int64_t nz, bool split, uintptr_t Y, uintptr_t stream) {
        check(l2t::cuda::rows_tc(P<const void>(X), sXr, sXz, nrows, P<const void>(V), sVr, v_t, ncols, K, kchunk, nz,
                                 split, P<float>(Y), S(stream)),
              "rows_tc");
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "chunk_outer",
      [](uintptr_t A, uintptr_t B, int64_t ra, int64_t rb, uintptr_t start, int64_t C, uintptr_t out,
         uintptr_t stream) {
        check(l2t::cuda::chunk_outer(P<const float>(A), P<const float>(B), ra, rb, P<const int64_t>(start), C,
                                     P<float>(out), S(stream)),
              "chunk_outer");
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "span_outer",
      [](uintptr_t A, uintptr_t B, int64_t ra, int64_t rb, uintptr_t seg, uintptr_t first, uintptr_t last,
         int64_t nseg, int64_t nsplit, uintptr_t out, uintptr_t stream) {
        check(l2t::cuda::span_outer(P<const float>(A), P<const float>(B), ra, rb, P<const int64_t>(seg),
                                    P<const int64_t>(first), P<const int64_t>(last), nseg, nsplit, P<float>(out),
                                    S(stream)),
              "span_outer");
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "segment_sum",
      [](uintptr_t Pp, int64_t rr, uintptr_t start, int64_t nseg, uintptr_t G, uintptr_t stream) {
        check(l2t::cuda::segment_sum(P<const float>(Pp), rr, P<const int64_t>(start), nseg, P<float>(G), S(stream)),
              "segment_sum");
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "quadform_finalize",
      [](uintptr_t C, int64_t nz, int64_t M, int64_t N, const std::string& dtD, uintptr_t d, int64_t sDm,
         int64_t sDp, int64_t p, bool weighted, float inv_n, float damping, uintptr_t q, uintptr_t stream) {
        check(l2t::cuda::quadform_finalize(P<const float>(C), nz, M, N, dtD, P<const void>(d), sDm, sDp, p,
                                           weighted, inv_n, damping, P<float>(q), S(stream)),
              "quadform_finalize");
      },
      py::call_guard<py::gil_scoped_release>());
}
