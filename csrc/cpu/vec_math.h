// Vectorizable element helpers shared by the CPU engines (pair_engine_cpu.cpp, class_engine_cpu.cpp).
//
// The engines' inner loops run along one row (or column) of a tile. They vectorize once every
// operation in them is a select or plain arithmetic: the C library's expf is an opaque call the
// compiler cannot vectorize (without -ffast-math, which would also fold away the NaN checks), so
// `vexp(float)` below is a branch-free exp. The loops are compiled once per instruction set
// (AVX-512 / AVX2 / baseline) and picked at run time, so the package needs no machine-specific flags.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__GNUC__)
#define FPL_VEC_INLINE inline __attribute__((always_inline))
#else
#define FPL_VEC_INLINE inline
#endif

namespace fpl {
namespace cpu_vec {

constexpr int kLanes = 16;  // one AVX-512 float vector, two AVX2 ones

// exp(x) in float with selects only; about 1 ulp on the normal range (checked for every float in
// [-87, 88]). x < -87 gives 0 (e^-87 ~ 1.6e-38: expf would be subnormal there; the engines only add
// such terms to sums that hold a 1); x > 88 gives +inf; NaN gives NaN.
// x = n ln2 + r, n = round(x log2 e) (round-to-nearest by adding 1.5 * 2^23), |r| <= ln2 / 2,
// ln2 split in a high part with few mantissa bits (n * hi exact for |n| <= 128) and a low part;
// e^r by its Taylor polynomial of degree 7 (truncation < 6e-9 relative); 2^n from the exponent bits.
FPL_VEC_INLINE float vexp(float x) {
  const float lo = -87.0f, hi = 88.0f;
  const bool is_nan = x != x;
  float xc = is_nan ? 0.0f : x;
  xc = xc < lo ? lo : xc;
  xc = xc > hi ? hi : xc;
  const float shifter = 12582912.0f;
  const float n = (xc * 1.44269504088896341f + shifter) - shifter;
  float r = xc - n * 0.693145751953125f;
  r = r - n * 1.42860682030941723212e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);
  const uint32_t bits = static_cast<uint32_t>(ni + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float res = p * scale;
  res = x < lo ? 0.0f : res;
  res = x > hi ? std::numeric_limits<float>::infinity() : res;
  return is_nan ? x : res;
}

// fp64 is the accuracy path: the C library's exp.
FPL_VEC_INLINE double vexp(double x) { return std::exp(x); }

// fpl::relu_nan (pair_math.h), restated so that it is compiled with the element loops' target
// options (GCC does not inline a function across differing target options)
template <typename T>
FPL_VEC_INLINE T vrelu(T x) { return (x != x) ? x : (x > T(0) ? x : T(0)); }

// max that never picks a NaN (NaNs reach the sums through exp(x - max) instead)
template <typename T>
FPL_VEC_INLINE T vmax(T a, T b) { return b > a ? b : a; }

// min / max that stick to NaN once they saw one (torch.amin / amax semantics)
template <typename T>
FPL_VEC_INLINE T nan_min(T a, T b) { return (a != a) ? a : ((b < a || b != b) ? b : a); }
template <typename T>
FPL_VEC_INLINE T nan_max(T a, T b) { return (a != a) ? a : ((b > a || b != b) ? b : a); }

}  // namespace cpu_vec
}  // namespace fpl
