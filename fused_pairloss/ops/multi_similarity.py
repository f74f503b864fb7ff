"""Multi-Similarity loss (Wang et al., CVPR 2019; PML MultiSimilarityLoss) on the pair engine.

Declaration (docs/semantics.md): cosine: pos x = -alpha (S - base), neg x = beta (S - base); lp
distance: pos x = alpha (d - base), neg x = -beta (d - base) (PML's distance.margin); both sets
reduced by LSE; optionally PML's MultiSimilarityMiner(epsilon).
Row combination: L_i = softplus(lse_pos_i) / alpha + softplus(lse_neg_i) / beta (PML's logsumexp
with add_one), loss = mean over all rows; PML's few-pairs rule.
"""
from __future__ import annotations

import torch

from . import engines
from ._common import LOCAL, pair_operands, zero_loss
from .spec import PairLossSpec, PairTerm


def declaration(alpha, beta, base, miner_epsilon=None, distance="cosine", exclude_after_mining=False):
    """exclude_after_mining: the excluded column takes part in the mining thresholds (PML's
    CrossBatchMemory runs its miner against the memory, self slot included, then removes the self
    comparisons)."""
    sign = 1.0 if distance == "lp" else -1.0  # PML: margin(x, y) = y - x for a similarity
    return PairLossSpec(pos=PairTerm(scale=sign * alpha, shift=base, lse=True),
                        neg=PairTerm(scale=-sign * beta, shift=base, lse=True),
                        distance=distance, miner_epsilon=miner_epsilon,
                        exclude_after_mining=bool(exclude_after_mining and miner_epsilon is not None))


def combine(st: engines.PairStats, embeddings, *, alpha, beta, mined, batch=LOCAL):
    zero = torch.zeros_like(st.lse_pos)
    # softplus(x) = log(1 + e^x) = logaddexp(x, 0); exact at -inf (empty set -> 0)
    rows = torch.logaddexp(st.lse_pos, zero) / alpha + torch.logaddexp(st.lse_neg, zero) / beta
    loss = batch.mean(rows).to(embeddings.dtype)
    loss = torch.where(batch.too_few_pairs(st.count_pos, st.count_neg), zero_loss(embeddings), loss)
    if mined:  # NaN in, NaN out also through the mining comparisons
        loss = loss + zero_loss(embeddings)
    return loss


def multi_similarity_fused(embeddings, labels, ref_emb, ref_labels, *, alpha, beta, base, miner_epsilon,
                           distance="cosine", backend, exclude_col=None, batch=LOCAL,
                           exclude_after_mining=False):
    q, r, labels_r, excl = pair_operands(embeddings, labels, ref_emb, ref_labels, exclude_col)
    st = engines.pair_stats(q, r, labels, labels_r, excl,
                            declaration(alpha, beta, base, miner_epsilon, distance, exclude_after_mining), backend)
    loss = combine(st, embeddings, alpha=alpha, beta=beta, mined=miner_epsilon is not None, batch=batch)
    if miner_epsilon is not None and ref_emb is not None:
        loss = loss + zero_loss(ref_emb)
    return loss
