// CUDA class engine: fused_pairloss::class_engine_forward / _backward (SoftTriple, class-level
// Circle, ProxyAnchor, the margin-softmax losses). Semantics: fused_pairloss/ops/README.md; the
// declaration: common/loss_spec.h (ClassSpec), its per-element math: common/pair_terms.inl.
//
// Tiles of whole classes: a tile holds CPT = kBN / K classes (CPT * K center rows of w). Per
// (row, class) the K center similarities are pooled (SoftTriple: softmax_k(s_k * inv_gamma)-weighted
// mean; K = 1: s itself).
// Forward, two kernels, each a deterministic owner of its outputs:
//   row kernel: a CTA owns kBM rows of q and walks every class tile; per row an online LSE of the
//     row term over the classes c != y_i (two threads per row, merged by a warp shuffle) and
//     target_sim_i = S_{i,y_i};
//   column kernel (COL_POS_LSE / COL_NEG_LSE, K = 1): a CTA owns a tile of classes and walks every
//     row block; per class the online LSEs of the column terms over the rows with y_i == c and
//     y_i != c (two threads per class). When the row kernel is not needed (no ROW_LSE) it also
//     writes target_sim (each row's class has exactly one owner).
// Backward, deterministic two-kernel form: row pass (pass 0) grad_q[I] += Gs(I, cols) . w[cols]
// over all class tiles; column pass (pass 1, need_grad_w) grad_w[cols] += Gs(X, cols)^T . q[X]
// over all row blocks, Gs = dL/ds_ick. Every kernel computes a tile with the same tile_dot call
// (q rows as the A operand, a class tile as B), so S is bitwise the same in every pass.
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
  ClassSpec<A> sp;
  bool row_lse, row_softplus, col_pos, col_neg, columns_write_target;
  // forward outputs: rows [2][N], cols [2][C]
  A* rows;
  A* cols;
  // backward inputs and output
  const A* grows;
  const A* gcols;
  const A* rows_in;
  const A* cols_in;
  A* out;
};

// Pooled class similarity of the K centers at s[0], s[stride], ...; also returns the softmax's
// max and normalizer (K > 1) so that the backward can rebuild p_k. With pool_max (SubCenterArcFace):
// max_k s_k as torch.max (a NaN wins), its first center's index in mx.
template <typename A>
FPL_DEV A pool_class(const A* s, int stride, int K, A inv_gamma, bool pool_max, A& mx, A& Z) {
  if (K == 1) return s[0];
  if (pool_max) {
    A best = s[0];
    int first = 0;
    for (int k = 1; k < K; ++k) {
      const A x = s[k * stride];
      if (x > best || (x != x && best == best)) {  // strictly larger, or the first NaN
        best = x;
        first = k;
      }
    }
    mx = A(first);
    return best;
  }
  mx = neg_inf<A>();
  for (int k = 0; k < K; ++k) {
    const A x = s[k * stride] * inv_gamma;  // as PML: sim * (1/gamma), then softmax
    mx = (x > mx || x != x) ? x : mx;
  }
  Z = A(0);
  for (int k = 0; k < K; ++k) Z += math_exp(s[k * stride] * inv_gamma - mx);
  A S = A(0);
  for (int k = 0; k < K; ++k) {
    const A sk = s[k * stride];
    S += (math_exp(sk * inv_gamma - mx) / Z) * sk;
  }
  return S;
}

// the class tile [c0, c0 + ncls) as center rows [col0, col0 + ncol) of w
struct ClassTileRange {
  int64_t c0, col0;
  int ncls, ncol;
};

