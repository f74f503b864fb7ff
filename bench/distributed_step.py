"""Benchmark: fused_pairloss.DistributedLossWrapper's per-rank step (forward + backward of the loss)
on gloo processes against the single-process loss at the same global batch, side by side in one
run; optionally PML's DistributedLossWrapper too. The image-text losses (--loss clip siglip) run
their own rank logic in the recommended exact modes (docs/training.md: ClipLoss(local_loss=True,
gather_with_grad=True), SigLipLoss(dist_impl="bidir")), ours against open_clip's loss.py in the
same mode (the "pml" points of those rows are open_clip's; --pml-max-n bounds them too).

    python bench/distributed_step.py                           # 2 ranks, MS, N_global 2048 4096 8192, D=128
    python bench/distributed_step.py --world 2 --loss ms circle --n 4096 --pml-max-n 4096
    python bench/distributed_step.py --loss clip siglip --d 512 --n 4096 8192 16384 --pml-max-n 16384

Per rank: its N_global / world rows against the gathered batch (the fused ref path), so per-rank
work is N_local x N_global (1.5 N_global^2-GEMM-equivalents per rank with world 2, against 3 for
the single process in self mode), plus the collectives (sizes, labels, embeddings all-gather,
scalar all-reduces, one reduce-scatter). Each rank gets --rank-threads threads (default
cpu_count / world, so the ranks together use the machine once); the single process is timed
with all the machine's threads and with --rank-threads (the per-rank budget). Every point runs in
fresh processes; timing: median over the reps of each rank, reported for the slowest rank; peak
memory: VmHWM growth over the step (bench/measure.py helpers). The load average before each
point is recorded. Results: a table and bench/results/<device-tag>/distributed_step_W<w>_D<d>.{csv,json}.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import measure as Mz  # noqa: E402  bench/measure.py: the harness's memory and timing helpers


IMAGE_TEXT = ("clip", "siglip")


def make_loss(impl, loss):
    import fused_pairloss as fpl
    from pytorch_metric_learning import losses as L

    lib = fpl if impl == "fused" else L
    if loss == "ms":
        return lib.MultiSimilarityLoss()
    if loss == "circle":
        return lib.CircleLoss()
    if loss == "ntxent":
        return lib.NTXentLoss()
    if loss == "supcon":
        return lib.SupConLoss()
    raise ValueError(loss)


def data(n, d, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, max(2, n // 4), (n,), generator=g)


def image_text_step(cfg, rank=0, world=1):
    """(fn, x) for Mz.timed_steps: x holds this rank's image rows then its text rows (one leaf, so
    one gradient), fn(x) the loss in the recommended mode, ours ("fused") or open_clip's ("pml")."""
    import torch
    import torch.nn.functional as F

    import fused_pairloss as fpl
    from fused_pairloss.losses._image_text import open_clip_loss_module

    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(cfg["n"], cfg["d"], generator=g), dim=1).tensor_split(world)[rank]
    txt = F.normalize(torch.randn(cfg["n"], cfg["d"], generator=g), dim=1).tensor_split(world)[rank]
    lib = fpl if cfg["impl"] == "fused" else open_clip_loss_module()
    if lib is None:
        raise SystemExit("open-clip-torch is not installed (make deps puts it in .venv/no-deps)")
    if cfg["loss"] == "clip":
        loss = lib.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    else:
        loss = lib.SigLipLoss(rank=rank, world_size=world, dist_impl="bidir")
    scale, bias = torch.tensor(1 / 0.07), torch.tensor(-10.0)
    b = img.shape[0]
    x = torch.cat([img, txt]).requires_grad_(True)
    return (lambda x: loss(x[:b], x[b:], scale, bias)), x


