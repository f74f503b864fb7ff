"""PML's `reducers` namespace: `from fused_pairloss import reducers` gives the classes of
pytorch_metric_learning.reducers (this library has none of its own here yet)."""
from ._pml_namespace import pml_fallback, star_names

__getattr__, __dir__ = pml_fallback("reducers", __name__)
__all__ = star_names("reducers")
