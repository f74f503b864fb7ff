"""The engine calls a loss makes: `pair_stats`, `class_stats`. Each picks the op of the backend (the
C++ op for "cpu" / "cuda", its Triton twin for "triton", whose module is imported on first use:
importing triton is slow) and returns the engine's statistics (ops/README.md)."""
from __future__ import annotations

import dataclasses

import torch

from . import engines
from .listed import ListedPairs, listed_pair_stats
from . import spec as S
from .operands import weight_rows


def forward_op(engine: engines.Engine, backend):
    """The forward op of `engine` for `backend` ("cpu" / "cuda" share the C++ op; "triton" its own)."""
    if backend == "triton":
        from . import triton_engines  # importing it registers the twins (torch.compile traces this)

        if not triton_engines.AVAILABLE:
            raise RuntimeError("the Triton engines are not available (is triton installed?)")
        return triton_engines.forward_op(engine.name)
    engine.register_cpp()
    return getattr(torch.ops.fused_pairloss, f"{engine.name}_forward")


def backward_op(engine: engines.Engine, backend):
    """The backward op of `engine` for `backend` (first-order gradients; ops/README.md)."""
    if backend == "triton":
        from . import triton_engines

        forward_op(engine, backend)  # the availability check
        return triton_engines.backward_op(engine.name)
    engine.register_cpp()
    return getattr(torch.ops.fused_pairloss, f"{engine.name}_backward")


class MinedBy:
    """A backend whose pair engine also applies a pair miner's rule to the label sets: `changes`, the
    declaration's fields that say it (PairLossSpec: miner_epsilon and miner_on_cosine for PML's
    MultiSimilarityMiner, pos_window and neg_window for its PairMarginMiner; docs/semantics.md
    "Miners"). How a loss computes over our miners' pairs (fused_pairloss._miners.MinedPairs)
    without reading them. `record(st, q, r, exclude_col)`, if given, is called with the engine's
    statistics (CrossBatchMemory counts its miner's pairs from them)."""

    def __init__(self, backend, changes, record=None):
        self.backend, self.changes, self.record = backend, dict(changes), record


def pair_stats(q, r, labels_q, labels_r, exclude_col, spec: S.PairLossSpec, backend,
               row_shift=None) -> engines.PairStats:
    """Row statistics of the pair sets for normalized q (N, D) against r (M, D) (None: self mode,
    each row's own column excluded); exclude_col (N,) int64, ref mode: the column excluded from row
    i's positives, -1 for none; row_shift (N,): added to both terms' shift in row i (a constant:
    no gradient flows to it). Differentiable w.r.t. q and r. A `ListedPairs` in place of the
    backend: the statistics over a miner's listed pairs instead of the label sets (ops/listed.py)."""
    if isinstance(backend, ListedPairs):
        if row_shift is not None:
            raise NotImplementedError("pair_stats: row_shift over listed pairs")
        return listed_pair_stats(q, r, spec, backend)
    record = None
    if isinstance(backend, MinedBy):
        spec, backend, record = dataclasses.replace(spec, **backend.changes), backend.backend, backend.record
    terms, flags = spec.pack()
    labels_q = labels_q.to(device=q.device, dtype=torch.int64).contiguous()
    if r is not None:
        r = r.contiguous()
        labels_r = labels_r.to(device=q.device, dtype=torch.int64).contiguous()
        if exclude_col is not None:
            exclude_col = exclude_col.to(device=q.device, dtype=torch.int64).contiguous()
    else:
        labels_r, exclude_col = None, None
    if row_shift is not None:
        row_shift = row_shift.detach().to(device=q.device, dtype=engines.stat_dtype(q.dtype)).contiguous()
    values, counts, aux = forward_op(engines.PAIR, backend)(q.contiguous(), r, labels_q, labels_r, exclude_col,
                                                            list(terms), flags, row_shift)
    st = engines.PairStats(*S.pair_stats_of(values, counts, aux))
    if record is not None:
        record(st, q, r, exclude_col)
    return st


# engines that apply S.WEIGHT_OPERAND_FLAGS themselves (per tile, no copy of w); the others get
# weight_rows(w) from class_stats
NATIVE_WEIGHT_OPERANDS = {"cpu"}


def class_stats(q, w, labels, spec: S.ClassLossSpec, backend) -> engines.ClassStats:
    """Row and column statistics for normalized q (N, D) and the loss's weights w as its declaration
    lays them out (weights_layout "rows": (C*K, D), "columns": (D, C*K); vector c*K+k = center k of
    class c). Differentiable w.r.t. q and w."""
    terms, flags = spec.pack()
    engine_kind = "triton" if backend == "triton" else q.device.type
    if flags & S.WEIGHT_OPERAND_FLAGS and engine_kind not in NATIVE_WEIGHT_OPERANDS:
        w, flags = weight_rows(w, flags), flags & ~S.WEIGHT_OPERAND_FLAGS
    labels = labels.to(device=q.device, dtype=torch.int64).contiguous()
    rows, cols = forward_op(engines.CLASS, backend)(q.contiguous(), w.contiguous(), labels,
                                                    int(spec.centers_per_class), list(terms), flags)
    return engines.ClassStats(rows[0], rows[1], cols[0], cols[1])


__all__ = ["pair_stats", "class_stats", "forward_op", "backward_op", "MinedBy", "NATIVE_WEIGHT_OPERANDS"]
