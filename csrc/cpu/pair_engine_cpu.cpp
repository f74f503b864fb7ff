// CPU kernels of the tiled pair engine: fused_pairloss::pair_engine_forward / _backward
// (semantics: fused_pairloss/ops/README.md; the loss declaration: common/loss_spec.h; per-tile
// kernels: cpu_kernels.h).
//
// S = q r^T is walked in tiles (T x T, T <= 256) computed by the engine's own GEMM into per-thread
// scratch; label masks come from dense int32 label ids; per row an online log-sum-exp (running max
// + rescaled sum) and the sums / counts the declaration asks for are kept for the positive and the
// negative set. Nothing of size N x M is allocated: extra memory is O((N + M) D) (operands in the
// compute dtype, packed panels, label-sorted copies, gradient accumulators) plus a few T x T
// buffers per thread.
//
// Self mode (r = None, S symmetric): only the tiles I <= J are computed, in both passes. A tile
// serves row block I (as is) and row block J (transposed). The tiles are processed in rounds of a
// round-robin tournament (all diagonal tiles, then rounds in which every block appears in at most
// one tile), so within a round no two tiles touch the same row block: row statistics and gradient
// rows are updated without atomics or private copies, in an order fixed by the schedule.
// Backward (self): per tile H = G_IJ + G_JI^T; dq_I += H q_J, dq_J += H^T q_I (grad_q = (G+G^T) q).
// Ref mode: forward and a row pass (dq) parallel over row blocks of q; a column pass (dr) parallel
// over row blocks of r, every tile recomputed as q_I r_J^T (FlashAttention's deterministic
// backward); the column pass is skipped when r needs no gradient. With enough blocks on both sides
// both gradients come from one walk instead, its tiles in rounds in which no two share a row or a
// column block (walk_ref_rounds).
//
// Positives whose reduction needs a statistic of the whole row (spec.defer_positives(): the
// mining threshold max_neg, or NTXent's lse_neg) are reduced after the main walk, in a walk over
// the positive pairs only: rows and columns sorted by label, so the positives of a row block form
// one band of columns. The miner's min_pos comes from the same kind of walk before the main one.
// S_ij is bitwise the same in every walk (cpu_kernels.h), so the mining decisions agree.
//
// Determinism: the work partition, the reduction order and every GEMM depend on the shapes only;
// threads only pick up independent items. Results are bitwise the same for any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>
#include <utility>
#include <vector>

#include "common/loss_spec.h"
#include "common/op_checks.h"
#include "cpu/cpu_kernels.h"
#include "cpu/engine_glue.h"

