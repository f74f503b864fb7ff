// CUDA class engine (SoftTriple, ProxyCircle): a fused linear + pooled cross-entropy-style LSE.
//
// A CTA owns kBM rows of q and walks tiles of whole classes of w (CPT = kBN / K classes, CPT * K
// center rows of w per tile). Per (row, class) the K center similarities are pooled (SoftTriple:
// softmax_k(s_k / gamma)-weighted mean; K = 1: s itself) and fed to a per-row online LSE
// (pair_math.h ClassLoss / OnlineLSE); two threads per row, merged by a warp shuffle.
// Backward, deterministic two-kernel form: row pass (pass 0) grad_q[I] += Gs(I, cols) . w[cols]
// over all class tiles; column pass (pass 1) grad_w[cols] += Gs(X, cols)^T . q[X] over all row
// blocks, Gs = dL/ds_ick. Both recompute S with the same tile_dot call as the forward.
#include "cuda/launchers.h"
#include "cuda/tile_common.cuh"

namespace fpl_cuda {
namespace {

template <typename T>
struct ClassArgs {
  using A = typename AccOf<T>::type;
  const T* q;
  const T* w;
  const int64_t* labels;
  int64_t N, C, D;
  int K, CPT;  // centers per class, classes per tile
  bool vec16;
  fpl::ClassLoss<A> L;
  A* lse;  // forward output / backward input
  A* target_sim;
  const A* g_lse;
  const A* g_target;
  A* out;
};

// Pooled class similarity of the K centers at s[0], s[stride], ...; also returns the softmax's
// max and normalizer (K > 1) so that the backward can rebuild p_k.
template <typename A>
__device__ __forceinline__ A pool_class(const A* s, int stride, int K, A inv_gamma, A& mx, A& Z) {
  if (K == 1) return s[0];
  mx = fpl::neg_infinity<A>();
  for (int k = 0; k < K; ++k) {
    const A x = s[k * stride] * inv_gamma;
    mx = (x > mx || x != x) ? x : mx;
  }
  Z = A(0);
  for (int k = 0; k < K; ++k) Z += fpl::fpl_exp(s[k * stride] * inv_gamma - mx);
  A S = A(0);
  for (int k = 0; k < K; ++k) {
    const A sk = s[k * stride];
    S += (fpl::fpl_exp(sk * inv_gamma - mx) / Z) * sk;
  }
  return S;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) class_forward_kernel(ClassArgs<T> p) {
  using A = typename AccOf<T>::type;
  extern __shared__ __align__(128) unsigned char smem[];
  A* Ss = reinterpret_cast<A*>(smem);
  unsigned char* stage = smem + Smem<T>::kSsBytes;

  const int t = threadIdx.x, ol = t >> 1, h = t & 1;
  const int64_t o0 = int64_t(blockIdx.x) * kBM;
  const int no = int(p.N - o0 < kBM ? p.N - o0 : kBM);
  const bool valid = ol < no;
  const int64_t o = o0 + ol;
  const int64_t lo = valid ? p.labels[o] : -1;
  const fpl::ClassLoss<A>& L = p.L;
  const int K = p.K;
  const int64_t CK = p.C * K;

  fpl::OnlineLSE<A> acc;
  A ts = A(NAN);
  int has_target = 0;
  for (int64_t c0 = 0; c0 < p.C; c0 += p.CPT) {
    const int ncls = int(p.C - c0 < p.CPT ? p.C - c0 : p.CPT);
    const int64_t col0 = c0 * K;
    const int ncol = int(CK - col0 < kBN ? CK - col0 : kBN);
    tile_dot<T>(p.q, o0, no, p.w, col0, ncol, p.D, p.vec16, false, Ss, stage);
    if (valid) {
      for (int c = h; c < ncls; c += 2) {
        A mx, Z;
        const A S = pool_class(Ss + ol * kLDS + c * K, 1, K, L.inv_gamma, mx, Z);
        const bool is_t = (c0 + c) == lo;
        if (is_t) { ts = S; has_target = 1; }
        if (L.target_in_lse() || !is_t) acc.add(L.logit(S, is_t));
      }
    }
  }
  merge_pair_lanes(acc);
  const A other_ts = __shfl_xor_sync(0xffffffffu, ts, 1);
  const int other_has = __shfl_xor_sync(0xffffffffu, has_target, 1);
  if (!has_target && other_has) ts = other_ts;
  if (valid && h == 0) {
    p.lse[o] = acc.value();
    p.target_sim[o] = ts;  // NaN if the label is not a class index (the Python side checks)
  }
}

// G_ic = dL/dS_ic, then Gs_ick = G_ic dS_ic/ds_ick written over the tile's s_ick in place.
// Element (row i, center column j) of the tile is Ss[i * rs + j * cs]. Row statistics in shared
// memory: lab_s[i], st_s[0][i] = grad_lse, st_s[1][i] = grad_target_sim, st_s[2][i] = lse.
template <typename A>
__device__ void class_grad_tile(const fpl::ClassLoss<A>& L, int K, A* Ss, int rs, int cs,
                                int nrows, int ncls, int64_t c0, const int64_t* lab_s,
                                const A* st_s) {
  const int n = nrows * ncls;
  for (int item = threadIdx.x; item < n; item += kThreads) {
    const int i = item % nrows, c = item / nrows;
    A* sp = Ss + i * rs + c * K * cs;
    A mx = A(0), Z = A(1);
    const A S = pool_class(sp, cs, K, L.inv_gamma, mx, Z);
    const bool is_t = (c0 + c) == lab_s[i];
    A g = A(0);
    if (L.target_in_lse() || !is_t)
      g = st_s[0 * kBM + i] * fpl::lse_softmax(L.logit(S, is_t), st_s[2 * kBM + i]) * L.dlogit(S, is_t);
    if (is_t) g += st_s[1 * kBM + i];
    if (K == 1) {
      sp[0] = g;
    } else {
      for (int k = 0; k < K; ++k) {
        const A sk = sp[k * cs];
        const A pk = fpl::fpl_exp(sk * L.inv_gamma - mx) / Z;
        sp[k * cs] = g * pk * (A(1) + (sk - S) * L.inv_gamma);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) class_backward_kernel(ClassArgs<T> p, int pass) {
  using A = typename AccOf<T>::type;
  extern __shared__ __align__(128) unsigned char smem[];
  A* Ss = reinterpret_cast<A*>(smem);
  unsigned char* stage = smem + Smem<T>::kSsBytes;
  int64_t* lab_s = reinterpret_cast<int64_t*>(smem + Smem<T>::kExtraOffset);
  A* st_s = reinterpret_cast<A*>(lab_s + kBM);  // [3][kBM]

  const int t = threadIdx.x;
  const int K = p.K;
  const int64_t CK = p.C * K;
  auto load_row_stats = [&](int64_t r0, int nr) {
    if (t < nr) {
      lab_s[t] = p.labels[r0 + t];
      st_s[0 * kBM + t] = p.g_lse[r0 + t];
      st_s[1 * kBM + t] = p.g_target[r0 + t];
      st_s[2 * kBM + t] = p.lse[r0 + t];
    }
  };

  if (pass == 0) {  // grad_q: this CTA owns rows [o0, o0 + no)
    const int64_t o0 = int64_t(blockIdx.x) * kBM;
    const int no = int(p.N - o0 < kBM ? p.N - o0 : kBM);
    load_row_stats(o0, no);  // visible after the first tile_dot's barrier
    A* out = p.out + o0 * p.D;
    for (int64_t c0 = 0; c0 < p.C; c0 += p.CPT) {
      const int ncls = int(p.C - c0 < p.CPT ? p.C - c0 : p.CPT);
      const int64_t col0 = c0 * K;
      const int ncol = int(CK - col0 < kBN ? CK - col0 : kBN);
      tile_dot<T>(p.q, o0, no, p.w, col0, ncol, p.D, p.vec16, false, Ss, stage);
      class_grad_tile<A>(p.L, K, Ss, kLDS, 1, no, ncls, c0, lab_s, st_s);
      __syncthreads();
      accumulate_tile<T>(Ss, no, ncls * K, out, p.w + col0 * p.D, p.D);
    }
  } else {  // grad_w: this CTA owns classes [c0, c0 + ncls), center rows [col0, col0 + ncls*K)
    const int64_t c0 = int64_t(blockIdx.x) * p.CPT;
    const int ncls = int(p.C - c0 < p.CPT ? p.C - c0 : p.CPT);
    const int64_t col0 = c0 * K;
    const int ncol = int(CK - col0 < kBN ? CK - col0 : kBN);
    A* out = p.out + col0 * p.D;
    for (int64_t x0 = 0; x0 < p.N; x0 += kBM) {
      const int nx = int(p.N - x0 < kBM ? p.N - x0 : kBM);
      __syncthreads();  // the previous block's readers of lab_s / st_s / Ss are done
      load_row_stats(x0, nx);
      // same S values as the forward / row pass: q rows as A operand, stored transposed (Ss[col][row])
      tile_dot<T>(p.q, x0, nx, p.w, col0, ncol, p.D, p.vec16, true, Ss, stage);
      class_grad_tile<A>(p.L, K, Ss, 1, kLDS, nx, ncls, c0, lab_s, st_s);
      __syncthreads();
      accumulate_tile<T>(Ss, ncls * K, nx, out, p.q + x0 * p.D, p.D);
    }
  }
}

template <typename T>
ClassArgs<T> make_args(const void* q, const void* w, const int64_t* labels, int64_t N, int64_t C,
                       int64_t K, int64_t D, bool vec16, int64_t kind, double p0, double p1,
                       double p2) {
  using A = typename AccOf<T>::type;
  ClassArgs<T> a{};
  a.q = static_cast<const T*>(q);
  a.w = static_cast<const T*>(w);
  a.labels = labels;
  a.N = N;
  a.C = C;
  a.D = D;
  a.K = int(K);
  a.CPT = int(kBN / K > 0 ? kBN / K : 1);
  a.vec16 = vec16;
  a.L = fpl::make_class_loss<A>(kind, K, p0, p1, p2);
  return a;
}

template <typename T>
cudaError_t forward_t(const void* q, const void* w, const int64_t* labels, int64_t N, int64_t C,
                      int64_t K, int64_t D, bool vec16, int64_t kind, double p0, double p1,
                      double p2, void* lse, void* target_sim, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  if (N == 0) return cudaSuccess;
  if (K < 1 || K > kMaxCentersPerClass) return cudaErrorInvalidValue;
  ClassArgs<T> a = make_args<T>(q, w, labels, N, C, K, D, vec16, kind, p0, p1, p2);
  a.lse = static_cast<A*>(lse);
  a.target_sim = static_cast<A*>(target_sim);
  const size_t smem = Smem<T>::kExtraOffset;
  cudaError_t err = prepare_smem(class_forward_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  FPL_LAUNCH(class_forward_kernel<T>, grid_for(N, kBM), smem, stream, a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_t(const void* g_lse, const void* g_target, const void* q, const void* w,
                       const int64_t* labels, const void* lse, int64_t N, int64_t C, int64_t K,
                       int64_t D, bool vec16, int64_t kind, double p0, double p1, double p2,
                       void* grad_q, void* grad_w, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  if (N == 0 || C == 0) return cudaSuccess;  // the caller's zero-filled gradients are the answer
  if (K < 1 || K > kMaxCentersPerClass) return cudaErrorInvalidValue;
  ClassArgs<T> a = make_args<T>(q, w, labels, N, C, K, D, vec16, kind, p0, p1, p2);
  a.lse = const_cast<A*>(static_cast<const A*>(lse));
  a.g_lse = static_cast<const A*>(g_lse);
  a.g_target = static_cast<const A*>(g_target);
  const size_t smem = Smem<T>::kExtraOffset + kBM * sizeof(int64_t) + 3 * kBM * sizeof(A);
  cudaError_t err = prepare_smem(class_backward_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  a.out = static_cast<A*>(grad_q);
  FPL_LAUNCH(class_backward_kernel<T>, grid_for(N, kBM), smem, stream, a, 0);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  a.out = static_cast<A*>(grad_w);
  FPL_LAUNCH(class_backward_kernel<T>, grid_for(C, a.CPT), smem, stream, a, 1);
  return cudaGetLastError();
}

}  // namespace

cudaError_t class_forward(DType dt, const void* q, const void* w, const int64_t* labels, int64_t N,
                          int64_t C, int64_t K, int64_t D, bool vec16, int64_t kind, double p0,
                          double p1, double p2, void* lse, void* target_sim, cudaStream_t stream) {
#define FPL_CLASS_FWD(T) \
  return forward_t<T>(q, w, labels, N, C, K, D, vec16, kind, p0, p1, p2, lse, target_sim, stream)
  switch (dt) {
    case DType::kFloat32: FPL_CLASS_FWD(float);
    case DType::kFloat64: FPL_CLASS_FWD(double);
    case DType::kFloat16: FPL_CLASS_FWD(__half);
    case DType::kBFloat16: FPL_CLASS_FWD(__nv_bfloat16);
  }
#undef FPL_CLASS_FWD
  return cudaErrorInvalidValue;
}

cudaError_t class_backward(DType dt, const void* grad_lse, const void* grad_target_sim,
                           const void* q, const void* w, const int64_t* labels, const void* lse,
                           int64_t N, int64_t C, int64_t K, int64_t D, bool vec16, int64_t kind,
                           double p0, double p1, double p2, void* grad_q_acc, void* grad_w_acc,
                           cudaStream_t stream) {
#define FPL_CLASS_BWD(T)                                                                        \
  return backward_t<T>(grad_lse, grad_target_sim, q, w, labels, lse, N, C, K, D, vec16, kind, p0, \
                       p1, p2, grad_q_acc, grad_w_acc, stream)
  switch (dt) {
    case DType::kFloat32: FPL_CLASS_BWD(float);
    case DType::kFloat64: FPL_CLASS_BWD(double);
    case DType::kFloat16: FPL_CLASS_BWD(__half);
    case DType::kBFloat16: FPL_CLASS_BWD(__nv_bfloat16);
  }
#undef FPL_CLASS_BWD
  return cudaErrorInvalidValue;
}

}  // namespace fpl_cuda
