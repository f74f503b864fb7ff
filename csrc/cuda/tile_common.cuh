// Building blocks shared by the CUDA pair and class engines (no torch headers).
//
// A CTA of kThreads threads owns kBM "owner" rows and walks tiles of kBN "other" rows. One tile:
//   1. tile_dot: S tile (kBM x kBN) = A_rows . B_rows^T into shared memory `Ss` (accumulation type
//      A), staged through shared memory in chunks of D. fp16/bf16: tensor cores (WMMA 16x16x16,
//      fp32 accumulation); fp32/fp64: FMA in the input precision. Each S element is the sum over d
//      in increasing order of chunks (FMA: strictly sequential fma over d), so the same call always
//      gives bitwise the same tile, in every pass.
//   2. the engine's per-element math on the tile: the loss declaration (common/loss_spec.h) and its
//      per-element functions (common/pair_terms.inl, included below into this namespace);
//   3. backward only: accumulate_tile, out[owner rows] += H_tile . V[other rows] (FMA in A, rows
//      owned by this CTA: no atomics, deterministic order).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#ifndef FPL_CUDA_EMULATION
#include <mma.h>
#endif
// FPL_CUDA_EMULATION: csrc/cuda/emu/ compiles these kernels as plain C++ (one std::thread per CUDA
// thread, emulated barriers / shuffles / WMMA) so that their logic is tested on machines without
// a GPU (tests/test_cuda_backend.py). It changes nothing in the real build.

#include "common/loss_spec.h"

namespace fpl_cuda {

using fpl::ClassSpec;
using fpl::PairSpec;
using fpl::PairTermParams;

// ---- the per-element math of the declaration (one definition for every C++ backend) ----------
#define FPL_TERM_FN __host__ __device__ __forceinline__
FPL_TERM_FN float math_exp(float x) { return ::expf(x); }
FPL_TERM_FN double math_exp(double x) { return ::exp(x); }
FPL_TERM_FN float math_log(float x) { return ::logf(x); }
FPL_TERM_FN double math_log(double x) { return ::log(x); }
FPL_TERM_FN float math_log1p(float x) { return ::log1pf(x); }
FPL_TERM_FN double math_log1p(double x) { return ::log1p(x); }
FPL_TERM_FN float math_sqrt(float x) { return ::sqrtf(x); }
FPL_TERM_FN double math_sqrt(double x) { return ::sqrt(x); }

#include "common/pair_terms.inl"

#define FPL_DEV __device__ __forceinline__

template <typename A>
FPL_DEV A pos_inf() {
  return A(INFINITY);
}
template <typename A>
FPL_DEV A neg_inf() {
  return -A(INFINITY);
}
template <typename A>
FPL_DEV A quiet_nan() {
  return A(NAN);
}

// ---- online log-sum-exp: running (max, sum of exp(x - max)); empty set -> -inf; NaN sticks ----
template <typename A>
struct OnlineLSE {
  A max, sum;
  FPL_DEV void init() {
    max = neg_inf<A>();
    sum = A(0);
  }
  FPL_DEV void add(A x) {
    if (x > max) {
      sum = sum * math_exp(max - x) + A(1);  // max = -inf at first: exp(-inf) = 0
      max = x;
    } else if (x != x) {
      sum = x;
    } else if (x != neg_inf<A>()) {
      sum += math_exp(x - max);
    }
  }
  // merge a partial (max, sum) computed elsewhere; symmetric: both lanes of a pair get the same bits
  FPL_DEV void merge(A omax, A osum) {
    if (osum != osum || sum != sum) {
      sum = (osum != osum) ? osum : sum;
      return;
    }
    if (osum == A(0)) return;
    if (sum == A(0)) {
      max = omax;
      sum = osum;
      return;
    }
    if (omax > max) {
      sum = sum * math_exp(max - omax) + osum;
      max = omax;
    } else {
      sum += osum * math_exp(omax - max);
    }
  }
  FPL_DEV A value() const {
    if (sum != sum) return sum;
    return sum > A(0) ? max + math_log(sum) : neg_inf<A>();
  }
};

// NaN-propagating min / max (torch.amin / amax semantics).
template <typename A>
FPL_DEV A nan_min(A a, A b) {
  return (a != a || b != b) ? (a != a ? a : b) : (b < a ? b : a);
}
template <typename A>
FPL_DEV A nan_max(A a, A b) {
  return (a != a || b != b) ? (a != a ? a : b) : (b > a ? b : a);
}

// ---- tile geometry -------------------------------------------------------------------------------
constexpr int kThreads = 128;  // 4 warps
constexpr int kBM = 64;        // owner rows per CTA
constexpr int kBN = 64;        // other rows per tile (== kBM: row blocks and column tiles align)
constexpr int kLDS = kBN + 4;  // row stride of the S tile in shared memory (WMMA: multiple of 4)
static_assert(kBM == kBN, "the passes that swap owner and other rely on one tile grid");
static_assert(kBM == kCtaRows, "the host glue checks the grid size with launchers.h kCtaRows");

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

FPL_DEV float to_acc(float x) { return x; }
FPL_DEV double to_acc(double x) { return x; }
FPL_DEV float to_acc(__half x) { return __half2float(x); }
FPL_DEV float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
FPL_DEV T zero_of();
template <>
FPL_DEV float zero_of<float>() {
  return 0.f;
}
template <>
FPL_DEV double zero_of<double>() {
  return 0.0;
}
template <>
FPL_DEV __half zero_of<__half>() {
  return __float2half(0.f);
}
template <>
FPL_DEV __nv_bfloat16 zero_of<__nv_bfloat16>() {
  return __float2bfloat16(0.f);
}

FPL_DEV float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
FPL_DEV double fma_acc(double a, double b, double c) { return fma(a, b, c); }

// Does this element type go through tensor cores on the arch being compiled?
template <typename T>
struct UseMma {
  static constexpr bool value = false;
};
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700) || defined(FPL_CUDA_EMULATION)
template <>
struct UseMma<__half> {
  static constexpr bool value = true;
};
#endif
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(FPL_CUDA_EMULATION)
template <>
struct UseMma<__nv_bfloat16> {
  static constexpr bool value = true;
};
#endif

