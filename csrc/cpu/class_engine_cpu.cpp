// CPU kernels of the tiled class engine: fused_pairloss::class_engine_forward / _backward
// (SoftTriple, class-level Circle, ProxyAnchor, the margin-softmax losses). Semantics:
// fused_pairloss/ops/README.md; the declaration: common/loss_spec.h; tile kernels: cpu_kernels.h.
//
// Like a fused linear cross-entropy. Rows of q go in blocks of BI, classes in tiles of TC whole
// classes (all K centers of a class in one tile). The weights are read as the loss stores them
// (rows or PML's D x C*K columns); a tile's vectors are packed, normalized when the declaration
// says so: all tiles once per call when that copy is small (kPackedWeightsBudget), else into
// per-thread scratch on each visit. A tile is computed TRANSPOSED,
//     st (tc*K x bi) = w_tile (tc*K x D) . q_block^T,
// with the engine's GEMM, so that every per-class step (softmax over the K centers, pooled S,
// logit, the row LSE over classes, a column LSE over the block's rows) is a plain loop over the bi
// rows of the block. No N x C*K tensor exists; the forward saves O(1) values per row and per class.
//
// Forward: without column reductions, work items are (group of row blocks, chunk of class tiles),
// tiles outer, so a tile is packed once per row group; each item keeps an online LSE per row over
// its tiles (partials: 2 values per row and chunk, at most kFwdClassChunks chunks), merged in chunk
// order. With column reductions (ProxyAnchor), an item is a chunk of class tiles that walks every
// row block in order, so it owns its classes' column statistics. The partition depends on the
// shapes only.
//
// Backward: recomputes each tile with the same GEMM (bitwise the forward's tile), forms dL/ds_ick
// in place, and accumulates grad_w_tile += st . q_block, grad_q_block += st^T . w_tile. The larger
// of (N, C*K) is owned: if C*K >= N, items are chunks of class tiles that own their vectors of
// grad_w and add into one private grad_q buffer per chunk; else chunks of row blocks own grad_q and
// have private grad_w buffers. The private buffers are summed in chunk order. The chunk count
// depends on the shapes only (and on a memory budget), so results do not depend on the thread
// count. The gradient w.r.t. the normalized vectors becomes the weights' own gradient (normalize's
// backward) as each vector is finished, written straight into the weights' layout: no transposed
// or normalized copy of w exists. Extra memory beyond grad_w: O(N D), per-thread tiles, the
// forward's per-chunk row partials, the backward's private buffers (at most kPrivateBudget) and,
// for small weights, their packed copy (at most kPackedWeightsBudget).
//
// Compute type A: double for fp64 inputs, float otherwise (fp16/bf16 are converted to fp32 up
// front, O((N + C*K) D)); gradients are returned in the input dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "common/loss_spec.h"
#include "common/op_checks.h"
#include "cpu/cpu_kernels.h"
#include "cpu/engine_glue.h"

