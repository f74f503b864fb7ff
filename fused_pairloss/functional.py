"""Functional API (docs/api.md): one function per loss, `<name>_loss(embeddings, labels, ...,
backend="auto")`: validate, pick the backend, run the loss.

backend="reference" runs the loss's reference (materializes N x M); "cpu", "triton", "cuda" run the
fused engines; "auto" picks the fastest fused backend for the tensors' device, else the reference.
Each function is defined in its loss's module (fused_pairloss/losses/<loss>.py); this namespace
holds every one of the loss table.
"""
from .losses import REGISTRY

globals().update({entry.functional_name: entry.functional for entry in REGISTRY.values()})

__all__ = [entry.functional_name for entry in REGISTRY.values()]
