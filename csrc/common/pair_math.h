// Per-pair and per-class math shared by every C++ backend (CPU and CUDA).
//
// A loss is a "plug-in" of the tiled engines: this header holds everything about it that runs
// per element of a tile (the logit of a positive / negative pair, its derivative w.r.t. the
// similarity, the mining rule, the online log-sum-exp update). The engines (csrc/cpu, csrc/cuda)
// only walk tiles and call these functions; the row-level combination of the log-sum-exps into
// the loss (softplus, means, PML's quirks) happens in Python (fused_pairloss/ops/<loss>.py).
//
// Everything is `FPL_HD` so the CPU tests exercise exactly the code the CUDA kernels run.
// No torch headers here: this file is included from .cu files that must compile fast.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define FPL_HD __host__ __device__ __forceinline__
#else
#define FPL_HD inline
#endif

namespace fpl {

// ---- loss ids (must match fused_pairloss/ops/_kinds.py) -------------------------------------
enum PairLossKind : int64_t { kMultiSimilarity = 0, kCircle = 1 };
enum ClassLossKind : int64_t { kSoftTriple = 0, kProxyCircle = 1 };

template <typename T>
FPL_HD T pos_infinity() { return std::numeric_limits<T>::infinity(); }
template <typename T>
FPL_HD T neg_infinity() { return -std::numeric_limits<T>::infinity(); }

// exp/log overloads that are the C library's float and double functions on host and device.
FPL_HD float fpl_exp(float x) { return expf(x); }
FPL_HD double fpl_exp(double x) { return ::exp(x); }
FPL_HD float fpl_log(float x) { return logf(x); }
FPL_HD double fpl_log(double x) { return ::log(x); }

// torch.relu(NaN) is NaN; keep NaN flowing (NaN in, NaN out).
template <typename T>
FPL_HD T relu_nan(T x) { return (x != x) ? x : (x > T(0) ? x : T(0)); }

// ---- pair logits: "general pair weighting" form ----------------------------------------------
// logit(S) = (scale * weight(S)) * (S - shift), weight(S) = relu(w_a + w_b * S) or 1,
// d logit / dS = scale * weight(S)   (the weight is detached, as in Circle's alpha; MS has none).
//   Multi-Similarity (SPEC §2):  pos: scale=-alpha, shift=base, no weight   == alpha*(base - S)
//                                neg: scale= beta,  shift=base, no weight   == beta*(S - base)
//   Circle (SPEC §2):            pos: scale=-gamma, shift=1-m, weight=relu((1+m) - S)
//                                neg: scale= gamma, shift=m,   weight=relu(S + m)
// Constants are rounded to T once, exactly as torch rounds a Python float in `tensor op float`.
template <typename T>
struct PairLogit {
  T scale, shift, w_a, w_b;
  bool weighted;

  FPL_HD T weight(T s) const { return weighted ? relu_nan<T>(w_a + w_b * s) : T(1); }
  FPL_HD T logit(T s) const { return (scale * weight(s)) * (s - shift); }
  FPL_HD T dlogit(T s) const { return scale * weight(s); }
};

template <typename T>
struct PairLoss {
  PairLogit<T> pos, neg;
  bool mine;      // MultiSimilarityMiner rule (SPEC §2)
  T miner_eps;
};

// p0, p1, p2 are the op's float arguments: MS (alpha, beta, base); Circle (m, gamma, unused).
template <typename T>
inline PairLoss<T> make_pair_loss(int64_t kind, double p0, double p1, double p2, bool mine,
                                  double miner_eps) {
  PairLoss<T> L;
  if (kind == kMultiSimilarity) {
    const double alpha = p0, beta = p1, base = p2;
    L.pos = PairLogit<T>{T(-alpha), T(base), T(0), T(0), false};
    L.neg = PairLogit<T>{T(beta), T(base), T(0), T(0), false};
  } else {  // kCircle
    const double m = p0, gamma = p1;
    // PML: -gamma * relu(op - S) * (S - delta_p), op = 1+m, delta_p = 1-m
    L.pos = PairLogit<T>{T(-gamma), T(1.0 - m), T(1.0 + m), T(-1), true};
    // PML:  gamma * relu(S - on) * (S - delta_n), on = -m, delta_n = m
    L.neg = PairLogit<T>{T(gamma), T(m), T(m), T(1), true};
  }
  L.mine = mine;
  L.miner_eps = T(miner_eps);
  return L;
}

// ---- which set a pair belongs to ------------------------------------------------------------
// P_i: same label and not the excluded self pair; N_i: different label (SPEC §2).
FPL_HD bool is_positive_pair(int64_t li, int64_t lj, int64_t i, int64_t j, bool exclude_diag) {
  return li == lj && !(exclude_diag && i == j);
}
FPL_HD bool is_negative_pair(int64_t li, int64_t lj) { return li != lj; }

// MultiSimilarityMiner (PML, cosine): keep a positive if S - eps < max_neg_i,
// a negative if S + eps > min_pos_i; min/max over the unmined sets of row i.
template <typename T>
FPL_HD bool keep_positive(const PairLoss<T>& L, T s, T max_neg) {
  return !L.mine || (s - L.miner_eps < max_neg);
}
template <typename T>
FPL_HD bool keep_negative(const PairLoss<T>& L, T s, T min_pos) {
  return !L.mine || (s + L.miner_eps > min_pos);
}

// ---- online log-sum-exp ---------------------------------------------------------------------
// Running (max, sum of exp(x - max)); empty set -> lse = -inf. NaN inputs propagate.
template <typename T>
struct OnlineLSE {
  T max;
  T sum;
  FPL_HD OnlineLSE() : max(neg_infinity<T>()), sum(T(0)) {}

