"""Loss fed by a miner, `loss(x, y, miner(x, y))`, forward + backward: ours (fused_pairloss.miners
and fused_pairloss.losses) against PML's own classes, and the plain matmul x @ x.T forward +
backward as the scale, every point in a fresh process (time: the median of the timed steps after a
warm-up; memory: the peak resident-set growth of one step, as bench/measure.py).

    PYTHONPATH=. python bench/miner_pairs.py --n 2048 --out bench/results/<machine>/miner_pairs_N2048
    PYTHONPATH=. python bench/miner_pairs.py --n 4096 --pairs BatchHardMiner:TripletMarginLoss \\
        --providers ours matmul

Writes <out>.json (the records and the environment) and <out>.csv, and prints a table.
"""
from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure  # noqa: E402

MINERS = {
    "TripletMarginMiner": dict(margin=0.2, type_of_triplets="semihard"),
    "MultiSimilarityMiner": dict(epsilon=0.1),
    "PairMarginMiner": dict(pos_margin=0.2, neg_margin=0.8),
    "BatchHardMiner": {},
    "BatchEasyHardMiner": {},
}
LOSSES = {
    "TripletMarginLoss": dict(margin=0.1),
    "ContrastiveLoss": {},
    "MultiSimilarityLoss": {},
    "NTXentLoss": {},
    "CircleLoss": {},
    "SupConLoss": {},
    "GeneralizedLiftedStructureLoss": {},
    "MarginLoss": {},
    "LiftedStructureLoss": {},
    "TupletMarginLoss": {},
    "ThresholdConsistentMarginLoss": {},
}


def _step_fn(provider, miner_name, loss_name, x, y, miner_kwargs):
    import torch
    if provider == "matmul":
        def step():
            s = x @ x.t()
            s.sum().backward()
        return step
    if provider == "ours":
        import fused_pairloss as fpl
        from fused_pairloss import miners
        miner, loss = getattr(miners, miner_name)(**miner_kwargs), getattr(fpl.losses, loss_name)(
            **LOSSES[loss_name])
    else:
        from pytorch_metric_learning import losses, miners
        miner, loss = getattr(miners, miner_name)(**miner_kwargs), getattr(losses, loss_name)(
            **LOSSES[loss_name])

    def step():
        loss(x, y, miner(x, y)).backward()
    del torch
    return step


def _point(args, conn):
    import warnings

    import torch
    warnings.simplefilter("ignore")
    provider, miner_name, loss_name, n, d, repeats, miner_kwargs = args
    torch.manual_seed(0)
    x = torch.randn(n, d, requires_grad=True)
    y = torch.arange(n) // 4
    try:
        step = _step_fn(provider, miner_name, loss_name, x, y, miner_kwargs)
        step()  # warm-up
        x.grad = None
        measure._malloc_trim()
        base = measure.proc_status_kib("VmRSS")
        hwm_reset = measure._reset_hwm()
        step()
        peak = measure.proc_status_kib("VmHWM") if hwm_reset else None
        times = []
        for _ in range(repeats):
            x.grad = None
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        conn.send(dict(status="OK", ms=1e3 * statistics.median(times),
                       mem_mib=None if peak is None else (peak - base) / 1024))
    except Exception as e:  # noqa: BLE001
        conn.send(dict(status="OOM" if measure._is_oom(e) else "ERROR", error=f"{type(e).__name__}: {e}"[:300]))


def run_point(spec, timeout):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_point, args=(spec, child))
    p.start()
    child.close()
    rec = None
    try:
        if parent.poll(timeout):
            rec = parent.recv()
    except EOFError:  # the child died without a word (killed: out of memory)
        rec = None
    timed_out = rec is None and p.is_alive()
    p.join(5)
    if p.is_alive():
        p.kill()
        p.join()
    if rec is None:  # killed by the kernel (SIGKILL: out of memory), else out of time
        rec = dict(status="OOM" if p.exitcode == -9 and not timed_out else "TIMEOUT", exitcode=p.exitcode)
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per point")
    ap.add_argument("--providers", nargs="+", default=["ours", "pml", "matmul"])
    ap.add_argument("--pairs", nargs="*", help="Miner:Loss pairs (default: every miner with every loss)")
    ap.add_argument("--miner-kwargs", type=json.loads, default={},
                    help='JSON: the miners\' arguments over MINERS\' (e.g. \'{"neg_margin": 1.5}\')')
    ap.add_argument("--out", required=True, help="output prefix (.json, .csv)")
    a = ap.parse_args(argv)
    pairs = [tuple(p.split(":")) for p in a.pairs] if a.pairs else [(m, ls) for m in MINERS for ls in LOSSES]
    records = []
    if "matmul" in a.providers:
        rec = run_point(("matmul", "", "", a.n, a.d, a.repeats, {}), a.timeout)
        records.append(dict(provider="matmul", miner="", loss="", n=a.n, **rec))
        print(f"matmul: {rec}", flush=True)
    for miner_name, loss_name in pairs:
        for provider in (p for p in a.providers if p != "matmul"):
            kwargs = {**MINERS[miner_name], **a.miner_kwargs}
            rec = run_point((provider, miner_name, loss_name, a.n, a.d, a.repeats, kwargs), a.timeout)
            records.append(dict(provider=provider, miner=miner_name, loss=loss_name, n=a.n, **rec))
            print(f"{miner_name} + {loss_name} [{provider}]: {rec}", flush=True)
    env = dict(command=" ".join([os.path.basename(sys.executable)] + sys.argv), cpu=measure._cpu_model(),
               cpu_count=os.cpu_count(), loadavg=measure.loadavg(), date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               miners={m: {**kw, **a.miner_kwargs} for m, kw in MINERS.items()}, losses=LOSSES, d=a.d,
               labels="arange(N) // 4 (4 samples per class)", dtype="float32")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(dict(meta=env, records=records), f, indent=1)
    with open(a.out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["miner", "loss", "n", "provider", "status", "ms", "mem_mib", "error"],
                           extrasaction="ignore")
        w.writeheader()
        w.writerows(records)
    print(format_table(records))


def format_table(records):
    by = {(r["miner"], r["loss"], r["provider"]): r for r in records}
    mm = by.get(("", "", "matmul"), {}).get("ms")
    lines = ["| miner + loss | ours ms | PML ms | PML / ours | ours / matmul | ours MiB | PML MiB |",
             "|---|---|---|---|---|---|---|"]

    def cell(r, k, spec):
        if r is None:
            return "-"
        return format(r[k], spec) if r.get("status") == "OK" and r.get(k) is not None else r.get("status", "-")
    for miner_name, loss_name in dict.fromkeys((r["miner"], r["loss"]) for r in records if r["miner"]):
        o, p = by.get((miner_name, loss_name, "ours")), by.get((miner_name, loss_name, "pml"))
        ok = o is not None and p is not None and o.get("status") == p.get("status") == "OK"
        speed = f"{p['ms'] / o['ms']:.1f}x" if ok else "-"
        vs_mm = f"{o['ms'] / mm:.2f}x" if mm and o is not None and o.get("status") == "OK" else "-"
        lines.append(f"| {miner_name} + {loss_name} | {cell(o, 'ms', '.0f')} | {cell(p, 'ms', '.0f')} | {speed} | "
                     f"{vs_mm} | {cell(o, 'mem_mib', '.0f')} | {cell(p, 'mem_mib', '.0f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
