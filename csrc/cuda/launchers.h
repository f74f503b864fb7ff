// Plain C++ entry points of the CUDA kernels (defined in pair_engine.cu / class_engine.cu).
//
// The .cu files include no torch headers (fast compiles); the host glue (ops_cuda.cpp) checks the
// tensors, allocates the outputs, takes the current PyTorch stream and calls these functions with
// raw pointers. Every launcher returns the first CUDA error it saw (cudaSuccess if none); the glue
// turns an error into a Python exception.
//
// Element types: q / r / w and the returned gradients' inputs are `DType`; the statistics are the
// accumulation type A = double for kFloat64, float otherwise (ops/README.md).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fpl_cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// The loss parameters of one call (ops/README.md): kind, p0..p2, mining.
struct PairParams {
  int64_t kind;
  double p0, p1, p2;
  bool mine;
  double miner_eps;
  bool exclude_diag;
};

// Self mode: r == q and labels_r == labels_q (pass the same pointers, M == N).
// vec16: q and r rows may be read 16 bytes at a time (D * elem_size % 16 == 0, 16-byte aligned).
// Outputs (length N): lse_pos, lse_neg, min_pos, max_neg in A; counts int32.
cudaError_t pair_forward(DType dt, const void* q, const void* r, const int64_t* labels_q,
                         const int64_t* labels_r, int64_t N, int64_t M, int64_t D, bool self_mode,
                         bool vec16, const PairParams& p, void* lse_pos, void* lse_neg,
                         int32_t* count_pos, int32_t* count_neg, void* min_pos, void* max_neg,
                         cudaStream_t stream);

// grad_q_acc (N x D, A, zero-filled by the caller) receives dL/dq; in ref mode grad_r_acc
// (M x D, A, zero-filled) receives dL/dr (ignored in self mode). Row statistics in A.
cudaError_t pair_backward(DType dt, const void* grad_lse_pos, const void* grad_lse_neg,
                          const void* q, const void* r, const int64_t* labels_q,
                          const int64_t* labels_r, const void* lse_pos, const void* lse_neg,
                          const void* min_pos, const void* max_neg, int64_t N, int64_t M, int64_t D,
                          bool self_mode, bool vec16, const PairParams& p, void* grad_q_acc,
                          void* grad_r_acc, cudaStream_t stream);

// Largest centers_per_class K the class engine supports (a tile holds whole classes).
constexpr int64_t kMaxCentersPerClass = 64;

// q (N x D), w (C*K x D); outputs lse, target_sim (N, A).
cudaError_t class_forward(DType dt, const void* q, const void* w, const int64_t* labels, int64_t N,
                          int64_t C, int64_t K, int64_t D, bool vec16, int64_t kind, double p0,
                          double p1, double p2, void* lse, void* target_sim, cudaStream_t stream);

// grad_q_acc (N x D, A) and grad_w_acc (C*K x D, A), both zero-filled by the caller.
cudaError_t class_backward(DType dt, const void* grad_lse, const void* grad_target_sim,
                           const void* q, const void* w, const int64_t* labels, const void* lse,
                           int64_t N, int64_t C, int64_t K, int64_t D, bool vec16, int64_t kind,
                           double p0, double p1, double p2, void* grad_q_acc, void* grad_w_acc,
                           cudaStream_t stream);

}  // namespace fpl_cuda
