// Host glue of the CUDA engines, written with device-agnostic ATen calls only: checks the op's
// arguments, prepares the kernels' operands, allocates the outputs and calls the plain launchers
// of launchers.h. Used by ops_cuda.cpp (the CUDA kernels of the four fused ops, on the current
// PyTorch stream) and by the emulation build (emu/emu_ops.cpp: the same glue around the kernels
// compiled as plain C++, on CPU tensors), so the tests exercise this file too.
//
// Pair engine operands: when the declaration defers its positives (mining, NTXent: spec.h
// defer_positives) the rows of q and r are label-sorted copies (stable sort: the same permutation
// in forward and backward), so that the positives of a block of rows are one band of column tiles
// (pair_engine.cu); the kernels read and write statistics and gradient rows through the
// permutations, so the op's outputs are in the caller's order. Extra memory O((N + M) D).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "common/loss_spec.h"
#include "common/op_checks.h"
#include "cuda/launchers.h"

namespace fpl_cuda_glue {

using at::Tensor;

// How the launchers run: on which stream, and how a CUDA error reads.
struct Runtime {
  const char* backend;  // "cuda" / "cuda emulation", for messages
  cudaStream_t stream;
  const char* (*error_string)(cudaError_t);
};

inline fpl_cuda::DType dtype_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return fpl_cuda::DType::kFloat32;
    case at::kDouble:
      return fpl_cuda::DType::kFloat64;
    case at::kHalf:
      return fpl_cuda::DType::kFloat16;
    case at::kBFloat16:
      return fpl_cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "fused_pairloss (cuda): embeddings must be float32, float64, float16 or bfloat16; got ",
                  t.scalar_type());
  }
}

