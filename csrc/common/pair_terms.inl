// Per-element math of the fused engines on a decoded declaration (loss_spec.h): the single
// definition of how a pair's value, its derivative, the mining orientation and the NTXent pair
// term are computed, for every C++ backend.
//
// Deliberately without include guard: it is included inside each backend's own namespace (the CPU
// engines compile it once per instruction set, csrc/cpu/kernels_isa.inc; CUDA once, in
// csrc/cuda/tile_common.cuh), so every copy is compiled with its caller's target options and is
// inlined into its loops. The includer defines FPL_TERM_FN (function qualifiers) and the scalar
// functions math_exp, math_log, math_log1p and math_sqrt for float and double.
//
// T is a float type, or (CPU) a vector of them: the functions are written with arithmetic,
// comparisons combined with `&` / `|` (never `&&`: no branches) and selects only, and constants
// come through TermLit, which the CPU kernels specialize to broadcast into their vector types.

template <typename T>
struct TermLit {
  static FPL_TERM_FN T of(double c) { return T(c); }
};

template <typename T>
FPL_TERM_FN T relu_keep_nan(T x) {  // torch.relu: NaN stays NaN
  return (x != x) ? x : (x > TermLit<T>::of(0) ? x : TermLit<T>::of(0));
}

// Squared distances (PML's LpDistance, p = 2, on the normalized rows; docs/design.md "Numerics").
// From the tile of S: d2 = |q_i|^2 + |r_j|^2 - 2 S_ij with nq = |q_i|^2, nr = |r_j|^2. Near d = 0
// that difference cancels most of its digits (two rows 1e-3 apart lose half of them in fp32), so
// for a near pair, d2 < kLpNearPair (nq + nr) (d below 1/4 for unit rows), each engine takes the
// sum of squared differences of the two rows instead, in increasing k (exactly 0 for identical
// rows, symmetric in the two rows). The tiles hold d2 from then on.
constexpr double kLpNearPair = 1.0 / 32;
template <typename T>
FPL_TERM_FN T lp_d2_from_s(T s, T nq, T nr) {
  return (nq + nr) - TermLit<T>::of(2) * s;
}
template <typename T>
FPL_TERM_FN bool lp_near_pair(T d2, T nq, T nr) {  // scalar T; false for NaN
  return d2 < TermLit<T>::of(kLpNearPair) * (nq + nr);
}

// v of a pair under the distance: d = sqrt(clamp_min(d2, 0)) (NaN passes).
template <typename T>
FPL_TERM_FN T pair_v_lp(T d2) {
  // clamp, then the root unconditionally: a call inside a select stops vectorizers
  return math_sqrt(((d2 > TermLit<T>::of(0)) | (d2 != d2)) ? d2 : TermLit<T>::of(0));
}

// dv/dS: 1 for cosine; -1/d for the distance, and 0 at d = 0 (the subgradient torch's
// _euclidean_dist_backward takes there).
template <typename T>
FPL_TERM_FN T pair_dv_lp(T v) {
  const T r = TermLit<T>::of(-1) / v;  // unconditionally: a division inside a select stops GCC's vectorizer
  return ((v > TermLit<T>::of(0)) | (v != v)) ? r : TermLit<T>::of(0);
}

// x = (scale * w(v)) * (v - shift), w detached; hinge: relu(x), with a NaN x taken as 0 (loss_spec.h
// PairFlag). A hinge term is reduced as PML's AvgNonZeroReducer reduces it: the terms > 0, so a NaN
// term (a row whose normalization gave NaN: an all-zero fp16 row) drops out of the sum and the
// count (dx/dv is 0 for it); NaN in, NaN out still holds at the loss (docs/semantics.md).
template <typename T>
FPL_TERM_FN T term_weight(const PairTermParams<T>& p, T v) {
  return relu_keep_nan<T>(p.weight_offset + p.weight_slope * v);
}
template <typename T>
FPL_TERM_FN T term_value(const PairTermParams<T>& p, T v) {
  const T x = (p.scale * term_weight(p, v)) * (v - p.shift);
  // floor NaN (no hinge): every comparison with it is false, x itself
  return ((x > p.hinge_floor) | (p.hinge_floor != p.hinge_floor)) ? x : p.hinge_floor;
}
// dx/dv, given x = term_value(p, v): the hinge blocks the gradient where x <= 0 (a dropped NaN term
// included); without the hinge it passes, NaN included.
template <typename T>
FPL_TERM_FN T term_dvalue(const PairTermParams<T>& p, T v, T x) {
  const T d = p.scale * term_weight(p, v);
  return ((x > p.hinge_floor) | (p.hinge_floor != p.hinge_floor)) ? d : TermLit<T>::of(0);
}