  FPL_HD void add(T x) {
    if (x > max) {
      sum = sum * exp_(max - x) + T(1);
      max = x;
    } else if (x != x) {
      sum = x;  // NaN
    } else if (x != neg_infinity<T>()) {
      sum += exp_(x - max);
    }
  }
  // merge a partial (max, sum) computed elsewhere (another tile / thread / lane)
  FPL_HD void merge(T omax, T osum) {
    if (osum != osum || sum != sum) { sum = (osum != osum) ? osum : sum; return; }
    if (osum == T(0)) return;
    if (sum == T(0)) { max = omax; sum = osum; return; }
    if (omax > max) {
      sum = sum * exp_(max - omax) + osum;
      max = omax;
    } else {
      sum += osum * exp_(omax - max);
    }
  }
  FPL_HD T value() const {
    if (sum != sum) return sum;
    return sum > T(0) ? max + log_(sum) : neg_infinity<T>();
  }

  static FPL_HD T exp_(T x) { return fpl_exp(x); }
  static FPL_HD T log_(T x) { return fpl_log(x); }
};

// Weight of one element in d LSE / d x: exp(x - lse).
template <typename T>
FPL_HD T lse_softmax(T x, T lse) { return fpl_exp(x - lse); }

// ---- class engine (SoftTriple, class-level Circle) ------------------------------------------
// s_ck = q . w_ck for the K centers of class c.
// SoftTriple (SPEC §2): S_c = sum_k softmax_k(s_ck / gamma) s_ck; z_c = la (S_c - margin [c == y]);
//   lse over all classes; dS_c/ds_ck = p_k (1 + (s_ck - S_c) / gamma).
// ProxyCircle (SPEC §2, K = 1): S_c = s_c; z_c = gamma relu(sg(S_c) + m)(S_c - m) for c != y,
//   lse over c != y only.
template <typename T>
struct ClassLoss {
  int64_t kind;
  int64_t K;
  T la, inv_gamma, margin;   // SoftTriple
  T scale, shift, w_a;       // ProxyCircle negatives: (scale*relu(w_a + S))*(S - shift)

  FPL_HD bool target_in_lse() const { return kind == kSoftTriple; }

  // z for class c given its pooled similarity S_c; is_target: c == y_i
  FPL_HD T logit(T S, bool is_target) const {
    if (kind == kSoftTriple) return la * (S - (is_target ? margin : T(0)));
    return (scale * relu_nan<T>(w_a + S)) * (S - shift);
  }
  FPL_HD T dlogit(T S, bool /*is_target*/) const {
    if (kind == kSoftTriple) return la;
    return scale * relu_nan<T>(w_a + S);
  }
};

// p0, p1, p2: SoftTriple (la, gamma, margin); ProxyCircle (m, gamma, unused).
template <typename T>
inline ClassLoss<T> make_class_loss(int64_t kind, int64_t K, double p0, double p1, double p2) {
  ClassLoss<T> L{};
  L.kind = kind;
  L.K = K;
  if (kind == kSoftTriple) {
    L.la = T(p0);
    L.inv_gamma = T(1.0 / p1);  // PML stores self.gamma = 1/gamma and multiplies
    L.margin = T(p2);
  } else {
    const double m = p0, gamma = p1;
    L.scale = T(gamma);
    L.shift = T(m);
    L.w_a = T(m);
  }
  return L;
}

}  // namespace fpl