inline at::ScalarType stat_type(const Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_launch(const Runtime& rt, cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fused_pairloss (", rt.backend, "): ", what, " failed: ", rt.error_string(err));
}

// 16-byte vector loads: every row starts 16-byte aligned.
inline bool can_vec16(const Tensor& a, const Tensor& b) {
  auto aligned = [](const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
  return (a.size(1) * a.element_size()) % 16 == 0 && aligned(a) && aligned(b);
}

inline void check_same_device(const Tensor& t, const Tensor& like, const char* name) {
  TORCH_CHECK(t.device() == like.device(), "fused_pairloss (cuda): ", name, " must be on ", like.device(),
              " like q; got ", t.device());
}

// A launch over n owned rows (or classes), per_cta of them per CTA, must fit CUDA's gridDim.x.
inline void check_grid(int64_t n, int64_t per_cta, const char* what) {
  const int64_t ctas = (n + per_cta - 1) / per_cta;
  TORCH_CHECK(ctas <= fpl_cuda::kMaxGridX, "fused_pairloss (cuda): ", what, " = ", n, " needs ", ctas, " CTAs of ",
              per_cta, ", more than CUDA's grid limit of ", fpl_cuda::kMaxGridX, " (gridDim.x); the limit is ",
              fpl_cuda::kMaxGridX * per_cta);
}

// ---- pair engine -------------------------------------------------------------------------------
inline void check_pair_inputs(const Tensor& q, const std::optional<Tensor>& r, const Tensor& labels_q,
                              const std::optional<Tensor>& labels_r, const std::optional<Tensor>& exclude_col,
                              const std::optional<Tensor>& row_shift, c10::ArrayRef<double> terms, int64_t flags) {
  fpl::check_pair_operands(q, r, labels_q, labels_r, exclude_col, terms, flags);
  fpl::check_row_shift(q, row_shift);
  dtype_code(q);
  TORCH_CHECK(labels_q.scalar_type() == at::kLong, "pair_engine: labels_q must be int64, got ", labels_q.scalar_type());
  check_same_device(labels_q, q, "labels_q");
  if (r.has_value()) {
    TORCH_CHECK(labels_r->scalar_type() == at::kLong, "pair_engine: labels_r must be int64, got ",
                labels_r->scalar_type());
    check_same_device(*r, q, "r");
    check_same_device(*labels_r, q, "labels_r");
  }
  // exclude_col values outside [-1, M) exclude nothing (checking them would cost a device sync per call)
  if (exclude_col.has_value()) check_same_device(*exclude_col, q, "exclude_col");
  check_grid(q.size(0), fpl_cuda::kCtaRows, "N (rows of q)");
  if (r.has_value()) check_grid(r->size(0), fpl_cuda::kCtaRows, "M (rows of r)");
}

// The kernels' operands (launchers.h PairOperands) and the tensors that hold them.
struct PairPrep {
  Tensor q, r, lq, lr, excl, band_lo, band_hi, perm_q, perm_r, nq, nr, shift;
  bool self_mode = true;
  int64_t N = 0, M = 0, D = 0;

  fpl_cuda::PairOperands operands() const {
    auto ptr = [](const Tensor& t) -> const void* { return t.defined() ? t.data_ptr() : nullptr; };
    auto iptr = [](const Tensor& t) -> const int64_t* { return t.defined() ? t.data_ptr<int64_t>() : nullptr; };
    fpl_cuda::PairOperands o{};
    o.dt = dtype_code(q);
    o.q = ptr(q);
    o.r = ptr(r);
    o.labels_q = iptr(lq);
    o.labels_r = iptr(lr);
    o.exclude_col = iptr(excl);
    o.band_lo = iptr(band_lo);
    o.band_hi = iptr(band_hi);
    o.perm_q = iptr(perm_q);
    o.perm_r = iptr(perm_r);
    o.norm_q = ptr(nq);
    o.norm_r = ptr(nr);
    o.row_shift = ptr(shift);
    o.N = N;
    o.M = M;
    o.D = D;
    o.self_mode = self_mode;
    o.vec16 = N > 0 && M > 0 && can_vec16(q, r);
    return o;
  }
};

inline Tensor stable_sort_perm(const Tensor& labels) {
  return std::get<1>(at::sort(labels, /*stable=*/true, /*dim=*/0, /*descending=*/false)).contiguous();
}

inline PairPrep prepare_pair(const Tensor& q_in, const std::optional<Tensor>& r_in, const Tensor& labels_q,
                             const std::optional<Tensor>& labels_r, const std::optional<Tensor>& exclude_col,
                             const std::optional<Tensor>& row_shift, int64_t flags) {
  PairPrep p;
  p.self_mode = !r_in.has_value();
  const Tensor q = q_in.contiguous(), lq = labels_q.contiguous();
  p.N = q.size(0);
  p.D = q.size(1);
  p.M = p.self_mode ? p.N : r_in->size(0);
  const bool defer = flags & (fpl::kMine | fpl::kPosVsNegLse);  // PairSpec::defer_positives
  if (!defer) {
    p.q = q;
    p.lq = lq;
    if (!p.self_mode) {
      p.r = r_in->contiguous();
      p.lr = labels_r->contiguous();
      if (exclude_col.has_value()) p.excl = exclude_col->contiguous();
    }
  } else {
    p.perm_q = stable_sort_perm(lq);
    p.q = q.index_select(0, p.perm_q);
    p.lq = lq.index_select(0, p.perm_q);
    if (!p.self_mode) {
      p.perm_r = stable_sort_perm(labels_r->contiguous());
      p.r = r_in->contiguous().index_select(0, p.perm_r);
      p.lr = labels_r->contiguous().index_select(0, p.perm_r);
      if (exclude_col.has_value()) {  // the excluded column in the sorted order of r
        const Tensor e = exclude_col->contiguous().index_select(0, p.perm_q);
        if (p.M > 0) {
          Tensor inv_r = at::empty_like(p.perm_r);
          inv_r.index_copy_(0, p.perm_r, at::arange(p.M, p.perm_r.options()));
          const Tensor valid = e.ge(0).logical_and(e.lt(p.M));
          const Tensor ec = at::where(valid, e, at::zeros_like(e));
          p.excl = at::where(valid, inv_r.index_select(0, ec), at::full_like(e, -1)).contiguous();
        } else {
          p.excl = at::full_like(e, -1);
        }
      }
    }
    const Tensor& lr_sorted = p.self_mode ? p.lq : p.lr;
    p.band_lo = at::searchsorted(lr_sorted, p.lq, /*out_int32=*/false, /*right=*/false).contiguous();
    p.band_hi = at::searchsorted(lr_sorted, p.lq, /*out_int32=*/false, /*right=*/true).contiguous();
  }
  if (p.self_mode) {
    p.r = p.q;
    p.lr = p.lq;
    p.perm_r = p.perm_q;
  }
  if (flags & fpl::kLpDistance) {  // squared norms of the operand rows, in the stat dtype
    const auto A = stat_type(q);
    p.nq = p.q.to(A).square().sum(1).contiguous();
    p.nr = p.self_mode ? p.nq : p.r.to(A).square().sum(1).contiguous();
  }
  // in the op's row order: the kernels read it at mapped_row, as the row statistics
  if (row_shift.has_value()) p.shift = row_shift->detach().to(stat_type(q)).contiguous();
  return p;
}

inline std::tuple<Tensor, Tensor, Tensor> pair_forward(const Runtime& rt, const Tensor& q,
                                                       const std::optional<Tensor>& r, const Tensor& labels_q,
                                                       const std::optional<Tensor>& labels_r,
                                                       const std::optional<Tensor>& exclude_col,
                                                       c10::ArrayRef<double> terms, int64_t flags,
                                                       const std::optional<Tensor>& row_shift) {
  check_pair_inputs(q, r, labels_q, labels_r, exclude_col, row_shift, terms, flags);
  const PairPrep p = prepare_pair(q, r, labels_q, labels_r, exclude_col, row_shift, flags);
  const auto opts = q.options().dtype(stat_type(q));
  const int64_t hist_rows = 2 * static_cast<int64_t>(terms[fpl::kHistTerms]);
  // histograms: their rows and the second thread's scratch copy start at zero (the kernel adds)
  Tensor values = hist_rows > 0 ? at::zeros({fpl::kNumPairValues + hist_rows, p.N}, opts)
                                : at::empty({fpl::kNumPairValues, p.N}, opts);
  Tensor counts = at::empty({fpl::kNumPairCounts, p.N}, opts.dtype(at::kInt));
  Tensor aux = at::empty({fpl::kNumPairAux, p.N}, opts);
  Tensor hist_scratch = hist_rows > 0 ? at::zeros({hist_rows, p.N}, opts) : Tensor();
  if (p.N > 0) {
    check_launch(
        rt,
        fpl_cuda::pair_forward(p.operands(), terms.data(), flags, values.data_ptr(), counts.data_ptr<int32_t>(),
                               aux.data_ptr(), hist_rows > 0 ? hist_scratch.data_ptr() : nullptr, rt.stream),
        "pair_engine_forward");
    if (hist_rows > 0) values.narrow(0, fpl::kNumPairValues, hist_rows).add_(hist_scratch);
  }
  return {values, counts, aux};
}

inline std::tuple<Tensor, Tensor> pair_backward(const Runtime& rt, const Tensor& grad_values, const Tensor& q,
                                                const std::optional<Tensor>& r, const Tensor& labels_q,
                                                const std::optional<Tensor>& labels_r,
                                                const std::optional<Tensor>& exclude_col, const Tensor& values,
                                                const Tensor& aux, c10::ArrayRef<double> terms, int64_t flags,
                                                bool need_grad_r, const std::optional<Tensor>& row_shift) {
  check_pair_inputs(q, r, labels_q, labels_r, exclude_col, row_shift, terms, flags);
  const int64_t N = q.size(0);
  const auto A = stat_type(q);
  auto stats = [&](const Tensor& t, int64_t rows, const char* name) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == N, "pair_engine_backward: ", name,
                " must have shape (", rows, ", ", N, "), got ", t.sizes());
    check_same_device(t, q, name);
    return t.to(A).contiguous();
  };
  const int64_t value_rows = fpl::kNumPairValues + 2 * static_cast<int64_t>(terms[fpl::kHistTerms]);
  Tensor gv = stats(grad_values, value_rows, "grad_values").clone();
  const Tensor vals = stats(values, value_rows, "values");
  const Tensor ax = stats(aux, fpl::kNumPairAux, "aux");
  if (flags & fpl::kPosVsNegLse)  // NTXent: d(pair terms)/d(lse_neg) joins the gradient of lse_neg
    gv[fpl::kLseNeg].add_(gv[fpl::kPosVsNeg] * ax[fpl::kPosVsNegDLse]);
  const PairPrep p = prepare_pair(q, r, labels_q, labels_r, exclude_col, row_shift, flags);
  const bool want_r = !p.self_mode && need_grad_r;
  const auto opts = q.options().dtype(A);
  Tensor gq = at::zeros({p.N, p.D}, opts);
  Tensor gr = want_r ? at::zeros({p.M, p.D}, opts) : Tensor();
  if (p.N > 0) {
    check_launch(rt,
                 fpl_cuda::pair_backward(p.operands(), terms.data(), flags, gv.data_ptr(), vals.data_ptr(),
                                         ax.data_ptr(), gq.data_ptr(), want_r ? gr.data_ptr() : nullptr, rt.stream),
                 "pair_engine_backward");
  }
  Tensor grad_q = gq.to(q.scalar_type()).contiguous();
  Tensor grad_r = want_r ? gr.to(r->scalar_type()).contiguous() : q.new_empty({0});
  return {grad_q, grad_r};
}

