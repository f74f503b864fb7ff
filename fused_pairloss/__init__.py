"""fused_pairloss: fused kernels for the pair-based and proxy metric-learning losses of
pytorch-metric-learning (PML), drop-in replacements for PML's loss classes.

    import fused_pairloss as fpl
    loss_fn = fpl.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)   # was: losses.MultiSimilarityLoss
    loss = loss_fn(embeddings, labels)
"""
from . import functional, reference
from ._backends import available_backends, build_info
from ._version import __version__
from .memory import CrossBatchMemory
from .modules import (ArcFaceLoss, CircleLoss, ContrastiveLoss, CosFaceLoss, GeneralizedLiftedStructureLoss,
                      MultiSimilarityLoss, NormalizedSoftmaxLoss, NTXentLoss, ProxyAnchorLoss, ProxyCircleLoss,
                      SoftTripleLoss, SupConLoss)
from .parallel import DistributedLossWrapper

__all__ = [
    "MultiSimilarityLoss",
    "CircleLoss",
    "NTXentLoss",
    "SupConLoss",
    "ContrastiveLoss",
    "GeneralizedLiftedStructureLoss",
    "SoftTripleLoss",
    "ProxyCircleLoss",
    "ProxyAnchorLoss",
    "NormalizedSoftmaxLoss",
    "CosFaceLoss",
    "ArcFaceLoss",
    "CrossBatchMemory",
    "DistributedLossWrapper",
    "functional",
    "reference",
    "available_backends",
    "build_info",
    "__version__",
]