template <typename T>
FPL_DEV ClassTileRange class_tile(const ClassArgs<T>& p, int64_t c0) {
  ClassTileRange r;
  r.c0 = c0;
  r.ncls = int(p.C - c0 < p.CPT ? p.C - c0 : p.CPT);
  r.col0 = c0 * p.K;
  r.ncol = r.ncls * p.K;
  return r;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) class_row_forward_kernel(ClassArgs<T> p) {
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
  const ClassSpec<A>& sp = p.sp;
  const int K = p.K;

  OnlineLSE<A> acc;
  acc.init();
  A softplus_sum = A(0);  // row_softplus: the row's reduction instead of acc
  A ts = A(0);
  int has_target = 0;
  for (int64_t c0 = 0; c0 < p.C; c0 += p.CPT) {
    const ClassTileRange ct = class_tile(p, c0);
    tile_dot<T>(p.q, o0, no, p.w, ct.col0, ct.ncol, p.D, p.vec16, false, Ss, stage);
    if (valid) {
      for (int c = h; c < ct.ncls; c += 2) {
        A mx, Z;
        const A S = pool_class(Ss + ol * kLDS + c * K, 1, K, sp.pool_inv_gamma, sp.pool_max, mx, Z);
        if (c0 + c == lo) {
          ts = S;
          has_target = 1;
        } else if (p.row_lse) {  // the row reduction skips the target
          const A z = term_value(sp.row, S);
          if (p.row_softplus)
            softplus_sum += softplus_value(z);
          else
            acc.add(z);
        }
      }
    }
  }
  merge_pair_lanes(acc);
  softplus_sum += pair_lane(softplus_sum);
  const A other_ts = pair_lane(ts);
  const int other_has = pair_lane(has_target);
  if (!has_target && other_has) ts = other_ts;
  if (valid && h == 0) {
    p.rows[fpl::kRowLseOther * p.N + o] = p.row_softplus ? softplus_sum : acc.value();
    p.rows[fpl::kRowTargetSim * p.N + o] = (has_target || other_has) ? ts : quiet_nan<A>();
  }
}

// K = 1. A CTA owns the classes [c0, c0 + CPT); thread pair (2c, 2c + 1) class c0 + c.
template <typename T>
__global__ void __launch_bounds__(kThreads) class_col_forward_kernel(ClassArgs<T> p) {
  using A = typename AccOf<T>::type;
  extern __shared__ __align__(128) unsigned char smem[];
  A* Ss = reinterpret_cast<A*>(smem);
  unsigned char* stage = smem + Smem<T>::kSsBytes;
  int64_t* lab_s = reinterpret_cast<int64_t*>(smem + Smem<T>::kExtraOffset);

  const int t = threadIdx.x, cl = t >> 1, h = t & 1;
  const ClassTileRange ct = class_tile(p, int64_t(blockIdx.x) * p.CPT);
  const bool valid = cl < ct.ncls;
  const int64_t c = ct.c0 + cl;
  const ClassSpec<A>& sp = p.sp;
  OnlineLSE<A> pos, neg;
  pos.init();
  neg.init();
  for (int64_t x0 = 0; x0 < p.N; x0 += kBM) {
    const int nx = int(p.N - x0 < kBM ? p.N - x0 : kBM);
    __syncthreads();  // the previous block's readers of lab_s are done
    if (t < nx) lab_s[t] = p.labels[x0 + t];
    // the row kernel's tile (q rows as A operand), stored transposed: Ss[class][row]
    tile_dot<T>(p.q, x0, nx, p.w, ct.col0, ct.ncol, p.D, p.vec16, true, Ss, stage);
    if (valid) {
      for (int i = h; i < nx; i += 2) {
        const A s = Ss[cl * kLDS + i];
        if (lab_s[i] == c) {
          if (p.col_pos) pos.add(term_value(sp.col_pos, s));
          if (p.columns_write_target) p.rows[fpl::kRowTargetSim * p.N + x0 + i] = s;
        } else if (p.col_neg) {
          neg.add(term_value(sp.col_neg, s));
        }
      }
    }
  }
  merge_pair_lanes(pos);
  merge_pair_lanes(neg);
  if (valid && h == 0) {
    p.cols[fpl::kColLsePos * p.C + c] = pos.value();
    p.cols[fpl::kColLseNeg * p.C + c] = neg.value();
  }
}

