// CPU kernels of the cubic ranking losses' sigmoids, on a chunk of rows of S computed by their ops
// (fused_pairloss/losses/smooth_ap.py, pnp.py: the chunk's S and the products with the rows are
// theirs). Rows are independent, one padded row per thread: the result does not depend on the
// thread count, and the per-ISA row kernels give every instruction set the same bits.
//
// Smooth-AP (fused_pairloss::smooth_ap_chunk_ranks / _grad). Anchor a = first_row + i, its block
// the columns [b0, b0 + b), b0 = a - a mod b; for each p of the block, over the columns j != b0 + p,
// sig = sigmoid((S_aj - S_a,b0+p) / t):
//   ranks:  AP_a = (1 / b) sum_p P_p / R_p,  R_p = 1 + sum_j sig,  P_p = 1 + sum_{j in block} sig;
//   grad:   G_a = d(sum_a g_a AP_a) / dS_a, with dL/dP_p = g_a / (b R_p), dL/dR_p = -g_a P_p / (b R_p^2).
// A row costs b N sigmoids; the backward computes each p's once.
//
// PNP (fused_pairloss::pnp_chunk_ranks / _grad). For anchor a and each of its listed positive
// columns p (-1: none), rk_ap = sum over the negatives j of PML's clamped sigmoid of S_aj - S_ap
// (the columns' class ids tell the negatives); grad: G_a = d(sum g_ap rk_ap) / dS_a. A row costs
// P N sigmoids (P the list's width); the backward's ranks are recomputed by pnp_chunk_ranks first
// (its g_ap depends on them).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/cpu_kernels.h"
#include "cpu/engine_glue.h"