// The MultiSimilarityMiner compares similarities: u = S, or u = -d for a distance (PML's miner
// flips its comparisons for non-inverted distances; negating d is exact, so the rule on u is PML's).
// on_cosine (lp only): a cosine miner beside the lp loss, u = -d^2 / 2, which is S - 1 on normalized
// rows (d^2 = 2 - 2 S): the same comparisons as on S, up to the rounding of d.
template <typename T>
FPL_TERM_FN T mining_u(T v, bool lp, bool on_cosine) {
  return lp ? (on_cosine ? -(v * v) * TermLit<T>::of(0.5) : -v) : v;
}

// PairMarginMiner's keep windows (loss_spec.h kKeepWindows): lo < v < hi, false for a NaN v. A
// mask (vector T) or a bool.
template <typename T>
FPL_TERM_FN auto in_keep_window(T v, T lo, T hi) {
  return (v > lo) & (v < hi);
}

// NTXent's pair term (PML NTXentLoss: -log(e^x / (e^x + sum_neg e^x') + tiny)) with
// t = x - lse_neg_i: -log(sigmoid(t) + tiny), tiny = PairSpec::ntx_tiny (PML's small_val).
// log sigmoid(t) = -softplus(-t) = min(t, 0) - log1p(exp(-|t|)); sigmoid(t) = its exp.
template <typename T>
FPL_TERM_FN T ntx_log_sigmoid(T t) {
  const T a = t < TermLit<T>::of(0) ? -t : t;
  return (t < TermLit<T>::of(0) ? t : TermLit<T>::of(0)) - math_log1p(math_exp(-a));
}
template <typename T>
FPL_TERM_FN T ntx_sigmoid(T t) {
  return (t != t) ? t : math_exp(ntx_log_sigmoid(t));
}
// log sigmoid(t) above kNtxDirectAbove (or t NaN): the term as PML computes it, -log(sigmoid(t) +
// tiny), which is 0 where sigmoid(t) rounds to 1. Below, in log space, -logaddexp(log sigmoid(t),
// log tiny): where sigmoid(t) is below the tiny (t < about -87 in fp32) its exp would be subnormal
// or flushed to 0, and PML's term is -log(subnormal + tiny), not -log(tiny).
constexpr double kNtxDirectAbove = -1;
template <typename T>
FPL_TERM_FN bool ntx_direct(T log_sigmoid) {
  return !(log_sigmoid <= TermLit<T>::of(kNtxDirectAbove));
}
template <typename T>
FPL_TERM_FN T ntx_pair_loss(T t, T tiny) {
  const T ls = ntx_log_sigmoid(t), lt = math_log(tiny);
  if (ntx_direct(ls)) return -math_log(ntx_sigmoid(t) + tiny);
  const T hi = ls > lt ? ls : lt, lo = ls > lt ? lt : ls;
  return -(hi + math_log1p(math_exp(lo - hi)));
}
// d/dt of ntx_pair_loss: -sigmoid (1 - sigmoid) / (sigmoid + tiny)
//   = -sigmoid(-t) exp(log sigmoid(t) - logaddexp(log sigmoid(t), log tiny))
template <typename T>
FPL_TERM_FN T ntx_pair_dloss(T t, T tiny) {
  const T ls = ntx_log_sigmoid(t);
  if (ntx_direct(ls)) {
    const T sg = ntx_sigmoid(t);
    return -(sg * ntx_sigmoid(-t)) / (sg + tiny);
  }
  return -ntx_sigmoid(-t) * math_exp(ls + ntx_pair_loss(t, tiny));
}

// softplus(x) = log(1 + e^x) = max(x, 0) + log1p(e^-|x|) (SigLIP's pair loss, -log sigmoid(-x)) and
// its derivative sigmoid(x); NaN stays NaN, softplus(-inf) = 0, softplus(+inf) = +inf.
template <typename T>
FPL_TERM_FN T softplus_value(T x) {
  const T a = x < TermLit<T>::of(0) ? -x : x;
  return (x > TermLit<T>::of(0) ? x : TermLit<T>::of(0)) + math_log1p(math_exp(-a));
}
template <typename T>
FPL_TERM_FN T sigmoid_value(T x) {
  return TermLit<T>::of(1) / (TermLit<T>::of(1) + math_exp(-x));
}
