"""Functional API (SPEC §1): validate, pick the backend, call the loss's plug-in.

backend="reference" runs fused_pairloss.reference (materializes N x M); "cpu", "triton", "cuda"
run the fused kernels through fused_pairloss/ops; "auto" picks the fastest fused backend for the
tensors' device, else the reference.
"""
from __future__ import annotations

from . import _validation as V
from . import reference
from ._backends import resolve_backend
from .ops.circle import circle_fused
from .ops.multi_similarity import multi_similarity_fused
from .ops.proxy_circle import proxy_circle_fused
from .ops.soft_triple import soft_triple_fused

__all__ = ["multi_similarity_loss", "circle_loss", "soft_triple_loss", "proxy_circle_loss"]


def multi_similarity_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, alpha=2.0,
                          beta=50.0, base=0.5, miner_epsilon=None, backend="auto"):
    """PML MultiSimilarityLoss(alpha, beta, base); with miner_epsilon=e, PML's
    MultiSimilarityMiner(e) applied first. Returns a 0-dim tensor in the input dtype."""
    V.check_pair_inputs(embeddings, labels, ref_emb, ref_labels)
    V.check_positive("alpha", alpha)
    V.check_positive("beta", beta)
    V.check_real("base", base)
    V.check_real("miner_epsilon", miner_epsilon, allow_none=True)
    backend = resolve_backend(backend, embeddings.device)
    if backend == "reference":
        return reference.multi_similarity_loss(embeddings, labels, ref_emb, ref_labels, alpha=alpha,
                                               beta=beta, base=base, miner_epsilon=miner_epsilon)
    return multi_similarity_fused(embeddings, labels, ref_emb, ref_labels, alpha=alpha, beta=beta,
                                  base=base, miner_epsilon=miner_epsilon, backend=backend)


def circle_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, m=0.4, gamma=80.0,
                backend="auto"):
    """PML CircleLoss(m, gamma) (pair-wise labels). Returns a 0-dim tensor in the input dtype."""
    V.check_pair_inputs(embeddings, labels, ref_emb, ref_labels)
    V.check_real("m", m)
    V.check_positive("gamma", gamma)
    backend = resolve_backend(backend, embeddings.device)
    if backend == "reference":
        return reference.circle_loss(embeddings, labels, ref_emb, ref_labels, m=m, gamma=gamma)
    return circle_fused(embeddings, labels, ref_emb, ref_labels, m=m, gamma=gamma, backend=backend)


def soft_triple_loss(embeddings, labels, centers, *, centers_per_class=10, la=20.0, gamma=0.1,
                     margin=0.01, center_reg_weight=0.0, backend="auto"):
    """PML SoftTripleLoss; centers is PML's fc, shape (D, C*K), column c*K+k = center k of class c."""
    V.check_centers(embeddings, labels, centers, centers_per_class)
    V.check_positive("la", la)
    V.check_positive("gamma", gamma)
    V.check_real("margin", margin)
    V.check_real("center_reg_weight", center_reg_weight)
    if center_reg_weight and centers_per_class < 2:
        raise ValueError("center_reg_weight > 0 needs centers_per_class >= 2 (the regularizer "
                         f"compares centers of one class); got centers_per_class={centers_per_class}")
    backend = resolve_backend(backend, embeddings.device)
    kw = dict(centers_per_class=centers_per_class, la=la, gamma=gamma, margin=margin,
              center_reg_weight=center_reg_weight)
    if backend == "reference":
        return reference.soft_triple_loss(embeddings, labels, centers, **kw)
    return soft_triple_fused(embeddings, labels, centers, backend=backend, **kw)


def proxy_circle_loss(embeddings, labels, proxies, *, m=0.25, gamma=256.0, backend="auto"):
    """Circle loss with class-level labels; proxies (D, C), one learnable proxy per class."""
    V.check_centers(embeddings, labels, proxies, 1, name="proxies")
    V.check_real("m", m)
    V.check_positive("gamma", gamma)
    backend = resolve_backend(backend, embeddings.device)
    if backend == "reference":
        return reference.proxy_circle_loss(embeddings, labels, proxies, m=m, gamma=gamma)
    return proxy_circle_fused(embeddings, labels, proxies, m=m, gamma=gamma, backend=backend)
