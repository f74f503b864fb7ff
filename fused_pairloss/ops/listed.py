"""A miner's pairs in place of the label sets: the pair engine's row statistics (ops/README.md,
PairStats) from listed pairs only, O(#pairs + (N + M) D) memory, never N x M (docs/design.md "Listed
pairs").

A pair loss given an indices_tuple computes exactly what it computes from the label sets, with
each row's positive and negative sets replaced by its listed pairs: `ListedPairs` goes where the
backend goes (`ops/stats.pair_stats` recognizes it), so every loss's own fused function, declaration
and row combination serve both. Per listed pair, v = S_ij (cosine) or d_ij (lp, exact near 0), on
the CPU with the engines' own bits (the op listed_pair_values), so a kink decides a pair as the
engines' walks over the label sets do; the declaration's term per pair; the row reductions
(log-sum-exp, sum, counts) by scatter over the pairs' anchors. PML's mat-based losses (MultiSimilarity, Circle, SupCon,
GeneralizedLiftedStructure) reduce a 0/1 mask: duplicate pairs count once; its pair-based ones
(Contrastive, NTXent) reduce the pair list: a pair listed k times counts k times (`weighted`).
The declaration's miner (MultiSimilarityLoss's miner_epsilon) is not applied: with an
indices_tuple PML's loss does not mine either.
"""
from __future__ import annotations

import torch

from .. import _extension
from . import spec as S
from .engines import PairStats
from .operands import lp_squared_distances, ntx_pair_loss, stat_dtype


