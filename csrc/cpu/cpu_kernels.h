// Interface between the CPU engines' ATen glue (pair_engine_cpu.cpp, class_engine_cpu.cpp) and
// their per-instruction-set kernels (kernels_isa.inc, compiled once per ISA by kernels_avx512.cpp,
// kernels_avx2.cpp, kernels_base.cpp).
//
// The glue owns tensors, scheduling and threads; a kernel gets raw pointers to one tile. Nothing
// here includes torch, and the kernel translation units include only this header and the standard
// library before their target pragma, so no inline function is compiled with two instruction sets.
//
// Determinism (docs/design.md "Determinism"): every GEMM below computes each output element as one
// fixed chain of operations (a fused multiply-add per k, k ascending; without FMA hardware, a
// multiply and an add), whatever the tile it sits in and whatever the thread. So S_ij is a function
// of the two rows only: a recomputed tile, a transposed tile and a tile of a label-sorted copy all
// hold the same bits, and the results cannot depend on the thread count.
#pragma once

#include <cstdint>

#include "common/loss_spec.h"

namespace fpl {
namespace cpu {

enum class Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };
const char* isa_name(Isa isa);

// The row kernels (Smooth-AP, PNP, the coupled triplets) read whole 16-element chunks: their rows are
// copied into buffers of this length, zero-padded.
inline int64_t padded_row_length(int64_t n) { return (n + 15) / 16 * 16; }

// ---- pair engine tiles --------------------------------------------------------------------------
// One tile of S (for the distance: of the squared distances, Kernels::lp_tile_d2):
// rows x cols, row stride ld, with the dense label ids of its rows and columns, the global row /
// column indices and per row the excluded column (global index, -1 for none).
template <typename T>
struct PairTile {
  const T* S;
  int64_t ld;
  int rows, cols;
  const int32_t* lab_r;
  const int32_t* lab_c;
  const int64_t* excl_r;  // indexed like lab_r
  int64_t row0, col0;     // global index of row 0 / column 0 (main walk)
  // band walks (label-sorted copies): global index of each row / column instead of row0 / col0
  const int64_t* row_index;
  const int64_t* col_index;
};

// Per-row state of the pair engine, arrays over all N rows (global row index).
template <typename T>
struct PairRowState {
  T* lse_max[2];  // [0] positives, [1] negatives: online LSE (running max, rescaled sum)
  T* lse_sum[2];
  T* sum[2];
  T* weight[2];  // exp-weighted sums: the sum of the weights
  T* hist[2];    // histograms, [N][hist_nodes] per set
  int32_t* count[2];
  int32_t* nonzero[2];
  T* min_pos;  // mining thresholds, u orientation
  T* max_neg;
  T* ntx;  // NTXent pair terms and their d/d lse_neg
  T* ntx_dlse;
  // backward: incoming gradients and saved statistics
  const T* g_lse[2];  // g_lse[1] already includes the NTXent term's share (glue)
  const T* g_sum[2];
  const T* g_weight[2];
  const T* g_hist[2];  // [N][hist_nodes] per set
  const T* g_ntx;
  const T* lse[2];
  // per row, added to both terms' shift (the op's row_shift; MarginLoss's per-class beta); null: none
  const T* row_shift;
};

// ---- class engine tiles -------------------------------------------------------------------------
// A tile of tc whole classes x bi rows, computed transposed: st[(c*K + k) * ld + i] = w_ck . q_i.
// The per-row arrays hold pad16(bi) entries (loc padded with -1, the backward inputs with zeros), so
// the kernels run on whole vectors.
template <typename T>
struct ClassTile {
  T* st;  // backward: overwritten with dL/ds
  int64_t ld;
  int tc, bi;
  const int32_t* loc;  // bi: y_i - c0 if the row's class is in the tile, else -1
  // forward, per row of the block: running LSE over the tile (max, sum), target_sim where loc >= 0
  T* row_max;
  T* row_sum;
  T* target_sim;
  // forward, per class of the tile: column LSE partials (pos, neg) over this row block
  T* col_max[2];
  T* col_sum[2];
  // backward inputs, per row / per class
  const T* g_row_lse;
  const T* g_target_sim;
  const T* row_lse;
  const T* g_col_lse[2];
  const T* col_lse[2];
  // scratch, at least (tc + 1) * pad16(bi) + 16 K elements
  T* scratch;
};

template <typename T>
struct Kernels {
  int nr;  // columns per packed panel (pack_panels / gemm_nt)
  // panels of the rows [0, n) of x (row stride ldx, K columns): out[(p*K + k)*nr + c] = x[p*nr + c][k],
  // zero for rows >= n; ceil(n / nr) panels.
  void (*pack_panels)(const T* x, int64_t ldx, int64_t n, int64_t K, T* out);
  // C[m][n] = sum_k A[m][k] B[n][k] for m < M, n < round_up(N, nr), B given as panels.
  void (*gemm_nt)(const T* A, int64_t lda, const T* B_panels, int64_t M, int64_t N, int64_t K, T* C, int64_t ldc);
  // column chunks of x (rows x N, row stride ldx; N a multiple of 16 floats / 8 doubles): the B
  // operand of the two products below
  void (*pack_cols)(const T* x, int64_t ldx, int64_t rows, int64_t N, T* out);
  // C[m][n] += sum_k A[m][k] B[k0 + k][n]   (B: pack_cols of a rows_total x N matrix)
  void (*gemm_nn_acc)(const T* A, int64_t lda, const T* B, int64_t rows_total, int64_t k0, int64_t M, int64_t N,
                      int64_t K, T* C, int64_t ldc);
  // C[m][n] += sum_k A[k][m] B[k0 + k][n]
  void (*gemm_tn_acc)(const T* A, int64_t lda, const T* B, int64_t rows_total, int64_t k0, int64_t M, int64_t N,
                      int64_t K, T* C, int64_t ldc);
  // pair engine, distance: the tile S (ti x tj, row stride ld) of rows q (row stride Dp) against rows
  // r becomes the squared distances, the near pairs recomputed from the rows (pair_terms.inl)
  void (*lp_tile_d2)(const T* q, const T* r, int64_t Dp, int64_t D, const T* norm_q, const T* norm_r, int ti, int tj,
                     T* S, int64_t ld);
  // listed pairs (listed_pairs_cpu.cpp): out[k] = v of the pair (rows[k], cols[k]) of q against r
  // (row strides ldq, ldr; D columns), the bits a tile of gemm_nt (and lp_tile_d2, then
  // d = sqrt(max(d2, 0)), when norm_q / norm_r are given) holds for it
  void (*listed_pair_values)(const T* q, int64_t ldq, const T* r, int64_t ldr, int64_t D, const T* norm_q,
                             const T* norm_r, const int64_t* rows, const int64_t* cols, int64_t n, T* out);
  // triplet rows (triplet_engine_cpu.cpp; rows padded to whole 16-element chunks within ld, the
  // columns that are no negative set to NaN): the strip of S (or d^2) to u in place; per row, over
  // the positives' u_ap a[P] and thresholds A[P] = a + margin, and a miner's window {lo, hi} (or
  // nullptr): the hinge sum, its count of terms > 0 and the count of (p, n) in the window; the
  // coefficients d sums / d u_j of the negatives and k_p; G = dL/dS of the row from its coefficients.
  void (*triplet_strip_u)(T* U, int64_t ld, int rows, int64_t M, bool lp);
  void (*triplet_row_sums)(const T* u, int64_t M, const T* A, const T* a, int64_t P, const T* window, double* sum,
                           int64_t* count, int64_t* in_window);
  void (*triplet_row_coefficients)(const T* u, int64_t M, const T* A, const T* a, int64_t P, const T* window, T* coef,
                                   int64_t* k);
  void (*triplet_row_grad)(const T* u, int64_t M, T g, bool lp, T* G);
  // triplet bins (DynamicSoftMargin): per row, over its (p, n) with x = a_p - u_n and t = (x - lo) /
  // width, the bin k = clamp(floor t, 0, bins - 1) and f = t - trunc t: acc[0][k] += 1, acc[1][k] += f,
  // acc[2][k] += x (acc: 3 x bins doubles, added to; scratch: 16 (bins + 1) doubles, 32-byte aligned); the backward's
  // coef[n] = -sum_p weight[k(p, n)] over the negatives (0 elsewhere), kp[p] = sum_n weight[k(p, n)].
  void (*triplet_row_bins)(const T* u, int64_t M, const T* a, int64_t P, T lo, T width, int64_t bins, double* acc,
                           double* scratch);
  void (*triplet_row_bin_coefficients)(const T* u, int64_t M, const T* a, int64_t P, T lo, T width, int64_t bins,
                                       const T* weight, T* coef, double* kp);
  // Smooth-AP rows (rank_rows_cpu.cpp; s padded with zeros to whole 16-element chunks, sig and G
  // likewise): per p of the block [b0, b0 + b), over j != b0 + p, sigmoid((s_j - s_p) inv_t) summed
  // into rank[p] = 1 + the sum over j, block_rank[p] = 1 + the sum over the block; the backward adds
  // to G the gradient of g_over_b sum_p block_rank[p] / rank[p] with respect to s (sig: scratch).
  void (*smooth_ap_row_ranks)(const T* s, int64_t N, int64_t b0, int64_t b, T inv_t, T* rank, T* block_rank);
  void (*smooth_ap_row_grad)(const T* s, int64_t N, int64_t b0, int64_t b, T inv_t, T g_over_b, T* sig, T* G);
  // PNP rows (rank_rows_cpu.cpp; s, ids (the columns' dense class ids as T), sig, pass and G padded to
  // whole 16-element chunks; own the row's id): rk[k] = the sum over the negatives j of PML's clamped
  // sigmoid of s_j - s_{pos[k]} (0 for pos[k] < 0); the backward adds to G the gradient of
  // sum_k g[k] rk[k] with respect to s (sig, pass: scratch).
  void (*pnp_row_ranks)(const T* s, const T* ids, int64_t N, T own, const int64_t* pos, int64_t P, T inv_anneal, T* rk);
  void (*pnp_row_grad)(const T* s, const T* ids, int64_t N, T own, const int64_t* pos, int64_t P, T inv_anneal,
                       const T* g, T* sig, T* pass, T* G);
  // TripletMarginLoss's swap / smooth_loss, one (anchor, positive) pair (triplet_coupled_cpu.cpp; ua,
  // up, ids, Wa and Wp padded to whole 16-element chunks; up and Wp nullptr without swap): over the
  // negatives n (ids[n] != own) the terms of x = x0 - u'_n that are > 0, their sum and count; the
  // backward adds to Wa (and Wp) the gradient of g times the sum with respect to ua_n (and up_n) and
  // returns the one with respect to x0.
  void (*triplet_coupled_pair_sums)(const T* ua, const T* up, const T* ids, int64_t M, T own, T x0, bool smooth, T* sum,
                                    int64_t* count);
  T (*triplet_coupled_pair_coefficients)(const T* ua, const T* up, const T* ids, int64_t M, T own, T x0, bool smooth,
                                         T g, T* Wa, T* Wp);
  // pair engine, main walk: forward reductions / dL/dS of the tile's rows (G, row stride ldg)
  void (*pair_forward)(const PairSpec<T>& spec, const PairTile<T>& t, const PairRowState<T>& st, T* scratch);
  void (*pair_backward)(const PairSpec<T>& spec, const PairTile<T>& t, const PairRowState<T>& st, T* G, int64_t ldg,
                        T* scratch);
  // pair engine, walks over the positive pairs of a label-sorted copy (spec.defer_positives()):
  // pass 0: mining threshold min_pos; pass 1: the positives' reductions.
  void (*pair_positives)(const PairSpec<T>& spec, const PairTile<T>& t, const PairRowState<T>& st, int pass);
  // class engine
  void (*class_forward)(const ClassSpec<T>& spec, const ClassTile<T>& t);
  void (*class_backward)(const ClassSpec<T>& spec, const ClassTile<T>& t);
};

// The kernels of one instruction set (nullptr where this build or this CPU has none).
const Kernels<float>* kernels_f32(Isa isa);
const Kernels<double>* kernels_f64(Isa isa);

// Instruction set the engines use now: the best the CPU supports, capped by FPL_CPU_ISA
// (base | avx2 | avx512) at load time and by set_active_isa().
Isa active_isa();
Isa best_supported_isa();
// Caps the ISA (for tests: the AVX2 and baseline kernels on an AVX-512 machine); returns the one
// now active. A call must not change it between an op's forward and backward.
Isa set_active_isa(Isa cap);

template <typename T>
const Kernels<T>& active_kernels();

// Per-ISA tables (defined in kernels_<isa>.cpp).
namespace isa_base {
const Kernels<float>* table_f32();
const Kernels<double>* table_f64();
}  // namespace isa_base
namespace isa_avx2 {
const Kernels<float>* table_f32();
const Kernels<double>* table_f64();
}  // namespace isa_avx2
namespace isa_avx512 {
const Kernels<float>* table_f32();
const Kernels<double>* table_f64();
}  // namespace isa_avx512

}  // namespace cpu
}  // namespace fpl
