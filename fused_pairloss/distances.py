"""PML's `distances` namespace: `from fused_pairloss import distances` gives the classes of
pytorch_metric_learning.distances (this library has none of its own here yet)."""
from ._pml_namespace import pml_fallback, star_names

__getattr__, __dir__ = pml_fallback("distances", __name__)
__all__ = star_names("distances")
