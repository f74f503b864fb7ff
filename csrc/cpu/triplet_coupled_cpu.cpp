// CPU kernels of TripletMarginLoss's swap / smooth_loss terms on a group of (anchor, positive) pairs
// (fused_pairloss/ops/triplets.py, triplet_coupled_rows: the group's u rows and the products with
// the embeddings are its own). Each anchor's pairs are walked by one thread, one padded row at a
// time, so the result does not depend on the thread count. Unlike the engines' work items, these
// run with subnormals kept (no FTZ / DAZ): a term x that is itself a subnormal counts as PML's, and
// there are no GEMMs here for subnormals to slow down.
//
// U (k x M): u rows of the group (distances, or -S) against the M columns; anchor_rows[i] the row of
// U of anchor i, its pairs [pair_offsets[i], pair_offsets[i + 1]); per pair its x0 = u_ap + margin,
// the row of U of its positive (pos_rows, read with swap) and its column p (cols, the backward's).
// class_ids: the columns' dense class ids as T, anchor_ids the anchors'. Per pair, over the
// negatives n: x = x0 - u'_n, u'_n = min(u_an, u_pn) with swap else u_an, the term relu(x) or
// softplus(x) (smooth), kept where > 0 (cpu_kernels.h, kernels_isa.inc: CoupledLanes).
//   sums:          per anchor, the sum of its pairs' kept terms and their number;
//   coefficients:  Wa (c x M) = d(sum_i grad_i sums_i) / d u of the anchors' rows, Wpair (G x M,
//                  swap) = the same with respect to each pair's positive row (the caller adds the
//                  pairs' rows into U's); for lp each divided by its u (0 where u = 0), the
//                  coefficient of the rows' difference q_i - r_j (d d_ij / d q_i = (q_i - r_j) / d_ij).
// And U itself (triplet_u_rows): u of rows of q against every row of r by the engines' GEMM and
// their distance (engine_glue.h UStrips: an element's bits depend on its two rows only), one pass
// where PyTorch's q @ r^T and its distance take a dozen.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/cpu_kernels.h"
#include "cpu/engine_glue.h"  // padded_row, UStrips

