// The order in which MultiSimilarityMiner lists a row's mined pairs (fused_pairloss/_miners.py):
// fused_pairloss::ascending_kept_columns. PML sorts each whole row of the distance matrix and keeps
// a range of the sorted entries, so a row's pairs come in ascending order of their values. This op
// lists the entries of `values` where `keep` holds, row after row (rows[k], columns[k]: the k-th),
// each row's in ascending order of their values, columns ascending among equal values (a stable
// sort); per row their number, and whether two of them have equal values (torch.sort's order among
// those is its own: the caller sorts such a row as PML does). Only the kept entries are sorted.
//
// A row's kept values sort by an LSD radix sort on their bits made monotone (fp32: four passes of
// 8 bits, a pass skipped where every key shares its byte; a short row by insertion), or by
// std::sort on (monotone bits, column) for fp64. Rows are independent and each writes its own
// slice of the output, so the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace fpl {
namespace cpu {
namespace {

using at::Tensor;

// the bits of x as an unsigned integer whose order is x's: the sign bit set for x >= +0, every bit
// flipped for x <= -0 (so -0.0 sorts just below +0.0; equal values are found by comparing values)
inline uint32_t monotone_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  return (b >> 31) ? ~b : (b | 0x80000000u);
}
inline uint64_t monotone_bits(double x) {
  uint64_t b;
  std::memcpy(&b, &x, sizeof(b));
  return (b >> 63) ? ~b : (b | 0x8000000000000000ull);
}

constexpr int64_t kInsertionRow = 48;  // rows with at most this many listed entries: insertion sort

// sorts the packed (monotone bits << 32 | column) keys of fp32 values: ascending bits, then column
void sort_packed(std::vector<uint64_t>& keys, std::vector<uint64_t>& tmp) {
  const size_t n = keys.size();
  if (static_cast<int64_t>(n) <= kInsertionRow) {
    for (size_t i = 1; i < n; ++i) {
      const uint64_t k = keys[i];
      size_t j = i;
      for (; j > 0 && keys[j - 1] > k; --j) keys[j] = keys[j - 1];
      keys[j] = k;
    }
    return;
  }
  tmp.resize(n);
  // the four passes' histograms in one read; the input is in column order and every pass is
  // stable, so equal bits keep their column order
  std::array<std::array<uint32_t, 257>, 4> count{};
  for (uint64_t k : keys)
    for (int p = 0; p < 4; ++p) ++count[p][((k >> (32 + 8 * p)) & 0xff) + 1];
  for (int p = 0; p < 4; ++p) {
    auto& c = count[p];
    if (std::any_of(c.begin() + 1, c.end(), [&](uint32_t x) { return x == n; })) continue;  // one byte value
    for (int b = 0; b < 256; ++b) c[b + 1] += c[b];
    const int shift = 32 + 8 * p;
    for (uint64_t k : keys) tmp[c[(k >> shift) & 0xff]++] = k;
    keys.swap(tmp);
  }
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> kept_order_rows(const Tensor& values, const Tensor& keep) {
  const int64_t B = values.size(0), M = values.size(1);
  const T* v = values.data_ptr<T>();
  const bool* k = keep.data_ptr<bool>();
  Tensor counts = at::empty({B}, values.options().dtype(at::kLong));
  int64_t* cnt = counts.data_ptr<int64_t>();
  at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) cnt[i] = std::count(k + i * M, k + (i + 1) * M, true);
  });
  std::vector<int64_t> start(B + 1, 0);
  for (int64_t i = 0; i < B; ++i) start[i + 1] = start[i] + cnt[i];
  Tensor rows = at::empty({start[B]}, counts.options());
  Tensor columns = at::empty({start[B]}, counts.options());
  Tensor tied = at::empty({B}, values.options().dtype(at::kBool));
  int64_t* row_out = rows.data_ptr<int64_t>();
  int64_t* col_out = columns.data_ptr<int64_t>();
  bool* tie = tied.data_ptr<bool>();
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    std::vector<uint64_t> keys, tmp;
    std::vector<std::pair<uint64_t, int64_t>> wide;
    for (int64_t i = b0; i < b1; ++i) {
      const T* row = v + i * M;
      const bool* kr = k + i * M;
      int64_t* dst = col_out + start[i];
      int64_t n = 0;
      if constexpr (sizeof(T) == 4) {
        keys.clear();
        for (int64_t j = 0; j < M; ++j)
          if (kr[j]) keys.push_back((uint64_t(monotone_bits(row[j])) << 32) | uint64_t(j));
        sort_packed(keys, tmp);
        for (uint64_t key : keys) dst[n++] = static_cast<int64_t>(key & 0xffffffffu);
      } else {
        wide.clear();
        for (int64_t j = 0; j < M; ++j)
          if (kr[j]) wide.emplace_back(monotone_bits(row[j]), j);
        std::sort(wide.begin(), wide.end());
        for (const auto& e : wide) dst[n++] = e.second;
      }
      std::fill(row_out + start[i], row_out + start[i + 1], i);
      bool t = false;
      for (int64_t j = 1; j < n && !t; ++j) t = row[dst[j]] == row[dst[j - 1]];
      tie[i] = t;
    }
  });
  return {rows, columns, counts, tied};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> ascending_kept_columns_cpu(const Tensor& values, const Tensor& keep) {
  TORCH_CHECK(values.device().is_cpu() && keep.device().is_cpu(),
              "ascending_kept_columns (cpu): values and keep must be CPU tensors");
  TORCH_CHECK(values.dim() == 2, "ascending_kept_columns: values must be 2-D, got ", values.sizes());
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble,
              "ascending_kept_columns: values must be float32 or float64, got ", values.scalar_type());
  TORCH_CHECK(keep.scalar_type() == at::kBool && keep.sizes() == values.sizes(),
              "ascending_kept_columns: keep must be a bool tensor of values' shape ", values.sizes(), ", got ",
              keep.scalar_type(), " ", keep.sizes());
  TORCH_CHECK(values.size(1) < (int64_t(1) << 32), "ascending_kept_columns: at most 2^32 - 1 columns");
  const Tensor v = values.contiguous(), k = keep.contiguous();
  return v.scalar_type() == at::kDouble ? kept_order_rows<double>(v, k) : kept_order_rows<float>(v, k);
}

}  // namespace
}  // namespace cpu
}  // namespace fpl

TORCH_LIBRARY_IMPL(fused_pairloss, CPU, m) { m.impl("ascending_kept_columns", &fpl::cpu::ascending_kept_columns_cpu); }
