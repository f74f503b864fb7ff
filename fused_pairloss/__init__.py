"""fused_pairloss: fused kernels for the pair-based and proxy metric-learning losses of
pytorch-metric-learning (PML), drop-in replacements for PML's loss classes.

    import fused_pairloss as fpl
    loss_fn = fpl.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)   # was: losses.MultiSimilarityLoss
    loss = loss_fn(embeddings, labels)

Every loss class (fused_pairloss/losses/, one module per loss) is exported here from the loss table.
`from fused_pairloss import losses, miners, distances, reducers, regularizers` gives PML's
namespaces with this library's classes where it has them and PML's own otherwise.
`ClipLoss` and `SigLipLoss` are open_clip's image-text losses (their own forward signature: they
are not in the PML loss table).
"""
from . import distances, functional, losses, miners, modules, reducers, reference, regularizers  # noqa: F401
from ._backends import available_backends, build_info
from ._version import __version__
from .losses.clip import ClipLoss
from .losses.siglip import SigLipLoss
from .memory import CrossBatchMemory
from .parallel import DistributedLossWrapper

globals().update({name: entry.cls for name, entry in losses.REGISTRY.items()})
losses.CrossBatchMemory = CrossBatchMemory  # PML's losses namespace has it (losses cannot import memory: a cycle)

__all__ = [
    *losses.REGISTRY,
    "ClipLoss",
    "SigLipLoss",
    "CrossBatchMemory",
    "DistributedLossWrapper",
    "functional",
    "reference",
    "losses",
    "miners",
    "distances",
    "reducers",
    "regularizers",
    "available_backends",
    "build_info",
    "__version__",
]
