"""Circle loss, pair-wise labels (Sun et al., CVPR 2020; PML CircleLoss) on the pair engine.

Declaration (docs/semantics.md): pos x = -gamma relu(1+m - sg(S)) (S - (1-m)), neg x = gamma
relu(sg(S) + m) (S - m) (detached weights), both reduced by LSE.
Row combination: L_i = softplus(lse_pos_i + lse_neg_i) (0 when a set is empty: lse is -inf there),
loss = mean of the L_i > 0 (PML AvgNonZeroReducer), 0 if there are none; PML's few-pairs rule.
"""
from __future__ import annotations

import torch.nn.functional as F

from . import engines
from ._common import LOCAL, pair_operands, zero_loss
from .spec import PairLossSpec, PairTerm


def declaration(m, gamma):
    # PML: -gamma * relu(op - S) * (S - delta_p), op = 1+m, delta_p = 1-m
    pos = PairTerm(scale=-gamma, shift=1.0 - m, weight_offset=1.0 + m, weight_slope=-1.0, lse=True)
    # PML:  gamma * relu(S - on) * (S - delta_n), on = -m, delta_n = m
    neg = PairTerm(scale=gamma, shift=m, weight_offset=m, weight_slope=1.0, lse=True)
    return PairLossSpec(pos=pos, neg=neg)


def combine(st: engines.PairStats, embeddings, *, batch=LOCAL):
    rows = F.softplus(st.lse_pos + st.lse_neg)
    zero = zero_loss(embeddings)
    loss = batch.mean_above_zero(rows, zero)
    return loss.where(~batch.too_few_pairs(st.count_pos, st.count_neg), zero)


def circle_fused(embeddings, labels, ref_emb, ref_labels, *, m, gamma, backend, exclude_col=None, batch=LOCAL):
    q, r, labels_r, excl = pair_operands(embeddings, labels, ref_emb, ref_labels, exclude_col)
    st = engines.pair_stats(q, r, labels, labels_r, excl, declaration(m, gamma), backend)
    return combine(st, embeddings, batch=batch)
