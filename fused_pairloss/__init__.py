"""fused_pairloss: fused kernels for pair-based metric-learning losses (Multi-Similarity, Circle,
SoftTriple, class-level Circle), drop-in replacements for pytorch-metric-learning's losses.

    import fused_pairloss as fpl
    loss_fn = fpl.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)   # was: losses.MultiSimilarityLoss
    loss = loss_fn(embeddings, labels)
"""
from . import functional, reference
from ._backends import available_backends, build_info
from ._version import __version__
from .modules import CircleLoss, MultiSimilarityLoss, ProxyCircleLoss, SoftTripleLoss

__all__ = [
    "MultiSimilarityLoss",
    "CircleLoss",
    "SoftTripleLoss",
    "ProxyCircleLoss",
    "functional",
    "reference",
    "available_backends",
    "build_info",
]