// Chunk of D staged per step: FMA path (stage in A, k-major) / MMA path (stage in T, row-major).
template <typename A>
struct FmaBK {
  static constexpr int value = 16;
};
template <>
struct FmaBK<double> {
  static constexpr int value = 8;
};
constexpr int kMmaBK = 32;
constexpr int kMmaLDK = kMmaBK + 8;  // halves; 80-byte rows keep WMMA pointers 32-byte aligned
constexpr int kFmaLDT = kBM + 4;

// Shared-memory layout of every kernel: [Ss: kBM x kLDS of A][stage][kernel-specific extras].
template <typename T>
struct Smem {
  using A = typename AccOf<T>::type;
  static constexpr int kSsBytes = kBM * kLDS * int(sizeof(A));
  static constexpr int kFmaStageBytes = 2 * FmaBK<A>::value * kFmaLDT * int(sizeof(A));
  static constexpr int kMmaStageBytes = sizeof(T) == 2 ? 2 * kBM * kMmaLDK * int(sizeof(T)) : 0;
  static constexpr int kStageBytes0 = kFmaStageBytes > kMmaStageBytes ? kFmaStageBytes : kMmaStageBytes;
  static constexpr int kStageBytes = (kStageBytes0 + 127) / 128 * 128;
  static constexpr int kExtraOffset = kSsBytes + kStageBytes;
};

// Load rows [row0, row0 + n) x [d0, d0 + BK) of X (row stride D) into the stage, zero-padded.
// kKMajor: dst[k * ld + i] (FMA path), else dst[i * ld + k] (MMA path). vec16: 16-byte loads.
template <typename T, typename S, int BK, bool kKMajor>
FPL_DEV void stage_rows(const T* __restrict__ X, int64_t row0, int n, int64_t D, int64_t d0, bool vec16, S* dst,
                        int ld) {
  constexpr int V = 16 / int(sizeof(T));  // elements per 16-byte vector
  static_assert(BK % V == 0, "a staged chunk must hold whole 16-byte vectors");
  const int t = threadIdx.x;
  if (vec16) {
    constexpr int G = BK / V;  // vectors per row of the chunk
    for (int g = t; g < kBM * G; g += kThreads) {
      const int i = g / G, k = (g % G) * V;
      const int64_t d = d0 + k;
      uint4 u = make_uint4(0u, 0u, 0u, 0u);  // all-zero bits are +0 in every element type
      if (i < n && d < D) u = __ldg(reinterpret_cast<const uint4*>(X + (row0 + i) * D + d));
      const T* v = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        S val;
        if constexpr (std::is_same<S, T>::value)
          val = v[e];
        else
          val = S(to_acc(v[e]));
        if constexpr (kKMajor)
          dst[(k + e) * ld + i] = val;
        else
          dst[i * ld + k + e] = val;
      }
    }
  } else {
    for (int g = t; g < kBM * BK; g += kThreads) {
      const int i = g / BK, k = g % BK;
      const int64_t d = d0 + k;
      T x = (i < n && d < D) ? X[(row0 + i) * D + d] : zero_of<T>();
      S val;
      if constexpr (std::is_same<S, T>::value)
        val = x;
      else
        val = S(to_acc(x));
      if constexpr (kKMajor)
        dst[k * ld + i] = val;
      else
        dst[i * ld + k] = val;
    }
  }
}