namespace fpl {
namespace cpu {
namespace {

using at::Tensor;

// The checks of a chunk of rows [first_row, first_row + c) of S, and of the positive scale (a
// temperature) the kernels divide by: they carry column indices (and PNP its class ids) as T and
// multiply by 1 / scale.
void check_rows_of_S(const char* op, const Tensor& S, int64_t first_row, const char* scale_name, double scale) {
  TORCH_CHECK(S.device().is_cpu() && S.dim() == 2 && S.is_contiguous(), op,
              ": S must be a contiguous 2-D CPU tensor (a chunk of rows of S)");
  TORCH_CHECK(S.scalar_type() == at::kFloat || S.scalar_type() == at::kDouble, op, ": S must be float32 or float64");
  const int64_t c = S.size(0), N = S.size(1);
  TORCH_CHECK(first_row >= 0 && first_row + c <= N, op, ": rows [", first_row, ", ", first_row + c,
              ") are not rows of a batch of ", N);
  TORCH_CHECK(scale > 0, op, ": ", scale_name, " must be > 0; got ", scale);
  const bool f32 = S.scalar_type() == at::kFloat;
  TORCH_CHECK(!f32 || N < (int64_t(1) << 24), op, ": float32 rows of S must have fewer than 2^24 columns");
  const double inv = 1.0 / scale;
  TORCH_CHECK(std::isfinite(f32 ? static_cast<double>(static_cast<float>(inv)) : inv), op, ": 1 / ", scale_name,
              " must be finite in S's dtype; got ", scale_name, " ", scale);
}

void check_chunk(const char* op, const Tensor& S, int64_t first_row, int64_t block, double temperature) {
  check_rows_of_S(op, S, first_row, "temperature", temperature);
  const int64_t N = S.size(1);
  TORCH_CHECK(block >= 1 && N % block == 0, op, ": block must divide the number of columns (", N, "); got ", block);
}

// Runs f(i, row, scratch) for each row i of the chunk, the row copied into a zero-padded buffer;
// scratch: another padded buffer of the thread.
template <typename T, typename F>
void for_each_row(const Tensor& S, const F& f) {
  const int64_t c = S.size(0), N = S.size(1), pad = padded_row_length(N);
  const T* s = S.data_ptr<T>();
  glue::parallel_for(0, c, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> row(pad, T(0)), scratch(pad, T(0));
    for (int64_t i = begin; i < end; ++i) {
      std::copy(s + i * N, s + (i + 1) * N, row.begin());
      f(i, row.data(), scratch.data());
    }
  });
}

template <typename T>
Tensor ranks_impl(const Tensor& S, int64_t first_row, int64_t block, double temperature) {
  const Kernels<T>& K = active_kernels<T>();
  const int64_t N = S.size(1);
  Tensor ap = at::empty({S.size(0)}, S.options());
  T* out = ap.data_ptr<T>();
  const T inv_t = T(1.0 / temperature);
  for_each_row<T>(S, [&](int64_t i, const T* row, T*) {
    std::vector<T> rank(block), block_rank(block);
    const int64_t a = first_row + i;
    K.smooth_ap_row_ranks(row, N, a - a % block, block, inv_t, rank.data(), block_rank.data());
    T sum = T(0);
    for (int64_t p = 0; p < block; ++p) sum += block_rank[p] / rank[p];
    out[i] = sum / T(block);
  });
  return ap;
}

template <typename T>
Tensor grad_impl(const Tensor& S, const Tensor& grad_ap, int64_t first_row, int64_t block, double temperature) {
  const Kernels<T>& K = active_kernels<T>();
  const int64_t N = S.size(1), pad = padded_row_length(N);
  Tensor G = at::empty_like(S);
  T* out = G.data_ptr<T>();
  const T* g = grad_ap.data_ptr<T>();
  const T inv_t = T(1.0 / temperature);
  for_each_row<T>(S, [&](int64_t i, const T* row, T* sig) {
    std::vector<T> G_row(pad, T(0));
    const int64_t a = first_row + i;
    K.smooth_ap_row_grad(row, N, a - a % block, block, inv_t, g[i] / T(block), sig, G_row.data());
    std::copy(G_row.begin(), G_row.begin() + N, out + i * N);
  });
  return G;
}

void check_pnp(const char* op, const Tensor& S, const Tensor& class_ids, const Tensor& positives, int64_t first_row,
               double anneal) {
  check_rows_of_S(op, S, first_row, "anneal", anneal);
  const int64_t c = S.size(0), N = S.size(1);
  TORCH_CHECK(class_ids.dim() == 1 && class_ids.size(0) == N && class_ids.scalar_type() == S.scalar_type() &&
                  class_ids.is_contiguous() && class_ids.device().is_cpu(),
              op, ": class_ids must be a contiguous CPU vector of S's columns and dtype");
  TORCH_CHECK(positives.dim() == 2 && positives.size(0) == c && positives.scalar_type() == at::kLong &&
                  positives.is_contiguous() && positives.device().is_cpu(),
              op, ": positives must be a contiguous int64 CPU tensor with a row per row of S");
  const int64_t* pos = positives.data_ptr<int64_t>();
  for (int64_t k = 0; k < positives.numel(); ++k)
    TORCH_CHECK(pos[k] >= -1 && pos[k] < N, op, ": positives must be columns of S or -1; got ", pos[k]);
}

template <typename T>
Tensor pnp_ranks_impl(const Tensor& S, const Tensor& class_ids, const Tensor& positives, int64_t first_row,
                      double anneal) {
  const Kernels<T>& K = active_kernels<T>();
  const int64_t N = S.size(1), P = positives.size(1);
  const std::vector<T> ids = glue::padded_row<T>(class_ids);
  Tensor rk = at::empty({S.size(0), P}, S.options());
  T* out = rk.data_ptr<T>();
  const int64_t* pos = positives.data_ptr<int64_t>();
  for_each_row<T>(S, [&](int64_t i, const T* row, T*) {
    K.pnp_row_ranks(row, ids.data(), N, ids[first_row + i], pos + i * P, P, T(1.0 / anneal), out + i * P);
  });
  return rk;
}

template <typename T>
Tensor pnp_grad_impl(const Tensor& S, const Tensor& class_ids, const Tensor& positives, const Tensor& grad_rk,
                     int64_t first_row, double anneal) {
  const Kernels<T>& K = active_kernels<T>();
  const int64_t N = S.size(1), P = positives.size(1), pad = padded_row_length(N);
  const std::vector<T> ids = glue::padded_row<T>(class_ids);
  Tensor G = at::empty_like(S);
  T* out = G.data_ptr<T>();
  const int64_t* pos = positives.data_ptr<int64_t>();
  const T* g = grad_rk.data_ptr<T>();
  for_each_row<T>(S, [&](int64_t i, const T* row, T* sig) {
    std::vector<T> pass(pad, T(0)), G_row(pad, T(0));
    K.pnp_row_grad(row, ids.data(), N, ids[first_row + i], pos + i * P, P, T(1.0 / anneal), g + i * P, sig, pass.data(),
                   G_row.data());
    std::copy(G_row.begin(), G_row.begin() + N, out + i * N);
  });
  return G;
}

Tensor pnp_chunk_ranks_cpu(const Tensor& S, const Tensor& class_ids, const Tensor& positives, int64_t first_row,
                           double anneal) {
  check_pnp("pnp_chunk_ranks", S, class_ids, positives, first_row, anneal);
  if (S.scalar_type() == at::kDouble) return pnp_ranks_impl<double>(S, class_ids, positives, first_row, anneal);
  return pnp_ranks_impl<float>(S, class_ids, positives, first_row, anneal);
}

Tensor pnp_chunk_grad_cpu(const Tensor& S, const Tensor& class_ids, const Tensor& positives, const Tensor& grad_rk,
                          int64_t first_row, double anneal) {
  check_pnp("pnp_chunk_grad", S, class_ids, positives, first_row, anneal);
  TORCH_CHECK(grad_rk.sizes() == positives.sizes() && grad_rk.scalar_type() == S.scalar_type() &&
                  grad_rk.is_contiguous() && grad_rk.device().is_cpu(),
              "pnp_chunk_grad: grad_rk must be a contiguous CPU tensor of positives' shape and S's dtype");
  if (S.scalar_type() == at::kDouble) return pnp_grad_impl<double>(S, class_ids, positives, grad_rk, first_row, anneal);
  return pnp_grad_impl<float>(S, class_ids, positives, grad_rk, first_row, anneal);
}

Tensor smooth_ap_chunk_ranks_cpu(const Tensor& S, int64_t first_row, int64_t block, double temperature) {
  check_chunk("smooth_ap_chunk_ranks", S, first_row, block, temperature);
  if (S.scalar_type() == at::kDouble) return ranks_impl<double>(S, first_row, block, temperature);
  return ranks_impl<float>(S, first_row, block, temperature);
}

Tensor smooth_ap_chunk_grad_cpu(const Tensor& S, const Tensor& grad_ap, int64_t first_row, int64_t block,
                                double temperature) {
  check_chunk("smooth_ap_chunk_grad", S, first_row, block, temperature);
  TORCH_CHECK(grad_ap.device().is_cpu() && grad_ap.dim() == 1 && grad_ap.size(0) == S.size(0) &&
                  grad_ap.scalar_type() == S.scalar_type() && grad_ap.is_contiguous(),
              "smooth_ap_chunk_grad: grad_ap must be a contiguous CPU vector of S's rows and dtype");
  if (S.scalar_type() == at::kDouble) return grad_impl<double>(S, grad_ap, first_row, block, temperature);
  return grad_impl<float>(S, grad_ap, first_row, block, temperature);
}

}  // namespace
}  // namespace cpu
}  // namespace fpl

TORCH_LIBRARY_IMPL(fused_pairloss, CPU, m) {
  m.impl("smooth_ap_chunk_ranks", &fpl::cpu::smooth_ap_chunk_ranks_cpu);
  m.impl("smooth_ap_chunk_grad", &fpl::cpu::smooth_ap_chunk_grad_cpu);
  m.impl("pnp_chunk_ranks", &fpl::cpu::pnp_chunk_ranks_cpu);
  m.impl("pnp_chunk_grad", &fpl::cpu::pnp_chunk_grad_cpu);
}
