// CPU kernels of the tiled pair engine: fused_pairloss::pair_engine_forward / _backward
// (semantics: fused_pairloss/ops/README.md; per-pair math: csrc/common/pair_math.h).
//
// S is walked in tiles (T x T, T <= 256) that are computed with ATen's matmul (MKL, one thread
// per tile, see tile_parallel) into per-thread scratch; label masks are built on the fly from dense int32 label ids;
// per row an online log-sum-exp (running max + rescaled sum) is kept for the positive and the
// negative set. Nothing of size N x M is allocated: extra memory is O((N + M) D) (the operands in
// the compute dtype and the gradient accumulators) plus a few T x T buffers per thread.
//
// Self mode (r = None, S symmetric): only the tiles I <= J are computed, in both passes. A tile
// serves row block I (as is) and row block J (transposed, exactly the same numbers), so
// S_ij == S_ji bitwise and the forward and the backward see the same S. The tiles are processed
// in rounds of a round-robin tournament (all diagonal tiles, then nb - 1 rounds in which every
// block appears in at most one tile), so within a round no two tiles touch the same row block:
// row statistics and gradient rows are updated without atomics or per-thread copies, in an order
// fixed by the schedule, i.e. the results do not depend on the number of threads.
// Backward (self): per tile H = G_IJ + G_JI^T; dq_I += H q_J, dq_J += H^T q_I (grad_q = (G+G^T) q).
// Cross mode (r given): forward and a row pass (dq) parallel over row blocks of q, a column
// pass (dr) parallel over row blocks of r, every tile recomputed as q_I r_J^T (FlashAttention's
// deterministic backward).
// Mining (MultiSimilarityMiner) needs min_pos / max_neg of each row first: one more pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/pair_math.h"
// The element loops below are compiled without -ftrapping-math: GCC then if-converts selects
// whose arms are float arithmetic also without AVX-512 masks (the AVX2 clones vectorize). Nothing
// here reads the FP exception flags; NaN / inf semantics are unchanged.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#define FPL_PAIR_POP_OPTIONS 1
#endif
#include "cpu/vec_math.h"

