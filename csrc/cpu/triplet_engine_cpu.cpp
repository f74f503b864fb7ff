// CPU kernels of the all-triplets op: fused_pairloss::triplet_engine_forward / _backward
// (semantics: fused_pairloss/ops/triplets.py and docs/design.md "Triplets").
//
// Per anchor row i, with u = d (lp) or u = -S (cosine), A_p = u_ip + margin over its positives (same
// label, column != exclude_col_i) and B_n = u_in over its negatives (other label):
//   sums_i   = sum_{p,n} relu(A_p - B_n),   counts_i = #{(p, n) : A_p > B_n},
//   d sums_i / d A_p = k_p = #{n : B_n < A_p},   d sums_i / d B_n = -c_n,  c_n = #{p : A_p > B_n};
// with a miner's window (TripletMarginMiner's type_of_triplets) only the (p, n) with
// lo < B_n - u_ap <= hi count, and in_window_i = #{(p, n) in the window} (the miner's triplets).
// No triplet is enumerated and nothing of size N x M exists: rows go in strips of ti rows against all
// M columns (ti * M <= kStripElements), the strip's S computed by the engine's GEMM (cpu_kernels.h:
// the same bits in the forward and the backward, whatever the strip or the thread). A row's positives
// come from r's labels sorted once (no scan of the row); their columns (and the excluded one) are
// then set to +inf in the row, so what is left finite are the negatives. A row with few positives
// (P <= kDirectPositives) makes one vector pass over the row per positive (the per-ISA kernels
// triplet_row_*); one with more sorts its A and finds each negative's place among them by binary
// search, summing from suffix sums (O(M log P)).
//
// Backward: per strip, G = dL/dS (-g_i coef_ij / d_ij for lp, -g_i coef_ij for the cosine, as the pair
// engine's G), then dq_I += G r, dr += G^T q_I. dr is accumulated in kGroups private buffers, one per
// fixed group of strips (a group's strips in order, the groups summed in order): the result depends
// on the shapes only, never on the thread count. Memory: O((N + M) D) operands, kGroups x M x D for
// dr, two strips of ti x M per thread.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "common/op_checks.h"
#include "cpu/cpu_kernels.h"
#include "cpu/engine_glue.h"