// Per-row values of the backward staged in shared memory: label, g_lse_other, g_target_sim, lse_other.
// Per-class values: g_col_pos, g_col_neg, col_lse_pos, col_lse_neg.
constexpr int kRowStats = 3;
constexpr int kColStats = 4;

template <typename T>
FPL_DEV void stage_row_stats(const ClassArgs<T>& p, int64_t r0, int nr, int64_t* lab_s, typename AccOf<T>::type* rst) {
  const int t = threadIdx.x;
  if (t < nr) {
    lab_s[t] = p.labels[r0 + t];
    rst[0 * kBM + t] = p.grows[fpl::kRowLseOther * p.N + r0 + t];
    rst[1 * kBM + t] = p.grows[fpl::kRowTargetSim * p.N + r0 + t];
    rst[2 * kBM + t] = p.rows_in[fpl::kRowLseOther * p.N + r0 + t];
  }
}

template <typename T>
FPL_DEV void stage_col_stats(const ClassArgs<T>& p, const ClassTileRange& ct, typename AccOf<T>::type* cst) {
  const int t = threadIdx.x;
  if ((p.col_pos || p.col_neg) && t < ct.ncls) {
    const int64_t c = ct.c0 + t;
    cst[0 * kBN + t] = p.gcols[fpl::kColLsePos * p.C + c];
    cst[1 * kBN + t] = p.gcols[fpl::kColLseNeg * p.C + c];
    cst[2 * kBN + t] = p.cols_in[fpl::kColLsePos * p.C + c];
    cst[3 * kBN + t] = p.cols_in[fpl::kColLseNeg * p.C + c];
  }
}

