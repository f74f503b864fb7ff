// Which instruction set the CPU engines run (cpu_kernels.h): the best one this CPU supports,
// capped by the environment variable FPL_CPU_ISA (base | avx2 | avx512) when the library loads
// and by the op `fused_pairloss::cpu_isa(str? cap)`, which tests use to run the AVX2 and baseline
// kernels on an AVX-512 machine.
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <optional>
#include <string>

#include "cpu/cpu_kernels.h"

namespace fpl {
namespace cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "base";
  }
}

namespace {

std::optional<Isa> parse_isa(const std::string& s) {
  if (s == "base") return Isa::kBase;
  if (s == "avx2") return Isa::kAvx2;
  if (s == "avx512") return Isa::kAvx512;
  return std::nullopt;
}

Isa detect() {
  Isa best = Isa::kBase;
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && isa_avx2::table_f32()) best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") && isa_avx512::table_f32())
    best = Isa::kAvx512;
#endif
  return best;
}

Isa min_isa(Isa a, Isa b) { return static_cast<int>(a) < static_cast<int>(b) ? a : b; }

std::atomic<int>& active_slot() {
  static std::atomic<int> slot([] {
    Isa isa = detect();
    if (const char* env = std::getenv("FPL_CPU_ISA")) {
      if (auto cap = parse_isa(env)) isa = min_isa(isa, *cap);
    }
    return static_cast<int>(isa);
  }());
  return slot;
}

// op: with a cap, caps the ISA at it (never above what the CPU supports); returns the active one
std::string cpu_isa_op(const std::optional<std::string>& cap) {
  if (cap.has_value()) {
    const auto isa = parse_isa(*cap);
    TORCH_CHECK(isa.has_value(), "cpu_isa: expected 'base', 'avx2' or 'avx512', got '", *cap, "'");
    set_active_isa(*isa);
  }
  return isa_name(active_isa());
}

}  // namespace

Isa best_supported_isa() {
  static const Isa best = detect();
  return best;
}

Isa active_isa() { return static_cast<Isa>(active_slot().load()); }

Isa set_active_isa(Isa cap) {
  const Isa isa = min_isa(cap, best_supported_isa());
  active_slot().store(static_cast<int>(isa));
  return isa;
}

const Kernels<float>* kernels_f32(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return isa_avx512::table_f32();
    case Isa::kAvx2:
      return isa_avx2::table_f32();
    default:
      return isa_base::table_f32();
  }
}

const Kernels<double>* kernels_f64(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return isa_avx512::table_f64();
    case Isa::kAvx2:
      return isa_avx2::table_f64();
    default:
      return isa_base::table_f64();
  }
}

template <>
const Kernels<float>& active_kernels<float>() {
  return *kernels_f32(active_isa());
}
template <>
const Kernels<double>& active_kernels<double>() {
  return *kernels_f64(active_isa());
}

}  // namespace cpu
}  // namespace fpl

TORCH_LIBRARY_FRAGMENT(fused_pairloss, m) { m.def("cpu_isa(str? cap=None) -> str", &fpl::cpu::cpu_isa_op); }
