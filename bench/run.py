#!/usr/bin/env python
"""fused_pairloss benchmark: every loss x every provider over a sweep of N (GitHub issue #6).

    python bench/run.py                      # = --quick: N in {1024, 2048, 4096}, D=128, fp32
    python bench/run.py --full               # larger sweep, more repeats
    python bench/run.py --device cuda --dtype bfloat16 --d 512 --n 1024 4096 16384
    python bench/run.py --loss ms circle --provider cpu reference matmul --n 2048

For each (loss, provider, N): median forward, backward and forward+backward time after warm-up,
the peak memory beyond the inputs, and every number also as a multiple of a plain matmul
forward+backward of the same shape. Each point runs in a child process (a fresh one per point on
CPU, one per (loss, provider) on GPU); a point that raises an out-of-memory error, exceeds
--mem-cap-mib or --timeout is recorded as OOM / TIMEOUT and the sweep goes on (larger N of the
same provider are then not run). Results: a table on stdout, <out>/<tag>_results.csv and .json
(with device, versions, date and the exact command) and <out>/<tag>_time.png / _memory.png;
<out> defaults to bench/results/<device-tag>/. See bench/README.md.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import multiprocessing as mp
import os
import shlex
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    # appended: `bench` from this tree, fused_pairloss from the install when there is one (`make
    # bench` installs the wheel and builds nothing in the tree; an editable install is the tree)
    sys.path.append(ROOT)

from bench import plots  # noqa: E402
from bench import providers as P  # noqa: E402
from bench.measure import FAILED, OK, OOM, TIMEOUT, ERROR, SKIP  # noqa: E402,F401

CSV_FIELDS = ["loss", "provider", "n", "m", "d", "dtype", "device", "status", "fwd_ms", "bwd_ms",
              "fwdbwd_ms", "fwd_x_matmul", "bwd_x_matmul", "fwdbwd_x_matmul", "mem_mib",
              "mem_x_matmul", "loss_value", "reps", "wall_s", "note"]

CAP_SLACK_MIB = 64.0  # the parent kills a CPU worker whose RSS grows past cap + this

PRESETS = {
    # (device kind, preset) -> defaults
    ("cpu", "quick"): dict(n=[1024, 2048, 4096], repeats=3, warmup=1, max_seconds=8.0, timeout=180.0),
    ("cpu", "full"): dict(n=[1024, 2048, 4096, 8192, 16384], repeats=5, warmup=2, max_seconds=60.0,
                          timeout=900.0),
    ("cuda", "quick"): dict(n=[1024, 4096, 16384], repeats=10, warmup=3, max_seconds=10.0,
                            timeout=300.0),
    ("cuda", "full"): dict(n=[1024, 2048, 4096, 8192, 16384, 32768], repeats=30, warmup=5,
                           max_seconds=20.0, timeout=600.0),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small sweep, few repeats (default)")
    mode.add_argument("--full", action="store_true", help="larger sweep, more repeats")
    ap.add_argument("--loss", nargs="+", choices=P.LOSSES, default=list(P.DEFAULT_LOSSES))
    ap.add_argument("--provider", nargs="+", choices=P.ALL_PROVIDERS, default=None,
                    help="default: every available fused backend (not triton on CPU: that is its "
                         "interpreter), reference, pml, compile, matmul")
    ap.add_argument("--dtype", default="float32", choices=sorted(P.DTYPES))
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    ap.add_argument("--n", nargs="+", type=int, default=None, help="batch sizes N")
    ap.add_argument("--d", type=int, default=128, help="embedding size D")
    ap.add_argument("--repeats", type=int, default=None, help="timed fwd+bwd runs per point")
    ap.add_argument("--warmup", type=int, default=None, help="untimed fwd+bwd runs first")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop repeating a point once its timed runs took this long (>= 1 run)")
    ap.add_argument("--timeout", type=float, default=None, help="per point, seconds -> TIMEOUT")
    ap.add_argument("--mem-cap-mib", type=float, default=None,
                    help="per-point cap on peak memory beyond the inputs -> OOM (CPU: resident "
                         "set growth, watched by the parent; GPU: allocator limit)")
    ap.add_argument("--out", default=None, help="output folder (default bench/results/<device-tag>)")
    ap.add_argument("--tag", default=None, help="file-name prefix (default <dtype>_D<d>)")
    ap.add_argument("--isolate", choices=("point", "group"), default=None,
                    help="a fresh process per point (CPU default) or per (loss, provider) (GPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in workers")
    ap.add_argument("--samples-per-class", type=int, default=4,
                    help="pair losses: labels drawn from N / this many classes")
    ap.add_argument("--centers-per-class", type=int, default=10, help="SoftTriple K")
    ap.add_argument("--ck-scale", type=float, default=1.0,
                    help="class losses: C*K = ck_scale * N (SoftTriple C = that / K)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-skip-larger", action="store_true",
                    help="also run larger N of a provider after it failed (OOM/TIMEOUT)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any point is ERROR")
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------------
def _git_commit():
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "") if head else None
    except Exception:  # noqa: BLE001
        return None


def _context(method="forkserver"):
    ctx = mp.get_context(method)
    if method == "forkserver":
        # workers fork from a server that already imported torch, fused_pairloss and PML
        # (a fresh process per point costs milliseconds instead of seconds of imports)
        ctx.set_forkserver_preload(["bench.measure"])
    return ctx


def _environment(ctx, device):
    from bench import measure

    rd, wr = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=measure.info_main, args=(device, wr), daemon=False)
    proc.start()
    wr.close()
    try:
        if not rd.poll(600):
            raise RuntimeError("environment probe timed out")
        kind, payload = rd.recv()
    except EOFError as e:
        raise RuntimeError(f"environment probe died (exit code {proc.exitcode})") from e
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    if kind != "info":
        raise RuntimeError(payload)
    return payload


def resolve_providers(args, env):
    avail = env.get("available_backends", [])
    on_cpu = env["device"] == "cpu"
    if args.provider:
        return list(dict.fromkeys(args.provider))
    fused = [b for b in P.FUSED_BACKENDS if b in avail and not (on_cpu and b == "triton")]
    return fused + list(P.BASE_PROVIDERS)


def make_points(args, env, providers, preset):
    order = {p: i for i, p in enumerate(["matmul", *P.FUSED_BACKENDS, "reference", "compile", "pml"])}
    provs = sorted(providers, key=lambda p: order.get(p, 99))
    points = []
    for loss in args.loss:
        for n in sorted(set(args.n or preset["n"])):
            for prov in provs:
                if prov == "pml" and P.BENCH_LOSSES[loss].pml is None and not args.provider:
                    continue  # no PML counterpart
                points.append(dict(
                    id=len(points), loss=loss, provider=prov, n=n,
                    m=P.columns(loss, n, args.ck_scale, args.centers_per_class), d=args.d,
                    dtype=P.DTYPES[args.dtype], device=env["device"], seed=args.seed,
                    repeats=args.repeats or preset["repeats"],
                    warmup=args.warmup if args.warmup is not None else preset["warmup"],
                    max_seconds=args.max_seconds or preset["max_seconds"],
                    mem_cap_mib=args.mem_cap_mib, threads=args.threads,
                    samples_per_class=args.samples_per_class,
                    centers_per_class=args.centers_per_class, ck_scale=args.ck_scale,
                    no_skip=args.no_skip_larger, sleep_s=3600))
    return points


def _unavailable_fused(points, env):
    """Fused backends asked for but not available here: SKIP records, not run."""
    avail = env.get("available_backends", [])
    keep, skipped = [], []
    for p in points:
        if p["provider"] in P.FUSED_BACKENDS and p["provider"] not in avail:
            from bench.measure import base_record

            r = base_record(p)
            r.update(status=SKIP, note=f"backend not available on {env['device']} "
                                       f"(available: {', '.join(avail)})")
            skipped.append(r)
        else:
            keep.append(p)
    return keep, skipped


class Runner:
    """Runs batches of points in child processes; enforces timeout and the CPU memory cap."""

    def __init__(self, ctx, timeout, mem_cap_mib, on_record, poll_s=0.02):
        self.ctx, self.timeout, self.cap = ctx, timeout, mem_cap_mib
        self.on_record, self.poll_s = on_record, poll_s
        self.proc = None

    def kill(self):
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)

    def run_batch(self, points):
        from bench import measure

        pending = list(points)
        while pending:
            rd, wr = self.ctx.Pipe(duplex=False)
            # not daemonic: a daemonic process may not start children (compile worker pools)
            self.proc = self.ctx.Process(target=measure.worker_main, args=(pending, wr), daemon=False)
            self.proc.start()
            wr.close()
            by_id = {p["id"]: p for p in pending}
            done_ids, current, base_kib, t0 = set(), None, None, time.monotonic()
            started_any = False
            failure = None  # (status, note) of the point the child was killed on / died in
            while True:
                msg = None
                if rd.poll(self.poll_s):
                    try:
                        msg = rd.recv()
                    except (EOFError, OSError):
                        msg = ("eof",)
                if msg is not None:
                    if msg[0] == "start":
                        current, base_kib, t0 = msg[1], msg[2], time.monotonic()
                        started_any = True
                    elif msg[0] == "result":
                        done_ids.add(msg[1])
                        self.on_record(msg[2])
                        current = None
                    elif msg[0] == "done":
                        break
                    elif msg[0] == "eof":
                        self.proc.join(5)
                        code = self.proc.exitcode
                        sig = -code if code is not None and code < 0 else None
                        if sig == signal.SIGKILL:
                            failure = (OOM, "worker killed by SIGKILL (kernel OOM killer?)")
                        elif sig:
                            try:
                                name = signal.Signals(sig).name
                            except ValueError:
                                name = str(sig)
                            failure = (ERROR, f"worker died of signal {name}")
                        else:
                            failure = (ERROR, f"worker died (exit code {code})")
                        break
                    continue
                if current is None:
                    continue
                elapsed = time.monotonic() - t0
                if self.timeout and elapsed > self.timeout:
                    self.kill()
                    failure = (TIMEOUT, f"killed after {elapsed:.0f} s (timeout {self.timeout:g} s)")
                    break
                if self.cap and by_id[current]["device"] == "cpu" and base_kib is not None:
                    rss = measure.proc_status_kib("VmRSS", self.proc.pid)
                    # slack: first-call costs (thread pools, lazy inits) are not the point's;
                    # the worker compares its exact peak during the measured run with the cap
                    if rss is not None and (rss - base_kib) / 1024.0 > self.cap + CAP_SLACK_MIB:
                        grow = (rss - base_kib) / 1024.0
                        self.kill()
                        failure = (OOM, f"resident set grew {grow:.0f} MiB > cap {self.cap:g} MiB; killed")
                        break
            self.kill()
            self.proc = None
            rd.close()
            rest = [p for p in pending if p["id"] not in done_ids]
            if not rest:
                break
            if failure is None:  # child exited without 'done': should not happen
                failure = (ERROR, "worker exited early")
            if current is None and started_any:
                pending = rest  # died between points (e.g. exited on a sticky CUDA error): go on
                continue
            bad = next((p for p in rest if p["id"] == current), rest[0])
            rec = measure.base_record(bad)
            rec.update(status=failure[0], note=failure[1])
            self.on_record(rec)
            rest = [p for p in rest if p["id"] != bad["id"]]
            if rec["status"] in FAILED and not bad.get("no_skip"):
                key = (bad["loss"], bad["provider"])
                keep = []
                for p in rest:
                    if (p["loss"], p["provider"]) == key and p["n"] >= bad["n"]:
                        self.on_record(measure.skip_record(p, rec["status"], bad["n"]))
                    else:
                        keep.append(p)
                rest = keep
            pending = rest


# ------------------------------------------------------------------------------------------
def add_ratios(records):
    mm = {(r["loss"], r["n"]): r for r in records if r["provider"] == "matmul" and r["status"] == OK}
    for r in records:
        base = mm.get((r["loss"], r["n"]))
        for k in ("fwd", "bwd", "fwdbwd"):
            v = r.get(k + "_ms")
            r[k + "_x_matmul"] = (round(v / base["fwdbwd_ms"], 3)
                                  if base and v is not None and base["fwdbwd_ms"] else None)
        v = r.get("mem_mib")
        r["mem_x_matmul"] = (round(v / base["mem_mib"], 3)
                             if base and v is not None and base.get("mem_mib") else None)
    return records


def check_agreement(records, dtype):
    """Flag providers whose loss value differs from the reference's on the same inputs."""
    tol = {"float64": 1e-6, "float32": 2e-3}.get(dtype, 5e-2)
    ref = {(r["loss"], r["n"]): r["loss_value"] for r in records
           if r["provider"] == "reference" and r.get("loss_value") is not None}
    msgs = []
    for r in records:
        v, rv = r.get("loss_value"), ref.get((r["loss"], r["n"]))
        if r["provider"] in ("reference", "matmul") or v is None or rv is None:
            continue
        if not (math.isfinite(v) and abs(v - rv) <= tol * max(1.0, abs(rv))):
            note = f"loss {v:.6g} != reference {rv:.6g}"
            if note not in r["note"]:
                r["note"] = (r["note"] + "; " if r["note"] else "") + note
            msgs.append(f"{r['loss']} N={r['n']} {r['provider']}: {note}")
    return msgs


