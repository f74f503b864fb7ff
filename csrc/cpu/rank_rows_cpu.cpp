// CPU kernels of Smooth-AP's cubic part: fused_pairloss::smooth_ap_chunk_ranks / _grad (semantics:
// fused_pairloss/losses/smooth_ap.py, which computes the chunk's similarities S and the products
// with the rows around these two).
//
// Anchor a = first_row + i of a chunk, its block the columns [b0, b0 + b), b0 = a - a mod b; for
// each p of the block, over the columns j != b0 + p, sig = sigmoid((S_aj - S_a,b0+p) / t):
//   ranks:  AP_a = (1 / b) sum_p P_p / R_p,  R_p = 1 + sum_j sig,  P_p = 1 + sum_{j in block} sig;
//   grad:   G_a = d(sum_a g_a AP_a) / dS_a, with dL/dP_p = g_a / (b R_p), dL/dR_p = -g_a P_p / (b R_p^2).
// A row costs b N sigmoids (the per-ISA row kernels, vector code); rows are independent, so the
// result does not depend on the thread count. Memory: the chunk and a padded row per thread.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "cpu/cpu_kernels.h"
#include "cpu/engine_glue.h"

namespace fpl {
namespace cpu {
namespace {

using at::Tensor;

constexpr int64_t kLaneChunk = 16;  // the row kernels' padding

void check_chunk(const char* op, const Tensor& S, int64_t first_row, int64_t block, double temperature) {
  TORCH_CHECK(S.device().is_cpu() && S.dim() == 2 && S.is_contiguous(), op,
              ": S must be a contiguous 2-D CPU tensor (a chunk of rows of S)");
  TORCH_CHECK(S.scalar_type() == at::kFloat || S.scalar_type() == at::kDouble, op, ": S must be float32 or float64");
  const int64_t c = S.size(0), N = S.size(1);
  TORCH_CHECK(block >= 1 && N % block == 0, op, ": block must divide the number of columns (", N, "); got ", block);
  TORCH_CHECK(first_row >= 0 && first_row + c <= N, op, ": rows [", first_row, ", ", first_row + c,
              ") are not rows of a batch of ", N);
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0; got ", temperature);
}

// Runs f(i, row, scratch) for each row i of the chunk, the row copied into a zero-padded buffer;
// scratch: another padded buffer of the thread.
template <typename T, typename F>
void for_each_row(const Tensor& S, const F& f) {
  const int64_t c = S.size(0), N = S.size(1), pad = (N + kLaneChunk - 1) / kLaneChunk * kLaneChunk;
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
  const int64_t N = S.size(1), pad = (N + kLaneChunk - 1) / kLaneChunk * kLaneChunk;
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
}
