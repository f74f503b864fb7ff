"""Per-row sums over each row's positive pairs of a function of the pair's value and of the row
statistics of its two ends (docs/design.md "Positive-pair terms"): the second pass of the losses
whose per-pair term reads a row's reduction over its negatives (PML's LiftedStructureLoss:
logaddexp(L_a, L_p) + d_ap; TupletMarginLoss: softplus(L_a - s cos(theta_ap - m))).

The row statistics come from the pair engine (any backend), with their gradient; this pass
enumerates the positive pairs (sorted labels: O(#positive pairs) indices, no N x M), gathers the
two rows of each pair in chunks and adds f per row. As the op
`fused_pairloss::positive_pair_rows` (fixed output shape, fake kernel, autograd through the op
`positive_pair_rows_backward`, which recomputes), torch.compile traces a loss through it. A
miner's listed positive pairs take the same function eagerly (`listed_pair_rows`).

A term is registered by name with `register_pair_term`: its values f(u, row_stat, col_stat,
same_index, p0, p1, lp) (u = S, or d for lp; row_stat / col_stat the statistics at the pair's row
and column index; same_index: row index == column index) and its partial derivatives in u, row_stat
and col_stat, which the backward op scatters back to the rows (no autograd inside an op).
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

from ._common import zero_loss
from .listed import engine_values_op, join_on_anchor, pair_values
from .operands import recomputation_inputs, recomputed_grads, stat_dtype

PAIR_TERMS: Dict[str, Tuple[Callable, Callable]] = {}


def register_pair_term(name, value, grad):
    """A term by name: value(u, row_stat, col_stat, same_index, p0, p1, lp) -> per-pair values, and
    grad(...) with the same arguments -> (d value / d u, / d row_stat, / d col_stat) per pair."""
    PAIR_TERMS[name] = (value, grad)


def label_positive_pairs(labels_q, labels_r, exclude_col):
    """(rows, cols) of every (i, j) with labels_r[j] == labels_q[i] and j != exclude_col[i], rows
    ascending and columns ascending within a row (ops/listed.join_on_anchor of the labels)."""
    rows, cols = join_on_anchor(labels_q, labels_r)
    keep = cols != exclude_col[rows]
    return rows[keep], cols[keep]


# positive pairs per chunk of the op's gathers: two chunk x D row blocks live at once, small enough to
# stay in cache (larger chunks measured slower per pair on a CPU: bench/results, new_losses_*)
CHUNK_PAIRS = 2048


def _pair_u(a, b, lp):
    """u of gathered pairs (rows a of q, b of r): a . b, or |a - b| (0 with gradient 0 at 0)."""
    if not lp:
        return (a * b).sum(1)
    diff = a - b
    sq = (diff * diff).sum(1)  # bitwise diff ** 2, without pow's slow path
    return torch.where(sq > 0, torch.where(sq > 0, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def _engine_u(qa, ra, rows, cols, lp, differentiable=False):
    """u of all the pairs at once (O(#pairs), as the indices) with the engines' bits, in the ops on the
    CPU (ops/listed.py's op, as a miner's listed pairs get them); None elsewhere and in a
    differentiable recomputation (each chunk then takes _pair_u of its gathered rows)."""
    engine_values = None if differentiable else engine_values_op(qa, ra)
    return None if engine_values is None else engine_values(qa.detach(), ra.detach(), rows, cols, lp)


def _gathered(qa, ra, rows, cols, row_stat, col_stat, k0, k1):
    ri, ci = rows[k0:k1], cols[k0:k1]
    return (qa.index_select(0, ri), ra.index_select(0, ci), row_stat.index_select(0, ri),
            col_stat.index_select(0, ci)), ri, ci


def _sums(qa, ra, rows, cols, row_stat, col_stat, term, p0, p1, lp, differentiable=False):
    """Per row the sum of the term over its pairs, chunk by chunk of gathers (differentiable in
    q and r where `differentiable`)."""
    sums = torch.zeros(qa.shape[0], dtype=qa.dtype, device=qa.device)
    u_all = _engine_u(qa, ra, rows, cols, lp, differentiable)
    for k0 in range(0, rows.shape[0], CHUNK_PAIRS):
        ri, ci = rows[k0:k0 + CHUNK_PAIRS], cols[k0:k0 + CHUNK_PAIRS]
        # the rows themselves are gathered only where u is not the op's already
        u = _pair_u(qa.index_select(0, ri), ra.index_select(0, ci), lp) if u_all is None else u_all[k0:k0 + CHUNK_PAIRS]
        row_k, col_k = row_stat.index_select(0, ri), col_stat.index_select(0, ci)
        sums = sums.index_add(0, ri, PAIR_TERMS[term][0](u, row_k, col_k, ri == ci, p0, p1, lp))
    return sums


def listed_pair_rows(q, r, rows, cols, weights, row_stat, col_stat, term, p0, p1, lp):
    """A miner's listed positive pairs (rows, cols, multiplicities): eager, with autograd; the pairs'
    values from ops/listed.pair_values, which keeps the indices only (O(#pairs) memory)."""
    A = stat_dtype(q.dtype)
    u = pair_values(q.to(A), r.to(A), rows, cols, lp)
    values = PAIR_TERMS[term][0](u, row_stat.to(A)[rows], col_stat.to(A)[cols], rows == cols, p0, p1, lp)
    return torch.zeros(q.shape[0], dtype=A, device=q.device).index_add(0, rows, values * weights.to(A))


@torch.library.custom_op("fused_pairloss::positive_pair_rows", mutates_args=())
def positive_pair_rows(q: torch.Tensor, r: torch.Tensor, labels_q: torch.Tensor, labels_r: torch.Tensor,
                       exclude_col: torch.Tensor, row_stat: torch.Tensor, col_stat: torch.Tensor, term: str,
                       p0: float, p1: float, lp: bool) -> torch.Tensor:
    """Per row i: sum over its positives j (labels equal, j != exclude_col[i]) of f(v_ij, row_stat[i],
    col_stat[j], i == j) (module docstring), in the statistics' dtype (fp32 for half inputs)."""
    A = stat_dtype(q.dtype)
    rows, cols = label_positive_pairs(labels_q, labels_r, exclude_col)
    return _sums(q.to(A), r.to(A), rows, cols, row_stat.to(A), col_stat.to(A), term, p0, p1, lp)


@positive_pair_rows.register_fake
def _fake(q, r, labels_q, labels_r, exclude_col, row_stat, col_stat, term, p0, p1, lp):
    return q.new_empty((q.shape[0],), dtype=stat_dtype(q.dtype))


@torch.library.custom_op("fused_pairloss::positive_pair_rows_backward", mutates_args=())
def positive_pair_rows_backward(grad: torch.Tensor, q: torch.Tensor, r: torch.Tensor, labels_q: torch.Tensor,
                                labels_r: torch.Tensor, exclude_col: torch.Tensor, row_stat: torch.Tensor,
                                col_stat: torch.Tensor, term: str, p0: float, p1: float, lp: bool,
                                needs: list[bool]) -> list[torch.Tensor]:
    """The gradients (q, r, row_stat, col_stat) of positive_pair_rows' sums weighted by `grad`, chunk
    by chunk of pairs (the term's partial derivatives, scattered back to the rows); an empty tensor
    for one not needed."""
    A = stat_dtype(q.dtype)
    qa, ra, row_a, col_a, g = q.to(A), r.to(A), row_stat.to(A), col_stat.to(A), grad.to(A)
    rows, cols = label_positive_pairs(labels_q, labels_r, exclude_col)
    gq, gr, g_row, g_col = (torch.zeros_like(t) for t in (qa, ra, row_a, col_a))
    u_all = _engine_u(qa, ra, rows, cols, lp)
    for k0 in range(0, rows.shape[0], CHUNK_PAIRS):
        (a, b, row_k, col_k), ri, ci = _gathered(qa, ra, rows, cols, row_a, col_a, k0, k0 + CHUNK_PAIRS)
        u = _pair_u(a, b, lp) if u_all is None else u_all[k0:k0 + CHUNK_PAIRS]
        du, d_row, d_col = PAIR_TERMS[term][1](u, row_k, col_k, ri == ci, p0, p1, lp)
        gk = g[ri]
        g_row.index_add_(0, ri, _times(gk, d_row))
        g_col.index_add_(0, ci, _times(gk, d_col))
        gu = _times(gk, du)
        if lp:  # d|a - b| / da = (a - b) / d, 0 at d = 0
            gu = torch.where(u > 0, gu / torch.where(u > 0, u, torch.ones_like(u)), torch.zeros_like(u))
            gq.index_add_(0, ri, gu[:, None] * (a - b))
            gr.index_add_(0, ci, gu[:, None] * (b - a))
        else:
            gq.index_add_(0, ri, gu[:, None] * b)
            gr.index_add_(0, ci, gu[:, None] * a)
    return [o.to(t.dtype) if need else q.new_empty((0,))
            for o, t, need in zip((gq, gr, g_row, g_col), (q, r, row_stat, col_stat), needs)]


def _times(g, d):
    """g d, 0 where g is 0: a row whose loss is not used (PML's few-pairs rule: a constant zero)
    gets no gradient, even from a pair whose partial is infinite (TupletMargin's acos at S = 1)."""
    return torch.where(g == 0, torch.zeros_like(d), g * d)


@positive_pair_rows_backward.register_fake
def _fake_backward(grad, q, r, labels_q, labels_r, exclude_col, row_stat, col_stat, term, p0, p1, lp, needs):
    return [torch.empty_like(t) if need else q.new_empty((0,)) for t, need in zip((q, r, row_stat, col_stat), needs)]


def _setup_context(ctx, inputs, output):
    q, r, labels_q, labels_r, exclude_col, row_stat, col_stat, term, p0, p1, lp = inputs
    ctx.save_for_backward(q, r, labels_q, labels_r, exclude_col, row_stat, col_stat)
    ctx.args = (term, p0, p1, lp)


def _backward(ctx, grad):
    q, r, labels_q, labels_r, exclude_col, row_stat, col_stat = ctx.saved_tensors
    needs = [ctx.needs_input_grad[k] for k in (0, 1, 5, 6)]
    if not any(needs):
        return (None,) * 11
    if torch.is_grad_enabled():  # create_graph=True: a differentiable recomputation
        A = stat_dtype(q.dtype)
        rows, cols = label_positive_pairs(labels_q, labels_r, exclude_col)
        inputs = recomputation_inputs((q, r, row_stat, col_stat), needs)  # r may be q itself
        sums = _sums(*(t.to(A) for t in inputs[:2]), rows, cols, *(t.to(A) for t in inputs[2:]), *ctx.args,
                     differentiable=True)
        got = recomputed_grads(sums, inputs, needs, grad.to(A))
    else:
        got = positive_pair_rows_backward(grad.contiguous(), q, r, labels_q, labels_r, exclude_col, row_stat,
                                          col_stat, *ctx.args, needs)
        got = [g if need else None for g, need in zip(got, needs)]
    gq, gr, g_row, g_col = got
    return gq, gr, None, None, None, g_row, g_col, None, None, None, None


def _not_differentiable(ctx, *grads):
    raise RuntimeError("fused_pairloss: positive_pair_rows_backward (a first-order gradient) is not "
                       "differentiable; second-order gradients go through create_graph=True")


positive_pair_rows.register_autograd(_backward, setup_context=_setup_context)
positive_pair_rows_backward.register_autograd(_not_differentiable,
                                              setup_context=lambda ctx, inputs, output: None)



def positive_pair_sums(q, r, labels, labels_r, exclude_col, row_stat, col_stat, term, p0, p1, lp, backend):
    """Per row of q the sum of the term `term` over its positive pairs, from the pair engine's
    operands (ops/_common.pair_operands: r None in self mode): the label sets through the op, or,
    when `backend` is a miner's ListedPairs, its listed positive pairs (with their multiplicity
    when the loss reduces the pair list)."""
    from .listed import ListedPairs
    r_full = q if r is None else r
    if isinstance(backend, ListedPairs):
        rows, cols, mult = backend.pos
        weights = mult if backend.weighted else torch.ones_like(mult)
        return listed_pair_rows(q, r_full, rows, cols, weights, row_stat, col_stat, term, p0, p1, lp)
    labels_q = torch.as_tensor(labels, device=q.device).long()
    if r is None:
        labels_r, exclude_col = labels_q, torch.arange(q.shape[0], device=q.device)
    else:
        labels_r = torch.as_tensor(labels_r, device=q.device).long()
        exclude_col = (torch.full_like(labels_q, -1) if exclude_col is None
                       else exclude_col.to(device=q.device, dtype=torch.int64))
    return positive_pair_rows(q, r_full, labels_q, labels_r, exclude_col, row_stat, col_stat, term, float(p0),
                              float(p1), bool(lp))


def positive_pair_mean(sums, st, embeddings, batch):
    """PML's MeanReducer over the positive pairs of the per-row sums, with GenericPairLoss's rules:
    0 (an exact 0 of the embeddings) without a positive or a negative pair, or with at most one of
    each in the whole batch."""
    n_pos, n_neg = batch.sum(st.count_pos), batch.sum(st.count_neg)
    keep = (n_pos > 0) & (n_neg > 0) & ~batch.too_few_pairs(st.count_pos, st.count_neg)
    return torch.where(keep, (batch.sum(sums) / n_pos.clamp(min=1)).to(embeddings.dtype), zero_loss(embeddings))


__all__ = ["PAIR_TERMS", "register_pair_term", "positive_pair_mean", "label_positive_pairs", "positive_pair_rows",
           "listed_pair_rows", "positive_pair_sums"]
