"""Generalized lifted structure loss (Hermans et al. 2017, "In Defense of the Triplet Loss"; PML
GeneralizedLiftedStructureLoss) on the pair engine.

Declaration (PML's distance.margin): lp distance (PML's default): pos x = d - pos_margin, neg x =
neg_margin - d; cosine: pos x = pos_margin - S, neg x = S - neg_margin; both reduced by LSE.
Combination: L_i = relu(lse_pos_i + lse_neg_i) with an empty set's LSE taken as 0 (PML's masked
logsumexp), mean over all rows; PML's few-pairs rule.
"""
from __future__ import annotations

import torch

from . import engines
from ._common import LOCAL, pair_operands, zero_loss
from .spec import PairLossSpec, PairTerm


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
    st = engines.pair_stats(q, r, labels, labels_r, excl, declaration(neg_margin, pos_margin, distance), backend)
    return combine(st, embeddings, batch=batch)
