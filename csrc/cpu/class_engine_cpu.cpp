// Fused CPU class engine: fused_pairloss::class_engine_forward / class_engine_backward
// (SoftTriple, ProxyCircle). Semantics: fused_pairloss/ops/README.md; per-class math:
// csrc/common/pair_math.h (`ClassLoss`, `OnlineLSE`).
//
// Like a fused linear cross-entropy. Rows of q go in blocks of BI, classes in tiles of TC whole
// classes (all K centers of a class in one tile). A tile is computed TRANSPOSED,
//     st (tc*K x bi) = w_tile (tc*K x D) @ q_block^T,
// with ATen's CPU matmul (single-threaded BLAS inside at::parallel_for), so that every per-class
// step (softmax over the K centers, pooled S, logit, log-sum-exp over classes) is a plain loop
// over the bi rows of the block: contiguous, and vectorized by the compiler (vec_math.h).
// No N x C*K tensor exists; forward saves nothing but lse_i and target_sim_i (O(1) per row).
//
// Forward: work items = (row block, chunk of class tiles). Each keeps an online LSE per row over
// its tiles (tile max + sum of exp, merged with OnlineLSE::merge); the chunk partials are merged
// in chunk order. The partition depends on the shapes only, never on the thread count, so the
// forward is bitwise the same for any number of threads.
//
// Backward: recomputes each tile with the same GEMM call as the forward (same shapes, same
// summation order), forms dL/ds_ick in place, and accumulates
//     grad_w_tile += st @ q_block,   grad_q_block += st^T @ w_tile.
// The larger of (N, C*K) is owned: if C*K >= N, work items are chunks of class tiles that own
// their rows of grad_w and add into one private grad_q buffer per chunk (N x D each); else items
// are chunks of row blocks that own grad_q and have private grad_w buffers. The private buffers
// are summed in chunk order. Deterministic (no atomics); the chunk count is
// min(#tiles, max(threads, 4)), so 1 to 4 threads give bitwise identical results.
//
// Compute type A: double for fp64 inputs, float otherwise (fp16/bf16 are converted to fp32 up
// front, O((N + C*K) D)); gradients are returned in the input dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common/pair_math.h"
#include "cpu/vec_math.h"

