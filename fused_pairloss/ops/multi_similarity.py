"""Multi-Similarity loss (Wang et al., CVPR 2019; PML MultiSimilarityLoss) on the pair engine.

Plug-in: kind MULTI_SIMILARITY, logits pos = -alpha (S - base), neg = beta (S - base)
(csrc/common/pair_math.h); optional MultiSimilarityMiner rule (mine=True, miner_eps).
Row combination (SPEC §2): L_i = softplus(lse_pos_i) / alpha + softplus(lse_neg_i) / beta
(PML's logsumexp with add_one), loss = mean over all rows.
"""
from __future__ import annotations

import torch

from . import _kinds, pair_engine
from ._common import pair_operands, too_few_pairs, zero_loss


def multi_similarity_fused(embeddings, labels, ref_emb, ref_labels, *, alpha, beta, base,
                           miner_epsilon, backend):
    q, r, labels_r, exclude_diag = pair_operands(embeddings, labels, ref_emb, ref_labels)
    lse_pos, lse_neg, count_pos, count_neg, _, _ = pair_engine.row_stats(
        q, r, labels, labels_r, exclude_diag=exclude_diag, kind=_kinds.MULTI_SIMILARITY,
        params=(alpha, beta, base), mine=miner_epsilon is not None,
        miner_eps=0.0 if miner_epsilon is None else miner_epsilon, backend=backend)
    # softplus(x) = log(1 + e^x) = logaddexp(x, 0); exact at -inf (empty set -> 0)
    zero = torch.zeros_like(lse_pos)
    rows = torch.logaddexp(lse_pos, zero) / alpha + torch.logaddexp(lse_neg, zero) / beta
    loss = rows.mean().to(embeddings.dtype)
    loss = torch.where(too_few_pairs(count_pos, count_neg), zero_loss(embeddings), loss)
    if miner_epsilon is not None:  # NaN in, NaN out also through the mining comparisons
        loss = loss + zero_loss(embeddings) + (0 if ref_emb is None else zero_loss(ref_emb))
    return loss
