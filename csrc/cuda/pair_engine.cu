// CUDA pair engine (Multi-Similarity, Circle): fused, FlashAttention-style (SPEC §3).
//
// Forward: a CTA owns kBM rows of q and walks column tiles of r; two threads per row keep the
// row's statistics in registers (online LSE of the kept positives / negatives, counts, and for
// mining a first pass with min_pos / max_neg), merged with a warp shuffle at the end.
// Backward: the same tiles are recomputed (same tile_dot call, so bitwise the same S), G = dL/dS
// is formed from the saved row statistics and accumulated into the rows this CTA owns:
//   row pass (pass 0): grad_q[I] += H(I, X) . V[X], H = G (ref mode, V = r) or G + G^T (self mode,
//     V = q: the other row's statistics give G_xi from the same S tile);
//   column pass (pass 1, ref mode only): grad_r[J] += G(X, J)^T . q[X].
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
  const int64_t* lr;  // == lq in self mode
  int64_t N, M, D;
  bool self_mode, vec16, exclude_diag;
  fpl::PairLoss<A> L;
  // forward outputs / backward inputs (length N)
  A* lse_pos;
  A* lse_neg;
  A* min_pos;
  A* max_neg;
  int32_t* cnt_pos;
  int32_t* cnt_neg;
  // backward
  const A* g_pos;
  const A* g_neg;
  A* out;
};

// S(owner o, other x) into Ss[o][x]. pass 0: owner = rows of q, other = rows of r;
// pass 1: owner = rows of r, other = rows of q (S(x, o) = q_x . r_o, stored transposed).
template <typename T>
__device__ __forceinline__ void pair_tile(const PairArgs<T>& p, int pass, int64_t o0, int no,
                                          int64_t x0, int nx, typename AccOf<T>::type* Ss,
                                          unsigned char* stage) {
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
}

template <typename A>
__device__ __forceinline__ A pair_grad(const fpl::PairLoss<A>& L, A s, bool pos, bool neg, A g_pos,
                                       A g_neg, A lse_pos, A lse_neg, A min_pos, A max_neg) {
  A g = A(0);
  if (pos && fpl::keep_positive(L, s, max_neg))
    g += g_pos * fpl::lse_softmax(L.pos.logit(s), lse_pos) * L.pos.dlogit(s);
  if (neg && fpl::keep_negative(L, s, min_pos))
    g += g_neg * fpl::lse_softmax(L.neg.logit(s), lse_neg) * L.neg.dlogit(s);
  return g;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) pair_forward_kernel(PairArgs<T> p) {
  using A = typename AccOf<T>::type;
  extern __shared__ __align__(128) unsigned char smem[];
  A* Ss = reinterpret_cast<A*>(smem);
  unsigned char* stage = smem + Smem<T>::kSsBytes;
  int64_t* lx_s = reinterpret_cast<int64_t*>(smem + Smem<T>::kExtraOffset);

  const int t = threadIdx.x, ol = t >> 1, h = t & 1;
  const int64_t o0 = int64_t(blockIdx.x) * kBM;
  const int no = int(p.N - o0 < kBM ? p.N - o0 : kBM);
  const bool valid = ol < no;
  const int64_t o = o0 + ol;
  const int64_t lo = valid ? p.lq[o] : 0;
  const fpl::PairLoss<A>& L = p.L;

  A min_pos = fpl::pos_infinity<A>(), max_neg = fpl::neg_infinity<A>();
  if (L.mine) {  // first pass: thresholds over the unmined sets
    for (int64_t x0 = 0; x0 < p.M; x0 += kBN) {
      const int nx = int(p.M - x0 < kBN ? p.M - x0 : kBN);
      __syncthreads();
      if (t < nx) lx_s[t] = p.lr[x0 + t];
      pair_tile<T>(p, 0, o0, no, x0, nx, Ss, stage);
      if (valid) {
        for (int x = h; x < nx; x += 2) {
          const A s = Ss[ol * kLDS + x];
          const int64_t lx = lx_s[x];
          if (fpl::is_positive_pair(lo, lx, o, x0 + x, p.exclude_diag)) min_pos = nan_min(min_pos, s);
          else if (fpl::is_negative_pair(lo, lx)) max_neg = nan_max(max_neg, s);
        }
      }
    }
    min_pos = nan_min(min_pos, __shfl_xor_sync(0xffffffffu, min_pos, 1));
    max_neg = nan_max(max_neg, __shfl_xor_sync(0xffffffffu, max_neg, 1));
  }

  fpl::OnlineLSE<A> lp, ln;
  int cp = 0, cn = 0;
  for (int64_t x0 = 0; x0 < p.M; x0 += kBN) {
    const int nx = int(p.M - x0 < kBN ? p.M - x0 : kBN);
    __syncthreads();
    if (t < nx) lx_s[t] = p.lr[x0 + t];
    pair_tile<T>(p, 0, o0, no, x0, nx, Ss, stage);
    if (valid) {
      for (int x = h; x < nx; x += 2) {
        const A s = Ss[ol * kLDS + x];
        const int64_t lx = lx_s[x];
        if (fpl::is_positive_pair(lo, lx, o, x0 + x, p.exclude_diag)) {
          if (fpl::keep_positive(L, s, max_neg)) { lp.add(L.pos.logit(s)); ++cp; }
        } else if (fpl::is_negative_pair(lo, lx)) {
          if (fpl::keep_negative(L, s, min_pos)) { ln.add(L.neg.logit(s)); ++cn; }
        }
      }
    }
  }
  merge_pair_lanes(lp);
  merge_pair_lanes(ln);
  cp += __shfl_xor_sync(0xffffffffu, cp, 1);
  cn += __shfl_xor_sync(0xffffffffu, cn, 1);
  if (valid && h == 0) {
    p.lse_pos[o] = lp.value();
    p.lse_neg[o] = ln.value();
    p.cnt_pos[o] = cp;
    p.cnt_neg[o] = cn;
    p.min_pos[o] = min_pos;
    p.max_neg[o] = max_neg;
  }
}

