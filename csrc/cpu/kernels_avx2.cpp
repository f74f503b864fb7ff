// The CPU engines' kernels for AVX2 with FMA (x86-64-v3): kernels_isa.inc compiled under this
// file's target pragma (see kernels_avx512.cpp).
#include <cstdint>
#include <type_traits>

#include "cpu/cpu_kernels.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
#pragma GCC optimize("no-trapping-math", "no-math-errno", "fp-contract=off")

namespace fpl {
namespace cpu {
namespace isa_avx2 {

struct VF {
  using T = float;
  using R = __m256;
  static constexpr int W = 8;
  static inline __attribute__((always_inline)) R load(const float* p) { return _mm256_loadu_ps(p); }
  static inline __attribute__((always_inline)) void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static inline __attribute__((always_inline)) R zero() { return _mm256_setzero_ps(); }
  static inline __attribute__((always_inline)) R set1(float x) { return _mm256_set1_ps(x); }
  static inline __attribute__((always_inline)) R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
};
struct VD {
  using T = double;
  using R = __m256d;
  static constexpr int W = 4;
  static inline __attribute__((always_inline)) R load(const double* p) { return _mm256_loadu_pd(p); }
  static inline __attribute__((always_inline)) void store(double* p, R v) { _mm256_storeu_pd(p, v); }
  static inline __attribute__((always_inline)) R zero() { return _mm256_setzero_pd(); }
  static inline __attribute__((always_inline)) R set1(double x) { return _mm256_set1_pd(x); }
  static inline __attribute__((always_inline)) R fma(R a, R b, R c) { return _mm256_fmadd_pd(a, b, c); }
};
constexpr int MR_F32 = 6;  // 6 x 16 floats: 12 accumulator registers of 16
constexpr int MR_F64 = 6;
#define NATIVE_BYTES 32  // native vector width of the element loops (kernels_isa.inc)

#include "cpu/kernels_isa.inc"

}  // namespace isa_avx2
}  // namespace cpu
}  // namespace fpl

#pragma GCC pop_options

#else  // not an x86-64 GCC build

namespace fpl {
namespace cpu {
namespace isa_avx2 {
const Kernels<float>* table_f32() { return nullptr; }
const Kernels<double>* table_f64() { return nullptr; }
}  // namespace isa_avx2
}  // namespace cpu
}  // namespace fpl

#endif