namespace fpl {
namespace cpu {
namespace {

using at::Tensor;

// ---- tile geometry ----------------------------------------------------------------------------
constexpr int64_t kRowBlock = 256;         // BI: rows of q per block (a multiple of every panel width)
constexpr int64_t kTileRows = 512;         // target rows of w per class tile (TC = kTileRows / K)
constexpr int64_t kFwdClassChunks = 64;    // forward: class chunks, at most (each packs its tiles once per row group)
constexpr int64_t kMaxColumnChunks = 256;  // forward with column reductions: class chunks, at most
constexpr int64_t kMinFwdItems = 64;       // forward: rows split into groups until there are this many items
constexpr int64_t kMaxBwdChunks = 8;       // backward private-buffer chunks, at most
constexpr int64_t kPrivateBudget = int64_t(64) << 20;        // bytes of private grad buffers (or 2 chunks), at most
constexpr int64_t kPackedWeightsBudget = int64_t(32) << 20;  // w packed whole up to this many bytes

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Geometry {
  int64_t N, D, Dp, C, K, BI, TC, n_rb, n_ct, ld;
  int64_t rb_begin(int64_t rb) const { return rb * BI; }
  int64_t rb_size(int64_t rb) const { return std::min(BI, N - rb * BI); }
  int64_t ct_begin(int64_t t) const { return t * TC; }  // first class of tile t
  int64_t ct_size(int64_t t) const { return std::min(TC, C - t * TC); }
};

Geometry make_geometry(int64_t N, int64_t D, int64_t Dp, int64_t C, int64_t K) {
  Geometry g;
  g.N = N;
  g.D = D;
  g.Dp = Dp;
  g.C = C;
  g.K = K;
  g.BI = kRowBlock;
  g.TC = std::max<int64_t>(1, kTileRows / K);
  g.n_rb = (N + g.BI - 1) / g.BI;
  g.n_ct = (C + g.TC - 1) / g.TC;
  g.ld = kRowBlock;  // row stride of st (>= bi rounded up to the panel width)
  return g;
}

// [begin, end) of chunk p when n items are split into P contiguous chunks
inline int64_t chunk_begin(int64_t n, int64_t P, int64_t p) { return (n * p) / P; }

// The weights stay as the loss stores them (C*K x D rows or D x C*K columns, never copied when
// they are already in the compute type); a class tile's vectors are packed, normalized, once per
// call (small weights, w_packed) or into per-thread scratch on each visit (O(tck D) against the
// tile's O(tck bi D) GEMM): weight_tile.
template <typename T>
struct Operands {
  const Kernels<T>* K;
  Geometry g;
  Tensor q, q_panels;  // q (N, Dp) zero-padded (q itself if it is); packed in panels (the B operand of every tile GEMM)
  Tensor w;            // the weights in the compute type, laid out as the declaration says
  Tensor w_norm;       // normalize_weights: ||w_r|| and 1 / max(||w_r||, eps) per vector r
  Tensor w_inv_norm;
  Tensor w_packed;  // small weights: every tile packed once per call (weight_tile)
  bool normalize, columns;
  const int64_t* y;
  int64_t CK() const { return g.C * g.K; }
};

int64_t weight_count(const Tensor& w, bool columns) { return columns ? w.size(1) : w.size(0); }

// ||w_r|| with a double sum over d ascending (the same order for both layouts), and its clamped
// inverse (F.normalize: w / max(||w||, eps); NaN stays NaN).
template <typename T>
void weight_norms(const T* w, bool columns, int64_t CK, int64_t D, T* norm, T* inv) {
  glue::parallel_for(0, CK, 4096, [&](int64_t b, int64_t e) {
    std::vector<double> acc(e - b, 0.0);
    if (columns) {
      for (int64_t d = 0; d < D; ++d)
        for (int64_t r = b; r < e; ++r) acc[r - b] += double(w[d * CK + r]) * double(w[d * CK + r]);
    } else {
      for (int64_t r = b; r < e; ++r)
        for (int64_t d = 0; d < D; ++d) acc[r - b] += double(w[r * D + d]) * double(w[r * D + d]);
    }
    for (int64_t r = b; r < e; ++r) {
      norm[r] = static_cast<T>(std::sqrt(acc[r - b]));
      inv[r] = T(1) / std::max(norm[r], static_cast<T>(kNormalizeEps));
    }
  });
}

template <typename T>
Operands<T> prepare(const Tensor& q, const Tensor& w, const Tensor& labels, const ClassSpec<T>& spec) {
  Operands<T> o;
  o.K = &active_kernels<T>();
  o.normalize = spec.normalize_weights;
  o.columns = spec.weights_columns;
  const int64_t D = q.size(1), Dp = round_up(std::max<int64_t>(D, 1), sizeof(T) == 4 ? 16 : 8);
  o.g = make_geometry(q.size(0), D, Dp, weight_count(w, o.columns) / spec.K, spec.K);
  o.q = glue::padded_rows_readonly<T>(q.detach(), Dp);  // read only: the GEMMs' packed copies
  o.w = w.detach().to(c10::CppTypeToScalarType<T>::value).contiguous();
  if (o.normalize) {
    o.w_norm = at::empty({o.CK()}, o.q.options());
    o.w_inv_norm = at::empty({o.CK()}, o.q.options());
    weight_norms(o.w.template data_ptr<T>(), o.columns, o.CK(), D, o.w_norm.template data_ptr<T>(),
                 o.w_inv_norm.template data_ptr<T>());
  }
  const int64_t np = (o.g.N + o.K->nr - 1) / o.K->nr;
  o.q_panels = at::empty({std::max<int64_t>(np, 1) * D * o.K->nr}, o.q.options());
  if (o.g.N > 0) o.K->pack_panels(o.q.template data_ptr<T>(), Dp, o.g.N, D, o.q_panels.template data_ptr<T>());
  o.y = labels.data_ptr<int64_t>();
  return o;
}

// dst[c * ld_dst + r] = src[r * ld_src + c] * col_scale[c] (no scale: a copy) for a rows x cols
// src: the transpose between the weights' D x C*K columns and the tiles' rows, in 16 x 16 blocks.
template <typename T>
void transpose_blocked(const T* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst, int64_t ld_dst,
                       const T* col_scale) {
  constexpr int64_t B = 16;
  T blk[B][B];
  for (int64_t cb = 0; cb < cols; cb += B) {
    const int64_t nc = std::min(B, cols - cb);
    for (int64_t rb = 0; rb < rows; rb += B) {
      const int64_t nr = std::min(B, rows - rb);
      for (int64_t r = 0; r < nr; ++r) {
        const T* in = src + (rb + r) * ld_src + cb;
        for (int64_t c = 0; c < nc; ++c) blk[c][r] = in[c];
      }
      for (int64_t c = 0; c < nc; ++c) {
        T* out = dst + (cb + c) * ld_dst + rb;
        if (col_scale) {
          const T s = col_scale[cb + c];
          for (int64_t r = 0; r < nr; ++r) out[r] = blk[c][r] * s;
        } else {
          std::copy(blk[c], blk[c] + nr, out);
        }
      }
    }
  }
}

// The vectors of class tile t as rows (tck x Dp, zero-padded), normalized if the declaration says
// so: the A operand of the tile's similarities (and, packed in column chunks, the B operand of
// grad_q). The same bits on every visit.
template <typename T>
void pack_weight_tile(const Operands<T>& o, int64_t t, T* dst) {
  const Geometry& g = o.g;
  const int64_t r0 = g.ct_begin(t) * g.K, tck = g.ct_size(t) * g.K, D = g.D, Dp = g.Dp, CK = o.CK();
  const T* w = o.w.template data_ptr<T>();
  const T* inv = o.normalize ? o.w_inv_norm.template data_ptr<T>() + r0 : nullptr;
  if (o.columns) {
    transpose_blocked(w + r0, CK, D, tck, dst, Dp, inv);
  } else {
    for (int64_t r = 0; r < tck; ++r) {
      const T* src = w + (r0 + r) * D;
      T* out = dst + r * Dp;
      if (inv)
        for (int64_t d = 0; d < D; ++d) out[d] = src[d] * inv[r];
      else
        std::copy(src, src + D, out);
    }
  }
  for (int64_t r = 0; r < tck; ++r) std::fill(dst + r * Dp + D, dst + (r + 1) * Dp, T(0));
}

// Every tile packed once, up front, when the packed weights are small (they are then read from
// cache by every row block); else each visit packs its tile (weight_tile).
template <typename T>
void pack_small_weights(Operands<T>& o) {
  const Geometry& g = o.g;
  if (o.CK() * g.Dp * int64_t(sizeof(T)) > kPackedWeightsBudget) return;
  o.w_packed = at::empty({std::max<int64_t>(o.CK() * g.Dp, 1)}, o.q.options());
  T* dst = o.w_packed.template data_ptr<T>();
  glue::parallel_for(0, g.n_ct, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) pack_weight_tile(o, t, dst + g.ct_begin(t) * g.K * g.Dp);
  });
}

// The packed vectors of class tile t: a slice of w_packed, or packed into dst now.
template <typename T>
const T* weight_tile(const Operands<T>& o, int64_t t, T* dst) {
  if (o.w_packed.defined()) return o.w_packed.template data_ptr<T>() + o.g.ct_begin(t) * o.g.K * o.g.Dp;
  pack_weight_tile(o, t, dst);
  return dst;
}

// st (tck x bi) = w_tile . q_block^T (w_tile: weight_tile); the forward and the backward make
// exactly this call.
template <typename T>
void tile_similarities(const Operands<T>& o, const T* w_tile, int64_t rb, int64_t t, T* st) {
  const Geometry& g = o.g;
  const int64_t i0 = g.rb_begin(rb), bi = g.rb_size(rb);
  const int64_t tck = g.ct_size(t) * g.K;
  o.K->gemm_nt(w_tile, g.Dp, o.q_panels.template data_ptr<T>() + (i0 / o.K->nr) * g.D * o.K->nr, tck, bi, g.D, st,
               g.ld);
}

// The weights' gradient for the vectors of class tile t, laid out like w, from G (tck x Dp, row
// stride Dp), the gradient w.r.t. the vectors as the tiles used them (w_tile: weight_tile of t).
// With normalization that is F.normalize's backward: (G - (G . w^) w^) / ||w|| with
// w^ = w / ||w||, and G / eps where the norm is clamped. G is overwritten.
template <typename T>
void finish_weight_grad(const Operands<T>& o, int64_t t, const T* w_tile, T* G, T* out) {
  const Geometry& g = o.g;
  const int64_t r0 = g.ct_begin(t) * g.K, n = g.ct_size(t) * g.K, D = g.D, Dp = g.Dp, CK = o.CK();
  if (o.normalize) {
    const T* norm = o.w_norm.template data_ptr<T>() + r0;
    const T* inv = o.w_inv_norm.template data_ptr<T>() + r0;
    for (int64_t r = 0; r < n; ++r) {
      T* gr = G + r * Dp;
      const T* wh = w_tile + r * Dp;
      if (norm[r] > static_cast<T>(kNormalizeEps)) {
        T dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += gr[d] * wh[d];
        for (int64_t d = 0; d < D; ++d) gr[d] = (gr[d] - dot * wh[d]) * inv[r];
      } else {
        for (int64_t d = 0; d < D; ++d) gr[d] *= inv[r];
      }
    }
  }
  if (o.columns) {
    transpose_blocked(G, Dp, n, D, out + r0, CK, static_cast<const T*>(nullptr));
  } else {
    for (int64_t r = 0; r < n; ++r) std::copy(G + r * Dp, G + r * Dp + D, out + (r0 + r) * D);
  }
}

// loc[i] = y_i - c0 if y_i is a class of tile t, else -1 (also for the padding up to BI)
inline void tile_locations(const Geometry& g, const int64_t* labels, int64_t rb, int64_t t, int32_t* loc) {
  const int64_t i0 = g.rb_begin(rb), bi = g.rb_size(rb);
  const int64_t c0 = g.ct_begin(t), tc = g.ct_size(t);
  for (int64_t i = 0; i < bi; ++i) {
    const int64_t yy = labels[i0 + i] - c0;
    loc[i] = (yy >= 0 && yy < tc) ? static_cast<int32_t>(yy) : -1;
  }
  for (int64_t i = bi; i < g.BI; ++i) loc[i] = -1;
}

// a block's slice of a per-row array, zero-padded to BI entries (the kernels read whole vectors)
template <typename T>
const T* stage_rows(const T* src, int64_t i0, int64_t bi, int64_t BI, std::vector<T>& buf) {
  std::copy(src + i0, src + i0 + bi, buf.begin());
  std::fill(buf.begin() + bi, buf.begin() + BI, T(0));
  return buf.data();
}

template <typename T>
struct Scratch {
  std::vector<T> st, w_tile, work, row_max, row_sum, ts, cmax, csum, g_row, g_ts, lse;
  std::vector<int32_t> loc;
  explicit Scratch(const Geometry& g)
      : st(g.TC * g.K * g.ld),
        w_tile(g.TC * g.K * g.Dp),
        work((g.TC + 1) * g.BI + 16 * g.K),
        row_max(g.BI),
        row_sum(g.BI),
        ts(g.BI),
        cmax(2 * g.TC),
        csum(2 * g.TC),
        g_row(g.BI),
        g_ts(g.BI),
        lse(g.BI),
        loc(g.BI) {}
  ClassTile<T> tile(const Geometry& g, int64_t rb, int64_t t) {
    ClassTile<T> a{};
    a.st = st.data();
    a.ld = g.ld;
    a.tc = static_cast<int>(g.ct_size(t));
    a.bi = static_cast<int>(g.rb_size(rb));
    a.loc = loc.data();
    a.row_max = row_max.data();
    a.row_sum = row_sum.data();
    a.target_sim = ts.data();
    a.col_max[0] = cmax.data();
    a.col_max[1] = cmax.data() + g.TC;
    a.col_sum[0] = csum.data();
    a.col_sum[1] = csum.data() + g.TC;
    a.scratch = work.data();
    return a;
  }
};

// merge a partial (max, sum) of an online log-sum-exp into a running one (NaN sticks)
template <typename T>
inline void lse_merge(T& max, T& sum, T omax, T osum) {
  if (osum != osum || sum != sum) {
    sum = (osum != osum) ? osum : sum;
    return;
  }
  if (osum == T(0)) return;
  if (sum == T(0)) {
    max = omax;
    sum = osum;
    return;
  }
  if (omax > max) {
    sum = sum * std::exp(max - omax) + osum;
    max = omax;
  } else {
    sum += osum * std::exp(omax - max);
  }
}

template <typename T>
T lse_value(T max, T sum) {
  if (sum != sum) return sum;
  return sum > T(0) ? max + std::log(sum) : -std::numeric_limits<T>::infinity();
}

// ---- forward ------------------------------------------------------------------------------------
template <typename T>
void forward_kernel(const Operands<T>& o, const ClassSpec<T>& spec, bool columns, T* row_lse, T* target_sim,
                    T* col_lse_pos, T* col_lse_neg) {
  const Geometry& g = o.g;
  const int64_t N = g.N;
  if (N == 0 || g.C == 0) return;
  // Items: (group of row blocks, chunk of class tiles). An item walks its tiles in order, packs
  // each once, and runs it against its row blocks, keeping per row an online LSE over its chunk
  // (part_max / part_sum); the chunks' partials are merged in chunk order. With columns each item
  // holds every row block, so it owns its classes' column statistics; else the rows are split
  // into groups when there are few class chunks, so that there are enough items for the threads.
  const int64_t n_cc = std::min<int64_t>(g.n_ct, columns ? kMaxColumnChunks : kFwdClassChunks);
  const int64_t n_rg = columns ? 1 : std::clamp<int64_t>((kMinFwdItems + n_cc - 1) / n_cc, 1, g.n_rb);
  std::vector<T> part_max(n_cc * N, -std::numeric_limits<T>::infinity()), part_sum(n_cc * N, T(0));
  std::vector<T> cmax(columns ? 2 * g.C : 0, -std::numeric_limits<T>::infinity());
  std::vector<T> csum(columns ? 2 * g.C : 0, T(0));

  glue::parallel_for(0, n_rg * n_cc, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc(g);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t cc = item % n_cc, rg = item / n_cc;
      const int64_t rb_lo = chunk_begin(g.n_rb, n_rg, rg), rb_hi = chunk_begin(g.n_rb, n_rg, rg + 1);
      const int64_t t_lo = chunk_begin(g.n_ct, n_cc, cc), t_hi = chunk_begin(g.n_ct, n_cc, cc + 1);
      T* pmax = part_max.data() + cc * N;
      T* psum = part_sum.data() + cc * N;
      for (int64_t t = t_lo; t < t_hi; ++t) {
        const T* wt = weight_tile(o, t, sc.w_tile.data());
        for (int64_t rb = rb_lo; rb < rb_hi; ++rb) {
          const int64_t i0 = g.rb_begin(rb), bi = g.rb_size(rb);
          tile_similarities(o, wt, rb, t, sc.st.data());
          tile_locations(g, o.y, rb, t, sc.loc.data());
          ClassTile<T> a = sc.tile(g, rb, t);
          o.K->class_forward(spec, a);
          if (spec.row.lse)
            for (int64_t i = 0; i < bi; ++i) lse_merge(pmax[i0 + i], psum[i0 + i], sc.row_max[i], sc.row_sum[i]);
          for (int64_t i = 0; i < bi; ++i)  // the one tile holding y_i gives target_sim_i
            if (sc.loc[i] >= 0) target_sim[i0 + i] = sc.ts[i];
          if (columns) {
            const int64_t c0 = g.ct_begin(t);
            for (int s = 0; s < 2; ++s)
              for (int64_t c = 0; c < a.tc; ++c)
                lse_merge(cmax[s * g.C + c0 + c], csum[s * g.C + c0 + c], a.col_max[s][c], a.col_sum[s][c]);
          }
        }
      }
    }
  });
  glue::parallel_for(0, N, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T m = -std::numeric_limits<T>::infinity(), s = T(0);
      for (int64_t cc = 0; cc < n_cc; ++cc) lse_merge(m, s, part_max[cc * N + i], part_sum[cc * N + i]);
      row_lse[i] = !spec.row.lse ? -std::numeric_limits<T>::infinity() : spec.row_softplus ? s : lse_value(m, s);
    }
  });
  if (columns)
    for (int64_t c = 0; c < g.C; ++c) {
      col_lse_pos[c] = lse_value(cmax[c], csum[c]);
      col_lse_neg[c] = lse_value(cmax[g.C + c], csum[g.C + c]);
    }
}