namespace {

using namespace fpl::cpu_vec;

#if defined(FPL_PAIR_FORCE_ISA)
// testing hook: one instruction set only: -DFPL_PAIR_FORCE_ISA=3 (AVX2+FMA) or 0 (baseline)
#if FPL_PAIR_FORCE_ISA == 3
#define FPL_PAIR_CLONES __attribute__((target("arch=x86-64-v3")))
#else
#define FPL_PAIR_CLONES
#endif
#elif defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__linux__)
// Element loops compiled for AVX-512 / AVX2+FMA / baseline x86-64, picked at load time.
#define FPL_PAIR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FPL_PAIR_CLONES
#endif

// Runs f(k, scratch) for every k in [0, n) (scratch = init(), once per thread), handed out dynamically to an OpenMP team of
// at::get_num_threads() threads. The team is started even when n is 1: MKL (torch's CPU BLAS on
// x86) runs a matmul on one thread inside an active parallel region but may split it over threads
// outside one, and every tile of S must be computed the same way in every pass (forward, backward,
// row and column passes), whatever the number of tiles in a pass.
// `parallel` is decided once per call from the problem size (parallel_work), the same for every
// pass of the call, so a given tile is computed in the same context in every pass; tiny problems
// run inline (a thread team per round costs more than their work, a lot more on a busy machine).
template <typename Init, typename F>
void tile_parallel(int64_t n, bool parallel, const Init& init, const F& f) {
  if (n <= 0) return;
#ifdef _OPENMP
  const int nt = parallel ? std::max(1, at::get_num_threads()) : 1;
  if (nt == 1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto scratch = init();
    for (int64_t k = 0; k < n; ++k) f(k, scratch);
    return;
  }
  std::exception_ptr err = nullptr;
  std::atomic<bool> failed{false};
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(nt)
  {
    // dynamic: items are independent (disjoint output rows), so who runs one does not matter
    try {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // the tiles are plain buffers
      auto scratch = init();                                // per-thread tile buffers
      for (int64_t k = next.fetch_add(1); k < n && !failed.load(); k = next.fetch_add(1)) f(k, scratch);
    } catch (...) {
      if (!failed.exchange(true)) err = std::current_exception();
    }
  }
  if (err) std::rethrow_exception(err);
#else
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto scratch = init();
  for (int64_t k = 0; k < n; ++k) f(k, scratch);
#endif
}

bool parallel_work(int64_t N, int64_t M, int64_t D) {
  return static_cast<double>(N) * static_cast<double>(M) * static_cast<double>(std::max<int64_t>(D, 8)) > 4.0e6;
}

template <typename A>
constexpr A ninf() { return -std::numeric_limits<A>::infinity(); }
template <typename A>
constexpr A pinf() { return std::numeric_limits<A>::infinity(); }

// Logit of one set, specialised on whether it carries a weight (Circle) or not (MS).
// Same formula and rounding as fpl::PairLogit (pair_math.h): (scale * weight(S)) * (S - shift).
template <typename A, bool W>
struct Logit {
  A scale, shift, w_a, w_b;
  FPL_VEC_INLINE A weight(A s) const {
    if constexpr (W) return vrelu<A>(w_a + w_b * s);  // == fpl::relu_nan
    else return A(1);
  }
  FPL_VEC_INLINE A logit(A s) const { return (scale * weight(s)) * (s - shift); }
  FPL_VEC_INLINE A dlogit(A s) const { return scale * weight(s); }
};

template <typename A, bool W>
struct Params {
  Logit<A, W> pos, neg;
  A eps;
};

template <typename A, bool W>
Params<A, W> make_params(const fpl::PairLoss<A>& L) {
  Params<A, W> P;
  P.pos = Logit<A, W>{L.pos.scale, L.pos.shift, L.pos.w_a, L.pos.w_b};
  P.neg = Logit<A, W>{L.neg.scale, L.neg.shift, L.neg.w_a, L.neg.w_b};
  P.eps = L.miner_eps;
  return P;
}

// One tile of S (rows x cols, row stride ld) with the label ids and global indices of its rows
// and columns.
template <typename A>
struct Tile {
  const A* S;
  int64_t ld;
  int rows, cols;
  const int32_t* lab_r;
  const int32_t* lab_c;
  int64_t row0, col0;
  bool exclude_diag;
};

// Per-row state, arrays over all rows (indexed by global row).
template <typename A>
struct RowState {
  A* maxp;
  A* sump;
  A* maxn;
  A* sumn;
  int32_t* cntp;
  int32_t* cntn;
  A* minpos;   // mining thresholds (unmined sets)
  A* maxneg;
  // backward
  const A* gp;
  const A* gn;
  const A* lsep;
  const A* lsen;
};

// column of the excluded self pair of global row gi in this tile, or -1
template <typename A>
FPL_VEC_INLINE int32_t diag_col(const Tile<A>& t, int64_t gi) {
  const int64_t d = gi - t.col0;
  return (t.exclude_diag && d >= 0 && d < t.cols) ? static_cast<int32_t>(d) : -1;
}

FPL_VEC_INLINE int pad_lanes(int n) { return (n + kLanes - 1) / kLanes * kLanes; }

// ---- pass 0 (mining only): min over positives, max over negatives, per row --------------------
template <typename A>
FPL_VEC_INLINE void minmax_rows_impl(const Tile<A>& t_, const RowState<A>& st, A* bp, A* bn) {
  const Tile<A> t = t_;  // local copy: stores through bp / bn cannot alias it
  const int cp = pad_lanes(t.cols);
  for (int i = 0; i < t.rows; ++i) {
    const A* s = t.S + static_cast<int64_t>(i) * t.ld;
    const int64_t gi = t.row0 + i;
    const int32_t li = t.lab_r[i];
    const int32_t dj = diag_col(t, gi);
    for (int j = 0; j < t.cols; ++j) {
      const A v = s[j];
      const bool same = t.lab_c[j] == li;
      const bool pos = same & (j != dj);
      bp[j] = pos ? v : pinf<A>();
      bn[j] = same ? ninf<A>() : v;
    }
    for (int j = t.cols; j < cp; ++j) {
      bp[j] = pinf<A>();
      bn[j] = ninf<A>();
    }
    // min / max that skip NaN (selects only) plus a NaN flag per lane: torch.amin / amax
    // semantics (a NaN among the pairs makes the threshold NaN) without NaN-sticky selects
    A mp[kLanes], mn[kLanes];
    int32_t np[kLanes], nn[kLanes];
    for (int k = 0; k < kLanes; ++k) {
      mp[k] = pinf<A>();
      mn[k] = ninf<A>();
      np[k] = nn[k] = 0;
    }
    for (int j = 0; j < cp; j += kLanes)
      for (int k = 0; k < kLanes; ++k) {
        const A a = bp[j + k], b = bn[j + k];
        mp[k] = a < mp[k] ? a : mp[k];
        mn[k] = b > mn[k] ? b : mn[k];
        np[k] |= (a != a) ? 1 : 0;
        nn[k] |= (b != b) ? 1 : 0;
      }
    A a = st.minpos[gi], b = st.maxneg[gi];
    int32_t any_np = 0, any_nn = 0;
    for (int k = 0; k < kLanes; ++k) {
      a = nan_min(a, mp[k]);
      b = nan_max(b, mn[k]);
      any_np |= np[k];
      any_nn |= nn[k];
    }
    if (any_np) a = std::numeric_limits<A>::quiet_NaN();
    if (any_nn) b = std::numeric_limits<A>::quiet_NaN();
    st.minpos[gi] = a;
    st.maxneg[gi] = b;
  }
}

// MultiSimilarityMiner rule (pair_math.h keep_positive / keep_negative) applied to one row of a
// tile after the set masks: x_j (a logit, or logit - lse) becomes -inf for a pair the miner drops.
// Used by the backward in a loop of its own: folded into its mask loop, GCC 12 leaves that loop
// scalar (mined backward at N=4096: 64 ms instead of 54). The forward keeps the folded form, which
// measured faster there (45 vs 52 ms).
template <typename A, bool W>
FPL_VEC_INLINE void drop_unmined(const Tile<A>& t, const Params<A, W>& P, int32_t li, A thr_p,
                                 A thr_n, const A* s, A* x) {
  for (int j = 0; j < t.cols; ++j) {
    const A v = s[j];
    const bool keep = (t.lab_c[j] == li) ? (v - P.eps < thr_p) : (v + P.eps > thr_n);
    x[j] = keep ? x[j] : ninf<A>();
  }
}

// ---- forward: online log-sum-exp of the kept positive / negative logits, per row --------------
template <typename A, bool W, bool MINE>
FPL_VEC_INLINE void lse_rows_impl(const Tile<A>& t_, const Params<A, W>& P_, const RowState<A>& st,
                                   A* xb, int32_t* cb) {
  const Tile<A> t = t_;  // local copies: stores through xb / cb cannot alias them
  const Params<A, W> P = P_;
  const int cpad = pad_lanes(t.cols);
  for (int i = 0; i < t.rows; ++i) {
    const A* s = t.S + static_cast<int64_t>(i) * t.ld;
    const int64_t gi = t.row0 + i;
    const int32_t li = t.lab_r[i];
    const int32_t dj = diag_col(t, gi);
    const A thr_p = MINE ? st.maxneg[gi] : A(0);
    const A thr_n = MINE ? st.minpos[gi] : A(0);
    int32_t np = 0, nn = 0;
    for (int j = 0; j < t.cols; ++j) {
      // the mining rule as selects on floats (bool masks mixed with float compares stop GCC's
      // vectorizer); a kept pair never has logit -inf (S finite, or NaN: then it is kept only
      // without mining, and NaN != -inf)
      const A v = s[j];
      const bool same = t.lab_c[j] == li;
      const bool pos0 = same & (j != dj);
      A xp = pos0 ? P.pos.logit(v) : ninf<A>();
      A xn = same ? ninf<A>() : P.neg.logit(v);
      if constexpr (MINE) {
        xp = (v - P.eps < thr_p) ? xp : ninf<A>();
        xn = (v + P.eps > thr_n) ? xn : ninf<A>();
      }
      const int32_t c = (xp != ninf<A>()) ? 1 : ((xn != ninf<A>()) ? 2 : 0);
      xb[j] = c == 1 ? xp : xn;
      cb[j] = c;
      np += c == 1 ? 1 : 0;
      nn += c == 2 ? 1 : 0;
    }
    for (int j = t.cols; j < cpad; ++j) {
      xb[j] = ninf<A>();
      cb[j] = 0;
    }
    A mp[kLanes], mn[kLanes];
    for (int k = 0; k < kLanes; ++k) mp[k] = mn[k] = ninf<A>();
    for (int j = 0; j < cpad; j += kLanes)
      for (int k = 0; k < kLanes; ++k) {
        const A x = xb[j + k];
        const int32_t c = cb[j + k];
        mp[k] = vmax(mp[k], c == 1 ? x : ninf<A>());
        mn[k] = vmax(mn[k], c == 2 ? x : ninf<A>());
      }
    A Mp = st.maxp[gi], Mn = st.maxn[gi];
    const A old_mp = Mp, old_mn = Mn;
    for (int k = 0; k < kLanes; ++k) {
      Mp = vmax(Mp, mp[k]);
      Mn = vmax(Mn, mn[k]);
    }
    // exp in a plain map loop (vectorizes), then lane sums
    for (int j = 0; j < cpad; ++j) {
      const int32_t c = cb[j];
      const A d = xb[j] - (c == 1 ? Mp : Mn);  // no conditional arithmetic: selects only
      xb[j] = vexp(c == 0 ? ninf<A>() : d);
    }
    A sp[kLanes], sn[kLanes];
    for (int k = 0; k < kLanes; ++k) sp[k] = sn[k] = A(0);
    for (int j = 0; j < cpad; j += kLanes)
      for (int k = 0; k < kLanes; ++k) {
        const A e = xb[j + k];
        const int32_t c = cb[j + k];
        sp[k] += c == 1 ? e : A(0);
        sn[k] += c == 2 ? e : A(0);
      }
    // fixed pairwise combination of the lanes
    for (int w = kLanes / 2; w > 0; w /= 2)
      for (int k = 0; k < w; ++k) {
        sp[k] += sp[k + w];
        sn[k] += sn[k + w];
      }
    const A fp = (old_mp == Mp) ? A(1) : vexp(old_mp - Mp);
    const A fn = (old_mn == Mn) ? A(1) : vexp(old_mn - Mn);
    st.sump[gi] = st.sump[gi] * fp + sp[0];
    st.sumn[gi] = st.sumn[gi] * fn + sn[0];
    st.maxp[gi] = Mp;
    st.maxn[gi] = Mn;
    st.cntp[gi] += np;
    st.cntn[gi] += nn;
  }
}

// ---- backward: G_ij = dL/dS_ij for the rows of a tile ------------------------------------------
// Two map loops per row (set + exponent, then exp and weight): each vectorizes on its own, the
// fused loop does not (GCC 12).
template <typename A, bool W, bool MINE>
FPL_VEC_INLINE void grad_rows_impl(const Tile<A>& t_, const Params<A, W>& P_, const RowState<A>& st,
                                    A* G, int64_t ldg, int32_t* cb) {
  const Tile<A> t = t_;  // local copies: stores through G / cb cannot alias them
  const Params<A, W> P = P_;
  for (int i = 0; i < t.rows; ++i) {
    const A* s = t.S + static_cast<int64_t>(i) * t.ld;
    A* g = G + static_cast<int64_t>(i) * ldg;
    const int64_t gi = t.row0 + i;
    const int32_t li = t.lab_r[i];
    const int32_t dj = diag_col(t, gi);
    const A thr_p = MINE ? st.maxneg[gi] : A(0);
    const A thr_n = MINE ? st.minpos[gi] : A(0);
    const A gp = st.gp[gi], gn = st.gn[gi], lsp = st.lsep[gi], lsn = st.lsen[gi];
    for (int j = 0; j < t.cols; ++j) {
      // as in lse_rows_impl: masks as float selects; a kept pair has exponent > -inf
      const A v = s[j];
      const bool same = t.lab_c[j] == li;
      const bool pos0 = same & (j != dj);
      const A xp = pos0 ? P.pos.logit(v) : ninf<A>();
      const A xn = same ? ninf<A>() : P.neg.logit(v);
      const bool pos = xp != ninf<A>();
      const bool member = pos | (xn != ninf<A>());
      const A d = pos ? xp - lsp : xn - lsn;
      g[j] = member ? d : ninf<A>();  // not d: -inf - lse is NaN when lse is -inf
      cb[j] = pos ? 1 : 0;
    }
    if constexpr (MINE) drop_unmined(t, P, li, thr_p, thr_n, s, g);
    // as the reference: grad_lse * exp(logit - lse) * dlogit/dS. Outside both sets
    // e = exp(-inf) = 0, so the product is 0 (NaN only where S_ij is NaN: the row is NaN anyway).
    for (int j = 0; j < t.cols; ++j) {
      const A v = s[j];
      const bool pos = cb[j] == 1;
      const A e = vexp(g[j]);
      const A gr = pos ? gp : gn;
      const A dl = pos ? P.pos.dlogit(v) : P.neg.dlogit(v);
      g[j] = (gr * e) * dl;
    }
  }
}

// Non-template entry points of the element loops, each compiled once per instruction set.
#define FPL_PAIR_MINMAX(A)                                                                         \
  FPL_PAIR_CLONES void minmax_rows_##A(const Tile<A>& t, const RowState<A>& st, A* bp, A* bn) {    \
    minmax_rows_impl<A>(t, st, bp, bn);                                                            \
  }
