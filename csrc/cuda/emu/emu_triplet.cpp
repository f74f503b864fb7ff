// Test-only CPU emulation build of csrc/cuda/triplet_engine.cu (see cuda_emu.h).
#include "cuda/emu/cuda_emu.h"
namespace fpl_cuda {
namespace {
alignas(128) unsigned char smem[96 * 1024];  // the kernels' dynamic shared memory
}  // namespace
}  // namespace fpl_cuda
#include "cuda/triplet_engine.cu"