// ---- class engine ------------------------------------------------------------------------------
inline void check_class_inputs(const Tensor& q, const Tensor& w, const Tensor& labels, int64_t K,
                               c10::ArrayRef<double> terms, int64_t flags) {
  TORCH_CHECK(!(flags & fpl::kWeightOperandFlags),
              "class_engine (cuda): takes w as normalized rows (C*K, D); the weight-operand flags are applied by "
              "fused_pairloss.ops.engines.class_stats");
  fpl::check_class_operands(q, w, labels, K, terms, flags);
  dtype_code(q);
  TORCH_CHECK(K <= fpl_cuda::kMaxCentersPerClass, "class_engine (cuda): centers_per_class must be at most ",
              fpl_cuda::kMaxCentersPerClass, " (a tile holds whole classes), got ", K,
              "; use backend='cpu' or 'triton' for more");
  // label values are compared with class indices only: out-of-range labels (the Python layer
  // checks them) give target_sim = NaN, never a bad memory access
  check_same_device(w, q, "w");
  check_same_device(labels, q, "labels");
  check_grid(q.size(0), fpl_cuda::kCtaRows, "N (rows of q)");
  check_grid(w.size(0) / K, std::max<int64_t>(1, fpl_cuda::kCtaRows / K), "C (classes)");
}

