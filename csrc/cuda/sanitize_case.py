"""Small run of every CUDA op (forward + backward), for compute-sanitizer.

    compute-sanitizer --tool memcheck  python csrc/cuda/sanitize_case.py
    compute-sanitizer --tool racecheck python csrc/cuda/sanitize_case.py
    compute-sanitizer --tool synccheck python csrc/cuda/sanitize_case.py

Covers: pair engine self / ref / ref with the diagonal excluded, MS (plain and mined) and Circle;
class engine SoftTriple K=1, K=3 and ProxyCircle; fp32 / fp64 / fp16 / bf16; ragged shapes (several
row blocks, a partial last tile, D not a multiple of the staged chunk) and D with and without the
16-byte vector loads. Uses the library fused_pairloss loads (FUSED_PAIRLOSS_LIBRARY to pick one).
Exits non-zero if the CUDA kernels are missing or any output is not finite where it must be.
"""
import sys

import torch

import fused_pairloss as fpl

ops = torch.ops.fused_pairloss


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
            q = torch.nn.functional.normalize(torch.randn(70, d, generator=gen), dim=1).to(dev, dtype)
            r = torch.nn.functional.normalize(torch.randn(90, d, generator=gen), dim=1).to(dev, dtype)
            r70 = r[:70].contiguous()
            lq = torch.randint(0, 5, (70,), generator=gen).to(dev)
            lr = torch.randint(0, 5, (90,), generator=gen).to(dev)
            for rr, llr, excl in ((None, None, True), (r, lr, False), (r70, lq, True)):
                for kind, p, mine in ((0, (2.0, 50.0, 0.5), False), (0, (2.0, 50.0, 0.5), True),
                                      (1, (0.25, 80.0, 0.0), False)):
                    args = (excl, kind, *p, mine, 0.1)
                    lp, ln, cp, cn, mp, mn = ops.pair_engine_forward(q, rr, lq, llr, *args)
                    gp = torch.rand(70, generator=gen).to(dev, A)
                    gn = torch.rand(70, generator=gen).to(dev, A)
                    gq, gr = ops.pair_engine_backward(gp, gn, q, rr, lq, llr, lp, ln, mp, mn, *args)
                    torch.cuda.synchronize()
                    assert torch.isfinite(gq).all() and torch.isfinite(gr).all(), (dtype, d, kind, mine)
                    n_runs += 1
            for K, kind, p in ((1, 0, (20.0, 0.1, 0.01)), (3, 0, (20.0, 0.1, 0.01)), (1, 1, (0.25, 256.0, 0.0))):
                w = torch.nn.functional.normalize(torch.randn(13 * K, d, generator=gen), dim=1).to(dev, dtype)
                y = torch.randint(0, 13, (70,), generator=gen).to(dev)
                lse, ts = ops.class_engine_forward(q, w, y, K, kind, *p)
                gl = torch.rand(70, generator=gen).to(dev, A)
                gt = torch.randn(70, generator=gen).to(dev, A)
                gq, gw = ops.class_engine_backward(gl, gt, q, w, y, lse, K, kind, *p)
                torch.cuda.synchronize()
                assert torch.isfinite(lse).all() and torch.isfinite(ts).all(), (dtype, d, K, kind)
                assert torch.isfinite(gq).all() and torch.isfinite(gw).all(), (dtype, d, K, kind)
                n_runs += 1
    print(f"sanitize_case: {n_runs} forward+backward runs OK on {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
