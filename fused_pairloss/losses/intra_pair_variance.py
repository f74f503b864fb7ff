"""Intra-pair variance loss (Yu & Tao, "Deep Metric Learning with Tuplet Margin Loss", ICCV 2019;
PML IntraPairVarianceLoss).

Over PML's pair lists (all pairs, or an indices_tuple's), with v the pair's similarity S
(CosineSimilarity, PML's default) or distance d (LpDistance) and the means m+ over the positive
pairs and m- over the negative ones:
    cosine: pos = relu((1 - pos_eps) m+ - S)^2,   neg = relu(S - (1 + neg_eps) m-)^2,
    lp:     pos = relu(d - (1 + pos_eps) m+)^2,   neg = relu((1 - neg_eps) m- - d)^2,
loss = mean of pos over the positive pairs + mean of neg over the negative pairs (MeanReducer; a
set without pairs adds 0; PML's GenericPairLoss gives 0 with at most one pair of each kind).

Fused in two steps, since the thresholds t+, t- depend on every pair:
1. the means. Cosine: sum_{j in P_i} S_ij = q_i . (sum of the ref rows of y_i's class, less the
   excluded column), from per-class sums of the rows, O((N + M) D) and differentiable by autograd;
   lp: the pair engine's per-row sums of d.
2. the op `fused_pairloss::pair_squared_hinges` (below): per row the sums of relu(s (t - v))^2 over
   its positives and its negatives (s = +1 or -1 the direction above), from one engine pass whose
   term is relu(s (t - v)) (t - v) s with the relu as the engine's detached pair weight, and the
   sums of relu(s (t - v)) from a second, forward-only pass. Its backward: the engine's backward of
   the first pass with the upstream gradient doubled (d/dv relu(u)^2 = 2 relu(u) du/dv, the engine
   differentiating only the linear factor), and dL/dt = 2 s sum relu(s (t - v)) from the second.
   The thresholds enter the engine's declaration as numbers, inside the op, so torch.compile
   traces the op as one node.
Cost: the first pass forward and backward plus one forward pass (lp: plus the means' pass); the
backward of a pass of sums reads no forward statistics, so it does not run the forward again.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as V
from ..ops import engines
from ..ops._common import LOCAL, label_ids, loss_function, pair_operands, pairs_of, zero_loss
from ..ops.operands import lp_distances, lp_squared_distances, recomputation_inputs, recomputed_grads, stat_dtype
from ..ops.spec import PAIR_AUX, PAIR_VALUES, PairLossSpec, PairTerm
from ..ops.stats import backward_op, forward_op, pair_stats
from ._base import _PairLoss, run_pair_loss
from ._reference_common import check_distance, distance_matrix, fp16_rows_normalized_to_nan, nan_in_nan_out, \
    pair_count_matrices, pml_pair_lists, pml_pairs_of_call, too_few_pairs
from ._registry import LossEntry

DISTANCES = ("cosine", "lp")


def _directions(distance):
    """s of relu(s (t - v)) for (positives, negatives): which side of its threshold a pair is pushed."""
    return (1.0, -1.0) if distance == "cosine" else (-1.0, 1.0)


def _threshold_factors(distance, pos_eps, neg_eps):
    """t = factor * mean (PML's variance_with_eps: (1 - eps) when the pairs should increase)."""
    if distance == "cosine":
        return 1.0 - pos_eps, 1.0 + neg_eps
    return 1.0 + pos_eps, 1.0 - neg_eps


def intra_pair_variance_reference(embeddings, labels, ref_emb=None, ref_labels=None, *, pos_eps=0.01, neg_eps=0.01,
                                  distance="cosine", indices_tuple=None):
    """PML IntraPairVarianceLoss (intra_pair_variance_loss.py) step by step: the distance matrix, the
    pair lists (an indices_tuple's with their multiplicity), the means, the squared hinges, a
    MeanReducer over each set, their sum."""
    check_distance(distance, allowed=DISTANCES, loss="intra_pair_variance_loss")
    mat = distance_matrix(embeddings, embeddings if ref_emb is None else ref_emb, distance)
    pos_cnt, neg_cnt = pair_count_matrices(labels, ref_emb, ref_labels, indices_tuple, mat.shape, mat.device)
    if bool(too_few_pairs(pos_cnt.sum(), neg_cnt.sum(), mat.device)):
        return zero_loss(embeddings)
    a1, p, a2, n = pml_pair_lists(pos_cnt, neg_cnt)
    pos_pairs, neg_pairs = pairs_of(mat, a1, p), pairs_of(mat, a2, n)
    s_pos, s_neg = _directions(distance)
    f_pos, f_neg = _threshold_factors(distance, pos_eps, neg_eps)
    loss = zero_loss(embeddings)
    if len(pos_pairs) > 0:
        loss = loss + torch.mean(torch.relu(s_pos * (f_pos * torch.mean(pos_pairs) - pos_pairs)) ** 2)
    if len(neg_pairs) > 0:
        loss = loss + torch.mean(torch.relu(s_neg * (f_neg * torch.mean(neg_pairs) - neg_pairs)) ** 2)
    return nan_in_nan_out(loss, embeddings, ref_emb).to(embeddings.dtype)


# ---- the op: per-row sums of squared hinges around two thresholds ---------------------------------
def _squares_declaration(t_pos, t_neg, s_pos, s_neg, distance):
    """relu(s (t - v)) * s (t - v): the engine's pair weight relu(s t - s v) (detached) times the
    linear factor (-s)(v - t)."""
    def term(t, s):
        return PairTerm(scale=-s, shift=t, weight_offset=s * t, weight_slope=-s, hinge=True, sum=True)
    return PairLossSpec(pos=term(t_pos, s_pos), neg=term(t_neg, s_neg), distance=distance)


def _hinges_declaration(t_pos, t_neg, s_pos, s_neg, distance):
    """relu(s (t - v)) for dL/dt."""
    return PairLossSpec(pos=PairTerm(scale=-s_pos, shift=t_pos, hinge=True, sum=True),
                        neg=PairTerm(scale=-s_neg, shift=t_neg, hinge=True, sum=True), distance=distance)


def _as_numbers(thresholds):
    t_pos, t_neg = (float(t) for t in thresholds.detach().double().cpu())
    return t_pos, t_neg


def _engine_pass(spec, q, r, labels_q, labels_r, exclude_col, backend):
    terms, flags = spec.pack()
    return forward_op(engines.PAIR, backend)(q, r, labels_q, labels_r, exclude_col, list(terms), flags)


@torch.library.custom_op("fused_pairloss::pair_squared_hinges", mutates_args=())
def pair_squared_hinges(q: torch.Tensor, r: Optional[torch.Tensor], labels_q: torch.Tensor,
                        labels_r: Optional[torch.Tensor], exclude_col: Optional[torch.Tensor],
                        thresholds: torch.Tensor, s_pos: float, s_neg: float, distance: str,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(squares, hinges), each A[2, N]: per row i, over its positives (row 0) and negatives (row 1)
    of the pair engine's sets, sum_j relu(s (t - v_ij))^2 and sum_j relu(s (t - v_ij)), with
    t = thresholds[0] / [1] and s = s_pos / s_neg, v = S or d (`distance`)."""
    t_pos, t_neg = _as_numbers(thresholds)
    values, _, _ = _engine_pass(_squares_declaration(t_pos, t_neg, s_pos, s_neg, distance), q, r, labels_q,
                                labels_r, exclude_col, backend)
    h_values, _, _ = _engine_pass(_hinges_declaration(t_pos, t_neg, s_pos, s_neg, distance), q, r, labels_q,
                                  labels_r, exclude_col, backend)
    return values[2:4].clone(), h_values[2:4].clone()  # the sum_pos, sum_neg slots


@pair_squared_hinges.register_fake
def _fake(q, r, labels_q, labels_r, exclude_col, thresholds, s_pos, s_neg, distance, backend):
    shape = (2, q.shape[0])
    return q.new_empty(shape, dtype=stat_dtype(q.dtype)), q.new_empty(shape, dtype=stat_dtype(q.dtype))


@torch.library.custom_op("fused_pairloss::pair_squared_hinges_backward", mutates_args=())
def pair_squared_hinges_backward(grad_squares: torch.Tensor, q: torch.Tensor, r: Optional[torch.Tensor],
                                 labels_q: torch.Tensor, labels_r: Optional[torch.Tensor],
                                 exclude_col: Optional[torch.Tensor], thresholds: torch.Tensor, s_pos: float,
                                 s_neg: float, distance: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_q, grad_r) of sum(grad_squares * squares): the engine's backward of the squares' pass
    with the upstream doubled (the relu factor is the engine's detached weight). A declaration of
    sums only (no LSE, no mining): its backward reads none of the forward's statistics
    (ops/README.md), so zeros stand in for them and the forward pass is not run again."""
    t_pos, t_neg = _as_numbers(thresholds)
    spec = _squares_declaration(t_pos, t_neg, s_pos, s_neg, distance)
    assert not (spec.pos.lse or spec.neg.lse or spec.mine or spec.pos_vs_neg_lse), "statistics read by the backward"
    terms, flags = spec.pack()
    terms = list(terms)
    A, n = stat_dtype(q.dtype), q.shape[0]
    values = q.new_zeros((len(PAIR_VALUES), n), dtype=A)
    aux = q.new_zeros((len(PAIR_AUX), n), dtype=A)
    grad_values = torch.zeros_like(values)
    grad_values[2:4] = 2 * grad_squares.to(values.dtype)
    grad_q, grad_r = backward_op(engines.PAIR, backend)(grad_values, q, r, labels_q, labels_r, exclude_col, values,
                                                        aux, terms, flags, r is not None)
    return grad_q, grad_r


@pair_squared_hinges_backward.register_fake
def _fake_backward(grad_squares, q, r, labels_q, labels_r, exclude_col, thresholds, s_pos, s_neg, distance, backend):
    return torch.empty_like(q), (q.new_empty((0,)) if r is None else torch.empty_like(r))


def _setup_context(ctx, inputs, output):
    q, r, labels_q, labels_r, exclude_col, thresholds, s_pos, s_neg, distance, backend = inputs
    ctx.save_for_backward(q, r, labels_q, labels_r, exclude_col, thresholds, output[1])
    ctx.args = (s_pos, s_neg, distance, backend)


def _differentiable_squares(q, r, labels_q, labels_r, exclude_col, thresholds, s_pos, s_neg, distance):
    """pair_squared_hinges' squares as a differentiable PyTorch computation over the N x M matrix
    (create_graph=True only, as the engines' own second-order path)."""
    ref = q if r is None else r
    labels_ref = labels_q if r is None else labels_r
    s = q @ ref.t()
    if distance == "cosine":
        v = s
    else:
        v = lp_distances(lp_squared_distances(s, q, ref))
    same = labels_q[:, None] == labels_ref[None, :]
    cols = torch.arange(ref.shape[0], device=q.device)
    excluded = cols[None, :] == (cols[:q.shape[0]] if r is None else exclude_col if exclude_col is not None
                                 else torch.full_like(labels_q, -1))[:, None]
    pos, neg = same & ~excluded, ~same
    rows = []
    for mask, t, sign in ((pos, thresholds[0], s_pos), (neg, thresholds[1], s_neg)):
        hinge = torch.relu(sign * (t.to(v.dtype) - v))
        rows.append(torch.where(mask, hinge * hinge, torch.zeros_like(hinge)).sum(1))
    return torch.stack(rows)


def _backward(ctx, grad_squares, grad_hinges):
    q, r, labels_q, labels_r, exclude_col, thresholds, hinges = ctx.saved_tensors
    s_pos, s_neg, distance, backend = ctx.args
    if grad_squares is None:
        return None, None, None, None, None, None, None, None, None, None
    if torch.is_grad_enabled():  # create_graph=True: a differentiable recomputation (second order)
        # a ref of None needs no gradient
        needs = (ctx.needs_input_grad[0], r is not None and ctx.needs_input_grad[1], ctx.needs_input_grad[5])
        inputs = recomputation_inputs((q, r, thresholds), needs)
        squares = _differentiable_squares(inputs[0], inputs[1], labels_q, labels_r, exclude_col, inputs[2], s_pos,
                                          s_neg, distance)
        gq, gr, gt = recomputed_grads(squares, inputs, needs, grad_squares.to(squares.dtype))
        return gq, gr, None, None, None, gt, None, None, None, None
    grad_squares = grad_squares.contiguous()
    grad_q, grad_r = pair_squared_hinges_backward(grad_squares, q, r, labels_q, labels_r, exclude_col, thresholds,
                                                  s_pos, s_neg, distance, backend)
    # d/dt sum_j relu(s (t - v))^2 = 2 s sum_j relu(s (t - v))
    signs = torch.tensor([s_pos, s_neg], dtype=hinges.dtype, device=hinges.device)
    grad_t = (2 * signs * (grad_squares.to(hinges.dtype) * hinges).sum(1)).to(thresholds.dtype)
    return grad_q, (None if r is None else grad_r), None, None, None, grad_t, None, None, None, None


def _not_differentiable(ctx, *grads):
    raise RuntimeError("fused_pairloss: pair_squared_hinges_backward (a first-order gradient) is not differentiable")


pair_squared_hinges.register_autograd(_backward, setup_context=_setup_context)
pair_squared_hinges_backward.register_autograd(_not_differentiable, setup_context=lambda ctx, inputs, output: None)


# ---- the loss ---------------------------------------------------------------------------------
def _class_row_sums(q, r, labels_q, labels_r, exclude_col):
    """Per row i: (sum of S_ij over its positives, over its negatives, their counts), with the
    positives j of r with y_j = y_i and j != exclude_col[i], from per-class sums of r's rows."""
    # class ids in [0, N + M) from the sorted labels (fixed shapes: torch.compile traces it)
    every = torch.cat([labels_q, labels_r])
    ids = label_ids(every)
    id_q, id_r = ids[:labels_q.shape[0]], ids[labels_q.shape[0]:]
    class_sums = r.new_zeros((every.shape[0], r.shape[1])).index_add(0, id_r, r)
    class_counts = torch.zeros(every.shape[0], dtype=torch.int64, device=r.device).index_add(
        0, id_r, torch.ones_like(id_r))
    same = class_sums[id_q]
    excluded = (exclude_col >= 0) & (exclude_col < r.shape[0])
    col = exclude_col.clamp(0, max(r.shape[0] - 1, 0))
    drop = excluded & (labels_r[col] == labels_q) if r.shape[0] else excluded
    pos_rows = same - torch.where(drop[:, None], r[col], torch.zeros_like(same))
    neg_rows = r.sum(0, keepdim=True) - same
    count_pos = class_counts[id_q] - drop.long()
    count_neg = r.shape[0] - class_counts[id_q]
    return (q * pos_rows).sum(1), (q * neg_rows).sum(1), count_pos, count_neg


@loss_function
def intra_pair_variance_fused(embeddings, labels, ref_emb, ref_labels, *, pos_eps=0.01, neg_eps=0.01,
                              distance="cosine", backend, exclude_col=None, batch=LOCAL):
    if batch is LOCAL and not V._compiling() and fp16_rows_normalized_to_nan(embeddings, ref_emb):
        # NaN distances of an fp16 zero row: PML's steps over the same pairs (its means are NaN)
        return intra_pair_variance_reference(embeddings, labels, ref_emb, ref_labels, pos_eps=pos_eps,
                                             neg_eps=neg_eps, distance=distance,
                                             indices_tuple=pml_pairs_of_call(labels, ref_labels, exclude_col, backend))
    q, r, labels_r, excl = pair_operands(embeddings, labels, ref_emb, ref_labels, exclude_col)
    q = q.contiguous()
    labels_q = torch.as_tensor(labels, device=q.device).to(torch.int64).contiguous()
    if r is not None:
        r = r.contiguous()
        labels_r = torch.as_tensor(labels_r, device=q.device).to(torch.int64).contiguous()
        if excl is not None:
            excl = excl.to(device=q.device, dtype=torch.int64).contiguous()
    A = stat_dtype(q.dtype)
    if distance == "cosine":
        rr, lr = (q, labels_q) if r is None else (r, labels_r)
        if r is None:
            ex = engines.exclusion_for(q.shape[0], q.device)
        else:
            ex = torch.full_like(labels_q, -1) if excl is None else excl
        sum_pos, sum_neg, count_pos, count_neg = _class_row_sums(q.to(A), rr.to(A), labels_q, lr, ex)
    else:
        st = pair_stats(q, r, labels_q, labels_r, excl, PairLossSpec(pos=PairTerm(scale=1.0, sum=True),
                                                                      neg=PairTerm(scale=1.0, sum=True),
                                                                      distance="lp"), backend)
        sum_pos, sum_neg, count_pos, count_neg = st.sum_pos, st.sum_neg, st.count_pos, st.count_neg
    n_pos, n_neg = batch.sum(count_pos), batch.sum(count_neg)
    f_pos, f_neg = _threshold_factors(distance, pos_eps, neg_eps)
    mean_pos = batch.sum(sum_pos) / n_pos.clamp(min=1).to(A)
    mean_neg = batch.sum(sum_neg) / n_neg.clamp(min=1).to(A)
    # every row's hinges use the global thresholds: across ranks their gradient sums every rank's share
    thresholds = batch.shared(torch.stack([f_pos * mean_pos, f_neg * mean_neg]))
    s_pos, s_neg = _directions(distance)
    squares, _ = pair_squared_hinges(q, r, labels_q, labels_r, excl, thresholds, s_pos, s_neg, distance, backend)
    pos = torch.where(n_pos > 0, batch.sum(squares[0]) / n_pos.clamp(min=1).to(A), 0.0)
    neg = torch.where(n_neg > 0, batch.sum(squares[1]) / n_neg.clamp(min=1).to(A), 0.0)
    loss = torch.where(batch.too_few_pairs(count_pos, count_neg), 0.0, pos + neg)
    return nan_in_nan_out(loss.to(embeddings.dtype), embeddings, ref_emb)


@loss_function
def intra_pair_variance_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, pos_eps=0.01, neg_eps=0.01,
                             distance="cosine", backend="auto"):
    """PML IntraPairVarianceLoss(pos_eps, neg_eps); distance "cosine" (PML's default) or "lp"."""
    V.check_real("pos_eps", pos_eps)
    V.check_real("neg_eps", neg_eps)
    check_distance(distance, allowed=DISTANCES, loss="intra_pair_variance_loss")
    return run_pair_loss(intra_pair_variance_reference, intra_pair_variance_fused, embeddings, labels, ref_emb,
                         ref_labels, backend, pos_eps=pos_eps, neg_eps=neg_eps, distance=distance)


class IntraPairVarianceLoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.IntraPairVarianceLoss (default CosineSimilarity)."""
    _distances = DISTANCES
    _default_distance = "cosine"
    _reference = staticmethod(intra_pair_variance_reference)
    _listed_pairs = False  # its thresholds are means over the listed pairs: the reference computes them
    _pair_based = True

    def __init__(self, pos_eps=0.01, neg_eps=0.01, backend="auto", **kwargs):
        super().__init__()
        V.check_real("pos_eps", pos_eps)
        V.check_real("neg_eps", neg_eps)
        self.pos_eps, self.neg_eps = pos_eps, neg_eps
        self._init_pair(backend, kwargs, (pos_eps, neg_eps))

    def _hyper(self):
        return dict(pos_eps=self.pos_eps, neg_eps=self.neg_eps, distance=self._distance_kind)

    def _functional(self):
        return intra_pair_variance_loss


ENTRIES = (
    LossEntry(IntraPairVarianceLoss, "pair", functional=intra_pair_variance_loss,
              reference=intra_pair_variance_reference, fused=intra_pair_variance_fused, hyper=("pos_eps", "neg_eps")),
)
