"""Contrastive loss (Hadsell et al., CVPR 2006; PML ContrastiveLoss) on the pair engine.

Declaration (PML's distance.margin): lp distance (PML's default): pos x = relu(d - pos_margin),
neg x = relu(neg_margin - d); cosine: pos x = relu(pos_margin - S), neg x = relu(S - neg_margin);
both reduced by sum and by the count of pairs with x > 0.
Combination: PML's AvgNonZeroReducer per sub-loss (the mean of the pair losses > 0 of the
positives, plus that of the negatives); PML's few-pairs rule.
"""
from __future__ import annotations

import torch

from .. import _validation as V
from ..ops import engines
from ..ops._common import LOCAL, loss_function, pair_operands, zero_loss
from ..ops.spec import PairLossSpec, PairTerm
from ..ops.stats import pair_stats
from ._base import _PairLoss, run_pair_loss
from ._reference_common import avg_non_zero, check_distance, distance_margin, nan_in_nan_out, pair_setup, too_few_pairs
from ._registry import LossEntry


def contrastive_reference(embeddings, labels, ref_emb=None, ref_labels=None, *, pos_margin=0.0,
                          neg_margin=1.0, distance="lp", indices_tuple=None):
    """PML ContrastiveLoss (pair-based; PML's default distance is LpDistance()).

    Per listed pair (contrastive_loss.py:38-48, margin() of base_distance.py:61-64):
      lp:     positive l_ij = relu(d_ij - pos_margin),  negative l_ij = relu(neg_margin - d_ij)
      cosine: positive l_ij = relu(pos_margin - S_ij),  negative l_ij = relu(S_ij - neg_margin)
    Two sub-losses, each reduced by its own AvgNonZeroReducer (MultipleReducers,
    module_with_records_and_reducer.py:26-33): the sum of the pair losses > 0 over their count
    (pairs listed twice count twice), or 0 if none; loss = pos part + neg part
    (multiple_reducers.py:31-32). One-pair rule -> 0.
    """
    check_distance(distance, loss="contrastive_loss")
    mat, pos_cnt, neg_cnt = pair_setup(embeddings, labels, ref_emb, ref_labels, indices_tuple,
                                       distance)
    pos_losses = torch.relu(distance_margin(mat, pos_margin, distance))
    neg_losses = torch.relu(distance_margin(neg_margin, mat, distance))
    loss = (avg_non_zero(pos_losses, embeddings, pos_cnt)
            + avg_non_zero(neg_losses, embeddings, neg_cnt))
    too_few = too_few_pairs(pos_cnt.sum(), neg_cnt.sum(), mat.device)
    return nan_in_nan_out(torch.where(too_few, zero_loss(embeddings), loss), embeddings, ref_emb)


def declaration(pos_margin, neg_margin, distance="lp"):
    sign = 1.0 if distance == "lp" else -1.0
    return PairLossSpec(pos=PairTerm(scale=sign, shift=pos_margin, hinge=True, sum=True),
                        neg=PairTerm(scale=-sign, shift=neg_margin, hinge=True, sum=True), distance=distance)


def combine(st: engines.PairStats, embeddings, *, batch=LOCAL):
    zero = zero_loss(embeddings)

    def avg_nonzero(total, nonzero):
        n = batch.sum(nonzero)
        return torch.where(n > 0, (batch.sum(total) / n.clamp(min=1)).to(embeddings.dtype), zero)

    loss = avg_nonzero(st.sum_pos, st.nonzero_pos) + avg_nonzero(st.sum_neg, st.nonzero_neg)
    return torch.where(batch.too_few_pairs(st.count_pos, st.count_neg), zero, loss)


@loss_function
def contrastive_fused(embeddings, labels, ref_emb, ref_labels, *, pos_margin, neg_margin, distance="lp", backend,
                      exclude_col=None, batch=LOCAL):
    q, r, labels_r, excl = pair_operands(embeddings, labels, ref_emb, ref_labels, exclude_col)
    st = pair_stats(q, r, labels, labels_r, excl, declaration(pos_margin, neg_margin, distance), backend)
    loss = combine(st, embeddings, batch=batch)
    # PML's AvgNonZeroReducer drops NaN terms: keep NaN in, NaN out (docs/semantics.md)
    return loss + zero_loss(embeddings) + (0 if ref_emb is None else zero_loss(ref_emb))


@loss_function
def contrastive_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, pos_margin=0.0, neg_margin=1.0,
                     distance="lp", backend="auto"):
    """PML ContrastiveLoss(pos_margin, neg_margin); PML's default distance LpDistance ("lp")."""
    V.check_real("pos_margin", pos_margin)
    V.check_real("neg_margin", neg_margin)
    V.check_distance(distance)
    V.check_margins_ordered(pos_margin, neg_margin, distance, "contrastive_loss")
    return run_pair_loss(contrastive_reference, contrastive_fused, embeddings, labels, ref_emb, ref_labels, backend,
                         pos_margin=pos_margin, neg_margin=neg_margin, distance=distance)


class ContrastiveLoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.ContrastiveLoss (default distance LpDistance)."""
    _pair_based = True  # PML's GenericPairLoss(mat_based_loss=False): the pair list
    _default_distance = "lp"
    _reference = staticmethod(contrastive_reference)
    _fuses_pair_miners = True  # our MultiSimilarityMiner's and PairMarginMiner's pairs: their rule in the engine

    def __init__(self, pos_margin=0, neg_margin=1, backend="auto", **kwargs):
        super().__init__()
        V.check_real("pos_margin", pos_margin)
        V.check_real("neg_margin", neg_margin)
        self.pos_margin, self.neg_margin = pos_margin, neg_margin
        self._init_pair(backend, kwargs, (pos_margin, neg_margin))
        if self._distance_kind is not None:
            V.check_margins_ordered(pos_margin, neg_margin, self._distance_kind, "ContrastiveLoss", "contrastive_loss")

    def _hyper(self):
        return dict(pos_margin=self.pos_margin, neg_margin=self.neg_margin, distance=self._distance_kind)

    def _functional(self):
        return contrastive_loss


ENTRIES = (
    LossEntry(ContrastiveLoss, "pair", functional=contrastive_loss, reference=contrastive_reference,
              fused=contrastive_fused, hyper=("pos_margin", "neg_margin")),
)