namespace fpl {
namespace cpu {
namespace {

using at::Tensor;

constexpr int64_t kStripElements = int64_t(1) << 18;  // u entries of one strip, at most
constexpr int64_t kMaxStripRows = 64;                 // strips enough for every thread on a group's rows

bool is_cpu_vector(const Tensor& t, at::ScalarType dtype, int64_t n) {
  return t.device().is_cpu() && t.dim() == 1 && t.size(0) == n && t.scalar_type() == dtype && t.is_contiguous();
}

void check_group(const char* op, const Tensor& U, const Tensor& class_ids, const Tensor& anchor_ids,
                 const Tensor& anchor_rows, const Tensor& pair_offsets, const Tensor& pair_x0, const Tensor& pos_rows,
                 bool swap) {
  TORCH_CHECK(U.device().is_cpu() && U.dim() == 2 && U.is_contiguous(), op, ": U must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(U.scalar_type() == at::kFloat || U.scalar_type() == at::kDouble, op, ": U must be float32 or float64");
  const auto T = U.scalar_type();
  const int64_t k = U.size(0), M = U.size(1), c = anchor_rows.numel(), G = pair_x0.numel();
  TORCH_CHECK(T != at::kFloat || M < (int64_t(1) << 24), op, ": float32 rows must have fewer than 2^24 columns");
  TORCH_CHECK(is_cpu_vector(class_ids, T, M), op,
              ": class_ids must be a contiguous CPU vector of U's columns and dtype");
  TORCH_CHECK(is_cpu_vector(anchor_ids, T, c), op,
              ": anchor_ids must be a contiguous CPU vector of U's dtype, one per anchor");
  TORCH_CHECK(is_cpu_vector(anchor_rows, at::kLong, c), op, ": anchor_rows must be a contiguous int64 CPU vector");
  TORCH_CHECK(is_cpu_vector(pair_offsets, at::kLong, c + 1), op,
              ": pair_offsets must be a contiguous int64 CPU vector of one more entry than anchor_rows");
  TORCH_CHECK(is_cpu_vector(pair_x0, T, G), op, ": pair_x0 must be a contiguous CPU vector of U's dtype");
  const int64_t* rows = anchor_rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < c; ++i) TORCH_CHECK(rows[i] >= 0 && rows[i] < k, op, ": anchor_rows must be rows of U");
  const int64_t* off = pair_offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[c] == G, op, ": pair_offsets must run from 0 to the number of pairs");
  for (int64_t i = 0; i < c; ++i) TORCH_CHECK(off[i] <= off[i + 1], op, ": pair_offsets must be nondecreasing");
  if (swap) {
    TORCH_CHECK(is_cpu_vector(pos_rows, at::kLong, G), op,
                ": pos_rows must be a contiguous int64 CPU vector, one per pair");
    const int64_t* pr = pos_rows.data_ptr<int64_t>();
    for (int64_t g = 0; g < G; ++g) TORCH_CHECK(pr[g] >= 0 && pr[g] < k, op, ": pos_rows must be rows of U");
  }
}

template <typename T>
std::tuple<Tensor, Tensor> sums_impl(const Tensor& U, const Tensor& class_ids, const Tensor& anchor_ids,
                                     const Tensor& anchor_rows, const Tensor& pair_offsets, const Tensor& pair_x0,
                                     const Tensor& pos_rows, bool swap, bool smooth) {
  const Kernels<T>& K = active_kernels<T>();
  const int64_t M = U.size(1), c = anchor_rows.numel(), pad = padded_row_length(M);
  const std::vector<T> ids = glue::padded_row<T>(class_ids);
  Tensor sums = at::zeros({c}, U.options());
  Tensor counts = at::zeros({c}, U.options().dtype(at::kLong));
  const T *u = U.data_ptr<T>(), *own = anchor_ids.data_ptr<T>(), *x0 = pair_x0.data_ptr<T>();
  const int64_t *rows = anchor_rows.data_ptr<int64_t>(), *off = pair_offsets.data_ptr<int64_t>();
  const int64_t* pr = swap ? pos_rows.data_ptr<int64_t>() : nullptr;
  T* out_sum = sums.data_ptr<T>();
  int64_t* out_count = counts.data_ptr<int64_t>();
  at::parallel_for(0, c, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> ua(pad, T(0)), up(pad, T(0));
    for (int64_t i = begin; i < end; ++i) {
      std::copy(u + rows[i] * M, u + rows[i] * M + M, ua.begin());
      T total = T(0);
      int64_t number = 0;
      for (int64_t g = off[i]; g < off[i + 1]; ++g) {
        if (swap) std::copy(u + pr[g] * M, u + pr[g] * M + M, up.begin());
        T sum;
        int64_t count;
        K.triplet_coupled_pair_sums(ua.data(), swap ? up.data() : nullptr, ids.data(), M, own[i], x0[g], smooth, &sum,
                                    &count);
        total += sum;
        number += count;
      }
      out_sum[i] = total;
      out_count[i] = number;
    }
  });
  return {sums, counts};
}

template <typename T>
std::tuple<Tensor, Tensor> coefficients_impl(const Tensor& U, const Tensor& class_ids, const Tensor& anchor_ids,
                                             const Tensor& anchor_rows, const Tensor& pair_offsets,
                                             const Tensor& pair_x0, const Tensor& pos_rows, const Tensor& cols,
                                             const Tensor& grad, bool swap, bool smooth, bool lp) {
  const Kernels<T>& K = active_kernels<T>();
  const int64_t M = U.size(1), c = anchor_rows.numel(), G = pair_x0.numel(), pad = padded_row_length(M);
  // for lp, a row of coefficients over its row of u (0 where u = 0, NaN included: torch.where(u > 0))
  auto per_difference = [&](const std::vector<T>& w, const std::vector<T>& u_row, T* out) {
    if (!lp) {
      std::copy(w.begin(), w.begin() + M, out);
      return;
    }
    for (int64_t j = 0; j < M; ++j) out[j] = u_row[j] > T(0) ? w[j] / u_row[j] : T(0);
  };
  const std::vector<T> ids = glue::padded_row<T>(class_ids);
  Tensor Wa = at::empty({c, M}, U.options());
  Tensor Wpair = at::empty({swap ? G : 0, M}, U.options());
  const T *u = U.data_ptr<T>(), *own = anchor_ids.data_ptr<T>(), *x0 = pair_x0.data_ptr<T>(), *g = grad.data_ptr<T>();
  const int64_t *rows = anchor_rows.data_ptr<int64_t>(), *off = pair_offsets.data_ptr<int64_t>();
  const int64_t *pr = swap ? pos_rows.data_ptr<int64_t>() : nullptr, *p = cols.data_ptr<int64_t>();
  T *wa = Wa.data_ptr<T>(), *wpair = Wpair.data_ptr<T>();
  at::parallel_for(0, c, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> ua(pad, T(0)), up(pad, T(0)), wa_row(pad), wp_row(pad);
    for (int64_t i = begin; i < end; ++i) {
      std::copy(u + rows[i] * M, u + rows[i] * M + M, ua.begin());
      std::fill(wa_row.begin(), wa_row.end(), T(0));
      for (int64_t k = off[i]; k < off[i + 1]; ++k) {
        if (swap) {
          std::copy(u + pr[k] * M, u + pr[k] * M + M, up.begin());
          std::fill(wp_row.begin(), wp_row.end(), T(0));
        }
        const T d_x0 =
            K.triplet_coupled_pair_coefficients(ua.data(), swap ? up.data() : nullptr, ids.data(), M, own[i], x0[k],
                                                smooth, g[i], wa_row.data(), swap ? wp_row.data() : nullptr);
        wa_row[p[k]] += d_x0;  // x0 = u_ap + margin
        if (swap) per_difference(wp_row, up, wpair + k * M);
      }
      per_difference(wa_row, ua, wa + i * M);
    }
  });
  return {Wa, Wpair};
}