#define FPL_PAIR_LSE(A, W, MINE)                                                                   \
  FPL_PAIR_CLONES void lse_rows_##A##_##W##_##MINE(const Tile<A>& t, const Params<A, W>& P,       \
                                                   const RowState<A>& st, A* xb, int32_t* cb) {    \
    lse_rows_impl<A, W, MINE>(t, P, st, xb, cb);                                                   \
  }
#define FPL_PAIR_GRAD(A, W, MINE)                                                                  \
  FPL_PAIR_CLONES void grad_rows_##A##_##W##_##MINE(const Tile<A>& t, const Params<A, W>& P,      \
                                                    const RowState<A>& st, A* G, int64_t ldg,      \
                                                    int32_t* cb) {                                 \
    grad_rows_impl<A, W, MINE>(t, P, st, G, ldg, cb);                                                  \
  }
#define FPL_PAIR_ALL(A)           \
  FPL_PAIR_MINMAX(A)              \
  FPL_PAIR_LSE(A, false, false)   \
  FPL_PAIR_LSE(A, false, true)    \
  FPL_PAIR_LSE(A, true, false)    \
  FPL_PAIR_LSE(A, true, true)     \
  FPL_PAIR_GRAD(A, false, false)  \
  FPL_PAIR_GRAD(A, false, true)   \
  FPL_PAIR_GRAD(A, true, false)   \
  FPL_PAIR_GRAD(A, true, true)