// Statistics of the "other" rows staged per tile (backward).
constexpr int kNumStats = 6;  // g_pos, g_neg, lse_pos, lse_neg, min_pos, max_neg

template <typename T>
__global__ void __launch_bounds__(kThreads) pair_backward_kernel(PairArgs<T> p, int pass) {
  using A = typename AccOf<T>::type;
  extern __shared__ __align__(128) unsigned char smem[];
  A* Ss = reinterpret_cast<A*>(smem);
  unsigned char* stage = smem + Smem<T>::kSsBytes;
  int64_t* lx_s = reinterpret_cast<int64_t*>(smem + Smem<T>::kExtraOffset);
  A* xst = reinterpret_cast<A*>(lx_s + kBN);  // [kNumStats][kBN]

  const int t = threadIdx.x, ol = t >> 1, h = t & 1;
  const int64_t n_owner = pass == 0 ? p.N : p.M, n_other = pass == 0 ? p.M : p.N;
  const int64_t* l_owner = pass == 0 ? p.lq : p.lr;
  const int64_t* l_other = pass == 0 ? p.lr : p.lq;
  const T* V = pass == 0 ? p.r : p.q;
  const bool use_owner = pass == 0;                // G_ox, row o's statistics
  const bool use_other = p.self_mode || pass == 1;  // G_xo, row x's statistics
  const int64_t o0 = int64_t(blockIdx.x) * kBM;
  const int no = int(n_owner - o0 < kBM ? n_owner - o0 : kBM);
  const bool valid = ol < no;
  const int64_t o = o0 + ol;
  const int64_t lo = valid ? l_owner[o] : 0;
  const fpl::PairLoss<A>& L = p.L;

  A og_pos = A(0), og_neg = A(0), olse_pos = A(0), olse_neg = A(0), omin_pos = A(0), omax_neg = A(0);
  if (use_owner && valid) {
    og_pos = p.g_pos[o];
    og_neg = p.g_neg[o];
    olse_pos = p.lse_pos[o];
    olse_neg = p.lse_neg[o];
    omin_pos = p.min_pos[o];
    omax_neg = p.max_neg[o];
  }

  A* out = p.out + o0 * p.D;
  for (int64_t x0 = 0; x0 < n_other; x0 += kBN) {
    const int nx = int(n_other - x0 < kBN ? n_other - x0 : kBN);
    __syncthreads();  // the previous tile's readers of lx_s / xst / Ss are done
    if (t < nx) {
      const int64_t x = x0 + t;
      lx_s[t] = l_other[x];
      if (use_other) {
        xst[0 * kBN + t] = p.g_pos[x];
        xst[1 * kBN + t] = p.g_neg[x];
        xst[2 * kBN + t] = p.lse_pos[x];
        xst[3 * kBN + t] = p.lse_neg[x];
        xst[4 * kBN + t] = p.min_pos[x];
        xst[5 * kBN + t] = p.max_neg[x];
      }
    }
    pair_tile<T>(p, pass, o0, no, x0, nx, Ss, stage);
    if (valid) {
      for (int x = h; x < nx; x += 2) {
        const A s = Ss[ol * kLDS + x];
        const int64_t lx = lx_s[x], gx = x0 + x;
        const bool neg = fpl::is_negative_pair(lo, lx);
        A hv = A(0);
        if (use_owner) {
          const bool pos = fpl::is_positive_pair(lo, lx, o, gx, p.exclude_diag);
          hv += pair_grad(L, s, pos, neg, og_pos, og_neg, olse_pos, olse_neg, omin_pos, omax_neg);
        }
        if (use_other) {
          const bool pos = fpl::is_positive_pair(lx, lo, gx, o, p.exclude_diag);
          hv += pair_grad(L, s, pos, neg, xst[0 * kBN + x], xst[1 * kBN + x], xst[2 * kBN + x],
                          xst[3 * kBN + x], xst[4 * kBN + x], xst[5 * kBN + x]);
        }
        Ss[ol * kLDS + x] = hv;
      }
    }
    __syncthreads();
    accumulate_tile<T>(Ss, no, nx, out, V + x0 * p.D, p.D);
  }
}

