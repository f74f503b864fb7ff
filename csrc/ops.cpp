// Schemas of the fused ops. Backends add kernels with TORCH_LIBRARY_IMPL (csrc/cpu, csrc/cuda);
// fake kernels and autograd are registered from Python (fused_pairloss/ops/engines.py). Exact
// semantics of every argument: fused_pairloss/ops/README.md; the loss declaration `terms, flags`:
// csrc/common/loss_spec.h (packed by fused_pairloss/ops/spec.py).
#include <torch/library.h>

#include <sstream>
#include <string>

#include "common/loss_spec.h"

#ifndef FPL_CUDA_ARCH_LIST
#define FPL_CUDA_ARCH_LIST ""
#endif

namespace {

// What this binary was built with, as "key=value;..." (read by fused_pairloss.build_info()).
std::string build_config() {
  std::string s = "cpu=1";
#ifdef FPL_WITH_CUDA
  s += ";cuda=1;cuda_arch_list=" FPL_CUDA_ARCH_LIST;
#else
  s += ";cuda=0;cuda_arch_list=";
#endif
  return s;
}

void term(std::ostringstream& o, const char* name, const fpl::PairTermParams<double>& t) {
  o << name << ".scale=" << t.scale << ";" << name << ".shift=" << t.shift << ";" << name
    << ".weight_offset=" << t.weight_offset << ";" << name << ".weight_slope=" << t.weight_slope << ";" << name
    << ".lse=" << t.lse << ";" << name << ".sum=" << t.sum << ";" << name << ".hinge=" << t.hinge() << ";";
}

// The C++ reading of a packed declaration, field by field (tests compare it with spec.py's).
std::string describe_pair_spec(c10::ArrayRef<double> terms, int64_t flags) {
  const std::string bad = fpl::check_pair_spec(terms.data(), static_cast<int64_t>(terms.size()), flags);
  TORCH_CHECK(bad.empty(), "describe_pair_spec: ", bad);
  const auto s = fpl::decode_pair_spec<double>(terms.data(), flags);
  std::ostringstream o;
  o.precision(17);
  term(o, "pos", s.pos);
  term(o, "neg", s.neg);
  o << "lp_distance=" << s.lp_distance << ";mine=" << s.mine << ";miner_epsilon=" << s.miner_eps
    << ";pos_vs_neg_lse=" << s.pos_vs_neg_lse << ";exclude_after_mining=" << s.exclude_after_mining
    << ";mine_on_cosine=" << s.mine_on_cosine << ";pos.sum_temperature=" << s.pos.sum_temperature
    << ";neg.sum_temperature=" << s.neg.sum_temperature << ";hist_nodes=" << s.hist_nodes << ";hist_lo=" << s.hist_lo
    << ";hist_inv_width=" << s.hist_inv_width << ";hist_squared=" << s.hist_squared
    << ";hist_pml_bins=" << s.hist_pml_bins << ";windows=" << s.windows << ";pos_window_lo=" << s.pos_window_lo
    << ";pos_window_hi=" << s.pos_window_hi << ";neg_window_lo=" << s.neg_window_lo
    << ";neg_window_hi=" << s.neg_window_hi << ";ntx_tiny=" << terms[fpl::kNtxTinyTerm];
  return o.str();
}

std::string describe_class_spec(c10::ArrayRef<double> terms, int64_t flags, int64_t K) {
  const std::string bad = fpl::check_class_spec(static_cast<int64_t>(terms.size()), flags, K);
  TORCH_CHECK(bad.empty(), "describe_class_spec: ", bad);
  const auto s = fpl::decode_class_spec<double>(terms.data(), flags, K);
  std::ostringstream o;
  o.precision(17);
  term(o, "row", s.row);
  term(o, "col_pos", s.col_pos);
  term(o, "col_neg", s.col_neg);
  o << "pool_inv_gamma=" << s.pool_inv_gamma << ";centers_per_class=" << s.K
    << ";normalize_weights=" << int(s.normalize_weights) << ";weights_columns=" << int(s.weights_columns)
    << ";pool_max=" << int(s.pool_max) << ";row_softplus_sum=" << int(s.row_softplus);
  return o.str();
}

}  // namespace

