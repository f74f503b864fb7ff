// The loss declaration as the fused ops receive it, decoded once per call.
//
// A loss is declared once, in Python (fused_pairloss/ops/spec.py: PairLossSpec, ClassLossSpec),
// and packed into the ops' arguments `float[] terms, int flags`; this header is the one place that
// reads that layout back into named fields. Every C++ backend (csrc/cpu, csrc/cuda) consumes these
// structs; the per-element math on them is csrc/common/pair_terms.inl. No kernel knows which loss
// it runs. The layout constants are mirrored in spec.py, and tests/test_ops_registration.py checks
// that both sides agree (op `fused_pairloss::describe_spec`).
//
// No torch headers here: included from .cu files.
#pragma once

#include <cstdint>
#include <limits>
#include <string>

namespace fpl {

// ---- pair engine (tiles of S = q r^T) -----------------------------------------------------------
// Per-pair function of one set (positives or negatives), docs/design.md "pair terms":
//   v = S_ij (cosine) or d_ij = sqrt(max(|q_i|^2 + |r_j|^2 - 2 S_ij, 0)) (PML LpDistance)
//   x = (scale * w(v)) * (v - shift),  w(v) = relu(weight_offset + weight_slope * v), detached
//   x = relu(x) if hinge
// and the row reductions over the set's (kept) pairs: LSE of x, sum of x (+ count of x > 0).
// A hinge term reduced by sum with sum_temperature T != 0 is exp-weighted (RankedListLoss): over the
// pairs with x > 0, the sum of w x and, in the slot kWeight*, of w, w = exp(T x) (differentiated).
enum PairFlag : int64_t {
  kPosLse = 1 << 0,
  kPosSum = 1 << 1,
  kPosHinge = 1 << 2,
  kNegLse = 1 << 3,
  kNegSum = 1 << 4,
  kNegHinge = 1 << 5,
  kLpDistance = 1 << 6,          // v = d_ij instead of S_ij
  kMine = 1 << 7,                // MultiSimilarityMiner rule on u = S (cosine) or -d (lp)
  kPosVsNegLse = 1 << 8,         // NTXent: per kept positive, -log(sigmoid(x - lse_neg_i) + tiny)
  kExcludeAfterMining = 1 << 9,  // the excluded column takes part in the mining thresholds
  kMineOnCosine = 1 << 10,       // lp: the miner's u = -d^2 / 2 (= S - 1 on normalized rows, a cosine miner)
  kHistSquared = 1 << 11,        // the histogram's h is v^2 (else v)
  kHistPmlBins = 1 << 12,        // PML HistogramLoss's binning of h (below)
  kKeepWindows = 1 << 13         // PairMarginMiner: a pair is kept iff lo < v < hi of its set's window
};
constexpr int64_t kPairFlagMask = (int64_t(1) << 14) - 1;

// terms = [pos.scale, pos.shift, pos.weight_offset, pos.weight_slope,
//          neg.scale, neg.shift, neg.weight_offset, neg.weight_slope, miner_epsilon,
//          pos.sum_temperature, neg.sum_temperature, hist_nodes, hist_lo, hist_inv_width,
//          pos_window_lo, pos_window_hi, neg_window_lo, neg_window_hi, ntx_tiny]
// kKeepWindows: a pair of a set is kept only where window_lo < v < window_hi (strict; a NaN v is in
// no window, as PML's comparisons drop it; +-inf for an open side). PML's PairMarginMiner, whose
// thresholds depend on nothing but the pair, so the windows need no extra walk.
// hist_nodes > 0: per row and set the histogram of h = v (kHistSquared: v^2) on the nodes
// hist_lo + k / hist_inv_width, k < hist_nodes, with triangular pulses: u = (h - lo) inv_width adds
// 1 - f to node floor(u) and f = u - floor(u) to the next (out-of-range nodes get nothing; a NaN h
// makes node 0 NaN); in the value rows kNumPairValues + set * hist_nodes + k.
// kHistPmlBins: PML HistogramLoss's operations instead (its node positions rounded to float, as its
// `r * delta` is, whatever h's dtype): with delta = 1 / inv_width and lo, r = floor((float(h) - lo) /
// float(delta)) clamped to [0, nodes - 2], node_k = float(k) * float(delta); node r + 1 gets
// ((h - lo) - node_r) / delta and node r gets (float(node_{r+1} + lo) - h) / delta (the CPU kernels
// multiply by inv_width: a rounding apart); the gradient is
// the slope of r's segment, (g_{r+1} - g_r) / delta, on the node too.
constexpr int kTermFloats = 4;
constexpr int kPairTermsLength = 2 * kTermFloats + 11;
constexpr int kHistTerms = 2 * kTermFloats + 3;     // index of hist_nodes in terms
constexpr int kWindowTerms = 2 * kTermFloats + 6;   // index of pos_window_lo in terms
constexpr int kNtxTinyTerm = 2 * kTermFloats + 10;  // NTXent's tiny; 0: T's smallest normal

// Row outputs of the forward op, one row of the returned [k, N] tensors per slot.
enum PairValueSlot : int { kLsePos = 0, kLseNeg, kSumPos, kSumNeg, kPosVsNeg, kWeightPos, kWeightNeg, kNumPairValues };
enum PairCountSlot : int { kCountPos = 0, kCountNeg, kNonzeroPos, kNonzeroNeg, kNumPairCounts };
// aux: mining thresholds over the unmined sets (u orientation), and d(PosVsNeg)/d(lse_neg)
enum PairAuxSlot : int { kMinPos = 0, kMaxNeg, kPosVsNegDLse, kNumPairAux };

template <typename T>
struct PairTermParams {
  T scale, shift, weight_offset, weight_slope;
  // the hinge as a number, so the element loops need no branch on it: x = max(x, floor) with
  // floor = 0 (hinge) or NaN (none: every comparison with it is false, pair_terms.inl)
  T hinge_floor;
  bool lse, sum;
  // exp-weighted sum (sum and hinge only): w = exp(sum_temperature x); 0: the plain sum
  T sum_temperature;
  bool hinge() const { return hinge_floor == hinge_floor; }
  bool exp_weighted() const { return sum && sum_temperature != T(0); }
};

template <typename T>
struct PairSpec {
  PairTermParams<T> pos, neg;
  bool lp_distance, mine, pos_vs_neg_lse, exclude_after_mining, mine_on_cosine;
  T miner_eps;
  bool windows;  // kKeepWindows
  T pos_window_lo, pos_window_hi, neg_window_lo, neg_window_hi;
  int64_t hist_nodes;  // 0: no histogram
  T hist_lo, hist_inv_width;
  bool hist_squared;
  bool hist_pml_bins;  // kHistPmlBins: hist_delta = 1 / inv_width, and in float hist_delta_f, hist_lo_f
  T hist_delta;
  float hist_delta_f, hist_lo_f;
  // NTXent's tiny inside the log (PML's small_val of its similarity matrix's dtype: fp16's under
  // fp16 inputs or autocast, where the engine accumulates in float)
  T ntx_tiny;
  // positives whose reduction needs a statistic of the whole row first (the mining threshold
  // max_neg, or lse_neg for NTXent) are reduced in a second walk over the positive pairs only
  bool defer_positives() const { return mine || pos_vs_neg_lse; }
};

// Constants are rounded to T once, as torch rounds a Python float in `tensor op float`.
template <typename T>
PairTermParams<T> decode_term(const double* p, bool lse, bool sum, bool hinge, double sum_temperature = 0) {
  const T floor = hinge ? T(0) : std::numeric_limits<T>::quiet_NaN();
  return PairTermParams<T>{T(p[0]), T(p[1]), T(p[2]), T(p[3]), floor, lse, sum, T(sum_temperature)};
}

template <typename T>
PairSpec<T> decode_pair_spec(const double* terms, int64_t flags) {
  PairSpec<T> s;
  s.pos = decode_term<T>(terms, flags & kPosLse, flags & kPosSum, flags & kPosHinge, terms[2 * kTermFloats + 1]);
  s.neg = decode_term<T>(terms + kTermFloats, flags & kNegLse, flags & kNegSum, flags & kNegHinge,
                         terms[2 * kTermFloats + 2]);
  s.lp_distance = flags & kLpDistance;
  s.mine = flags & kMine;
  s.pos_vs_neg_lse = flags & kPosVsNegLse;
  s.exclude_after_mining = flags & kExcludeAfterMining;
  s.mine_on_cosine = flags & kMineOnCosine;
  s.miner_eps = T(terms[2 * kTermFloats]);
  s.windows = flags & kKeepWindows;
  s.pos_window_lo = T(terms[kWindowTerms]);
  s.pos_window_hi = T(terms[kWindowTerms + 1]);
  s.neg_window_lo = T(terms[kWindowTerms + 2]);
  s.neg_window_hi = T(terms[kWindowTerms + 3]);
  s.hist_nodes = static_cast<int64_t>(terms[kHistTerms]);
  s.hist_lo = T(terms[kHistTerms + 1]);
  s.hist_inv_width = T(terms[kHistTerms + 2]);
  s.hist_squared = flags & kHistSquared;
  s.hist_pml_bins = flags & kHistPmlBins;
  const double delta = 1.0 / terms[kHistTerms + 2];
  s.hist_delta = T(delta);
  s.hist_delta_f = static_cast<float>(delta);
  s.hist_lo_f = static_cast<float>(terms[kHistTerms + 1]);
  s.ntx_tiny = terms[kNtxTinyTerm] > 0 ? T(terms[kNtxTinyTerm]) : std::numeric_limits<T>::min();
  return s;
}

// Empty string when (terms, flags) is a valid pair declaration, else what is wrong.
inline std::string check_pair_spec(const double* terms, int64_t n_terms, int64_t flags) {
  if (n_terms != kPairTermsLength)
    return "terms must have " + std::to_string(kPairTermsLength) + " entries, got " + std::to_string(n_terms);
  if (flags & ~kPairFlagMask) return "unknown pair flag bits " + std::to_string(flags & ~kPairFlagMask);
  if ((flags & kExcludeAfterMining) && !(flags & kMine)) return "exclude-after-mining needs mining";
  if ((flags & kMineOnCosine) && !((flags & kMine) && (flags & kLpDistance)))
    return "mine-on-cosine needs mining and the lp distance";
  if (!(terms[kNtxTinyTerm] >= 0 && terms[kNtxTinyTerm] < 1)) return "ntx_tiny must be in [0, 1)";
  if (terms[2 * kTermFloats + 1] != 0 && !((flags & kPosSum) && (flags & kPosHinge)))
    return "pos.sum_temperature needs a hinge term reduced by sum";
  if (terms[2 * kTermFloats + 2] != 0 && !((flags & kNegSum) && (flags & kNegHinge)))
    return "neg.sum_temperature needs a hinge term reduced by sum";
  const double nodes = terms[kHistTerms], lo = terms[kHistTerms + 1], inv_width = terms[kHistTerms + 2];
  if (!(nodes >= 0 && nodes <= (1 << 20) && nodes == static_cast<double>(static_cast<int64_t>(nodes))))
    return "hist_nodes must be an integer in [0, 2^20]";
  // (finite in float too: the float engine rounds them)
  if (nodes > 0 && !(inv_width > 0 && inv_width <= std::numeric_limits<float>::max()))
    return "hist_inv_width must be a number > 0 and at most the largest float";
  if (nodes > 0 && !(lo >= -std::numeric_limits<float>::max() && lo <= std::numeric_limits<float>::max()))
    return "hist_lo must be a finite number (as a float)";
  if (nodes > 0 && (flags & (kMine | kPosVsNegLse))) return "a histogram cannot be combined with mining or NTXent";
  if (nodes == 0 && (flags & kHistSquared)) return "hist-squared needs a histogram";
  if ((flags & kKeepWindows) && (flags & kMine)) return "keep windows cannot be combined with mining";
  if ((flags & kKeepWindows) && nodes > 0) return "keep windows cannot be combined with a histogram";
  for (int k = 0; k < 4; ++k)
    if (terms[kWindowTerms + k] != terms[kWindowTerms + k]) return "the keep windows' bounds must not be NaN";
  if ((flags & kHistPmlBins) && !(nodes >= 2 && !(flags & kHistSquared)))
    return "hist-pml-bins needs a histogram of 2 nodes or more, of v (not squared)";
  return "";
}

// ---- class engine (tiles of whole classes of w) -------------------------------------------------
// s_ick = q_i . w_ck; S_ic = s_ic (K = 1), sum_k softmax_k(s_ick * pool_inv_gamma) s_ick
// (SoftTriple) or, with kPoolMax, max_k s_ick (SubCenterArcFace; torch.max: a NaN wins, and the
// gradient goes to the first center attaining the maximum); row term over the non-target classes
// c != y_i: x = (scale * w(S)) * (S - shift), reduced by LSE, or with kRowSoftplusSum by the sum of
// softplus(x) = log(1 + e^x) (SigLIP's sigmoid loss; the row slot then holds that sum);
// target_sim_i = S_{i,y_i}. Column
// terms (K = 1 only, ProxyAnchor): per class c,
// LSE over the samples i with y_i == c of the pos term, and over y_i != c of the neg term.
// The weights: kWeightsColumns: w is (D, C*K) (else (C*K, D)); kNormalizeWeights: w_ck enters as
// w_ck / max(||w_ck||, 1e-12). These two describe the operand, not the math: an engine that does
// not apply them gets plain normalized rows instead (ops/engines.py) and rejects the bits.
enum ClassFlag : int64_t {
  kRowLse = 1 << 0,
  kColPosLse = 1 << 1,
  kColNegLse = 1 << 2,
  kNormalizeWeights = 1 << 3,
  kWeightsColumns = 1 << 4,
  kPoolMax = 1 << 5,
  kRowSoftplusSum = 1 << 6  // the row term is reduced by sum softplus(x) instead of LSE (needs kRowLse)
};
constexpr int64_t kClassFlagMask = (int64_t(1) << 7) - 1;
constexpr int64_t kWeightOperandFlags = kNormalizeWeights | kWeightsColumns;
constexpr double kNormalizeEps = 1e-12;  // F.normalize's default eps

// terms = [row.scale, row.shift, row.weight_offset, row.weight_slope,
//          col_pos.scale, col_pos.shift, col_pos.weight_offset, col_pos.weight_slope,
//          col_neg.scale, ..., pool_inv_gamma]
constexpr int kClassTermsLength = 3 * kTermFloats + 1;

enum ClassRowSlot : int { kRowLseOther = 0, kRowTargetSim, kNumClassRowValues };
enum ClassColSlot : int { kColLsePos = 0, kColLseNeg, kNumClassColValues };

template <typename T>
struct ClassSpec {
  PairTermParams<T> row, col_pos, col_neg;
  T pool_inv_gamma;  // PML stores 1/gamma and multiplies
  int64_t K;
  bool normalize_weights, weights_columns, pool_max, row_softplus;
};

template <typename T>
ClassSpec<T> decode_class_spec(const double* terms, int64_t flags, int64_t K) {
  ClassSpec<T> s;
  s.row = decode_term<T>(terms, flags & kRowLse, false, false);
  s.col_pos = decode_term<T>(terms + kTermFloats, flags & kColPosLse, false, false);
  s.col_neg = decode_term<T>(terms + 2 * kTermFloats, flags & kColNegLse, false, false);
  s.pool_inv_gamma = T(terms[3 * kTermFloats]);
  s.K = K;
  s.normalize_weights = flags & kNormalizeWeights;
  s.weights_columns = flags & kWeightsColumns;
  s.pool_max = flags & kPoolMax;
  s.row_softplus = flags & kRowSoftplusSum;
  return s;
}

inline std::string check_class_spec(int64_t n_terms, int64_t flags, int64_t K) {
  if (n_terms != kClassTermsLength)
    return "terms must have " + std::to_string(kClassTermsLength) + " entries, got " + std::to_string(n_terms);
  if (flags & ~kClassFlagMask) return "unknown class flag bits " + std::to_string(flags & ~kClassFlagMask);
  if (K < 1) return "centers_per_class must be >= 1, got " + std::to_string(K);
  if ((flags & (kColPosLse | kColNegLse)) && K != 1) return "column reductions need centers_per_class = 1";
  if ((flags & kRowSoftplusSum) && !(flags & kRowLse)) return "the softplus row sum needs the row term";
  return "";
}

}  // namespace fpl