template <typename T>
PairArgs<T> make_args(const void* q, const void* r, const int64_t* lq, const int64_t* lr,
                      int64_t N, int64_t M, int64_t D, bool self_mode, bool vec16,
                      const PairParams& pp) {
  using A = typename AccOf<T>::type;
  PairArgs<T> a{};
  a.q = static_cast<const T*>(q);
  a.r = self_mode ? a.q : static_cast<const T*>(r);
  a.lq = lq;
  a.lr = self_mode ? lq : lr;
  a.N = N;
  a.M = self_mode ? N : M;
  a.D = D;
  a.self_mode = self_mode;
  a.vec16 = vec16;
  a.exclude_diag = self_mode ? true : pp.exclude_diag;
  a.L = fpl::make_pair_loss<A>(pp.kind, pp.p0, pp.p1, pp.p2, pp.mine, pp.miner_eps);
  return a;
}

template <typename T>
cudaError_t forward_t(const void* q, const void* r, const int64_t* lq, const int64_t* lr, int64_t N,
                      int64_t M, int64_t D, bool self_mode, bool vec16, const PairParams& pp,
                      void* lse_pos, void* lse_neg, int32_t* cnt_pos, int32_t* cnt_neg,
                      void* min_pos, void* max_neg, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  if (N == 0) return cudaSuccess;
  PairArgs<T> a = make_args<T>(q, r, lq, lr, N, M, D, self_mode, vec16, pp);
  a.lse_pos = static_cast<A*>(lse_pos);
  a.lse_neg = static_cast<A*>(lse_neg);
  a.min_pos = static_cast<A*>(min_pos);
  a.max_neg = static_cast<A*>(max_neg);
  a.cnt_pos = cnt_pos;
  a.cnt_neg = cnt_neg;
  const size_t smem = Smem<T>::kExtraOffset + kBN * sizeof(int64_t);
  cudaError_t err = prepare_smem(pair_forward_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  FPL_LAUNCH(pair_forward_kernel<T>, grid_for(N, kBM), smem, stream, a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_t(const void* g_pos, const void* g_neg, const void* q, const void* r,
                       const int64_t* lq, const int64_t* lr, const void* lse_pos,
                       const void* lse_neg, const void* min_pos, const void* max_neg, int64_t N,
                       int64_t M, int64_t D, bool self_mode, bool vec16, const PairParams& pp,
                       void* grad_q, void* grad_r, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  PairArgs<T> a = make_args<T>(q, r, lq, lr, N, M, D, self_mode, vec16, pp);
  // the kernels only read these through the backward paths
  a.lse_pos = const_cast<A*>(static_cast<const A*>(lse_pos));
  a.lse_neg = const_cast<A*>(static_cast<const A*>(lse_neg));
  a.min_pos = const_cast<A*>(static_cast<const A*>(min_pos));
  a.max_neg = const_cast<A*>(static_cast<const A*>(max_neg));
  a.g_pos = static_cast<const A*>(g_pos);
  a.g_neg = static_cast<const A*>(g_neg);
  const size_t smem = Smem<T>::kExtraOffset + kBN * sizeof(int64_t) + kNumStats * kBN * sizeof(A);
  cudaError_t err = prepare_smem(pair_backward_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  if (N > 0) {
    a.out = static_cast<A*>(grad_q);
    FPL_LAUNCH(pair_backward_kernel<T>, grid_for(N, kBM), smem, stream, a, 0);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (!self_mode && a.M > 0) {
    a.out = static_cast<A*>(grad_r);
    FPL_LAUNCH(pair_backward_kernel<T>, grid_for(a.M, kBM), smem, stream, a, 1);
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace

cudaError_t pair_forward(DType dt, const void* q, const void* r, const int64_t* labels_q,
                         const int64_t* labels_r, int64_t N, int64_t M, int64_t D, bool self_mode,
                         bool vec16, const PairParams& p, void* lse_pos, void* lse_neg,
                         int32_t* count_pos, int32_t* count_neg, void* min_pos, void* max_neg,
                         cudaStream_t stream) {
#define FPL_PAIR_FWD(T)                                                                       \
  return forward_t<T>(q, r, labels_q, labels_r, N, M, D, self_mode, vec16, p, lse_pos, lse_neg, \
                      count_pos, count_neg, min_pos, max_neg, stream)
  switch (dt) {
    case DType::kFloat32: FPL_PAIR_FWD(float);
    case DType::kFloat64: FPL_PAIR_FWD(double);
    case DType::kFloat16: FPL_PAIR_FWD(__half);
    case DType::kBFloat16: FPL_PAIR_FWD(__nv_bfloat16);
  }
#undef FPL_PAIR_FWD
  return cudaErrorInvalidValue;
}

cudaError_t pair_backward(DType dt, const void* grad_lse_pos, const void* grad_lse_neg,
                          const void* q, const void* r, const int64_t* labels_q,
                          const int64_t* labels_r, const void* lse_pos, const void* lse_neg,
                          const void* min_pos, const void* max_neg, int64_t N, int64_t M, int64_t D,
                          bool self_mode, bool vec16, const PairParams& p, void* grad_q_acc,
                          void* grad_r_acc, cudaStream_t stream) {
#define FPL_PAIR_BWD(T)                                                                         \
  return backward_t<T>(grad_lse_pos, grad_lse_neg, q, r, labels_q, labels_r, lse_pos, lse_neg,    \
                       min_pos, max_neg, N, M, D, self_mode, vec16, p, grad_q_acc, grad_r_acc, \
                       stream)
  switch (dt) {
    case DType::kFloat32: FPL_PAIR_BWD(float);
    case DType::kFloat64: FPL_PAIR_BWD(double);
    case DType::kFloat16: FPL_PAIR_BWD(__half);
    case DType::kBFloat16: FPL_PAIR_BWD(__nv_bfloat16);
  }
#undef FPL_PAIR_BWD
  return cudaErrorInvalidValue;
}

}  // namespace fpl_cuda