TORCH_LIBRARY(fused_pairloss, m) {
  // Tiled pair engine. r / labels_r = None means self mode (ref is the batch itself, S symmetric,
  // row i's own column excluded from its positives); exclude_col (ref mode): per row the column
  // excluded from its positives, -1 for none. row_shift: per row of q a number added to both terms'
  // shift (a constant to the op: no gradient), None for none.
  // values [7 + 2 hist_nodes, N]: lse_pos, lse_neg, sum_pos, sum_neg, pos_vs_neg, weight_pos, weight_neg,
  // then the histograms' nodes (positives', negatives'); counts [4, N] int32: count_pos,
  // count_neg, nonzero_pos, nonzero_neg; aux [3, N]: min_pos, max_neg, d pos_vs_neg / d lse_neg.
  m.def(
      "pair_engine_forward(Tensor q, Tensor? r, Tensor labels_q, Tensor? labels_r, "
      "Tensor? exclude_col, float[] terms, int flags, Tensor? row_shift=None) "
      "-> (Tensor values, Tensor counts, Tensor aux)");
  m.def(
      "pair_engine_backward(Tensor grad_values, Tensor q, Tensor? r, Tensor labels_q, "
      "Tensor? labels_r, Tensor? exclude_col, Tensor values, Tensor aux, float[] terms, int flags, "
      "bool need_grad_r, Tensor? row_shift=None) -> (Tensor grad_q, Tensor grad_r)");
  // Tiled class engine. w: (C*K, D), row c*K+k = center k of class c; flags may say (D, C*K) and
  // normalize its vectors (common/loss_spec.h ClassFlag; the CPU kernels apply them per tile).
  // rows [2, N]: lse over the non-target classes, target_sim; cols [2, C]: column LSEs (pos, neg).
  m.def(
      "class_engine_forward(Tensor q, Tensor w, Tensor labels, int centers_per_class, "
      "float[] terms, int flags) -> (Tensor rows, Tensor cols)");
  m.def(
      "class_engine_backward(Tensor grad_rows, Tensor grad_cols, Tensor q, Tensor w, Tensor labels, "
      "Tensor rows, Tensor cols, int centers_per_class, float[] terms, int flags, bool need_grad_w) "
      "-> (Tensor grad_q, Tensor grad_w)");
  // All-triplets rows (fused_pairloss/ops/triplets.py): per row of q the sum and the count of the
  // triplet hinge terms > 0 over its (positive, negative) pairs of r whose u_n - u_p lies in
  // (window_lo, window_hi] (a miner's window; -inf, inf for none), and the count of those pairs;
  // exclude_col[i] (-1 for none) is left out of row i's positives. lp: u = |q_i - r_j|, else
  // u = -q_i . r_j.
  m.def(
      "triplet_engine_forward(Tensor q, Tensor r, Tensor labels_q, Tensor labels_r, Tensor exclude_col, "
      "float margin, bool lp, float window_lo, float window_hi) -> (Tensor sums, Tensor counts, Tensor in_window)");
  m.def(
      "triplet_engine_backward(Tensor grad_sums, Tensor q, Tensor r, Tensor labels_q, Tensor labels_r, "
      "Tensor exclude_col, float margin, bool lp, float window_lo, float window_hi, bool need_grad_q, "
      "bool need_grad_r) -> (Tensor grad_q, Tensor grad_r)");
  // Triplet bins (DynamicSoftMarginLoss; fused_pairloss/ops/triplets.py): per row of q, over its
  // (positive, negative) pairs of r with x = d_ap - d_an, PML's histogram increments and the sums of
  // x in the bins lo + k width (bins[N, 2, bins]), and the number of pairs.
  m.def(
      "triplet_bins_engine_forward(Tensor q, Tensor r, Tensor labels_q, Tensor labels_r, Tensor exclude_col, "
      "float lo, float width, int bins) -> (Tensor bins, Tensor counts)");
  m.def(
      "triplet_bins_engine_backward(Tensor grad_bins, Tensor q, Tensor r, Tensor labels_q, Tensor labels_r, "
      "Tensor exclude_col, float lo, float width, int bins, bool need_grad_q, bool need_grad_r) "
      "-> (Tensor grad_q, Tensor grad_r)");
  // The batch miners' pairs (fused_pairloss/_miners.py): per row of q, the positive of r with the
  // largest (pos_largest) or smallest u and the negative likewise (first column of a tie), their u;
  // index -1 where the row has none. No gradient (mining).
  m.def(
      "row_extremes(Tensor q, Tensor r, Tensor labels_q, Tensor labels_r, Tensor exclude_col, bool lp, "
      "bool pos_largest, bool neg_largest) -> (Tensor pos_u, Tensor pos_index, Tensor neg_u, Tensor neg_index)");
  // MultiSimilarityMiner's order (fused_pairloss/_miners.py): the entries of values where keep holds,
  // row after row, each row's in ascending order of their values (stable: columns ascending among
  // equal values), as (rows, columns); per row their number and whether two of them have equal
  // values. No gradient (mining).
  m.def(
      "ascending_kept_columns(Tensor values, Tensor keep) -> (Tensor rows, Tensor columns, Tensor counts, "
      "Tensor tied)");
  // A miner's listed pairs (fused_pairloss/ops/listed.py): v[k] of the pair (rows[k], cols[k]), S of
  // q's row against r's, or for lp their distance, with the bits the engines' tiles hold for that
  // pair. No gradient (ops/listed.py's pair_values wraps it in its own backward).
  m.def("listed_pair_values(Tensor q, Tensor r, Tensor rows, Tensor cols, bool lp) -> Tensor");
  // Smooth-AP's cubic part on a chunk of rows of S (fused_pairloss/losses/smooth_ap.py): per anchor
  // row first_row + i, over the p of its block of `block` consecutive columns, the ranks of s_p
  // among the row (all columns) and among the block by sigmoids of temperature t: AP per row; and
  // the gradient of sum_i grad_ap_i AP_i with respect to the chunk.
  m.def("smooth_ap_chunk_ranks(Tensor S, int first_row, int block, float temperature) -> Tensor");
  m.def("smooth_ap_chunk_grad(Tensor S, Tensor grad_ap, int first_row, int block, float temperature) -> Tensor");
  // PNP's ranks on a chunk of rows of S (fused_pairloss/losses/pnp.py): per row first_row + i and
  // listed positive column (-1: none), the sum over the columns of another class (class_ids) of
  // PML's clamped sigmoid of S_ij - S_ip (rk[c, P]); and the gradient of sum grad_rk * rk.
  m.def("pnp_chunk_ranks(Tensor S, Tensor class_ids, Tensor positives, int first_row, float anneal) -> Tensor");
  m.def(
      "pnp_chunk_grad(Tensor S, Tensor class_ids, Tensor positives, Tensor grad_rk, int first_row, float anneal) "
      "-> Tensor");
  // TripletMarginLoss's swap / smooth_loss on a group of (anchor, positive) pairs
  // (fused_pairloss/ops/triplets.py): per anchor (a row of U, its pairs by pair_offsets) the sum and
  // the number of the kept terms over its pairs and their negatives (class_ids against anchor_ids);
  // and the gradient of sum_i grad_i sums_i with respect to the anchors' rows of U (Wa) and each
  // pair's positive row (Wpair, with swap), for lp divided by u; and U, the u of rows of q against r.
  m.def(
      "triplet_coupled_chunk_sums(Tensor U, Tensor class_ids, Tensor anchor_ids, Tensor anchor_rows, "
      "Tensor pair_offsets, Tensor pair_x0, Tensor pos_rows, bool swap, bool smooth) -> (Tensor sums, Tensor counts)");
  m.def(
      "triplet_coupled_chunk_coefficients(Tensor U, Tensor class_ids, Tensor anchor_ids, Tensor anchor_rows, "
      "Tensor pair_offsets, Tensor pair_x0, Tensor pos_rows, Tensor cols, Tensor grad, bool swap, bool smooth, "
      "bool lp) -> (Tensor Wa, Tensor Wpair)");
  m.def("triplet_u_rows(Tensor q, Tensor r, bool lp) -> Tensor");
  m.def("build_config() -> str", &build_config);
  m.def("describe_pair_spec(float[] terms, int flags) -> str", &describe_pair_spec);
  m.def("describe_class_spec(float[] terms, int flags, int centers_per_class) -> str", &describe_class_spec);
}
