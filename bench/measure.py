"""Worker side of the benchmark: runs benchmark points inside a child process.

The parent (bench/run.py) starts one child per point on CPU (a fresh process, so the peak
resident-set growth of one point is not polluted by another) and one child per (loss, provider)
on GPU (where torch.cuda.max_memory_allocated isolates points, and the CUDA context and compiled
kernels are reused across N). Messages to the parent over a pipe:
  ("start", point_id, base_rss_kib)   before the point runs (the parent enforces the memory cap
                                      and the timeout from here)
  ("result", point_id, record)        one finished point (any status)
  ("done",)                           the batch is finished

Per point: build inputs and the provider's forward/backward, `warmup` fwd+bwd runs (this is
where torch.compile compiles), one run for peak memory, then up to `repeats` timed fwd+bwd runs
(stopping early once `max_seconds` is spent, at least one), each timed as forward, backward and
both (CUDA events on GPU, perf_counter on CPU); the record holds the medians.

Memory: GPU: torch.cuda.max_memory_allocated() during one fwd+bwd minus what was allocated before
it (inputs and parameters), after resetting the peak. CPU: the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs; a 1 ms VmRSS poller where that is not allowed)
minus its resident set just before the run, after malloc_trim so that freed heap pages are given
back to the OS and count again when reused.
"""
from __future__ import annotations

import ctypes
import gc
import os
import platform
import statistics
import threading
import time
import traceback

try:  # imported here so that the forkserver preloads them once (fast fork per point)
    import torch  # noqa: F401
except Exception:  # noqa: BLE001
    torch = None
for _m in ("fused_pairloss", "fused_pairloss.functional", "fused_pairloss.reference",
           "pytorch_metric_learning.losses", "pytorch_metric_learning.miners"):
    try:
        __import__(_m)
    except Exception:  # noqa: BLE001  (reported per point, where it matters)
        pass

try:
    from . import providers as P
except ImportError:  # loaded as a top-level module
    import providers as P  # type: ignore

OK, OOM, TIMEOUT, ERROR, SKIP = "OK", "OOM", "TIMEOUT", "ERROR", "SKIP"
FAILED = (OOM, TIMEOUT)  # statuses after which larger N of the same provider are not run


# ------------------------------------------------------------------------------------------
# process memory helpers (Linux /proc)
def proc_status_kib(field="VmRSS", pid="self"):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:  # noqa: BLE001  (not glibc)
        pass


class _RssPoller:
    """Fallback peak-RSS meter: polls VmRSS every ~1 ms in a thread."""

    def __init__(self):
        self.peak = proc_status_kib() or 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            v = proc_status_kib()
            if v is not None and v > self.peak:
                self.peak = v
            time.sleep(0.001)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


# ------------------------------------------------------------------------------------------
def timed_steps(fn, x, cfg):
    """(first value, fwd times, bwd times, peak MiB) of steps v = fn(x); v.backward(), for the
    step benchmarks (xbm_step.py, distributed_step.py): cfg["warmup"] untimed steps (the first
    gives the value), one step for the peak resident-set growth, then timed steps: cfg["min_reps"]
    up to cfg["reps"] within cfg["max_seconds"], or exactly cfg["fixed_reps"] when set (ranks must
    all run the same number of steps: collectives)."""
    def step():
        t0 = time.perf_counter()
        v = fn(x)
        t1 = time.perf_counter()
        v.backward()
        t2 = time.perf_counter()
        x.grad = None
        return float(v.detach()), t1 - t0, t2 - t1

    first = step()[0]
    for _ in range(cfg["warmup"] - 1):
        step()
    _malloc_trim()
    base = proc_status_kib("VmRSS")
    if _reset_hwm():
        step()
        peak = proc_status_kib("VmHWM")
    else:
        with _RssPoller() as p:
            step()
        peak = p.peak
    fwd, bwd = [], []
    t_end = time.monotonic() + cfg["max_seconds"]
    fixed = cfg.get("fixed_reps")
    while (len(fwd) < fixed) if fixed else (
            len(fwd) < cfg["min_reps"] or (time.monotonic() < t_end and len(fwd) < cfg["reps"])):
        _, f, b = step()
        fwd.append(f)
        bwd.append(b)
    return first, fwd, bwd, (peak - base) / 1024


