// CUDA all-triplets engine: fused_pairloss::triplet_engine_forward / _backward on CUDA tensors
// (semantics: fused_pairloss/ops/README.md triplet_rows; docs/design.md "Triplets").
//
// The glue (glue.h) hands the kernels q and r in the accumulation type A (float / double: the FMA
// tile path, an S element a strictly sequential fma over d) and, per row i, its positives' columns
// (same label, not exclude_col_i; [N, P], -1 padding). The kernels:
//   triplet_positive_u_kernel: a[i, p] = u of row i and its p-th positive (u = d, or -S), by the
//     same sequential fma and the same distance rule as the tiles, so a tie between a positive
//     and a negative of a row is a tie here too;
//   triplet_forward_kernel: a CTA owns kBM rows and walks r's column tiles (tile_dot, then u in
//     place); two threads per row take alternate columns and, for each negative (labels differ)
//     and each positive p of the row, the hinge x = a_p + margin - u: sums, counts of x > 0, and
//     the (p, n) in the miner's window (lo < u - a_p <= hi; every pair without one);
//   triplet_backward_kernel, pass 0 (rows of q): recomputes the tiles, k[i, p] = #{n : x > 0}
//     (d sums_i / d a_p; each (row, p) counted by one thread, so no atomics), then
//     G = g_i c_in du/dS over the negatives, c_in = #{p : x > 0}, grad_q += G r; pass 1 (rows of r,
//     the tile transposed: the same S bits), after pass 0, grad_r += G^T q with G also on the
//     positives, -g_i k[i, slot] du/dS (the slot from the column's rank among its label's columns).
//     lp adds the norms' share at the end.
// The positives' share of grad_q, g_i k_ip du_ip, is added by the glue from the gathered pairs (a
// product per row, no scatter). Deterministic: every output row is owned by one CTA, no atomics.
//
// The bins (BINS = true; DynamicSoftMargin, ops/README.md triplet_bins: margin 0, no window, lp):
// the forward's term of (p, n) is x = a_p - u in PML's bin k = clamp(floor t, 0, bins - 1), t = (x -
// lo) / width, with f = t - trunc t: each of a row's two threads adds (1, f, x) into its own slice
// [3][bins] of bin_acc (doubles, so that a count stays exact past 2^24 pairs; global memory, owned
// by that thread: no atomics), which the glue turns into
// PML's increments. The backward's term weight is w = bin_weight[i][k] (the glue's table from the
// incoming gradient, which it already holds): kw[i, p] = sum_n w replaces g k, sum_p w replaces g c.
#include "cuda/launchers.h"
#include "cuda/tile_common.cuh"

