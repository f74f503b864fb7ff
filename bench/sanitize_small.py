#!/usr/bin/env python
"""Small forward+backward of every loss of one engine, for compute-sanitizer (bench/gpu_check.sh).

    compute-sanitizer --tool memcheck  python bench/sanitize_small.py --engine pair
    compute-sanitizer --tool memcheck  python bench/sanitize_small.py --engine class
    compute-sanitizer --tool racecheck python bench/sanitize_small.py --engine all
    python bench/sanitize_small.py --engine all --device cpu --backends cpu triton   # CPU walk

The losses are read from the loss table (fused_pairloss.losses.REGISTRY), not listed here, so a
loss added later is covered without editing this file: a pair loss runs on the pair engine (self
mode, a separate ref, and a ref with `ref_labels is labels`, i.e. the excluded diagonal; with
`miner_epsilon` also mined), a class loss on the class engine (its weight in its layout, (D, C*K)
or (C*K, D), K from `centers_per_class`; SoftTriple-like losses also with their regularizer).
Shapes are ragged on purpose (70 x 90 rows, D = 40 and 37: partial tiles, several row blocks, with
and without 16-byte vector loads), in fp32 and bf16 by default.

Every output and gradient must be finite; the exit code is non-zero if one is not, if a call
raises, or if an asked-for backend is not available here. On the CPU (`--device cpu`, with
TRITON_INTERPRET=1 for triton) this checks the script itself and the same calls through the CPU
kernels and the Triton interpreter: that is what `bench/gpu_check.sh --dry-run` runs.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("pair", "class", "all"), default="all")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backends", nargs="+", default=None,
                    help="fused backends to run (default: every fused one available on --device)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--dims", nargs="+", type=int, default=[40, 37], help="embedding sizes D")
    ap.add_argument("--loss", nargs="+", default=None,
                    help="only these fused_pairloss.functional names (default: all of them)")
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    return ap.parse_args(argv)


def discover(registry):
    """(name, fn, engine, params, weight_layout, modes, unit_weights, equal_label_counts) for every
    loss of the table: its functional form, and the pair modes it takes (PML's NPairsLoss /
    InstanceLoss: no ref_emb)."""
    return [(e.functional_name, e.functional, e.kind, inspect.signature(e.functional).parameters, e.weight_layout,
             ("self", "ref", "ref_excl") if e.ref_emb else ("self",), e.unit_weights, e.equal_label_counts)
            for e in registry.values()]


def pair_cases(name, fn, params, n, m, modes):
    """(label, kwargs-builder) pairs: modes x (plain, mined)."""
    variants = [("", {})]
    if "miner_epsilon" in params:
        variants.append(("+miner", {"miner_epsilon": 0.1}))
    for mode in modes:
        for vname, kw in variants:
            yield f"{name}{vname} {mode}", mode, kw


def class_cases(name, params):
    k_name = next((n for n in ("centers_per_class", "sub_centers") if n in params), None)
    if k_name is not None:
        yield f"{name} K=1", {k_name: 1}
        kw = {k_name: 3}
        if "center_reg_weight" in params:
            kw["center_reg_weight"] = 0.2
        yield f"{name} K=3" + (" +reg" if "center_reg_weight" in kw else ""), kw
    else:
        yield f"{name}", {}


def main(argv=None):
    args = parse_args(argv)
    if ROOT not in sys.path:
        sys.path.append(ROOT)  # as bench/run.py: an installed fused_pairloss first
    import torch

    import fused_pairloss as fpl
    from fused_pairloss.losses import REGISTRY

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("sanitize_small.py: --device cuda asked for, but no CUDA GPU is visible "
                 "(use --device cpu for the CPU walk)")
    avail = fpl.available_backends(dev.type)
    fused = [b for b in avail if b != "reference"]
    backends = args.backends or fused
    missing = [b for b in backends if b not in avail]
    backends = [b for b in backends if b in avail]
    losses = [c for c in discover(REGISTRY) if args.engine in ("all", c[2])
              and (args.loss is None or c[0] in args.loss)]
    print(f"sanitize_small: device {dev}, backends {backends} (available {avail}), "
          f"engine {args.engine}, losses {[c[0] for c in losses]}, dtypes {args.dtypes}, "
          f"D {args.dims}; build_info {fpl.build_info()}", flush=True)
    if args.list:
        return 0
    if not losses:
        print("sanitize_small: no loss found for this engine in fused_pairloss.functional")
        return 2

    gen = torch.Generator().manual_seed(0)
    n, m, c = 70, 90, 13
    n_ok, bad = 0, []
    t0 = time.time()

    def finite(t):
        return t is None or bool(torch.isfinite(t).all())

    for backend in backends:
        for dt_name in args.dtypes:
            dtype = getattr(torch, dt_name)
            for d in args.dims:
                for name, fn, engine, params, layout, modes, unit, equal_counts in losses:
                    if engine == "pair":
                        x0 = torch.randn(n, d, generator=gen)
                        r0 = torch.randn(m, d, generator=gen)
                        y = torch.randint(0, 5, (n,), generator=gen).to(dev)
                        if equal_counts:  # every label n / 5 times (SmoothAP)
                            y = torch.arange(5).repeat_interleave(n // 5).to(dev)
                        yr = torch.randint(0, 5, (m,), generator=gen).to(dev)
                        for label, mode, kw in pair_cases(name, fn, params, n, m, modes):
                            x = x0.to(dev, dtype).requires_grad_()
                            leaves, call = [x], None
                            if mode == "self":
                                call = lambda: fn(x, y, backend=backend, **kw)  # noqa: E731
                            elif mode == "ref":
                                r = r0.to(dev, dtype).requires_grad_()
                                leaves.append(r)
                                call = lambda: fn(x, y, r, yr, backend=backend, **kw)  # noqa: E731
                            else:  # ref_labels is labels: the diagonal is excluded
                                r = r0[:n].to(dev, dtype).requires_grad_()
                                leaves.append(r)
                                call = lambda: fn(x, y, r, y, backend=backend, **kw)  # noqa: E731
                            n_ok += _run(f"{backend} {dt_name} D={d} {label}", call, leaves,
                                         finite, bad, dev)
                    else:
                        for label, kw in class_cases(name, params):
                            k = kw.get("centers_per_class", kw.get("sub_centers", 1))
                            x = torch.randn(n, d, generator=gen).to(dev, dtype).requires_grad_()
                            # PML's layouts: (D, C*K), or (C*K, D) (ProxyAnchor's proxies)
                            shape = (c * k, d) if layout == "rows" else (d, c * k)
                            w = torch.randn(*shape, generator=gen)
                            if unit:  # the functional form takes unit vectors only (P2SGrad)
                                w = w / w.norm(dim=1 if layout == "rows" else 0, keepdim=True)
                            w = w.to(dev, dtype).requires_grad_()
                            y = torch.randint(0, c, (n,), generator=gen).to(dev)
                            call = lambda: fn(x, y, w, backend=backend, **kw)  # noqa: E731
                            n_ok += _run(f"{backend} {dt_name} D={d} {label}", call, [x, w],
                                         finite, bad, dev)
    dt = time.time() - t0
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"sanitize_small: {n_ok} forward+backward runs OK, {len(bad)} failed, in {dt:.1f} s on "
          f"{where}")
    for b in bad:
        print(f"  FAILED {b}")
    if missing:
        print(f"sanitize_small: asked-for backends not available on {dev.type}: {missing} "
              f"(available: {avail}; build_info: {fpl.build_info()})")
    return 1 if bad or missing or n_ok == 0 else 0


def _run(label, call, leaves, finite, bad, dev):
    import torch

    try:
        loss = call()
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        ok = finite(loss) and all(finite(g) for g in grads)
    except Exception as e:  # noqa: BLE001
        bad.append(f"{label}: {type(e).__name__}: {str(e)[:300]}")
        print(f"  {label}: ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
        return 0
    if not ok:
        bad.append(f"{label}: non-finite output or gradient")
        print(f"  {label}: NON-FINITE", flush=True)
        return 0
    print(f"  {label}: ok (loss {float(loss.detach()):.5g})", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
