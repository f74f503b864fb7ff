"""Tuplet margin loss (Yu & Tao, "Deep Metric Learning with Tuplet Margin Loss", ICCV 2019; PML
TupletMarginLoss), cosine only as in PML.

Per positive pair (a, p), with theta_ap = acos S_ap, the margin m in radians and the scale s:
    l_ap = log(1 + sum_{n in N_a} exp(s (S_an - cos(theta_ap - m))))
         = logaddexp(0, L_a - s cos(theta_ap - m)),   L_a = LSE_{n in N_a} (s S_an),
loss = mean of l_ap over the positive pairs (PML's MeanReducer on "pos_pair"); PML's few-pairs rule.

Two passes: the pair engine gives L_a per row (declaration: x = s S on the negatives, LSE), with
its gradient; then ops/positive_pairs.py adds l_ap over each row's positives (row gathers,
O(#positive pairs)).
"""
from __future__ import annotations

import math

import torch

from .. import _validation as V
from ..ops._common import LOCAL, logaddexp, loss_function, pair_operands, pairs_of, similarity_dtype, zero_loss
from ..ops.positive_pairs import positive_pair_mean, positive_pair_sums, register_pair_term
from ..ops.spec import PairLossSpec, PairTerm
from ..ops.stats import pair_stats
from ._base import _PairLoss, run_pair_loss
from ._reference_common import (check_distance, masked_logsumexp, nan_in_nan_out, pair_setup, pml_pair_lists,
                                too_few_pairs)
from ._registry import LossEntry


def tuplet_margin_reference(embeddings, labels, ref_emb=None, ref_labels=None, *, margin=5.73, scale=64.0,
                            distance="cosine", indices_tuple=None):
    """PML TupletMarginLoss(margin in degrees, scale) (tuplet_margin_loss.py) step by step: the pair
    lists, S, cos(acos(S_ap) - m) per positive pair, a row per positive pair over the negative pairs
    of its anchor with log(1 + sum exp), the mean over the positive pairs."""
    check_distance(distance, allowed=("cosine",), loss="tuplet_margin_loss")
    mat, pos_cnt, neg_cnt = pair_setup(embeddings, labels, ref_emb, ref_labels, indices_tuple, distance)
    zero = zero_loss(embeddings)
    a1, p, a2, n = pml_pair_lists(pos_cnt, neg_cnt)
    if a1.numel() == 0 or a2.numel() == 0 or bool(too_few_pairs(a1.numel(), a2.numel(), mat.device)):
        return nan_in_nan_out(zero, embeddings, ref_emb)
    pos_pairs = torch.cos(torch.acos(pairs_of(mat, a1, p)) - math.radians(margin))[:, None]
    inside_exp = scale * (pairs_of(mat, a2, n)[None, :] - pos_pairs)
    keep = a2[None, :] == a1[:, None]
    loss = masked_logsumexp(inside_exp, keep, add_one=True).mean()
    return nan_in_nan_out(loss, embeddings, ref_emb).to(similarity_dtype(embeddings, distance))


class _Acos(torch.autograd.Function):
    """torch.acos whose gradient at u = +-1 is 0 where the incoming one is (not 0 * inf): a pair
    whose loss is not used (PML's few-pairs rule: a constant zero) gets no NaN gradient. Inside
    (-1, 1) the gradient is -grad / sqrt(1 - u^2), linear in grad also where grad is 0 (a double
    backward differentiates it by its seed)."""

    @staticmethod
    def forward(ctx, u):
        ctx.save_for_backward(u)
        return torch.acos(u)

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        # every branch is in the graph (create_graph): each stays finite where it is not taken
        inside = ~(u.abs() >= 1)  # NaN u inside: a NaN gradient
        slope = -grad / torch.sqrt(torch.where(inside, 1 - u * u, torch.ones_like(u)))
        infinite = ~inside & (grad != 0)  # acos' slope at +-1 (PML's inf); 0 where the incoming gradient is
        at_one = -grad * torch.where(infinite, torch.full_like(u, math.inf), torch.zeros_like(u))
        return torch.where(inside, slope, at_one)


def _without_negatives(u, row_lse):
    """(rows without a negative, u with 0 there): such a pair's term is 0 and so is its gradient (PML
    computes no term there)."""
    alone = row_lse == float("-inf")
    return alone, torch.where(alone, torch.zeros_like(u), u)


def _within_one(u):
    """u clamped to [-1, 1], with derivative 0 outside and 1 at +-1 (torch.clamp's is 0 there): at
    |S_ap| = 1 the gradient is acos's, infinite, as PML's. A cosine of unit rows is beyond 1 by
    rounding only: the fused S of a row and its copy (or of half-precision rows summed in fp32)
    comes out just above 1 where PML's S rounds to 1 (acos would make it NaN)."""
    return torch.where(u > 1, torch.ones_like(u), torch.where(u < -1, -torch.ones_like(u), u))


