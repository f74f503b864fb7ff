// CUDA pair engine: fused_pairloss::pair_engine_forward / _backward (semantics:
// fused_pairloss/ops/README.md; the loss declaration: common/loss_spec.h, its per-element math:
// common/pair_terms.inl). FlashAttention-style, docs/design.md. No kernel knows which loss it runs.
//
// Forward: a CTA owns kBM rows of q and walks column tiles of r; two threads per row keep the
// row's reductions in registers (per set: online LSE, sum, count, count of x > 0; the mining
// thresholds; NTXent's pair terms) and are merged with a warp shuffle at the end. Walks:
//   main walk, every column tile: the negatives (kept by u + eps > min_pos_i with mining, whose
//     max_neg_i over the unmined negatives it also takes), and the positives unless deferred;
//   deferred positives (the declaration needs a statistic of the whole row first: mining's
//     max_neg, NTXent's lse_neg): the rows and columns are label-sorted copies (glue.h), so the
//     positives of a row block lie in one band of column tiles [band_lo of its first row,
//     band_hi of its last); with mining a walk over that band before the main walk gives min_pos_i
//     over the unmined positives, and one after it reduces the kept positives. The bands are tiles
//     of the same grid as the main walk's, so their S is bitwise the main walk's.
// Histograms (loss_spec.h hist_nodes; never with mining or NTXent, so never deferred): in the main
//   walk each kept pair adds its two pulses to its row's nodes; thread h = 0 of a row adds into the
//   value rows, h = 1 into a scratch copy that the glue adds to them afterwards (both zeroed by the
//   glue): every node has one writer. The backward adds the pulses' slope (hist_dv).
// Backward: the same tiles are recomputed (same tile_dot call, so bitwise the same S and the same
// mining decisions), G = dL/dS is formed from the saved row statistics and accumulated into the
// rows this CTA owns:
//   row pass (pass 0): grad_q[I] += H(I, X) . V[X], H = G (ref mode, V = r) or G + G^T (self mode,
//     V = q: the other row's statistics give G_xi from the same S tile);
//   column pass (pass 1, ref mode with need_grad_r): grad_r[J] += G(X, J)^T . q[X].
//   LP_DISTANCE adds the norms' share, -x_o sum_x H_ox, at the end of each pass.
// Deterministic, no atomics. Self mode: the tile of blocks (I, J) with I > J is computed as the
// transpose of the (J, I) tile and diagonal tiles are symmetrized, so S_ij == S_ji bitwise in
// every pass whatever the MMA's internal order.
#include "cuda/launchers.h"
#include "cuda/tile_common.cuh"

