// pybind11 module _C: C++ CPU kernels. Arguments are raw addresses (Python ints from Tensor.data_ptr()),
// sizes and strides in elements, and a dtype tag ("float32" | "float64"). Python validates and allocates;
// these wrappers only dispatch on dtype and release the GIL while the kernel runs.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu/kernels.h"
#include "philox.h"

namespace py = pybind11;
using l2t::cpu::max_threads;

template <typename F>
static void dispatch(const std::string& dtype, F&& f) {
  if (dtype == "float32") {
    f(float{});
  } else if (dtype == "float64") {
    f(double{});
  } else {
    throw std::invalid_argument("l2t_ext._C: unsupported dtype '" + dtype + "' (float32 or float64)");
  }
}

template <typename T>
static T* P(uintptr_t a) {
  return reinterpret_cast<T*>(a);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "l2t_ext C++ CPU kernels (torch-ABI independent)";
  m.def("openmp", &l2t::cpu::openmp_enabled);
  m.def("max_threads", &max_threads);
  m.def("omega", &l2t::omega_entry, "Omega[row, col] of the rsvd sketch for a seed", py::arg("seed"),
        py::arg("row"), py::arg("col"));

  m.def(
      "omega_fill",
      [](uint64_t seed, int64_t n, int64_t k, uintptr_t out) { l2t::cpu::omega_fill(seed, n, k, P<float>(out)); },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "row_project",
      [](const std::string& dt, uintptr_t X, int64_t sxr, int64_t sxc, uintptr_t idx, int64_t nrows, int64_t ncols,
         uintptr_t V, int64_t r, uintptr_t Y) {
        dispatch(dt, [&](auto t) {
          using T = decltype(t);
          l2t::cpu::row_project<T>(P<const T>(X), sxr, sxc, P<const int64_t>(idx), nrows, ncols, P<const T>(V), r,
                                   P<T>(Y));
        });
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "chunk_outer",
      [](const std::string& dt, uintptr_t A, uintptr_t B, int64_t ra, int64_t rb, uintptr_t start, int64_t C,
         uintptr_t out) {
        dispatch(dt, [&](auto t) {
          using T = decltype(t);
          l2t::cpu::chunk_outer<T>(P<const T>(A), P<const T>(B), ra, rb, P<const int64_t>(start), C, P<T>(out));
        });
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "segment_sum",
      [](const std::string& dt, uintptr_t Pp, int64_t rr, uintptr_t start, int64_t S, uintptr_t G) {
        dispatch(dt, [&](auto t) {
          using T = decltype(t);
          l2t::cpu::segment_sum<T>(P<const T>(Pp), rr, P<const int64_t>(start), S, P<T>(G));
        });
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "quadform_implicit",
      [](const std::string& dt, uintptr_t d, uintptr_t G, int64_t M, int64_t N, int64_t p, double inv_n,
         double damping, uintptr_t C, uintptr_t q) {
        dispatch(dt, [&](auto t) {
          using T = decltype(t);
          l2t::cpu::quadform_implicit<T>(P<const T>(d), P<const T>(G), M, N, p, inv_n, damping, P<T>(C), P<T>(q));
        });
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "quadform_explicit",
      [](const std::string& dt, uintptr_t d, uintptr_t F, int64_t M, int64_t p, double damping, uintptr_t Y,
         uintptr_t q) {
        dispatch(dt, [&](auto t) {
          using T = decltype(t);
          l2t::cpu::quadform_explicit<T>(P<const T>(d), P<const T>(F), M, p, damping, P<T>(Y), P<T>(q));
        });
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "gram_ema",
      [](const std::string& dt, uintptr_t G, int64_t N, int64_t p, uintptr_t Fin, double decay, double scale,
         uintptr_t Fout) {
        dispatch(dt, [&](auto t) {
          using T = decltype(t);
          l2t::cpu::gram_ema<T>(P<const T>(G), N, p, P<const T>(Fin), decay, scale, P<T>(Fout));
        });
      },
      py::call_guard<py::gil_scoped_release>());
}