FPL_PAIR_ALL(float)
FPL_PAIR_ALL(double)

template <typename A>
struct Kernels;
#define FPL_PAIR_KERNELS(A)                                                                        \
  template <>                                                                                      \
  struct Kernels<A> {                                                                              \
    static void minmax(const Tile<A>& t, const RowState<A>& st, A* bp, A* bn) {                    \
      minmax_rows_##A(t, st, bp, bn);                                                              \
    }                                                                                              \
    template <bool W, bool MINE>                                                                   \
    static void lse(const Tile<A>& t, const Params<A, W>& P, const RowState<A>& st, A* xb,         \
                    int32_t* cb) {                                                                 \
      if constexpr (W && MINE) lse_rows_##A##_true_true(t, P, st, xb, cb);                         \
      else if constexpr (W) lse_rows_##A##_true_false(t, P, st, xb, cb);                           \
      else if constexpr (MINE) lse_rows_##A##_false_true(t, P, st, xb, cb);                        \
      else lse_rows_##A##_false_false(t, P, st, xb, cb);                                           \
    }                                                                                              \
    template <bool W, bool MINE>                                                                   \
    static void grad(const Tile<A>& t, const Params<A, W>& P, const RowState<A>& st, A* G,         \
                     int64_t ldg, int32_t* cb) {                                                   \
      if constexpr (W && MINE) grad_rows_##A##_true_true(t, P, st, G, ldg, cb);                    \
      else if constexpr (W) grad_rows_##A##_true_false(t, P, st, G, ldg, cb);                      \
      else if constexpr (MINE) grad_rows_##A##_false_true(t, P, st, G, ldg, cb);                   \
      else grad_rows_##A##_false_false(t, P, st, G, ldg, cb);                                          \
    }                                                                                              \
  };
FPL_PAIR_KERNELS(float)
FPL_PAIR_KERNELS(double)

#ifdef FPL_PAIR_POP_OPTIONS
#pragma GCC pop_options
#endif

