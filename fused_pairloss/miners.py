"""PML's `miners` namespace: `from fused_pairloss import miners` gives the classes of
pytorch_metric_learning.miners (this library has none of its own here yet)."""
from ._pml_namespace import pml_fallback

__getattr__, __dir__ = pml_fallback("miners", __name__)