namespace fpl {
namespace cpu_class {
namespace {
using namespace fpl::cpu_vec;

using at::Tensor;

// ---- tile geometry ----------------------------------------------------------------------------
constexpr int64_t kRowBlock = 256;     // BI: rows of q per block (tile ~512 KiB fp32: in L2)
constexpr int64_t kTileRows = 512;     // target rows of w per class tile (TC = kTileRows / K)
constexpr int64_t kMinFwdItems = 64;   // forward splits the classes when there are few row blocks
constexpr int64_t kMinBwdChunks = 4;   // backward private-buffer chunks (see header comment)
constexpr int64_t kPrivateBudget = int64_t(512) << 20;  // bytes of private grad buffers, at most

struct Geometry {
  int64_t N, D, C, K, BI, TC, n_rb, n_ct;
  int64_t rb_begin(int64_t rb) const { return rb * BI; }
  int64_t rb_size(int64_t rb) const { return std::min(BI, N - rb * BI); }
  int64_t ct_begin(int64_t t) const { return t * TC; }  // first class of tile t
  int64_t ct_size(int64_t t) const { return std::min(TC, C - t * TC); }
};

Geometry make_geometry(int64_t N, int64_t D, int64_t C, int64_t K) {
  Geometry g;
  g.N = N;
  g.D = D;
  g.C = C;
  g.K = K;
  g.BI = kRowBlock;
  g.TC = std::max<int64_t>(1, kTileRows / K);
  g.n_rb = (N + g.BI - 1) / g.BI;
  g.n_ct = (C + g.TC - 1) / g.TC;
  return g;
}

// [begin, end) of chunk p when n items are split into P contiguous chunks
inline int64_t chunk_begin(int64_t n, int64_t P, int64_t p) { return (n * p) / P; }

// ---- per-tile work (vectorizable loops over the rows of the block) ------------------------------
template <typename T>
struct TileArgs {
  const ClassLoss<T>* L;
  int64_t K, tc, bi;
  T* st;               // (tc*K) x bi transposed tile s; backward overwrites it with dL/ds
  const int32_t* loc;  // bi: y_i - c0 if the row's class is in this tile, else -1
  T* e;                // K x bi scratch: softmax weights of the current class
  T* Sb;               // bi scratch: pooled S of the current class (K > 1)
  T* zb;               // tc x bi scratch: logits (forward)
  T* v0;               // bi scratch
  // forward outputs (per row of the block)
  T* target_sim;       // written where loc == c
  T* tmax;             // max over the tile's LSE logits
  T* tsum;             // sum of exp(z - tmax) over the tile
  // backward inputs (per row of the block)
  const T* grad_lse;
  const T* grad_ts;
  const T* lse;
};

#if defined(__GNUC__)
#define FPL_RESTRICT __restrict__
#else
#define FPL_RESTRICT
#endif

// SoftTriple pooling of one class: S_i = sum_k p_ik s_ik, p_i = softmax_k(s_ik * inv_gamma);
// leaves p in e (K x bi). For K == 1 the caller uses S = s (p = 1 exactly).
template <typename T>
FPL_VEC_INLINE void pool_class(T ig, int64_t K, int64_t bi, const T* FPL_RESTRICT s,
                                  T* FPL_RESTRICT e, T* FPL_RESTRICT S, T* FPL_RESTRICT v) {
  for (int64_t i = 0; i < bi; ++i) v[i] = neg_infinity<T>();
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t i = 0; i < bi; ++i) {
      const T t = s[k * bi + i] * ig;  // as PML: sim * (1/gamma), then softmax
      e[k * bi + i] = t;
      v[i] = vmax(v[i], t);
    }
  }
  for (int64_t k = 0; k < K; ++k)
    for (int64_t i = 0; i < bi; ++i) e[k * bi + i] = vexp(e[k * bi + i] - v[i]);
  for (int64_t i = 0; i < bi; ++i) v[i] = e[i];
  for (int64_t k = 1; k < K; ++k)
    for (int64_t i = 0; i < bi; ++i) v[i] += e[k * bi + i];
  for (int64_t i = 0; i < bi; ++i) {
    v[i] = T(1) / v[i];
    S[i] = T(0);
  }
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t i = 0; i < bi; ++i) {
      const T p = e[k * bi + i] * v[i];
      e[k * bi + i] = p;
      S[i] += p * s[k * bi + i];
    }
  }
}

// Logits of one class for the rows of the block (z = -inf outside the LSE set), running tile max,
// and target_sim where the class is the row's own.
template <typename T>
FPL_VEC_INLINE void class_logits(const ClassLoss<T>& L, int64_t bi, int32_t c,
                                    const int32_t* FPL_RESTRICT loc, const T* FPL_RESTRICT S,
                                    T* FPL_RESTRICT z, T* FPL_RESTRICT tmax,
                                    T* FPL_RESTRICT target_sim) {
  const bool target_in_lse = L.target_in_lse();
  for (int64_t i = 0; i < bi; ++i) {
    const bool tg = loc[i] == c;
    const T Si = S[i];
    T zi = L.logit(Si, tg);
    zi = (target_in_lse || !tg) ? zi : neg_infinity<T>();
    z[i] = zi;
    tmax[i] = vmax(tmax[i], zi);
    target_sim[i] = tg ? Si : target_sim[i];
  }
}

