// The values of a miner's listed pairs (fused_pairloss/ops/listed.py): fused_pairloss::listed_pair_values.
// v[k] = S of the pair (rows[k], cols[k]) of q against r, or for lp its distance d, with the bits the
// pair and triplet engines' tiles hold for that pair (cpu_kernels.h "Determinism": an element's bits
// depend on its two rows only). So a loss given an indices_tuple decides each pair's relu kink,
// margin and mining threshold exactly as the same loss fused over the label sets (PML's
// CrossBatchMemory compares the two), whatever BLAS would have computed.
//
// A dense list (at least one pair in kDenseFraction of the N x M entries, rows ascending: PML's
// CrossBatchMemory lists all of them) is computed by the triplet engine's strips of u (engine_glue.h
// UStrips), then read at the listed pairs; any other list pair by pair
// (Kernels::listed_pair_values, the same chain per element). Memory: the output, the squared norms
// and, for a dense list, the packed r and one strip per thread.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/cpu_kernels.h"
#include "cpu/engine_glue.h"

namespace fpl {
namespace cpu {
namespace {

using at::Tensor;
using namespace glue;

constexpr int64_t kDenseFraction = 64;                // ops/listed.py DENSE_FRACTION
constexpr int64_t kStripElements = int64_t(1) << 20;  // S entries of one strip, at most
constexpr int64_t kMaxStripRows = 256;
constexpr int64_t kPairsPerItem = 4096;  // pairs of one work item of the pair-by-pair path

template <typename T>
void dense_values(const Kernels<T>& K, const Tensor& q, const Tensor& r, const int64_t* rows, const int64_t* cols,
                  int64_t n, bool lp, T* out) {
  const UStrips<T> u(K, q, r, lp, kStripElements, kMaxStripRows);
  const int64_t ld = u.ld;
  tile_parallel(
      u.strips(), parallel_work(u.N, u.M, u.D), [&] { return std::vector<T>(u.strip_rows * ld); },
      [&](int64_t s, std::vector<T>& U) {
        const int64_t i0 = s * u.strip_rows, ti = std::min(u.strip_rows, u.N - i0);
        const int64_t k0 = std::lower_bound(rows, rows + n, i0) - rows;
        const int64_t k1 = std::lower_bound(rows + k0, rows + n, i0 + ti) - rows;
        if (k1 == k0) return;
        u.fill(i0, ti, U.data());
        for (int64_t k = k0; k < k1; ++k) {
          const T v = U[(rows[k] - i0) * ld + cols[k]];
          out[k] = lp ? v : -v;  // u = d, or -S
        }
      });
}

template <typename T>
Tensor listed_values(const Tensor& q_in, const Tensor& r_in, const Tensor& rows_in, const Tensor& cols_in, bool lp) {
  const Kernels<T>& K = active_kernels<T>();
  const Tensor q = q_in.contiguous(), r = r_in.contiguous();
  const Tensor rows = rows_in.contiguous(), cols = cols_in.contiguous();
  const int64_t N = q.size(0), M = r.size(0), D = q.size(1), n = rows.numel();
  Tensor out = at::empty({n}, q.options());
  if (n == 0) return out;
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* cp = cols.data_ptr<int64_t>();
  for (int64_t k = 0; k < n; ++k)
    TORCH_CHECK(rp[k] >= 0 && rp[k] < N && cp[k] >= 0 && cp[k] < M, "listed_pair_values: pair ", k, " (", rp[k], ", ",
                cp[k], ") lies outside q's ", N, " rows x r's ", M, " rows");
  T* o = out.data_ptr<T>();
  if (n * kDenseFraction >= N * M && std::is_sorted(rp, rp + n)) {
    dense_values<T>(K, q, r, rp, cp, n, lp, o);
    return out;
  }
  Tensor norm_q, norm_r;
  if (lp) {
    norm_q = squared_norms<T>(q, D);
    norm_r = squared_norms<T>(r, D);
  }
  const T* nq = lp ? norm_q.data_ptr<T>() : nullptr;
  const T* nr = lp ? norm_r.data_ptr<T>() : nullptr;
  const T* qp = q.data_ptr<T>();
  const T* rptr = r.data_ptr<T>();
  const int64_t items = (n + kPairsPerItem - 1) / kPairsPerItem;
  tile_parallel(
      items, parallel_work(n, 1, D), [] { return 0; },
      [&](int64_t item, int) {
        const int64_t k0 = item * kPairsPerItem, k1 = std::min(n, k0 + kPairsPerItem);
        K.listed_pair_values(qp, D, rptr, D, D, nq, nr, rp + k0, cp + k0, k1 - k0, o + k0);
      });
  return out;
}

Tensor listed_pair_values_cpu(const Tensor& q, const Tensor& r, const Tensor& rows, const Tensor& cols, bool lp) {
  TORCH_CHECK(q.device().is_cpu() && r.device().is_cpu() && rows.device().is_cpu() && cols.device().is_cpu(),
              "listed_pair_values (cpu): every operand must be a CPU tensor");
  TORCH_CHECK(q.dim() == 2 && r.dim() == 2 && q.size(1) == r.size(1),
              "listed_pair_values: q and r must be 2-D with the same number of columns, got ", q.sizes(), " and ",
              r.sizes());
  TORCH_CHECK(q.scalar_type() == r.scalar_type() && (q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble),
              "listed_pair_values: q and r must both be float32 or both float64, got ", q.scalar_type(), " and ",
              r.scalar_type());
  TORCH_CHECK(rows.dim() == 1 && cols.dim() == 1 && rows.numel() == cols.numel() && rows.scalar_type() == at::kLong &&
                  cols.scalar_type() == at::kLong,
              "listed_pair_values: rows and cols must be int64 vectors of one length, got ", rows.scalar_type(), " ",
              rows.sizes(), " and ", cols.scalar_type(), " ", cols.sizes());
  return q.scalar_type() == at::kDouble ? listed_values<double>(q, r, rows, cols, lp)
                                        : listed_values<float>(q, r, rows, cols, lp);
}

}  // namespace
}  // namespace cpu
}  // namespace fpl

TORCH_LIBRARY_IMPL(fused_pairloss, CPU, m) { m.impl("listed_pair_values", &fpl::cpu::listed_pair_values_cpu); }