inline fpl_cuda::ClassOperands class_operands(const Tensor& q, const Tensor& w, const Tensor& labels, int64_t K) {
  fpl_cuda::ClassOperands o{};
  o.dt = dtype_code(q);
  o.q = q.data_ptr();
  o.w = w.data_ptr();
  o.labels = labels.data_ptr<int64_t>();
  o.N = q.size(0);
  o.K = K;
  o.C = w.size(0) / K;
  o.D = q.size(1);
  o.vec16 = o.N > 0 && w.size(0) > 0 && can_vec16(q, w);
  return o;
}

inline std::tuple<Tensor, Tensor> class_forward(const Runtime& rt, const Tensor& q_in, const Tensor& w_in,
                                                const Tensor& labels_in, int64_t K, c10::ArrayRef<double> terms,
                                                int64_t flags) {
  check_class_inputs(q_in, w_in, labels_in, K, terms, flags);
  const Tensor q = q_in.contiguous(), w = w_in.contiguous(), labels = labels_in.contiguous();
  const int64_t N = q.size(0), C = w.size(0) / K;
  const auto opts = q.options().dtype(stat_type(q));
  Tensor rows = at::full({fpl::kNumClassRowValues, N}, -std::numeric_limits<double>::infinity(), opts);
  rows[fpl::kRowTargetSim].fill_(std::numeric_limits<double>::quiet_NaN());
  Tensor cols = at::full({fpl::kNumClassColValues, C}, -std::numeric_limits<double>::infinity(), opts);
  check_launch(rt,
               fpl_cuda::class_forward(class_operands(q, w, labels, K), terms.data(), flags, rows.data_ptr(),
                                       cols.data_ptr(), rt.stream),
               "class_engine_forward");
  return {rows, cols};
}

