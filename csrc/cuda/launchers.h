// Plain C++ entry points of the CUDA kernels (defined in pair_engine.cu / class_engine.cu).
//
// The .cu files include no torch headers (fast compiles); the host glue (glue.h, used by
// ops_cuda.cpp) checks the tensors, prepares the operands, allocates the outputs and calls these
// functions with raw pointers on the current PyTorch stream. Every launcher returns the first CUDA
// error it saw (cudaSuccess if none); the glue turns an error into a Python exception.
//
// Element types: q / r / w are `DType`; statistics and gradient accumulators are the accumulation
// type A = double for kFloat64, float otherwise (ops/README.md "stat dtype"). The loss declaration
// is passed packed (terms, flags: common/loss_spec.h) and decoded here, in A.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fpl_cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Grids: one CTA per kCtaRows owned rows (pair engine: rows of q, of r in the column pass; class
// engine: rows of q) or per class tile (kCtaRows / K classes, at least 1), along gridDim.x, which
// CUDA caps at kMaxGridX. Every offset inside the kernels is int64.
constexpr int64_t kCtaRows = 64;
constexpr int64_t kMaxGridX = 2147483647;

// Operands of the pair engine, as the glue prepared them. Rows of q / r may be a permutation of
// the op's inputs (label-sorted copies, for the walks over positive pairs): then perm_q[i] is the
// op's row of operand row i (statistics are read and written, gradient rows accumulated, there),
// and likewise perm_r. Null perms: the identity.
struct PairOperands {
  DType dt;
  const void* q;  // (N, D) contiguous
  const void* r;  // (M, D); == q in self mode
  const int64_t* labels_q;
  const int64_t* labels_r;     // == labels_q in self mode
  const int64_t* exclude_col;  // ref mode: per operand row of q, the operand column excluded from
                               // its positives (-1: none); null: none. Self mode: the diagonal.
  // per operand row of q: [band_lo, band_hi) = the columns of r with its label (r label-sorted);
  // required when the declaration defers its positives (mining, NTXent), else null
  const int64_t* band_lo;
  const int64_t* band_hi;
  const int64_t* perm_q;
  const int64_t* perm_r;  // == perm_q in self mode
  const void* norm_q;     // LP_DISTANCE: squared norms of the operand rows (A), else null
  const void* norm_r;
  const void* row_shift;  // per row of q in the op's order (A): added to both terms' shift; null: none
  int64_t N, M, D;
  bool self_mode;
  bool vec16;  // q and r rows may be read 16 bytes at a time
};

// values (A, [7 + 2 nodes, N]), counts (int32, [4, N]), aux (A, [3, N]): ops/README.md
// pair_engine_forward. With a histogram (hist_nodes > 0) the histogram rows of values and
// hist_scratch (A, [2 nodes, N]) must be zero-filled; the caller adds hist_scratch to those rows
// afterwards (the second thread of each row adds into it). Without one hist_scratch may be null.
cudaError_t pair_forward(const PairOperands& o, const double* terms, int64_t flags, void* values, int32_t* counts,
                         void* aux, void* hist_scratch, cudaStream_t stream);

// grad_values (A, [7 + 2 nodes, N]) with row 1 already holding grad_lse_neg + grad_pos_vs_neg * aux[2];
// values, aux: the forward's. grad_q (N x D, A, zero-filled) receives dL/dq; in ref mode grad_r
// (M x D, A, zero-filled) receives dL/dr, or is null (need_grad_r False: its pass is skipped).
cudaError_t pair_backward(const PairOperands& o, const double* terms, int64_t flags, const void* grad_values,
                          const void* values, const void* aux, void* grad_q, void* grad_r, cudaStream_t stream);

// Largest centers_per_class K the class engine supports (a tile holds whole classes).
constexpr int64_t kMaxCentersPerClass = 64;

struct ClassOperands {
  DType dt;
  const void* q;  // (N, D)
  const void* w;  // (C*K, D), row c*K + k = center k of class c
  const int64_t* labels;
  int64_t N, C, K, D;
  bool vec16;
};

// rows (A, [2, N]: lse_other, target_sim), cols (A, [2, C]): ops/README.md class_engine_forward.
// target_sim must be NaN-filled by the caller (rows whose label is no class keep it).
cudaError_t class_forward(const ClassOperands& o, const double* terms, int64_t flags, void* rows, void* cols,
                          cudaStream_t stream);

// grad_q (N x D, A) and grad_w (C*K x D, A, or null: its pass is skipped), zero-filled.
cudaError_t class_backward(const ClassOperands& o, const double* terms, int64_t flags, const void* grad_rows,
                           const void* grad_cols, const void* rows, const void* cols, void* grad_q, void* grad_w,
                           cudaStream_t stream);

// All-triplets engine (triplet_engine.cu): q (N, D) and r (M, D) in the accumulation type (kFloat32
// or kFloat64: the glue converts), per row of q its positives' columns of r (pos_cols [N, P], -1
// padding) and the buffer pos_u [N, P] that triplet_positive_u fills with their u.
struct TripletOperands {
  DType dt;
  const void* q;
  const void* r;
  const int64_t* labels_q;
  const int64_t* labels_r;
  const void* norm_q;  // lp: squared norms (A), else null
  const void* norm_r;
  const int64_t* exclude_col;  // [N], -1: none
  const int64_t* rank_r;       // [M]: rank of column j among the columns of its label, in column order
  const int64_t* excl_rank;    // [N]: rank_r of exclude_col[i] when it has row i's label, else -1
  const int64_t* pos_cols;
  void* pos_u;
  int64_t N, M, D, P;
  double margin, window_lo, window_hi;
  bool lp, window, vec16;
  int64_t bins;  // the bins (triplet_bins_*): their number, first edge and width
  double bin_lo, bin_width;
};

cudaError_t triplet_positive_u(const TripletOperands& o, cudaStream_t stream);
// sums (A, [N]), counts and in_window (int64, [N]): ops/README.md triplet_rows.
cudaError_t triplet_forward(const TripletOperands& o, void* sums, int64_t* counts, int64_t* in_window,
                            cudaStream_t stream);
// grad_sums (A, [N]); k (int32 [N, P], zero-filled) receives #{negatives n : the term (p, n) > 0};
// grad_q (N x D, A, zero-filled) the negatives' share of dL/dq (the positives' share is the
// glue's), grad_r (M x D, A, zero-filled, or null: pass skipped) all of dL/dr.
cudaError_t triplet_backward(const TripletOperands& o, const void* grad_sums, int32_t* k, void* grad_q, void* grad_r,
                             cudaStream_t stream);
// The bins (ops/README.md triplet_bins; margin 0, no window, lp): bin_acc (double, [N, 2, 3, bins],
// zero-filled) receives per row and thread of the row the count, the fractions and the x of its
// pairs per bin; the backward takes the table bin_weight (A, [N, bins]) of d loss / d x per bin,
// kw (A [N, P], zero-filled) receives sum_n w per positive, grad_q / grad_r as triplet_backward's.
cudaError_t triplet_bins_forward(const TripletOperands& o, void* bin_acc, cudaStream_t stream);
cudaError_t triplet_bins_backward(const TripletOperands& o, const void* bin_weight, void* kw, void* grad_q,
                                  void* grad_r, cudaStream_t stream);

}  // namespace fpl_cuda
