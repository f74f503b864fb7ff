"""The losses, one module per loss: its PML-exact reference, its engine declaration and row
combination, its fused call, its functional form and its nn.Module with PML's class name
(docs/adding-a-loss.md). Every module registers its losses in `ENTRIES`; `REGISTRY` (class name ->
LossEntry) is the one table the package exports, fused_pairloss.functional / .reference /
.modules, the distributed wrapper, the test kit and the benchmarks read.
"""
from . import (angular, circle, contrastive, dynamic_soft_margin, fast_ap, histogram, instance, intra_pair_variance,
               large_margin_softmax, lifted_structure, margin, margin_softmax, multi_similarity, n_pairs, nca, ntxent,
               p2s_grad, pnp, proxy_anchor, proxy_circle, proxy_nca, ranked_list, smooth_ap, snr_contrastive,
               soft_triple, supcon, tcm, triplet_margin, tuplet_margin)
from .._pml_namespace import pml_fallback, star_names
from ._base import with_pml_hooks
from ._registry import LossEntry  # noqa: F401 - exported (__all__)

LOSS_MODULES = (multi_similarity, circle, ntxent, supcon, contrastive, lifted_structure, triplet_margin, margin, nca,
                n_pairs, instance, tuplet_margin, tcm, angular, snr_contrastive, intra_pair_variance, ranked_list,
                histogram, fast_ap, smooth_ap, pnp, dynamic_soft_margin, soft_triple, proxy_circle, proxy_anchor,
                proxy_nca, margin_softmax, large_margin_softmax, p2s_grad)
REGISTRY = {entry.name: entry for module in LOSS_MODULES for entry in module.ENTRIES}
for _entry in sorted(REGISTRY.values(), key=lambda e: len(e.cls.__mro__)):  # bases first
    with_pml_hooks(_entry.cls, _entry.cls._pml_class())  # PML's methods our classes do not define
del _entry

globals().update({name: entry.cls for name, entry in REGISTRY.items()})
# PML's `losses` namespace: the names this library lacks are PML's own classes (fused_pairloss/__init__.py
# adds CrossBatchMemory)
__getattr__, __dir__ = pml_fallback("losses", __name__)

# (a star import: ours, PML's other classes, and CrossBatchMemory, which fused_pairloss/__init__.py adds)
__all__ = star_names("losses", [*REGISTRY, "REGISTRY", "LossEntry", "CrossBatchMemory"])