namespace fpl_cuda {
namespace {

template <typename A>
struct TripletArgs {
  const A* q;
  const A* r;
  const int64_t* lq;
  const int64_t* lr;
  const A* nq;  // lp: squared norms of the rows of q / r
  const A* nr;
  const int64_t* excl;       // [N] the column excluded from row i's positives (-1: none)
  const int64_t* rank_r;     // [M] rank of column j among the columns of its label (column order)
  const int64_t* excl_rank;  // [N] rank_r of row i's excluded column when it has row i's label, else -1
  const int64_t* pos_cols;   // [N, P], -1: none
  A* a;                      // [N, P] u of the positive pairs (NaN where none): written by the first kernel
  int64_t N, M, D, P;
  A margin, lo, hi;
  bool lp, window, vec16;
  A* sums;
  int64_t* counts;
  int64_t* in_window;
  const A* g;  // backward: d loss / d sums
  int32_t* k;  // [N, P]
  A* out;
  // the bins
  int64_t bins;
  A bin_lo, bin_width;
  double* bin_acc;      // forward: [N, 2, 3, bins] (n, f, x per bin and thread of the row)
  const A* bin_weight;  // backward: [N, bins]
  A* kw;                // backward: [N, P] sum_n w
};

template <typename A>
FPL_DEV A floor_a(A x) {
  if constexpr (sizeof(A) == 4)
    return floorf(x);
  else
    return floor(x);
}
template <typename A>
FPL_DEV A trunc_a(A x) {
  if constexpr (sizeof(A) == 4)
    return truncf(x);
  else
    return trunc(x);
}

// The bin of the pair (a positive's u a, a negative's u): k, and t for PML's fraction.
template <typename A>
FPL_DEV int64_t bin_of(const TripletArgs<A>& p, A a, A u, A* t_out) {
  const A t = ((a - u) - p.bin_lo) / p.bin_width;
  const A fl = floor_a(t), top = A(p.bins - 1);
  *t_out = t;
  return static_cast<int64_t>(fl < A(0) ? A(0) : (fl > top ? top : fl));
}

// u of the pair (row i of q, row j of r) from s = q_i . r_j: -s, or d with the engines' rule for
// near pairs (common/pair_terms.inl: the rows' squared differences, summed in order).
template <typename A>
FPL_DEV A pair_u(const TripletArgs<A>& p, A s, int64_t i, int64_t j) {
  if (!p.lp) return -s;
  const A ni = p.nq[i], nj = p.nr[j];
  A d2 = lp_d2_from_s(s, ni, nj);
  if (lp_near_pair(d2, ni, nj)) {
    const A* x = p.q + i * p.D;
    const A* y = p.r + j * p.D;
    d2 = A(0);
    for (int64_t d = 0; d < p.D; ++d) {
      const A diff = x[d] - y[d];
      d2 += diff * diff;
    }
  }
  return pair_v_lp(d2);
}

template <typename A>
__global__ void __launch_bounds__(kThreads) triplet_positive_u_kernel(TripletArgs<A> p) {
  const int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= p.N * p.P) return;
  const int64_t i = e / p.P, j = p.pos_cols[e];
  if (j < 0) {
    p.a[e] = quiet_nan<A>();
    return;
  }
  const A* x = p.q + i * p.D;
  const A* y = p.r + j * p.D;
  A s = A(0);
  for (int64_t d = 0; d < p.D; ++d) s = fma_acc(x[d], y[d], s);  // tile_dot_fma's order
  p.a[e] = pair_u(p, s, i, j);
}

// The tile of u for owner rows [o0, o0 + no) and other rows [x0, x0 + nx): pass 0 owner = rows of
// q, other = rows of r (Ss[o][x] = u(q_o, r_x)); pass 1 owner = rows of r (Ss[o][x] = u(q_x, r_o)).
template <typename A>
FPL_DEV void triplet_tile(const TripletArgs<A>& p, int pass, int64_t o0, int no, int64_t x0, int nx, A* Ss,
                          unsigned char* stage) {
  if (pass == 0)
    tile_dot<A>(p.q, o0, no, p.r, x0, nx, p.D, p.vec16, false, Ss, stage);
  else
    tile_dot<A>(p.q, x0, nx, p.r, o0, no, p.D, p.vec16, true, Ss, stage);
  for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
    const int o = e / kBN, x = e % kBN;
    if (o >= no || x >= nx) continue;
    const int64_t iq = pass == 0 ? o0 + o : x0 + x, ir = pass == 0 ? x0 + x : o0 + o;
    Ss[o * kLDS + x] = pair_u(p, Ss[o * kLDS + x], iq, ir);
  }
  __syncthreads();
}

// (in the window, x > 0 there) of positive a (its u) against a negative's u
template <typename A>
FPL_DEV bool triplet_in_window(const TripletArgs<A>& p, A a, A u) {
  if (p.window) {
    const A t = u - a;
    return t > p.lo && t <= p.hi;
  }
  return u == u && a == a;
}

