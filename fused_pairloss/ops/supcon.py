"""Supervised contrastive loss (Khosla et al., NeurIPS 2020; PML SupConLoss) on the pair engine.

Declaration: x = S / t (distance: -d / t); positives reduced by LSE and by sum, negatives by LSE.
Combination: per row, -mean over P_i of (x_ij - LSE over P_i and N_i of x)
= (|P_i| lse_all_i - sum_pos_i) / (|P_i| + tiny) with lse_all = logaddexp(lse_pos, lse_neg), 0 for a
row without positives; PML's AvgNonZeroReducer over the rows; 0 when the batch has no positive or no
negative pair; PML's few-pairs rule. (PML subtracts the detached row max first: it cancels.)
"""
from __future__ import annotations

import torch

from . import engines
from ._common import LOCAL, pair_operands, zero_loss
from .spec import PairLossSpec, PairTerm


def declaration(temperature, distance="cosine"):
    scale = (1.0 if distance == "cosine" else -1.0) / temperature
    return PairLossSpec(pos=PairTerm(scale=scale, lse=True, sum=True), neg=PairTerm(scale=scale, lse=True),
                        distance=distance)


def combine(st: engines.PairStats, embeddings, *, batch=LOCAL):
    zero = zero_loss(embeddings)
    cnt = st.count_pos.to(st.sum_pos.dtype)
    has_pos = st.count_pos > 0
    # rows without positives are 0; mask lse_pos before logaddexp (its gradient is NaN at -inf, -inf)
    lse_all = torch.logaddexp(torch.where(has_pos, st.lse_pos, 0), st.lse_neg)
    tiny = torch.finfo(st.sum_pos.dtype).tiny
    rows = torch.where(has_pos, (cnt * lse_all - st.sum_pos) / (cnt + tiny), torch.zeros_like(cnt))
    loss = batch.mean_above_zero(rows, zero)
    n_pos, n_neg = batch.sum(st.count_pos), batch.sum(st.count_neg)
    loss = torch.where((n_pos > 0) & (n_neg > 0), loss, zero)
    return torch.where(batch.too_few_pairs(st.count_pos, st.count_neg), zero, loss)


def supcon_fused(embeddings, labels, ref_emb, ref_labels, *, temperature, distance="cosine", backend,
                 exclude_col=None, batch=LOCAL):
    q, r, labels_r, excl = pair_operands(embeddings, labels, ref_emb, ref_labels, exclude_col)
    st = engines.pair_stats(q, r, labels, labels_r, excl, declaration(temperature, distance), backend)
    loss = combine(st, embeddings, batch=batch)
    # PML's AvgNonZeroReducer drops NaN terms: keep NaN in, NaN out (docs/semantics.md)
    return loss + zero_loss(embeddings) + (0 if ref_emb is None else zero_loss(ref_emb))
