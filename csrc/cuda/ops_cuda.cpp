// The CUDA kernels of the fused ops (pair, class and triplet engines) (schemas: csrc/ops.cpp, semantics:
// fused_pairloss/ops/README.md): the device checks, the device guard and the current PyTorch
// stream around the shared host glue (glue.h), which calls the launchers of pair_engine.cu /
// class_engine.cu (launchers.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cuda/glue.h"

namespace {

using at::Tensor;

void check_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fused_pairloss (cuda): ", name, " must be a CUDA tensor; got ", t.device());
}

fpl_cuda_glue::Runtime runtime(const Tensor& q) {
  return {"cuda", c10::cuda::getCurrentCUDAStream(q.device().index()).stream(), &cudaGetErrorString};
}

std::tuple<Tensor, Tensor, Tensor> pair_engine_forward_cuda(const Tensor& q, const std::optional<Tensor>& r,
                                                            const Tensor& labels_q,
                                                            const std::optional<Tensor>& labels_r,
                                                            const std::optional<Tensor>& exclude_col,
                                                            c10::ArrayRef<double> terms, int64_t flags,
                                                            const std::optional<Tensor>& row_shift) {
  check_cuda(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  return fpl_cuda_glue::pair_forward(runtime(q), q, r, labels_q, labels_r, exclude_col, terms, flags, row_shift);
}

std::tuple<Tensor, Tensor> pair_engine_backward_cuda(const Tensor& grad_values, const Tensor& q,
                                                     const std::optional<Tensor>& r, const Tensor& labels_q,
                                                     const std::optional<Tensor>& labels_r,
                                                     const std::optional<Tensor>& exclude_col, const Tensor& values,
                                                     const Tensor& aux, c10::ArrayRef<double> terms, int64_t flags,
                                                     bool need_grad_r, const std::optional<Tensor>& row_shift) {
  check_cuda(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  return fpl_cuda_glue::pair_backward(runtime(q), grad_values, q, r, labels_q, labels_r, exclude_col, values, aux,
                                      terms, flags, need_grad_r, row_shift);
}

std::tuple<Tensor, Tensor> class_engine_forward_cuda(const Tensor& q, const Tensor& w, const Tensor& labels,
                                                     int64_t centers_per_class, c10::ArrayRef<double> terms,
                                                     int64_t flags) {
  check_cuda(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  return fpl_cuda_glue::class_forward(runtime(q), q, w, labels, centers_per_class, terms, flags);
}

std::tuple<Tensor, Tensor> class_engine_backward_cuda(const Tensor& grad_rows, const Tensor& grad_cols, const Tensor& q,
                                                      const Tensor& w, const Tensor& labels, const Tensor& rows,
                                                      const Tensor& cols, int64_t centers_per_class,
                                                      c10::ArrayRef<double> terms, int64_t flags, bool need_grad_w) {
  check_cuda(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  return fpl_cuda_glue::class_backward(runtime(q), grad_rows, grad_cols, q, w, labels, rows, cols, centers_per_class,
                                       terms, flags, need_grad_w);
}

std::tuple<Tensor, Tensor, Tensor> triplet_engine_forward_cuda(const Tensor& q, const Tensor& r, const Tensor& labels_q,
                                                               const Tensor& labels_r, const Tensor& exclude_col,
                                                               double margin, bool lp, double window_lo,
                                                               double window_hi) {
  check_cuda(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  return fpl_cuda_glue::triplet_forward(runtime(q), q, r, labels_q, labels_r, exclude_col, margin, lp, window_lo,
                                        window_hi);
}

std::tuple<Tensor, Tensor> triplet_engine_backward_cuda(const Tensor& grad_sums, const Tensor& q, const Tensor& r,
                                                        const Tensor& labels_q, const Tensor& labels_r,
                                                        const Tensor& exclude_col, double margin, bool lp,
                                                        double window_lo, double window_hi, bool need_grad_q,
                                                        bool need_grad_r) {
  check_cuda(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  return fpl_cuda_glue::triplet_backward(runtime(q), grad_sums, q, r, labels_q, labels_r, exclude_col, margin, lp,
                                         window_lo, window_hi, need_grad_q, need_grad_r);
}

std::tuple<Tensor, Tensor> triplet_bins_engine_forward_cuda(const Tensor& q, const Tensor& r, const Tensor& labels_q,
                                                            const Tensor& labels_r, const Tensor& exclude_col,
                                                            double lo, double width, int64_t bins) {
  check_cuda(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  return fpl_cuda_glue::triplet_bins_forward(runtime(q), q, r, labels_q, labels_r, exclude_col, lo, width, bins);
}

std::tuple<Tensor, Tensor> triplet_bins_engine_backward_cuda(const Tensor& grad_bins, const Tensor& q, const Tensor& r,
                                                             const Tensor& labels_q, const Tensor& labels_r,
                                                             const Tensor& exclude_col, double lo, double width,
                                                             int64_t bins, bool need_grad_q, bool need_grad_r) {
  check_cuda(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  return fpl_cuda_glue::triplet_bins_backward(runtime(q), grad_bins, q, r, labels_q, labels_r, exclude_col, lo, width,
                                              bins, need_grad_q, need_grad_r);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_pairloss, CUDA, m) {
  m.impl("pair_engine_forward", TORCH_FN(pair_engine_forward_cuda));
  m.impl("pair_engine_backward", TORCH_FN(pair_engine_backward_cuda));
  m.impl("class_engine_forward", TORCH_FN(class_engine_forward_cuda));
  m.impl("class_engine_backward", TORCH_FN(class_engine_backward_cuda));
  m.impl("triplet_engine_forward", TORCH_FN(triplet_engine_forward_cuda));
  m.impl("triplet_engine_backward", TORCH_FN(triplet_engine_backward_cuda));
  m.impl("triplet_bins_engine_forward", TORCH_FN(triplet_bins_engine_forward_cuda));
  m.impl("triplet_bins_engine_backward", TORCH_FN(triplet_bins_engine_backward_cuda));
}
