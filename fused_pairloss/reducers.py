"""PML's `reducers` namespace: `from fused_pairloss import reducers` gives the classes of
pytorch_metric_learning.reducers (this library has none of its own here yet)."""
from ._pml_namespace import pml_fallback

__getattr__, __dir__ = pml_fallback("reducers", __name__)