// kKind is a.L->kind as a compile-time constant: the loss' branch on its kind then folds away
// and the per-row loops vectorize.
template <typename T, int64_t kKind>
FPL_VEC_INLINE void forward_tile_impl(const TileArgs<T>& a) {
  ClassLoss<T> L = *a.L;
  L.kind = kKind;
  const int64_t K = a.K, bi = a.bi, tc = a.tc;
  T* FPL_RESTRICT st = a.st;
  T* FPL_RESTRICT tmax = a.tmax;
  T* FPL_RESTRICT tsum = a.tsum;
  T* FPL_RESTRICT v0 = a.v0;
  for (int64_t i = 0; i < bi; ++i) tmax[i] = neg_infinity<T>();
  for (int64_t c = 0; c < tc; ++c) {
    const T* S = st + c * K * bi;
    if (K > 1) {
      pool_class(L.inv_gamma, K, bi, st + c * K * bi, a.e, a.Sb, v0);
      S = a.Sb;
    }
    class_logits(L, bi, static_cast<int32_t>(c), a.loc, S, a.zb + c * bi, tmax, a.target_sim);
  }
  for (int64_t i = 0; i < bi; ++i) {
    tsum[i] = T(0);
    v0[i] = tmax[i] == neg_infinity<T>() ? T(0) : tmax[i];  // all excluded: the sum stays 0
  }
  const T* FPL_RESTRICT zb = a.zb;
  for (int64_t c = 0; c < tc; ++c)
    for (int64_t i = 0; i < bi; ++i) tsum[i] += vexp(zb[c * bi + i] - v0[i]);
}

// dL/dS of one class for the rows of the block (README: G_ic).
template <typename T>
FPL_VEC_INLINE void class_grad(const ClassLoss<T>& L, int64_t bi, int32_t c,
                                  const int32_t* FPL_RESTRICT loc, const T* S,
                                  const T* FPL_RESTRICT grad_lse, const T* FPL_RESTRICT grad_ts,
                                  const T* FPL_RESTRICT lse, T* g) {
  const bool target_in_lse = L.target_in_lse();
  for (int64_t i = 0; i < bi; ++i) {
    const bool tg = loc[i] == c;
    const T Si = S[i];  // S may be g itself (K == 1): read before the write
    const T zi = L.logit(Si, tg);
    T gi = grad_lse[i] * vexp(zi - lse[i]) * L.dlogit(Si, tg);
    gi = (target_in_lse || !tg) ? gi : T(0);
    g[i] = gi + (tg ? grad_ts[i] : T(0));
  }
}

template <typename T, int64_t kKind>
FPL_VEC_INLINE void backward_tile_impl(const TileArgs<T>& a) {
  ClassLoss<T> L = *a.L;
  L.kind = kKind;
  const int64_t K = a.K, bi = a.bi, tc = a.tc;
  const T ig = L.inv_gamma;
  for (int64_t c = 0; c < tc; ++c) {
    T* FPL_RESTRICT s = a.st + c * K * bi;
    if (K == 1) {  // dL/ds = dL/dS, written over s
      class_grad(L, bi, static_cast<int32_t>(c), a.loc, s, a.grad_lse, a.grad_ts, a.lse, s);
      continue;
    }
    T* FPL_RESTRICT S = a.Sb;
    T* FPL_RESTRICT g = a.v0;
    const T* FPL_RESTRICT e = a.e;
    pool_class(ig, K, bi, s, a.e, S, g);
    class_grad(L, bi, static_cast<int32_t>(c), a.loc, S, a.grad_lse, a.grad_ts, a.lse, g);
    for (int64_t k = 0; k < K; ++k)  // dS/ds_k = p_k (1 + (s_k - S) / gamma)
      for (int64_t i = 0; i < bi; ++i)
        s[k * bi + i] = (g[i] * e[k * bi + i]) * (T(1) + (s[k * bi + i] - S[i]) * ig);
  }
}

// ---- one copy of the tile functions per instruction set, chosen at run time --------------------
enum class Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

template <typename T, int64_t kKind>
void forward_tile_base(const TileArgs<T>& a) { forward_tile_impl<T, kKind>(a); }
template <typename T, int64_t kKind>
void backward_tile_base(const TileArgs<T>& a) { backward_tile_impl<T, kKind>(a); }

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FPL_HAVE_X86_VARIANTS 1
#define FPL_TARGET_AVX2 __attribute__((target("avx2,fma,f16c,bmi,bmi2,popcnt")))
#define FPL_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt")))
template <typename T, int64_t kKind>
FPL_TARGET_AVX2 void forward_tile_avx2(const TileArgs<T>& a) { forward_tile_impl<T, kKind>(a); }
template <typename T, int64_t kKind>
FPL_TARGET_AVX2 void backward_tile_avx2(const TileArgs<T>& a) { backward_tile_impl<T, kKind>(a); }
template <typename T, int64_t kKind>
FPL_TARGET_AVX512 void forward_tile_avx512(const TileArgs<T>& a) { forward_tile_impl<T, kKind>(a); }
template <typename T, int64_t kKind>
FPL_TARGET_AVX512 void backward_tile_avx512(const TileArgs<T>& a) { backward_tile_impl<T, kKind>(a); }
#endif