inline std::tuple<Tensor, Tensor> class_backward(const Runtime& rt, const Tensor& grad_rows, const Tensor& grad_cols,
                                                 const Tensor& q_in, const Tensor& w_in, const Tensor& labels_in,
                                                 const Tensor& rows, const Tensor& cols, int64_t K,
                                                 c10::ArrayRef<double> terms, int64_t flags, bool need_grad_w) {
  check_class_inputs(q_in, w_in, labels_in, K, terms, flags);
  const Tensor q = q_in.contiguous(), w = w_in.contiguous(), labels = labels_in.contiguous();
  const int64_t N = q.size(0), C = w.size(0) / K, D = q.size(1);
  const auto A = stat_type(q);
  auto stats = [&](const Tensor& t, int64_t r, int64_t n, const char* name) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == r && t.size(1) == n, "class_engine_backward: ", name, " must have shape (",
                r, ", ", n, "), got ", t.sizes());
    check_same_device(t, q, name);
    return t.to(A).contiguous();
  };
  const Tensor gr = stats(grad_rows, fpl::kNumClassRowValues, N, "grad_rows");
  const Tensor gc = stats(grad_cols, fpl::kNumClassColValues, C, "grad_cols");
  const Tensor rv = stats(rows, fpl::kNumClassRowValues, N, "rows");
  const Tensor cv = stats(cols, fpl::kNumClassColValues, C, "cols");
  const auto opts = q.options().dtype(A);
  Tensor gq = at::zeros({N, D}, opts);
  Tensor gw = need_grad_w ? at::zeros({w.size(0), D}, opts) : Tensor();
  check_launch(rt,
               fpl_cuda::class_backward(class_operands(q, w, labels, K), terms.data(), flags, gr.data_ptr(),
                                        gc.data_ptr(), rv.data_ptr(), cv.data_ptr(), gq.data_ptr(),
                                        need_grad_w ? gw.data_ptr() : nullptr, rt.stream),
               "class_engine_backward");
  Tensor grad_q = gq.to(q.scalar_type()).contiguous();
  Tensor grad_w = need_grad_w ? gw.to(w.scalar_type()).contiguous() : q.new_empty({0});
  return {grad_q, grad_w};
}

// ---- all-triplets engine (triplet_engine.cu) ----------------------------------------------------
inline void check_triplet_inputs(const Tensor& q, const Tensor& r, const Tensor& labels_q, const Tensor& labels_r,
                                 const Tensor& exclude_col) {
  fpl::check_triplet_operands(q, r, labels_q, labels_r, exclude_col);
  dtype_code(q);
  TORCH_CHECK(labels_q.scalar_type() == at::kLong && labels_r.scalar_type() == at::kLong &&
                  exclude_col.scalar_type() == at::kLong,
              "triplet_engine: labels_q, labels_r and exclude_col must be int64");
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{r, "r"},
                                {labels_q, "labels_q"},
                                {labels_r, "labels_r"},
                                {exclude_col, "exclude_col"}})
    check_same_device(t, q, name);
  check_grid(q.size(0), fpl_cuda::kCtaRows, "N (rows of q)");
  check_grid(r.size(0), fpl_cuda::kCtaRows, "M (rows of r)");
}

// The kernels' operands: q, r in the stat dtype A, and per row of q its positives (r's labels
// sorted once: a row's positives are one run of that order; the excluded column taken out).
struct TripletPrep {
  Tensor q, r, lq, lr, nq, nr, excl, rank_r, excl_rank, pos_cols, pos_u;
  int64_t N = 0, M = 0, D = 0, P = 0;
  double margin = 0, lo = 0, hi = 0;
  bool lp = false, window = false;
  int64_t bins = 0;  // the bins (triplet_bins_*)
  double bin_lo = 0, bin_width = 1;

  fpl_cuda::TripletOperands operands() const {
    fpl_cuda::TripletOperands o{};
    o.dt = dtype_code(q);
    o.q = q.data_ptr();
    o.r = r.data_ptr();
    o.labels_q = lq.data_ptr<int64_t>();
    o.labels_r = lr.data_ptr<int64_t>();
    o.norm_q = nq.defined() ? nq.data_ptr() : nullptr;
    o.norm_r = nr.defined() ? nr.data_ptr() : nullptr;
    o.exclude_col = excl.data_ptr<int64_t>();
    o.rank_r = rank_r.data_ptr<int64_t>();
    o.excl_rank = excl_rank.data_ptr<int64_t>();
    o.pos_cols = pos_cols.data_ptr<int64_t>();
    o.pos_u = pos_u.data_ptr();
    o.N = N;
    o.M = M;
    o.D = D;
    o.P = P;
    o.margin = margin;
    o.window_lo = lo;
    o.window_hi = hi;
    o.lp = lp;
    o.window = window;
    o.vec16 = N > 0 && M > 0 && can_vec16(q, r);
    o.bins = bins;
    o.bin_lo = bin_lo;
    o.bin_width = bin_width;
    return o;
  }
};