// FMA path: thread (ty = t/8, tx = t%8) owns rows ty + 16a, columns tx + 8b of the tile.
template <typename T>
__device__ void tile_dot_fma(const T* __restrict__ Am, int64_t a0, int na, const T* __restrict__ Bm, int64_t b0, int nb,
                             int64_t D, bool vec16, bool transpose, typename AccOf<T>::type* Ss, unsigned char* stage) {
  using A = typename AccOf<T>::type;
  constexpr int BK = FmaBK<A>::value;
  A* As = reinterpret_cast<A*>(stage);
  A* Bs = As + BK * kFmaLDT;
  const int t = threadIdx.x, tx = t % 8, ty = t / 8;
  A acc[4][8];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 8; ++b) acc[a][b] = A(0);
  for (int64_t d0 = 0; d0 < D; d0 += BK) {
    __syncthreads();  // the stage of the previous chunk is consumed
    stage_rows<T, A, BK, true>(Am, a0, na, D, d0, vec16, As, kFmaLDT);
    stage_rows<T, A, BK, true>(Bm, b0, nb, D, d0, vec16, Bs, kFmaLDT);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      A av[4], bv[8];
#pragma unroll
      for (int a = 0; a < 4; ++a) av[a] = As[k * kFmaLDT + ty + 16 * a];
#pragma unroll
      for (int b = 0; b < 8; ++b) bv[b] = Bs[k * kFmaLDT + tx + 8 * b];
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 8; ++b) acc[a][b] = fma_acc(av[a], bv[b], acc[a][b]);
    }
  }
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 8; ++b) {
      const int i = ty + 16 * a, j = tx + 8 * b;
      Ss[transpose ? j * kLDS + i : i * kLDS + j] = acc[a][b];
    }
}

// Tensor-core path (fp16/bf16 in, fp32 out): warp (wr, wc) owns the 32 x 32 quarter (wr, wc).
template <typename T>
__device__ void tile_dot_mma(const T* __restrict__ Am, int64_t a0, int na, const T* __restrict__ Bm, int64_t b0, int nb,
                             int64_t D, bool vec16, bool transpose, float* Ss, unsigned char* stage) {
  namespace wmma = nvcuda::wmma;
  T* As = reinterpret_cast<T*>(stage);
  T* Bs = As + kBM * kMmaLDK;
  const int warp = threadIdx.x / 32, wr = warp / 2, wc = warp % 2;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(c[i][j], 0.0f);
  for (int64_t d0 = 0; d0 < D; d0 += kMmaBK) {
    __syncthreads();
    stage_rows<T, T, kMmaBK, false>(Am, a0, na, D, d0, vec16, As, kMmaLDK);
    stage_rows<T, T, kMmaBK, false>(Bm, b0, nb, D, d0, vec16, Bs, kMmaLDK);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kMmaBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], As + (wr * 32 + i * 16) * kMmaLDK + kk, kMmaLDK);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], Bs + (wc * 32 + j * 16) * kMmaLDK + kk, kMmaLDK);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(c[i][j], fa[i], fb[j], c[i][j]);
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int r = wr * 32 + i * 16, col = wc * 32 + j * 16;
      if (!transpose)
        wmma::store_matrix_sync(Ss + r * kLDS + col, c[i][j], kLDS, wmma::mem_row_major);
      else  // element (r + a, col + b) lands at Ss[(col + b) * kLDS + r + a]
        wmma::store_matrix_sync(Ss + col * kLDS + r, c[i][j], kLDS, wmma::mem_col_major);
    }
}