// FPL_CPU_ISA=base|avx2|avx512 caps the choice (tests compare the variants).
Isa detect_isa() {
  Isa best = Isa::kBase;
#ifdef FPL_HAVE_X86_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    best = Isa::kAvx512;
#endif
  if (const char* env = std::getenv("FPL_CPU_ISA")) {
    const std::string v(env);
    Isa cap = v == "base" ? Isa::kBase : v == "avx2" ? Isa::kAvx2 : Isa::kAvx512;
    if (static_cast<int>(cap) < static_cast<int>(best)) best = cap;
  }
  return best;
}

Isa current_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

template <typename T>
using TileFn = void (*)(const TileArgs<T>&);

template <typename T, int64_t kKind>
TileFn<T> tile_fn_for_kind(bool backward) {
#ifdef FPL_HAVE_X86_VARIANTS
  switch (current_isa()) {
    case Isa::kAvx512:
      return backward ? &backward_tile_avx512<T, kKind> : &forward_tile_avx512<T, kKind>;
    case Isa::kAvx2:
      return backward ? &backward_tile_avx2<T, kKind> : &forward_tile_avx2<T, kKind>;
    default: break;
  }
#endif
  return backward ? &backward_tile_base<T, kKind> : &forward_tile_base<T, kKind>;
}

template <typename T>
TileFn<T> tile_fn(int64_t kind, bool backward) {
  return kind == kSoftTriple ? tile_fn_for_kind<T, kSoftTriple>(backward)
                             : tile_fn_for_kind<T, kProxyCircle>(backward);
}

