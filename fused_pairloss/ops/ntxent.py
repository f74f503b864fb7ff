"""NT-Xent loss (Chen et al., SimCLR 2020; PML NTXentLoss) on the pair engine.

Declaration: x = S / t (distance: -d / t), negatives reduced by LSE, each kept positive by NTXent's
pair term -log(e^x / (e^x + sum_neg e^x') + tiny) = -log(sigmoid(x - lse_neg_i) + tiny), which
needs the row's final lse_neg (the engine reduces the positives in a second walk).
Combination: PML's MeanReducer over the positive pairs (sum of the pair terms / number of positive
pairs); 0 when the batch has no positive or no negative pair; PML's few-pairs rule.
"""
from __future__ import annotations

import torch

from . import engines
from ._common import LOCAL, pair_operands, zero_loss
from .spec import PairLossSpec, PairTerm


def declaration(temperature, distance="cosine"):
    scale = (1.0 if distance == "cosine" else -1.0) / temperature  # PML negates distances
    return PairLossSpec(pos=PairTerm(scale=scale), neg=PairTerm(scale=scale, lse=True), distance=distance,
                        pos_vs_neg_lse=True)


def combine(st: engines.PairStats, embeddings, *, batch=LOCAL):
    zero = zero_loss(embeddings)
    n_pos, n_neg = batch.sum(st.count_pos), batch.sum(st.count_neg)
    loss = (batch.sum(st.pos_vs_neg) / n_pos.clamp(min=1)).to(embeddings.dtype)
    loss = torch.where((n_pos > 0) & (n_neg > 0), loss, zero)
    return torch.where(batch.too_few_pairs(st.count_pos, st.count_neg), zero, loss)


def ntxent_fused(embeddings, labels, ref_emb, ref_labels, *, temperature, distance="cosine", backend,
                 exclude_col=None, batch=LOCAL):
    q, r, labels_r, excl = pair_operands(embeddings, labels, ref_emb, ref_labels, exclude_col)
    st = engines.pair_stats(q, r, labels, labels_r, excl, declaration(temperature, distance), backend)
    return combine(st, embeddings, batch=batch)