template <typename T>
Tensor u_rows_impl(const Tensor& q, const Tensor& r, bool lp) {
  const int64_t k = q.size(0), M = r.size(0);
  Tensor U = at::empty({k, M}, q.options());
  if (k == 0 || M == 0) return U;
  const glue::UStrips<T> strips(active_kernels<T>(), q, r, lp, kStripElements, kMaxStripRows);
  const int64_t ld = strips.ld;
  T* out = U.data_ptr<T>();
  at::parallel_for(0, strips.strips(), 1, [&](int64_t begin, int64_t end) {
    std::vector<T> strip(strips.strip_rows * ld);
    for (int64_t s = begin; s < end; ++s) {
      const int64_t i0 = s * strips.strip_rows, ti = std::min(strips.strip_rows, k - i0);
      strips.fill(i0, ti, strip.data());
      for (int64_t i = 0; i < ti; ++i) std::copy(strip.data() + i * ld, strip.data() + i * ld + M, out + (i0 + i) * M);
    }
  });
  return U;
}

Tensor triplet_u_rows_cpu(const Tensor& q, const Tensor& r, bool lp) {
  TORCH_CHECK(q.device().is_cpu() && r.device().is_cpu() && q.dim() == 2 && r.dim() == 2 && q.size(1) == r.size(1),
              "triplet_u_rows: q and r must be 2-D CPU tensors of one width");
  TORCH_CHECK(q.scalar_type() == r.scalar_type() && (q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble),
              "triplet_u_rows: q and r must both be float32 or both float64");
  if (q.scalar_type() == at::kDouble) return u_rows_impl<double>(q.contiguous(), r.contiguous(), lp);
  return u_rows_impl<float>(q.contiguous(), r.contiguous(), lp);
}

std::tuple<Tensor, Tensor> triplet_coupled_chunk_sums_cpu(const Tensor& U, const Tensor& class_ids,
                                                          const Tensor& anchor_ids, const Tensor& anchor_rows,
                                                          const Tensor& pair_offsets, const Tensor& pair_x0,
                                                          const Tensor& pos_rows, bool swap, bool smooth) {
  check_group("triplet_coupled_chunk_sums", U, class_ids, anchor_ids, anchor_rows, pair_offsets, pair_x0, pos_rows,
              swap);
  if (U.scalar_type() == at::kDouble)
    return sums_impl<double>(U, class_ids, anchor_ids, anchor_rows, pair_offsets, pair_x0, pos_rows, swap, smooth);
  return sums_impl<float>(U, class_ids, anchor_ids, anchor_rows, pair_offsets, pair_x0, pos_rows, swap, smooth);
}

std::tuple<Tensor, Tensor> triplet_coupled_chunk_coefficients_cpu(const Tensor& U, const Tensor& class_ids,
                                                                  const Tensor& anchor_ids, const Tensor& anchor_rows,
                                                                  const Tensor& pair_offsets, const Tensor& pair_x0,
                                                                  const Tensor& pos_rows, const Tensor& cols,
                                                                  const Tensor& grad, bool swap, bool smooth, bool lp) {
  const char* op = "triplet_coupled_chunk_coefficients";
  check_group(op, U, class_ids, anchor_ids, anchor_rows, pair_offsets, pair_x0, pos_rows, swap);
  TORCH_CHECK(is_cpu_vector(cols, at::kLong, pair_x0.numel()), op,
              ": cols must be a contiguous int64 CPU vector, one per pair");
  const int64_t* p = cols.data_ptr<int64_t>();
  for (int64_t k = 0; k < cols.numel(); ++k)
    TORCH_CHECK(p[k] >= 0 && p[k] < U.size(1), op, ": cols must be columns of U");
  TORCH_CHECK(is_cpu_vector(grad, U.scalar_type(), anchor_rows.numel()), op,
              ": grad must be a contiguous CPU vector of U's dtype, one per anchor");
  if (U.scalar_type() == at::kDouble)
    return coefficients_impl<double>(U, class_ids, anchor_ids, anchor_rows, pair_offsets, pair_x0, pos_rows, cols, grad,
                                     swap, smooth, lp);
  return coefficients_impl<float>(U, class_ids, anchor_ids, anchor_rows, pair_offsets, pair_x0, pos_rows, cols, grad,
                                  swap, smooth, lp);
}

}  // namespace
}  // namespace cpu
}  // namespace fpl

TORCH_LIBRARY_IMPL(fused_pairloss, CPU, m) {
  m.impl("triplet_coupled_chunk_sums", &fpl::cpu::triplet_coupled_chunk_sums_cpu);
  m.impl("triplet_coupled_chunk_coefficients", &fpl::cpu::triplet_coupled_chunk_coefficients_cpu);
  m.impl("triplet_u_rows", &fpl::cpu::triplet_u_rows_cpu);
}
