"""Proxy-Anchor loss (Kim et al., CVPR 2020; PML ProxyAnchorLoss) on the class engine.

Declaration: column reductions over the samples of each proxy c (K = 1): LSE over y_i == c of
alpha (margin - s_ic) and over y_i != c of alpha (s_ic + margin) (PML's distance.margin).
Combination: PML's DivisorReducer: sum_c softplus(pos_c) / |classes with a sample| +
sum_c softplus(neg_c) / C (its logsumexp with add_one; an empty set gives 0).
"""
from __future__ import annotations

import torch

from . import engines
from ._common import normalize, zero_loss
from .spec import ClassLossSpec, PairTerm


def declaration(margin, alpha):
    """PML's proxies are (C, D); the engine normalizes them."""
    return ClassLossSpec(col_pos=PairTerm(scale=-alpha, shift=margin, lse=True),
                         col_neg=PairTerm(scale=alpha, shift=-margin, lse=True), normalize_weights=True)


def combine(st: engines.ClassStats, embeddings, labels, num_classes):
    zero = torch.zeros_like(st.col_lse_pos)
    pos = torch.logaddexp(st.col_lse_pos, zero)  # softplus; exact at -inf
    neg = torch.logaddexp(st.col_lse_neg, zero)
    with_pos = torch.bincount(labels, minlength=num_classes).gt(0).sum()
    pos_loss = torch.where(with_pos > 0, pos.sum() / with_pos.clamp(min=1), 0).to(embeddings.dtype)
    neg_loss = (neg.sum() / num_classes).to(embeddings.dtype)
    return torch.where(with_pos > 0, pos_loss, zero_loss(embeddings)) + neg_loss


def proxy_anchor_fused(embeddings, labels, proxies, *, margin, alpha, backend):
    q = normalize(embeddings)
    st = engines.class_stats(q, proxies, labels, declaration(margin, alpha), backend)
    return combine(st, embeddings, labels, proxies.shape[0])