def rank_worker(rank, cfg, port, outdir):
    import warnings

    import torch
    import torch.distributed as dist

    warnings.simplefilter("ignore")
    torch.set_num_threads(cfg["threads"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=cfg["world"])
    try:
        import fused_pairloss as fpl
        from pytorch_metric_learning.utils import distributed as pml_dist

        if cfg["loss"] in IMAGE_TEXT:
            fn, x = image_text_step(cfg, rank, cfg["world"])
        else:
            X, Y = data(cfg["n"], cfg["d"])
            rows = X.tensor_split(cfg["world"])[rank]
            yr = Y.tensor_split(cfg["world"])[rank]
            wrap = (fpl.DistributedLossWrapper if cfg["impl"] == "fused" else pml_dist.DistributedLossWrapper)
            loss = wrap(make_loss(cfg["impl"], cfg["loss"]))
            x = rows.clone().requires_grad_(True)
            fn = (lambda x: loss(x, yr))  # noqa: E731
        dist.barrier()
        first, fwd, bwd, peak = Mz.timed_steps(fn, x, dict(cfg, fixed_reps=cfg["dist_reps"]))
        # the wrapper's rank loss is its share of the global loss; an image-text rank's is its own loss
        share = 1 if cfg["loss"] in IMAGE_TEXT else cfg["world"]
        res = dict(rank=rank, first_value=first / share, fwd=fwd, bwd=bwd, peak_mib=peak)
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


def single_worker(cfg):
    import warnings

    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(cfg["threads"])
    if cfg["loss"] in IMAGE_TEXT:
        fn, x = image_text_step(cfg)
    else:
        X, Y = data(cfg["n"], cfg["d"])
        loss = make_loss(cfg["impl"], cfg["loss"])
        x = X.clone().requires_grad_(True)
        fn = (lambda x: loss(x, Y))  # noqa: E731
    first, fwd, bwd, peak = Mz.timed_steps(fn, x, cfg)
    return dict(first_value=first, fwd=fwd, bwd=bwd, peak_mib=peak)


def summarize(fwd, bwd):
    tot = [f + b for f, b in zip(fwd, bwd)]
    return dict(fwd_ms=1e3 * statistics.median(fwd), bwd_ms=1e3 * statistics.median(bwd),
                step_ms=1e3 * statistics.median(tot), reps=len(tot))


def run_distributed(cfg):
    import torch.multiprocessing as mp

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from dist_cases import free_port

    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(rank_worker, args=(cfg, free_port(), d), nprocs=cfg["world"], join=True,
                           start_method="spawn")
        ranks = [json.load(open(os.path.join(d, f"rank{r}.json"))) for r in range(cfg["world"])]
    per_rank = [dict(summarize(r["fwd"], r["bwd"]), peak_mib=r["peak_mib"]) for r in ranks]
    slowest = max(per_rank, key=lambda r: r["step_ms"])
    return dict(slowest, peak_mib=max(r["peak_mib"] for r in per_rank), per_rank=per_rank,
                first_value=ranks[0]["first_value"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--n", type=int, nargs="+", default=[2048, 4096, 8192], help="global batch sizes")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--loss", nargs="+", default=["ms"], choices=("ms", "circle", "ntxent", "supcon") + IMAGE_TEXT)
    ap.add_argument("--rank-threads", type=int, default=None)
    ap.add_argument("--pml-max-n", type=int, default=4096, help="PML's wrapper / loss up to this N (0: never)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--min-reps", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=15.0)
    ap.add_argument("--dist-reps", type=int, default=5, help="timed steps per rank (a fixed count: collectives)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.single:
        print(json.dumps(single_worker(json.loads(args.single))))
        return
    env = Mz.environment("cpu")
    cores = os.cpu_count()
    rank_threads = args.rank_threads or max(1, cores // args.world)
    out_dir = args.out or os.path.join(ROOT, "bench", "results", env["device_tag"])
    os.makedirs(out_dir, exist_ok=True)
    meta = dict(env=env, load_before=Mz.loadavg(), started=time.strftime("%Y-%m-%d %H:%M:%S"), args=vars(args),
                rank_threads=rank_threads)
    print(f"[distributed_step] {env.get('cpu')} ({cores} cores) | torch {env.get('torch')} | world {args.world} "
          f"x {rank_threads} threads (gloo) | load {meta['load_before']}", flush=True)
    base = dict(d=args.d, warmup=args.warmup, reps=args.reps, min_reps=args.min_reps, max_seconds=args.max_seconds,
                dist_reps=args.dist_reps)
    rows = []
    for loss in args.loss:
        for n in args.n:
            points = [("fused", "distributed", rank_threads), ("fused", "single", cores)]
            if rank_threads != cores:
                points.append(("fused", "single", rank_threads))
            if args.pml_max_n and n <= args.pml_max_n:
                points += [("pml", "distributed", rank_threads), ("pml", "single", cores)]
            for impl, mode, threads in points:
                cfg = dict(base, loss=loss, n=n, impl=impl, threads=threads, world=args.world)
                load = Mz.loadavg()
                if mode == "distributed":
                    rec = run_distributed(cfg)
                else:
                    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--single", json.dumps(cfg)],
                                          capture_output=True, text=True)
                    if proc.returncode != 0:
                        print(proc.stderr[-2000:], file=sys.stderr)
                        continue
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    rec = dict(summarize(r["fwd"], r["bwd"]), peak_mib=r["peak_mib"], first_value=r["first_value"])
                rec.update(loss=loss, n=n, impl=impl, mode=mode, threads=threads,
                           ranks=args.world if mode == "distributed" else 1, load=load)
                rows.append(rec)
                shown = "open_clip" if impl == "pml" and loss in IMAGE_TEXT else impl
                label = f"{shown} {mode} ({rec['ranks']} x {threads} thr)"
                print(f"  {loss:6s} N={n:6d} {label:32s} step {rec['step_ms']:9.1f} ms (fwd {rec['fwd_ms']:8.1f}, "
                      f"bwd {rec['bwd_ms']:8.1f}; {rec['reps']} reps)  peak/rank +{rec['peak_mib']:8.1f} MiB  "
                      f"value {rec['first_value']:.6f}  load {load}", flush=True)
    meta["load_after"] = Mz.loadavg()
    prefix = os.path.join(out_dir, f"distributed_step_W{args.world}_D{args.d}")
    with open(prefix + ".json", "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    keys = [k for k in ("loss", "n", "impl", "mode", "ranks", "threads", "step_ms", "fwd_ms", "bwd_ms", "reps",
                        "peak_mib", "first_value", "load")]
    with open(prefix + ".csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print(f"[distributed_step] load after {meta['load_after']}; wrote {prefix}.json / .csv")


if __name__ == "__main__":
    main()