template <typename A, bool BINS>
__global__ void __launch_bounds__(kThreads) triplet_forward_kernel(TripletArgs<A> p) {
  extern __shared__ __align__(128) unsigned char smem[];
  A* Ss = reinterpret_cast<A*>(smem);
  unsigned char* stage = smem + Smem<A>::kSsBytes;
  int64_t* lx_s = reinterpret_cast<int64_t*>(smem + Smem<A>::kExtraOffset);
  const int t = threadIdx.x, ol = t >> 1, h = t & 1;
  const int64_t o0 = int64_t(blockIdx.x) * kBM;
  const int no = int(p.N - o0 < kBM ? p.N - o0 : kBM);
  const bool valid = ol < no;
  const int64_t o = o0 + ol;
  const int64_t lo = valid ? p.lq[o] : 0;
  const A* a_row = p.a + (valid ? o : 0) * p.P;
  A sum = A(0);
  int64_t count = 0, in_window = 0;
  for (int64_t x0 = 0; x0 < p.M; x0 += kBN) {
    const int nx = int(p.M - x0 < kBN ? p.M - x0 : kBN);
    __syncthreads();  // the previous tile's readers of lx_s are done
    if (t < nx) lx_s[t] = p.lr[x0 + t];
    triplet_tile<A>(p, 0, o0, no, x0, nx, Ss, stage);
    if (!valid) continue;
    for (int x = h; x < nx; x += 2) {
      if (lx_s[x] == lo) continue;
      const A u = Ss[ol * kLDS + x];
      if constexpr (BINS) {
        double* acc = p.bin_acc + (o * 2 + h) * 3 * p.bins;
        for (int64_t j = 0; j < p.P; ++j) {
          const A a = a_row[j];
          if (!((a - u) == (a - u))) continue;  // NaN a or u, or inf - inf: in no bin (ops/triplets.py)
          A t;
          const int64_t k = bin_of(p, a, u, &t);
          acc[k] += 1.0;
          acc[p.bins + k] += static_cast<double>(t - trunc_a(t));
          acc[2 * p.bins + k] += static_cast<double>(a - u);
        }
        continue;
      }
      for (int64_t j = 0; j < p.P; ++j) {
        const A a = a_row[j];
        if (!triplet_in_window(p, a, u)) continue;
        ++in_window;
        const A xv = (a + p.margin) - u;
        if (xv > A(0)) {
          sum += xv;
          ++count;
        }
      }
    }
  }
  if constexpr (BINS) return;
  sum += pair_lane(sum);
  count += pair_lane(count);
  in_window += pair_lane(in_window);
  if (valid && h == 0) {
    p.sums[o] = sum;
    p.counts[o] = count;
    p.in_window[o] = in_window;
  }
}

// d loss / d u of the pair (a positive's u a, a negative's u), without the row's g: 1 for a hinge
// term > 0 (else 0), the bin's weight for the bins (0 where a - u is NaN).
template <typename A, bool BINS>
FPL_DEV A pair_weight(const TripletArgs<A>& p, int64_t row, A a, A u) {
  if constexpr (BINS) {
    if (!((a - u) == (a - u))) return A(0);
    A t;
    return p.bin_weight[row * p.bins + bin_of(p, a, u, &t)];
  } else {
    return (triplet_in_window(p, a, u) && (a + p.margin) - u > A(0)) ? A(1) : A(0);
  }
}