def _fmt(v, spec=".1f"):
    if v is None:
        return "-"
    return format(v, spec)


def format_table(records):
    lines = []
    hdr = (f"{'N':>6} {'M':>6} {'provider':<10} {'status':<7} {'fwd ms':>10} {'bwd ms':>10} "
           f"{'f+b ms':>10} {'f+b/mm':>7} {'fwd/mm':>7} {'bwd/mm':>7} {'mem MiB':>9} {'mem/mm':>7}")
    for loss in dict.fromkeys(r["loss"] for r in records):
        lines.append("")
        lines.append(f"== {loss} ==")
        lines.append(hdr)
        rows = sorted((r for r in records if r["loss"] == loss), key=lambda r: (r["n"], r["id"]))
        for r in rows:
            lines.append(
                f"{r['n']:>6} {r['m']:>6} {r['provider']:<10} {r['status']:<7} "
                f"{_fmt(r['fwd_ms'], '.2f'):>10} {_fmt(r['bwd_ms'], '.2f'):>10} "
                f"{_fmt(r['fwdbwd_ms'], '.2f'):>10} {_fmt(r['fwdbwd_x_matmul'], '.2f'):>7} "
                f"{_fmt(r['fwd_x_matmul'], '.2f'):>7} {_fmt(r['bwd_x_matmul'], '.2f'):>7} "
                f"{_fmt(r['mem_mib'], '.1f'):>9} {_fmt(r['mem_x_matmul'], '.2f'):>7}"
                + (f"  {r['note'][:90]}" if r["status"] != OK and r["note"] else ""))
    return "\n".join(lines)


