// ATen-side helpers shared by the CPU engines' glue (pair_engine_cpu.cpp, triplet_engine_cpu.cpp,
// class_engine_cpu.cpp, listed_pairs_cpu.cpp): the work loops (subnormals flushed inside), operand staging
// (padded rows, squared norms, packed panels and column chunks for the kernels of cpu_kernels.h), the
// strips of u that the triplet engine and the listed pairs read, and the lp norms' share of a gradient.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <vector>
#if defined(__SSE2__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

#include "cpu/cpu_kernels.h"

namespace fpl {
namespace cpu {
namespace glue {

using at::Tensor;

// Subnormal floats are flushed to zero (FTZ) and read as zero (DAZ) while an engine's work item
// runs on a thread, and the thread's flags restored after. A term far below its row's maximum
// makes exp(x - lse) times an upstream gradient of 1/N underflow to a subnormal, and on x86 every
// arithmetic operation on one costs about 100 cycles: a gradient tile holding a few per thousand
// made the GEMMs behind it several times slower (LargeMarginSoftmax on raw embeddings, N = 4096,
// C = 250000: 8 s instead of 3.5 s). What is dropped is below the smallest normal number.
class SubnormalsAreZero {
#if defined(__SSE2__) || defined(_M_X64)
 public:
  SubnormalsAreZero() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }  // FTZ (bit 15) | DAZ (bit 6)
  ~SubnormalsAreZero() { _mm_setcsr(saved_); }
  SubnormalsAreZero(const SubnormalsAreZero&) = delete;
  SubnormalsAreZero& operator=(const SubnormalsAreZero&) = delete;

 private:
  unsigned int saved_;
#endif
};

// at::parallel_for with each chunk under SubnormalsAreZero.
template <typename F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    SubnormalsAreZero ftz;
    f(b, e);
  });
}

// Runs f(k, scratch) for every k in [0, n) on an OpenMP team of at::get_num_threads() threads
// (scratch = init(), once per thread), items handed out dynamically: items are independent
// (disjoint output rows), so which thread runs one does not matter. `parallel` false runs them
// inline (tiny problems, where starting a team costs more than the work).
template <typename Init, typename F>
inline void tile_parallel(int64_t n, bool parallel, const Init& init, const F& f) {
  if (n <= 0) return;
#ifdef _OPENMP
  const int nt = parallel ? static_cast<int>(std::min<int64_t>(std::max(1, at::get_num_threads()), n)) : 1;
  if (nt > 1) {
    std::exception_ptr err = nullptr;
    std::atomic<bool> failed{false};
    std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(nt)
    {
      try {
        SubnormalsAreZero ftz;
        auto scratch = init();
        for (int64_t k = next.fetch_add(1); k < n && !failed.load(); k = next.fetch_add(1)) f(k, scratch);
      } catch (...) {
        if (!failed.exchange(true)) err = std::current_exception();
      }
    }
    if (err) std::rethrow_exception(err);
    return;
  }
#endif
  SubnormalsAreZero ftz;
  auto scratch = init();
  for (int64_t k = 0; k < n; ++k) f(k, scratch);
}

inline bool parallel_work(int64_t N, int64_t M, int64_t D) {
  return static_cast<double>(N) * static_cast<double>(M) * static_cast<double>(std::max<int64_t>(D, 8)) > 4.0e6;
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename T>
void transpose(const T* src, int rows, int cols, int64_t lds, T* dst, int64_t ldd) {
  constexpr int B = 32;  // dst (cols x rows, row stride ldd) = src^T
  for (int i0 = 0; i0 < rows; i0 += B)
    for (int j0 = 0; j0 < cols; j0 += B) {
      const int i1 = std::min(rows, i0 + B), j1 = std::min(cols, j0 + B);
      for (int j = j0; j < j1; ++j)
        for (int i = i0; i < i1; ++i) dst[j * ldd + i] = src[i * lds + j];
    }
}

// out[i] += sum_j G[i][j] (rows x cols)
template <typename T>
void add_row_sums(const T* G, int64_t ld, int rows, int cols, T* out) {
  for (int i = 0; i < rows; ++i) {
    T s = T(0);
    for (int j = 0; j < cols; ++j) s += G[i * ld + j];
    out[i] += s;
  }
}

// out[j] += sum_i G[i][j], i ascending
template <typename T>
void add_col_sums(const T* G, int64_t ld, int rows, int cols, T* out) {
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) out[j] += G[i * ld + j];
}

// The distance's dependence on the squared norms (d = sqrt(|q_i|^2 + |r_j|^2 - 2 S_ij)):
// d/dq_i gains q_i * sum_j (dL/dd_ij / d_ij) = -q_i * sum_j G_ij with G = dL/dS, as in torch's
// _euclidean_dist_backward.
template <typename T>
void add_norm_gradient(T* dx, const T* x, const T* gsum, int64_t n, int64_t Dp) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < Dp; ++d) dx[i * Dp + d] -= gsum[i] * x[i * Dp + d];
}

