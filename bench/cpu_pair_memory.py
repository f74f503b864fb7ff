"""Resident-memory growth of one fused Multi-Similarity step (forward + backward, backend "cpu")
at large N (docs/design.md: no N x N buffer). Prints the peak RSS growth over the inputs' footprint.

    FUSED_PAIRLOSS_LIBRARY=/path/to/lib.so python bench/cpu_pair_memory.py --n 32768 [--mine]
"""
import argparse
import resource
import time

import torch

import fused_pairloss.functional as F


def rss_peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--mine", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.n, args.d, requires_grad=True)
    y = torch.randint(0, args.n // 8, (args.n,))
    F.multi_similarity_loss(x[:64], y[:64], backend="cpu").backward()  # warm-up (library, allocator)
    x.grad = None
    base = rss_peak_mib()
    t = time.perf_counter()
    loss = F.multi_similarity_loss(x, y, miner_epsilon=0.1 if args.mine else None, backend="cpu")
    loss.backward()
    dt = time.perf_counter() - t
    grow = rss_peak_mib() - base
    print(f"N={args.n} D={args.d} mine={args.mine}: loss {loss.item():.5f}, fwd+bwd {dt:.1f} s, "
          f"threads {torch.get_num_threads()}, peak RSS growth {grow:.1f} MiB "
          f"(an N x N fp32 matrix would be {args.n * args.n * 4 / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
