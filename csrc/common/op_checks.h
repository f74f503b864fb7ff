// The operand checks every backend of the two engines makes (shapes, pairing, dtypes agreeing, the
// declaration itself); each backend adds its own device and dtype rules. Host C++ only (ATen).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#include "common/loss_spec.h"

namespace fpl {

// Sizes every backend supports. Indices and element offsets are int64 everywhere (N x D, M x D,
// C*K x D and the N x M / N x C*K walks may pass 2^31); what stays int32 is the op's `counts`
// output (ops/README.md), the number of pairs of a row: at most M, so M < 2^31.
constexpr int64_t kMaxPairColumns = std::numeric_limits<int32_t>::max();

inline void check_pair_sizes(int64_t N, int64_t M) {
  TORCH_CHECK(M <= kMaxPairColumns, "pair_engine: ", M, " rows of r (self mode: of q) exceed the limit of ",
              kMaxPairColumns, " (2^31 - 1): the per-row set sizes (counts) are int32; N = ", N);
}

// pair_engine_*(q[N,D], r[M,D]?, labels_q[N], labels_r[M]?, exclude_col[N]?, terms, flags)
inline void check_pair_operands(const at::Tensor& q, const std::optional<at::Tensor>& r, const at::Tensor& labels_q,
                                const std::optional<at::Tensor>& labels_r, const std::optional<at::Tensor>& exclude_col,
                                c10::ArrayRef<double> terms, int64_t flags) {
  const std::string bad = check_pair_spec(terms.data(), static_cast<int64_t>(terms.size()), flags);
  TORCH_CHECK(bad.empty(), "pair_engine: invalid loss declaration: ", bad);
  TORCH_CHECK(q.dim() == 2, "pair_engine: q must be 2-D (N, D), got shape ", q.sizes());
  TORCH_CHECK(labels_q.dim() == 1 && labels_q.size(0) == q.size(0), "pair_engine: labels_q must have shape (",
              q.size(0), ",), got ", labels_q.sizes());
  TORCH_CHECK(r.has_value() == labels_r.has_value(), "pair_engine: r and labels_r go together");
  if (r.has_value()) {
    TORCH_CHECK(r->dim() == 2 && r->size(1) == q.size(1), "pair_engine: r must have shape (M, ", q.size(1), "), got ",
                r->sizes());
    TORCH_CHECK(r->scalar_type() == q.scalar_type(), "pair_engine: q and r must have the same dtype, got ",
                q.scalar_type(), " and ", r->scalar_type());
    TORCH_CHECK(labels_r->dim() == 1 && labels_r->size(0) == r->size(0), "pair_engine: labels_r must have shape (",
                r->size(0), ",), got ", labels_r->sizes());
  } else {
    TORCH_CHECK(!exclude_col.has_value(), "pair_engine: exclude_col is implied (the diagonal) in self mode");
  }
  check_pair_sizes(q.size(0), r.has_value() ? r->size(0) : q.size(0));
  if (exclude_col.has_value())
    TORCH_CHECK(exclude_col->dim() == 1 && exclude_col->size(0) == q.size(0) && exclude_col->scalar_type() == at::kLong,
                "pair_engine: exclude_col must be int64 of shape (", q.size(0), ",), got ", exclude_col->scalar_type(),
                " ", exclude_col->sizes());
}

// pair_engine_*'s row_shift: per row of q a number added to both terms' shift (no gradient)
inline void check_row_shift(const at::Tensor& q, const std::optional<at::Tensor>& row_shift) {
  if (!row_shift.has_value()) return;
  TORCH_CHECK(row_shift->dim() == 1 && row_shift->size(0) == q.size(0) && at::isFloatingType(row_shift->scalar_type()),
              "pair_engine: row_shift must be floating point of shape (", q.size(0), ",), got ",
              row_shift->scalar_type(), " ", row_shift->sizes());
  TORCH_CHECK(row_shift->device() == q.device(), "pair_engine: row_shift must be on q's device (", q.device(),
              "), got ", row_shift->device());
}

// triplet_engine_*(q[N,D], r[M,D], labels_q[N], labels_r[M], exclude_col[N], ...): the shapes and
// dtypes every backend's kernel needs (the backends add their device checks)
inline void check_triplet_operands(const at::Tensor& q, const at::Tensor& r, const at::Tensor& labels_q,
                                   const at::Tensor& labels_r, const at::Tensor& exclude_col) {
  TORCH_CHECK(q.dim() == 2 && r.dim() == 2 && q.size(1) == r.size(1),
              "triplet_engine: q and r must be 2-D with the same number of columns, got ", q.sizes(), " and ",
              r.sizes());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()) && q.scalar_type() == r.scalar_type(),
              "triplet_engine: q and r must share one floating dtype, got ", q.scalar_type(), " and ", r.scalar_type());
  TORCH_CHECK(labels_q.dim() == 1 && labels_q.size(0) == q.size(0) && exclude_col.dim() == 1 &&
                  exclude_col.size(0) == q.size(0),
              "triplet_engine: labels_q and exclude_col must have shape (", q.size(0), ",), got ", labels_q.sizes(),
              " and ", exclude_col.sizes());
  TORCH_CHECK(labels_r.dim() == 1 && labels_r.size(0) == r.size(0), "triplet_engine: labels_r must have shape (",
              r.size(0), ",), got ", labels_r.sizes());
  TORCH_CHECK(r.size(0) <= std::numeric_limits<int32_t>::max(), "triplet_engine: ", r.size(0),
              " rows of r exceed the limit of 2^31 - 1");
}