// pass 0: k[i, p] and grad_q; pass 1: grad_r (module comment).
template <typename A, bool BINS>
__global__ void __launch_bounds__(kThreads) triplet_backward_kernel(TripletArgs<A> p, int pass) {
  extern __shared__ __align__(128) unsigned char smem[];
  A* Ss = reinterpret_cast<A*>(smem);
  unsigned char* stage = smem + Smem<A>::kSsBytes;
  int64_t* lx_s = reinterpret_cast<int64_t*>(smem + Smem<A>::kExtraOffset);
  const int t = threadIdx.x, ol = t >> 1, h = t & 1;
  const int64_t n_owner = pass == 0 ? p.N : p.M, n_other = pass == 0 ? p.M : p.N;
  const int64_t* l_owner = pass == 0 ? p.lq : p.lr;
  const int64_t* l_other = pass == 0 ? p.lr : p.lq;
  const A* X = pass == 0 ? p.q : p.r;  // owner rows
  const A* V = pass == 0 ? p.r : p.q;  // other rows
  const int64_t o0 = int64_t(blockIdx.x) * kBM;
  const int no = int(n_owner - o0 < kBM ? n_owner - o0 : kBM);
  const bool valid = ol < no;
  const int64_t o = o0 + ol;
  const int64_t lo = valid ? l_owner[o] : 0;
  A gsum = A(0);
  for (int64_t x0 = 0; x0 < n_other; x0 += kBN) {
    const int nx = int(n_other - x0 < kBN ? n_other - x0 : kBN);
    __syncthreads();  // the previous tile's readers of lx_s / Ss are done
    if (t < nx) lx_s[t] = l_other[x0 + t];
    triplet_tile<A>(p, pass, o0, no, x0, nx, Ss, stage);
    if (pass == 0) {  // k[i, p] over this tile's negatives: item (row, p) always on the same thread
      for (int64_t e = t; e < int64_t(no) * p.P; e += kThreads) {
        const int r = int(e / p.P);
        const int64_t row = o0 + r, label = l_owner[row];
        const A a = p.a[row * p.P + e % p.P];
        A c = A(0);
        for (int x = 0; x < nx; ++x) {
          if (lx_s[x] == label) continue;
          c += pair_weight<A, BINS>(p, row, a, Ss[r * kLDS + x]);
        }
        if constexpr (BINS)
          p.kw[row * p.P + e % p.P] += c;
        else
          p.k[row * p.P + e % p.P] += static_cast<int32_t>(c);
      }
      __syncthreads();
    }
    if (valid) {
      for (int x = h; x < nx; x += 2) {
        // G of the pair (row i of q, row j of r): the row's g and positives
        const int64_t i = pass == 0 ? o : x0 + x;
        const bool negative = lx_s[x] != lo;
        const A u = Ss[ol * kLDS + x];
        A hv = A(0);
        if (negative) {
          A c = A(0);
          for (int64_t j = 0; j < p.P; ++j) c += pair_weight<A, BINS>(p, i, p.a[i * p.P + j], u);
          // d u / d S: -1/d (0 at d = 0) for lp, -1 for the cosine; d sums / d u = -c (-g c)
          hv = BINS ? c : p.g[i] * c;
          if (p.lp) hv = u > A(0) ? hv / u : A(0);
        } else if (pass == 1 && p.excl[i] != o) {
          // a positive of row i (column o of r): d sums / d u = k of its slot in the row's list
          // (r's label order; the excluded column, when it ranks before, is not in the list)
          const int64_t rank = p.rank_r[o], er = p.excl_rank[i];
          const int64_t slot = rank - ((er >= 0 && er < rank) ? 1 : 0);
          hv = BINS ? -p.kw[i * p.P + slot] : -p.g[i] * A(p.k[i * p.P + slot]);
          if (p.lp) hv = u > A(0) ? hv / u : A(0);
        }
        gsum += hv;
        Ss[ol * kLDS + x] = hv;
      }
    }
    __syncthreads();
    accumulate_tile<A>(Ss, no, nx, p.out, nullptr, o0, V + x0 * p.D, p.D);
  }
  if (p.lp) {  // d = |x_o - v|: the norms' share -x_o sum_x G_ox
    gsum += pair_lane(gsum);
    __syncthreads();  // this CTA's accumulate_tile writes to its rows are done
    if (valid)
      for (int64_t d = h; d < p.D; d += 2) p.out[o * p.D + d] -= gsum * X[o * p.D + d];
  }
}

template <typename A>
TripletArgs<A> make_args(const TripletOperands& op) {
  TripletArgs<A> a{};
  a.q = static_cast<const A*>(op.q);
  a.r = static_cast<const A*>(op.r);
  a.lq = op.labels_q;
  a.lr = op.labels_r;
  a.nq = static_cast<const A*>(op.norm_q);
  a.nr = static_cast<const A*>(op.norm_r);
  a.excl = op.exclude_col;
  a.rank_r = op.rank_r;
  a.excl_rank = op.excl_rank;
  a.pos_cols = op.pos_cols;
  a.a = static_cast<A*>(op.pos_u);
  a.N = op.N;
  a.M = op.M;
  a.D = op.D;
  a.P = op.P;
  a.margin = A(op.margin);
  a.lo = A(op.window_lo);
  a.hi = A(op.window_hi);
  a.lp = op.lp;
  a.window = op.window;
  a.vec16 = op.vec16;
  a.bins = op.bins;
  a.bin_lo = A(op.bin_lo);
  a.bin_width = A(op.bin_width);
  return a;
}

template <typename A>
cudaError_t positive_u_t(const TripletOperands& op, cudaStream_t stream) {
  TripletArgs<A> a = make_args<A>(op);
  if (a.N * a.P == 0) return cudaSuccess;
  FPL_LAUNCH(triplet_positive_u_kernel<A>, grid_for(a.N * a.P, kThreads), 0, stream, a);
  return cudaGetLastError();
}

template <typename A>
cudaError_t forward_t(const TripletOperands& op, void* sums, int64_t* counts, int64_t* in_window, cudaStream_t stream) {
  TripletArgs<A> a = make_args<A>(op);
  if (a.N == 0) return cudaSuccess;
  a.sums = static_cast<A*>(sums);
  a.counts = counts;
  a.in_window = in_window;
  const size_t smem = Smem<A>::kExtraOffset + kBN * sizeof(int64_t);
  cudaError_t err = prepare_smem(triplet_forward_kernel<A, false>, smem);
  if (err != cudaSuccess) return err;
  FPL_LAUNCH((triplet_forward_kernel<A, false>), grid_for(a.N, kBM), smem, stream, a);
  return cudaGetLastError();
}

