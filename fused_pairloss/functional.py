"""Functional API (docs/api.md): validate, pick the backend, call the loss's plug-in.

backend="reference" runs fused_pairloss.reference (materializes N x M); "cpu", "triton", "cuda"
run the fused kernels through fused_pairloss/ops; "auto" picks the fastest fused backend for the
tensors' device, else the reference.
"""
from __future__ import annotations

import math

from . import _validation as V
from . import reference
from ._backends import resolve_backend
from .ops.circle import circle_fused
from .ops.contrastive import contrastive_fused
from .ops.lifted_structure import lifted_structure_fused
from .ops.margin_softmax import margin_softmax_fused
from .ops.multi_similarity import multi_similarity_fused
from .ops.ntxent import ntxent_fused
from .ops.proxy_anchor import proxy_anchor_fused
from .ops.proxy_circle import proxy_circle_fused
from .ops.soft_triple import soft_triple_fused
from .ops.supcon import supcon_fused

__all__ = ["multi_similarity_loss", "circle_loss", "ntxent_loss", "supcon_loss", "contrastive_loss",
           "generalized_lifted_structure_loss", "soft_triple_loss", "proxy_circle_loss", "proxy_anchor_loss",
           "normalized_softmax_loss", "cosface_loss", "arcface_loss"]


def _pair(reference_fn, fused_fn, embeddings, labels, ref_emb, ref_labels, backend, **hyper):
    V.check_pair_inputs(embeddings, labels, ref_emb, ref_labels)
    backend = resolve_backend(backend, embeddings.device)
    if backend == "reference":
        return reference_fn(embeddings, labels, ref_emb, ref_labels, **hyper)
    return fused_fn(embeddings, labels, ref_emb, ref_labels, backend=backend, **hyper)


def multi_similarity_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, alpha=2.0, beta=50.0, base=0.5,
                          miner_epsilon=None, distance="cosine", backend="auto"):
    """PML MultiSimilarityLoss(alpha, beta, base); with miner_epsilon=e, PML's
    MultiSimilarityMiner(e) (same distance) applied first. Returns a 0-dim tensor in the input dtype."""
    V.check_positive("alpha", alpha)
    V.check_positive("beta", beta)
    V.check_real("base", base)
    V.check_real("miner_epsilon", miner_epsilon, allow_none=True)
    V.check_distance(distance)
    return _pair(reference.multi_similarity_loss, multi_similarity_fused, embeddings, labels, ref_emb, ref_labels,
                 backend, alpha=alpha, beta=beta, base=base, miner_epsilon=miner_epsilon, distance=distance)


def circle_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, m=0.4, gamma=80.0, backend="auto"):
    """PML CircleLoss(m, gamma) (pair-wise labels, cosine similarity)."""
    V.check_real("m", m)
    V.check_positive("gamma", gamma)
    return _pair(reference.circle_loss, circle_fused, embeddings, labels, ref_emb, ref_labels, backend,
                 m=m, gamma=gamma)


def ntxent_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, temperature=0.07, distance="cosine",
                backend="auto"):
    """PML NTXentLoss(temperature): per positive pair, a softmax against the row's negatives."""
    V.check_positive("temperature", temperature)
    V.check_distance(distance)
    return _pair(reference.ntxent_loss, ntxent_fused, embeddings, labels, ref_emb, ref_labels, backend,
                 temperature=temperature, distance=distance)


def supcon_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, temperature=0.1, distance="cosine",
                backend="auto"):
    """PML SupConLoss(temperature)."""
    V.check_positive("temperature", temperature)
    V.check_distance(distance)
    return _pair(reference.supcon_loss, supcon_fused, embeddings, labels, ref_emb, ref_labels, backend,
                 temperature=temperature, distance=distance)


def contrastive_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, pos_margin=0.0, neg_margin=1.0,
                     distance="lp", backend="auto"):
    """PML ContrastiveLoss(pos_margin, neg_margin); PML's default distance LpDistance ("lp")."""
    V.check_real("pos_margin", pos_margin)
    V.check_real("neg_margin", neg_margin)
    V.check_distance(distance)
    V.check_margins_ordered(pos_margin, neg_margin, distance)
    return _pair(reference.contrastive_loss, contrastive_fused, embeddings, labels, ref_emb, ref_labels, backend,
                 pos_margin=pos_margin, neg_margin=neg_margin, distance=distance)


