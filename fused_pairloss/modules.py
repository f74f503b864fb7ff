"""The nn.Module of every loss, with PML's class names (docs/api.md). Each is defined in its loss's
module (fused_pairloss/losses/<loss>.py); this namespace holds every one of the loss table."""
from .losses import REGISTRY

globals().update({name: entry.cls for name, entry in REGISTRY.items()})

__all__ = list(REGISTRY)