// triplet_bins_*: the bins' grid (lo, lo + width, ..., bins of them); the bins' index is int32.
inline void check_triplet_bins(double lo, double width, int64_t bins) {
  TORCH_CHECK(std::isfinite(lo) && std::isfinite(width) && width > 0,
              "triplet_bins: lo must be finite and width finite and > 0, got ", lo, " and ", width);
  TORCH_CHECK(bins >= 2 && bins <= std::numeric_limits<int32_t>::max(),
              "triplet_bins: bins must be in [2, 2^31 - 1], got ", bins);
}

// class_engine_*(q[N,D], w[C*K,D] or [D,C*K] (WEIGHTS_COLUMNS), labels[N], K, terms, flags)
inline void check_class_operands(const at::Tensor& q, const at::Tensor& w, const at::Tensor& labels, int64_t K,
                                 c10::ArrayRef<double> terms, int64_t flags) {
  const std::string bad = check_class_spec(static_cast<int64_t>(terms.size()), flags, K);
  TORCH_CHECK(bad.empty(), "class_engine: invalid loss declaration: ", bad);
  const bool columns = flags & kWeightsColumns;
  TORCH_CHECK(q.dim() == 2 && w.dim() == 2, "class_engine: q (N, D) and w (", columns ? "D, C*K" : "C*K, D",
              ") must be 2-D, got ", q.sizes(), " and ", w.sizes());
  TORCH_CHECK(q.scalar_type() == w.scalar_type(), "class_engine: q and w must have the same dtype, got ",
              q.scalar_type(), " and ", w.scalar_type());
  const int64_t w_dim = columns ? w.size(0) : w.size(1), CK = columns ? w.size(1) : w.size(0);
  TORCH_CHECK(q.size(1) == w_dim, "class_engine: q and w must have the same D, got ", q.size(1), " and ", w_dim);
  TORCH_CHECK(CK % K == 0, "class_engine: w has ", CK, " vectors, not a multiple of centers_per_class=", K);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == q.size(0) && labels.scalar_type() == at::kLong,
              "class_engine: labels must be int64 of shape (N,) = (", q.size(0), ",), got ", labels.scalar_type(), " ",
              labels.sizes());
}

}  // namespace fpl
