"""Benchmark: one CrossBatchMemory training step (forward + backward of the loss against a full
memory), fused_pairloss.CrossBatchMemory vs pytorch-metric-learning's, side by side in one run.

    python bench/xbm_step.py                              # batch 512, memory 16384, D=128, fp32, CPU
    python bench/xbm_step.py --batch 256 --memory 65536 --loss ms --threads 2

Each (loss, impl) point runs in a fresh process (peak memory is not polluted by another point):
the memory is filled (buffers written directly: the state after memory/batch steps), then
`--warmup` steps, one step for peak memory, and timed steps (median; at most `--max-seconds`,
at least `--min-reps`). Peak memory is the growth of the process's peak resident set (VmHWM,
reset through /proc/self/clear_refs; a 1 ms VmRSS poller where refused) over its resident set
just before the step, after malloc_trim. The load average (`uptime`) before and after is recorded:
other work on the machine slows every point alike only if it is steady, so read it with the times.
Results: a table on stdout and bench/results/<device-tag>/xbm_step_B<b>_M<m>_D<d>.{csv,json}.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import measure as Mz  # noqa: E402  bench/measure.py: the harness's memory and timing helpers
LOSSES = ("ms", "ms_miner", "ntxent", "supcon", "contrastive", "triplet_miner", "contrastive_ms_miner",
          "contrastive_pair_margin_miner")


def build(impl, loss, d, m):
    from pytorch_metric_learning import losses as L
    from pytorch_metric_learning import miners

    import fused_pairloss as fpl

    lib = fpl if impl == "fused" else L
    inner = {"ms": lambda: lib.MultiSimilarityLoss(), "ms_miner": lambda: lib.MultiSimilarityLoss(),
             "ntxent": lambda: lib.NTXentLoss(), "supcon": lambda: lib.SupConLoss(),
             "contrastive": lambda: lib.ContrastiveLoss(),
             "triplet_miner": lambda: lib.TripletMarginLoss(0.1),
             # PML's documented CrossBatchMemory setup (its docs: ContrastiveLoss + MultiSimilarityMiner)
             "contrastive_ms_miner": lambda: lib.ContrastiveLoss(),
             "contrastive_pair_margin_miner": lambda: lib.ContrastiveLoss()}[loss]()
    miner = {"ms_miner": lambda: miners.MultiSimilarityMiner(0.1),
             "triplet_miner": lambda: miners.TripletMarginMiner(0.2, type_of_triplets="semihard"),
             "contrastive_ms_miner": lambda: miners.MultiSimilarityMiner(0.1),
             "contrastive_pair_margin_miner": lambda: miners.PairMarginMiner(0.2, 0.8)}.get(loss)
    miner = miner() if miner else None
    return lib.CrossBatchMemory(inner, d, memory_size=m, miner=miner)


def worker(cfg):
    import torch

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    B, M, D, classes = cfg["batch"], cfg["memory"], cfg["d"], cfg["classes"]
    xbm = build(cfg["impl"], cfg["loss"], D, M)
    with torch.no_grad():  # a full memory: the state after M / B steps
        xbm.embedding_memory.copy_(torch.randn(M, D))
        xbm.label_memory.copy_(torch.randint(0, classes, (M,)))
    xbm.has_been_filled, xbm.queue_idx = True, 0
    x = torch.randn(B, D, requires_grad=True)
    y = torch.randint(0, classes, (B,))

    first, fwd, bwd, peak_mib = Mz.timed_steps(lambda x: xbm(x, y), x, cfg)
    tot = [f + b for f, b in zip(fwd, bwd)]
    return dict(loss=cfg["loss"], impl=cfg["impl"], batch=B, memory=M, d=D, threads=cfg["threads"],
                fwd_ms=1e3 * statistics.median(fwd), bwd_ms=1e3 * statistics.median(bwd),
                step_ms=1e3 * statistics.median(tot), step_ms_min=1e3 * min(tot), reps=len(tot),
                peak_mib=peak_mib, first_value=first)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--memory", type=int, default=16384)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--loss", nargs="+", default=["ms", "ms_miner", "supcon"], choices=LOSSES)
    ap.add_argument("--impl", nargs="+", default=["fused", "pml"], choices=("fused", "pml"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--min-reps", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    env = Mz.environment("cpu")
    out_dir = args.out or os.path.join(ROOT, "bench", "results", env["device_tag"])
    os.makedirs(out_dir, exist_ok=True)
    meta = dict(env=env, load_before=Mz.loadavg(), started=time.strftime("%Y-%m-%d %H:%M:%S"), args=vars(args))
    print(f"[xbm_step] {env.get('cpu')} | torch {env.get('torch')} | threads {args.threads} | "
          f"load {meta['load_before']}", flush=True)
    rows = []
    for loss in args.loss:
        for impl in args.impl:
            cfg = dict(loss=loss, impl=impl, batch=args.batch, memory=args.memory, d=args.d, classes=args.classes,
                       threads=args.threads, warmup=args.warmup, reps=args.reps, min_reps=args.min_reps,
                       max_seconds=args.max_seconds, seed=args.seed)
            load = Mz.loadavg()
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
                                  capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                rows.append(dict(loss=loss, impl=impl, status="ERROR", load=load))
                continue
            rec = json.loads(proc.stdout.strip().splitlines()[-1])
            rec.update(status="OK", load=load)
            rows.append(rec)
            print(f"  {loss:9s} {impl:5s} step {rec['step_ms']:9.1f} ms (fwd {rec['fwd_ms']:8.1f}, bwd "
                  f"{rec['bwd_ms']:8.1f}; {rec['reps']} reps)  peak +{rec['peak_mib']:8.1f} MiB  "
                  f"value {rec['first_value']:.6f}  load {load}", flush=True)
    meta["load_after"] = Mz.loadavg()
    # ratios pml / fused per loss
    by = {(r["loss"], r["impl"]): r for r in rows if r.get("status") == "OK"}
    for loss in args.loss:
        f, p = by.get((loss, "fused")), by.get((loss, "pml"))
        if f and p:
            f["speedup_vs_pml"] = p["step_ms"] / f["step_ms"]
            f["memory_ratio_vs_pml"] = p["peak_mib"] / max(f["peak_mib"], 1e-9)
            f["value_rel_diff"] = abs(f["first_value"] - p["first_value"]) / max(abs(p["first_value"]), 1e-12)
            print(f"  {loss}: fused is {f['speedup_vs_pml']:.1f}x faster, {f['memory_ratio_vs_pml']:.1f}x less peak "
                  f"memory; values differ by {f['value_rel_diff']:.1e} (relative)")
    B, M, D = args.batch, args.memory, args.d
    meta["sizes_mib"] = {"(B+M)*D fp32": (B + M) * D * 4 / 2**20, "B*M fp32": B * M * 4 / 2**20}
    print(f"  for scale: (B + M) D fp32 = {meta['sizes_mib']['(B+M)*D fp32']:.1f} MiB, one B x M fp32 matrix = "
          f"{meta['sizes_mib']['B*M fp32']:.1f} MiB; load after {meta['load_after']}")
    prefix = os.path.join(out_dir, f"xbm_step_B{B}_M{M}_D{D}")
    with open(prefix + ".json", "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    keys = sorted({k for r in rows for k in r})
    with open(prefix + ".csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print(f"[xbm_step] wrote {prefix}.json / .csv")


if __name__ == "__main__":
    main()
