"""PNG plots of a benchmark run: time vs N and peak memory vs N, log-log, one subplot per loss.

Only points with status OK are drawn; a provider that ran out of memory / time at some N simply
stops there (the table and CSV say why).
"""
from __future__ import annotations

import math
import os

# fixed colours / markers so that one provider looks the same in every plot
STYLE = {
    "cuda": ("tab:red", "o"), "triton": ("tab:orange", "s"), "cpu": ("tab:red", "o"),
    "reference": ("tab:blue", "^"), "compile": ("tab:green", "v"), "pml": ("tab:purple", "D"),
    "matmul": ("black", "x"),
}


def _series(records, loss, key):
    by_prov = {}
    for r in records:
        if r["loss"] != loss or r.get("status") != "OK" or r.get(key) is None:
            continue
        by_prov.setdefault(r["provider"], []).append((r["n"], r[key]))
    return {p: sorted(v) for p, v in by_prov.items()}


def plot(records, meta, prefix):
    """Write <prefix>time.png and <prefix>memory.png; returns the paths (empty without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"[bench] matplotlib unavailable, no plots: {e}")
        return []
    losses = [l for l in dict.fromkeys(r["loss"] for r in records)]
    if not losses:
        return []
    title = (f"{meta.get('device_name', '?')} | {meta.get('dtype', '?')}, D={meta.get('d', '?')} | "
             f"torch {meta.get('torch', '?')}")
    paths = []
    for key, ylabel, fname in (("fwdbwd_ms", "forward+backward time (ms)", "time.png"),
                               ("mem_mib", "peak memory beyond inputs (MiB)", "memory.png")):
        ncol = min(3, len(losses))
        nrow = int(math.ceil(len(losses) / ncol))
        fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 4.2 * nrow), squeeze=False)
        for ax, loss in zip(axes.flat, losses):
            for prov, pts in _series(records, loss, key).items():
                xs = [p[0] for p in pts]
                ys = [max(p[1], 1e-3) for p in pts]  # log scale: memory can be ~0
                color, marker = STYLE.get(prov, (None, "."))
                ls = "--" if prov == "matmul" else "-"
                ax.plot(xs, ys, ls, color=color, marker=marker, label=prov)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(loss)
            ax.set_xlabel("N (batch size)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[len(losses):]:
            ax.axis("off")
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = prefix + fname
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
