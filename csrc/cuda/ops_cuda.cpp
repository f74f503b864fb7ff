// Host glue of the CUDA backend: checks the tensors, allocates outputs, takes the current PyTorch
// stream and calls the plain launchers of pair_engine.cu / class_engine.cu (launchers.h).
// Registers the CUDA kernels of the four fused ops (schemas: csrc/ops.cpp, semantics:
// fused_pairloss/ops/README.md).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/pair_math.h"
#include "cuda/launchers.h"

namespace {

using at::Tensor;

fpl_cuda::DType dtype_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return fpl_cuda::DType::kFloat32;
    case at::kDouble: return fpl_cuda::DType::kFloat64;
    case at::kHalf: return fpl_cuda::DType::kFloat16;
    case at::kBFloat16: return fpl_cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "fused_pairloss (cuda): embeddings must be float32, float64, float16 or "
                         "bfloat16; got ", t.scalar_type());
  }
}

at::ScalarType acc_type(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_matrix(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "fused_pairloss (cuda): ", name, " must be a CUDA tensor; got ", t.device());
  TORCH_CHECK(t.device() == like.device(), "fused_pairloss (cuda): ", name, " must be on ",
              like.device(), "; got ", t.device());
  TORCH_CHECK(t.dim() == 2, "fused_pairloss (cuda): ", name, " must be 2-D; got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "fused_pairloss (cuda): ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "fused_pairloss (cuda): ", name,
              " must have dtype ", like.scalar_type(), "; got ", t.scalar_type());
}

void check_labels(const Tensor& l, const char* name, int64_t n, const Tensor& like) {
  TORCH_CHECK(l.device() == like.device(), "fused_pairloss (cuda): ", name, " must be on ",
              like.device(), "; got ", l.device());
  TORCH_CHECK(l.scalar_type() == at::kLong, "fused_pairloss (cuda): ", name,
              " must be int64; got ", l.scalar_type());
  TORCH_CHECK(l.dim() == 1 && l.size(0) == n, "fused_pairloss (cuda): ", name,
              " must have shape (", n, "); got ", l.sizes());
  TORCH_CHECK(l.is_contiguous(), "fused_pairloss (cuda): ", name, " must be contiguous");
}

// A per-row statistic / incoming gradient: length n, on `like`'s device, in the stat dtype.
Tensor row_vector(const Tensor& v, const char* name, int64_t n, const Tensor& like) {
  TORCH_CHECK(v.device() == like.device(), "fused_pairloss (cuda): ", name, " must be on ",
              like.device(), "; got ", v.device());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == n, "fused_pairloss (cuda): ", name,
              " must have shape (", n, "); got ", v.sizes());
  return v.to(acc_type(like)).contiguous();
}

bool aligned16(const Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// 16-byte vector loads: every row starts 16-byte aligned.
bool can_vec16(const Tensor& a, const Tensor& b) {
  const int64_t row_bytes = a.size(1) * a.element_size();
  return row_bytes % 16 == 0 && aligned16(a) && aligned16(b);
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fused_pairloss (cuda): ", what, " failed: ",
              cudaGetErrorString(err));
}

void check_pair_kind(int64_t kind) {
  TORCH_CHECK(kind == fpl::kMultiSimilarity || kind == fpl::kCircle,
              "fused_pairloss (cuda): unknown pair loss kind ", kind);
}

struct PairOperands {
  Tensor r, labels_r;
  bool self_mode;
  int64_t M;
};