class ListedPairs:
    """(a1, p, a2, n) of PML's pair form (a triplet tuple (a, p, n) gives (a, p, a, n), as PML's
    convert_to_pairs); `weighted`: duplicates count (pair-based losses) or not (mat-based)."""

    def __init__(self, indices_tuple, weighted, device, n_rows=None, n_cols=None):
        if len(indices_tuple) == 3:
            a, p, n = indices_tuple
            indices_tuple = (a, p, a, n)
        # the tuple's form and ranges are the caller's check (V.check_indices_tuple)
        a1, p, a2, n = (torch.as_tensor(t, device=device).long().reshape(-1) for t in indices_tuple)
        self.weighted = weighted
        self.pos, self.neg = self._pairs(a1, p, n_rows, n_cols), self._pairs(a2, n, n_rows, n_cols)
        self.listed_pos, self.listed_neg = len(a1), len(a2)  # PML's len(a1), len(a2): duplicates included

    def _pairs(self, rows, cols, n_rows, n_cols):
        """(rows, cols, multiplicity) of the distinct pairs, by row then column. A dense list whose rows
        ascend (every miner's, PML's order) is counted strip by strip of rows (a bincount of the
        strip's entries, STRIP_ELEMENTS of them); any other list through a sort (torch.unique)."""
        if rows.numel() == 0:
            return rows, cols, rows.new_zeros(0)
        if (n_rows and n_cols and rows.numel() * DENSE_FRACTION >= n_rows * n_cols
                and bool((rows[1:] >= rows[:-1]).all())):
            step = max(1, STRIP_ELEMENTS // n_cols)
            bounds = list(range(0, n_rows, step)) + [n_rows]
            cuts = torch.searchsorted(rows, torch.tensor(bounds, device=rows.device)).tolist()
            parts = []
            for i0, i1, k0, k1 in zip(bounds[:-1], bounds[1:], cuts[:-1], cuts[1:]):
                if k1 == k0:
                    continue
                cnt = torch.bincount((rows[k0:k1] - i0) * n_cols + cols[k0:k1], minlength=(i1 - i0) * n_cols)
                nz = cnt.nonzero().squeeze(1)
                parts.append((nz // n_cols + i0, nz % n_cols, cnt[nz]))
            return tuple(torch.cat(t) for t in zip(*parts))
        width = int(cols.max()) + 1
        keys, counts = torch.unique(rows * width + cols, return_counts=True)
        return keys // width, keys % width, counts

    def count_rule_agrees(self):
        """PML's one-pair rule counts the listed pairs; the rows' counts hold the distinct ones for a
        mat-based loss: True when both give the same verdict."""
        distinct = (len(self.pos[0]) <= 1) & (len(self.neg[0]) <= 1)
        return self.weighted or distinct == ((self.listed_pos <= 1) & (self.listed_neg <= 1))


# pairs per chunk of the gathers (two chunk x D row blocks live at once); S entries per row strip
CHUNK_PAIRS = 1 << 16
STRIP_ELEMENTS = 1 << 20
# a pair list denser than 1 / DENSE_FRACTION of the N x M entries is computed by row strips of S (a
# GEMM per strip) instead of row gathers: on a CPU a gathered pair costs about as much as a few
# hundred GEMM entries
DENSE_FRACTION = 64


def _chunks(n):
    return [(k0, min(n, k0 + CHUNK_PAIRS)) for k0 in range(0, n, CHUNK_PAIRS)]


def _strips(q, r, rows):
    """Row strips [i0, i1) of q (at most STRIP_ELEMENTS entries of S each) and the pairs [k0, k1) in
    them (`rows` ascending)."""
    step = max(1, STRIP_ELEMENTS // max(r.shape[0], 1))
    bounds = torch.arange(0, q.shape[0] + step, step, device=rows.device).clamp(max=q.shape[0])
    cuts = torch.searchsorted(rows, bounds).tolist()
    bounds = bounds.tolist()
    return [(bounds[k], bounds[k + 1], cuts[k], cuts[k + 1]) for k in range(len(bounds) - 1)
            if cuts[k + 1] > cuts[k]]


def _strip_v(q, r, i0, i1, lp):
    """v of a strip of rows against every column: S, or d (the near pairs from the rows' difference,
    as the engines: docs/design.md "Numerics")."""
    s = q[i0:i1] @ r.t()
    if not lp:
        return s
    return lp_squared_distances(s, q[i0:i1], r).clamp_min(0).sqrt()


class _PairV(torch.autograd.Function):
    """v of the listed pairs, S or d (gradient 0 at d = 0): on CPU fp32 / fp64 from the engines'
    arithmetic (engine_values_op), elsewhere from row gathers in chunks or, for a dense list (rows
    ascending), from row strips of S; the backward likewise by gathers or strips. It saves q, r and
    the indices only, so memory is O(#pairs + (N + M) D + strip) whatever the number of pairs (PML's
    CrossBatchMemory lists all N x M of them)."""

    @staticmethod
    def forward(ctx, q, r, rows, cols, lp):
        dense = (rows.shape[0] * DENSE_FRACTION >= q.shape[0] * r.shape[0]
                 and bool((rows[1:] >= rows[:-1]).all()))  # the strips need the rows ascending
        engine_values = engine_values_op(q, r)
        if engine_values is not None:
            v = engine_values(q.detach(), r.detach(), rows, cols, lp)
        elif dense:
            v = q.new_empty(rows.shape[0])
            for i0, i1, k0, k1 in _strips(q, r, rows):
                v[k0:k1] = _strip_v(q, r, i0, i1, lp)[rows[k0:k1] - i0, cols[k0:k1]]
        else:
            v = q.new_empty(rows.shape[0])
            for k0, k1 in _chunks(rows.shape[0]):
                a, b = q[rows[k0:k1]], r[cols[k0:k1]]
                v[k0:k1] = ((a - b) ** 2).sum(1).sqrt() if lp else (a * b).sum(1)
        ctx.save_for_backward(q, r, rows, cols, v)
        ctx.lp, ctx.dense = lp, dense
        return v

    @staticmethod
    def backward(ctx, g):
        q, r, rows, cols, v = ctx.saved_tensors
        need_q, need_r = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():  # create_graph: the same product from differentiable ops
            return (*_pair_v_vjp(q, r, rows, cols, g, ctx.lp, need_q, need_r), None, None, None)
        gq = torch.zeros_like(q) if need_q else None
        gr = torch.zeros_like(r) if need_r else None
        if ctx.lp:  # dL/dd_ij = g; d/dq_i |q_i - r_j| = (q_i - r_j) / d: the weight g / d, 0 at d = 0
            g = torch.where(v > 0, g / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
        if ctx.dense:
            for i0, i1, k0, k1 in _strips(q, r, rows):
                W = q.new_zeros(i1 - i0, r.shape[0])  # duplicates add
                if W.device.type == "cpu":  # index_add: the faster scatter there, and deterministic
                    W.view(-1).index_add_(0, (rows[k0:k1] - i0) * r.shape[0] + cols[k0:k1], g[k0:k1])
                else:  # deterministic on a GPU, where index_add's atomics are not
                    W.index_put_((rows[k0:k1] - i0, cols[k0:k1]), g[k0:k1], accumulate=True)
                sign = -1.0 if ctx.lp else 1.0  # lp: dq_i = sum_j W_ij (q_i - r_j); cosine: W r
                if need_q:
                    gq[i0:i1] += sign * (W @ r) + (W.sum(1, keepdim=True) * q[i0:i1] if ctx.lp else 0)
                if need_r:
                    gr += sign * (W.t() @ q[i0:i1]) + (W.sum(0)[:, None] * r if ctx.lp else 0)
            return gq, gr, None, None, None
        for k0, k1 in _chunks(rows.shape[0]):
            ri, ci, gk = rows[k0:k1], cols[k0:k1], g[k0:k1, None]
            a, b = q[ri], r[ci]
            da, db = (gk * (a - b), -gk * (a - b)) if ctx.lp else (gk * b, gk * a)
            if need_q:
                gq.index_add_(0, ri, da)
            if need_r:
                gr.index_add_(0, ci, db)
        return gq, gr, None, None, None


def _pair_v_vjp(q, r, rows, cols, g, lp, need_q, need_r):
    """_PairV's vector-Jacobian product as differentiable torch ops (for a second derivative):
    the listed rows gathered at once, O(#pairs D) memory while create_graph is on."""
    a, b = q[rows], r[cols]
    if lp:  # the weight g / d, 0 at d = 0 (its gradient too: sqrt is never taken at 0)
        diff = a - b
        sq = (diff * diff).sum(1)
        apart = sq > 0
        w = torch.where(apart, g / torch.sqrt(torch.where(apart, sq, torch.ones_like(sq))), torch.zeros_like(g))
        da, db = w[:, None] * diff, -w[:, None] * diff
    else:
        da, db = g[:, None] * b, g[:, None] * a
    gq = torch.zeros_like(q).index_add(0, rows, da) if need_q else None
    gr = torch.zeros_like(r).index_add(0, cols, db) if need_r else None
    return gq, gr


_ENGINE_VALUES_OP = None


def _fake_listed_pair_values(q, r, rows, cols, lp):
    return q.new_empty(rows.shape)


def _listed_pair_values_backward(ctx, grad):
    raise RuntimeError("fused_pairloss::listed_pair_values has no gradient of its own: "
                       "ops/listed.pair_values wraps it in its backward")


def engine_values_op(q, r):
    """The C++ op that gives listed pairs the CPU engines' own bits (csrc/cpu/listed_pairs_cpu.cpp),
    for fp32 / fp64 CPU operands when built; else None (torch's products: another rounding than the
    engines', which may decide a pair at a kink differently from the same loss over the label sets)."""
    global _ENGINE_VALUES_OP
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64) or r.dtype != q.dtype:
        return None
    if _ENGINE_VALUES_OP is None:
        _ENGINE_VALUES_OP = False
        if _extension.has_kernel("listed_pair_values", "CPU"):  # not in a library built before it
            torch.library.register_fake("fused_pairloss::listed_pair_values")(_fake_listed_pair_values)
            torch.library.register_autograd("fused_pairloss::listed_pair_values", _listed_pair_values_backward)
            _ENGINE_VALUES_OP = torch.ops.fused_pairloss.listed_pair_values
    return _ENGINE_VALUES_OP or None


def pair_values(q, r, rows, cols, lp):
    """v (S, or d for lp) of the listed pairs (rows[k], cols[k]) of q against r, differentiable
    (first order); r may be q itself (autograd sums the two roles)."""
    return _PairV.apply(q, r, rows, cols, lp)


def _term(t: S.PairTerm, v):
    """x = (scale * w(v)) * (v - shift), w detached; hinge: relu with NaN taken as 0 (loss_spec.h)."""
    w = torch.relu(t.weight_offset + t.weight_slope * v.detach())
    x = (t.scale * w) * (v - t.shift)
    return torch.where(x > 0, x, torch.zeros_like(x)) if t.hinge else x


def _row_lse(x, rows, weight, n):
    """log sum_j w_j e^{x_j} per row (-inf for a row without pairs; NaN stays NaN)."""
    if x.numel() == 0:
        return x.new_full((n,), float("-inf"))
    m = torch.full((n,), float("-inf"), dtype=x.dtype, device=x.device)
    m = m.scatter_reduce(0, rows, x.detach(), reduce="amax", include_self=True)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    total = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, rows, weight * torch.exp(x - m_safe[rows]))
    has = torch.zeros(n, dtype=torch.bool, device=x.device).index_fill(0, rows, True)
    return torch.where(has, m_safe + torch.log(torch.where(has, total, torch.ones_like(total))), float("-inf"))


def listed_pair_stats(q, r, spec: S.PairLossSpec, pairs: ListedPairs) -> PairStats:
    """PairStats of normalized q (N, D) against r (M, D; None: q itself) over the listed pairs (no
    histograms)."""
    if spec.histogram is not None:
        raise ValueError("listed pairs: a declaration with a histogram is computed over the label sets only")
    if spec.mine or spec.pos_window is not None:
        raise ValueError("listed pairs: a declaration with a miner's rule (miner_epsilon, pos_window / neg_window) "
                         "is computed over the label sets only; given an indices_tuple, the listed pairs are the "
                         "mined ones")
    A = stat_dtype(q.dtype)
    qa = q.to(A)
    ra = qa if r is None else r.to(A)
    n, lp = q.shape[0], spec.distance == "lp"

    def side(pairs_, term):
        rows, cols, mult = pairs_
        w = (mult if pairs.weighted else torch.ones_like(mult)).to(A)
        x = _term(term, pair_values(qa, ra, rows, cols, lp))
        zero = torch.zeros(n, dtype=A, device=q.device)
        count = torch.zeros(n, dtype=torch.int32, device=q.device).index_add(0, rows, w.to(torch.int32))
        nonzero = torch.zeros(n, dtype=torch.int32, device=q.device).index_add(0, rows,
                                                                                (w * (x > 0)).to(torch.int32))
        lse = _row_lse(x, rows, w, n) if term.lse else zero + float("-inf")
        # an exp-weighted sum (loss_spec.h): e = exp(T x) on the pairs with x > 0, 1 elsewhere
        e = torch.exp(term.sum_temperature * torch.where(x > 0, x, 0)) if term.exp_weighted else None
        total = zero.index_add(0, rows, w * (x if e is None else e * x)) if term.sum else zero
        weight = zero.index_add(0, rows, w * torch.where(x > 0, e, 0)) if term.exp_weighted else zero
        return x, w, rows, lse, total, weight, count, (nonzero if term.sum else torch.zeros_like(nonzero))

    xp, wp, rows_p, lse_pos, sum_pos, weight_pos, count_pos, nonzero_pos = side(pairs.pos, spec.pos)
    _, _, _, lse_neg, sum_neg, weight_neg, count_neg, nonzero_neg = side(pairs.neg, spec.neg)
    pos_vs_neg = torch.zeros(n, dtype=A, device=q.device)
    if spec.pos_vs_neg_lse:  # NTXent: per positive pair -log(sigmoid(x_p - lse_neg) + tiny)
        t = xp - lse_neg[rows_p]
        pair_loss = ntx_pair_loss(t, spec.tiny(A))
        pos_vs_neg = pos_vs_neg.index_add(0, rows_p, wp * pair_loss)
    inf = torch.full((n,), float("inf"), dtype=A, device=q.device)
    no_hist = torch.zeros(0, n, dtype=A, device=q.device)
    return PairStats(lse_pos, lse_neg, sum_pos, sum_neg, pos_vs_neg, weight_pos, weight_neg, no_hist, no_hist,
                     count_pos, count_neg, nonzero_pos, nonzero_neg, inf, -inf)


def join_on_anchor(a1, a2):
    """torch.where(a1[:, None] == a2[None, :]) without the #a1 x #a2 matrix, in its order (by entry
    of a1, then of a2): a2 sorted stably, each entry of a1 takes its run. PML's convert_to_triplets
    (anchors of positive and negative pairs), a row's positives (labels of q and of r). Memory
    O(#a1 + #a2 + #matches)."""
    if a1.numel() == 0 or a2.numel() == 0:
        empty = a1.new_zeros(0)
        return empty, empty
    order = torch.sort(a2, stable=True)[1]
    keys = a2[order]
    start = torch.searchsorted(keys, a1)
    count = torch.searchsorted(keys, a1, right=True) - start
    pi = torch.repeat_interleave(torch.arange(a1.numel(), device=a1.device), count)
    offset = torch.arange(pi.numel(), device=a1.device) - torch.repeat_interleave(torch.cumsum(count, 0) - count,
                                                                                  count)
    return pi, order[start[pi] + offset]


__all__ = ["ListedPairs", "listed_pair_stats", "pair_values", "join_on_anchor"]