inline TripletPrep prepare_triplet(const Runtime& rt, const Tensor& q, const Tensor& r, const Tensor& labels_q,
                                   const Tensor& labels_r, const Tensor& exclude_col, double margin, bool lp,
                                   double window_lo, double window_hi) {
  TripletPrep p;
  const auto A = stat_type(q);
  p.q = q.to(A).contiguous();
  p.r = r.to(A).contiguous();
  p.lq = labels_q.contiguous();
  p.lr = labels_r.contiguous();
  p.N = q.size(0);
  p.M = r.size(0);
  p.D = q.size(1);
  p.margin = margin;
  p.lo = window_lo;
  p.hi = window_hi;
  p.lp = lp;
  p.window = !(std::isinf(window_lo) && window_lo < 0 && std::isinf(window_hi) && window_hi > 0);
  if (lp) {
    p.nq = p.q.square().sum(1).contiguous();
    p.nr = p.r.square().sum(1).contiguous();
  }
  const auto lopts = p.lq.options();
  p.excl = exclude_col.contiguous();
  p.rank_r = at::zeros({p.M}, lopts);
  p.excl_rank = at::full({p.N}, -1, lopts);
  Tensor cols = at::empty({p.N, 0}, lopts), real = at::empty({p.N, 0}, lopts.dtype(at::kBool));
  if (p.N > 0 && p.M > 0) {
    const Tensor order = stable_sort_perm(p.lr);
    const Tensor sorted = p.lr.index_select(0, order).contiguous();
    // rank of each column among the columns of its label (its place in a row's positive list)
    const Tensor run_start = at::searchsorted(sorted, sorted, /*out_int32=*/false, /*right=*/false);
    p.rank_r.index_copy_(0, order, at::arange(p.M, lopts) - run_start);
    const Tensor e = p.excl;
    const Tensor in_r = e.ge(0).logical_and(e.lt(p.M));
    const Tensor ec = at::where(in_r, e, at::zeros_like(e));
    const Tensor same = in_r.logical_and(p.lr.index_select(0, ec).eq(p.lq));
    p.excl_rank = at::where(same, p.rank_r.index_select(0, ec), at::full_like(e, -1)).contiguous();
    const Tensor start = at::searchsorted(sorted, p.lq, /*out_int32=*/false, /*right=*/false);
    const Tensor span = at::searchsorted(sorted, p.lq, /*out_int32=*/false, /*right=*/true) - start;
    const int64_t width = span.max().item<int64_t>();
    const Tensor k = at::arange(width, lopts);
    real = k.unsqueeze(0).lt(span.unsqueeze(1));
    cols = order.index_select(0, (start.unsqueeze(1) + k.unsqueeze(0)).clamp_max(p.M - 1).flatten()).view({p.N, width});
    real = real.logical_and(cols.ne(p.excl.unsqueeze(1)));
    // the excluded column leaves a gap: every row's real entries to the front, in order
    const Tensor front = at::argsort(real.logical_not().to(at::kByte), /*stable=*/true, /*dim=*/1);
    cols = cols.gather(1, front);
    real = real.gather(1, front);
    p.P = width > 0 ? real.sum(1).max().item<int64_t>() : 0;
    cols = cols.narrow(1, 0, p.P);
    real = real.narrow(1, 0, p.P);
  }
  p.pos_cols = at::where(real, cols, at::full_like(cols, -1)).contiguous();
  p.pos_u = at::empty({p.N, p.P}, p.q.options());
  check_launch(rt, fpl_cuda::triplet_positive_u(p.operands(), rt.stream), "triplet_engine (positives)");
  return p;
}

inline std::tuple<Tensor, Tensor, Tensor> triplet_forward(const Runtime& rt, const Tensor& q, const Tensor& r,
                                                          const Tensor& labels_q, const Tensor& labels_r,
                                                          const Tensor& exclude_col, double margin, bool lp,
                                                          double window_lo, double window_hi) {
  check_triplet_inputs(q, r, labels_q, labels_r, exclude_col);
  const TripletPrep p = prepare_triplet(rt, q, r, labels_q, labels_r, exclude_col, margin, lp, window_lo, window_hi);
  Tensor sums = at::zeros({p.N}, p.q.options());
  Tensor counts = at::zeros({p.N}, p.lq.options());
  Tensor in_window = at::zeros({p.N}, p.lq.options());
  if (p.N > 0 && p.M > 0 && p.P > 0) {
    check_launch(rt,
                 fpl_cuda::triplet_forward(p.operands(), sums.data_ptr(), counts.data_ptr<int64_t>(),
                                           in_window.data_ptr<int64_t>(), rt.stream),
                 "triplet_engine_forward");
  }
  return {sums, counts, in_window};
}