// ---- backward -----------------------------------------------------------------------------------
template <typename T>
void backward_kernel(const Operands<T>& o, const ClassSpec<T>& spec, const T* g_row_lse, const T* g_ts,
                     const T* row_lse, const T* g_col_pos, const T* g_col_neg, const T* col_pos, const T* col_neg,
                     bool need_grad_w, T* gq, T* gw_out) {
  const Geometry& g = o.g;
  const int64_t N = g.N, Dp = g.Dp, CK = o.CK(), TCK = g.TC * g.K;
  if (N == 0 || CK == 0) return;
  // q in column chunks: the B operand of grad_w += st . q_block
  const Tensor q_cols = at::empty({std::max<int64_t>(o.q.numel(), 1)}, o.q.options());
  o.K->pack_cols(o.q.template data_ptr<T>(), Dp, N, Dp, q_cols.template data_ptr<T>());
  const T* qc = q_cols.template data_ptr<T>();
  // Own the larger side. Owning classes, a chunk accumulates a tile's grad_w over every row block
  // in scratch and finishes it (finish_weight_grad) when the tile is done; grad_q goes to one
  // private buffer per chunk. Owning rows, the chunks' private grad_w buffers (in the tiles'
  // vector space) are summed and finished at the end. Never a grad_w buffer when it is not needed.
  const bool own_classes = need_grad_w && CK >= N;
  const int64_t n_owned = own_classes ? g.n_ct : g.n_rb;
  const int64_t private_rows = own_classes ? N : CK;
  const int64_t bytes_per_buffer = std::max<int64_t>(1, private_rows * Dp * int64_t(sizeof(T)));
  int64_t P = std::min<int64_t>(n_owned, kMaxBwdChunks);
  // within the budget, but always 2 chunks where there are 2 (one buffer more than the gradient itself)
  if (need_grad_w) P = std::min(P, std::max<int64_t>(2, kPrivateBudget / bytes_per_buffer));
  auto opts = o.q.options();
  std::vector<Tensor> priv(P);
  for (int64_t p = 0; p < P && need_grad_w; ++p)
    if (p > 0 || !own_classes) priv[p] = at::zeros({private_rows, Dp}, opts);

  glue::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc(g);
    std::vector<T> w_cols(TCK * Dp), gw_tile(own_classes ? TCK * Dp : 0);
    for (int64_t p = begin; p < end; ++p) {
      T* gq_dst = (own_classes && p > 0) ? priv[p].template data_ptr<T>() : gq;
      T* gw_rows = (!own_classes && need_grad_w) ? priv[p].template data_ptr<T>() : nullptr;
      int64_t packed = -1;  // the class tile now in wt / w_cols
      const T* wt = nullptr;
      auto do_tile = [&](int64_t rb, int64_t t) {
        const int64_t i0 = g.rb_begin(rb), bi = g.rb_size(rb);
        const int64_t c0 = g.ct_begin(t), r0 = c0 * g.K, tck = g.ct_size(t) * g.K;
        if (packed != t) {
          wt = weight_tile(o, t, sc.w_tile.data());
          o.K->pack_cols(wt, Dp, tck, Dp, w_cols.data());
          packed = t;
        }
        tile_similarities(o, wt, rb, t, sc.st.data());
        tile_locations(g, o.y, rb, t, sc.loc.data());
        ClassTile<T> a = sc.tile(g, rb, t);
        a.g_row_lse = stage_rows(g_row_lse, i0, bi, g.BI, sc.g_row);
        a.g_target_sim = stage_rows(g_ts, i0, bi, g.BI, sc.g_ts);
        a.row_lse = stage_rows(row_lse, i0, bi, g.BI, sc.lse);
        a.g_col_lse[0] = g_col_pos ? g_col_pos + c0 : nullptr;
        a.g_col_lse[1] = g_col_neg ? g_col_neg + c0 : nullptr;
        a.col_lse[0] = col_pos ? col_pos + c0 : nullptr;
        a.col_lse[1] = col_neg ? col_neg + c0 : nullptr;
        o.K->class_backward(spec, a);  // st := dL/ds (tck x bi)
        if (own_classes)
          o.K->gemm_nn_acc(sc.st.data(), g.ld, qc, N, i0, tck, Dp, bi, gw_tile.data(), Dp);
        else if (gw_rows)
          o.K->gemm_nn_acc(sc.st.data(), g.ld, qc, N, i0, tck, Dp, bi, gw_rows + r0 * Dp, Dp);
        o.K->gemm_tn_acc(sc.st.data(), g.ld, w_cols.data(), tck, 0, bi, Dp, tck, gq_dst + i0 * Dp, Dp);
      };
      const int64_t o_begin = chunk_begin(n_owned, P, p), o_end = chunk_begin(n_owned, P, p + 1);
      if (own_classes) {
        for (int64_t t = o_begin; t < o_end; ++t) {
          const int64_t tck = g.ct_size(t) * g.K;
          std::fill(gw_tile.begin(), gw_tile.begin() + tck * Dp, T(0));
          for (int64_t rb = 0; rb < g.n_rb; ++rb) do_tile(rb, t);
          finish_weight_grad(o, t, wt, gw_tile.data(), gw_out);
        }
      } else {  // tiles outer (each packed once per chunk); per row, t ascending all the same
        for (int64_t t = 0; t < g.n_ct; ++t)
          for (int64_t rb = o_begin; rb < o_end; ++rb) do_tile(rb, t);
      }
    }
  });
  if (!need_grad_w) return;
  // the private buffers, summed in chunk order: deterministic
  T* shared = own_classes ? gq : priv[0].template data_ptr<T>();
  const int64_t n = private_rows * Dp;
  for (int64_t p = 1; p < P; ++p) {
    const T* src = priv[p].template data_ptr<T>();
    glue::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) shared[k] += src[k];
    });
  }
  if (!own_classes)
    glue::parallel_for(0, g.n_ct, 1, [&](int64_t b, int64_t e) {
      std::vector<T> w_tile(TCK * Dp);
      for (int64_t t = b; t < e; ++t)
        finish_weight_grad(o, t, weight_tile(o, t, w_tile.data()), shared + g.ct_begin(t) * g.K * Dp, gw_out);
    });
}