namespace fpl_cuda {
namespace {

template <typename T>
struct PairArgs {
  using A = typename AccOf<T>::type;
  const T* q;
  const T* r;  // == q in self mode
  const int64_t* lq;
  const int64_t* lr;    // == lq in self mode
  const int64_t* excl;  // ref mode only (self mode: the diagonal)
  const int64_t* band_lo;
  const int64_t* band_hi;
  const int64_t* perm_q;
  const int64_t* perm_r;  // == perm_q in self mode
  const A* nq;
  const A* nr;         // == nq in self mode
  const A* row_shift;  // op row order (read at mapped_row): added to both terms' shift; null: none
  int64_t N, M, D;
  bool self_mode, vec16, defer;
  PairSpec<A> sp;
  // forward outputs ([k][N], row stride N, op row order)
  A* values;
  int32_t* counts;
  A* aux;
  A* hist_scratch;  // histograms: thread h = 1's nodes ([2 nodes][N], zeroed), else null
  // backward inputs (op row order) and output
  const A* gvals;
  const A* vals;
  const A* auxin;
  A* out;
};

// LP_DISTANCE: Ss becomes the tile of squared distances, the near pairs recomputed from the two
// rows (common/pair_terms.inl, lp_near_pair): a sequential sum per pair, so d2 is a function of
// the two rows only (symmetric, the same in the forward and the backward; 0 for identical rows).
template <typename T>
FPL_DEV void lp_tile_d2(const PairArgs<T>& p, int pass, int64_t o0, int no, int64_t x0, int nx,
                        typename AccOf<T>::type* Ss) {
  using A = typename AccOf<T>::type;
  const bool owner_is_q = p.self_mode || pass == 0, other_is_q = p.self_mode || pass == 1;
  const T* own = owner_is_q ? p.q : p.r;
  const T* oth = other_is_q ? p.q : p.r;
  const A* n_own = owner_is_q ? p.nq : p.nr;
  const A* n_oth = other_is_q ? p.nq : p.nr;
  for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
    const int i = e / kBN, j = e % kBN;
    if (i >= no || j >= nx) continue;
    const A ni = n_own[o0 + i], nj = n_oth[x0 + j];
    A d2 = lp_d2_from_s(Ss[i * kLDS + j], ni, nj);
    if (lp_near_pair(d2, ni, nj)) {
      const T* a = own + (o0 + i) * p.D;
      const T* b = oth + (x0 + j) * p.D;
      d2 = A(0);
      for (int64_t k = 0; k < p.D; ++k) {
        const A diff = to_acc(a[k]) - to_acc(b[k]);
        d2 += diff * diff;
      }
    }
    Ss[i * kLDS + j] = d2;
  }
  __syncthreads();
}

// S(owner o, other x) into Ss[o][x] (LP_DISTANCE: the squared distance). pass 0: owner = rows of q,
// other = rows of r; pass 1: owner = rows of r, other = rows of q (S(x, o) = q_x . r_o, stored
// transposed).
template <typename T>
FPL_DEV void pair_tile(const PairArgs<T>& p, int pass, int64_t o0, int no, int64_t x0, int nx,
                       typename AccOf<T>::type* Ss, unsigned char* stage) {
  if (p.self_mode) {
    // canonical order: always (lower block) . (higher block)^T
    if (o0 <= x0)
      tile_dot<T>(p.q, o0, no, p.q, x0, nx, p.D, p.vec16, false, Ss, stage);
    else
      tile_dot<T>(p.q, x0, nx, p.q, o0, no, p.D, p.vec16, true, Ss, stage);
    if (o0 == x0) {  // make the diagonal tile exactly symmetric: copy the upper triangle down
      for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
        const int i = e / kBN, j = e % kBN;
        if (i > j) Ss[i * kLDS + j] = Ss[j * kLDS + i];
      }
      __syncthreads();
    }
  } else if (pass == 0) {
    tile_dot<T>(p.q, o0, no, p.r, x0, nx, p.D, p.vec16, false, Ss, stage);
  } else {
    tile_dot<T>(p.q, x0, nx, p.r, o0, no, p.D, p.vec16, true, Ss, stage);
  }
  if (p.sp.lp_distance) lp_tile_d2<T>(p, pass, o0, no, x0, nx, Ss);
}

// v of a pair: S, or the distance from the tile's squared distance
template <typename A>
FPL_DEV A pair_v(const PairSpec<A>& sp, A s) {
  return sp.lp_distance ? pair_v_lp<A>(s) : s;
}

// Forward walk over the column tiles [x_begin, x_end) (x_begin a multiple of kBN) for the CTA's
// rows [o0, o0 + no): f(s, column, label of the column) for the columns of this thread's row (its
// two threads take alternate columns).
template <typename T, typename F>
FPL_DEV void walk_columns(const PairArgs<T>& p, int64_t o0, int no, int64_t x_begin, int64_t x_end, unsigned char* smem,
                          F&& f) {
  using A = typename AccOf<T>::type;
  A* Ss = reinterpret_cast<A*>(smem);
  unsigned char* stage = smem + Smem<T>::kSsBytes;
  int64_t* lx_s = reinterpret_cast<int64_t*>(smem + Smem<T>::kExtraOffset);
  const int t = threadIdx.x, ol = t >> 1, h = t & 1;
  const bool valid = ol < no;
  for (int64_t x0 = x_begin; x0 < x_end; x0 += kBN) {
    const int nx = int(p.M - x0 < kBN ? p.M - x0 : kBN);
    __syncthreads();  // the previous tile's readers of lx_s are done
    if (t < nx) lx_s[t] = p.lr[x0 + t];
    pair_tile<T>(p, 0, o0, no, x0, nx, Ss, stage);
    if (valid) {
      for (int x = h; x < nx; x += 2) f(Ss[ol * kLDS + x], x0 + x, lx_s[x]);
    }
  }
}