// A vector of values (contiguous, of type T) copied into a buffer zero-padded to the row kernels'
// length (padded_row_length).
template <typename T>
std::vector<T> padded_row(const Tensor& v) {
  std::vector<T> out(padded_row_length(v.numel()), T(0));
  std::copy(v.data_ptr<T>(), v.data_ptr<T>() + v.numel(), out.begin());
  return out;
}

template <typename T>
Tensor padded_rows(const Tensor& x, int64_t Dp) {
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<T>::value);
  Tensor out = at::zeros({x.size(0), Dp}, opts);
  if (x.size(0) > 0 && x.size(1) > 0) out.narrow(1, 0, x.size(1)).copy_(x);
  return out;
}

// padded_rows for an operand that is only read: x itself when it already has that layout (no copy)
template <typename T>
Tensor padded_rows_readonly(const Tensor& x, int64_t Dp) {
  if (x.scalar_type() == c10::CppTypeToScalarType<T>::value && x.is_contiguous() && x.size(1) == Dp) return x;
  return padded_rows<T>(x, Dp);
}

template <typename T>
Tensor squared_norms(const Tensor& x, int64_t D) {  // sequential over d: the same on every ISA
  Tensor out = at::empty({x.size(0)}, x.options());
  const T* p = x.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const int64_t ld = x.size(1);
  for (int64_t i = 0; i < x.size(0); ++i) {
    T s = T(0);
    for (int64_t d = 0; d < D; ++d) s += p[i * ld + d] * p[i * ld + d];
    o[i] = s;
  }
  return out;
}

// x (n, Dp) in column chunks: the B operand of the backward's products
template <typename T>
Tensor pack_columns(const Kernels<T>& K, const Tensor& x) {
  Tensor out = at::empty({std::max<int64_t>(x.numel(), 1)}, x.options());
  if (x.numel() > 0) K.pack_cols(x.data_ptr<T>(), x.size(1), x.size(0), x.size(1), out.data_ptr<T>());
  return out;
}

template <typename T>
Tensor pack(const Kernels<T>& K, const Tensor& x, int64_t D) {
  const int64_t n = x.size(0), np = (n + K.nr - 1) / K.nr;
  Tensor out = at::empty({std::max<int64_t>(np, 1) * D * K.nr}, x.options());
  if (n > 0) K.pack_panels(x.data_ptr<T>(), x.size(1), n, D, out.data_ptr<T>());
  return out;
}

// The u strips of q's rows against every row of r, as the triplet engine and the listed-pairs op
// read them: u = d (lp: sqrt of the clamped d2, near pairs recomputed from the rows) or u = -S, by
// the engines' GEMM, so an element's bits depend on its two rows only (cpu_kernels.h
// "Determinism"). A strip is ti <= strip_rows rows of ld columns (M rounded up to the panel width,
// the padding NaN); strip_rows * ld <= strip_elements.
template <typename T>
struct UStrips {
  const Kernels<T>* K = nullptr;
  int64_t N = 0, M = 0, D = 0, Dp = 0, ld = 0, strip_rows = 0;
  Tensor q, r, panels, norm_q, norm_r;  // q, r padded to Dp columns; r packed; squared norms (lp)
  bool lp = false;

  UStrips() = default;
  UStrips(const Kernels<T>& kernels, const Tensor& q_in, const Tensor& r_in, bool lp_in, int64_t strip_elements,
          int64_t max_strip_rows)
      : K(&kernels), N(q_in.size(0)), M(r_in.size(0)), D(q_in.size(1)), lp(lp_in) {
    Dp = round_up(std::max<int64_t>(D, 1), sizeof(T) == 4 ? 16 : 8);
    ld = round_up(std::max<int64_t>(M, 1), 32);
    strip_rows = std::max<int64_t>(1, std::min(max_strip_rows, strip_elements / ld));
    q = padded_rows<T>(q_in.detach(), Dp);
    r = padded_rows<T>(r_in.detach(), Dp);
    panels = pack<T>(kernels, r, D);
    if (lp) {
      norm_q = squared_norms<T>(q, D);
      norm_r = squared_norms<T>(r, D);
    }
  }

  int64_t strips() const { return (N + strip_rows - 1) / strip_rows; }

  // u of rows i0 .. i0 + ti against every column, into U (row stride ld)
  void fill(int64_t i0, int64_t ti, T* U) const {
    const T* qp = q.template data_ptr<T>() + i0 * Dp;
    K->gemm_nt(qp, Dp, panels.template data_ptr<T>(), ti, M, D, U, ld);
    if (lp)
      K->lp_tile_d2(qp, r.template data_ptr<T>(), Dp, D, norm_q.template data_ptr<T>() + i0,
                    norm_r.template data_ptr<T>(), static_cast<int>(ti), static_cast<int>(M), U, ld);
    // u = d (pair_terms.inl pair_v_lp, the engines' one definition) or -S
    K->triplet_strip_u(U, ld, static_cast<int>(ti), M, lp);
  }
};

}  // namespace glue
}  // namespace cpu
}  // namespace fpl
