"""Margin-softmax cross-entropies on the class engine: PML's NormalizedSoftmaxLoss (Zhai & Wu,
2019), CosFaceLoss (Wang et al., CVPR 2018), ArcFaceLoss (Deng et al., CVPR 2019).

Declaration: row LSE over the classes c != y_i of scale * S_ic (cosine S; scale = 1/temperature,
or PML's `scale`); the target logit is formed here from target_sim, with PML's own formula:
NormalizedSoftmax S_y / t, CosFace s (S_y - m), ArcFace s * cos(acos(S_y) + m) with PML's clamp
and "keep it monotonic" branch. Combination: cross-entropy L_i = logaddexp(lse_i, z_i) - z_i, mean
over rows.
"""
from __future__ import annotations

import math

import torch

from . import engines
from ._common import LOCAL, normalize
from .spec import ClassLossSpec, PairTerm


def declaration(scale):
    """PML's W is (D, C); the engine normalizes its columns (PML: F.normalize(W, dim=0))."""
    return ClassLossSpec(row=PairTerm(scale=scale, lse=True), normalize_weights=True, weights_layout="columns")


def target_logit(kind, sim, *, scale, margin):
    """The target class's logit from its cosine, with PML's own operations (its clamp and acos
    decide the gradient at |cos| = 1): PML adds the modification as `s + (f(s) - s)`."""
    if kind == "normalized_softmax":
        return sim * scale
    if kind == "cosface":
        modified = sim - margin
    else:  # arcface: margin in radians here (PML converts its degrees with np.radians)
        angles = torch.acos(torch.clamp(sim, -1, 1))
        modified = torch.where(angles <= math.pi - margin, torch.cos(angles + margin),
                               torch.cos(angles) - margin * math.sin(margin))
    return (sim + (modified - sim)) * scale


def combine(st: engines.ClassStats, embeddings, *, kind, scale, margin, batch=LOCAL):
    z = target_logit(kind, st.target_sim, scale=scale, margin=margin)
    return batch.mean(torch.logaddexp(st.lse_other, z) - z).to(embeddings.dtype)


def margin_softmax_fused(embeddings, labels, weights, *, kind, scale, margin, backend):
    """weights: PML's W (D, C)."""
    q = normalize(embeddings)
    st = engines.class_stats(q, weights, labels, declaration(scale), backend)
    return combine(st, embeddings, kind=kind, scale=scale, margin=margin)