// ---- small dense helpers ---------------------------------------------------------------------
template <typename A>
void transpose(const A* src, int rows, int cols, A* dst) {  // dst (cols x rows) = src^T
  constexpr int B = 32;
  for (int i0 = 0; i0 < rows; i0 += B)
    for (int j0 = 0; j0 < cols; j0 += B) {
      const int i1 = std::min(rows, i0 + B), j1 = std::min(cols, j0 + B);
      for (int j = j0; j < j1; ++j)
        for (int i = i0; i < i1; ++i) dst[static_cast<int64_t>(j) * rows + i] = src[static_cast<int64_t>(i) * cols + j];
    }
}

template <typename A>
void symmetrize_from_upper(A* S, int n) {  // S[b][a] = S[a][b] for a < b
  for (int a = 0; a < n; ++a)
    for (int b = a + 1; b < n; ++b) S[static_cast<int64_t>(b) * n + a] = S[static_cast<int64_t>(a) * n + b];
}

template <typename A>
void add_transposed(A* H, const A* G2, int rows, int cols) {  // H (rows x cols) += G2^T, G2 cols x rows
  constexpr int B = 32;
  for (int i0 = 0; i0 < rows; i0 += B)
    for (int j0 = 0; j0 < cols; j0 += B) {
      const int i1 = std::min(rows, i0 + B), j1 = std::min(cols, j0 + B);
      for (int i = i0; i < i1; ++i)
        for (int j = j0; j < j1; ++j) H[static_cast<int64_t>(i) * cols + j] += G2[static_cast<int64_t>(j) * rows + i];
    }
}

template <typename A>
void sym_add_self(A* G, int n) {  // G <- G + G^T
  for (int a = 0; a < n; ++a) {
    G[static_cast<int64_t>(a) * n + a] *= A(2);
    for (int b = a + 1; b < n; ++b) {
      const A h = G[static_cast<int64_t>(a) * n + b] + G[static_cast<int64_t>(b) * n + a];
      G[static_cast<int64_t>(a) * n + b] = h;
      G[static_cast<int64_t>(b) * n + a] = h;
    }
  }
}

// Tile edge: a function of the row count only (so every pass of one call tiles identically), small
// enough for a few tiles per thread on small inputs, 256 on large ones.
int64_t tile_size(int64_t n) {
  int64_t t = (n + 7) / 8;
  t = (t + 15) / 16 * 16;
  return std::max<int64_t>(32, std::min<int64_t>(256, t));
}

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

// ---- operands --------------------------------------------------------------------------------
struct Operands {
  at::Tensor q, r;          // compute dtype, contiguous; r undefined in self mode
  at::Tensor lab_q, lab_r;  // dense int32 label ids (lab_r undefined in self mode)
  bool self;
  int64_t N, M, D;
};

at::ScalarType compute_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

Operands prepare(const at::Tensor& q, const std::optional<at::Tensor>& r, const at::Tensor& labels_q,
                 const std::optional<at::Tensor>& labels_r) {
  TORCH_CHECK(q.device().is_cpu(), "pair_engine (cpu): q must be a CPU tensor");
  TORCH_CHECK(q.dim() == 2, "pair_engine: q must be 2-D (N, D), got ", q.sizes());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "pair_engine: q must be floating point");
  TORCH_CHECK(labels_q.dim() == 1 && labels_q.size(0) == q.size(0),
              "pair_engine: labels_q must have shape (N,) = (", q.size(0), ",), got ", labels_q.sizes());
  Operands o;
  const auto A = compute_dtype(q);
  o.self = !r.has_value();
  o.N = q.size(0);
  o.D = q.size(1);
  // detached: the tile matmuls run on OpenMP threads with out= tensors, outside autograd
  o.q = q.detach().to(A).contiguous();
  at::Tensor all_labels = labels_q.to(at::kLong).contiguous();
  if (!o.self) {
    const at::Tensor& rr = *r;
    TORCH_CHECK(rr.device().is_cpu(), "pair_engine (cpu): r must be a CPU tensor");
    TORCH_CHECK(rr.dim() == 2 && rr.size(1) == o.D, "pair_engine: r must have shape (M, ", o.D,
                "), got ", rr.sizes());
    TORCH_CHECK(rr.scalar_type() == q.scalar_type(), "pair_engine: q and r must have the same dtype");
    TORCH_CHECK(labels_r.has_value() && labels_r->dim() == 1 && labels_r->size(0) == rr.size(0),
                "pair_engine: labels_r must have shape (M,) = (", rr.size(0), ",)");
    o.M = rr.size(0);
    o.r = rr.detach().to(A).contiguous();
    all_labels = at::cat({all_labels, labels_r->to(at::kLong).contiguous()});
  } else {
    o.M = o.N;
  }
  // labels only meet in equality tests: dense int32 ids keep the mask lanes as wide as floats
  at::Tensor ids;
  if (all_labels.numel() > 0) {
    ids = std::get<1>(at::_unique(all_labels, /*sorted=*/true, /*return_inverse=*/true)).to(at::kInt);
  } else {
    ids = at::empty({0}, all_labels.options().dtype(at::kInt));
  }
  o.lab_q = ids.narrow(0, 0, o.N).contiguous();
  if (!o.self) o.lab_r = ids.narrow(0, o.N, o.M).contiguous();
  return o;
}

template <typename A>
at::Tensor blob(A* p, int64_t rows, int64_t cols) {
  return at::from_blob(p, {rows, cols}, at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value));
}

// S tile = a b^T into scratch (rows(a) x rows(b), contiguous)
template <typename A>
void tile_mm(A* out, const at::Tensor& a, const at::Tensor& b) {
  auto o = blob(out, a.size(0), b.size(0));
  at::mm_out(o, a, b.t());
}

