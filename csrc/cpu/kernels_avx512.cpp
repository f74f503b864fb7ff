// The CPU engines' kernels for AVX-512 (x86-64-v4: F, VL, BW, DQ, with FMA): kernels_isa.inc
// compiled under this file's target pragma. Used when the CPU has these features
// (cpu_isa.cpp). fp-contract=off: FMAs only where the GEMM asks for them, so the element loops
// round exactly as in the other instruction sets.
#include <cstdint>
#include <type_traits>

#include "cpu/cpu_kernels.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt")
#pragma GCC optimize("no-trapping-math", "no-math-errno", "fp-contract=off")

namespace fpl {
namespace cpu {
namespace isa_avx512 {

struct VF {
  using T = float;
  using R = __m512;
  static constexpr int W = 16;
  static inline __attribute__((always_inline)) R load(const float* p) { return _mm512_loadu_ps(p); }
  static inline __attribute__((always_inline)) void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static inline __attribute__((always_inline)) R zero() { return _mm512_setzero_ps(); }
  static inline __attribute__((always_inline)) R set1(float x) { return _mm512_set1_ps(x); }
  static inline __attribute__((always_inline)) R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
};
struct VD {
  using T = double;
  using R = __m512d;
  static constexpr int W = 8;
  static inline __attribute__((always_inline)) R load(const double* p) { return _mm512_loadu_pd(p); }
  static inline __attribute__((always_inline)) void store(double* p, R v) { _mm512_storeu_pd(p, v); }
  static inline __attribute__((always_inline)) R zero() { return _mm512_setzero_pd(); }
  static inline __attribute__((always_inline)) R set1(double x) { return _mm512_set1_pd(x); }
  static inline __attribute__((always_inline)) R fma(R a, R b, R c) { return _mm512_fmadd_pd(a, b, c); }
};
constexpr int MR_F32 = 12;  // 12 x 32 floats: 24 accumulator registers of 32
constexpr int MR_F64 = 12;
#define NATIVE_BYTES 64  // native vector width of the element loops (kernels_isa.inc)

#include "cpu/kernels_isa.inc"

}  // namespace isa_avx512
}  // namespace cpu
}  // namespace fpl

#pragma GCC pop_options

#else  // no AVX-512 build

namespace fpl {
namespace cpu {
namespace isa_avx512 {
const Kernels<float>* table_f32() { return nullptr; }
const Kernels<double>* table_f64() { return nullptr; }
}  // namespace isa_avx512
}  // namespace cpu
}  // namespace fpl

#endif