template <typename A>
cudaError_t bins_forward_t(const TripletOperands& op, void* bin_acc, cudaStream_t stream) {
  TripletArgs<A> a = make_args<A>(op);
  if (a.N == 0) return cudaSuccess;
  a.bin_acc = static_cast<double*>(bin_acc);
  const size_t smem = Smem<A>::kExtraOffset + kBN * sizeof(int64_t);
  cudaError_t err = prepare_smem(triplet_forward_kernel<A, true>, smem);
  if (err != cudaSuccess) return err;
  FPL_LAUNCH((triplet_forward_kernel<A, true>), grid_for(a.N, kBM), smem, stream, a);
  return cudaGetLastError();
}

// pass 0 (grad_q, and k or kw), then pass 1 (grad_r) when asked for
template <typename A, bool BINS>
cudaError_t run_backward(TripletArgs<A> a, void* grad_q, void* grad_r, cudaStream_t stream) {
  const size_t smem = Smem<A>::kExtraOffset + kBN * sizeof(int64_t);
  cudaError_t err = prepare_smem(triplet_backward_kernel<A, BINS>, smem);
  if (err != cudaSuccess) return err;
  if (a.N > 0) {
    a.out = static_cast<A*>(grad_q);
    FPL_LAUNCH((triplet_backward_kernel<A, BINS>), grid_for(a.N, kBM), smem, stream, a, 0);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (a.M > 0 && grad_r != nullptr) {
    a.out = static_cast<A*>(grad_r);
    FPL_LAUNCH((triplet_backward_kernel<A, BINS>), grid_for(a.M, kBM), smem, stream, a, 1);
    err = cudaGetLastError();
  }
  return err;
}

template <typename A>
cudaError_t backward_t(const TripletOperands& op, const void* grad_sums, int32_t* k, void* grad_q, void* grad_r,
                       cudaStream_t stream) {
  TripletArgs<A> a = make_args<A>(op);
  a.g = static_cast<const A*>(grad_sums);
  a.k = k;
  return run_backward<A, false>(a, grad_q, grad_r, stream);
}

template <typename A>
cudaError_t bins_backward_t(const TripletOperands& op, const void* bin_weight, void* kw, void* grad_q, void* grad_r,
                            cudaStream_t stream) {
  TripletArgs<A> a = make_args<A>(op);
  a.bin_weight = static_cast<const A*>(bin_weight);
  a.kw = static_cast<A*>(kw);
  return run_backward<A, true>(a, grad_q, grad_r, stream);
}

}  // namespace

cudaError_t triplet_positive_u(const TripletOperands& o, cudaStream_t stream) {
  return o.dt == DType::kFloat64 ? positive_u_t<double>(o, stream) : positive_u_t<float>(o, stream);
}

cudaError_t triplet_forward(const TripletOperands& o, void* sums, int64_t* counts, int64_t* in_window,
                            cudaStream_t stream) {
  return o.dt == DType::kFloat64 ? forward_t<double>(o, sums, counts, in_window, stream)
                                 : forward_t<float>(o, sums, counts, in_window, stream);
}

cudaError_t triplet_backward(const TripletOperands& o, const void* grad_sums, int32_t* k, void* grad_q, void* grad_r,
                             cudaStream_t stream) {
  return o.dt == DType::kFloat64 ? backward_t<double>(o, grad_sums, k, grad_q, grad_r, stream)
                                 : backward_t<float>(o, grad_sums, k, grad_q, grad_r, stream);
}

cudaError_t triplet_bins_forward(const TripletOperands& o, void* bin_acc, cudaStream_t stream) {
  return o.dt == DType::kFloat64 ? bins_forward_t<double>(o, bin_acc, stream)
                                 : bins_forward_t<float>(o, bin_acc, stream);
}

cudaError_t triplet_bins_backward(const TripletOperands& o, const void* bin_weight, void* kw, void* grad_q,
                                  void* grad_r, cudaStream_t stream) {
  return o.dt == DType::kFloat64 ? bins_backward_t<double>(o, bin_weight, kw, grad_q, grad_r, stream)
                                 : bins_backward_t<float>(o, bin_weight, kw, grad_q, grad_r, stream);
}

}  // namespace fpl_cuda
