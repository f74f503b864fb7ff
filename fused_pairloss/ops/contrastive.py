"""Contrastive loss (Hadsell et al., CVPR 2006; PML ContrastiveLoss) on the pair engine.

Declaration (PML's distance.margin): lp distance (PML's default): pos x = relu(d - pos_margin),
neg x = relu(neg_margin - d); cosine: pos x = relu(pos_margin - S), neg x = relu(S - neg_margin);
both reduced by sum and by the count of pairs with x > 0.
Combination: PML's AvgNonZeroReducer per sub-loss (the mean of the pair losses > 0 of the
positives, plus that of the negatives); PML's few-pairs rule.
"""
from __future__ import annotations

import torch

from . import engines
from ._common import LOCAL, pair_operands, zero_loss
from .spec import PairLossSpec, PairTerm


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


def contrastive_fused(embeddings, labels, ref_emb, ref_labels, *, pos_margin, neg_margin, distance="lp", backend,
                      exclude_col=None, batch=LOCAL):
    q, r, labels_r, excl = pair_operands(embeddings, labels, ref_emb, ref_labels, exclude_col)
    st = engines.pair_stats(q, r, labels, labels_r, excl, declaration(pos_margin, neg_margin, distance), backend)
    loss = combine(st, embeddings, batch=batch)
    # PML's AvgNonZeroReducer drops NaN terms: keep NaN in, NaN out (docs/semantics.md)
    return loss + zero_loss(embeddings) + (0 if ref_emb is None else zero_loss(ref_emb))
