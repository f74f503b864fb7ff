// The CPU engines' kernels for the baseline instruction set of the build target (x86-64: SSE2;
// no FMA, so a GEMM step is a multiply and an add): kernels_isa.inc with GCC's generic vector
// types, which need no target pragma.
#include <cstdint>
#include <type_traits>

#include "cpu/cpu_kernels.h"

#if defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math", "no-math-errno", "fp-contract=off")
#endif

namespace fpl {
namespace cpu {
namespace isa_base {

typedef float v4f __attribute__((vector_size(16), aligned(4), may_alias));
typedef double v2d __attribute__((vector_size(16), aligned(8), may_alias));

struct VF {
  using T = float;
  using R = v4f;
  static constexpr int W = 4;
  static inline __attribute__((always_inline)) R load(const float* p) { return *reinterpret_cast<const R*>(p); }
  static inline __attribute__((always_inline)) void store(float* p, R v) { *reinterpret_cast<R*>(p) = v; }
  static inline __attribute__((always_inline)) R zero() { return R{0.f, 0.f, 0.f, 0.f}; }
  static inline __attribute__((always_inline)) R set1(float x) { return R{x, x, x, x}; }
  static inline __attribute__((always_inline)) R fma(R a, R b, R c) { return a * b + c; }
};
struct VD {
  using T = double;
  using R = v2d;
  static constexpr int W = 2;
  static inline __attribute__((always_inline)) R load(const double* p) { return *reinterpret_cast<const R*>(p); }
  static inline __attribute__((always_inline)) void store(double* p, R v) { *reinterpret_cast<R*>(p) = v; }
  static inline __attribute__((always_inline)) R zero() { return R{0.0, 0.0}; }
  static inline __attribute__((always_inline)) R set1(double x) { return R{x, x}; }
  static inline __attribute__((always_inline)) R fma(R a, R b, R c) { return a * b + c; }
};
constexpr int MR_F32 = 6;  // 6 x 8 floats: 12 accumulator registers of 16
constexpr int MR_F64 = 6;
#define NATIVE_BYTES 16  // native vector width of the element loops (kernels_isa.inc)

#include "cpu/kernels_isa.inc"

}  // namespace isa_base
}  // namespace cpu
}  // namespace fpl

#if defined(__GNUC__)
#pragma GCC pop_options
#endif
