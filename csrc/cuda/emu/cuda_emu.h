// CPU emulation of the few CUDA features the kernels of csrc/cuda use, so that their logic
// (tiling, masks, label-sorted bands, online LSE, barriers, shuffles, transposed / symmetrized
// tiles, WMMA fragment layouts) is tested on machines without a GPU. Test-only: built by
// tests/test_cuda_backend.py (emu_pair.cpp, emu_class.cpp: the .cu files as plain C++;
// emu_ops.cpp: the real host glue around them, as ops fpl_cuda_emu::*), never part of the
// extension (setup.py only globs csrc/cuda/*.cpp / *.cu).
//
// One std::thread per CUDA thread of a CTA (kThreads), CTAs run one after another; __syncthreads
// is a std::barrier; __shfl_xor_sync exchanges through a block buffer between two barriers (the
// kernels only shuffle with every thread of the CTA present); WMMA fragments hold whole 16 x 16
// tiles per thread, the accumulator is written by lane 0 of the warp.
#pragma once
#define FPL_CUDA_EMULATION 1

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include <cuda_runtime_api.h>
#include <vector_functions.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#ifndef __global__
#define __global__
#endif
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __shared__
#define __shared__
#undef __forceinline__
#define __forceinline__ inline
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __global__
#define __global__

namespace fpl_emu {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Dim3 tl_thread_idx, tl_block_idx;
inline std::barrier<>* g_barrier = nullptr;
inline unsigned char g_xchg[1024 * 8];

inline void syncthreads() { g_barrier->arrive_and_wait(); }

template <typename T>
T shfl_xor(unsigned /*mask*/, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  const unsigned t = tl_thread_idx.x;
  std::memcpy(g_xchg + 8 * t, &v, sizeof(T));
  syncthreads();
  T r;
  std::memcpy(&r, g_xchg + 8 * (t ^ unsigned(lane_mask)), sizeof(T));
  syncthreads();
  return r;
}

template <typename T>
inline T ldg(const T* p) {
  return *p;
}

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), unsigned grid, int threads, Args... args) {
  std::barrier<> bar(threads);
  g_barrier = &bar;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t]() {
      tl_thread_idx.x = unsigned(t);
      for (unsigned b = 0; b < grid; ++b) {
        tl_block_idx.x = b;
        kernel(args...);
        bar.arrive_and_wait();  // the next CTA reuses the shared memory
      }
    });
  }
  for (auto& th : pool) th.join();
  g_barrier = nullptr;
}

}  // namespace fpl_emu

#define threadIdx (::fpl_emu::tl_thread_idx)
#define blockIdx (::fpl_emu::tl_block_idx)
#define __syncthreads() ::fpl_emu::syncthreads()
#define __shfl_xor_sync(mask, v, lane) ::fpl_emu::shfl_xor(mask, v, lane)
#define __ldg(p) ::fpl_emu::ldg(p)
#define cudaGetLastError() (cudaSuccess)
#define cudaFuncSetAttribute(...) (cudaSuccess)
// products rounded on their own (this build never contracts into FMAs: no FMA in its target)
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }

// ---- WMMA (nvcuda::wmma) with the documented semantics of the calls the kernels make --------
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  float x[16 * 16];
};  // x[r * 16 + c]; fp16/bf16 values are exact in float

inline float to_f(float v) { return v; }
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename F>
void fill_fragment(F& f, float v) {
  for (float& e : f.x) e = v;
}

template <typename T>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 16; ++k) f.x[r * 16 + k] = to_f(p[r * ldm + k]);
}
template <typename T>  // element (k, n) of B at p[n * ldm + k]
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major>& f, const T* p, unsigned ldm) {
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 16; ++n) f.x[k * 16 + n] = to_f(p[n * ldm + k]);
}
template <typename T>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, row_major>& a,
              const fragment<matrix_b, 16, 16, 16, T, col_major>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float acc = 0.f;
      for (int k = 0; k < 16; ++k) acc += a.x[i * 16 + k] * b.x[k * 16 + j];
      out[i * 16 + j] = c.x[i * 16 + j] + acc;
    }
  std::memcpy(d.x, out, sizeof(out));
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  if (::fpl_emu::tl_thread_idx.x % 32 != 0) return;  // one writer per warp
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) {
      if (layout == mem_row_major)
        p[r * ldm + c] = f.x[r * 16 + c];
      else
        p[c * ldm + r] = f.x[r * 16 + c];
    }
}
}  // namespace wmma
}  // namespace nvcuda