def write_results(records, meta, prefix):
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    recs = sorted(records, key=lambda r: r["id"])
    tmp = prefix + "results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in recs:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
    os.replace(tmp, prefix + "results.csv")
    tmp = prefix + "results.json.tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "records": recs}, f, indent=1, default=str)
    os.replace(tmp, prefix + "results.json")
    return [prefix + "results.csv", prefix + "results.json"]


class _Progress:
    def __init__(self, total, desc):
        try:
            import threading

            from tqdm import tqdm

            tqdm.set_lock(threading.RLock())  # not tqdm's default multiprocessing lock
            self.bar = tqdm(total=total, desc=desc, unit="pt", dynamic_ncols=True)
        except ImportError:
            self.bar = None
        self.total, self.n = total, 0

    def update(self, rec):
        self.n += 1
        txt = f"{rec['loss']} N={rec['n']} {rec['provider']}: {rec['status']}"
        if self.bar is not None:
            self.bar.set_postfix_str(txt, refresh=False)
            self.bar.update(1)
        else:
            print(f"[{self.n}/{self.total}] {txt}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    preset_name = "full" if args.full else "quick"
    # Small machines: inductor compiles in-process (a compile-worker pool per point costs more).
    if (os.cpu_count() or 1) <= 4:
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    # torch.cuda.is_available() through NVML: CUDA must not be initialized before a fork
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    ctx = _context()
    try:
        env = _environment(ctx, args.device)
    except Exception as e:  # noqa: BLE001
        if args.device == "cpu" or "is_available() is False" in str(e):
            print(f"[bench] cannot set up device {args.device!r}: {e}", file=sys.stderr)
            return 2
        # e.g. something initialized CUDA in the fork server: fall back to spawned workers
        print(f"[bench] forked worker failed on {args.device!r} ({e}); retrying with spawn",
              file=sys.stderr)
        ctx = _context("spawn")
        try:
            env = _environment(ctx, args.device)
        except Exception as e2:  # noqa: BLE001
            print(f"[bench] cannot set up device {args.device!r}: {e2}", file=sys.stderr)
            return 2
    kind = "cuda" if env["device"].startswith("cuda") else "cpu"
    preset = PRESETS[(kind, preset_name)]
    providers = resolve_providers(args, env)
    points = make_points(args, env, providers, preset)
    points, records = _unavailable_fused(points, env)
    isolate = args.isolate or ("group" if kind == "cuda" else "point")
    timeout = args.timeout if args.timeout is not None else preset["timeout"]

    out_dir = os.path.abspath(args.out or os.path.join(ROOT, "bench", "results", env["device_tag"]))
    tag = args.tag or f"{P.DTYPES[args.dtype]}_D{args.d}"
    prefix = os.path.join(out_dir, tag + "_")
    meta = dict(env)
    meta.update(
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command=shlex.join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT)
                            else sys.executable, "bench/run.py", *argv]),
        git_commit=_git_commit(), preset=preset_name, dtype=P.DTYPES[args.dtype], d=args.d,
        n=sorted(set(args.n or preset["n"])), losses=args.loss, providers=providers,
        repeats=args.repeats or preset["repeats"],
        warmup=args.warmup if args.warmup is not None else preset["warmup"],
        max_seconds=args.max_seconds or preset["max_seconds"], timeout_s=timeout,
        mem_cap_mib=args.mem_cap_mib, isolate=isolate, samples_per_class=args.samples_per_class,
        centers_per_class=args.centers_per_class, ck_scale=args.ck_scale, seed=args.seed,
        timing=("CUDA events, median of repeats" if kind == "cuda" else
                "time.perf_counter, median of repeats"),
        memory=("torch.cuda.max_memory_allocated during one fwd+bwd minus allocated before"
                if kind == "cuda" else
                "peak resident set (VmHWM) growth during one fwd+bwd, fresh process per point"),
    )
    print(f"[bench] {env['device_name']} ({env['device']}), torch {env['torch']}, triton "
          f"{env['triton']}, fused_pairloss {env['fused_pairloss']}, backends "
          f"{env.get('available_backends')}", file=sys.stderr)
    if env.get("fused_pairloss_error"):
        print(f"[bench] fused_pairloss did not import: {env['fused_pairloss_error']}", file=sys.stderr)
    print(f"[bench] {len(points)} points -> {prefix}*", file=sys.stderr)

    progress = _Progress(len(points), f"bench {kind}")
    last_write = [0.0]

    def on_record(rec):
        records.append(rec)
        progress.update(rec)
        if time.monotonic() - last_write[0] > 2.0:  # keep partial results on disk
            write_results(add_ratios(records), meta, prefix)
            last_write[0] = time.monotonic()

    runner = Runner(ctx, timeout, args.mem_cap_mib, on_record)
    interrupted = False
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if isolate == "point":
            batches = [[p] for p in points]
        else:
            groups = {}
            for p in points:
                groups.setdefault((p["loss"], p["provider"]), []).append(p)
            # cheapest and most wanted first (matmul: the ratios' base; compile: slow to build),
            # so that a sweep cut short by a time limit still holds the fused backends
            rank = {p: i for i, p in enumerate(["matmul", *P.FUSED_BACKENDS, "reference", "pml",
                                                "compile"])}
            batches = [sorted(g, key=lambda p: p["n"]) for g in groups.values()]
            batches.sort(key=lambda b: (rank.get(b[0]["provider"], 99), P.LOSSES.index(b[0]["loss"])
                                        if b[0]["loss"] in P.LOSSES else 99))
        failed = {}
        for batch in batches:
            if isolate == "point" and not args.no_skip_larger:
                p = batch[0]
                key = (p["loss"], p["provider"])
                if key in failed:
                    from bench.measure import skip_record

                    on_record(skip_record(p, *failed[key]))
                    continue
            n_before = len(records)
            runner.run_batch(batch)
            for r in records[n_before:]:
                if r["status"] in FAILED:
                    failed.setdefault((r["loss"], r["provider"]), (r["status"], r["n"]))
    except KeyboardInterrupt:
        interrupted = True
        runner.kill()
        print("\n[bench] interrupted: writing partial results", file=sys.stderr)
    finally:
        runner.kill()
        signal.signal(signal.SIGTERM, old)
        progress.close()

    meta["interrupted"] = interrupted
    add_ratios(records)
    warnings = check_agreement(records, P.DTYPES[args.dtype])
    records.sort(key=lambda r: r["id"])
    files = write_results(records, meta, prefix)
    if not args.no_plots:
        files += plots.plot(records, meta, prefix)
    print(format_table(records))
    counts = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print("\n[bench] " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    for w in warnings:
        print(f"[bench] WARNING {w}")
    for f in files:
        print(f"[bench] wrote {os.path.relpath(f, os.getcwd()) if f.startswith(os.getcwd()) else f}")
    if interrupted:
        return 130
    if args.strict and counts.get(ERROR):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
