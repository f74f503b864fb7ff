"""Circle loss, pair-wise labels (Sun et al., CVPR 2020; PML CircleLoss) on the pair engine.

Plug-in: kind CIRCLE, logits pos = -gamma relu(1+m - sg(S)) (S - (1-m)),
neg = gamma relu(sg(S) + m) (S - m) (csrc/common/pair_math.h).
Row combination (SPEC §2): L_i = softplus(lse_pos_i + lse_neg_i) (0 when a set is empty: lse is
-inf there), loss = mean of the L_i > 0 (PML AvgNonZeroReducer), 0 if there are none.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _kinds, pair_engine
from ._common import pair_operands, too_few_pairs, zero_loss


def circle_fused(embeddings, labels, ref_emb, ref_labels, *, m, gamma, backend):
    q, r, labels_r, exclude_diag = pair_operands(embeddings, labels, ref_emb, ref_labels)
    lse_pos, lse_neg, count_pos, count_neg, _, _ = pair_engine.row_stats(
        q, r, labels, labels_r, exclude_diag=exclude_diag, kind=_kinds.CIRCLE,
        params=(m, gamma, 0.0), mine=False, miner_eps=0.0, backend=backend)
    rows = F.softplus(lse_pos + lse_neg)
    above = rows > 0
    n_above = above.sum()
    mean_above = torch.where(above, rows, torch.zeros_like(rows)).sum() / n_above.clamp(min=1)
    zero = zero_loss(embeddings)
    loss = torch.where(n_above > 0, mean_above.to(embeddings.dtype), zero)
    return torch.where(too_few_pairs(count_pos, count_neg), zero, loss)
