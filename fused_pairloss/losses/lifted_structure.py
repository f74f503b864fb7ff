"""Generalized lifted structure loss (Hermans et al. 2017, "In Defense of the Triplet Loss"; PML
GeneralizedLiftedStructureLoss) on the pair engine.

Declaration (PML's distance.margin): lp distance (PML's default): pos x = d - pos_margin, neg x =
neg_margin - d; cosine: pos x = pos_margin - S, neg x = S - neg_margin; both reduced by LSE.
Combination: L_i = relu(lse_pos_i + lse_neg_i) with an empty set's LSE taken as 0 (PML's masked
logsumexp), mean over all rows; PML's few-pairs rule.
"""
from __future__ import annotations

import torch

from .. import _validation as V
from ..ops import engines
from ..ops._common import LOCAL, pair_operands, similarity_dtype, zero_loss
from ..ops.spec import PairLossSpec, PairTerm
from ..ops.stats import pair_stats
from ._base import _PairLoss, run_pair_loss
from ._reference_common import check_distance, distance_margin, masked_logsumexp, prepare_pairs
from ._registry import LossEntry


def lifted_structure_reference(embeddings, labels, ref_emb=None, ref_labels=None, *,
                               neg_margin=1.0, pos_margin=0.0, distance="lp",
                               indices_tuple=None):
    """PML GeneralizedLiftedStructureLoss (lifted_structure_loss.py:52-80; mat-based,
    MeanReducer; PML's default distance is LpDistance()).

    Per row i, LSEs without the added one (an empty set gives 0):
      lp:     L_i = relu( LSE_{P_i} (d_ij - pos_margin) + LSE_{N_i} (neg_margin - d_ij) )
      cosine: L_i = relu( LSE_{P_i} (pos_margin - S_ij) + LSE_{N_i} (S_ij - neg_margin) )
    loss = (1/N) sum_i L_i over all rows (a row without positives still adds relu(LSE_{N_i})).
    One-pair rule -> 0.
    """
    check_distance(distance, loss="generalized_lifted_structure_loss")
    mat, pos, neg, too_few = prepare_pairs(embeddings, labels, ref_emb, ref_labels,
                                           indices_tuple, None, distance)
    pos_lse = masked_logsumexp(distance_margin(mat, pos_margin, distance), pos, add_one=False)
    neg_lse = masked_logsumexp(distance_margin(neg_margin, mat, distance), neg, add_one=False)
    loss = torch.mean(torch.relu(pos_lse + neg_lse))
    return torch.where(too_few, zero_loss(embeddings), loss).to(similarity_dtype(embeddings, distance))


def declaration(neg_margin, pos_margin, distance="lp"):
    sign = 1.0 if distance == "lp" else -1.0
    return PairLossSpec(pos=PairTerm(scale=sign, shift=pos_margin, lse=True),
                        neg=PairTerm(scale=-sign, shift=neg_margin, lse=True), distance=distance)


def combine(st: engines.PairStats, embeddings, *, batch=LOCAL):
    lp = torch.where(st.count_pos > 0, st.lse_pos, 0)
    ln = torch.where(st.count_neg > 0, st.lse_neg, 0)
    loss = batch.mean(torch.relu(lp + ln)).to(embeddings.dtype)
    return torch.where(batch.too_few_pairs(st.count_pos, st.count_neg), zero_loss(embeddings), loss)


def lifted_structure_fused(embeddings, labels, ref_emb, ref_labels, *, neg_margin, pos_margin, distance="lp",
                           backend, exclude_col=None, batch=LOCAL):
    q, r, labels_r, excl = pair_operands(embeddings, labels, ref_emb, ref_labels, exclude_col)
    st = pair_stats(q, r, labels, labels_r, excl, declaration(neg_margin, pos_margin, distance), backend)
    return combine(st, embeddings, batch=batch).to(similarity_dtype(embeddings, distance))  # PML's under autocast


def generalized_lifted_structure_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, neg_margin=1.0,
                                      pos_margin=0.0, distance="lp", backend="auto"):
    """PML GeneralizedLiftedStructureLoss(neg_margin, pos_margin); default distance LpDistance."""
    V.check_real("pos_margin", pos_margin)
    V.check_real("neg_margin", neg_margin)
    V.check_distance(distance)
    V.check_margins_ordered(pos_margin, neg_margin, distance)
    return run_pair_loss(lifted_structure_reference, lifted_structure_fused, embeddings, labels, ref_emb,
                         ref_labels, backend, neg_margin=neg_margin, pos_margin=pos_margin, distance=distance)


class GeneralizedLiftedStructureLoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.GeneralizedLiftedStructureLoss (default LpDistance)."""
    _default_distance = "lp"
    _reference = staticmethod(lifted_structure_reference)

    def __init__(self, neg_margin=1, pos_margin=0, backend="auto", **kwargs):
        super().__init__()
        V.check_real("pos_margin", pos_margin)
        V.check_real("neg_margin", neg_margin)
        self.neg_margin, self.pos_margin = neg_margin, pos_margin
        self._init_pair(backend, kwargs, (neg_margin, pos_margin))
        if self._distance_kind is not None:
            V.check_margins_ordered(pos_margin, neg_margin, self._distance_kind)

    def _hyper(self):
        return dict(neg_margin=self.neg_margin, pos_margin=self.pos_margin, distance=self._distance_kind)

    def _functional(self):
        return generalized_lifted_structure_loss


ENTRIES = (
    LossEntry(GeneralizedLiftedStructureLoss, "pair", functional=generalized_lifted_structure_loss,
              reference=lifted_structure_reference, fused=lifted_structure_fused, hyper=("neg_margin", "pos_margin")),
)
