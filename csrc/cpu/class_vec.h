// Vectorizable helpers of the CPU class engine (csrc/cpu/class_engine_cpu.cpp).
//
// The tile loops of the class engine run over the rows of a block (contiguous in the transposed
// tile layout), so plain loops vectorize once the exponential is a branch-free inline function.
// `vexp(float)` is such a function (the C library's expf is an opaque call the compiler cannot
// vectorize without -ffast-math); `vexp(double)` stays the C library's exp (fp64 is the
// accuracy path). The tile functions are compiled once per instruction set (FPL_CLASS_ISA_*) and
// picked at run time, so the package needs no machine-specific compiler flags.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__)
#define FPL_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FPL_ALWAYS_INLINE inline
#endif

namespace fpl {
namespace cpu_class {

// exp(x) in float, branch-free (selects only), relative error about 1 ulp on the normal range.
// x < -87 gives 0 (e^-87 ~ 1.6e-38: below the float normal range, where expf is subnormal);
// x > 88 is clamped to e^88 (the engine only takes exp of x <= ~0); NaN gives NaN.
// Method: x = n ln2 + r with n = round(x / ln2), |r| <= ln2/2 (Cody-Waite two-constant ln2),
// e^r by its degree-7 Taylor polynomial (truncation < 6e-9 relative), times 2^n built from bits.
FPL_ALWAYS_INLINE float vexp(float x) {
  const float lo = -87.0f, hi = 88.0f;
  const bool is_nan = x != x;
  float xc = is_nan ? 0.0f : x;
  xc = xc < lo ? lo : xc;
  xc = xc > hi ? hi : xc;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding and subtracting rounds to an integer
  const float n = (xc * 1.44269504088896341f + shifter) - shifter;
  float r = xc - n * 0.693145751953125f;  // ln2 high part (exact products for |n| <= 128)
  r = r - n * 1.428606765330187e-06f;     // ln2 low part
  float p = 1.9841269841269841e-04f;      // 1/5040
  p = p * r + 1.3888888888888889e-03f;    // 1/720
  p = p * r + 8.3333333333333333e-03f;    // 1/120
  p = p * r + 4.1666666666666667e-02f;    // 1/24
  p = p * r + 1.6666666666666667e-01f;    // 1/6
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);
  const uint32_t bits = static_cast<uint32_t>(ni + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float res = p * scale;
  res = x < lo ? 0.0f : res;
  return is_nan ? x : res;
}

FPL_ALWAYS_INLINE double vexp(double x) { return std::exp(x); }

// max that never picks a NaN (NaNs are propagated through exp(x - max) instead)
template <typename T>
FPL_ALWAYS_INLINE T vmax(T a, T b) { return b > a ? b : a; }

}  // namespace cpu_class
}  // namespace fpl