// Ss[i][j] = A[a0 + i] . B[b0 + j] (transpose: Ss[j][i] = ...) for i < kBM, j < kBN; rows past
// na / nb are zeros. Starts and ends with __syncthreads (readers of the previous Ss are done,
// the new tile is visible to all threads).
template <typename T>
FPL_DEV void tile_dot(const T* __restrict__ Am, int64_t a0, int na, const T* __restrict__ Bm, int64_t b0, int nb,
                      int64_t D, bool vec16, bool transpose, typename AccOf<T>::type* Ss, unsigned char* stage) {
  __syncthreads();
  if constexpr (UseMma<T>::value) {
    tile_dot_mma<T>(Am, a0, na, Bm, b0, nb, D, vec16, transpose, Ss, stage);
  } else {
    tile_dot_fma<T>(Am, a0, na, Bm, b0, nb, D, vec16, transpose, Ss, stage);
  }
  __syncthreads();
}

// Output row of local owner row o: rows[o0 + o] through the map (a permutation: the row's place in
// the caller's tensor), or o0 + o.
FPL_DEV int64_t mapped_row(const int64_t* rows, int64_t i) { return rows ? rows[i] : i; }

// out[row(o), :] += sum_{x < nx} H[o][x] * V[x, :] for o < no, row(o) = mapped_row(out_rows, o0 + o)
// (out: row stride D; V already offset to the other block, row stride D). Thread (rg = t/16,
// dl = t%16) owns rows rg + 8a, columns d0 + dl + 16u of each 64-wide chunk of D. Ends with no
// barrier; the next tile_dot starts with one.
template <typename T>
__device__ void accumulate_tile(const typename AccOf<T>::type* Hs, int no, int nx,
                                typename AccOf<T>::type* __restrict__ out, const int64_t* out_rows, int64_t o0,
                                const T* __restrict__ V, int64_t D) {
  using A = typename AccOf<T>::type;
  const int t = threadIdx.x, rg = t / 16, dl = t % 16;
  int64_t row[8];
#pragma unroll
  for (int a = 0; a < 8; ++a) {
    const int o = rg + 8 * a;
    row[a] = o < no ? mapped_row(out_rows, o0 + o) : 0;
  }
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    A acc[8][4];
#pragma unroll
    for (int a = 0; a < 8; ++a) {
      const int o = rg + 8 * a;
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int64_t d = d0 + dl + 16 * u;
        acc[a][u] = (o < no && d < D) ? out[row[a] * D + d] : A(0);
      }
    }
    for (int x = 0; x < nx; ++x) {
      A v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int64_t d = d0 + dl + 16 * u;
        v[u] = d < D ? to_acc(V[int64_t(x) * D + d]) : A(0);
      }
#pragma unroll
      for (int a = 0; a < 8; ++a) {
        const A h = Hs[(rg + 8 * a) * kLDS + x];
#pragma unroll
        for (int u = 0; u < 4; ++u) acc[a][u] = fma_acc(h, v[u], acc[a][u]);
      }
    }
#pragma unroll
    for (int a = 0; a < 8; ++a) {
      const int o = rg + 8 * a;
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int64_t d = d0 + dl + 16 * u;
        if (o < no && d < D) out[row[a] * D + d] = acc[a][u];
      }
    }
  }
}

// Shuffles with the other thread of a row pair (lanes 2k, 2k+1); every thread of the CTA calls them.
template <typename V>
FPL_DEV V pair_lane(V v) {
  return __shfl_xor_sync(0xffffffffu, v, 1);
}

template <typename A>
FPL_DEV void merge_pair_lanes(OnlineLSE<A>& s) {
  const A omax = pair_lane(s.max);
  const A osum = pair_lane(s.sum);
  s.merge(omax, osum);
}

// Kernel launch with kThreads threads per CTA and `smem` bytes of dynamic shared memory.
#ifdef FPL_CUDA_EMULATION
#define FPL_LAUNCH(kernel, grid, smem, stream, ...) ::fpl_emu::launch(kernel, grid, kThreads, __VA_ARGS__)
#else
#define FPL_LAUNCH(kernel, grid, smem, stream, ...) kernel<<<grid, kThreads, smem, stream>>>(__VA_ARGS__)
#endif

// Opt in to more than 48 KiB of dynamic shared memory where a kernel needs it.
template <typename Kern>
inline cudaError_t prepare_smem(Kern kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

inline unsigned grid_for(int64_t n, int64_t per_block) {
  return static_cast<unsigned>((n + per_block - 1) / per_block);
}

// The first error of a sequence of launches.
inline cudaError_t first_error(cudaError_t a, cudaError_t b) { return a != cudaSuccess ? a : b; }

}  // namespace fpl_cuda