def generalized_lifted_structure_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, neg_margin=1.0,
                                      pos_margin=0.0, distance="lp", backend="auto"):
    """PML GeneralizedLiftedStructureLoss(neg_margin, pos_margin); default distance LpDistance."""
    V.check_real("pos_margin", pos_margin)
    V.check_real("neg_margin", neg_margin)
    V.check_distance(distance)
    V.check_margins_ordered(pos_margin, neg_margin, distance)
    return _pair(reference.generalized_lifted_structure_loss, lifted_structure_fused, embeddings, labels, ref_emb,
                 ref_labels, backend, neg_margin=neg_margin, pos_margin=pos_margin, distance=distance)


def _classes(reference_fn, fused_fn, embeddings, labels, weights, backend, **hyper):
    backend = resolve_backend(backend, embeddings.device)
    if backend == "reference":
        return reference_fn(embeddings, labels, weights, **hyper)
    return fused_fn(embeddings, labels, weights, backend=backend, **hyper)


def soft_triple_loss(embeddings, labels, centers, *, centers_per_class=10, la=20.0, gamma=0.1, margin=0.01,
                     center_reg_weight=0.0, backend="auto"):
    """PML SoftTripleLoss; centers is PML's fc, shape (D, C*K), column c*K+k = center k of class c."""
    V.check_centers(embeddings, labels, centers, centers_per_class)
    V.check_positive("la", la)
    V.check_positive("gamma", gamma)
    V.check_real("margin", margin)
    V.check_real("center_reg_weight", center_reg_weight)
    if center_reg_weight and centers_per_class < 2:
        raise ValueError("center_reg_weight > 0 needs centers_per_class >= 2 (the regularizer "
                         f"compares centers of one class); got centers_per_class={centers_per_class}")
    return _classes(reference.soft_triple_loss, soft_triple_fused, embeddings, labels, centers, backend,
                    centers_per_class=centers_per_class, la=la, gamma=gamma, margin=margin,
                    center_reg_weight=center_reg_weight)


def proxy_circle_loss(embeddings, labels, proxies, *, m=0.25, gamma=256.0, backend="auto"):
    """Circle loss with class-level labels; proxies (D, C), one learnable proxy per class."""
    V.check_centers(embeddings, labels, proxies, 1, name="proxies")
    V.check_real("m", m)
    V.check_positive("gamma", gamma)
    return _classes(reference.proxy_circle_loss, proxy_circle_fused, embeddings, labels, proxies, backend,
                    m=m, gamma=gamma)


def proxy_anchor_loss(embeddings, labels, proxies, *, margin=0.1, alpha=32.0, backend="auto"):
    """PML ProxyAnchorLoss; proxies in PML's layout (C, D)."""
    V.check_centers(embeddings, labels, proxies, 1, name="proxies", classes_first=True)
    V.check_real("margin", margin)
    V.check_positive("alpha", alpha)
    return _classes(reference.proxy_anchor_loss, proxy_anchor_fused, embeddings, labels, proxies, backend,
                    margin=margin, alpha=alpha)


def normalized_softmax_loss(embeddings, labels, W, *, temperature=0.05, backend="auto"):
    """PML NormalizedSoftmaxLoss; W in PML's layout (D, C)."""
    V.check_centers(embeddings, labels, W, 1, name="W")
    V.check_positive("temperature", temperature)
    backend = resolve_backend(backend, embeddings.device)
    if backend == "reference":
        return reference.normalized_softmax_loss(embeddings, labels, W, temperature=temperature)
    return margin_softmax_fused(embeddings, labels, W, kind="normalized_softmax", scale=1.0 / temperature,
                                margin=0.0, backend=backend)


def cosface_loss(embeddings, labels, W, *, margin=0.35, scale=64.0, backend="auto"):
    """PML CosFaceLoss; W in PML's layout (D, C)."""
    V.check_centers(embeddings, labels, W, 1, name="W")
    V.check_real("margin", margin)
    V.check_positive("scale", scale)
    backend = resolve_backend(backend, embeddings.device)
    if backend == "reference":
        return reference.cosface_loss(embeddings, labels, W, margin=margin, scale=scale)
    return margin_softmax_fused(embeddings, labels, W, kind="cosface", scale=scale, margin=margin, backend=backend)


def arcface_loss(embeddings, labels, W, *, margin=28.6, scale=64.0, backend="auto"):
    """PML ArcFaceLoss; margin in degrees (as PML); W in PML's layout (D, C)."""
    V.check_centers(embeddings, labels, W, 1, name="W")
    V.check_real("margin", margin)
    V.check_positive("scale", scale)
    backend = resolve_backend(backend, embeddings.device)
    if backend == "reference":
        return reference.arcface_loss(embeddings, labels, W, margin=margin, scale=scale)
    return margin_softmax_fused(embeddings, labels, W, kind="arcface", scale=scale, margin=math.radians(margin),
                                backend=backend)