FPL_DEV float math_floor(float x) { return ::floorf(x); }
FPL_DEV double math_floor(double x) { return ::floor(x); }
// a * b rounded on its own: nvcc contracts a plain product and a following add into an FMA, which
// would move a histogram node, a pair's bin or its weights off the CPU kernels' and PML's (the CPU
// build rounds every operation on its own)
FPL_DEV float mul_rn(float a, float b) { return __fmul_rn(a, b); }
FPL_DEV double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// A pair's place in its row's histogram (loss_spec.h hist_nodes; the CPU kernels' histogram_add):
// node a gets wa, node a + 1 gets wb; false when no node is in reach. NaN pairs are the caller's.
// Plain: u = (h - lo) inv_width, h = v or v^2, a = floor(u), wb = u - a, wa = 1 - wb (nodes outside
// [0, nodes) dropped by the caller). PML's bins: a = floor((float(v) - lo) / delta) in float,
// clamped to [0, nodes - 2], node positions float(k) * delta; wb = ((v - lo) - node_a) inv_width,
// wa = (float(node_{a+1} + lo) - v) inv_width.
template <typename A>
FPL_DEV bool hist_place(const PairSpec<A>& sp, A v, int64_t& a, A& wa, A& wb) {
  if (sp.hist_pml_bins) {
    const A t = A((static_cast<float>(v) - sp.hist_lo_f) / sp.hist_delta_f);
    const A r = math_floor(t), top = A(sp.hist_nodes - 2);
    a = static_cast<int64_t>(r < A(0) ? A(0) : (r > top ? top : r));
    wb = mul_rn((v - sp.hist_lo) - A(mul_rn(static_cast<float>(a), sp.hist_delta_f)), sp.hist_inv_width);
    wa = mul_rn(A(mul_rn(static_cast<float>(a + 1), sp.hist_delta_f) + sp.hist_lo_f) - v, sp.hist_inv_width);
    return true;
  }
  const A u = mul_rn((sp.hist_squared ? mul_rn(v, v) : v) - sp.hist_lo, sp.hist_inv_width);
  if (!(u > A(-1) && u < A(sp.hist_nodes))) return false;
  const A fl = math_floor(u);
  a = static_cast<int64_t>(fl);
  wb = u - fl;
  wa = A(1) - wb;
  return true;
}

// Adds a kept pair to its row's histogram of one set: node k at h[k * stride]; a NaN v makes node 0 NaN.
template <typename A>
FPL_DEV void hist_add(const PairSpec<A>& sp, A v, A* h, int64_t stride) {
  if (v != v) {
    h[0] += v;
    return;
  }
  int64_t a;
  A wa, wb;
  if (!hist_place(sp, v, a, wa, wb)) return;
  if (a >= 0) h[a * stride] += wa;
  if (a + 1 < sp.hist_nodes) h[(a + 1) * stride] += wb;
}

// d/dv of sum_k g_k hist_k for a kept pair (the CPU kernels' histogram_grad_row): the slope of its
// segment, (g_{a+1} - g_a) inv_width, times dh/dv (1, or 2 v); g_k at g[k * stride]. Plain: 0 on a
// node (wb = 0) and a node out of range reads as 0; PML's bins: the segment's slope on the node too.
template <typename A>
FPL_DEV A hist_dv(const PairSpec<A>& sp, A v, const A* g, int64_t stride) {
  int64_t a;
  A wa, wb;
  if (v != v || !hist_place(sp, v, a, wa, wb)) return A(0);
  if (!sp.hist_pml_bins && wb == A(0)) return A(0);
  const A ga = a >= 0 ? g[a * stride] : A(0);
  const A gb = a + 1 < sp.hist_nodes ? g[(a + 1) * stride] : A(0);
  return (gb - ga) * (sp.hist_squared ? (v + v) * sp.hist_inv_width : sp.hist_inv_width);
}

