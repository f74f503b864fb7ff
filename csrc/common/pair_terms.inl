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

// v of a pair: S itself, or PML's LpDistance on the normalized rows (torch.cdist, p = 2):
// sqrt(clamp_min(|q_i|^2 + |r_j|^2 - 2 S_ij, 0)) with nq = |q_i|^2, nr = |r_j|^2.
template <typename T>
FPL_TERM_FN T pair_v_lp(T s, T nq, T nr) {
  const T d2 = (nq + nr) - TermLit<T>::of(2) * s;
  // clamp (NaN passes), then the root unconditionally: a call inside a select stops vectorizers
  return math_sqrt(((d2 > TermLit<T>::of(0)) | (d2 != d2)) ? d2 : TermLit<T>::of(0));
}

// dv/dS: 1 for cosine; -1/d for the distance, and 0 at d = 0 (the subgradient torch's
// _euclidean_dist_backward takes there).
template <typename T>
FPL_TERM_FN T pair_dv_lp(T v) {
  const T r = TermLit<T>::of(-1) / v;  // unconditionally: a division inside a select stops GCC's vectorizer
  return ((v > TermLit<T>::of(0)) | (v != v)) ? r : TermLit<T>::of(0);
}

// x = (scale * w(v)) * (v - shift), w detached; hinge: relu(x). (loss_spec.h PairFlag)
template <typename T>
FPL_TERM_FN T term_weight(const PairTermParams<T>& p, T v) {
  return relu_keep_nan<T>(p.weight_offset + p.weight_slope * v);
}
template <typename T>
FPL_TERM_FN T term_value(const PairTermParams<T>& p, T v) {
  const T x = (p.scale * term_weight(p, v)) * (v - p.shift);
  return x < p.hinge_floor ? p.hinge_floor : x;  // relu(x), NaN kept; floor NaN: x itself
}
// dx/dv, given x = term_value(p, v): the hinge blocks the gradient where x <= 0 and passes it
// elsewhere, NaN included (torch's relu backward).
template <typename T>
FPL_TERM_FN T term_dvalue(const PairTermParams<T>& p, T v, T x) {
  const T d = p.scale * term_weight(p, v);
  return x <= p.hinge_floor ? TermLit<T>::of(0) : d;
}

// The MultiSimilarityMiner compares similarities: u = S, or u = -d for a distance (PML's miner
// flips its comparisons for non-inverted distances; negating d is exact, so the rule on u is PML's).
template <typename T>
FPL_TERM_FN T mining_u(T v, bool lp) {
  return lp ? -v : v;
}

template <typename T>
FPL_TERM_FN T smallest_normal();
template <>
FPL_TERM_FN float smallest_normal<float>() {
  return 1.17549435082228750797e-38f;
}
template <>
FPL_TERM_FN double smallest_normal<double>() {
  return 2.22507385850720138309e-308;
}

// NTXent's pair term (PML NTXentLoss: -log(e^x / (e^x + sum_neg e^x') + tiny)) with
// t = x - lse_neg_i: -log(sigmoid(t) + tiny), tiny = the dtype's smallest normal (PML small_val).
// sigmoid(t) = exp(-softplus(-t)), softplus(-t) = max(-t, 0) + log1p(exp(-|t|)).
template <typename T>
FPL_TERM_FN T ntx_sigmoid(T t) {
  const T a = t < TermLit<T>::of(0) ? -t : t;
  const T sp = (t < TermLit<T>::of(0) ? -t : TermLit<T>::of(0)) + math_log1p(math_exp(-a));
  return (t != t) ? t : math_exp(-sp);
}
template <typename T>
FPL_TERM_FN T ntx_pair_loss(T t) {
  return -math_log(ntx_sigmoid(t) + smallest_normal<T>());
}
// d/dt of ntx_pair_loss: -sigmoid (1 - sigmoid) / (sigmoid + tiny)
template <typename T>
FPL_TERM_FN T ntx_pair_dloss(T t) {
  const T sg = ntx_sigmoid(t);
  const T one_minus = ntx_sigmoid(-t);
  return -(sg * one_minus) / (sg + smallest_normal<T>());
}
