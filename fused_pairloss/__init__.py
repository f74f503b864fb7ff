"""fused_pairloss: fused kernels for the pair-based and proxy metric-learning losses of
pytorch-metric-learning (PML), drop-in replacements for PML's loss classes.

    import fused_pairloss as fpl
    loss_fn = fpl.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)   # was: losses.MultiSimilarityLoss
    loss = loss_fn(embeddings, labels)

Every loss class (fused_pairloss/losses/, one module per loss) is exported here from the loss table.
"""
from . import functional, losses, modules, reference  # noqa: F401  (fused_pairloss.modules: compatibility)
from ._backends import available_backends, build_info
from ._version import __version__
from .memory import CrossBatchMemory
from .parallel import DistributedLossWrapper

globals().update({name: entry.cls for name, entry in losses.REGISTRY.items()})

__all__ = [
    *losses.REGISTRY,
    "CrossBatchMemory",
    "DistributedLossWrapper",
    "functional",
    "reference",
    "available_backends",
    "build_info",
    "__version__",
]
