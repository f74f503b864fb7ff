"""PML's `regularizers` namespace: `from fused_pairloss import regularizers` gives the classes of
pytorch_metric_learning.regularizers (this library has none of its own here yet)."""
from ._pml_namespace import pml_fallback, star_names

__getattr__, __dir__ = pml_fallback("regularizers", __name__)
__all__ = star_names("regularizers")