template <typename A>
struct Scratch {
  std::vector<A> S, St, G1, G2, xb;
  std::vector<int32_t> cb;
  explicit Scratch(int64_t T) : S(T * T), St(T * T), G1(T * T), G2(T * T), xb(T + kLanes), cb(T + kLanes) {}
};

// ---- forward -----------------------------------------------------------------------------------
template <typename A, bool W, bool MINE>
std::vector<at::Tensor> forward_impl(const Operands& o, const fpl::PairLoss<A>& L, bool exclude_diag) {
  const auto A_t = c10::CppTypeToScalarType<A>::value;
  const auto opts = o.q.options().dtype(A_t);
  const int64_t N = o.N;
  at::Tensor maxp = at::full({N}, ninf<A>(), opts), sump = at::zeros({N}, opts);
  at::Tensor maxn = at::full({N}, ninf<A>(), opts), sumn = at::zeros({N}, opts);
  at::Tensor cntp = at::zeros({N}, opts.dtype(at::kInt)), cntn = at::zeros({N}, opts.dtype(at::kInt));
  at::Tensor minpos = at::full({N}, pinf<A>(), opts), maxneg = at::full({N}, ninf<A>(), opts);
  RowState<A> st{maxp.data_ptr<A>(), sump.data_ptr<A>(), maxn.data_ptr<A>(), sumn.data_ptr<A>(),
                 cntp.data_ptr<int32_t>(), cntn.data_ptr<int32_t>(), minpos.data_ptr<A>(),
                 maxneg.data_ptr<A>(), nullptr, nullptr, nullptr, nullptr};
  const Params<A, W> P = make_params<A, W>(L);
  const int32_t* lq = o.lab_q.data_ptr<int32_t>();
  const bool par = parallel_work(o.N, o.M, o.D);

  if (o.self) {
    const int64_t T = tile_size(N), nb = (N + T - 1) / T;
    const auto rounds = self_schedule(nb);
    for (int pass = MINE ? 0 : 1; pass < 2; ++pass) {
      for (const auto& round : rounds) {
        tile_parallel(static_cast<int64_t>(round.size()), par, [&] { return Scratch<A>(T); }, [&](int64_t k, Scratch<A>& sc) {
          {
            const int64_t I = round[k].first, J = round[k].second;
            const int64_t i0 = I * T, j0 = J * T;
            const int ti = static_cast<int>(std::min(T, N - i0)), tj = static_cast<int>(std::min(T, N - j0));
            tile_mm<A>(sc.S.data(), o.q.narrow(0, i0, ti), o.q.narrow(0, j0, tj));
            if (I == J) symmetrize_from_upper(sc.S.data(), ti);
            const Tile<A> t1{sc.S.data(), tj, ti, tj, lq + i0, lq + j0, i0, j0, true};
            if (pass == 0) Kernels<A>::minmax(t1, st, sc.xb.data(), sc.G1.data());
            else Kernels<A>::template lse<W, MINE>(t1, P, st, sc.xb.data(), sc.cb.data());
            if (I != J) {
              transpose(sc.S.data(), ti, tj, sc.St.data());
              const Tile<A> t2{sc.St.data(), ti, tj, ti, lq + j0, lq + i0, j0, i0, true};
              if (pass == 0) Kernels<A>::minmax(t2, st, sc.xb.data(), sc.G1.data());
              else Kernels<A>::template lse<W, MINE>(t2, P, st, sc.xb.data(), sc.cb.data());
            }
          }
        });
      }
    }
  } else {
    const int64_t M = o.M;
    const int64_t TI = tile_size(N), TJ = tile_size(M), nbi = (N + TI - 1) / TI, nbj = (M + TJ - 1) / TJ;
    const int32_t* lr = o.lab_r.data_ptr<int32_t>();
    tile_parallel(nbi, par, [&] { return Scratch<A>(std::max(TI, TJ)); }, [&](int64_t I, Scratch<A>& sc) {
      {
        const int64_t i0 = I * TI;
        const int ti = static_cast<int>(std::min(TI, N - i0));
        const at::Tensor qi = o.q.narrow(0, i0, ti);
        for (int pass = MINE ? 0 : 1; pass < 2; ++pass) {
          for (int64_t J = 0; J < nbj; ++J) {
            const int64_t j0 = J * TJ;
            const int tj = static_cast<int>(std::min(TJ, M - j0));
            tile_mm<A>(sc.S.data(), qi, o.r.narrow(0, j0, tj));
            const Tile<A> t{sc.S.data(), tj, ti, tj, lq + i0, lr + j0, i0, j0, exclude_diag};
            if (pass == 0) Kernels<A>::minmax(t, st, sc.xb.data(), sc.G1.data());
            else Kernels<A>::template lse<W, MINE>(t, P, st, sc.xb.data(), sc.cb.data());
          }
        }
      }
    });
  }

  // lse = max + log(sum); empty set (sum 0) -> -inf; NaN stays NaN
  at::Tensor lse_pos = at::empty({N}, opts), lse_neg = at::empty({N}, opts);
  A* lp = lse_pos.data_ptr<A>();
  A* ln = lse_neg.data_ptr<A>();
  for (int64_t i = 0; i < N; ++i) {
    const A a = st.sump[i], b = st.sumn[i];
    lp[i] = (a != a) ? a : (a > A(0) ? st.maxp[i] + std::log(a) : ninf<A>());
    ln[i] = (b != b) ? b : (b > A(0) ? st.maxn[i] + std::log(b) : ninf<A>());
  }
  return {lse_pos, lse_neg, cntp, cntn, minpos, maxneg};
}