// The positives' share of grad_q, from the gathered pairs in row chunks (grad_r's is the kernel's
// pass 1): dL/du_ip = gk_ip (g_i k_ip for the hinges, kw_ip for the bins), so with W = gk (W / d
// for lp, 0 at d = 0): cosine (u = -S) grad_q_i -= sum_p W r_p; lp (u = |q_i - r_p|) grad_q_i +=
// sum_p W (q_i - r_p).
inline void add_positives_grad(const TripletPrep& p, const Tensor& gk, Tensor& gq) {
  constexpr int64_t kGatherElements = int64_t(1) << 22;
  const int64_t step = std::max<int64_t>(1, kGatherElements / std::max<int64_t>(p.P * p.D, 1));
  for (int64_t i0 = 0; i0 < p.N; i0 += step) {
    const int64_t c = std::min(step, p.N - i0);
    const Tensor cols = p.pos_cols.narrow(0, i0, c);
    const Tensor real = cols.ge(0);
    Tensor W = at::where(real, gk.narrow(0, i0, c), at::zeros_like(p.pos_u.narrow(0, i0, c)));
    if (p.lp) {
      const Tensor d = p.pos_u.narrow(0, i0, c);
      const Tensor pos = d.gt(0);
      W = at::where(pos, W / at::where(pos, d, at::ones_like(d)), at::zeros_like(d));
    }
    const Tensor rows = p.q.narrow(0, i0, c);
    const Tensor rp = at::where(real.unsqueeze(2), p.r.index_select(0, cols.clamp_min(0).flatten()).view({c, p.P, p.D}),
                                at::zeros({1}, p.q.options()));
    const Tensor w_r = at::bmm(W.unsqueeze(1), rp).squeeze(1);  // sum_p W_ip r_p
    gq.narrow(0, i0, c).add_(p.lp ? W.sum(1, true) * rows - w_r : -w_r);
  }
}

inline std::tuple<Tensor, Tensor> triplet_backward(const Runtime& rt, const Tensor& grad_sums, const Tensor& q,
                                                   const Tensor& r, const Tensor& labels_q, const Tensor& labels_r,
                                                   const Tensor& exclude_col, double margin, bool lp, double window_lo,
                                                   double window_hi, bool need_grad_q, bool need_grad_r) {
  check_triplet_inputs(q, r, labels_q, labels_r, exclude_col);
  TORCH_CHECK(grad_sums.dim() == 1 && grad_sums.size(0) == q.size(0),
              "triplet_engine_backward: grad_sums must have shape (", q.size(0), ",), got ", grad_sums.sizes());
  check_same_device(grad_sums, q, "grad_sums");
  const TripletPrep p = prepare_triplet(rt, q, r, labels_q, labels_r, exclude_col, margin, lp, window_lo, window_hi);
  const Tensor g = grad_sums.to(p.q.scalar_type()).contiguous();
  Tensor gq = at::zeros({p.N, p.D}, p.q.options());  // pass 0 runs for k even when grad_q is not needed
  Tensor gr = need_grad_r ? at::zeros({p.M, p.D}, p.q.options()) : Tensor();
  if (p.N > 0 && p.M > 0 && p.P > 0 && p.D > 0) {
    Tensor k = at::zeros({p.N, p.P}, p.lq.options().dtype(at::kInt));
    check_launch(rt,
                 fpl_cuda::triplet_backward(p.operands(), g.data_ptr(), k.data_ptr<int32_t>(), gq.data_ptr(),
                                            need_grad_r ? gr.data_ptr() : nullptr, rt.stream),
                 "triplet_engine_backward");
    add_positives_grad(p, g.unsqueeze(1) * k.to(g.scalar_type()), gq);
  }
  Tensor grad_q = need_grad_q ? gq.to(q.scalar_type()).contiguous() : q.new_empty({0});
  Tensor grad_r = need_grad_r ? gr.to(r.scalar_type()).contiguous() : r.new_empty({0});
  return {grad_q, grad_r};
}

