"""Markdown tables from bench/run.py results, for the README: every table says where it came from.

    python bench/tables.py bench/results/<machine>/<tag>_results.json            # vs matmul
    python bench/tables.py <results.json> --plain --provider cpu pml compile      # time / memory

The default table has one row per (loss, N): each provider's forward+backward time, the fused
backend's multiple of the plain matmul (the `fwdbwd_x_matmul` ratio) and both memories. `--plain`
gives time and peak memory per provider instead (for runs without a matmul point). Below each
table: the machine, the CPU kernels' instruction set, MKL's restriction, threads, date, commit and
the exact command, from the file's meta.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)  # as bench/run.py: `bench` from this tree

from bench.providers import FUSED_BACKENDS  # noqa: E402

LOSS_NAMES = {
    "ms": "MS", "ms_mined": "MS + miner", "circle": "Circle", "ntxent": "NTXent", "supcon": "SupCon",
    "contrastive": "Contrastive", "lifted": "GenLiftedStructure", "softtriple": "SoftTriple",
    "proxycircle": "ProxyCircle", "proxyanchor": "ProxyAnchor", "normsoftmax": "NormalizedSoftmax",
    "cosface": "CosFace", "arcface": "ArcFace",
}


def _ok(r):
    return r is not None and r["status"] == "OK"


def _time(ms):
    return f"{ms / 1000:.2f} s" if ms >= 1000 else f"{ms:.0f} ms" if ms >= 10 else f"{ms:.1f} ms"


def source_line(meta):
    """Where the numbers come from, in one line."""
    isa = meta.get("cpu_isa")
    mkl = meta.get("mkl_enable_instructions")
    parts = [meta.get("device_name") or meta.get("cpu") or "?"]
    if meta.get("device") == "cpu":
        parts.append(f"{meta.get('cpu_count')} cores, {meta.get('torch_threads')} threads")
        parts.append(f"CPU kernels {isa}" if isa else "CPU kernels' ISA not recorded")
        parts.append(f"MKL_ENABLE_INSTRUCTIONS={mkl}" if mkl else "MKL unrestricted")
    parts += [f"torch {meta.get('torch')}", f"{meta.get('dtype')}, D={meta.get('d')}",
              str(meta.get("date", "?"))[:10], f"commit {str(meta.get('git_commit', '?'))[:7]}"]
    return "; ".join(parts) + f"; `{meta.get('command')}`"


def table(meta, records, providers=None, plain=False):
    providers = providers or meta.get("providers") or sorted({r["provider"] for r in records})
    by = {(r["loss"], r["n"], r["provider"]): r for r in records}
    fused = next((p for p in providers if p in FUSED_BACKENDS), None)
    rows = list(dict.fromkeys((r["loss"], r["n"]) for r in records))
    plain = plain or fused is None
    if plain:
        head = ["loss", "N x M"] + [f"{p} time / memory" for p in providers]
    else:
        head = ["loss", "N x M"] + [f"{p}" for p in providers] + [f"{fused} / matmul", f"memory {fused} / matmul"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for loss, n in rows:
        any_r = next(r for r in records if r["loss"] == loss and r["n"] == n)
        cells = [LOSS_NAMES.get(loss, loss), f"{n} x {any_r['m']}"]
        for p in providers:
            r = by.get((loss, n, p))
            if not _ok(r):
                cells.append(r["status"] if r else "-")
            elif plain:
                cells.append(f"{_time(r['fwdbwd_ms'])} / {r['mem_mib']:.0f} MiB")
            else:
                cells.append(_time(r["fwdbwd_ms"]))
        if not plain:
            f, m = by.get((loss, n, fused)), by.get((loss, n, "matmul"))
            both = _ok(f) and _ok(m)
            cells.append(f"**{f['fwdbwd_ms'] / m['fwdbwd_ms']:.2f}x**" if both else "-")
            cells.append(f"{f['mem_mib']:.0f} / {m['mem_mib']:.0f} MiB" if both else "-")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="<tag>_results.json files of bench/run.py")
    ap.add_argument("--provider", nargs="+", default=None, help="columns, in order (default: the run's)")
    ap.add_argument("--plain", action="store_true", help="time / memory per provider, no matmul ratio")
    args = ap.parse_args(argv)
    for path in args.results:
        with open(path) as f:
            data = json.load(f)
        print(table(data["meta"], data["records"], args.provider, args.plain))
        print(f"\n{source_line(data['meta'])}\n")


if __name__ == "__main__":
    main()
