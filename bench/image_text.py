"""Benchmark: ClipLoss and SigLipLoss, fused_pairloss against open_clip 3.3's loss.py and a plain
image @ text.T forward + backward of the same shape (the baseline), one process, CPU.

    python bench/image_text.py                       # B = 4096 8192 16384, D = 512, fp32, all cores
    python bench/image_text.py --b 8192 --reps 5 --threads 2

Inputs: L2-normalized Gaussian image and text features (B x D, requires grad), logit_scale 1/0.07
(open_clip's initial value) and logit_bias -10 (SigLIP's), both requiring grad: a training step's
forward and backward of the loss alone. The baseline: logits = image @ text.T, then
logits.backward(G) with G a fixed B x B gradient (allocated before the measurement).

Time: one process per B holds every provider and runs them in turns (rep k runs all of them, in
a rotated order), so that other work on the shared machine slows them alike; reported is the
median over the reps of forward, backward and both, and each provider's total as a multiple of the
baseline's. Peak memory: a fresh process per (provider, B) runs one warm-up step and one measured
step; the growth of its peak resident set (VmHWM, reset through /proc/self/clear_refs) over its
resident set before the step, after malloc_trim (bench/measure.py's method), so the gradients of
the features are included and the inputs are not. The load average before and after each point
is recorded. Results: a table on stdout and
bench/results/<device-tag>/image_text_D<d>_<dtype>_<threads>t.{csv,json}.
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
import measure as Mz  # noqa: E402  bench/measure.py: the harness's memory helpers

# *_fused: the class engine's walk (the "auto" backend); *_chunked: the PyTorch row-chunk op
PROVIDERS = ("matmul", "clip_fused", "clip_chunked", "clip_open_clip", "siglip_fused", "siglip_chunked",
             "siglip_open_clip")


def open_clip_loss():
    from fused_pairloss.losses._image_text import open_clip_loss_module
    module = open_clip_loss_module()
    if module is None:
        raise SystemExit("open-clip-torch is not installed (pip install --no-deps open-clip-torch==3.3.0)")
    return module


def make_step(provider, B, D, dtype, seed):
    """(step, leaves): step() runs one forward + backward and returns (value, fwd s, bwd s)."""
    import torch
    import torch.nn.functional as F

    import fused_pairloss as fpl

    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(B, D, generator=g), dim=1).to(dtype).requires_grad_(True)
    txt = F.normalize(torch.randn(B, D, generator=g), dim=1).to(dtype).requires_grad_(True)
    t = torch.tensor(1 / 0.07, dtype=dtype, requires_grad=True)
    b = torch.tensor(-10.0, dtype=dtype, requires_grad=True)
    leaves = [img, txt, t, b]
    if provider == "matmul":
        G = torch.randn(B, B, generator=g).to(dtype)

        def run():
            t0 = time.perf_counter()
            logits = img @ txt.T
            t1 = time.perf_counter()
            logits.backward(G)
            return float("nan"), t1 - t0, time.perf_counter() - t1
        return run, leaves
    kind, impl = provider.split("_", 1)
    if impl == "fused":
        loss = fpl.ClipLoss() if kind == "clip" else fpl.SigLipLoss()
    elif impl == "chunked":
        from fused_pairloss.losses import _image_text, clip, siglip

        def loss(i, x, s, b):
            block = clip.clip_fused if kind == "clip" else siglip.siglip_fused
            return block(i, x, s, b, backend=_image_text.CHUNKED)
    else:
        oc = open_clip_loss()
        loss = oc.ClipLoss() if kind == "clip" else oc.SigLipLoss()

    def run():
        t0 = time.perf_counter()
        v = loss(img, txt, t, b)
        t1 = time.perf_counter()
        v.backward()
        return float(v.detach()), t1 - t0, time.perf_counter() - t1
    return run, leaves


def _clear(leaves):
    for x in leaves:
        x.grad = None


def memory_worker(cfg):
    import torch

    torch.set_num_threads(cfg["threads"])
    dtype = getattr(torch, cfg["dtype"])
    run, leaves = make_step(cfg["provider"], cfg["b"], cfg["d"], dtype, cfg["seed"])
    value = run()[0]
    _clear(leaves)
    Mz._malloc_trim()
    base = Mz.proc_status_kib("VmRSS")
    if Mz._reset_hwm():
        run()
        peak = Mz.proc_status_kib("VmHWM")
    else:
        with Mz._RssPoller() as p:
            run()
        peak = p.peak
    return dict(peak_mib=(peak - base) / 1024, value=value)


def time_worker(cfg):
    import torch

    torch.set_num_threads(cfg["threads"])
    dtype = getattr(torch, cfg["dtype"])
    steps = {p: make_step(p, cfg["b"], cfg["d"], dtype, cfg["seed"]) for p in cfg["providers"]}
    times = {p: [] for p in steps}
    values = {}
    for p, (run, leaves) in steps.items():  # warm-up
        values[p] = run()[0]
        _clear(leaves)
    names = list(steps)
    for rep in range(cfg["reps"]):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for p in order:
            run, leaves = steps[p]
            _, f, b = run()
            _clear(leaves)
            times[p].append((f, b))
    out = {}
    for p, ts in times.items():
        out[p] = dict(fwd_ms=1e3 * statistics.median(f for f, _ in ts),
                      bwd_ms=1e3 * statistics.median(b for _, b in ts),
                      total_ms=1e3 * statistics.median(f + b for f, b in ts),
                      total_ms_min=1e3 * min(f + b for f, b in ts), reps=len(ts), value=values[p])
    return out


def _sub(kind, cfg):
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", kind, json.dumps(cfg)],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        return {"error": (proc.stderr or "")[-1500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--b", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16"))
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-memory", action="store_true", help="time only")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tag", default="", help="appended to the result files' name")
    ap.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, cfg = args.worker
        fn = memory_worker if kind == "memory" else time_worker
        print(json.dumps(fn(json.loads(cfg))))
        return
    env = Mz.environment("cpu")
    out_dir = args.out or os.path.join(ROOT, "bench", "results", env["device_tag"])
    os.makedirs(out_dir, exist_ok=True)
    meta = dict(env=env, started=time.strftime("%Y-%m-%d %H:%M:%S"), args=vars(args))
    print(f"[image_text] {env.get('cpu')} | torch {env.get('torch')} | threads {args.threads} | D {args.d} "
          f"{args.dtype} | load {Mz.loadavg()}", flush=True)
    rows = []
    for B in args.b:
        cfg = dict(b=B, d=args.d, dtype=args.dtype, threads=args.threads, reps=args.reps, seed=args.seed,
                   providers=args.providers)
        load_before = Mz.loadavg()
        timing = _sub("time", cfg)
        load_after = Mz.loadavg()
        if "error" in timing:
            print(f"  B={B}: timing failed: {timing['error']}", flush=True)
        base = timing.get("matmul", {}).get("total_ms")
        for p in args.providers:
            rec = dict(provider=p, b=B, d=args.d, dtype=args.dtype, threads=args.threads,
                       load_before=load_before, load_after=load_after)
            rec.update(timing.get(p, {"status": "ERROR"}))
            if base and "total_ms" in rec:
                rec["total_x_matmul"] = round(rec["total_ms"] / base, 3)
            if not args.no_memory:
                mem = _sub("memory", dict(cfg, provider=p))
                rec["peak_mib"] = mem.get("peak_mib")
                if "error" in mem:
                    rec["memory_error"] = mem["error"][-300:]
            rows.append(rec)
            print(f"  B={B:6d} {p:17s} fwd {rec.get('fwd_ms', float('nan')):9.1f} ms  bwd "
                  f"{rec.get('bwd_ms', float('nan')):9.1f} ms  total {rec.get('total_ms', float('nan')):9.1f} ms "
                  f"({rec.get('total_x_matmul', float('nan')):.2f}x matmul)  peak +"
                  f"{rec.get('peak_mib') if rec.get('peak_mib') is not None else float('nan'):8.1f} MiB  "
                  f"value {rec.get('value', float('nan')):.6f}  load {load_before} -> {load_after}", flush=True)
        by = {r["provider"]: r for r in rows if r["b"] == B}
        for kind in ("clip", "siglip"):
            f, o = by.get(f"{kind}_fused"), by.get(f"{kind}_open_clip")
            if f and o and "total_ms" in f and "total_ms" in o:
                f["speedup_vs_open_clip"] = round(o["total_ms"] / f["total_ms"], 3)
                if f.get("peak_mib") and o.get("peak_mib"):
                    f["memory_ratio_vs_open_clip"] = round(o["peak_mib"] / max(f["peak_mib"], 1e-9), 2)
                f["value_rel_diff"] = abs(f["value"] - o["value"]) / max(abs(o["value"]), 1e-30)
                print(f"  B={B} {kind}: fused {f['speedup_vs_open_clip']:.2f}x faster than open_clip, "
                      f"{f.get('memory_ratio_vs_open_clip', float('nan')):.1f}x less peak memory; values differ by "
                      f"{f['value_rel_diff']:.1e}", flush=True)
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    prefix = os.path.join(out_dir, f"image_text_D{args.d}_{args.dtype}_{args.threads}t{args.tag}")
    with open(prefix + ".json", "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    keys = sorted({k for r in rows for k in r})
    with open(prefix + ".csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print(f"[image_text] wrote {prefix}.json / .csv")


if __name__ == "__main__":
    main()