def loadavg():
    """The 1, 5 and 15 minute load averages, as /proc/loadavg has them."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    msg = str(e).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "cannot allocate memory" in msg


def _scalar(out):
    try:
        if out.numel() == 1:
            return float(out.detach().float().item())
    except Exception:  # noqa: BLE001
        pass
    return None


def base_record(point):
    keys = ("id", "loss", "provider", "n", "m", "d", "dtype", "device")
    rec = {k: point.get(k) for k in keys}
    rec.update(status=None, fwd_ms=None, bwd_ms=None, fwdbwd_ms=None, mem_mib=None,
               loss_value=None, reps=0, wall_s=None, note="")
    return rec


def skip_record(point, status, failed_n):
    rec = base_record(point)
    rec.update(status=status, note=f"not run: {status} at N={failed_n}")
    return rec


def _run_point(point):
    import torch

    rec = base_record(point)
    t_start = time.perf_counter()
    dev = torch.device(point["device"])
    cuda = dev.type == "cuda"
    if point.get("threads"):
        torch.set_num_threads(int(point["threads"]))
    case = None
    out = None
    try:
        case = P.build(point)
        cap = point.get("mem_cap_mib")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            if cap:
                total = torch.cuda.get_device_properties(dev).total_memory
                frac = min(1.0, (torch.cuda.memory_allocated() + cap * 2**20) / total)
                torch.cuda.set_per_process_memory_fraction(frac, dev)

        def fwd_bwd():
            case.zero_grad()
            o = case.forward()
            case.backward(o)
            return o

        # warm-up (compiles), then one run for memory, then the timed runs
        max_s = float(point.get("max_seconds") or 1e9)
        for _ in range(max(1, int(point.get("warmup", 1)))):
            out = fwd_bwd()
            del out
            out = None
            if time.perf_counter() - t_start > max_s:
                break
        if cuda:
            torch.cuda.synchronize()

        # peak memory of one fwd+bwd beyond the inputs
        case.zero_grad()
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            out = fwd_bwd()
            torch.cuda.synchronize()
            mem = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
        else:
            _malloc_trim()
            if _reset_hwm():
                base = proc_status_kib("VmRSS")
                out = fwd_bwd()
                peak = proc_status_kib("VmHWM")
            else:
                base = proc_status_kib("VmRSS")
                with _RssPoller() as poller:
                    out = fwd_bwd()
                peak = poller.peak
            mem = max(0, (peak or 0) - (base or 0)) / 1024.0
        rec["loss_value"] = _scalar(out)
        rec["mem_mib"] = round(mem, 3)
        del out
        out = None

        # timed runs
        fw, bw, tot = [], [], []
        t_loop = time.perf_counter()
        for _ in range(max(1, int(point.get("repeats", 3)))):
            case.zero_grad()
            if cuda:
                e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
                e0.record()
                out = case.forward()
                e1.record()
                case.backward(out)
                e2.record()
                e2.synchronize()
                f, b = e0.elapsed_time(e1), e1.elapsed_time(e2)
            else:
                t0 = time.perf_counter()
                out = case.forward()
                t1 = time.perf_counter()
                case.backward(out)
                t2 = time.perf_counter()
                f, b = (t1 - t0) * 1e3, (t2 - t1) * 1e3
            del out
            out = None
            fw.append(f)
            bw.append(b)
            tot.append(f + b)
            if time.perf_counter() - t_loop > max_s:
                break
        rec.update(fwd_ms=statistics.median(fw), bwd_ms=statistics.median(bw),
                   fwdbwd_ms=statistics.median(tot), reps=len(tot), status=OK)
        if cap and mem > cap:
            rec["status"] = OOM
            rec["note"] = f"peak {mem:.1f} MiB > cap {cap:g} MiB"
    except P.Unavailable as e:
        rec.update(status=SKIP, note=str(e))
    except Exception as e:  # noqa: BLE001
        if _is_oom(e):
            rec.update(status=OOM, note=str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        else:
            tb = traceback.format_exc(limit=3).strip().splitlines()
            rec.update(status=ERROR, note=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                       f" | {tb[-3][:160] if len(tb) >= 3 else ''}")
    finally:
        out = None  # noqa: F841  (drop the last output before collecting)
        case = None
        gc.collect()
        if cuda:
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.set_per_process_memory_fraction(1.0, dev)
            except Exception:  # noqa: BLE001  (a sticky CUDA error: the parent restarts us)
                pass
    rec["wall_s"] = round(time.perf_counter() - t_start, 3)
    return rec


def _cuda_broken() -> bool:
    import torch

    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").add_(1).item()
        return False
    except Exception:  # noqa: BLE001
        return True


def worker_main(points, conn):
    """Run `points` in order; larger N of a (loss, provider) that failed are skipped."""
    failed = {}
    try:
        for point in points:
            key = (point["loss"], point["provider"])
            if key in failed and not point.get("no_skip"):
                status, n = failed[key]
                conn.send(("result", point["id"], skip_record(point, status, n)))
                continue
            conn.send(("start", point["id"], proc_status_kib("VmRSS")))
            rec = _run_point(point)
            if rec["status"] in FAILED:
                failed[key] = (rec["status"], point["n"])
            conn.send(("result", point["id"], rec))
            if rec["status"] == ERROR and point["device"].startswith("cuda") and _cuda_broken():
                # a sticky CUDA error (illegal address, device assert) poisons this process:
                # exit, and the parent goes on with the remaining points in a fresh one
                conn.close()
                os._exit(3)
        conn.send(("done",))
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------
def _slug(s):
    out = "".join(c if c.isalnum() else "-" for c in s.strip())
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(modname, dist=None):
    try:
        mod = __import__(modname)
        v = getattr(mod, "__version__", None)
        if v:
            return str(v)
    except Exception:  # noqa: BLE001
        return None
    try:
        from importlib.metadata import version

        return version(dist or modname)
    except Exception:  # noqa: BLE001
        return "unknown"


def environment(device="auto"):
    """Device, versions and the fused backends available there (run in a child)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch.cuda.is_available() is False")
    info = {
        "device": device,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "fused_pairloss": _version("fused_pairloss"),
        "pytorch_metric_learning": _version("pytorch_metric_learning", "pytorch-metric-learning"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        torch.zeros(1, device=device).add_(1).item()  # fails here if CUDA is unusable after fork
        props = torch.cuda.get_device_properties(torch.device(device))
        info["device_name"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 2)
        info["device_tag"] = "cuda-" + _slug(props.name)
    else:
        info["device_name"] = info["cpu"]
        info["device_tag"] = f"cpu-{_slug(info['cpu'])[:48]}-{os.cpu_count()}c"
    try:
        import fused_pairloss as fpl

        info["available_backends"] = list(fpl.available_backends(device.split(":")[0]))
        try:
            info["build_info"] = fpl.build_info()
            # the instruction set the CPU kernels run (FPL_CPU_ISA can force a lower one) and
            # whether MKL (the matmul / compile providers) was restricted too
            info["cpu_isa"] = torch.ops.fused_pairloss.cpu_isa()
            info["mkl_enable_instructions"] = os.environ.get("MKL_ENABLE_INSTRUCTIONS")
        except Exception:  # noqa: BLE001
            pass
    except Exception as e:  # noqa: BLE001
        info["available_backends"] = ["reference"]
        info["fused_pairloss_error"] = f"{type(e).__name__}: {e}"
    return info


def info_main(device, conn):
    try:
        conn.send(("info", environment(device)))
    except Exception as e:  # noqa: BLE001
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()
