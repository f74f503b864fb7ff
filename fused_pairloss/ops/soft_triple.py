"""SoftTriple loss (Qian et al., ICCV 2019; PML SoftTripleLoss) on the class engine.

Plug-in: kind SOFT_TRIPLE: S_ic = sum_k softmax_k(s_ick / gamma) s_ick over the K centers of
class c, z_ic = la (S_ic - margin [c == y_i]); the engine returns lse_i = LSE_c z_ic and
S_{i,y_i}. Row combination: cross-entropy L_i = lse_i - la (S_{i,y_i} - margin), mean over rows,
plus center_reg_weight * PML's SparseCentersRegularizer computed per class block (C x K x K, never
C*K x C*K).
"""
from __future__ import annotations

import torch

from . import _kinds, class_engine
from ._common import normalize


def sparse_centers_regularizer_blockwise(centers, centers_per_class):
    """PML SparseCentersRegularizer (SPEC §2) from per-class K x K blocks."""
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


def soft_triple_fused(embeddings, labels, centers, *, centers_per_class, la, gamma, margin,
                      center_reg_weight, backend):
    q = normalize(embeddings)
    w = normalize(centers.t())  # (C*K, D), row c*K+k = center k of class c
    lse, target_sim = class_engine.row_stats(
        q, w, labels, centers_per_class=centers_per_class, kind=_kinds.SOFT_TRIPLE,
        params=(la, gamma, margin), backend=backend)
    loss = (lse - la * (target_sim - margin)).mean().to(embeddings.dtype)
    if center_reg_weight:
        loss = loss + center_reg_weight * sparse_centers_regularizer_blockwise(centers, centers_per_class)
    return loss