namespace fpl {
namespace cpu {
namespace {

using at::Tensor;
using namespace glue;

constexpr int64_t kStripElements = int64_t(1) << 20;  // S entries of one strip, at most
constexpr int64_t kMaxStripRows = 256;
constexpr int64_t kDirectPositives = 256;             // rows with more positives use the binary search
constexpr int64_t kGroups = 8;                        // private dr buffers (shape-determined)
constexpr int64_t kGroupBudget = int64_t(256) << 20;  // bytes of private dr buffers, at most

// The strips of u (engine_glue.h UStrips), the labels and the margin / window of one call.
template <typename T>
struct TripletOperands : UStrips<T> {
  Tensor labels_q, excl;              // int64 (N)
  Tensor sorted_labels_r, columns_r;  // r's labels ascending, and their columns (a stable sort)
  T margin;
  bool has_window;  // a miner's window on u_n - u_ap: (window[0], window[1]]
  T window[2];
};

template <typename T>
TripletOperands<T> prepare(const Tensor& q, const Tensor& r, const Tensor& labels_q, const Tensor& labels_r,
                           const Tensor& exclude_col, double margin, bool lp, double window_lo, double window_hi) {
  TripletOperands<T> o;
  static_cast<UStrips<T>&>(o) = UStrips<T>(active_kernels<T>(), q, r, lp, kStripElements, kMaxStripRows);
  o.labels_q = labels_q.to(at::kLong).contiguous();
  auto sorted = at::sort(labels_r.to(at::kLong), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  o.sorted_labels_r = std::get<0>(sorted).contiguous();
  o.columns_r = std::get<1>(sorted).contiguous();
  o.excl = exclude_col.to(at::kLong).contiguous();
  o.margin = static_cast<T>(margin);
  o.has_window = !(std::isinf(window_lo) && window_lo < 0 && std::isinf(window_hi) && window_hi > 0);
  o.window[0] = static_cast<T>(window_lo);
  o.window[1] = static_cast<T>(window_hi);
  return o;
}

// One positive of a row: its threshold A = u + margin, its column and its u.
template <typename T>
struct Positive {
  T A;
  int64_t col;
  T u;
  bool operator<(const Positive& other) const { return A < other.A; }
};

// A row's scratch: its positives, their thresholds A and their u (a), per positive k_p; the bins'
// weights.
template <typename T>
struct RowScratch {
  std::vector<Positive<T>> pos;
  std::vector<T> A, a, weight;
  std::vector<double> suffix;
  std::vector<int64_t> k;
};

// The binary search among the sorted A serves rows with many positives and no window.
template <typename T>
bool binary_search_path(const TripletOperands<T>& o, int64_t P) {
  return P > kDirectPositives && !o.has_window;
}

// The columns of r that carry row i's label, ascending (r's labels sorted stably once): [first, last).
template <typename T>
std::pair<const int64_t*, const int64_t*> label_columns(const TripletOperands<T>& o, int64_t i) {
  const int64_t li = o.labels_q.template data_ptr<int64_t>()[i];
  const int64_t* lab = o.sorted_labels_r.template data_ptr<int64_t>();
  const int64_t* col = o.columns_r.template data_ptr<int64_t>();
  const auto range = std::equal_range(lab, lab + o.M, li);
  return {col + (range.first - lab), col + (range.second - lab)};
}

// Row i's positives (the columns of its label but exclude_col_i; a NaN u is in no term and is left
// out), and every column of its label set to NaN in u: what is left not NaN are the negatives.
// Sorted by A when the row takes the binary-search path.
template <typename T>
void take_positives(const TripletOperands<T>& o, int64_t i, T* u, RowScratch<T>& rs) {
  rs.pos.clear();
  const int64_t ex = o.excl.template data_ptr<int64_t>()[i];
  const auto cols = label_columns(o, i);
  for (const int64_t* c = cols.first; c != cols.second; ++c) {
    const int64_t j = *c;
    if (j != ex && u[j] == u[j]) rs.pos.push_back(Positive<T>{u[j] + o.margin, j, u[j]});
    u[j] = std::numeric_limits<T>::quiet_NaN();
  }
  const int64_t P = static_cast<int64_t>(rs.pos.size());
  if (binary_search_path(o, P)) std::sort(rs.pos.begin(), rs.pos.end());
  rs.A.resize(P);
  rs.a.resize(P);
  for (int64_t p = 0; p < P; ++p) {
    rs.A[p] = rs.pos[p].A;
    rs.a[p] = rs.pos[p].u;
  }
}

// #{p : A_p <= b} over ascending A: b's bucket
template <typename T>
int64_t bucket_of(const std::vector<T>& A, T b) {
  return std::upper_bound(A.begin(), A.end(), b) - A.begin();
}

// Per row: sums_i, counts_i and the number of (p, n) in the window.
template <typename T>
void row_forward(const TripletOperands<T>& o, int64_t i, T* u, RowScratch<T>& rs, T* sums, int64_t* counts,
                 int64_t* in_window) {
  take_positives(o, i, u, rs);
  const std::vector<T>& A = rs.A;
  const int64_t P = static_cast<int64_t>(A.size());
  double s = 0.0;
  int64_t c = 0, w = 0;
  if (P > 0 && !binary_search_path(o, P)) {
    o.K->triplet_row_sums(u, o.M, A.data(), rs.a.data(), P, o.has_window ? o.window : nullptr, &s, &c, &w);
  } else if (P > 0) {  // the negatives' buckets among the sorted A, sums from suffix sums
    rs.suffix.assign(P + 1, 0.0);
    for (int64_t p = P - 1; p >= 0; --p) rs.suffix[p] = rs.suffix[p + 1] + static_cast<double>(A[p]);
    for (int64_t j = 0; j < o.M; ++j) {
      if (u[j] != u[j]) continue;
      w += P;
      const int64_t above = P - bucket_of(A, u[j]);  // the A_p > u_j
      if (above == 0) continue;
      s += rs.suffix[P - above] - static_cast<double>(above) * static_cast<double>(u[j]);
      c += above;
    }
  }
  sums[i] = static_cast<T>(s);
  counts[i] = c;
  in_window[i] = w;
}

// Per row: G_ij = dL/dS_ij for the incoming gradient g of sums_i (lp: dL/dd_ij = g coef_ij and
// dd/dS = -1/d, 0 at d = 0; cosine: dL/du_ij = g coef_ij, du/dS = -1).
template <typename T>
void row_backward(const TripletOperands<T>& o, int64_t i, T* u, T g, RowScratch<T>& rs, T* G) {
  take_positives(o, i, u, rs);
  const std::vector<T>& A = rs.A;
  const int64_t P = static_cast<int64_t>(A.size());
  std::vector<int64_t>& k = rs.k;
  k.assign(P + 1, 0);
  if (!binary_search_path(o, P)) {
    o.K->triplet_row_coefficients(u, o.M, A.data(), rs.a.data(), P, o.has_window ? o.window : nullptr, G, k.data());
  } else {
    std::vector<int64_t>& hist = k;  // hist[t]: the negatives in bucket t
    for (int64_t j = 0; j < o.M; ++j) {
      const int64_t t = bucket_of(A, u[j]);  // a NaN u is past every A: in no term
      G[j] = -static_cast<T>(P - t);
      ++hist[t];
    }
    for (int64_t p = 1; p < P; ++p) hist[p] += hist[p - 1];  // k_p = #{n : bucket <= p}
  }
  o.K->triplet_row_grad(u, o.M, g, o.lp, G);
  for (int64_t p = 0; p < P; ++p) {
    const T kp = static_cast<T>(k[p]), up = rs.pos[p].u;
    G[rs.pos[p].col] = o.lp ? (up > T(0) ? -g * kp / up : T(0)) : -g * kp;
  }
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> forward_impl(const TripletOperands<T>& o) {
  Tensor sums = at::zeros({o.N}, o.q.options());
  Tensor counts = at::zeros({o.N}, o.q.options().dtype(at::kLong));
  Tensor in_window = at::zeros({o.N}, o.q.options().dtype(at::kLong));
  if (o.N == 0 || o.M == 0) return {sums, counts, in_window};
  T* sp = sums.template data_ptr<T>();
  int64_t* cp = counts.template data_ptr<int64_t>();
  int64_t* wp = in_window.template data_ptr<int64_t>();
  const int64_t TI = o.strip_rows, nb = (o.N + TI - 1) / TI;
  struct Scratch {
    std::vector<T> U;
    RowScratch<T> row;
  };
  tile_parallel(
      nb, parallel_work(o.N, o.M, o.D), [&] { return Scratch{std::vector<T>(TI * o.ld), {}}; },
      [&](int64_t b, Scratch& sc) {
        const int64_t i0 = b * TI, ti = std::min(TI, o.N - i0);
        o.fill(i0, ti, sc.U.data());
        for (int64_t i = 0; i < ti; ++i) row_forward(o, i0 + i, sc.U.data() + i * o.ld, sc.row, sp, cp, wp);
      });
  return {sums, counts, in_window};
}

// dq, dr of a loss whose dL/dS per row `row_G(i, u, rs, G)` gives (u: the row's u, its columns that are
// no negative NaN after take_positives), strip by strip.
template <typename T, typename RowG>
std::tuple<Tensor, Tensor> backward_impl(const TripletOperands<T>& o, bool need_q, bool need_r, RowG row_G) {
  const auto opts = o.q.options();
  const int64_t N = o.N, M = o.M, Dp = o.Dp;
  Tensor dq = at::zeros({need_q ? N : 0, Dp}, opts);
  Tensor dr = at::zeros({need_r ? M : 0, Dp}, opts);
  if (N == 0 || M == 0 || !(need_q || need_r)) return {dq, dr};
  const T* qp = o.q.template data_ptr<T>();
  const T* rp = o.r.template data_ptr<T>();
  const Tensor q_cols = need_r ? pack_columns(*o.K, o.q) : Tensor();
  const Tensor r_cols = need_q ? pack_columns(*o.K, o.r) : Tensor();
  const int64_t TI = o.strip_rows, nb = (N + TI - 1) / TI;
  int64_t groups = std::min(nb, kGroups);
  if (need_r) groups = std::max<int64_t>(1, std::min(groups, kGroupBudget / std::max<int64_t>(1, M * Dp * sizeof(T))));
  // per group: its dr partial (M x Dp) and the column sums of its G (lp)
  Tensor dr_part = need_r ? at::zeros({groups, M, Dp}, opts) : Tensor();
  std::vector<std::vector<T>> col_sums(need_r && o.lp ? groups : 0, std::vector<T>(M, T(0)));
  std::vector<T> row_sums(o.lp ? N : 0, T(0));
  struct Scratch {
    std::vector<T> U, G, Gt;
    RowScratch<T> row;
  };
  tile_parallel(
      groups, parallel_work(N, M, o.D),
      [&] {
        return Scratch{std::vector<T>(TI * o.ld), std::vector<T>(TI * o.ld), std::vector<T>(need_r ? TI * M : 0), {}};
      },
      [&](int64_t grp, Scratch& sc) {
        for (int64_t b = nb * grp / groups; b < nb * (grp + 1) / groups; ++b) {
          const int64_t i0 = b * TI, ti = std::min(TI, N - i0);
          o.fill(i0, ti, sc.U.data());
          for (int64_t i = 0; i < ti; ++i) row_G(i0 + i, sc.U.data() + i * o.ld, sc.row, sc.G.data() + i * o.ld);
          if (o.lp) add_row_sums(sc.G.data(), o.ld, static_cast<int>(ti), static_cast<int>(M), row_sums.data() + i0);
          if (need_q)
            o.K->gemm_nn_acc(sc.G.data(), o.ld, r_cols.template data_ptr<T>(), M, 0, ti, Dp, M,
                             dq.template data_ptr<T>() + i0 * Dp, Dp);
          if (need_r) {
            // dr += G^T q_I from G^T stored row-major (G's strided columns would cost a page per row)
            transpose(sc.G.data(), static_cast<int>(ti), static_cast<int>(M), o.ld, sc.Gt.data(), TI);
            o.K->gemm_nn_acc(sc.Gt.data(), TI, q_cols.template data_ptr<T>(), N, i0, M, Dp, ti,
                             dr_part[grp].template data_ptr<T>(), Dp);
            if (o.lp) add_col_sums(sc.G.data(), o.ld, static_cast<int>(ti), static_cast<int>(M), col_sums[grp].data());
          }
        }
      });
  if (need_q && o.lp) add_norm_gradient(dq.template data_ptr<T>(), qp, row_sums.data(), N, Dp);
  if (need_r) {
    T* drp = dr.template data_ptr<T>();
    for (int64_t grp = 0; grp < groups; ++grp) {  // in group order
      const T* part = dr_part[grp].template data_ptr<T>();
      for (int64_t e = 0; e < M * Dp; ++e) drp[e] += part[e];
    }
    if (o.lp) {
      std::vector<T> total(M, T(0));
      for (int64_t grp = 0; grp < groups; ++grp)
        for (int64_t j = 0; j < M; ++j) total[j] += col_sums[grp][j];
      add_norm_gradient(drp, rp, total.data(), M, Dp);
    }
  }
  return {dq, dr};
}

template <typename T>
std::tuple<Tensor, Tensor> hinge_backward(const TripletOperands<T>& o, const Tensor& grad_sums, bool need_q,
                                          bool need_r) {
  const T* g = grad_sums.template data_ptr<T>();
  return backward_impl(o, need_q, need_r,
                       [&](int64_t i, T* u, RowScratch<T>& rs, T* G) { row_backward(o, i, u, g[i], rs, G); });
}

// ---- triplet bins (DynamicSoftMarginLoss: fused_pairloss/ops/triplets.py, triplet_bins) ----------
// Per row i, over its (p, n) with x = d_ap - d_an (u = d, margin 0) in PML's bins (t = (x - lo) /
// width, k = clamp(floor t, 0, bins - 1), f = t - trunc t, m = min(k, bins - 2)): bins_out[i][0][m] +=
// 1 - f and [0][m + 1] += f (PML's histogram increments), bins_out[i][1][k] += x; counts_i the number
// of (p, n). The backward: d/dx of sum grad[i] . bins_out[i] is w_k = (g_inc[m + 1] - g_inc[m]) /
// width + g_x[k], added to d_ap and taken from d_an.
struct BinGrid {
  double lo, width;
  int64_t bins;
};

// the first 32-byte aligned double of a buffer with 4 doubles to spare
double* aligned32(double* p) {
  return reinterpret_cast<double*>((reinterpret_cast<uintptr_t>(p) + 31) & ~uintptr_t(31));
}

template <typename T>
std::tuple<Tensor, Tensor> bins_forward_impl(const TripletOperands<T>& o, BinGrid grid) {
  const int64_t nb = grid.bins;
  Tensor out = at::zeros({o.N, 2, nb}, o.q.options());
  Tensor counts = at::zeros({o.N}, o.q.options().dtype(at::kLong));
  if (o.N == 0 || o.M == 0) return {out, counts};
  T* op = out.template data_ptr<T>();
  int64_t* cp = counts.template data_ptr<int64_t>();
  const T lo = static_cast<T>(grid.lo), width = static_cast<T>(grid.width);
  const int64_t TI = o.strip_rows, blocks = (o.N + TI - 1) / TI;
  struct Scratch {
    std::vector<T> U;
    RowScratch<T> row;
    std::vector<double> acc, copies, inc;
  };
  tile_parallel(
      blocks, parallel_work(o.N, o.M, o.D),
      [&] {
        return Scratch{std::vector<T>(TI * o.ld),
                       {},
                       std::vector<double>(3 * nb),
                       std::vector<double>(16 * (nb + 1) + 4),
                       std::vector<double>(nb)};
      },
      [&](int64_t b, Scratch& sc) {
        const int64_t i0 = b * TI, ti = std::min(TI, o.N - i0);
        o.fill(i0, ti, sc.U.data());
        for (int64_t k = 0; k < ti; ++k) {
          const int64_t i = i0 + k;
          take_positives(o, i, sc.U.data() + k * o.ld, sc.row);
          const int64_t P = static_cast<int64_t>(sc.row.a.size());
          std::fill(sc.acc.begin(), sc.acc.end(), 0.0);
          if (P > 0)
            o.K->triplet_row_bins(sc.U.data() + k * o.ld, o.M, sc.row.a.data(), P, lo, width, nb, sc.acc.data(),
                                  aligned32(sc.copies.data()));
          const double *n = sc.acc.data(), *f = n + nb, *x = f + nb;
          std::vector<double>& inc = sc.inc;
          std::fill(inc.begin(), inc.end(), 0.0);
          int64_t c = 0;
          for (int64_t bin = 0; bin < nb; ++bin) {
            const int64_t m = std::min(bin, nb - 2);
            inc[m] += n[bin] - f[bin];
            inc[m + 1] += f[bin];
            c += static_cast<int64_t>(n[bin]);
          }
          T* row = op + i * 2 * nb;
          for (int64_t bin = 0; bin < nb; ++bin) {
            row[bin] = static_cast<T>(inc[bin]);
            row[nb + bin] = static_cast<T>(x[bin]);
          }
          cp[i] = c;
        }
      });
  return {out, counts};
}

// Row i's dL/dS: the bins' weights w_k from grad[i], the coefficients d/du of the negatives and of
// the positives, then through d (dd/dS = -1/d, 0 at d = 0).
template <typename T>
std::tuple<Tensor, Tensor> bins_backward_impl(const TripletOperands<T>& o, BinGrid grid, const Tensor& grad,
                                              bool need_q, bool need_r) {
  const int64_t nb = grid.bins;
  const T* g = grad.template data_ptr<T>();
  const T lo = static_cast<T>(grid.lo), width = static_cast<T>(grid.width);
  return backward_impl(o, need_q, need_r, [&](int64_t i, T* u, RowScratch<T>& rs, T* G) {
    take_positives(o, i, u, rs);
    const int64_t P = static_cast<int64_t>(rs.a.size());
    const T *g_inc = g + i * 2 * nb, *g_x = g_inc + nb;
    rs.weight.resize(nb);
    T* w = rs.weight.data();
    for (int64_t bin = 0; bin < nb; ++bin) {
      const int64_t m = std::min(bin, nb - 2);
      w[bin] = (g_inc[m + 1] - g_inc[m]) / width + g_x[bin];
    }
    rs.suffix.assign(P, 0.0);  // per positive: sum_n w
    o.K->triplet_row_bin_coefficients(u, o.M, rs.a.data(), P, lo, width, nb, w, G, rs.suffix.data());
    o.K->triplet_row_grad(u, o.M, T(1), /*lp=*/true, G);
    for (int64_t p = 0; p < P; ++p) {
      const T up = rs.pos[p].u;
      G[rs.pos[p].col] = up > T(0) ? -static_cast<T>(rs.suffix[p]) / up : T(0);
    }
  });
}

// ---- row extremes (the batch miners' hardest / easiest pairs) -----------------------------------
// Per row: the positive with the largest (or smallest) u and the negative with the largest (or
// smallest) u, the first column of a tie; -1 where the row has none (a NaN u is in no set).
template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> extremes_impl(const TripletOperands<T>& o, bool pos_largest,
                                                         bool neg_largest) {
  const auto opts = o.q.options();
  Tensor pos_u = at::full({o.N}, std::numeric_limits<T>::quiet_NaN(), opts);
  Tensor neg_u = at::full({o.N}, std::numeric_limits<T>::quiet_NaN(), opts);
  Tensor pos_i = at::full({o.N}, -1, opts.dtype(at::kLong));
  Tensor neg_i = at::full({o.N}, -1, opts.dtype(at::kLong));
  if (o.N == 0 || o.M == 0) return {pos_u, pos_i, neg_u, neg_i};
  T* pu = pos_u.template data_ptr<T>();
  T* nu = neg_u.template data_ptr<T>();
  int64_t* pi = pos_i.template data_ptr<int64_t>();
  int64_t* ni = neg_i.template data_ptr<int64_t>();
  const int64_t TI = o.strip_rows, nb = (o.N + TI - 1) / TI;
  tile_parallel(
      nb, parallel_work(o.N, o.M, o.D), [&] { return std::vector<T>(TI * o.ld); },
      [&](int64_t b, std::vector<T>& U) {
        const int64_t i0 = b * TI, ti = std::min(TI, o.N - i0);
        o.fill(i0, ti, U.data());
        for (int64_t k = 0; k < ti; ++k) {
          const int64_t i = i0 + k;
          T* u = U.data() + k * o.ld;
          const int64_t ex = o.excl.template data_ptr<int64_t>()[i];
          const auto cols = label_columns(o, i);
          int64_t best = -1;
          for (const int64_t* c = cols.first; c != cols.second; ++c) {  // ascending: a tie keeps the first
            const int64_t j = *c;
            if (j != ex && u[j] == u[j] && (best < 0 || (pos_largest ? u[j] > u[best] : u[j] < u[best]))) best = j;
          }
          if (best >= 0) {
            pi[i] = best;
            pu[i] = u[best];
          }
          for (const int64_t* c = cols.first; c != cols.second; ++c) u[*c] = std::numeric_limits<T>::quiet_NaN();
          best = -1;
          for (int64_t j = 0; j < o.M; ++j)
            if (u[j] == u[j] && (best < 0 || (neg_largest ? u[j] > u[best] : u[j] < u[best]))) best = j;
          if (best >= 0) {
            ni[i] = best;
            nu[i] = u[best];
          }
        }
      });
  return {pos_u, pos_i, neg_u, neg_i};
}

void check_inputs(const Tensor& q, const Tensor& r, const Tensor& labels_q, const Tensor& labels_r,
                  const Tensor& exclude_col) {
  TORCH_CHECK(q.device().is_cpu() && r.device().is_cpu(), "triplet_engine (cpu): q and r must be CPU tensors, got ",
              q.device(), " and ", r.device());
  fpl::check_triplet_operands(q, r, labels_q, labels_r, exclude_col);
}

std::tuple<Tensor, Tensor, Tensor> triplet_engine_forward_cpu(const Tensor& q, const Tensor& r, const Tensor& labels_q,
                                                              const Tensor& labels_r, const Tensor& exclude_col,
                                                              double margin, bool lp, double window_lo,
                                                              double window_hi) {
  check_inputs(q, r, labels_q, labels_r, exclude_col);
  if (q.scalar_type() == at::kDouble)
    return forward_impl(prepare<double>(q, r, labels_q, labels_r, exclude_col, margin, lp, window_lo, window_hi));
  return forward_impl(prepare<float>(q, r, labels_q, labels_r, exclude_col, margin, lp, window_lo, window_hi));
}

std::tuple<Tensor, Tensor> triplet_engine_backward_cpu(const Tensor& grad_sums, const Tensor& q, const Tensor& r,
                                                       const Tensor& labels_q, const Tensor& labels_r,
                                                       const Tensor& exclude_col, double margin, bool lp,
                                                       double window_lo, double window_hi, bool need_grad_q,
                                                       bool need_grad_r) {
  check_inputs(q, r, labels_q, labels_r, exclude_col);
  TORCH_CHECK(grad_sums.dim() == 1 && grad_sums.size(0) == q.size(0),
              "triplet_engine_backward: grad_sums must have shape (", q.size(0), ",), got ", grad_sums.sizes());
  std::tuple<Tensor, Tensor> out;
  if (q.scalar_type() == at::kDouble) {
    out = hinge_backward(prepare<double>(q, r, labels_q, labels_r, exclude_col, margin, lp, window_lo, window_hi),
                         grad_sums.to(at::kDouble).contiguous(), need_grad_q, need_grad_r);
  } else {
    out = hinge_backward(prepare<float>(q, r, labels_q, labels_r, exclude_col, margin, lp, window_lo, window_hi),
                         grad_sums.to(at::kFloat).contiguous(), need_grad_q, need_grad_r);
  }
  const int64_t D = q.size(1);
  Tensor grad_q = need_grad_q ? std::get<0>(out).narrow(1, 0, D).to(q.scalar_type()).contiguous() : q.new_empty({0});
  Tensor grad_r = need_grad_r ? std::get<1>(out).narrow(1, 0, D).to(r.scalar_type()).contiguous() : r.new_empty({0});
  return {grad_q, grad_r};
}

std::tuple<Tensor, Tensor> triplet_bins_forward_cpu(const Tensor& q, const Tensor& r, const Tensor& labels_q,
                                                    const Tensor& labels_r, const Tensor& exclude_col, double lo,
                                                    double width, int64_t bins) {
  check_inputs(q, r, labels_q, labels_r, exclude_col);
  fpl::check_triplet_bins(lo, width, bins);
  const double inf = std::numeric_limits<double>::infinity();
  const BinGrid grid{lo, width, bins};
  if (q.scalar_type() == at::kDouble)
    return bins_forward_impl(prepare<double>(q, r, labels_q, labels_r, exclude_col, 0.0, true, -inf, inf), grid);
  return bins_forward_impl(prepare<float>(q, r, labels_q, labels_r, exclude_col, 0.0, true, -inf, inf), grid);
}

std::tuple<Tensor, Tensor> triplet_bins_backward_cpu(const Tensor& grad_bins, const Tensor& q, const Tensor& r,
                                                     const Tensor& labels_q, const Tensor& labels_r,
                                                     const Tensor& exclude_col, double lo, double width, int64_t bins,
                                                     bool need_grad_q, bool need_grad_r) {
  check_inputs(q, r, labels_q, labels_r, exclude_col);
  fpl::check_triplet_bins(lo, width, bins);
  TORCH_CHECK(
      grad_bins.dim() == 3 && grad_bins.size(0) == q.size(0) && grad_bins.size(1) == 2 && grad_bins.size(2) == bins,
      "triplet_bins_engine_backward: grad_bins must have shape (", q.size(0), ", 2, ", bins, "), got ",
      grad_bins.sizes());
  const double inf = std::numeric_limits<double>::infinity();
  const BinGrid grid{lo, width, bins};
  std::tuple<Tensor, Tensor> out;
  if (q.scalar_type() == at::kDouble) {
    out = bins_backward_impl(prepare<double>(q, r, labels_q, labels_r, exclude_col, 0.0, true, -inf, inf), grid,
                             grad_bins.to(at::kDouble).contiguous(), need_grad_q, need_grad_r);
  } else {
    out = bins_backward_impl(prepare<float>(q, r, labels_q, labels_r, exclude_col, 0.0, true, -inf, inf), grid,
                             grad_bins.to(at::kFloat).contiguous(), need_grad_q, need_grad_r);
  }
  const int64_t D = q.size(1);
  Tensor grad_q = need_grad_q ? std::get<0>(out).narrow(1, 0, D).to(q.scalar_type()).contiguous() : q.new_empty({0});
  Tensor grad_r = need_grad_r ? std::get<1>(out).narrow(1, 0, D).to(r.scalar_type()).contiguous() : r.new_empty({0});
  return {grad_q, grad_r};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> row_extremes_cpu(const Tensor& q, const Tensor& r, const Tensor& labels_q,
                                                            const Tensor& labels_r, const Tensor& exclude_col, bool lp,
                                                            bool pos_largest, bool neg_largest) {
  check_inputs(q, r, labels_q, labels_r, exclude_col);
  const double inf = std::numeric_limits<double>::infinity();
  if (q.scalar_type() == at::kDouble)
    return extremes_impl(prepare<double>(q, r, labels_q, labels_r, exclude_col, 0.0, lp, -inf, inf), pos_largest,
                         neg_largest);
  return extremes_impl(prepare<float>(q, r, labels_q, labels_r, exclude_col, 0.0, lp, -inf, inf), pos_largest,
                       neg_largest);
}

}  // namespace
}  // namespace cpu
}  // namespace fpl

TORCH_LIBRARY_IMPL(fused_pairloss, CPU, m) {
  m.impl("triplet_engine_forward", &fpl::cpu::triplet_engine_forward_cpu);
  m.impl("triplet_engine_backward", &fpl::cpu::triplet_engine_backward_cpu);
  m.impl("row_extremes", &fpl::cpu::row_extremes_cpu);
  m.impl("triplet_bins_engine_forward", &fpl::cpu::triplet_bins_forward_cpu);
  m.impl("triplet_bins_engine_backward", &fpl::cpu::triplet_bins_backward_cpu);
}
