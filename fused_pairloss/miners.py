"""PML's `miners` namespace: `from fused_pairloss import miners` gives our miners where we have
them (fused_pairloss/_miners.py: PML's classes mined in chunks of rows; TripletMarginMiner's result
fused by TripletMarginLoss) and the classes of pytorch_metric_learning.miners otherwise."""
from ._pml_namespace import pml_fallback, star_names

OURS = ("TripletMarginMiner", "MultiSimilarityMiner", "PairMarginMiner", "BatchHardMiner", "BatchEasyHardMiner")

_pml_getattr, __dir__ = pml_fallback("miners", __name__)
__all__ = star_names("miners", OURS, ours_need_pml=True)  # (our miners subclass PML's)


def __getattr__(name):
    if name in OURS or name == "MinedTriplets":
        try:
            from . import _miners
        except ImportError as e:
            raise AttributeError(f"fused_pairloss.miners.{name} needs pytorch-metric-learning (our miners are "
                                 "PML's classes mined in chunks)") from e
        return getattr(_miners, name)
    return _pml_getattr(name)