def tuplet_pair_term(u, row_lse, col_stat, same_index, scale, margin_rad, lp):
    """l_ap = logaddexp(0, z), z = L_a - s cos(acos S_ap - m) at S_ap within [-1, 1]; L_a = -inf (no
    negative) gives 0."""
    _, u = _without_negatives(_within_one(u), row_lse)
    return logaddexp(torch.zeros_like(u), row_lse - scale * torch.cos(_Acos.apply(u) - margin_rad))


def tuplet_pair_term_grad(u, row_lse, col_stat, same_index, scale, margin_rad, lp):
    """d l / dz = sigmoid(z); dz / du = -s sin(acos u - m) / sqrt(1 - u^2) (0 beyond +-1: _within_one);
    dz / dL_a = 1."""
    beyond = u.abs() > 1
    alone, u = _without_negatives(_within_one(u), row_lse)
    theta = torch.acos(u)
    sig = torch.sigmoid(row_lse - scale * torch.cos(theta - margin_rad))
    d_u = torch.where(alone | beyond, torch.zeros_like(u),
                      -scale * sig * torch.sin(theta - margin_rad) / torch.sqrt(1 - u * u))
    return d_u, sig, torch.zeros_like(u)


register_pair_term("tuplet_margin", tuplet_pair_term, tuplet_pair_term_grad)


def declaration(scale):
    return PairLossSpec(pos=PairTerm(scale=0.0), neg=PairTerm(scale=float(scale), lse=True), distance="cosine")


@loss_function
def tuplet_margin_fused(embeddings, labels, ref_emb, ref_labels, *, margin, scale, distance="cosine", backend,
                        exclude_col=None, batch=LOCAL):
    q, r, labels_r, excl = pair_operands(embeddings, labels, ref_emb, ref_labels, exclude_col)
    st = pair_stats(q, r, labels, labels_r, excl, declaration(scale), backend)
    n_cols = q.shape[0] if r is None else r.shape[0]
    unused_col_stat = st.lse_neg.new_zeros(n_cols)  # the term reads its row's statistic only
    sums = positive_pair_sums(q, r, labels, labels_r, excl, st.lse_neg, unused_col_stat, "tuplet_margin",
                              float(scale), math.radians(margin), False, backend)
    loss = positive_pair_mean(sums, st, embeddings, batch)
    return nan_in_nan_out(loss, embeddings, ref_emb).to(similarity_dtype(embeddings, distance))  # PML's under autocast


@loss_function
def tuplet_margin_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, margin=5.73, scale=64.0,
                       distance="cosine", backend="auto"):
    """PML TupletMarginLoss(margin, scale): margin in degrees, CosineSimilarity only (as PML)."""
    V.check_real("margin", margin)
    V.check_real("scale", scale)
    check_distance(distance, allowed=("cosine",), loss="tuplet_margin_loss")
    return run_pair_loss(tuplet_margin_reference, tuplet_margin_fused, embeddings, labels, ref_emb, ref_labels,
                         backend, margin=margin, scale=scale, distance=distance)


class TupletMarginLoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.TupletMarginLoss (CosineSimilarity only). `margin`
    is stored in radians, as PML stores it (the constructor takes degrees)."""
    _distances = ("cosine",)
    _cosine_only = True
    _reference = staticmethod(tuplet_margin_reference)
    _pair_based = True  # PML reduces the pair lists: a listed pair counts as often as it is listed
    # the wrappers call it as PML does (its own fused call, or its listed pairs for CrossBatchMemory)
    _fused_in_wrappers = False

    def __init__(self, margin=5.73, scale=64, backend="auto", **kwargs):
        super().__init__()
        V.check_real("margin", margin)
        V.check_real("scale", scale)
        self._margin_degrees, self.scale = margin, scale
        self._init_pair(backend, kwargs, (margin, scale))

    @property
    def margin(self):
        """PML's attribute: np.radians(margin)."""
        return math.radians(self._margin_degrees)

    @margin.setter
    def margin(self, radians):
        self._margin_degrees = math.degrees(radians)

    def _hyper(self):
        return dict(margin=self._margin_degrees, scale=self.scale, distance=self._distance_kind)

    def _functional(self):
        return tuplet_margin_loss


ENTRIES = (
    LossEntry(TupletMarginLoss, "pair", functional=tuplet_margin_loss, reference=tuplet_margin_reference,
              fused=tuplet_margin_fused, hyper=("margin", "scale")),
)