// ---- GEMM on raw blocks (ATen CPU matmul, single-threaded inside the parallel region) ----------
template <typename T>
Tensor mat(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// st (tck x bi) = w_tile (tck x D) @ q_block^T. The forward and the backward make exactly this
// call for a given (row block, class tile), so the recomputed tile is bitwise the forward's.
template <typename T>
void tile_similarities(const Geometry& g, const T* q, const T* w, int64_t rb, int64_t t, T* st) {
  const int64_t i0 = g.rb_begin(rb), bi = g.rb_size(rb);
  const int64_t r0 = g.ct_begin(t) * g.K, tck = g.ct_size(t) * g.K;
  Tensor out = mat(st, tck, bi, bi);
  at::mm_out(out, mat(w + r0 * g.D, tck, g.D, g.D), mat(q + i0 * g.D, bi, g.D, g.D).t());
}

// loc[i] = y_i - c0 if y_i is a class of tile t, else -1
inline void tile_locations(const Geometry& g, const int64_t* labels, int64_t rb, int64_t t,
                           int32_t* loc) {
  const int64_t i0 = g.rb_begin(rb), bi = g.rb_size(rb);
  const int64_t c0 = g.ct_begin(t), tc = g.ct_size(t);
  for (int64_t i = 0; i < bi; ++i) {
    const int64_t y = labels[i0 + i] - c0;
    loc[i] = (y >= 0 && y < tc) ? static_cast<int32_t>(y) : -1;
  }
}

template <typename T>
struct Scratch {
  std::vector<T> st, e, Sb, zb, v0, tmax, tsum, ts;
  std::vector<int32_t> loc;
  explicit Scratch(const Geometry& g)
      : st(g.TC * g.K * g.BI), e(g.K * g.BI), Sb(g.BI), zb(g.TC * g.BI), v0(g.BI), tmax(g.BI),
        tsum(g.BI), ts(g.BI), loc(g.BI) {}
  TileArgs<T> args(const ClassLoss<T>& L, const Geometry& g, int64_t rb, int64_t t) {
    TileArgs<T> a{};
    a.L = &L;
    a.K = g.K;
    a.tc = g.ct_size(t);
    a.bi = g.rb_size(rb);
    a.st = st.data();
    a.loc = loc.data();
    a.e = e.data();
    a.Sb = Sb.data();
    a.zb = zb.data();
    a.v0 = v0.data();
    a.tmax = tmax.data();
    a.tsum = tsum.data();
    return a;
  }
};

void check_inputs(const Tensor& q, const Tensor& w, const Tensor& labels, int64_t K, int64_t kind) {
  TORCH_CHECK(q.dim() == 2 && w.dim() == 2, "class_engine: q (N, D) and w (C*K, D) must be 2-D, got ",
              q.sizes(), " and ", w.sizes());
  TORCH_CHECK(q.device().is_cpu() && w.device().is_cpu() && labels.device().is_cpu(),
              "class_engine (CPU kernel): tensors must be on the CPU");
  TORCH_CHECK(q.scalar_type() == w.scalar_type(), "class_engine: q and w must have the same dtype, got ",
              q.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "class_engine: q must be floating point, got ",
              q.scalar_type());
  TORCH_CHECK(q.size(1) == w.size(1), "class_engine: q and w must have the same D, got ", q.size(1),
              " and ", w.size(1));
  TORCH_CHECK(K >= 1, "class_engine: centers_per_class must be >= 1, got ", K);
  TORCH_CHECK(w.size(0) % K == 0, "class_engine: w has ", w.size(0),
              " rows, not a multiple of centers_per_class=", K);
  TORCH_CHECK(kind == kSoftTriple || kind == kProxyCircle, "class_engine: unknown kind ", kind);
  TORCH_CHECK(kind != kProxyCircle || K == 1, "class_engine: ProxyCircle needs centers_per_class=1");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == q.size(0) && labels.scalar_type() == at::kLong,
              "class_engine: labels must be int64 of shape (N,) = (", q.size(0), ",)");
  const int64_t C = w.size(0) / K;
  const Tensor lab = labels.contiguous();
  const int64_t* y = lab.data_ptr<int64_t>();
  for (int64_t i = 0; i < lab.numel(); ++i)
    TORCH_CHECK(y[i] >= 0 && y[i] < C, "class_engine: label ", y[i], " of row ", i,
                " is out of range for ", C, " classes");
}

at::ScalarType compute_type(const Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// ---- forward ------------------------------------------------------------------------------------
template <typename T>
void forward_kernel(const Tensor& qA, const Tensor& wA, const Tensor& labels, int64_t K,
                    const ClassLoss<T>& L, Tensor& lse, Tensor& target_sim) {
  const Geometry g = make_geometry(qA.size(0), qA.size(1), wA.size(0) / K, K);
  const T* q = qA.data_ptr<T>();
  const T* w = wA.data_ptr<T>();
  const int64_t* y = labels.data_ptr<int64_t>();
  T* ts = target_sim.data_ptr<T>();
  T* out = lse.data_ptr<T>();
  const int64_t N = g.N;
  if (N == 0) return;
  // class chunks: enough work items for the threads even when there are few row blocks
  const int64_t n_cc = std::clamp<int64_t>((kMinFwdItems + g.n_rb - 1) / g.n_rb, 1, g.n_ct);
  std::vector<T> part_max(n_cc * N), part_sum(n_cc * N);
  const TileFn<T> run_tile = tile_fn<T>(L.kind, /*backward=*/false);

  at::parallel_for(0, g.n_rb * n_cc, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView guard;  // plain ATen calls on private buffers
    Scratch<T> sc(g);
    std::vector<OnlineLSE<T>> row(g.BI);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t rb = item / n_cc, cc = item % n_cc;
      const int64_t i0 = g.rb_begin(rb), bi = g.rb_size(rb);
      for (int64_t i = 0; i < bi; ++i) row[i] = OnlineLSE<T>();
      const int64_t t_end = chunk_begin(g.n_ct, n_cc, cc + 1);
      for (int64_t t = chunk_begin(g.n_ct, n_cc, cc); t < t_end; ++t) {
        tile_similarities(g, q, w, rb, t, sc.st.data());
        tile_locations(g, y, rb, t, sc.loc.data());
        TileArgs<T> a = sc.args(L, g, rb, t);
        a.target_sim = sc.ts.data();  // private: items of one row block may run concurrently
        run_tile(a);
        for (int64_t i = 0; i < bi; ++i) row[i].merge(sc.tmax[i], sc.tsum[i]);
      }
      // the one item whose classes hold y_i publishes target_sim_i
      const int64_t c_lo = g.ct_begin(chunk_begin(g.n_ct, n_cc, cc));
      const int64_t c_hi = std::min(g.C, g.ct_begin(t_end));
      for (int64_t i = 0; i < bi; ++i) {
        part_max[cc * N + i0 + i] = row[i].max;
        part_sum[cc * N + i0 + i] = row[i].sum;
        if (y[i0 + i] >= c_lo && y[i0 + i] < c_hi) ts[i0 + i] = sc.ts[i];
      }
    }
  });
  at::parallel_for(0, N, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      OnlineLSE<T> acc;
      for (int64_t cc = 0; cc < n_cc; ++cc) acc.merge(part_max[cc * N + i], part_sum[cc * N + i]);
      out[i] = acc.value();
    }
  });
}