// ---- op entry points ----------------------------------------------------------------------------
void check_inputs(const Tensor& q, const Tensor& w, const Tensor& labels, int64_t K, c10::ArrayRef<double> terms,
                  int64_t flags) {
  TORCH_CHECK(q.device().is_cpu() && w.device().is_cpu() && labels.device().is_cpu(),
              "class_engine (cpu): tensors must be on the CPU");
  check_class_operands(q, w, labels, K, terms, flags);
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "class_engine: q must be floating point, got ", q.scalar_type());
  const int64_t CK = weight_count(w, flags & kWeightsColumns);
  const int64_t C = CK / K;
  const Tensor lab = labels.contiguous();
  const int64_t* y = lab.data_ptr<int64_t>();
  for (int64_t i = 0; i < lab.numel(); ++i)
    TORCH_CHECK(y[i] >= 0 && y[i] < C, "class_engine: label ", y[i], " of row ", i, " is out of range for ", C,
                " classes");
}

at::ScalarType compute_type(const Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<Tensor, Tensor> class_engine_forward_cpu(const Tensor& q, const Tensor& w, const Tensor& labels, int64_t K,
                                                    c10::ArrayRef<double> terms, int64_t flags) {
  check_inputs(q, w, labels, K, terms, flags);
  const at::ScalarType A = compute_type(q);
  const int64_t N = q.size(0), C = weight_count(w, flags & kWeightsColumns) / K;
  const Tensor lab = labels.contiguous();
  Tensor rows = at::full({kNumClassRowValues, N}, -std::numeric_limits<double>::infinity(), q.options().dtype(A));
  Tensor cols = at::full({kNumClassColValues, C}, -std::numeric_limits<double>::infinity(), q.options().dtype(A));
  rows[kRowTargetSim].zero_();
  const bool columns = flags & (kColPosLse | kColNegLse);
  auto run = [&](auto zero) {
    using T = decltype(zero);
    const auto spec = decode_class_spec<T>(terms.data(), flags, K);
    Operands<T> o = prepare<T>(q, w, lab, spec);
    pack_small_weights(o);
    forward_kernel(o, spec, columns, rows[kRowLseOther].template data_ptr<T>(),
                   rows[kRowTargetSim].template data_ptr<T>(), cols[kColLsePos].template data_ptr<T>(),
                   cols[kColLseNeg].template data_ptr<T>());
  };
  if (A == at::kDouble)
    run(0.0);
  else
    run(0.0f);
  if (!(flags & kRowLse)) rows[kRowLseOther].fill_(-std::numeric_limits<double>::infinity());
  if (!(flags & kColPosLse)) cols[kColLsePos].fill_(-std::numeric_limits<double>::infinity());
  if (!(flags & kColNegLse)) cols[kColLseNeg].fill_(-std::numeric_limits<double>::infinity());
  return {rows, cols};
}

std::tuple<Tensor, Tensor> class_engine_backward_cpu(const Tensor& grad_rows, const Tensor& grad_cols, const Tensor& q,
                                                     const Tensor& w, const Tensor& labels, const Tensor& rows,
                                                     const Tensor& cols, int64_t K, c10::ArrayRef<double> terms,
                                                     int64_t flags, bool need_grad_w) {
  check_inputs(q, w, labels, K, terms, flags);
  const int64_t N = q.size(0), C = weight_count(w, flags & kWeightsColumns) / K;
  const at::ScalarType A = compute_type(q);
  auto stats = [&](const Tensor& t, int64_t r, int64_t n, const char* name) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == r && t.size(1) == n, "class_engine_backward: ", name, " must have shape (",
                r, ", ", n, "), got ", t.sizes());
    return t.to(A).contiguous();
  };
  const Tensor gr = stats(grad_rows, kNumClassRowValues, N, "grad_rows");
  const Tensor gc = stats(grad_cols, kNumClassColValues, C, "grad_cols");
  const Tensor rv = stats(rows, kNumClassRowValues, N, "rows");
  const Tensor cv = stats(cols, kNumClassColValues, C, "cols");
  const Tensor lab = labels.contiguous();
  const int64_t D = q.size(1);
  Tensor grad_q, grad_w;
  auto run = [&](auto zero) {
    using T = decltype(zero);
    const auto spec = decode_class_spec<T>(terms.data(), flags, K);
    Operands<T> o = prepare<T>(q, w, lab, spec);
    pack_small_weights(o);
    Tensor gq = at::zeros({N, o.g.Dp}, o.q.options());
    // every vector's gradient is written by finish_weight_grad, unless there are no rows
    Tensor gw = !need_grad_w ? o.q.new_empty({0})
                : N == 0     ? at::zeros(w.sizes(), o.q.options())
                             : at::empty(w.sizes(), o.q.options());
    const bool cp = flags & kColPosLse, cn = flags & kColNegLse;
    backward_kernel(o, spec, gr[kRowLseOther].template data_ptr<T>(), gr[kRowTargetSim].template data_ptr<T>(),
                    rv[kRowLseOther].template data_ptr<T>(), cp ? gc[kColLsePos].template data_ptr<T>() : nullptr,
                    cn ? gc[kColLseNeg].template data_ptr<T>() : nullptr,
                    cp ? cv[kColLsePos].template data_ptr<T>() : nullptr,
                    cn ? cv[kColLseNeg].template data_ptr<T>() : nullptr, need_grad_w, gq.template data_ptr<T>(),
                    need_grad_w ? gw.template data_ptr<T>() : nullptr);
    grad_q = gq.narrow(1, 0, D).to(q.scalar_type()).contiguous();
    grad_w = need_grad_w ? gw.to(w.scalar_type()) : q.new_empty({0});
  };
  if (A == at::kDouble)
    run(0.0);
  else
    run(0.0f);
  return {grad_q, grad_w};
}

}  // namespace
}  // namespace cpu
}  // namespace fpl

TORCH_LIBRARY_IMPL(fused_pairloss, CPU, m) {
  m.impl("class_engine_forward", &fpl::cpu::class_engine_forward_cpu);
  m.impl("class_engine_backward", &fpl::cpu::class_engine_backward_cpu);
}
