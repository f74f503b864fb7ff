"""Small run of every CUDA kernel (forward + backward of both engines), for compute-sanitizer.

    compute-sanitizer --tool memcheck  python csrc/cuda/sanitize_case.py
    compute-sanitizer --tool racecheck python csrc/cuda/sanitize_case.py
    compute-sanitizer --tool synccheck python csrc/cuda/sanitize_case.py
    compute-sanitizer --tool initcheck python csrc/cuda/sanitize_case.py

One small case per engine and kernel path, in fp32 / fp64 / fp16 / bf16, with ragged shapes
(several row blocks, a partial last tile, D not a multiple of the staged chunk) and D with and
without the 16-byte vector loads:
- pair engine: a mined declaration with exclude_after_mining (label-sorted operands, both band
  walks, the main walk), NTXent's pair term, a hinge + sum on the lp distance (norm gradients);
  self mode, ref mode with exclude_col, ref mode without the column pass (need_grad_r False);
- class engine: SoftTriple K = 3 (row kernel, pooling), a row term with both column terms (row
  and column kernels), column terms only (the column kernel writes target_sim), need_grad_w False;
- triplet engine: the hinge sums (lp and cosine, with and without a miner's window) and the bins
  (DynamicSoftMargin), self mode and ref mode with exclude_col, need_grad_r True and False.
Uses the library fused_pairloss loads. Exits non-zero if the CUDA kernels are missing or an output
that must be finite is not.
"""
import sys

import torch

import fused_pairloss as fpl
from fused_pairloss.ops import spec as S

ops = torch.ops.fused_pairloss
T = S.PairTerm
INF = float("inf")

PAIR = [
    S.PairLossSpec(pos=T(-2.0, 0.5, lse=True), neg=T(50.0, 0.5, lse=True), miner_epsilon=0.1,
                   exclude_after_mining=True),
    S.PairLossSpec(pos=T(4.0, sum=True), neg=T(4.0, lse=True), pos_vs_neg_lse=True),
    S.PairLossSpec(pos=T(1.0, 0.0, hinge=True, sum=True), neg=T(-1.0, 1.0, hinge=True, sum=True), distance="lp"),
    # exp-weighted sums beside a plain one (RankedListLoss's)
    S.PairLossSpec(pos=T(1.0, 0.5, hinge=True, sum=True), neg=T(-1.0, 1.2, hinge=True, sum=True, sum_temperature=5.0),
                   distance="lp"),
]
CLASS = [
    S.ClassLossSpec(row=T(20.0, lse=True), centers_per_class=3, pool_gamma=0.1),
    S.ClassLossSpec(row=T(16.0, 0.25, 0.25, 1.0, lse=True), col_pos=T(-4.0, 0.1, lse=True),
                    col_neg=T(4.0, -0.1, lse=True)),
    S.ClassLossSpec(col_pos=T(-4.0, 0.1, lse=True), col_neg=T(4.0, -0.1, lse=True)),
]


def unit(n, d, gen, dev, dtype):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1).to(dev, dtype)


def main():
    if not torch.cuda.is_available():
        sys.exit("sanitize_case.py needs a CUDA GPU")
    info = fpl.build_info()
    if not info["cuda"]:
        sys.exit(f"the loaded library has no CUDA kernels: {info}")
    gen = torch.Generator().manual_seed(0)
    dev = "cuda"
    n_runs = 0
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        A = torch.float64 if dtype == torch.float64 else torch.float32
        for d in (40, 37):
            q, r = unit(70, d, gen, dev, dtype), unit(90, d, gen, dev, dtype)
            lq = torch.randint(0, 5, (70,), generator=gen).to(dev)
            lr = torch.randint(0, 5, (90,), generator=gen).to(dev)
            excl = torch.randint(-1, 90, (70,), generator=gen).to(dev)
            for sp in PAIR:
                terms, flags = sp.pack()
                for rr, llr, ex, need_r in ((None, None, None, False), (r, lr, excl, True), (r, lr, None, False)):
                    values, counts, aux = ops.pair_engine_forward(q, rr, lq, llr, ex, list(terms), flags)
                    gv = torch.rand(values.shape, generator=gen).to(dev, A)
                    gq, gr = ops.pair_engine_backward(gv, q, rr, lq, llr, ex, values, aux, list(terms), flags, need_r)
                    torch.cuda.synchronize()
                    assert torch.isfinite(gq).all() and torch.isfinite(gr).all(), (dtype, d, sp)
                    n_runs += 1
            for sp in CLASS:
                terms, flags = sp.pack()
                K = sp.centers_per_class
                w = unit(13 * K, d, gen, dev, dtype)
                y = torch.randint(0, 13, (70,), generator=gen).to(dev)
                rows, cols = ops.class_engine_forward(q, w, y, K, list(terms), flags)
                g_rows = torch.rand(rows.shape, generator=gen).to(dev, A)
                g_cols = torch.rand(cols.shape, generator=gen).to(dev, A)
                for need_w in (True, False):
                    gq, gw = ops.class_engine_backward(g_rows, g_cols, q, w, y, rows, cols, K, list(terms), flags,
                                                       need_w)
                    torch.cuda.synchronize()
                    assert torch.isfinite(rows[1]).all(), (dtype, d, sp)
                    assert torch.isfinite(gq).all() and torch.isfinite(gw).all(), (dtype, d, sp)
                    n_runs += 1
            for rr, llr, ex in ((q, lq, torch.arange(70, device=dev)), (r, lr, excl)):
                for lp, window in ((True, (-INF, INF)), (False, (0.0, 0.5))):
                    sums, _, _ = ops.triplet_engine_forward(q, rr, lq, llr, ex, 0.2, lp, *window)
                    g = torch.rand(sums.shape, generator=gen).to(dev, A)
                    gq, gr = ops.triplet_engine_backward(g, q, rr, lq, llr, ex, 0.2, lp, *window, True, rr is r)
                    torch.cuda.synchronize()
                    assert torch.isfinite(sums).all() and torch.isfinite(gq).all(), (dtype, d, lp)
                    n_runs += 1
                bins, _ = ops.triplet_bins_engine_forward(q, rr, lq, llr, ex, -2.0, 0.4, 10)
                g = torch.rand(bins.shape, generator=gen).to(dev, A)
                gq, gr = ops.triplet_bins_engine_backward(g, q, rr, lq, llr, ex, -2.0, 0.4, 10, True, rr is r)
                torch.cuda.synchronize()
                assert torch.isfinite(bins).all() and torch.isfinite(gq).all(), (dtype, d, "bins")
                n_runs += 1
    print(f"sanitize_case: {n_runs} forward+backward runs OK on {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
