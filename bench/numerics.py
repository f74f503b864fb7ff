"""Accuracy of the fused engines against fp64 (the figures of docs/design.md, "Numerics").

    python bench/numerics.py                    # cpu backend (triton too with TRITON_INTERPRET=1)
    python bench/numerics.py --backend triton --pairs 64

1. Distances (PML's LpDistance on the normalized rows) of pairs of unit rows at a given gap, from
   identical rows to opposite ones, for every input dtype: the pair engine's d (ContrastiveLoss's
   term of a pair, one positive pair per row) against the fp64 distance of the same rounded,
   normalized rows; next to it torch.cdist on the same rows as PML calls it on batches of more than
   25 rows (its matmul path). Errors in units of the dtype's eps: absolute (|d - truth| / eps) and
   relative (|d - truth| / (truth eps)).
2. Every pair loss of bench/providers.py (PML's defaults), N=512, D=128, random labels of 64
   classes: the relative error of the value and of the gradient (max abs error / max abs entry)
   against the fp64 reference, for the fused backend and, side by side, the reference backend in
   the same dtype.
Results: a table on stdout and bench/results/<device-tag>/numerics_<backend>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import measure as Mz  # noqa: E402  the machine record
import providers as P  # noqa: E402  the benchmarked losses

GAPS = (0.0, 1e-6, 1e-4, 1e-3, 1e-2, 0.1, 0.25, 0.5, 1.0, 1.9)
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def pair_rows(gap, pairs, d, gen):
    """2 * pairs unit rows in fp64, row 2k+1 at distance ~gap from row 2k."""
    a = F.normalize(torch.randn(pairs, d, generator=gen, dtype=torch.float64), dim=1)
    step = F.normalize(torch.randn(pairs, d, generator=gen, dtype=torch.float64), dim=1)
    b = F.normalize(a + gap * step, dim=1) if gap > 0 else a.clone()
    return torch.stack([a, b], 1).reshape(2 * pairs, d)


def distance_errors(backend, pairs, d, seed):
    from fused_pairloss.losses import contrastive
    from fused_pairloss.ops import stats

    rows = []
    gen = torch.Generator().manual_seed(seed)
    for gap in GAPS:
        x64 = pair_rows(gap, pairs, d, gen)
        labels = torch.arange(pairs).repeat_interleave(2)
        for dtype in DTYPES:
            q = F.normalize(x64.to(dtype), dim=1)  # as the losses normalize, in the input dtype
            qq = q.double()
            truth = (qq[0::2] - qq[1::2]).norm(dim=1).repeat_interleave(2)
            spec = contrastive.declaration(0.0, 1.0, "lp")  # a positive's term: relu(d - 0) = d
            fused = stats.pair_stats(q, None, labels, None, None, spec, backend).sum_pos.double()
            eps = torch.finfo(dtype).eps
            rec = {"gap": gap, "dtype": str(dtype).replace("torch.", ""), "truth_median": truth.median().item(),
                   "fused_abs_eps": ((fused - truth).abs().max() / eps).item()}
            nz = truth > 0
            rec["fused_rel_eps"] = ((fused - truth).abs()[nz] / truth[nz]).max().item() / eps if nz.any() else None
            rec["fused_zero_where_identical"] = bool((fused[~nz] == 0).all()) if (~nz).any() else None
            if dtype in (torch.float32, torch.float64):
                cd = torch.cdist(q, q).double()  # > 25 rows: torch's matmul path, as PML's LpDistance
                pml = cd[torch.arange(2 * pairs), torch.arange(2 * pairs) ^ 1]
                rec["cdist_abs_eps"] = ((pml - truth).abs().max() / eps).item()
                rec["cdist_rel_eps"] = ((pml - truth).abs()[nz] / truth[nz]).max().item() / eps if nz.any() else None
            rows.append(rec)
    return rows


def loss_errors(backend, n, d, seed):
    import fused_pairloss as fpl

    out = []
    gen = torch.Generator().manual_seed(seed)
    x64 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 64, (n,), generator=gen)
    for name, spec in P.BENCH_LOSSES.items():
        if spec.kind != "pair":
            continue
        fn = getattr(fpl.functional, spec.function)

        def run(dtype, which):
            x = x64.to(dtype).requires_grad_(True)
            val = fn(x, y, backend=which, **spec.params)
            (g,) = torch.autograd.grad(val, x)
            return val.double(), g.double()

        tv, tg = run(torch.float64, "reference")
        for dtype in (torch.float32, torch.float64):
            rec = {"loss": name, "dtype": str(dtype).replace("torch.", "")}
            for which, key in ((backend, "fused"), ("reference", "reference")):
                v, g = run(dtype, which)
                rec[f"{key}_value_rel"] = (abs(v - tv) / abs(tv).clamp(min=1e-300)).item()
                rec[f"{key}_grad_rel"] = ((g - tg).abs().max() / tg.abs().max().clamp(min=1e-300)).item()
            out.append(rec)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--pairs", type=int, default=512, help="pairs per gap")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--n", type=int, default=512, help="batch of the loss-level errors")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    info = Mz.environment("cpu")
    dist = distance_errors(args.backend, args.pairs, args.d, args.seed)
    losses = loss_errors(args.backend, args.n, args.d, args.seed)
    fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
    print(f"distances ({args.backend}, D={args.d}, {args.pairs} pairs per gap): max error in eps units")
    print(f"{'gap':>8} {'dtype':>9} {'fused abs':>10} {'fused rel':>10} {'cdist abs':>10} {'cdist rel':>10}")
    for r in dist:
        print(f"{r['gap']:>8g} {r['dtype']:>9} {fmt(r['fused_abs_eps']):>10} {fmt(r['fused_rel_eps']):>10} "
              f"{fmt(r.get('cdist_abs_eps')):>10} {fmt(r.get('cdist_rel_eps')):>10}")
    print(f"\nlosses (N={args.n}, D={args.d}): relative error against the fp64 reference")
    print(f"{'loss':>12} {'dtype':>8} {'fused value':>12} {'ref value':>12} {'fused grad':>12} {'ref grad':>12}")
    for r in losses:
        print(f"{r['loss']:>12} {r['dtype']:>8} {r['fused_value_rel']:>12.3g} {r['reference_value_rel']:>12.3g} "
              f"{r['fused_grad_rel']:>12.3g} {r['reference_grad_rel']:>12.3g}")
    out_dir = os.path.join(HERE, "results", info["device_tag"])
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"numerics_{args.backend}.json")
    with open(path, "w") as f:
        json.dump({"meta": info, "command": " ".join(["python", "bench/numerics.py"] + sys.argv[1:]),
                   "distances": dist, "losses": losses}, f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