namespace fpl {
namespace cpu {
namespace {

using at::Tensor;
using namespace glue;

// Tile edge: a function of the row count only, a multiple of 32 (packed panels start at tile
// boundaries), small enough for a few tiles per thread on small inputs, 256 on large ones.
int64_t tile_size(int64_t n) {
  const int64_t t = round_up((n + 7) / 8, 32);
  return std::max<int64_t>(32, std::min<int64_t>(256, t));
}
// Number of tile_size(n) blocks of n rows.
int64_t tile_blocks(int64_t n) { return (n + tile_size(n) - 1) / tile_size(n); }
constexpr int64_t kBandRows = 64;   // rows per block of the positive-pair walks
constexpr int64_t kBandCols = 256;  // columns per tile of the positive-pair walks

// Round-robin schedule of the tiles I <= J of nb row blocks: round 0 = the diagonal tiles, then
// (circle method) nb - 1 (nb even) or nb (nb odd) rounds in which each block is in at most one tile.
std::vector<std::vector<std::pair<int64_t, int64_t>>> self_schedule(int64_t nb) {
  std::vector<std::vector<std::pair<int64_t, int64_t>>> rounds;
  if (nb <= 0) return rounds;
  rounds.emplace_back();
  for (int64_t b = 0; b < nb; ++b) rounds[0].emplace_back(b, b);
  const int64_t P = nb % 2 == 0 ? nb : nb + 1;  // with a dummy block when nb is odd
  for (int64_t r = 0; r < P - 1; ++r) {
    std::vector<std::pair<int64_t, int64_t>> round;
    auto add = [&](int64_t a, int64_t b) {
      if (a >= nb || b >= nb) return;
      round.emplace_back(std::min(a, b), std::max(a, b));
    };
    add(P - 1, r);
    for (int64_t k = 1; k < P / 2; ++k) add((r + k) % (P - 1), (r - k + (P - 1)) % (P - 1));
    if (!round.empty()) rounds.push_back(std::move(round));
  }
  return rounds;
}

template <typename T>
void add_transposed(T* H, int64_t ldh, const T* G2, int64_t ldg, int rows, int cols) {
  constexpr int B = 32;  // H (rows x cols) += G2^T, G2 cols x rows
  for (int i0 = 0; i0 < rows; i0 += B)
    for (int j0 = 0; j0 < cols; j0 += B) {
      const int i1 = std::min(rows, i0 + B), j1 = std::min(cols, j0 + B);
      for (int i = i0; i < i1; ++i)
        for (int j = j0; j < j1; ++j) H[i * ldh + j] += G2[j * ldg + i];
    }
}

template <typename T>
void sym_add_self(T* G, int64_t ld, int n) {  // G <- G + G^T
  for (int a = 0; a < n; ++a) {
    G[a * ld + a] *= T(2);
    for (int b = a + 1; b < n; ++b) {
      const T h = G[a * ld + b] + G[b * ld + a];
      G[a * ld + b] = h;
      G[b * ld + a] = h;
    }
  }
}

// ---- operands --------------------------------------------------------------------------------
// q and r in the compute dtype with rows padded to Dp columns (zeros), r's rows packed into panels
// for the S tiles, dense int32 label ids, the excluded column of each row, squared norms (lp).
template <typename T>
struct Operands {
  const Kernels<T>* K;
  bool self;
  int64_t N, M, D, Dp;
  Tensor q, r;            // (N, Dp), (M, Dp); r == q in self mode
  Tensor panels;          // r (or q) packed: ceil(M / nr) x D x nr
  Tensor lab_q, lab_r;    // int32 label ids
  Tensor excl;            // int64 (N): excluded column of row i, -1 for none
  Tensor norm_q, norm_r;  // (N), (M) squared norms, lp only
  Tensor row_shift;       // (N) in T, added to row i's term shifts; undefined: none
  int64_t num_labels;
};

at::ScalarType compute_dtype(const Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

template <typename T>
Operands<T> prepare(const Tensor& q, const std::optional<Tensor>& r, const Tensor& labels_q,
                    const std::optional<Tensor>& labels_r, const std::optional<Tensor>& exclude_col,
                    const std::optional<Tensor>& row_shift, const PairSpec<T>& spec) {
  Operands<T> o;
  o.K = &active_kernels<T>();
  o.self = !r.has_value();
  o.N = q.size(0);
  o.D = q.size(1);
  o.Dp = round_up(std::max<int64_t>(o.D, 1), sizeof(T) == 4 ? 16 : 8);
  o.q = padded_rows<T>(q.detach(), o.Dp);
  Tensor all_labels = labels_q.to(at::kLong).contiguous();
  if (o.self) {
    o.M = o.N;
    o.r = o.q;
  } else {
    o.M = r->size(0);
    o.r = padded_rows<T>(r->detach(), o.Dp);
    all_labels = at::cat({all_labels, labels_r->to(at::kLong).contiguous()});
  }
  o.panels = pack<T>(*o.K, o.r, o.D);
  // labels only meet in equality tests: dense int32 ids keep the mask lanes as wide as floats
  Tensor ids = at::empty({0}, all_labels.options().dtype(at::kInt));
  o.num_labels = 0;
  if (all_labels.numel() > 0) {
    auto uniq = at::_unique(all_labels, /*sorted=*/true, /*return_inverse=*/true);
    o.num_labels = std::get<0>(uniq).numel();
    TORCH_CHECK(o.num_labels <= std::numeric_limits<int32_t>::max(), "pair_engine (cpu): ", o.num_labels,
                " distinct labels exceed the CPU kernels' limit of 2^31 - 1 (int32 label ids)");
    ids = std::get<1>(uniq).to(at::kInt);
  }
  o.lab_q = ids.narrow(0, 0, o.N).contiguous();
  o.lab_r = o.self ? o.lab_q : ids.narrow(0, o.N, o.M).contiguous();
  if (o.self) {
    o.excl = at::arange(o.N, labels_q.options().dtype(at::kLong));
  } else if (exclude_col.has_value()) {
    o.excl = exclude_col->to(at::kLong).contiguous();
  } else {
    o.excl = at::full({o.N}, -1, labels_q.options().dtype(at::kLong));
  }
  if (spec.lp_distance) {
    o.norm_q = squared_norms<T>(o.q, o.D);
    o.norm_r = o.self ? o.norm_q : squared_norms<T>(o.r, o.D);
  }
  if (row_shift.has_value()) o.row_shift = row_shift->detach().to(compute_dtype(q)).contiguous();
  return o;
}

template <typename T>
struct Scratch {
  std::vector<T> S, St, G1, G2, buf;
  Scratch(int64_t ti, int64_t tj)
      : S(ti * round_up(tj, 32)),
        St(tj * round_up(ti, 32)),
        G1(ti * round_up(tj, 32)),
        G2(tj * round_up(ti, 32)),
        buf(5 * (std::max(ti, tj) + 64)) {}  // the element loops' rows (kernels_isa.inc)
};

template <typename T>
PairTile<T> make_tile(const Operands<T>& o, const T* S, int64_t ld, int64_t i0, int ti, int64_t j0, int tj,
                      bool transposed) {
  // transposed: rows are r's block j0 (self mode only), columns q's block i0
  PairTile<T> t{};
  t.S = S;
  t.ld = ld;
  t.rows = transposed ? tj : ti;
  t.cols = transposed ? ti : tj;
  const int64_t r0 = transposed ? j0 : i0, c0 = transposed ? i0 : j0;
  const int32_t* lr = transposed ? o.lab_r.template data_ptr<int32_t>() : o.lab_q.template data_ptr<int32_t>();
  const int32_t* lc = transposed ? o.lab_q.template data_ptr<int32_t>() : o.lab_r.template data_ptr<int32_t>();
  t.lab_r = lr + r0;
  t.lab_c = lc + c0;
  t.excl_r = o.excl.template data_ptr<int64_t>() + r0;
  t.row0 = r0;
  t.col0 = c0;
  return t;
}

// S tile q_I r_J^T into S (row stride ld); lp: the squared distances
template <typename T>
void s_tile(const Operands<T>& o, int64_t i0, int ti, int64_t j0, int tj, T* S, int64_t ld) {
  const int64_t nr = o.K->nr;
  o.K->gemm_nt(o.q.template data_ptr<T>() + i0 * o.Dp, o.Dp, o.panels.template data_ptr<T>() + (j0 / nr) * o.D * nr, ti,
               tj, o.D, S, ld);
  if (o.norm_q.defined())
    o.K->lp_tile_d2(o.q.template data_ptr<T>() + i0 * o.Dp, o.r.template data_ptr<T>() + j0 * o.Dp, o.Dp, o.D,
                    o.norm_q.template data_ptr<T>() + i0, o.norm_r.template data_ptr<T>() + j0, ti, tj, S, ld);
}

// ---- row state --------------------------------------------------------------------------------
template <typename T>
struct State {
  Tensor lse_max, lse_sum, sum, weight, count, nonzero, min_pos, max_neg, ntx, ntx_dlse, hist;
  PairRowState<T> view{};
  State(int64_t N, int64_t hist_nodes, const at::TensorOptions& opts) {
    hist = at::zeros({2, N, hist_nodes}, opts);
    lse_max = at::full({2, N}, -std::numeric_limits<T>::infinity(), opts);
    lse_sum = at::zeros({2, N}, opts);
    sum = at::zeros({2, N}, opts);
    weight = at::zeros({2, N}, opts);
    count = at::zeros({2, N}, opts.dtype(at::kInt));
    nonzero = at::zeros({2, N}, opts.dtype(at::kInt));
    min_pos = at::full({N}, std::numeric_limits<T>::infinity(), opts);
    max_neg = at::full({N}, -std::numeric_limits<T>::infinity(), opts);
    ntx = at::zeros({N}, opts);
    ntx_dlse = at::zeros({N}, opts);
    for (int s = 0; s < 2; ++s) {
      view.lse_max[s] = lse_max[s].template data_ptr<T>();
      view.lse_sum[s] = lse_sum[s].template data_ptr<T>();
      view.sum[s] = sum[s].template data_ptr<T>();
      view.weight[s] = weight[s].template data_ptr<T>();
      view.hist[s] = hist[s].template data_ptr<T>();
      view.count[s] = count[s].template data_ptr<int32_t>();
      view.nonzero[s] = nonzero[s].template data_ptr<int32_t>();
    }
    view.min_pos = min_pos.template data_ptr<T>();
    view.max_neg = max_neg.template data_ptr<T>();
    view.ntx = ntx.template data_ptr<T>();
    view.ntx_dlse = ntx_dlse.template data_ptr<T>();
  }
};

// lse = max + log(sum); empty set (sum 0) -> -inf; NaN stays NaN
template <typename T>
void finish_lse(const T* mx, const T* sm, T* out, int64_t N) {
  for (int64_t i = 0; i < N; ++i) {
    const T a = sm[i];
    out[i] = (a != a) ? a : (a > T(0) ? mx[i] + std::log(a) : -std::numeric_limits<T>::infinity());
  }
}

// ---- walks over the positive pairs (label-sorted copies) --------------------------------------
template <typename T>
struct Sorted {
  Tensor q, r;            // rows in label order (r == q in self mode), (., Dp)
  Tensor perm_q, perm_r;  // int64: sorted position -> global index
  Tensor lab_q, lab_r, excl_q, norm_q, norm_r;
  std::vector<int64_t> col_begin, col_end;  // per label id: its columns in sorted r
};

template <typename T>
Sorted<T> sort_by_label(const Operands<T>& o) {
  Sorted<T> s;
  auto sorted_perm = [](const Tensor& lab) {
    return std::get<1>(at::sort(lab.to(at::kLong), /*stable=*/true, /*dim=*/0, /*descending=*/false));
  };
  s.perm_q = sorted_perm(o.lab_q).contiguous();
  s.q = o.q.index_select(0, s.perm_q).contiguous();
  s.lab_q = o.lab_q.index_select(0, s.perm_q).contiguous();
  s.excl_q = o.excl.index_select(0, s.perm_q).contiguous();
  if (o.self) {
    s.perm_r = s.perm_q;
    s.r = s.q;
    s.lab_r = s.lab_q;
  } else {
    s.perm_r = sorted_perm(o.lab_r).contiguous();
    s.r = o.r.index_select(0, s.perm_r).contiguous();
    s.lab_r = o.lab_r.index_select(0, s.perm_r).contiguous();
  }
  if (o.norm_q.defined()) {
    s.norm_q = o.norm_q.index_select(0, s.perm_q).contiguous();
    s.norm_r = o.self ? s.norm_q : o.norm_r.index_select(0, s.perm_r).contiguous();
  }
  // columns of label l in sorted r: [first label >= l, first label > l) (empty if r has none)
  s.col_begin.assign(o.num_labels, o.M);
  s.col_end.assign(o.num_labels, o.M);
  const int32_t* lr = s.lab_r.template data_ptr<int32_t>();
  int64_t j = 0;
  for (int64_t l = 0; l < o.num_labels; ++l) {
    while (j < o.M && lr[j] < l) ++j;
    s.col_begin[l] = j;
    while (j < o.M && lr[j] <= l) ++j;
    s.col_end[l] = j;
  }
  return s;
}

template <typename T>
void positive_walk(const Operands<T>& o, const Sorted<T>& s, const PairSpec<T>& spec, const PairRowState<T>& st,
                   int pass, bool par) {
  const int64_t N = o.N, nb = (N + kBandRows - 1) / kBandRows;
  const int32_t* lq = s.lab_q.template data_ptr<int32_t>();
  tile_parallel(
      nb, par,
      [&] {
        return std::pair<std::vector<T>, std::vector<T>>(std::vector<T>(kBandRows * kBandCols),
                                                         std::vector<T>(round_up(kBandCols, 32) * o.D));
      },
      [&](int64_t b, std::pair<std::vector<T>, std::vector<T>>& sc) {
        const int64_t i0 = b * kBandRows, ti = std::min(kBandRows, N - i0);
        const int64_t c_lo = s.col_begin[lq[i0]], c_hi = s.col_end[lq[i0 + ti - 1]];
        for (int64_t c0 = c_lo; c0 < c_hi; c0 += kBandCols) {
          const int64_t tc = std::min(kBandCols, c_hi - c0);
          o.K->pack_panels(s.r.template data_ptr<T>() + c0 * o.Dp, o.Dp, tc, o.D, sc.second.data());
          o.K->gemm_nt(s.q.template data_ptr<T>() + i0 * o.Dp, o.Dp, sc.second.data(), ti, tc, o.D, sc.first.data(),
                       kBandCols);
          if (s.norm_q.defined())
            o.K->lp_tile_d2(s.q.template data_ptr<T>() + i0 * o.Dp, s.r.template data_ptr<T>() + c0 * o.Dp, o.Dp, o.D,
                            s.norm_q.template data_ptr<T>() + i0, s.norm_r.template data_ptr<T>() + c0,
                            static_cast<int>(ti), static_cast<int>(tc), sc.first.data(), kBandCols);
          PairTile<T> t{};
          t.S = sc.first.data();
          t.ld = kBandCols;
          t.rows = static_cast<int>(ti);
          t.cols = static_cast<int>(tc);
          t.lab_r = lq + i0;
          t.lab_c = s.lab_r.template data_ptr<int32_t>() + c0;
          t.excl_r = s.excl_q.template data_ptr<int64_t>() + i0;
          t.row_index = s.perm_q.template data_ptr<int64_t>() + i0;
          t.col_index = s.perm_r.template data_ptr<int64_t>() + c0;
          o.K->pair_positives(spec, t, st, pass);
        }
      });
}

// ---- tile walks ----------------------------------------------------------------------------------
// One tile of S = q_I r_J^T, computed into sc.S (row stride ld) before the walk's body sees it.
struct TileGeometry {
  int64_t i0, j0;  // first row and column
  int ti, tj;      // rows and columns
  int64_t ld;      // row stride of the tile in sc.S (and of its transpose, ldt, in sc.St)
};

// Tile (I, J) of tiles TI x TJ: its geometry, and its S (q_I r_J^T; lp: the squared distances) in sc.S.
template <typename T>
TileGeometry compute_tile(const Operands<T>& o, int64_t I, int64_t J, int64_t TI, int64_t TJ, Scratch<T>& sc) {
  TileGeometry g{I * TI, J * TJ, 0, 0, 0};
  g.ti = static_cast<int>(std::min(TI, o.N - g.i0));
  g.tj = static_cast<int>(std::min(TJ, o.M - g.j0));
  g.ld = round_up(g.tj, 32);
  s_tile(o, g.i0, g.ti, g.j0, g.tj, sc.S.data(), g.ld);
  return g;
}

// Self mode: the upper-triangle tiles (I <= J), in the rounds of self_schedule (no two tiles of a
// round share a row block, so a round's tiles run in parallel without atomics). body(I, J, tile,
// ldt, sc), ldt the row stride of the tile's transpose.
template <typename T, typename Body>
void walk_self_tiles(const Operands<T>& o, bool par, const Body& body) {
  const int64_t T_ = tile_size(o.N), nb = tile_blocks(o.N);
  for (const auto& round : self_schedule(nb)) {
    tile_parallel(
        static_cast<int64_t>(round.size()), par, [&] { return Scratch<T>(T_, T_); },
        [&](int64_t k, Scratch<T>& sc) {
          const int64_t I = round[k].first, J = round[k].second;
          const TileGeometry g = compute_tile(o, I, J, T_, T_, sc);
          body(I, J, g, round_up(g.ti, 32), sc);
        });
  }
}

// Ref mode: every tile; a work item is a row block walking all column blocks in order, or (by
// columns) a column block walking all row blocks in order, so each item owns its rows' (or its
// columns') results. body(tile, sc).
template <typename T, typename Body>
void walk_ref_tiles(const Operands<T>& o, bool par, bool by_columns, const Body& body) {
  const int64_t N = o.N, M = o.M, TI = tile_size(N), TJ = tile_size(M);
  const int64_t nbi = tile_blocks(N), nbj = tile_blocks(M);
  tile_parallel(
      by_columns ? nbj : nbi, par, [&] { return Scratch<T>(TI, TJ); },
      [&](int64_t item, Scratch<T>& sc) {
        for (int64_t other = 0; other < (by_columns ? nbi : nbj); ++other) {
          const int64_t I = by_columns ? other : item, J = by_columns ? item : other;
          body(compute_tile(o, I, J, TI, TJ, sc), sc);
        }
      });
}

// Ref mode, both gradients from one walk: every tile once, in rounds (round k: the tiles
// (I, (I + k) mod L), L = max(#row blocks, #column blocks)), so no two tiles of a round share a row
// block or a column block and dq_I, dr_J are updated without atomics, in the order of the rounds.
// Worth it when a round holds enough tiles for the threads (ref_rounds_pay: kMinRoundTiles blocks on each side).
constexpr int64_t kMinRoundTiles = 4;
template <typename T, typename Body>
void walk_ref_rounds(const Operands<T>& o, bool par, const Body& body) {
  const int64_t N = o.N, M = o.M, TI = tile_size(N), TJ = tile_size(M);
  const int64_t nbi = tile_blocks(N), nbj = tile_blocks(M), L = std::max(nbi, nbj);
  std::vector<std::pair<int64_t, int64_t>> round;
  for (int64_t k = 0; k < L; ++k) {
    round.clear();
    for (int64_t I = 0; I < nbi; ++I)
      if ((I + k) % L < nbj) round.emplace_back(I, (I + k) % L);
    tile_parallel(
        static_cast<int64_t>(round.size()), par, [&] { return Scratch<T>(TI, TJ); },
        [&](int64_t item, Scratch<T>& sc) {
          body(compute_tile(o, round[item].first, round[item].second, TI, TJ, sc), sc);
        });
  }
}

template <typename T>
bool ref_rounds_pay(const Operands<T>& o) {
  return std::min(tile_blocks(o.N), tile_blocks(o.M)) >= kMinRoundTiles;
}

// ---- forward -----------------------------------------------------------------------------------
template <typename T>
std::tuple<Tensor, Tensor, Tensor> forward_impl(const Operands<T>& o, const PairSpec<T>& spec) {
  const auto opts = o.q.options();
  const int64_t N = o.N, M = o.M;
  State<T> state(N, spec.hist_nodes, opts);
  PairRowState<T>& st = state.view;
  st.row_shift = o.row_shift.defined() ? o.row_shift.template data_ptr<T>() : nullptr;
  const bool par = parallel_work(N, M, o.D);
  const bool defer = spec.defer_positives();
  Sorted<T> sorted;
  if (defer && N > 0 && M > 0) sorted = sort_by_label(o);
  if (spec.mine && N > 0 && M > 0) positive_walk(o, sorted, spec, st, /*pass=*/0, par);

  if (o.self) {
    walk_self_tiles(o, par, [&](int64_t I, int64_t J, const TileGeometry& g, int64_t ldt, Scratch<T>& sc) {
      o.K->pair_forward(spec, make_tile(o, sc.S.data(), g.ld, g.i0, g.ti, g.j0, g.tj, false), st, sc.buf.data());
      if (I != J) {
        transpose(sc.S.data(), g.ti, g.tj, g.ld, sc.St.data(), ldt);
        o.K->pair_forward(spec, make_tile(o, sc.St.data(), ldt, g.i0, g.ti, g.j0, g.tj, true), st, sc.buf.data());
      }
    });
  } else {
    walk_ref_tiles(o, par, /*by_columns=*/false, [&](const TileGeometry& g, Scratch<T>& sc) {
      o.K->pair_forward(spec, make_tile(o, sc.S.data(), g.ld, g.i0, g.ti, g.j0, g.tj, false), st, sc.buf.data());
    });
  }

  const int64_t nodes = spec.hist_nodes;
  Tensor values = at::zeros({kNumPairValues + 2 * nodes, N}, opts);
  T* lse_pos = values[kLsePos].template data_ptr<T>();
  T* lse_neg = values[kLseNeg].template data_ptr<T>();
  finish_lse(st.lse_max[1], st.lse_sum[1], lse_neg, N);
  if (defer && N > 0 && M > 0) {
    st.lse[1] = lse_neg;  // NTXent's pair terms need the final lse_neg
    positive_walk(o, sorted, spec, st, /*pass=*/1, par);
  }
  finish_lse(st.lse_max[0], st.lse_sum[0], lse_pos, N);
  values[kSumPos].copy_(state.sum[0]);
  values[kSumNeg].copy_(state.sum[1]);
  values[kPosVsNeg].copy_(state.ntx);
  values[kWeightPos].copy_(state.weight[0]);
  values[kWeightNeg].copy_(state.weight[1]);
  if (nodes > 0) values.narrow(0, kNumPairValues, 2 * nodes).copy_(state.hist.transpose(1, 2).reshape({2 * nodes, N}));
  Tensor counts = at::stack({state.count[0], state.count[1], state.nonzero[0], state.nonzero[1]});
  Tensor aux = at::stack({state.min_pos, state.max_neg, state.ntx_dlse});
  return {values, counts, aux};
}

// ---- backward ----------------------------------------------------------------------------------
template <typename T>
std::tuple<Tensor, Tensor> backward_impl(const Operands<T>& o, const PairSpec<T>& spec, const Tensor& grad_values,
                                         const Tensor& values, const Tensor& aux, bool need_grad_r) {
  const auto opts = o.q.options();
  const int64_t N = o.N, M = o.M, Dp = o.Dp;
  // NTXent: d(pair terms)/d(lse_neg) joins the gradient of lse_neg
  const Tensor g_lse_neg = grad_values[kLseNeg] + grad_values[kPosVsNeg] * aux[kPosVsNegDLse];
  const Tensor gv = grad_values.contiguous();
  PairRowState<T> st{};
  st.g_lse[0] = gv[kLsePos].template data_ptr<T>();
  st.g_lse[1] = g_lse_neg.template data_ptr<T>();
  st.g_sum[0] = gv[kSumPos].template data_ptr<T>();
  st.g_sum[1] = gv[kSumNeg].template data_ptr<T>();
  st.g_weight[0] = gv[kWeightPos].template data_ptr<T>();
  st.g_weight[1] = gv[kWeightNeg].template data_ptr<T>();
  // the histograms' incoming gradients as the kernels read them, [set][row][node]
  const int64_t nodes = spec.hist_nodes;
  const Tensor g_hist = gv.narrow(0, kNumPairValues, 2 * nodes).view({2, nodes, N}).transpose(1, 2).contiguous();
  for (int s = 0; s < 2; ++s) st.g_hist[s] = g_hist[s].template data_ptr<T>();
  st.g_ntx = gv[kPosVsNeg].template data_ptr<T>();
  st.lse[0] = values[kLsePos].template data_ptr<T>();
  st.lse[1] = values[kLseNeg].template data_ptr<T>();
  st.min_pos = const_cast<T*>(aux[kMinPos].template data_ptr<T>());
  st.max_neg = const_cast<T*>(aux[kMaxNeg].template data_ptr<T>());
  st.row_shift = o.row_shift.defined() ? o.row_shift.template data_ptr<T>() : nullptr;
  const bool par = parallel_work(N, M, o.D);
  Tensor dq = at::zeros({N, Dp}, opts);
  T* dqp = dq.template data_ptr<T>();
  const T* qp = o.q.template data_ptr<T>();
  const Tensor q_cols = pack_columns(*o.K, o.q);
  const T* qc = q_cols.template data_ptr<T>();
  const bool lp = spec.lp_distance;
  std::vector<T> gsum_q(lp ? N : 0, T(0));  // row sums of G (lp: the norms' share of the gradient)

  if (o.self) {
    walk_self_tiles(o, par, [&](int64_t I, int64_t J, const TileGeometry& g, int64_t ldt, Scratch<T>& sc) {
      const int64_t i0 = g.i0, j0 = g.j0, ld = g.ld;
      const int ti = g.ti, tj = g.tj;
      o.K->pair_backward(spec, make_tile(o, sc.S.data(), ld, i0, ti, j0, tj, false), st, sc.G1.data(), ld,
                         sc.buf.data());
      if (I == J) {
        sym_add_self(sc.G1.data(), ld, ti);
        o.K->gemm_nn_acc(sc.G1.data(), ld, qc, N, i0, ti, Dp, ti, dqp + i0 * Dp, Dp);
        if (lp) add_row_sums(sc.G1.data(), ld, ti, ti, gsum_q.data() + i0);
        return;
      }
      transpose(sc.S.data(), ti, tj, ld, sc.St.data(), ldt);
      o.K->pair_backward(spec, make_tile(o, sc.St.data(), ldt, i0, ti, j0, tj, true), st, sc.G2.data(), ldt,
                         sc.buf.data());
      add_transposed(sc.G1.data(), ld, sc.G2.data(), ldt, ti, tj);  // H = G_IJ + G_JI^T
      o.K->gemm_nn_acc(sc.G1.data(), ld, qc, N, j0, ti, Dp, tj, dqp + i0 * Dp, Dp);
      o.K->gemm_tn_acc(sc.G1.data(), ld, qc, N, i0, tj, Dp, ti, dqp + j0 * Dp, Dp);
      if (lp) {
        add_row_sums(sc.G1.data(), ld, ti, tj, gsum_q.data() + i0);
        add_col_sums(sc.G1.data(), ld, ti, tj, gsum_q.data() + j0);
      }
    });
    if (lp) add_norm_gradient(dqp, qp, gsum_q.data(), N, Dp);
    return {dq.narrow(1, 0, o.D), Tensor()};
  }

  const T* rp = o.r.template data_ptr<T>();
  const Tensor r_cols = pack_columns(*o.K, o.r);
  const T* rc = r_cols.template data_ptr<T>();
  if (need_grad_r && ref_rounds_pay(o)) {  // one walk: dq_I += G_IJ r_J and dr_J += G_IJ^T q_I per tile
    Tensor dr = at::zeros({M, Dp}, opts);
    T* drp = dr.template data_ptr<T>();
    std::vector<T> gsum_r(lp ? M : 0, T(0));
    walk_ref_rounds(o, par, [&](const TileGeometry& g, Scratch<T>& sc) {
      o.K->pair_backward(spec, make_tile(o, sc.S.data(), g.ld, g.i0, g.ti, g.j0, g.tj, false), st, sc.G1.data(), g.ld,
                         sc.buf.data());
      o.K->gemm_nn_acc(sc.G1.data(), g.ld, rc, M, g.j0, g.ti, Dp, g.tj, dqp + g.i0 * Dp, Dp);
      o.K->gemm_tn_acc(sc.G1.data(), g.ld, qc, N, g.i0, g.tj, Dp, g.ti, drp + g.j0 * Dp, Dp);
      if (lp) {
        add_row_sums(sc.G1.data(), g.ld, g.ti, g.tj, gsum_q.data() + g.i0);
        add_col_sums(sc.G1.data(), g.ld, g.ti, g.tj, gsum_r.data() + g.j0);
      }
    });
    if (lp) {
      add_norm_gradient(dqp, qp, gsum_q.data(), N, Dp);
      add_norm_gradient(drp, rp, gsum_r.data(), M, Dp);
    }
    return {dq.narrow(1, 0, o.D), dr.narrow(1, 0, o.D)};
  }
  // row pass: dq_I = sum_J G_IJ r_J
  walk_ref_tiles(o, par, /*by_columns=*/false, [&](const TileGeometry& g, Scratch<T>& sc) {
    o.K->pair_backward(spec, make_tile(o, sc.S.data(), g.ld, g.i0, g.ti, g.j0, g.tj, false), st, sc.G1.data(), g.ld,
                       sc.buf.data());
    o.K->gemm_nn_acc(sc.G1.data(), g.ld, rc, M, g.j0, g.ti, Dp, g.tj, dqp + g.i0 * Dp, Dp);
    if (lp) add_row_sums(sc.G1.data(), g.ld, g.ti, g.tj, gsum_q.data() + g.i0);
  });
  if (lp) add_norm_gradient(dqp, qp, gsum_q.data(), N, Dp);
  if (!need_grad_r) return {dq.narrow(1, 0, o.D), Tensor()};
  // column pass: dr_J = sum_I G_IJ^T q_I, the same tiles q_I r_J^T recomputed
  Tensor dr = at::zeros({M, Dp}, opts);
  T* drp = dr.template data_ptr<T>();
  std::vector<T> gsum_r(lp ? M : 0, T(0));
  walk_ref_tiles(o, par, /*by_columns=*/true, [&](const TileGeometry& g, Scratch<T>& sc) {
    o.K->pair_backward(spec, make_tile(o, sc.S.data(), g.ld, g.i0, g.ti, g.j0, g.tj, false), st, sc.G1.data(), g.ld,
                       sc.buf.data());
    o.K->gemm_tn_acc(sc.G1.data(), g.ld, qc, N, g.i0, g.tj, Dp, g.ti, drp + g.j0 * Dp, Dp);
    if (lp) add_col_sums(sc.G1.data(), g.ld, g.ti, g.tj, gsum_r.data() + g.j0);
  });
  if (lp) add_norm_gradient(drp, rp, gsum_r.data(), M, Dp);
  return {dq.narrow(1, 0, o.D), dr.narrow(1, 0, o.D)};
}

// ---- op entry points ---------------------------------------------------------------------------
void check_inputs(const Tensor& q, const std::optional<Tensor>& r, const Tensor& labels_q,
                  const std::optional<Tensor>& labels_r, const std::optional<Tensor>& exclude_col,
                  const std::optional<Tensor>& row_shift, c10::ArrayRef<double> terms, int64_t flags) {
  TORCH_CHECK(q.device().is_cpu(), "pair_engine (cpu): q must be a CPU tensor, got ", q.device());
  if (r.has_value()) TORCH_CHECK(r->device().is_cpu(), "pair_engine (cpu): r must be a CPU tensor, got ", r->device());
  check_pair_operands(q, r, labels_q, labels_r, exclude_col, terms, flags);
  check_row_shift(q, row_shift);
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "pair_engine: q must be floating point, got ", q.scalar_type());
  if (exclude_col.has_value() && exclude_col->numel() > 0) {
    const int64_t lo = exclude_col->min().item<int64_t>(), hi = exclude_col->max().item<int64_t>();
    TORCH_CHECK(lo >= -1 && hi < r->size(0), "pair_engine: exclude_col values must lie in [-1, ", r->size(0),
                "), got [", lo, ", ", hi, "]");
  }
}

std::tuple<Tensor, Tensor, Tensor> pair_engine_forward_cpu(const Tensor& q, const std::optional<Tensor>& r,
                                                           const Tensor& labels_q,
                                                           const std::optional<Tensor>& labels_r,
                                                           const std::optional<Tensor>& exclude_col,
                                                           c10::ArrayRef<double> terms, int64_t flags,
                                                           const std::optional<Tensor>& row_shift) {
  check_inputs(q, r, labels_q, labels_r, exclude_col, row_shift, terms, flags);
  if (compute_dtype(q) == at::kDouble) {
    const auto spec = decode_pair_spec<double>(terms.data(), flags);
    return forward_impl(prepare(q, r, labels_q, labels_r, exclude_col, row_shift, spec), spec);
  }
  const auto spec = decode_pair_spec<float>(terms.data(), flags);
  return forward_impl(prepare(q, r, labels_q, labels_r, exclude_col, row_shift, spec), spec);
}

std::tuple<Tensor, Tensor> pair_engine_backward_cpu(const Tensor& grad_values, const Tensor& q,
                                                    const std::optional<Tensor>& r, const Tensor& labels_q,
                                                    const std::optional<Tensor>& labels_r,
                                                    const std::optional<Tensor>& exclude_col, const Tensor& values,
                                                    const Tensor& aux, c10::ArrayRef<double> terms, int64_t flags,
                                                    bool need_grad_r, const std::optional<Tensor>& row_shift) {
  check_inputs(q, r, labels_q, labels_r, exclude_col, row_shift, terms, flags);
  const int64_t N = q.size(0);
  const auto A = compute_dtype(q);
  auto stats = [&](const Tensor& t, int64_t rows, const char* name) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == N, "pair_engine_backward: ", name,
                " must have shape (", rows, ", ", N, "), got ", t.sizes());
    return t.to(A).contiguous();
  };
  const int64_t rows = kNumPairValues + 2 * static_cast<int64_t>(terms[kHistTerms]);  // + the histograms
  const Tensor gv = stats(grad_values, rows, "grad_values");
  const Tensor vals = stats(values, rows, "values");
  const Tensor ax = stats(aux, kNumPairAux, "aux");
  std::tuple<Tensor, Tensor> out;
  if (A == at::kDouble) {
    const auto spec = decode_pair_spec<double>(terms.data(), flags);
    out =
        backward_impl(prepare(q, r, labels_q, labels_r, exclude_col, row_shift, spec), spec, gv, vals, ax, need_grad_r);
  } else {
    const auto spec = decode_pair_spec<float>(terms.data(), flags);
    out =
        backward_impl(prepare(q, r, labels_q, labels_r, exclude_col, row_shift, spec), spec, gv, vals, ax, need_grad_r);
  }
  Tensor grad_q = std::get<0>(out).to(q.scalar_type()).contiguous();
  Tensor grad_r =
      (r.has_value() && need_grad_r) ? std::get<1>(out).to(r->scalar_type()).contiguous() : q.new_empty({0});
  return {grad_q, grad_r};
}

}  // namespace
}  // namespace cpu
}  // namespace fpl

TORCH_LIBRARY_IMPL(fused_pairloss, CPU, m) {
  m.impl("pair_engine_forward", &fpl::cpu::pair_engine_forward_cpu);
  m.impl("pair_engine_backward", &fpl::cpu::pair_engine_backward_cpu);
}