PairOperands pair_operands(const Tensor& q, const std::optional<Tensor>& r, const Tensor& labels_q,
                           const std::optional<Tensor>& labels_r) {
  check_matrix(q, "q", q);
  check_labels(labels_q, "labels_q", q.size(0), q);
  PairOperands o;
  o.self_mode = !r.has_value();
  if (o.self_mode) {
    o.r = q;
    o.labels_r = labels_q;
  } else {
    TORCH_CHECK(labels_r.has_value(), "fused_pairloss (cuda): labels_r is required with r");
    o.r = *r;
    o.labels_r = *labels_r;
    check_matrix(o.r, "r", q);
    TORCH_CHECK(o.r.size(1) == q.size(1), "fused_pairloss (cuda): r must have D=", q.size(1),
                " columns; got shape ", o.r.sizes());
    check_labels(o.labels_r, "labels_r", o.r.size(0), q);
  }
  o.M = o.r.size(0);
  return o;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> pair_engine_forward_cuda(
    const Tensor& q, const std::optional<Tensor>& r, const Tensor& labels_q,
    const std::optional<Tensor>& labels_r, bool exclude_diag, int64_t kind, double p0, double p1,
    double p2, bool mine, double miner_eps) {
  check_pair_kind(kind);
  const PairOperands op = pair_operands(q, r, labels_q, labels_r);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t N = q.size(0), D = q.size(1);
  const auto opts = q.options().dtype(acc_type(q));
  Tensor lse_pos = at::empty({N}, opts), lse_neg = at::empty({N}, opts);
  Tensor min_pos = at::empty({N}, opts), max_neg = at::empty({N}, opts);
  Tensor cnt_pos = at::empty({N}, q.options().dtype(at::kInt));
  Tensor cnt_neg = at::empty({N}, q.options().dtype(at::kInt));
  if (N > 0) {
    const fpl_cuda::PairParams pp{kind, p0, p1, p2, mine, miner_eps, op.self_mode || exclude_diag};
    check_launch(
        fpl_cuda::pair_forward(dtype_code(q), q.data_ptr(), op.r.data_ptr(),
                               labels_q.data_ptr<int64_t>(), op.labels_r.data_ptr<int64_t>(), N,
                               op.M, D, op.self_mode, can_vec16(q, op.r), pp, lse_pos.data_ptr(),
                               lse_neg.data_ptr(), cnt_pos.data_ptr<int32_t>(),
                               cnt_neg.data_ptr<int32_t>(), min_pos.data_ptr(), max_neg.data_ptr(),
                               c10::cuda::getCurrentCUDAStream(q.device().index()).stream()),
        "pair_engine_forward");
  }
  return {lse_pos, lse_neg, cnt_pos, cnt_neg, min_pos, max_neg};
}

std::tuple<Tensor, Tensor> pair_engine_backward_cuda(
    const Tensor& grad_lse_pos, const Tensor& grad_lse_neg, const Tensor& q,
    const std::optional<Tensor>& r, const Tensor& labels_q, const std::optional<Tensor>& labels_r,
    const Tensor& lse_pos, const Tensor& lse_neg, const Tensor& min_pos, const Tensor& max_neg,
    bool exclude_diag, int64_t kind, double p0, double p1, double p2, bool mine, double miner_eps) {
  check_pair_kind(kind);
  const PairOperands op = pair_operands(q, r, labels_q, labels_r);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t N = q.size(0), D = q.size(1);
  const Tensor gp = row_vector(grad_lse_pos, "grad_lse_pos", N, q);
  const Tensor gn = row_vector(grad_lse_neg, "grad_lse_neg", N, q);
  const Tensor lp = row_vector(lse_pos, "lse_pos", N, q);
  const Tensor ln = row_vector(lse_neg, "lse_neg", N, q);
  const Tensor mp = row_vector(min_pos, "min_pos", N, q);
  const Tensor mn = row_vector(max_neg, "max_neg", N, q);
  const auto opts = q.options().dtype(acc_type(q));
  Tensor gq = at::zeros({N, D}, opts);
  Tensor gr = op.self_mode ? Tensor() : at::zeros({op.M, D}, opts);
  const fpl_cuda::PairParams pp{kind, p0, p1, p2, mine, miner_eps, op.self_mode || exclude_diag};
  check_launch(
      fpl_cuda::pair_backward(dtype_code(q), gp.data_ptr(), gn.data_ptr(), q.data_ptr(),
                              op.r.data_ptr(), labels_q.data_ptr<int64_t>(),
                              op.labels_r.data_ptr<int64_t>(), lp.data_ptr(), ln.data_ptr(),
                              mp.data_ptr(), mn.data_ptr(), N, op.M, D, op.self_mode,
                              can_vec16(q, op.r), pp, gq.data_ptr(),
                              op.self_mode ? nullptr : gr.data_ptr(),
                              c10::cuda::getCurrentCUDAStream(q.device().index()).stream()),
      "pair_engine_backward");
  Tensor grad_q = gq.to(q.scalar_type());
  Tensor grad_r = op.self_mode ? at::empty({0}, q.options()) : gr.to(q.scalar_type());
  return {grad_q, grad_r};
}

void check_class_inputs(const Tensor& q, const Tensor& w, const Tensor& labels, int64_t K,
                        int64_t kind) {
  check_matrix(q, "q", q);
  check_matrix(w, "w", q);
  TORCH_CHECK(w.size(1) == q.size(1), "fused_pairloss (cuda): w must have D=", q.size(1),
              " columns; got shape ", w.sizes());
  check_labels(labels, "labels", q.size(0), q);
  TORCH_CHECK(kind == fpl::kSoftTriple || kind == fpl::kProxyCircle,
              "fused_pairloss (cuda): unknown class loss kind ", kind);
  TORCH_CHECK(K >= 1 && K <= fpl_cuda::kMaxCentersPerClass,
              "fused_pairloss (cuda): centers_per_class must be in [1, ",
              fpl_cuda::kMaxCentersPerClass, "] for the CUDA class engine; got ", K);
  TORCH_CHECK(w.size(0) % K == 0, "fused_pairloss (cuda): w has ", w.size(0),
              " rows, not a multiple of centers_per_class=", K);
  TORCH_CHECK(kind != fpl::kProxyCircle || K == 1,
              "fused_pairloss (cuda): ProxyCircle needs centers_per_class=1; got ", K);
}

std::tuple<Tensor, Tensor> class_engine_forward_cuda(const Tensor& q, const Tensor& w,
                                                     const Tensor& labels,
                                                     int64_t centers_per_class, int64_t kind,
                                                     double p0, double p1, double p2) {
  const int64_t K = centers_per_class;
  check_class_inputs(q, w, labels, K, kind);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t N = q.size(0), D = q.size(1), C = w.size(0) / K;
  const auto opts = q.options().dtype(acc_type(q));
  Tensor lse = at::empty({N}, opts), target_sim = at::empty({N}, opts);
  if (N > 0) {
    check_launch(fpl_cuda::class_forward(dtype_code(q), q.data_ptr(), w.data_ptr(),
                                         labels.data_ptr<int64_t>(), N, C, K, D, can_vec16(q, w),
                                         kind, p0, p1, p2, lse.data_ptr(), target_sim.data_ptr(),
                                         c10::cuda::getCurrentCUDAStream(q.device().index()).stream()),
                 "class_engine_forward");
  }
  return {lse, target_sim};
}

std::tuple<Tensor, Tensor> class_engine_backward_cuda(
    const Tensor& grad_lse, const Tensor& grad_target_sim, const Tensor& q, const Tensor& w,
    const Tensor& labels, const Tensor& lse, int64_t centers_per_class, int64_t kind, double p0,
    double p1, double p2) {
  const int64_t K = centers_per_class;
  check_class_inputs(q, w, labels, K, kind);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t N = q.size(0), D = q.size(1), C = w.size(0) / K;
  const Tensor gl = row_vector(grad_lse, "grad_lse", N, q);
  const Tensor gt = row_vector(grad_target_sim, "grad_target_sim", N, q);
  const Tensor ls = row_vector(lse, "lse", N, q);
  const auto opts = q.options().dtype(acc_type(q));
  Tensor gq = at::zeros({N, D}, opts), gw = at::zeros({w.size(0), D}, opts);
  check_launch(fpl_cuda::class_backward(dtype_code(q), gl.data_ptr(), gt.data_ptr(), q.data_ptr(),
                                        w.data_ptr(), labels.data_ptr<int64_t>(), ls.data_ptr(), N,
                                        C, K, D, can_vec16(q, w), kind, p0, p1, p2, gq.data_ptr(),
                                        gw.data_ptr(),
                                        c10::cuda::getCurrentCUDAStream(q.device().index()).stream()),
               "class_engine_backward");
  return {gq.to(q.scalar_type()), gw.to(w.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_pairloss, CUDA, m) {
  m.impl("pair_engine_forward", TORCH_FN(pair_engine_forward_cuda));
  m.impl("pair_engine_backward", TORCH_FN(pair_engine_backward_cuda));
  m.impl("class_engine_forward", TORCH_FN(class_engine_forward_cuda));
  m.impl("class_engine_backward", TORCH_FN(class_engine_backward_cuda));
}