// ---- backward ----------------------------------------------------------------------------------
template <typename A, bool W, bool MINE>
std::vector<at::Tensor> backward_impl(const Operands& o, const fpl::PairLoss<A>& L, bool exclude_diag,
                                      const at::Tensor& glp, const at::Tensor& gln, const at::Tensor& lsep,
                                      const at::Tensor& lsen, const at::Tensor& minpos,
                                      const at::Tensor& maxneg) {
  const auto A_t = c10::CppTypeToScalarType<A>::value;
  const auto opts = o.q.options().dtype(A_t);
  const int64_t N = o.N, D = o.D;
  RowState<A> st{nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                 const_cast<A*>(minpos.data_ptr<A>()), const_cast<A*>(maxneg.data_ptr<A>()),
                 glp.data_ptr<A>(), gln.data_ptr<A>(), lsep.data_ptr<A>(), lsen.data_ptr<A>()};
  const Params<A, W> P = make_params<A, W>(L);
  const int32_t* lq = o.lab_q.data_ptr<int32_t>();
  const bool par = parallel_work(o.N, o.M, o.D);
  at::Tensor dq = at::zeros({N, D}, opts);

  if (o.self) {
    const int64_t T = tile_size(N), nb = (N + T - 1) / T;
    const auto rounds = self_schedule(nb);
    for (const auto& round : rounds) {
      tile_parallel(static_cast<int64_t>(round.size()), par, [&] { return Scratch<A>(T); }, [&](int64_t k, Scratch<A>& sc) {
        {
          const int64_t I = round[k].first, J = round[k].second;
          const int64_t i0 = I * T, j0 = J * T;
          const int ti = static_cast<int>(std::min(T, N - i0)), tj = static_cast<int>(std::min(T, N - j0));
          const at::Tensor qi = o.q.narrow(0, i0, ti), qj = o.q.narrow(0, j0, tj);
          tile_mm<A>(sc.S.data(), qi, qj);
          const Tile<A> t1{sc.S.data(), tj, ti, tj, lq + i0, lq + j0, i0, j0, true};
          if (I == J) {
            symmetrize_from_upper(sc.S.data(), ti);
            Kernels<A>::template grad<W, MINE>(t1, P, st, sc.G1.data(), tj, sc.cb.data());
            sym_add_self(sc.G1.data(), ti);
            dq.narrow(0, i0, ti).addmm_(blob(sc.G1.data(), ti, ti), qi);
          } else {
            Kernels<A>::template grad<W, MINE>(t1, P, st, sc.G1.data(), tj, sc.cb.data());
            transpose(sc.S.data(), ti, tj, sc.St.data());
            const Tile<A> t2{sc.St.data(), ti, tj, ti, lq + j0, lq + i0, j0, i0, true};
            Kernels<A>::template grad<W, MINE>(t2, P, st, sc.G2.data(), ti, sc.cb.data());
            add_transposed(sc.G1.data(), sc.G2.data(), ti, tj);  // H = G_IJ + G_JI^T
            const at::Tensor H = blob(sc.G1.data(), ti, tj);
            dq.narrow(0, i0, ti).addmm_(H, qj);
            dq.narrow(0, j0, tj).addmm_(H.t(), qi);
          }
        }
      });
    }
    return {dq, at::Tensor()};
  }

  const int64_t M = o.M;
  const int64_t TI = tile_size(N), TJ = tile_size(M), nbi = (N + TI - 1) / TI, nbj = (M + TJ - 1) / TJ;
  const int32_t* lr = o.lab_r.data_ptr<int32_t>();
  at::Tensor dr = at::zeros({M, D}, opts);
  // row pass: dq_I = sum_J G_IJ r_J
  tile_parallel(nbi, par, [&] { return Scratch<A>(std::max(TI, TJ)); }, [&](int64_t I, Scratch<A>& sc) {
    {
      const int64_t i0 = I * TI;
      const int ti = static_cast<int>(std::min(TI, N - i0));
      const at::Tensor qi = o.q.narrow(0, i0, ti);
      at::Tensor dqi = dq.narrow(0, i0, ti);
      for (int64_t J = 0; J < nbj; ++J) {
        const int64_t j0 = J * TJ;
        const int tj = static_cast<int>(std::min(TJ, M - j0));
        const at::Tensor rj = o.r.narrow(0, j0, tj);
        tile_mm<A>(sc.S.data(), qi, rj);
        const Tile<A> t{sc.S.data(), tj, ti, tj, lq + i0, lr + j0, i0, j0, exclude_diag};
        Kernels<A>::template grad<W, MINE>(t, P, st, sc.G1.data(), tj, sc.cb.data());
        dqi.addmm_(blob(sc.G1.data(), ti, tj), rj);
      }
    }
  });
  // column pass: dr_J = sum_I G_IJ^T q_I, the same tiles q_I r_J^T recomputed
  tile_parallel(nbj, par, [&] { return Scratch<A>(std::max(TI, TJ)); }, [&](int64_t J, Scratch<A>& sc) {
    {
      const int64_t j0 = J * TJ;
      const int tj = static_cast<int>(std::min(TJ, M - j0));
      const at::Tensor rj = o.r.narrow(0, j0, tj);
      at::Tensor drj = dr.narrow(0, j0, tj);
      for (int64_t I = 0; I < nbi; ++I) {
        const int64_t i0 = I * TI;
        const int ti = static_cast<int>(std::min(TI, N - i0));
        const at::Tensor qi = o.q.narrow(0, i0, ti);
        tile_mm<A>(sc.S.data(), qi, rj);
        const Tile<A> t{sc.S.data(), tj, ti, tj, lq + i0, lr + j0, i0, j0, exclude_diag};
        Kernels<A>::template grad<W, MINE>(t, P, st, sc.G1.data(), tj, sc.cb.data());
        drj.addmm_(blob(sc.G1.data(), ti, tj).t(), qi);
      }
    }
  });
  return {dq, dr};
}