// G_ic = dL/dS_ic (ops/README.md class_engine_backward), then Gs_ick = G_ic dS_ic/ds_ick written
// over the tile's s_ick in place. Element (row i, center column j) of the tile is
// Ss[i * rs + j * cs].
template <typename T>
FPL_DEV void class_grad_tile(const ClassArgs<T>& p, typename AccOf<T>::type* Ss, int rs, int cs, int nrows,
                             const ClassTileRange& ct, const int64_t* lab_s, const typename AccOf<T>::type* rst,
                             const typename AccOf<T>::type* cst) {
  using A = typename AccOf<T>::type;
  const ClassSpec<A>& sp = p.sp;
  const int K = p.K;
  const A ig = sp.pool_inv_gamma;
  const int n = nrows * ct.ncls;
  for (int item = threadIdx.x; item < n; item += kThreads) {
    const int i = item % nrows, c = item / nrows;
    A* s = Ss + i * rs + c * K * cs;
    A mx = A(0), Z = A(1);
    const A S = pool_class(s, cs, K, ig, sp.pool_max, mx, Z);
    const bool tg = ct.c0 + c == lab_s[i];
    A g = A(0);
    if (p.row_lse && !tg) {  // d LSE / dz = exp(z - LSE); d sum softplus / dz = sigmoid(z)
      const A z = term_value(sp.row, S);
      const A dz = p.row_softplus ? sigmoid_value(z) : math_exp(z - rst[2 * kBM + i]);
      g = rst[0 * kBM + i] * dz * term_dvalue(sp.row, S, z);
    }
    if (p.col_pos && tg) {  // K = 1: s = S
      const A x = term_value(sp.col_pos, S);
      g += cst[0 * kBN + c] * math_exp(x - cst[2 * kBN + c]) * term_dvalue(sp.col_pos, S, x);
    }
    if (p.col_neg && !tg) {
      const A x = term_value(sp.col_neg, S);
      g += cst[1 * kBN + c] * math_exp(x - cst[3 * kBN + c]) * term_dvalue(sp.col_neg, S, x);
    }
    if (tg) g += rst[1 * kBM + i];
    if (K == 1) {
      s[0] = g;
    } else if (sp.pool_max) {  // dS/ds_k = 1 at the maximum's first center (index in mx), else 0
      for (int k = 0; k < K; ++k) s[k * cs] = k == int(mx) ? g : A(0);
    } else {
      for (int k = 0; k < K; ++k) {  // dS/ds_k = p_k (1 + (s_k - S) / gamma)
        const A sk = s[k * cs];
        const A pk = math_exp(sk * ig - mx) / Z;
        s[k * cs] = (g * pk) * (A(1) + (sk - S) * ig);
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
  A* rst = reinterpret_cast<A*>(lab_s + kBM);  // [kRowStats][kBM]
  A* cst = rst + kRowStats * kBM;              // [kColStats][kBN]

  if (pass == 0) {  // grad_q: this CTA owns rows [o0, o0 + no)
    const int64_t o0 = int64_t(blockIdx.x) * kBM;
    const int no = int(p.N - o0 < kBM ? p.N - o0 : kBM);
    stage_row_stats(p, o0, no, lab_s, rst);  // visible after the first tile_dot's barrier
    for (int64_t c0 = 0; c0 < p.C; c0 += p.CPT) {
      const ClassTileRange ct = class_tile(p, c0);
      __syncthreads();  // the previous tile's readers of cst are done
      stage_col_stats(p, ct, cst);
      tile_dot<T>(p.q, o0, no, p.w, ct.col0, ct.ncol, p.D, p.vec16, false, Ss, stage);
      class_grad_tile(p, Ss, kLDS, 1, no, ct, lab_s, rst, cst);
      __syncthreads();
      accumulate_tile<T>(Ss, no, ct.ncol, p.out, nullptr, o0, p.w + ct.col0 * p.D, p.D);
    }
  } else {  // grad_w: this CTA owns the classes of one tile, center rows [col0, col0 + ncol)
    const ClassTileRange ct = class_tile(p, int64_t(blockIdx.x) * p.CPT);
    stage_col_stats(p, ct, cst);
    for (int64_t x0 = 0; x0 < p.N; x0 += kBM) {
      const int nx = int(p.N - x0 < kBM ? p.N - x0 : kBM);
      __syncthreads();  // the previous block's readers of lab_s / rst / Ss are done
      stage_row_stats(p, x0, nx, lab_s, rst);
      // the row pass's tile (q rows as A operand), stored transposed: Ss[center][row]
      tile_dot<T>(p.q, x0, nx, p.w, ct.col0, ct.ncol, p.D, p.vec16, true, Ss, stage);
      class_grad_tile(p, Ss, 1, kLDS, nx, ct, lab_s, rst, cst);
      __syncthreads();
      accumulate_tile<T>(Ss, ct.ncol, nx, p.out, nullptr, ct.col0, p.q + x0 * p.D, p.D);
    }
  }
}

template <typename T>
ClassArgs<T> make_args(const ClassOperands& o, const double* terms, int64_t flags) {
  using A = typename AccOf<T>::type;
  ClassArgs<T> a{};
  a.q = static_cast<const T*>(o.q);
  a.w = static_cast<const T*>(o.w);
  a.labels = o.labels;
  a.N = o.N;
  a.C = o.C;
  a.D = o.D;
  a.K = int(o.K);
  a.CPT = int(kBN / o.K > 0 ? kBN / o.K : 1);
  a.vec16 = o.vec16;
  a.sp = fpl::decode_class_spec<A>(terms, flags, o.K);
  a.row_lse = a.sp.row.lse;
  a.row_softplus = a.sp.row_softplus;
  a.col_pos = a.sp.col_pos.lse;
  a.col_neg = a.sp.col_neg.lse;
  return a;
}

bool class_operands_ok(const ClassOperands& o, int64_t flags) {
  if (o.K < 1 || o.K > kMaxCentersPerClass) return false;
  if ((flags & (fpl::kColPosLse | fpl::kColNegLse)) && o.K != 1) return false;
  return true;
}

template <typename T>
cudaError_t forward_t(const ClassOperands& o, const double* terms, int64_t flags, void* rows, void* cols,
                      cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  if (!class_operands_ok(o, flags)) return cudaErrorInvalidValue;
  ClassArgs<T> a = make_args<T>(o, terms, flags);
  a.rows = static_cast<A*>(rows);
  a.cols = static_cast<A*>(cols);
  const bool columns = a.col_pos || a.col_neg;
  cudaError_t err = cudaSuccess;
  if (o.N > 0 && (a.row_lse || !columns)) {
    const size_t smem = Smem<T>::kExtraOffset;
    err = prepare_smem(class_row_forward_kernel<T>, smem);
    if (err != cudaSuccess) return err;
    FPL_LAUNCH(class_row_forward_kernel<T>, grid_for(o.N, kBM), smem, stream, a);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (columns && o.C > 0) {
    a.columns_write_target = !a.row_lse;
    const size_t smem = Smem<T>::kExtraOffset + kBM * sizeof(int64_t);
    err = prepare_smem(class_col_forward_kernel<T>, smem);
    if (err != cudaSuccess) return err;
    FPL_LAUNCH(class_col_forward_kernel<T>, grid_for(o.C, a.CPT), smem, stream, a);
    err = cudaGetLastError();
  }
  return err;
}

template <typename T>
cudaError_t backward_t(const ClassOperands& o, const double* terms, int64_t flags, const void* grows, const void* gcols,
                       const void* rows, const void* cols, void* grad_q, void* grad_w, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  if (!class_operands_ok(o, flags)) return cudaErrorInvalidValue;
  if (o.N == 0 || o.C == 0) return cudaSuccess;  // the caller's zero-filled gradients are the answer
  ClassArgs<T> a = make_args<T>(o, terms, flags);
  a.grows = static_cast<const A*>(grows);
  a.gcols = static_cast<const A*>(gcols);
  a.rows_in = static_cast<const A*>(rows);
  a.cols_in = static_cast<const A*>(cols);
  const size_t smem = Smem<T>::kExtraOffset + kBM * sizeof(int64_t) + (kRowStats * kBM + kColStats * kBN) * sizeof(A);
  cudaError_t err = prepare_smem(class_backward_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  if (grad_q != nullptr) {
    a.out = static_cast<A*>(grad_q);
    FPL_LAUNCH(class_backward_kernel<T>, grid_for(o.N, kBM), smem, stream, a, 0);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (grad_w != nullptr) {
    a.out = static_cast<A*>(grad_w);
    FPL_LAUNCH(class_backward_kernel<T>, grid_for(o.C, a.CPT), smem, stream, a, 1);
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace

cudaError_t class_forward(const ClassOperands& o, const double* terms, int64_t flags, void* rows, void* cols,
                          cudaStream_t stream) {
  switch (o.dt) {
    case DType::kFloat32:
      return forward_t<float>(o, terms, flags, rows, cols, stream);
    case DType::kFloat64:
      return forward_t<double>(o, terms, flags, rows, cols, stream);
    case DType::kFloat16:
      return forward_t<__half>(o, terms, flags, rows, cols, stream);
    case DType::kBFloat16:
      return forward_t<__nv_bfloat16>(o, terms, flags, rows, cols, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t class_backward(const ClassOperands& o, const double* terms, int64_t flags, const void* grad_rows,
                           const void* grad_cols, const void* rows, const void* cols, void* grad_q, void* grad_w,
                           cudaStream_t stream) {
#define FPL_CLASS_BWD(T) return backward_t<T>(o, terms, flags, grad_rows, grad_cols, rows, cols, grad_q, grad_w, stream)
  switch (o.dt) {
    case DType::kFloat32:
      FPL_CLASS_BWD(float);
    case DType::kFloat64:
      FPL_CLASS_BWD(double);
    case DType::kFloat16:
      FPL_CLASS_BWD(__half);
    case DType::kBFloat16:
      FPL_CLASS_BWD(__nv_bfloat16);
  }
#undef FPL_CLASS_BWD
  return cudaErrorInvalidValue;
}

}  // namespace fpl_cuda