std::tuple<Tensor, Tensor> class_engine_forward_cpu(const Tensor& q, const Tensor& w,
                                                    const Tensor& labels, int64_t K, int64_t kind,
                                                    double p0, double p1, double p2) {
  check_inputs(q, w, labels, K, kind);
  const at::ScalarType A = compute_type(q);
  const Tensor qA = q.to(A).contiguous(), wA = w.to(A).contiguous(), lab = labels.contiguous();
  Tensor lse = at::empty({q.size(0)}, q.options().dtype(A));
  Tensor target_sim = at::empty({q.size(0)}, q.options().dtype(A));
  if (A == at::kDouble) {
    forward_kernel<double>(qA, wA, lab, K, make_class_loss<double>(kind, K, p0, p1, p2), lse,
                           target_sim);
  } else {
    forward_kernel<float>(qA, wA, lab, K, make_class_loss<float>(kind, K, p0, p1, p2), lse,
                          target_sim);
  }
  return {lse, target_sim};
}

// ---- backward -----------------------------------------------------------------------------------
template <typename T>
void backward_kernel(const Tensor& gl, const Tensor& gts, const Tensor& qA, const Tensor& wA,
                     const Tensor& labels, const Tensor& lseA, int64_t K, const ClassLoss<T>& L,
                     Tensor& grad_q, Tensor& grad_w) {
  const Geometry g = make_geometry(qA.size(0), qA.size(1), wA.size(0) / K, K);
  const int64_t N = g.N, D = g.D, CK = g.C * g.K;
  if (N == 0 || CK == 0) return;
  const T* q = qA.data_ptr<T>();
  const T* w = wA.data_ptr<T>();
  const int64_t* y = labels.data_ptr<int64_t>();
  const T* grad_lse = gl.data_ptr<T>();
  const T* grad_ts = gts.data_ptr<T>();
  const T* lse = lseA.data_ptr<T>();
  const TileFn<T> run_tile = tile_fn<T>(L.kind, /*backward=*/true);

  // own the larger side, private buffers for the smaller one
  const bool own_classes = CK >= N;
  const int64_t n_owned = own_classes ? g.n_ct : g.n_rb;
  const int64_t private_rows = own_classes ? N : CK;
  const int64_t bytes_per_buffer = std::max<int64_t>(1, private_rows * D * int64_t(sizeof(T)));
  int64_t P = std::min<int64_t>(n_owned, std::max<int64_t>(at::get_num_threads(), kMinBwdChunks));
  P = std::max<int64_t>(1, std::min<int64_t>(P, kPrivateBudget / bytes_per_buffer));
  Tensor& shared_out = own_classes ? grad_q : grad_w;  // the side that gets private buffers
  std::vector<Tensor> priv(P);
  priv[0] = shared_out;
  for (int64_t p = 1; p < P; ++p) priv[p] = at::zeros_like(shared_out);
  T* gq = grad_q.data_ptr<T>();
  T* gw = grad_w.data_ptr<T>();

  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Scratch<T> sc(g);
    for (int64_t p = begin; p < end; ++p) {
      T* gq_dst = own_classes ? priv[p].data_ptr<T>() : gq;
      T* gw_dst = own_classes ? gw : priv[p].data_ptr<T>();
      auto do_tile = [&](int64_t rb, int64_t t) {
        const int64_t i0 = g.rb_begin(rb), bi = g.rb_size(rb);
        const int64_t r0 = g.ct_begin(t) * g.K, tck = g.ct_size(t) * g.K;
        tile_similarities(g, q, w, rb, t, sc.st.data());
        tile_locations(g, y, rb, t, sc.loc.data());
        TileArgs<T> a = sc.args(L, g, rb, t);
        a.grad_lse = grad_lse + i0;
        a.grad_ts = grad_ts + i0;
        a.lse = lse + i0;
        run_tile(a);  // st := dL/ds (tck x bi)
        const Tensor G = mat(sc.st.data(), tck, bi, bi);
        mat(gw_dst + r0 * D, tck, D, D).addmm_(G, mat(q + i0 * D, bi, D, D));
        mat(gq_dst + i0 * D, bi, D, D).addmm_(G.t(), mat(w + r0 * D, tck, D, D));
      };
      const int64_t o_begin = chunk_begin(n_owned, P, p), o_end = chunk_begin(n_owned, P, p + 1);
      if (own_classes) {
        for (int64_t t = o_begin; t < o_end; ++t)
          for (int64_t rb = 0; rb < g.n_rb; ++rb) do_tile(rb, t);
      } else {
        for (int64_t rb = o_begin; rb < o_end; ++rb)
          for (int64_t t = 0; t < g.n_ct; ++t) do_tile(rb, t);
      }
    }
  });
  for (int64_t p = 1; p < P; ++p) shared_out.add_(priv[p]);  // fixed order: deterministic
}

