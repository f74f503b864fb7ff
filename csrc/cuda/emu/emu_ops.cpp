// Test-only: the fused ops of the CUDA backend on CPU tensors, i.e. the real host glue
// (cuda/glue.h) around the CUDA kernels compiled as plain C++ (emu_pair.cpp, emu_class.cpp, emu_triplet.cpp,
// cuda_emu.h). Registered as fpl_cuda_emu::<op> with the schemas of csrc/ops.cpp (inferred from
// the C++ signatures), built and loaded by tests/test_cuda_backend.py; never part of the
// extension (setup.py only globs csrc/cuda/*.cpp / *.cu).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "cuda/glue.h"

namespace {

using at::Tensor;

const char* emu_error_string(cudaError_t err) {
  static thread_local std::string s;
  s = "CUDA error " + std::to_string(static_cast<int>(err)) + (err == cudaErrorInvalidValue ? " (invalid value)" : "");
  return s.c_str();
}

const fpl_cuda_glue::Runtime kRuntime{"cuda emulation", nullptr, &emu_error_string};

void check_cpu(const Tensor& q) {
  TORCH_CHECK(q.device().is_cpu(), "fpl_cuda_emu: the emulated kernels take CPU tensors, got ", q.device());
}

std::tuple<Tensor, Tensor, Tensor> pair_engine_forward(const Tensor& q, const std::optional<Tensor>& r,
                                                       const Tensor& labels_q, const std::optional<Tensor>& labels_r,
                                                       const std::optional<Tensor>& exclude_col,
                                                       c10::ArrayRef<double> terms, int64_t flags,
                                                       const std::optional<Tensor>& row_shift) {
  check_cpu(q);
  return fpl_cuda_glue::pair_forward(kRuntime, q, r, labels_q, labels_r, exclude_col, terms, flags, row_shift);
}

std::tuple<Tensor, Tensor> pair_engine_backward(const Tensor& grad_values, const Tensor& q,
                                                const std::optional<Tensor>& r, const Tensor& labels_q,
                                                const std::optional<Tensor>& labels_r,
                                                const std::optional<Tensor>& exclude_col, const Tensor& values,
                                                const Tensor& aux, c10::ArrayRef<double> terms, int64_t flags,
                                                bool need_grad_r, const std::optional<Tensor>& row_shift) {
  check_cpu(q);
  return fpl_cuda_glue::pair_backward(kRuntime, grad_values, q, r, labels_q, labels_r, exclude_col, values, aux, terms,
                                      flags, need_grad_r, row_shift);
}

std::tuple<Tensor, Tensor> class_engine_forward(const Tensor& q, const Tensor& w, const Tensor& labels,
                                                int64_t centers_per_class, c10::ArrayRef<double> terms, int64_t flags) {
  check_cpu(q);
  return fpl_cuda_glue::class_forward(kRuntime, q, w, labels, centers_per_class, terms, flags);
}

std::tuple<Tensor, Tensor> class_engine_backward(const Tensor& grad_rows, const Tensor& grad_cols, const Tensor& q,
                                                 const Tensor& w, const Tensor& labels, const Tensor& rows,
                                                 const Tensor& cols, int64_t centers_per_class,
                                                 c10::ArrayRef<double> terms, int64_t flags, bool need_grad_w) {
  check_cpu(q);
  return fpl_cuda_glue::class_backward(kRuntime, grad_rows, grad_cols, q, w, labels, rows, cols, centers_per_class,
                                       terms, flags, need_grad_w);
}

std::tuple<Tensor, Tensor, Tensor> triplet_engine_forward(const Tensor& q, const Tensor& r, const Tensor& labels_q,
                                                          const Tensor& labels_r, const Tensor& exclude_col,
                                                          double margin, bool lp, double window_lo, double window_hi) {
  check_cpu(q);
  return fpl_cuda_glue::triplet_forward(kRuntime, q, r, labels_q, labels_r, exclude_col, margin, lp, window_lo,
                                        window_hi);
}

std::tuple<Tensor, Tensor> triplet_engine_backward(const Tensor& grad_sums, const Tensor& q, const Tensor& r,
                                                   const Tensor& labels_q, const Tensor& labels_r,
                                                   const Tensor& exclude_col, double margin, bool lp, double window_lo,
                                                   double window_hi, bool need_grad_q, bool need_grad_r) {
  check_cpu(q);
  return fpl_cuda_glue::triplet_backward(kRuntime, grad_sums, q, r, labels_q, labels_r, exclude_col, margin, lp,
                                         window_lo, window_hi, need_grad_q, need_grad_r);
}

std::tuple<Tensor, Tensor> triplet_bins_engine_forward(const Tensor& q, const Tensor& r, const Tensor& labels_q,
                                                       const Tensor& labels_r, const Tensor& exclude_col, double lo,
                                                       double width, int64_t bins) {
  check_cpu(q);
  return fpl_cuda_glue::triplet_bins_forward(kRuntime, q, r, labels_q, labels_r, exclude_col, lo, width, bins);
}

std::tuple<Tensor, Tensor> triplet_bins_engine_backward(const Tensor& grad_bins, const Tensor& q, const Tensor& r,
                                                        const Tensor& labels_q, const Tensor& labels_r,
                                                        const Tensor& exclude_col, double lo, double width,
                                                        int64_t bins, bool need_grad_q, bool need_grad_r) {
  check_cpu(q);
  return fpl_cuda_glue::triplet_bins_backward(kRuntime, grad_bins, q, r, labels_q, labels_r, exclude_col, lo, width,
                                              bins, need_grad_q, need_grad_r);
}

}  // namespace

TORCH_LIBRARY(fpl_cuda_emu, m) {
  // the schemas of csrc/ops.cpp (row_shift's default included)
  m.def(
      "pair_engine_forward(Tensor q, Tensor? r, Tensor labels_q, Tensor? labels_r, Tensor? exclude_col, "
      "float[] terms, int flags, Tensor? row_shift=None) -> (Tensor values, Tensor counts, Tensor aux)",
      &pair_engine_forward);
  m.def(
      "pair_engine_backward(Tensor grad_values, Tensor q, Tensor? r, Tensor labels_q, Tensor? labels_r, "
      "Tensor? exclude_col, Tensor values, Tensor aux, float[] terms, int flags, bool need_grad_r, "
      "Tensor? row_shift=None) -> (Tensor grad_q, Tensor grad_r)",
      &pair_engine_backward);
  m.def("class_engine_forward", &class_engine_forward);
  m.def("class_engine_backward", &class_engine_backward);
  m.def("triplet_engine_forward", &triplet_engine_forward);
  m.def("triplet_engine_backward", &triplet_engine_backward);
  m.def("triplet_bins_engine_forward", &triplet_bins_engine_forward);
  m.def("triplet_bins_engine_backward", &triplet_bins_engine_backward);
}