void check_kind(int64_t kind) {
  TORCH_CHECK(kind == fpl::kMultiSimilarity || kind == fpl::kCircle,
              "pair_engine: unknown kind ", kind, " (0 = Multi-Similarity, 1 = Circle)");
}

template <typename A, typename F>
auto dispatch_flags(int64_t kind, bool mine, F&& f) {
  const bool W = kind == fpl::kCircle;
  if (W && mine) return f(std::integral_constant<bool, true>{}, std::integral_constant<bool, true>{});
  if (W) return f(std::integral_constant<bool, true>{}, std::integral_constant<bool, false>{});
  if (mine) return f(std::integral_constant<bool, false>{}, std::integral_constant<bool, true>{});
  return f(std::integral_constant<bool, false>{}, std::integral_constant<bool, false>{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pair_engine_forward_cpu(
    const at::Tensor& q, const std::optional<at::Tensor>& r, const at::Tensor& labels_q,
    const std::optional<at::Tensor>& labels_r, bool exclude_diag, int64_t kind, double p0, double p1,
    double p2, bool mine, double miner_eps) {
  check_kind(kind);
  const Operands o = prepare(q, r, labels_q, labels_r);
  if (o.self) exclude_diag = true;
  std::vector<at::Tensor> out;
  if (o.q.scalar_type() == at::kDouble) {
    const auto L = fpl::make_pair_loss<double>(kind, p0, p1, p2, mine, miner_eps);
    out = dispatch_flags<double>(kind, mine, [&](auto W, auto MINE) {
      return forward_impl<double, decltype(W)::value, decltype(MINE)::value>(o, L, exclude_diag);
    });
  } else {
    const auto L = fpl::make_pair_loss<float>(kind, p0, p1, p2, mine, miner_eps);
    out = dispatch_flags<float>(kind, mine, [&](auto W, auto MINE) {
      return forward_impl<float, decltype(W)::value, decltype(MINE)::value>(o, L, exclude_diag);
    });
  }
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

std::tuple<at::Tensor, at::Tensor> pair_engine_backward_cpu(
    const at::Tensor& grad_lse_pos, const at::Tensor& grad_lse_neg, const at::Tensor& q,
    const std::optional<at::Tensor>& r, const at::Tensor& labels_q, const std::optional<at::Tensor>& labels_r,
    const at::Tensor& lse_pos, const at::Tensor& lse_neg, const at::Tensor& min_pos, const at::Tensor& max_neg,
    bool exclude_diag, int64_t kind, double p0, double p1, double p2, bool mine, double miner_eps) {
  check_kind(kind);
  const Operands o = prepare(q, r, labels_q, labels_r);
  if (o.self) exclude_diag = true;
  const auto A = compute_dtype(q);
  auto row = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == o.N, "pair_engine_backward: ", name, " must have shape (",
                o.N, ",), got ", t.sizes());
    return t.to(A).contiguous();
  };
  const at::Tensor glp = row(grad_lse_pos, "grad_lse_pos"), gln = row(grad_lse_neg, "grad_lse_neg");
  const at::Tensor lsp = row(lse_pos, "lse_pos"), lsn = row(lse_neg, "lse_neg");
  const at::Tensor mnp = row(min_pos, "min_pos"), mxn = row(max_neg, "max_neg");
  std::vector<at::Tensor> out;
  if (A == at::kDouble) {
    const auto L = fpl::make_pair_loss<double>(kind, p0, p1, p2, mine, miner_eps);
    out = dispatch_flags<double>(kind, mine, [&](auto W, auto MINE) {
      return backward_impl<double, decltype(W)::value, decltype(MINE)::value>(o, L, exclude_diag, glp, gln,
                                                                              lsp, lsn, mnp, mxn);
    });
  } else {
    const auto L = fpl::make_pair_loss<float>(kind, p0, p1, p2, mine, miner_eps);
    out = dispatch_flags<float>(kind, mine, [&](auto W, auto MINE) {
      return backward_impl<float, decltype(W)::value, decltype(MINE)::value>(o, L, exclude_diag, glp, gln,
                                                                             lsp, lsn, mnp, mxn);
    });
  }
  at::Tensor grad_q = out[0].to(q.scalar_type());
  at::Tensor grad_r = o.self ? q.new_empty({0}) : out[1].to(r->scalar_type());
  return {grad_q, grad_r};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_pairloss, CPU, m) {
  m.impl("pair_engine_forward", &pair_engine_forward_cpu);
  m.impl("pair_engine_backward", &pair_engine_backward_cpu);
}