std::tuple<Tensor, Tensor> class_engine_backward_cpu(const Tensor& grad_lse,
                                                     const Tensor& grad_target_sim,
                                                     const Tensor& q, const Tensor& w,
                                                     const Tensor& labels, const Tensor& lse,
                                                     int64_t K, int64_t kind, double p0, double p1,
                                                     double p2) {
  check_inputs(q, w, labels, K, kind);
  const int64_t N = q.size(0);
  TORCH_CHECK(grad_lse.numel() == N && grad_target_sim.numel() == N && lse.numel() == N,
              "class_engine_backward: grad_lse, grad_target_sim and lse must have N=", N,
              " elements");
  const at::ScalarType A = compute_type(q);
  const Tensor qA = q.to(A).contiguous(), wA = w.to(A).contiguous(), lab = labels.contiguous();
  const Tensor gl = grad_lse.to(A).contiguous(), gts = grad_target_sim.to(A).contiguous();
  const Tensor lseA = lse.to(A).contiguous();
  Tensor grad_q = at::zeros(qA.sizes(), qA.options());
  Tensor grad_w = at::zeros(wA.sizes(), wA.options());
  if (A == at::kDouble) {
    backward_kernel<double>(gl, gts, qA, wA, lab, lseA, K,
                            make_class_loss<double>(kind, K, p0, p1, p2), grad_q, grad_w);
  } else {
    backward_kernel<float>(gl, gts, qA, wA, lab, lseA, K,
                           make_class_loss<float>(kind, K, p0, p1, p2), grad_q, grad_w);
  }
  return {grad_q.to(q.scalar_type()), grad_w.to(w.scalar_type())};
}

}  // namespace
}  // namespace cpu_class
}  // namespace fpl

TORCH_LIBRARY_IMPL(fused_pairloss, CPU, m) {
  m.impl("class_engine_forward", &fpl::cpu_class::class_engine_forward_cpu);
  m.impl("class_engine_backward", &fpl::cpu_class::class_engine_backward_cpu);
}
