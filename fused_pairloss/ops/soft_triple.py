"""SoftTriple loss (Qian et al., ICCV 2019; PML SoftTripleLoss) on the class engine.

Declaration: S_ic = sum_k softmax_k(s_ick / gamma) s_ick over the K centers of class c (pooling),
row term z = la S over the other classes (LSE); the target logit la (S_{i,y_i} - margin) is formed
here from target_sim. Row combination: cross-entropy L_i = logaddexp(lse_i, z_i) - z_i, mean over
rows, plus center_reg_weight * PML's SparseCentersRegularizer computed per class block
(C x K x K, never C*K x C*K).
"""
from __future__ import annotations

import torch

from . import engines
from ._common import LOCAL, normalize
from .spec import ClassLossSpec, PairTerm


def declaration(centers_per_class, la, gamma):
    """PML's fc is (D, C*K); the engine normalizes its columns (PML: F.normalize(fc, dim=0))."""
    return ClassLossSpec(row=PairTerm(scale=la, lse=True), centers_per_class=centers_per_class,
                         pool_gamma=gamma if centers_per_class > 1 else None,
                         normalize_weights=True, weights_layout="columns")


def sparse_centers_regularizer_blockwise(centers, centers_per_class):
    """PML SparseCentersRegularizer (docs/semantics.md) from per-class K x K blocks."""
    K = centers_per_class
    w = normalize(centers.t())  # (C*K, D)
    C = w.shape[0] // K
    blocks = w.view(C, K, -1)
    sims = torch.bmm(blocks, blocks.transpose(1, 2))  # (C, K, K)
    iu = torch.triu_indices(K, K, offset=1, device=w.device)
    pair_sims = sims[:, iu[0], iu[1]]
    tiny = torch.finfo(centers.dtype).tiny
    reg = torch.sqrt(2.0 + tiny - torch.clamp(2.0 * pair_sims, max=2))
    return reg.sum() / (C * K * (K - 1))


def combine(st: engines.ClassStats, embeddings, *, la, margin, batch=LOCAL):
    z_target = la * (st.target_sim - margin)
    return batch.mean(torch.logaddexp(st.lse_other, z_target) - z_target).to(embeddings.dtype)


def soft_triple_fused(embeddings, labels, centers, *, centers_per_class, la, gamma, margin,
                      center_reg_weight, backend):
    q = normalize(embeddings)
    # centers: PML's fc (D, C*K), column c*K+k = center k of class c
    st = engines.class_stats(q, centers, labels, declaration(centers_per_class, la, gamma), backend)
    loss = combine(st, embeddings, la=la, margin=margin)
    if center_reg_weight:
        loss = loss + center_reg_weight * sparse_centers_regularizer_blockwise(centers, centers_per_class)
    return loss