// ---- the triplet bins (DynamicSoftMargin; ops/README.md triplet_bins) -----------------------------
inline TripletPrep prepare_bins(const Runtime& rt, const Tensor& q, const Tensor& r, const Tensor& labels_q,
                                const Tensor& labels_r, const Tensor& exclude_col, double lo, double width,
                                int64_t bins) {
  check_triplet_inputs(q, r, labels_q, labels_r, exclude_col);
  fpl::check_triplet_bins(lo, width, bins);
  const double inf = std::numeric_limits<double>::infinity();
  TripletPrep p = prepare_triplet(rt, q, r, labels_q, labels_r, exclude_col, 0.0, true, -inf, inf);
  p.bins = bins;
  p.bin_lo = lo;
  p.bin_width = width;
  return p;
}

inline std::tuple<Tensor, Tensor> triplet_bins_forward(const Runtime& rt, const Tensor& q, const Tensor& r,
                                                       const Tensor& labels_q, const Tensor& labels_r,
                                                       const Tensor& exclude_col, double lo, double width,
                                                       int64_t bins) {
  const TripletPrep p = prepare_bins(rt, q, r, labels_q, labels_r, exclude_col, lo, width, bins);
  Tensor acc = at::zeros({p.N, 2, 3, bins}, p.q.options().dtype(at::kDouble));
  if (p.N > 0 && p.M > 0 && p.P > 0)
    check_launch(rt, fpl_cuda::triplet_bins_forward(p.operands(), acc.data_ptr(), rt.stream),
                 "triplet_bins_engine_forward");
  // per row: n, f, x per bin (the row's two threads added in order), then PML's increments: the
  // pairs of bin k give 1 - f to m = min(k, bins - 2) and f to m + 1
  const Tensor sums = acc.select(1, 0) + acc.select(1, 1);
  const Tensor n = sums.select(1, 0), f = sums.select(1, 1);
  const Tensor m = at::arange(bins, p.lq.options()).clamp_max(bins - 2);
  Tensor inc = at::zeros({p.N, bins}, acc.options());
  inc.index_add_(1, m, n - f).index_add_(1, m + 1, f);
  Tensor out = at::stack({inc, sums.select(1, 2)}, 1).to(p.q.scalar_type()).contiguous();
  Tensor counts = n.sum(1).round().to(at::kLong);
  return {out, counts};
}

inline std::tuple<Tensor, Tensor> triplet_bins_backward(const Runtime& rt, const Tensor& grad_bins, const Tensor& q,
                                                        const Tensor& r, const Tensor& labels_q, const Tensor& labels_r,
                                                        const Tensor& exclude_col, double lo, double width,
                                                        int64_t bins, bool need_grad_q, bool need_grad_r) {
  TORCH_CHECK(
      grad_bins.dim() == 3 && grad_bins.size(0) == q.size(0) && grad_bins.size(1) == 2 && grad_bins.size(2) == bins,
      "triplet_bins_engine_backward: grad_bins must have shape (", q.size(0), ", 2, ", bins, "), got ",
      grad_bins.sizes());
  check_same_device(grad_bins, q, "grad_bins");
  const TripletPrep p = prepare_bins(rt, q, r, labels_q, labels_r, exclude_col, lo, width, bins);
  // d loss / d x per row and bin k: (g_inc[m + 1] - g_inc[m]) / width + g_x[k], m = min(k, bins - 2)
  const Tensor g = grad_bins.to(p.q.scalar_type());
  const Tensor m = at::arange(bins, p.lq.options()).clamp_max(bins - 2);
  const Tensor g_inc = g.select(1, 0);
  const Tensor weight =
      ((g_inc.index_select(1, m + 1) - g_inc.index_select(1, m)) / width + g.select(1, 1)).contiguous();
  Tensor gq = at::zeros({p.N, p.D}, p.q.options());
  Tensor gr = need_grad_r ? at::zeros({p.M, p.D}, p.q.options()) : Tensor();
  if (p.N > 0 && p.M > 0 && p.P > 0 && p.D > 0) {
    Tensor kw = at::zeros({p.N, p.P}, p.q.options());
    check_launch(rt,
                 fpl_cuda::triplet_bins_backward(p.operands(), weight.data_ptr(), kw.data_ptr(), gq.data_ptr(),
                                                 need_grad_r ? gr.data_ptr() : nullptr, rt.stream),
                 "triplet_bins_engine_backward");
    add_positives_grad(p, kw, gq);
  }
  Tensor grad_q = need_grad_q ? gq.to(q.scalar_type()).contiguous() : q.new_empty({0});
  Tensor grad_r = need_grad_r ? gr.to(r.scalar_type()).contiguous() : r.new_empty({0});
  return {grad_q, grad_r};
}

}  // namespace fpl_cuda_glue
