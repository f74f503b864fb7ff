// Test-only C entry points of the CPU emulation build (loaded with ctypes by
// tests/test_cuda_backend.py): the launchers of launchers.h with host pointers.
#include "cuda/emu/cuda_emu.h"
#include "cuda/launchers.h"

extern "C" {

int fpl_emu_pair_forward(int dt, const void* q, const void* r, const int64_t* lq, const int64_t* lr,
                         int64_t N, int64_t M, int64_t D, int self_mode, int vec16, int64_t kind,
                         double p0, double p1, double p2, int mine, double eps, int exclude_diag,
                         void* lse_pos, void* lse_neg, int32_t* cnt_pos, int32_t* cnt_neg,
                         void* min_pos, void* max_neg) {
  const fpl_cuda::PairParams p{kind, p0, p1, p2, mine != 0, eps, exclude_diag != 0};
  return int(fpl_cuda::pair_forward(fpl_cuda::DType(dt), q, r, lq, lr, N, M, D, self_mode != 0,
                                    vec16 != 0, p, lse_pos, lse_neg, cnt_pos, cnt_neg, min_pos,
                                    max_neg, nullptr));
}

int fpl_emu_pair_backward(int dt, const void* gp, const void* gn, const void* q, const void* r,
                          const int64_t* lq, const int64_t* lr, const void* lse_pos,
                          const void* lse_neg, const void* min_pos, const void* max_neg, int64_t N,
                          int64_t M, int64_t D, int self_mode, int vec16, int64_t kind, double p0,
                          double p1, double p2, int mine, double eps, int exclude_diag,
                          void* grad_q, void* grad_r) {
  const fpl_cuda::PairParams p{kind, p0, p1, p2, mine != 0, eps, exclude_diag != 0};
  return int(fpl_cuda::pair_backward(fpl_cuda::DType(dt), gp, gn, q, r, lq, lr, lse_pos, lse_neg,
                                     min_pos, max_neg, N, M, D, self_mode != 0, vec16 != 0, p,
                                     grad_q, grad_r, nullptr));
}

int fpl_emu_class_forward(int dt, const void* q, const void* w, const int64_t* labels, int64_t N,
                          int64_t C, int64_t K, int64_t D, int vec16, int64_t kind, double p0,
                          double p1, double p2, void* lse, void* target_sim) {
  return int(fpl_cuda::class_forward(fpl_cuda::DType(dt), q, w, labels, N, C, K, D, vec16 != 0,
                                     kind, p0, p1, p2, lse, target_sim, nullptr));
}

int fpl_emu_class_backward(int dt, const void* gl, const void* gt, const void* q, const void* w,
                           const int64_t* labels, const void* lse, int64_t N, int64_t C, int64_t K,
                           int64_t D, int vec16, int64_t kind, double p0, double p1, double p2,
                           void* grad_q, void* grad_w) {
  return int(fpl_cuda::class_backward(fpl_cuda::DType(dt), gl, gt, q, w, labels, lse, N, C, K, D,
                                      vec16 != 0, kind, p0, p1, p2, grad_q, grad_w, nullptr));
}

}  // extern "C"
