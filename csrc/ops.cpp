// Schemas of the fused ops. Backends add kernels with TORCH_LIBRARY_IMPL (csrc/cpu, csrc/cuda);
// fake kernels and autograd are registered from Python (fused_pairloss/ops/pair_engine.py and
// class_engine.py). Exact semantics of every argument: fused_pairloss/ops/README.md.
#include <torch/library.h>

TORCH_LIBRARY(fused_pairloss, m) {
  // Tiled pair engine (Multi-Similarity, Circle). r / labels_r = None means self mode
  // (ref is the batch itself, S symmetric, self pairs excluded).
  m.def(
      "pair_engine_forward(Tensor q, Tensor? r, Tensor labels_q, Tensor? labels_r, "
      "bool exclude_diag, int kind, float p0, float p1, float p2, bool mine, float miner_eps) "
      "-> (Tensor lse_pos, Tensor lse_neg, Tensor count_pos, Tensor count_neg, "
      "Tensor min_pos, Tensor max_neg)");
  m.def(
      "pair_engine_backward(Tensor grad_lse_pos, Tensor grad_lse_neg, Tensor q, Tensor? r, "
      "Tensor labels_q, Tensor? labels_r, Tensor lse_pos, Tensor lse_neg, Tensor min_pos, "
      "Tensor max_neg, bool exclude_diag, int kind, float p0, float p1, float p2, bool mine, "
      "float miner_eps) -> (Tensor grad_q, Tensor grad_r)");
  // Tiled class engine (SoftTriple, class-level Circle). w: (C*K, D), row c*K+k = center k of c.
  m.def(
      "class_engine_forward(Tensor q, Tensor w, Tensor labels, int centers_per_class, int kind, "
      "float p0, float p1, float p2) -> (Tensor lse, Tensor target_sim)");
  m.def(
      "class_engine_backward(Tensor grad_lse, Tensor grad_target_sim, Tensor q, Tensor w, "
      "Tensor labels, Tensor lse, int centers_per_class, int kind, float p0, float p1, float p2) "
      "-> (Tensor grad_q, Tensor grad_w)");
}

#include <string>

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
}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_pairloss, m) { m.def("build_config() -> str", &build_config); }