// Reductions of one pair set of one row (ops/README.md values / counts).
template <typename A>
struct SetAcc {
  OnlineLSE<A> lse;
  A sum, weight;  // weight: an exp-weighted sum's sum of the weights
  int count, nonzero;
  FPL_DEV void init() {
    lse.init();
    sum = A(0);
    weight = A(0);
    count = 0;
    nonzero = 0;
  }
  FPL_DEV void add(const PairTermParams<A>& t, A x) {
    ++count;
    if (t.lse) lse.add(x);
    if (t.sum && t.sum_temperature != A(0)) {  // exp-weighted (loss_spec.h): w x and w over x > 0
      if (x > A(0)) {
        const A w = math_exp(t.sum_temperature * x);
        sum += w * x;
        weight += w;
        ++nonzero;
      }
    } else if (t.sum) {
      sum += x;
      nonzero += x > A(0) ? 1 : 0;
    }
  }
  FPL_DEV void merge_lanes() {  // every thread of the CTA calls it
    merge_pair_lanes(lse);
    sum += pair_lane(sum);
    weight += pair_lane(weight);
    count += pair_lane(count);
    nonzero += pair_lane(nonzero);
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) pair_forward_kernel(PairArgs<T> p) {
  using A = typename AccOf<T>::type;
  extern __shared__ __align__(128) unsigned char smem[];
  const int t = threadIdx.x, ol = t >> 1, h = t & 1;
  const int64_t o0 = int64_t(blockIdx.x) * kBM;
  const int no = int(p.N - o0 < kBM ? p.N - o0 : kBM);
  const bool valid = ol < no;
  const int64_t o = o0 + ol;
  const PairSpec<A>& sp = p.sp;
  const bool lp = sp.lp_distance;
  const int64_t lo = valid ? p.lq[o] : 0;
  const int64_t ex = !valid ? -1 : (p.self_mode ? o : (p.excl ? p.excl[o] : -1));
  // the row's terms: the declaration's, with its row shift added
  PairTermParams<A> tpos = sp.pos, tneg = sp.neg;
  if (p.row_shift && valid) {
    const A shift = p.row_shift[mapped_row(p.perm_q, o)];
    tpos.shift += shift;
    tneg.shift += shift;
  }
  // the band of column tiles that holds the positives of the CTA's rows (label-sorted operands)
  int64_t b_begin = 0, b_end = 0;
  if (p.defer) {
    b_begin = p.band_lo[o0] / kBN * kBN;
    b_end = p.band_hi[o0 + no - 1];
  }

  // mining thresholds over the unmined sets (u orientation)
  A min_pos = pos_inf<A>(), max_neg = neg_inf<A>();
  if (sp.mine) {
    walk_columns<T>(p, o0, no, b_begin, b_end, smem, [&](A s, int64_t col, int64_t lx) {
      if (lx != lo || (col == ex && !sp.exclude_after_mining)) return;
      min_pos = nan_min(min_pos, mining_u(pair_v(sp, s), lp, sp.mine_on_cosine));
    });
    min_pos = nan_min(min_pos, pair_lane(min_pos));
  }

  SetAcc<A> pos, neg;
  pos.init();
  neg.init();
  // histograms: this thread's copy of its row's nodes (h = 0: the value rows, h = 1: the scratch)
  const int64_t N = p.N, nodes = sp.hist_nodes;
  A* hist = nullptr;
  if (nodes > 0 && valid)
    hist = (h == 0 ? p.values + fpl::kNumPairValues * N : p.hist_scratch) + mapped_row(p.perm_q, o);
  walk_columns<T>(p, o0, no, 0, p.M, smem, [&](A s, int64_t col, int64_t lx) {
    const A v = pair_v(sp, s);
    if (lx == lo) {
      if (!p.defer && col != ex && (!sp.windows || in_keep_window(v, sp.pos_window_lo, sp.pos_window_hi))) {
        pos.add(tpos, term_value(tpos, v));
        if (hist) hist_add(sp, v, hist, N);
      }
      return;
    }
    if (sp.windows && !in_keep_window(v, sp.neg_window_lo, sp.neg_window_hi)) return;
    if (sp.mine) {
      const A u = mining_u(v, lp, sp.mine_on_cosine);
      max_neg = nan_max(max_neg, u);
      if (!(u + sp.miner_eps > min_pos)) return;
    }
    neg.add(tneg, term_value(tneg, v));
    if (hist) hist_add(sp, v, hist + nodes * N, N);
  });
  neg.merge_lanes();
  if (sp.mine) max_neg = nan_max(max_neg, pair_lane(max_neg));

  A ntx = A(0), ntx_dlse = A(0);
  if (p.defer) {
    const A lse_neg = neg.lse.value();  // -inf when the negatives are not LSE-reduced
    walk_columns<T>(p, o0, no, b_begin, b_end, smem, [&](A s, int64_t col, int64_t lx) {
      if (lx != lo || col == ex) return;
      const A v = pair_v(sp, s);
      if (sp.mine && !(mining_u(v, lp, sp.mine_on_cosine) - sp.miner_eps < max_neg)) return;
      if (sp.windows && !in_keep_window(v, sp.pos_window_lo, sp.pos_window_hi)) return;
      const A x = term_value(tpos, v);
      pos.add(tpos, x);
      if (sp.pos_vs_neg_lse) {
        const A tt = x - lse_neg;
        ntx += ntx_pair_loss(tt, sp.ntx_tiny);
        ntx_dlse -= ntx_pair_dloss(tt, sp.ntx_tiny);
      }
    });
  }
  pos.merge_lanes();
  ntx += pair_lane(ntx);
  ntx_dlse += pair_lane(ntx_dlse);

  if (valid && h == 0) {
    const int64_t row = mapped_row(p.perm_q, o);
    p.values[fpl::kLsePos * N + row] = pos.lse.value();
    p.values[fpl::kLseNeg * N + row] = neg.lse.value();
    p.values[fpl::kSumPos * N + row] = pos.sum;
    p.values[fpl::kSumNeg * N + row] = neg.sum;
    p.values[fpl::kPosVsNeg * N + row] = ntx;
    p.values[fpl::kWeightPos * N + row] = pos.weight;
    p.values[fpl::kWeightNeg * N + row] = neg.weight;
    p.counts[fpl::kCountPos * N + row] = pos.count;
    p.counts[fpl::kCountNeg * N + row] = neg.count;
    p.counts[fpl::kNonzeroPos * N + row] = pos.nonzero;
    p.counts[fpl::kNonzeroNeg * N + row] = neg.nonzero;
    p.aux[fpl::kMinPos * N + row] = min_pos;
    p.aux[fpl::kMaxNeg * N + row] = max_neg;
    p.aux[fpl::kPosVsNegDLse * N + row] = ntx_dlse;
  }
}

// ---- backward --------------------------------------------------------------------------------
// What the backward needs of a row of q: incoming gradients and saved statistics.
template <typename A>
struct RowStats {
  A g_lse[2], g_sum[2], g_weight[2], g_ntx, lse[2], min_pos, max_neg;
  A shift;  // the row shift (0 without one)
};
constexpr int kNumStats = 12;

template <typename T>
FPL_DEV RowStats<typename AccOf<T>::type> load_stats(const PairArgs<T>& p, int64_t row) {
  const int64_t N = p.N;
  RowStats<typename AccOf<T>::type> s;
  s.g_lse[0] = p.gvals[fpl::kLsePos * N + row];
  s.g_lse[1] = p.gvals[fpl::kLseNeg * N + row];
  s.g_sum[0] = p.gvals[fpl::kSumPos * N + row];
  s.g_sum[1] = p.gvals[fpl::kSumNeg * N + row];
  s.g_ntx = p.gvals[fpl::kPosVsNeg * N + row];
  s.g_weight[0] = p.gvals[fpl::kWeightPos * N + row];
  s.g_weight[1] = p.gvals[fpl::kWeightNeg * N + row];
  s.lse[0] = p.vals[fpl::kLsePos * N + row];
  s.lse[1] = p.vals[fpl::kLseNeg * N + row];
  s.min_pos = p.auxin[fpl::kMinPos * N + row];
  s.max_neg = p.auxin[fpl::kMaxNeg * N + row];
  s.shift = p.row_shift ? p.row_shift[row] : typename AccOf<T>::type(0);
  return s;
}

template <typename A>
FPL_DEV void store_stats(const RowStats<A>& s, A* dst, int x) {
  const A v[kNumStats] = {s.g_lse[0], s.g_lse[1], s.g_sum[0], s.g_sum[1],    s.g_ntx,       s.lse[0],
                          s.lse[1],   s.min_pos,  s.max_neg,  s.g_weight[0], s.g_weight[1], s.shift};
#pragma unroll
  for (int k = 0; k < kNumStats; ++k) dst[k * kBN + x] = v[k];
}

template <typename A>
FPL_DEV RowStats<A> staged_stats(const A* src, int x) {
  RowStats<A> s;
  s.g_lse[0] = src[0 * kBN + x];
  s.g_lse[1] = src[1 * kBN + x];
  s.g_sum[0] = src[2 * kBN + x];
  s.g_sum[1] = src[3 * kBN + x];
  s.g_ntx = src[4 * kBN + x];
  s.lse[0] = src[5 * kBN + x];
  s.lse[1] = src[6 * kBN + x];
  s.min_pos = src[7 * kBN + x];
  s.max_neg = src[8 * kBN + x];
  s.g_weight[0] = src[9 * kBN + x];
  s.g_weight[1] = src[10 * kBN + x];
  s.shift = src[11 * kBN + x];
  return s;
}

// G = dL/dS of the pair (row i, column j) from row i's statistics (ops/README.md backward):
//   kept pair of set s: (g_lse_s exp(x - lse_s) [LSE] + g_sum_s [SUM]) dx/dv dv/dS
//   exp-weighted sum instead, w = exp(T x): w (g_sum_s (1 + T x) + g_weight_s T) dx/dv dv/dS
//   kept positive, NTXent: + g_ntx dphi(x - lse_neg) dx/dv dv/dS
// s: the tile's entry (S, or the squared distance with LP_DISTANCE).
// Histograms: + the pulses' slope (hist_dv) dv/dS, g_hist the row's incoming gradients of its
// histograms (node k of set 0 at g_hist[k N], of set 1 at g_hist[(nodes + k) N]).
template <typename A>
FPL_DEV A pair_grad(const PairSpec<A>& sp, A s, bool same, bool excluded, bool shifted, const RowStats<A>& st,
                    const A* g_hist, int64_t N) {
  const A v = pair_v(sp, s);
  bool pos = same && !excluded, neg = !same;
  if (sp.mine) {
    const A u = mining_u(v, sp.lp_distance, sp.mine_on_cosine);
    pos = pos && (u - sp.miner_eps < st.max_neg);
    neg = neg && (u + sp.miner_eps > st.min_pos);
  }
  if (sp.windows) {
    pos = pos && in_keep_window(v, sp.pos_window_lo, sp.pos_window_hi);
    neg = neg && in_keep_window(v, sp.neg_window_lo, sp.neg_window_hi);
  }
  if (!pos && !neg) return A(0);
  PairTermParams<A> tp = pos ? sp.pos : sp.neg;
  if (shifted) tp.shift += st.shift;
  const int set = pos ? 0 : 1;
  const A x = term_value(tp, v);
  const A db = term_dvalue(tp, v, x) * (sp.lp_distance ? pair_dv_lp(v) : A(1));
  const A gl = tp.lse ? st.g_lse[set] * math_exp(x - st.lse[set]) : A(0);
  A gs = tp.sum ? st.g_sum[set] : A(0);
  if (tp.sum && tp.sum_temperature != A(0) && x > A(0)) {  // x <= 0: db is 0
    const A T = tp.sum_temperature, w = math_exp(T * x);
    gs = w * (gs * (A(1) + T * x) + st.g_weight[set] * T);
  }
  A g = (gl + gs) * db;
  if (pos && sp.pos_vs_neg_lse) g += st.g_ntx * ntx_pair_dloss(x - st.lse[1], sp.ntx_tiny) * db;
  if (g_hist != nullptr)
    g += hist_dv(sp, v, g_hist + set * sp.hist_nodes * N, N) * (sp.lp_distance ? pair_dv_lp(v) : A(1));
  return g;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) pair_backward_kernel(PairArgs<T> p, int pass) {
  using A = typename AccOf<T>::type;
  extern __shared__ __align__(128) unsigned char smem[];
  A* Ss = reinterpret_cast<A*>(smem);
  unsigned char* stage = smem + Smem<T>::kSsBytes;
  int64_t* lx_s = reinterpret_cast<int64_t*>(smem + Smem<T>::kExtraOffset);
  int64_t* ex_s = lx_s + kBN;
  A* xst = reinterpret_cast<A*>(ex_s + kBN);  // [kNumStats][kBN]

  const int t = threadIdx.x, ol = t >> 1, h = t & 1;
  const PairSpec<A>& sp = p.sp;
  const bool lp = sp.lp_distance, shifted = p.row_shift != nullptr;
  const int64_t n_owner = pass == 0 ? p.N : p.M, n_other = pass == 0 ? p.M : p.N;
  const int64_t* l_owner = pass == 0 ? p.lq : p.lr;
  const int64_t* l_other = pass == 0 ? p.lr : p.lq;
  const T* X = pass == 0 ? p.q : p.r;  // owner rows
  const T* V = pass == 0 ? p.r : p.q;  // other rows
  const int64_t* perm_owner = pass == 0 ? p.perm_q : p.perm_r;
  const int64_t* perm_other = pass == 0 ? p.perm_r : p.perm_q;
  const bool use_owner = pass == 0;                 // G_ox, the owner row's statistics
  const bool use_other = p.self_mode || pass == 1;  // G_xo, the other row's (a row of q)
  const int64_t o0 = int64_t(blockIdx.x) * kBM;
  const int no = int(n_owner - o0 < kBM ? n_owner - o0 : kBM);
  const bool valid = ol < no;
  const int64_t o = o0 + ol;
  const int64_t lo = valid ? l_owner[o] : 0;
  const int64_t ex_o = (use_owner && valid) ? (p.self_mode ? o : (p.excl ? p.excl[o] : -1)) : -1;
  RowStats<A> ost{};
  if (use_owner && valid) ost = load_stats(p, mapped_row(perm_owner, o));
  // histograms' incoming gradients ([2 nodes][N] after the value rows), at the owner's row
  const A* g_hist = sp.hist_nodes > 0 ? p.gvals + fpl::kNumPairValues * p.N : nullptr;
  const A* g_hist_owner = (g_hist && use_owner && valid) ? g_hist + mapped_row(perm_owner, o) : nullptr;

  A gsum = A(0);  // sum over the walk of H_ox (LP_DISTANCE: the norms' share)
  for (int64_t x0 = 0; x0 < n_other; x0 += kBN) {
    const int nx = int(n_other - x0 < kBN ? n_other - x0 : kBN);
    __syncthreads();  // the previous tile's readers of the staged rows / Ss are done
    if (t < nx) {
      const int64_t x = x0 + t;
      lx_s[t] = l_other[x];
      if (use_other) {
        ex_s[t] = p.self_mode ? x : (p.excl ? p.excl[x] : -1);
        store_stats(load_stats(p, mapped_row(perm_other, x)), xst, t);
      }
    }
    pair_tile<T>(p, pass, o0, no, x0, nx, Ss, stage);
    if (valid) {
      for (int x = h; x < nx; x += 2) {
        const A s = Ss[ol * kLDS + x];
        const bool same = lo == lx_s[x];
        A hv = A(0);
        if (use_owner) hv += pair_grad(sp, s, same, x0 + x == ex_o, shifted, ost, g_hist_owner, p.N);
        if (use_other) {
          const A* g_hist_other = g_hist ? g_hist + mapped_row(perm_other, x0 + x) : nullptr;
          hv += pair_grad(sp, s, same, o == ex_s[x], shifted, staged_stats(xst, x), g_hist_other, p.N);
        }
        gsum += hv;
        Ss[ol * kLDS + x] = hv;
      }
    }
    __syncthreads();
    accumulate_tile<T>(Ss, no, nx, p.out, perm_owner, o0, V + x0 * p.D, p.D);
  }
  if (lp) {  // d = sqrt(|x_o|^2 + |v|^2 - 2 S): d/dx_o of the norm gives -x_o sum H_ox
    gsum += pair_lane(gsum);
    __syncthreads();  // this CTA's accumulate_tile writes to its rows are done
    if (valid) {
      const int64_t row = mapped_row(perm_owner, o);
      for (int64_t d = h; d < p.D; d += 2) p.out[row * p.D + d] -= gsum * to_acc(X[o * p.D + d]);
    }
  }
}

// ---- launchers -------------------------------------------------------------------------------
template <typename T>
PairArgs<T> make_args(const PairOperands& op, const double* terms, int64_t flags) {
  using A = typename AccOf<T>::type;
  PairArgs<T> a{};
  a.q = static_cast<const T*>(op.q);
  a.r = op.self_mode ? a.q : static_cast<const T*>(op.r);
  a.lq = op.labels_q;
  a.lr = op.self_mode ? op.labels_q : op.labels_r;
  a.excl = op.self_mode ? nullptr : op.exclude_col;
  a.band_lo = op.band_lo;
  a.band_hi = op.band_hi;
  a.perm_q = op.perm_q;
  a.perm_r = op.self_mode ? op.perm_q : op.perm_r;
  a.nq = static_cast<const A*>(op.norm_q);
  a.nr = op.self_mode ? a.nq : static_cast<const A*>(op.norm_r);
  a.row_shift = static_cast<const A*>(op.row_shift);
  a.N = op.N;
  a.M = op.self_mode ? op.N : op.M;
  a.D = op.D;
  a.self_mode = op.self_mode;
  a.vec16 = op.vec16;
  a.sp = fpl::decode_pair_spec<A>(terms, flags);
  a.defer = a.sp.defer_positives();
  return a;
}

template <typename T>
bool operands_ok(const PairArgs<T>& a) {
  // (empty tensors may have null data)
  if (a.N > 0 && (a.q == nullptr || a.lq == nullptr)) return false;
  if (a.M > 0 && (a.r == nullptr || a.lr == nullptr)) return false;
  if (a.defer && a.N > 0 && (a.band_lo == nullptr || a.band_hi == nullptr)) return false;
  if (a.sp.lp_distance && ((a.N > 0 && a.nq == nullptr) || (a.M > 0 && a.nr == nullptr))) return false;
  return true;
}

template <typename T>
cudaError_t forward_t(const PairOperands& op, const double* terms, int64_t flags, void* values, int32_t* counts,
                      void* aux, void* hist_scratch, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  if (op.N == 0) return cudaSuccess;
  PairArgs<T> a = make_args<T>(op, terms, flags);
  if (!operands_ok(a)) return cudaErrorInvalidValue;
  a.values = static_cast<A*>(values);
  a.counts = counts;
  a.aux = static_cast<A*>(aux);
  a.hist_scratch = static_cast<A*>(hist_scratch);
  if (a.sp.hist_nodes > 0 && hist_scratch == nullptr) return cudaErrorInvalidValue;
  const size_t smem = Smem<T>::kExtraOffset + kBN * sizeof(int64_t);
  cudaError_t err = prepare_smem(pair_forward_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  FPL_LAUNCH(pair_forward_kernel<T>, grid_for(a.N, kBM), smem, stream, a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_t(const PairOperands& op, const double* terms, int64_t flags, const void* gvals, const void* vals,
                       const void* aux, void* grad_q, void* grad_r, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  PairArgs<T> a = make_args<T>(op, terms, flags);
  if (!operands_ok(a)) return cudaErrorInvalidValue;
  a.gvals = static_cast<const A*>(gvals);
  a.vals = static_cast<const A*>(vals);
  a.auxin = static_cast<const A*>(aux);
  const size_t smem = Smem<T>::kExtraOffset + 2 * kBN * sizeof(int64_t) + kNumStats * kBN * sizeof(A);
  cudaError_t err = prepare_smem(pair_backward_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  if (a.N > 0 && grad_q != nullptr) {
    a.out = static_cast<A*>(grad_q);
    FPL_LAUNCH(pair_backward_kernel<T>, grid_for(a.N, kBM), smem, stream, a, 0);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (!a.self_mode && a.M > 0 && grad_r != nullptr) {
    a.out = static_cast<A*>(grad_r);
    FPL_LAUNCH(pair_backward_kernel<T>, grid_for(a.M, kBM), smem, stream, a, 1);
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace

cudaError_t pair_forward(const PairOperands& o, const double* terms, int64_t flags, void* values, int32_t* counts,
                         void* aux, void* hist_scratch, cudaStream_t stream) {
  switch (o.dt) {
    case DType::kFloat32:
      return forward_t<float>(o, terms, flags, values, counts, aux, hist_scratch, stream);
    case DType::kFloat64:
      return forward_t<double>(o, terms, flags, values, counts, aux, hist_scratch, stream);
    case DType::kFloat16:
      return forward_t<__half>(o, terms, flags, values, counts, aux, hist_scratch, stream);
    case DType::kBFloat16:
      return forward_t<__nv_bfloat16>(o, terms, flags, values, counts, aux, hist_scratch, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t pair_backward(const PairOperands& o, const double* terms, int64_t flags, const void* grad_values,
                          const void* values, const void* aux, void* grad_q, void* grad_r, cudaStream_t stream) {
#define FPL_PAIR_BWD(T) return backward_t<T>(o, terms, flags, grad_values, values, aux, grad_q, grad_r, stream)
  switch (o.dt) {
    case DType::kFloat32:
      FPL_PAIR_BWD(float);
    case DType::kFloat64:
      FPL_PAIR_BWD(double);
    case DType::kFloat16:
      FPL_PAIR_BWD(__half);
    case DType::kBFloat16:
      FPL_PAIR_BWD(__nv_bfloat16);
  }
#undef FPL_PAIR_BWD
  return cudaErrorInvalidValue;
}

}  // namespace fpl_cuda
